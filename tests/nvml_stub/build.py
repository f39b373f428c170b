"""Compile the fake NVML library for tests.

pynvml opens the library with ``CDLL("libnvidia-ml.so.1")``, so the fake is built
under exactly that name into a folder that a child process puts on
``LD_LIBRARY_PATH``. Compiling takes a fraction of a second but happens once per
test session and folder, and only again when the C source changes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from c_library import CompilerMissing, compile_shared_library

__all__ = ["CompilerMissing", "build_fake_nvml", "child_environment", "run_child"]

SOURCE = Path(__file__).with_name("fake_nvml.c")
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the child imports this checkout's sidecar
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_FILE_VARIABLE = "FAKE_NVML_STATE_FILE"


# What ``omit`` may leave out, to stage an older driver (see fake_nvml.c's header).
OMITTABLE = frozenset({"COMPUTE_PROCESSES_V3", "EVENTS", "FIELD_VALUES"})


def build_fake_nvml(dest_dir: Path, *, omit: Iterable[str] = ()) -> Path:
    """Return the path of a freshly compiled fake ``libnvidia-ml.so.1`` in ``dest_dir``.

    ``omit`` names groups of symbols to leave out (``OMITTABLE``); use a separate
    ``dest_dir`` for each combination, since every build has the same file name.
    """
    omitted = tuple(sorted(set(omit)))
    unknown = set(omitted) - OMITTABLE
    if unknown:
        raise ValueError(f"cannot omit {sorted(unknown)}: choose from {sorted(OMITTABLE)}")
    return _build_cached(Path(dest_dir).resolve(), SOURCE.stat().st_mtime_ns, omitted)


def child_environment(library_dir: Path, state_file: Path) -> dict[str, str]:
    """The environment of a child process that must load the fake from ``library_dir``.

    pynvml loads ``libnvidia-ml.so.1`` once per process, and the loader reads
    ``LD_LIBRARY_PATH`` at process start, so each scenario needs a fresh child.
    """
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(library_dir)
    env[STATE_FILE_VARIABLE] = str(state_file)
    return env


@functools.cache
def _build_cached(dest_dir: Path, _source_mtime_ns: int, omitted: tuple[str, ...]) -> Path:
    # The mtime is part of the cache key so an edited fake is rebuilt within a session.
    return compile_shared_library(
        SOURCE,
        dest_dir / LIBRARY_NAME,
        flags=[f"-DFAKE_OMIT_{group}" for group in omitted],
        what="the fake NVML library",
    )


def run_child(code: str, library_dir: Path, state_file: Path, plan: object) -> dict[str, Any]:
    """Run ``code`` in a fresh Python whose only NVML is in ``library_dir``, the plan as JSON
    on its stdin; its stdout's JSON is the result (the test fails on a non-zero exit)."""
    env = child_environment(library_dir, state_file)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
    completed = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout)
    return result
