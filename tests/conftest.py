"""Shared fixtures: a simulated FluxGym tree and a way to run the real sidecar on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree

# Fast settings for tests: seconds instead of the production minutes.
FAST_SETTINGS = {
    "SIDECAR_POLL_INTERVAL": "0.2s",
    "SIDECAR_STALL_TIMEOUT": "2s",
    "SIDECAR_GPU_IDLE_TIMEOUT": "1h",
    "SIDECAR_STARTUP_GRACE": "4s",
    "SIDECAR_KILL_GRACE": "2s",
    "SIDECAR_RESTART_BACKOFF": "0s",
    "SIDECAR_CHECKPOINT_SETTLE": "0.5s",
    "SIDECAR_MAX_RESTARTS": "3",
    "SIDECAR_LOG_FORMAT": "json",
    "SIDECAR_ECHO_TRAINER_OUTPUT": "false",
    # A fixed port would make sidecars of concurrent tests collide; the tests of the HTTP
    # surface choose a free one.
    "SIDECAR_HTTP_PORT": "0",
}
FAST_SIMULATION = {
    "SIM_STEPS_PER_EPOCH": "4",
    "SIM_STEP_SECONDS": "0.05",
    "SIM_STARTUP_SECONDS": "0.2",
    "SIM_SAMPLE_SECONDS": "0.05",
}


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def fluxgym(tmp_path: Path) -> FluxgymTree:
    return build_fluxgym_tree(tmp_path / "fluxgym")


@dataclass
class SidecarRun:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]

    def names(self) -> list[str]:
        return [event["event"] for event in self.events]

    def seconds_between(self, first: dict[str, Any], second: dict[str, Any]) -> float:
        return (_when(second) - _when(first)).total_seconds()


def _when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def run_sidecar(
    tree: FluxgymTree,
    *,
    settings: dict[str, str] | None = None,
    simulation: dict[str, str] | None = None,
    timeout: float = 90,
    command: str = "run",
) -> SidecarRun:
    """Run ``python -m sidecar run`` as a real process on the tree; its JSON events parsed."""
    env = {
        **os.environ,
        **tree.env({**FAST_SIMULATION, **(simulation or {})}),
        **FAST_SETTINGS,
        **(settings or {}),
        "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_everything(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"sidecar did not finish in {timeout} s; events:\n{stdout}\n{stderr[-3000:]}")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return SidecarRun(process.returncode, events, stderr)


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
