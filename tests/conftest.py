"""Shared fixtures: a simulated FluxGym tree and a way to run the real sidecar on it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from sidecar.simulator import harness
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import FAST_SETTINGS, FAST_SIMULATION, SidecarRun

__all__ = ["FAST_SETTINGS", "FAST_SIMULATION", "SidecarRun", "kill_everything", "run_sidecar"]


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def fluxgym(tmp_path: Path) -> FluxgymTree:
    return build_fluxgym_tree(tmp_path / "fluxgym")


def run_sidecar(tree: FluxgymTree, **options: Any) -> SidecarRun:
    """``python -m sidecar run`` on the tree (see sidecar.simulator.harness); fails the test
    with the events so far when it does not finish in time."""
    try:
        return harness.run_sidecar(tree, **options)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"sidecar did not finish in time; events:\n{error.output}\n{error.stderr}")


def kill_everything(session_leader: int) -> None:
    """Kill the sidecar's session and every trainer group it started."""
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_leader or "sidecar.simulator" in " ".join(
                process.cmdline()
            ):
                process.send_signal(signal.SIGKILL)
        except (psutil.Error, OSError):
            continue


def simulator_processes(tree: FluxgymTree) -> list[psutil.Process]:
    """Live processes running this tree's trainer (to prove nothing was orphaned)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(tree.root) in cmdline and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found
