"""Compiling the tests' small C libraries (the fake NVML, the uninterruptible-sleep helper).

Built beside the target and renamed, so a concurrent loader never maps half a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


class CompilerMissing(RuntimeError):
    """No gcc on PATH: callers skip the tests that need the library rather than fail them."""


def compile_shared_library(
    source: Path, library: Path, *, flags: Sequence[str] = (), what: str | None = None
) -> Path:
    """``gcc -shared -fPIC`` ``source`` into ``library``; RuntimeError with gcc's output."""
    what = what or library.name
    compiler = shutil.which("gcc")
    if compiler is None:
        raise CompilerMissing(f"gcc is not on PATH; cannot build {what}")
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    command = [compiler, "-Wall", "-Wextra", "-O2", "-shared", "-fPIC", *flags]
    result = subprocess.run(
        [*command, "-o", str(partial), str(source)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed to build {what}:\n{result.stderr}")
    os.replace(partial, library)
    return library
