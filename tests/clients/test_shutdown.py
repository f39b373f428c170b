"""SIGTERM during a Docker daemon outage: the real sidecar stops at once instead of waiting out
its retry window.

The sidecar runs as ``python -m sidecar run`` in exec or container mode with DOCKER_HOST on a
socket that does not exist, so its first Engine call (finding the trainer's container) is
retried with backoff under a long window. Compose and the kubelet kill a container that
outlives its stop grace period, so the sidecar must end within SIDECAR_KILL_GRACE plus a
little, with the usual 128 + SIGTERM status. No engine is needed.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import kill_everything
from sidecar_process import spawn_sidecar

from sidecar import events
from sidecar.config import Settings
from sidecar.restarters import RestartError
from sidecar.simulator.fluxgym_tree import FluxgymTree
from sidecar.simulator.harness import sidecar_environment
from sidecar.wiring import build_restarter

KILL_GRACE = 2.0
# Far longer than the test may take: an exit within it can only come from the stop.
RETRY_WINDOW = 120.0
# The kill grace, plus the interpreter's exit and a slow shared machine.
EXIT_WITHIN = KILL_GRACE + 6.0


class SidecarProcess:
    """The real sidecar, its JSON events read on a thread so that waiting can time out."""

    def __init__(self, environment: dict[str, str]) -> None:
        self.process = spawn_sidecar(environment)
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def wait_for(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if event is None:
                break  # stdout closed: the sidecar ended
            self.events.append(event)
            if event["event"] == name:
                return event
        stderr = self.process.stderr.read() if self.process.poll() is not None else ""
        names = [event["event"] for event in self.events]
        raise AssertionError(f"no {name} within {timeout} s; saw {names}\n{stderr}")

    def drain(self) -> list[str]:
        """The names of the events logged until stdout closed."""
        while (event := self._lines.get(timeout=5)) is not None:
            self.events.append(event)
        return [event["event"] for event in self.events]


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for sidecar in started:
        if sidecar.process.poll() is None:
            kill_everything(sidecar.process.pid)
            sidecar.process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exec", "container"])
def test_sigterm_during_a_docker_outage_ends_the_sidecar_promptly(
    fluxgym: FluxgymTree, tmp_path: Path, sidecars: list[SidecarProcess], mode: str
) -> None:
    """Backing off from an unreachable daemon, the sidecar still stops on SIGTERM at once."""
    socket_path = tmp_path / "no-daemon-here.sock"
    environment = sidecar_environment(
        fluxgym,
        settings={
            "SIDECAR_RESTART_MODE": mode,
            "SIDECAR_TRAINER_CONTAINER": "trainer",
            # Named, so that no Engine call is made to find the sidecar's own project first.
            "SIDECAR_COMPOSE_PROJECT": "fluxgym",
            "SIDECAR_DOCKER_RETRY_WINDOW": f"{RETRY_WINDOW:g}s",
            "SIDECAR_KILL_GRACE": f"{KILL_GRACE:g}s",
            "DOCKER_HOST": f"unix://{socket_path}",
        },
    )
    sidecar = SidecarProcess(environment)
    sidecars.append(sidecar)

    retry = sidecar.wait_for(events.DOCKER_RETRY, timeout=60)
    assert retry["docker_host"] == f"unix://{socket_path}"
    assert "FileNotFoundError" in retry["error"]
    assert sidecar.process.poll() is None, "still inside the retry window"

    sidecar.process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    try:
        code = sidecar.process.wait(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sidecar was still retrying {EXIT_WITHIN:g} s after SIGTERM")
    elapsed = time.monotonic() - began
    assert code == 128 + signal.SIGTERM
    assert elapsed < EXIT_WITHIN
    names = sidecar.drain()
    assert names[-1] == events.SIDECAR_STOPPED
    # SIGTERM came during the first backoff (0.5 s at least): at most that one retry.
    assert names.count(events.DOCKER_RETRY) <= 2, "retries went on after SIGTERM"
    given_up = [event for event in sidecar.events if "shutting down" in event.get("reason", "")]
    assert given_up, f"the Docker call should end saying why; saw {names}"


def test_build_restarter_hands_the_stop_event_to_the_docker_gateway(tmp_path: Path) -> None:
    """The sidecar's stop event reaches the Docker gateway: once set, no call retries."""
    settings = Settings(
        restart_mode="container",
        trainer_container="trainer",
        compose_project="fluxgym",
        docker_retry_window=RETRY_WINDOW,
    )
    stop = threading.Event()
    stop.set()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon-here.sock")
        restarter = build_restarter(settings, None, structlog.get_logger(), stop_event=stop)
    began = time.monotonic()
    with pytest.raises(RestartError, match="the sidecar is shutting down"):
        restarter.start()
    assert time.monotonic() - began < 5
