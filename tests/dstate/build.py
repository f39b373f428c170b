"""Compile the uninterruptible-sleep library for the simulator's ``hang_dstate`` fault.

The simulated trainer loads it through ctypes from ``SIM_DSTATE_LIBRARY``. Compiling takes
a fraction of a second but happens once per test session and folder, and again only when
the C source changes (as for the fake NVML library in ``tests/nvml_stub/build.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

from c_library import CompilerMissing, compile_shared_library

from sidecar.simulator.hangs import DSTATE_LIBRARY_VARIABLE

SOURCE = Path(__file__).with_name("dstate.c")
LIBRARY_NAME = "libsimdstate.so"

__all__ = ["DSTATE_LIBRARY_VARIABLE", "CompilerMissing", "build_dstate_library"]


def build_dstate_library(dest_dir: Path) -> Path:
    """Return the path of a freshly compiled ``libsimdstate.so`` in ``dest_dir``."""
    return _build_cached(Path(dest_dir).resolve(), SOURCE.stat().st_mtime_ns)


@functools.cache
def _build_cached(dest_dir: Path, _source_mtime_ns: int) -> Path:
    # The mtime is part of the cache key so an edited source is rebuilt within a session.
    return compile_shared_library(SOURCE, dest_dir / LIBRARY_NAME, flags=["-Werror"])
