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
from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.decide.health_gate import Gate
from sidecar.decide.recovery_rules import (
    RecoveryRules,
    leave_restart_to_runtime,
    made_progress,
)
from sidecar.recover.health_gate import HealthGate
from sidecar.recover.resume_point import ResumePointer
from sidecar.restarters.base import Restarter, RestartError, SurvivedKill
from sidecar.run.record import RunRecord
from sidecar.trainers import LaunchScriptError


class OutcomeKind(Enum):
    RESTARTED = "restarted"  # the sidecar relaunched the trainer
    LEFT_TO_RUNTIME = "left to runtime"  # the runtime's restart policy brings it back
    RETRY = "retry"  # nothing changed (a full disk): try again at the next poll
    GAVE_UP = "gave up"
    SHUTTING_DOWN = "shutting down"  # a stop was requested during the backoff
    # Stops that another relaunch cannot fix (each with its own exit code in process mode):
    NO_PROGRESS = "no progress"  # the same checkpoint failed again and again: do not requeue
    GPU_NEEDS_RESET = "gpu needs reset"  # lost, XID, or the driver's recovery action says so
    HOST_NEEDS_ATTENTION = "host needs attention"  # processes SIGKILL cannot end (state D)


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
        gate: HealthGate | None = None,
    ) -> None:
        """``wait(seconds)`` sleeps and returns True when the sidecar is told to stop;
        ``gate`` checks the GPU between stopping the trainer and relaunching it."""
        self.restarter = restarter
        self.gate = gate
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
        if restarter.stop_before_rewrite and not retrying:
            stopped = self._stop_and_check(record)
            if stopped is not None:
                return stopped
        if record.ledger.abandoned:
            return self.give_up(record, "the run was abandoned by the user: not recovered")
        if self.rules.budget_spent(record.ledger.restarts):
            return self.give_up(record, f"restart budget of {self.rules.max_restarts} spent")
        # No settling: a stalled trainer wrote nothing for the whole stall timeout and a
        # crashed or stopped one writes nothing at all, so every file is as complete as it
        # will get — and a wall clock that jumped cannot make a good checkpoint look fresh.
        failed = record.ledger.attempts[-1] if record.ledger.attempts else None
        failed_from = failed.resumed_from if failed else None
        previous_completed_at = record.ledger.current_checkpoint_completed_at
        try:
            # Stopped by now, or gone by itself; a stalled one that a rewrite-first restarter
            # stops later may still be writing: nothing is set aside under it.
            known_stopped = restarter.stop_before_rewrite or verdict.kind is VerdictKind.CRASH
            choice = pointer.choose_and_point(
                record.ledger, now=wall, settle=0.0, trainer_stopped=known_stopped
            )
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
        record.ledger.record_recovery(
            verdict.kind.value,
            verdict.reason,
            choice.path,
            diagnosis=verdict.figures.get("diagnosis"),
            failed_from=failed_from,
        )
        progressed = made_progress(
            choice.checkpoint.completed_at if choice.checkpoint else None, previous_completed_at
        )
        ledger = record.ledger
        ledger.futile_recoveries = 0 if progressed else ledger.futile_recoveries + 1
        record.save()
        if self.rules.futile(ledger.futile_recoveries):
            return self.stop_run(
                record,
                OutcomeKind.NO_PROGRESS,
                f"{ledger.futile_recoveries} recoveries in a row and none of the attempts "
                "between them saved a newer state (the next would resume from "
                f"{choice.path or 'the beginning'}): another relaunch would fail the same way "
                f"(SIDECAR_MAX_FUTILE_RECOVERIES={self.rules.max_futile}); see the incidents "
                "and their diagnosis",
            )
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
            choice = pointer.choose_and_point(
                record.ledger, now=wall, settle=0.0, trainer_stopped=True
            )
        except (NoCheckpointLeft, LaunchScriptError, OSError) as error:
            self.log.error(events.RESTART_FAILED, reason=str(error))
            return
        record.ledger = choice.ledger
        reason = "the trainer exited just before the sidecar was stopped"
        record.ledger.record_recovery("crash", reason, choice.path)
        record.save()
        self.log.warning(events.TRAINER_CRASHED, reason=reason, checkpoint=choice.path)

    def give_up(self, record: RunRecord, reason: str) -> Outcome:
        return self.stop_run(record, OutcomeKind.GAVE_UP, reason)

    def stop_run(
        self, record: RunRecord, kind: OutcomeKind, reason: str, **evidence: Any
    ) -> Outcome:
        """Give the run up: ``kind`` says why (the budget, no progress, the GPU, the host)."""
        record.ledger.gave_up = True
        record.ledger.stopped_because = kind.value
        record.save()
        self.log.error(
            events.GAVE_UP,
            reason=reason,
            stopped_because=kind.value,
            restarts=record.ledger.restarts,
            max_restarts=self.rules.max_restarts,
            quarantined=record.ledger.quarantined,
            note="train.sh and every checkpoint are left as they are",
            **evidence,
        )
        return Outcome(kind)

    def _stop_and_check(self, record: RunRecord) -> Outcome | None:
        """Stop the trainer, then wait (bounded) for the GPU to be fit for the relaunch;
        an Outcome when the run cannot go on, None when it can."""
        holders = self.gate.holders(self.restarter.trainer_pids()) if self.gate else frozenset()
        stopping_since = self._monotonic()
        try:
            self.restarter.stop()
        except SurvivedKill as error:
            self.log.error(
                events.HOST_NEEDS_ATTENTION, reason=str(error), processes=error.survivors
            )
            return self.stop_run(
                record, OutcomeKind.HOST_NEEDS_ATTENTION, str(error), processes=error.survivors
            )
        except RestartError as error:
            self.log.error(events.RESTART_FAILED, reason=str(error))
            return self.give_up(record, str(error))
        self.log.info(events.TRAINER_STOPPED, seconds=round(self._monotonic() - stopping_since, 3))
        if self.gate is None:
            return None
        decision = self.gate.wait_until_released(holders, wait=self._wait)
        if decision is None:
            return Outcome(OutcomeKind.SHUTTING_DOWN)  # told to stop while waiting
        if decision.gate is Gate.GPU_NEEDS_RESET:
            return self.stop_run(
                record, OutcomeKind.GPU_NEEDS_RESET, decision.reason, gpu=decision.figures
            )
        return None


def _problem_of(error: Exception) -> str:
    """A failure without the file it names: an OSError from the atomic rewrite names a new
    random temporary file on every retry, and the same problem must be logged only once."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return str(error)
