"""The real sidecar as a child process, as the loop-level tests start it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest


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


def free_port() -> int:
    """A TCP port nothing listens on right now, for a sidecar's SIDECAR_HTTP_PORT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RunningSidecar:
    """A spawned sidecar whose JSON events are read on a thread as they come (a full pipe
    would stall it) and its stderr drained, so that a test can wait for an event while the
    sidecar runs."""

    def __init__(self, environment: dict[str, str]):
        self.process = spawn_sidecar(environment)
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._arrived = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                with self._arrived:
                    self.events.append(json.loads(line))
                    self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()  # the sidecar exited: waiters need not wait on

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def names(self) -> list[str]:
        with self._arrived:
            return [event["event"] for event in self.events]

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._arrived:
            return [event for event in self.events if event["event"] == name]

    def only(self, name: str) -> dict[str, Any]:
        """The one ``name`` event of this sidecar; fails with its events when not exactly one."""
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} {name} events; {self.describe()}"
        return found[0]

    def wait_for(
        self, name: str, *, after: dict[str, Any] | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """The first event called ``name`` (logged after the event ``after``, when given);
        fails the test with what came when the sidecar ended or took too long."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                start = 0 if after is None else self.events.index(after) + 1
                found = [event for event in self.events[start:] if event["event"] == name]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    break
                self._arrived.wait(min(left, 0.5))
        pytest.fail(
            f"no {name} event within {timeout} s (sidecar exit code {self.process.poll()}); "
            f"{self.describe()}"
        )

    def finish(self, timeout: float) -> int:
        """Wait for the sidecar to exit on its own; its exit code."""
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def describe(self) -> str:
        return f"events {self.names()}\nstderr tail:\n{''.join(self.stderr)[-2000:]}"
