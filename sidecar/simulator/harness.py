"""Running the real sidecar on a simulated FluxGym tree, for tests and benchmarks.

Settings here are seconds where production uses minutes, so a whole hang-and-recover
cycle takes a few seconds of wall time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from sidecar.simulator.fluxgym_tree import FluxgymTree

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
    # Concurrent sidecars would collide on a fixed port.
    "SIDECAR_HTTP_PORT": "0",
}
FAST_SIMULATION = {
    "SIM_STEPS_PER_EPOCH": "4",
    "SIM_STEP_SECONDS": "0.05",
    "SIM_STARTUP_SECONDS": "0.2",
    "SIM_SAMPLE_SECONDS": "0.05",
}


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
        return event_time(second) - event_time(first)


def event_time(event: dict[str, Any]) -> float:
    """An event's timestamp as POSIX seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def sidecar_environment(
    tree: FluxgymTree,
    *,
    settings: dict[str, str | None] | None = None,
    simulation: dict[str, str] | None = None,
) -> dict[str, str | None]:
    """The sidecar's environment; a setting given as None is left out of it."""
    return {
        **os.environ,
        **tree.env({**FAST_SIMULATION, **(simulation or {})}),
        **FAST_SETTINGS,
        "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
        **(settings or {}),
    }


def run_sidecar(
    tree: FluxgymTree,
    *,
    settings: dict[str, str | None] | None = None,
    simulation: dict[str, str] | None = None,
    timeout: float = 90,
    command: str = "run",
    arguments: Sequence[str] = (),
    cwd: str | None = None,
) -> SidecarRun:
    """``python -m sidecar run`` as a real process on the tree, its JSON events parsed.

    Raises ``subprocess.TimeoutExpired`` (after killing the sidecar's session) when it
    does not finish in time.
    """
    environment = sidecar_environment(tree, settings=settings, simulation=simulation)
    return run_sidecar_process(
        {key: value for key, value in environment.items() if value is not None},
        root=tree.root,
        timeout=timeout,
        arguments=(command, *arguments),
        cwd=cwd,
    )


def run_sidecar_process(
    environment: dict[str, str],
    *,
    root: Path,
    timeout: float = 90,
    arguments: Sequence[str] = ("run",),
    cwd: str | None = None,
) -> SidecarRun:
    """``python -m sidecar <arguments>`` as a real process in ``environment``, its JSON events
    parsed: any trainer's tree under ``root``. On a timeout the sidecar's session and every
    process whose command line names ``root`` are killed, then TimeoutExpired is raised."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *arguments],
        env=environment,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timeout_error:
        kill_session_and_tree(root, process.pid)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(
            timeout_error.cmd, timeout, output=stdout.encode(), stderr=stderr.encode()
        ) from None
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return SidecarRun(process.returncode, events, stderr)


def stop_everything(tree: FluxgymTree, sidecar_pid: int) -> None:
    """SIGKILL a sidecar's session and every process running this tree's trainer."""
    kill_session_and_tree(tree.root, sidecar_pid)


def kill_session_and_tree(root: Path, sidecar_pid: int) -> None:
    """SIGKILL a sidecar's session and every process whose command line names ``root``."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            ours = os.getsid(process.pid) == sidecar_pid
            if ours or str(root) in " ".join(process.info["cmdline"] or ()):
                process.send_signal(signal.SIGKILL)
        except (psutil.Error, OSError):
            continue
