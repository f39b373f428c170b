"""The real sidecar as a child process, as the loop-level tests start it."""

from __future__ import annotations

import subprocess
import sys


def spawn_sidecar(environment: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m sidecar run`` in its own session (so a test can signal its whole group),
    JSON events on stdout, text mode."""
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
