"""The contract every restart mode fulfils, so the watchdog loop never knows which it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.run.paths import RunPaths


class RestartError(Exception):
    """The trainer could not be stopped or (re)started; the message says why."""


@dataclass(frozen=True)
class TrainerStatus:
    running: bool
    exit_code: int | None = None  # after it ended, when the mode can know it
    attempt: str | None = None  # identifies one run of the trainer (start time, pids, ...)


class Restarter(Protocol):
    mode: str
    # False only in detect-only mode: verdicts are reported, the trainer is never touched.
    acts: bool
    # Process mode's job ends with its run; container modes stay up for the next one.
    exits_with_run: bool
    # True: stop the trainer, then choose the checkpoint and rewrite train.sh (nothing is
    # written meanwhile). False: rewrite first, because restarting re-reads train.sh at once.
    stop_before_rewrite: bool
    # False when someone else (the orchestrator's restart policy) brings the trainer back.
    relaunches: bool

    def use_run(self, paths: RunPaths) -> None:
        """Follow the run now watched (container modes move between runs of one root)."""

    def start(self) -> None:
        """Launch the trainer for the first time, where this mode launches it at all."""

    def status(self) -> TrainerStatus:
        """Whether the trainer runs now and, once it ended, how."""

    def trainer_pids(self) -> list[int]:
        """Process ids of the trainer's processes, where visible (figures, reports)."""

    def stop(self) -> None:
        """Stop every process of the trainer and wait until they are gone."""

    def restart(self) -> None:
        """Bring the trainer back after train.sh was rewritten; raises RestartError."""
