"""Compile the uninterruptible-sleep library for the simulator's ``hang_dstate`` fault.

The simulated trainer loads it through ctypes from ``SIM_DSTATE_LIBRARY``. Compiling takes
a fraction of a second but happens once per test session and folder, and again only when
the C source changes (as for the fake NVML library in ``tests/nvml_stub/build.py``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from sidecar.simulator.hangs import DSTATE_LIBRARY_VARIABLE

SOURCE = Path(__file__).with_name("dstate.c")
LIBRARY_NAME = "libsimdstate.so"

__all__ = ["DSTATE_LIBRARY_VARIABLE", "CompilerMissing", "build_dstate_library"]


class CompilerMissing(RuntimeError):
    """No gcc on PATH: callers skip the tests that need the library rather than fail them."""


def build_dstate_library(dest_dir: Path) -> Path:
    """Return the path of a freshly compiled ``libsimdstate.so`` in ``dest_dir``."""
    return _build_cached(Path(dest_dir).resolve(), SOURCE.stat().st_mtime_ns)


@functools.cache
def _build_cached(dest_dir: Path, _source_mtime_ns: int) -> Path:
    # The mtime is part of the cache key so an edited source is rebuilt within a session.
    compiler = shutil.which("gcc")
    if compiler is None:
        raise CompilerMissing(f"gcc is not on PATH; cannot build {LIBRARY_NAME}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    library = dest_dir / LIBRARY_NAME
    # Build beside the target and rename, so a concurrent loader never maps half a file.
    partial = dest_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    command = [compiler, "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC"]
    result = subprocess.run(
        [*command, "-o", str(partial), str(SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed to build {LIBRARY_NAME}:\n{result.stderr}")
    os.replace(partial, library)
    return library
