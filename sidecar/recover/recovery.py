"""Recovering a run after a verdict: stop, point, back off, restart, or give up.

One call performs the whole sequence and returns an :class:`Outcome`; the loop decides
what watching means afterwards. The order matters and is the restarter's to say: modes
that relaunch train.sh themselves stop the trainer before rewriting it (nothing is
written meanwhile); modes whose restart re-reads train.sh at once rewrite it first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sidecar import events
from sidecar.checkpoints.choice import NoCheckpointLeft
from sidecar.decide.decision import Verdict
from sidecar.decide.recovery_rules import RecoveryRules, leave_restart_to_runtime
from sidecar.recover.resume_point import ResumePointer
from sidecar.restarters.base import Restarter, RestartError
from sidecar.run.record import RunRecord
from sidecar.trainers import LaunchScriptError


class OutcomeKind(Enum):
    RESTARTED = "restarted"  # the sidecar relaunched the trainer
    LEFT_TO_RUNTIME = "left to runtime"  # the runtime's restart policy brings it back
    RETRY = "retry"  # nothing changed (a full disk): try again at the next poll
    GAVE_UP = "gave up"
    SHUTTING_DOWN = "shutting down"  # a stop was requested during the backoff


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    checkpoint: str | None = None  # resumed from (sidecar view)


class Recovery:
    def __init__(
        self,
        *,
        restarter: Restarter,
        rules: RecoveryRules,
        log: Any,
        wait: Callable[[float], bool],
        monotonic: Callable[[], float],
    ) -> None:
        """``wait(seconds)`` sleeps and returns True when the sidecar is told to stop."""
        self.restarter = restarter
        self.rules = rules
        self.log = log
        self._wait = wait
        self._monotonic = monotonic
        self._last_error: str | None = None

    def recover(
        self,
        verdict: Verdict,
        record: RunRecord,
        pointer: ResumePointer,
        *,
        wall: float,
        retrying: bool,
    ) -> Outcome:
        """``retrying``: the previous call returned RETRY, so the trainer is already stopped."""
        restarter = self.restarter
        if restarter.stop_before_rewrite and not retrying and not self._stop(record):
            return Outcome(OutcomeKind.GAVE_UP)
        if record.ledger.abandoned:
            return self.give_up(record, "the run was abandoned by the user: not recovered")
        if self.rules.budget_spent(record.ledger.restarts):
            return self.give_up(record, f"restart budget of {self.rules.max_restarts} spent")
        # No settling: a stalled trainer wrote nothing for the whole stall timeout and a
        # crashed or stopped one writes nothing at all, so every file is as complete as it
        # will get — and a wall clock that jumped cannot make a good checkpoint look fresh.
        try:
            choice = pointer.choose_and_point(record.ledger, now=wall, settle=0.0)
        except NoCheckpointLeft as error:
            record.ledger = error.ledger  # giving up: keep the quarantine that led to it
            self.log.error(events.RESTART_FAILED, reason=str(error))
            return self.give_up(record, str(error))
        except (LaunchScriptError, OSError) as error:
            # A full disk, a read-only volume, a train.sh being edited: nothing was changed
            # (the rewrite is atomic), and the next poll tries again.
            if _problem_of(error) != self._last_error:
                self._last_error = _problem_of(error)
                self.log.error(events.RESTART_FAILED, reason=str(error), retrying="every poll")
            return Outcome(OutcomeKind.RETRY)
        self._last_error = None
        record.ledger = choice.ledger
        record.ledger.record_recovery(verdict.kind.value, verdict.reason, choice.path)
        record.save()
        delay = self.rules.backoff_delay(record.ledger.consecutive_failures)
        if delay > 0:
            self.log.info(events.RESTART_BACKOFF, seconds=delay)
            if self._wait(delay):
                return Outcome(OutcomeKind.SHUTTING_DOWN)  # the loop stops the trainer
        try:
            if not leave_restart_to_runtime(verdict.kind, sidecar_relaunches=restarter.relaunches):
                restarter.restart()
        except RestartError as error:
            self.log.error(events.RESTART_FAILED, reason=str(error))
            return self.give_up(record, str(error))
        if not restarter.relaunches:
            return Outcome(OutcomeKind.LEFT_TO_RUNTIME, choice.path)
        return Outcome(OutcomeKind.RESTARTED, choice.path)

    def charge_crash(self, record: RunRecord, pointer: ResumePointer, wall: float) -> None:
        """A trainer that exited by itself just before the sidecar was stopped: count it as
        the crash recovery it would have been, and point train.sh for the next start."""
        try:
            choice = pointer.choose_and_point(record.ledger, now=wall, settle=0.0)
        except (NoCheckpointLeft, LaunchScriptError, OSError) as error:
            self.log.error(events.RESTART_FAILED, reason=str(error))
            return
        record.ledger = choice.ledger
        reason = "the trainer exited just before the sidecar was stopped"
        record.ledger.record_recovery("crash", reason, choice.path)
        record.save()
        self.log.warning(events.TRAINER_CRASHED, reason=reason, checkpoint=choice.path)

    def give_up(self, record: RunRecord, reason: str) -> Outcome:
        record.ledger.gave_up = True
        record.save()
        self.log.error(
            events.GAVE_UP,
            reason=reason,
            restarts=record.ledger.restarts,
            max_restarts=self.rules.max_restarts,
            quarantined=record.ledger.quarantined,
            note="train.sh and every checkpoint are left as they are",
        )
        return Outcome(OutcomeKind.GAVE_UP)

    def _stop(self, record: RunRecord) -> bool:
        stopping_since = self._monotonic()
        try:
            self.restarter.stop()
        except RestartError as error:
            self.log.error(events.RESTART_FAILED, reason=str(error))
            self.give_up(record, str(error))
            return False
        self.log.info(events.TRAINER_STOPPED, seconds=round(self._monotonic() - stopping_since, 3))
        return True


def _problem_of(error: Exception) -> str:
    """A failure without the file it names: an OSError from the atomic rewrite names a new
    random temporary file on every retry, and the same problem must be logged only once."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return str(error)
