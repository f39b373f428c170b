"""The contract every restart mode fulfils, so the watchdog loop never knows which it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.run.paths import RunPaths


class RestartError(Exception):
    """The trainer could not be stopped or (re)started; the message says why."""


class SurvivedKill(RestartError):
    """Trainer processes outlived SIGKILL: they sleep uninterruptibly in the kernel (a hung
    file system, a driver call), and a second trainer must never join them. ``survivors``
    says what the kernel shows of each (pid, state, wait channel)."""

    def __init__(self, survivors: list[dict[str, object]]) -> None:
        pids = [row["pid"] for row in survivors]
        super().__init__(
            f"trainer processes {pids} survived SIGKILL (uninterruptible sleep in the kernel: "
            + "; ".join(
                f"pid {row['pid']} state {row.get('state') or '?'} in {row.get('wchan') or '?'}"
                for row in survivors
            )
            + "); not starting a second trainer beside them: the host needs attention"
        )
        self.survivors = survivors


@dataclass(frozen=True)
class TrainerStatus:
    running: bool
    exit_code: int | None = None  # after it ended, when the mode can know it
    attempt: str | None = None  # identifies one run of the trainer (start time, pids, ...)
    # It ended because its container stopped or restarted (a recreate, a reboot): an
    # interruption of the run, not a crash of it.
    went_with_container: bool = False
    # Roots of trainer process trees running beside the one the sidecar launched (a second
    # Start in the UI): never two trainers on one GPU and one output folder.
    others: tuple[int, ...] = ()
    # The root of the tree the sidecar launched, when it runs and can be told apart.
    own: int | None = None


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
    # Whether a trainer can go on running when the sidecar goes away. Not in exec mode: the
    # trainer is in the sidecar's PID namespace and dies with it, so a trainer running when
    # the sidecar starts is always a new start, never one the sidecar watched before.
    outlives_sidecar: bool

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

    def stop_trees(self, roots: list[int]) -> None:
        """Stop only the trainer trees rooted at ``roots`` (one of two); raises RestartError."""
