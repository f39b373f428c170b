"""The loop's heartbeat: the file it touches, and the rule that reads the file's age.

The loop touches the file on every poll, and also while it waits out a backoff, so a stale
file means the loop itself is stuck. Liveness (/healthz), ``training-sidecar healthcheck``
and ``status`` all read it with the one rule here, and the writer sits beside that rule so
the two cannot drift apart (a writer beating less often than the rule allows for would make
a healthy loop look dead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar import events


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str


def heartbeat_allowance(poll_interval: float, kill_grace: float) -> float:
    """How old the heartbeat may be: polls are seconds apart, and only stopping a trainer
    (up to the kill grace) or saving an incident bundle holds the loop longer."""
    return 3 * poll_interval + kill_grace + 60


class Heartbeat:
    """The heartbeat file of one sidecar: ``beat()`` for the loop, ``health()`` for probes.

    ``log`` is only used by ``beat()``; the readers (healthcheck, status, /healthz) need none.
    """

    def __init__(
        self,
        path: Path,
        *,
        poll_interval: float,
        kill_grace: float,
        log: structlog.typing.FilteringBoundLogger | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self.allowance = heartbeat_allowance(poll_interval, kill_grace)
        self._log = log or structlog.get_logger("sidecar")
        self._clock = clock  # wall time: it is compared with the file's mtime
        self._failed = False

    def beat(self) -> None:
        """Touch the file. A failure is logged once: a read-only or full volume would
        otherwise repeat the same line every poll, and the loop goes on watching."""
        try:
            self.path.touch()
        except OSError as error:
            if not self._failed:
                self._failed = True
                self._log.warning(events.HEARTBEAT_FAILED, path=str(self.path), error=str(error))

    def health(self, now: float | None = None) -> Health:
        """Healthy while the file is at most ``allowance`` seconds old at ``now``."""
        allowed = self.allowance
        try:
            age = (self._clock() if now is None else now) - self.path.stat().st_mtime
        except FileNotFoundError:
            return Health(False, f"no heartbeat at {self.path} yet")
        if age > allowed:
            return Health(False, f"last heartbeat {age:.0f} s ago (allowed {allowed:.0f} s)")
        return Health(True, f"last heartbeat {age:.1f} s ago")
