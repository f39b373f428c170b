"""Compile the fake NVML library for tests.

pynvml opens the library with ``CDLL("libnvidia-ml.so.1")``, so the fake is built
under exactly that name into a folder that a child process puts on
``LD_LIBRARY_PATH``. Compiling takes a fraction of a second but happens once per
test session and folder, and only again when the C source changes.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_FILE_VARIABLE = "FAKE_NVML_STATE_FILE"


class CompilerMissing(RuntimeError):
    """No gcc on PATH: callers skip the tests that need the fake rather than fail them."""


def build_fake_nvml(dest_dir: Path) -> Path:
    """Return the path of a freshly compiled fake ``libnvidia-ml.so.1`` in ``dest_dir``."""
    return _build_cached(Path(dest_dir).resolve(), SOURCE.stat().st_mtime_ns)


@functools.cache
def _build_cached(dest_dir: Path, _source_mtime_ns: int) -> Path:
    # The mtime is part of the cache key so an edited fake is rebuilt within a session.
    compiler = shutil.which("gcc")
    if compiler is None:
        raise CompilerMissing("gcc is not on PATH; cannot build the fake libnvidia-ml.so.1")
    dest_dir.mkdir(parents=True, exist_ok=True)
    library = dest_dir / LIBRARY_NAME
    # Build beside the target and rename, so a concurrent reader never loads half a file.
    partial = dest_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    command = [compiler, "-Wall", "-Wextra", "-O2", "-shared", "-fPIC"]
    result = subprocess.run(
        [*command, "-o", str(partial), str(SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed to build the fake NVML library:\n{result.stderr}")
    os.replace(partial, library)
    return library
