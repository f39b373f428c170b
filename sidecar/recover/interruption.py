"""Interruptions of a run: recorded when the sidecar or the machine goes away, taken stock of
at the next start, and closed when a trainer of the run trains again.

The decisions are decide/interruption.py's; this records them in the ledger and the log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sidecar import events
from sidecar.decide.interruption import (
    InterruptionOptions,
    InterruptionPlan,
    Plan,
    down_seconds,
    plan_after_interruption,
)
from sidecar.run.ledger import Interruption
from sidecar.watched_run import WatchedRun


class Interruptions:
    def __init__(self, options: InterruptionOptions, log: Any, *, started_at: float) -> None:
        self.options = options
        self.log = log
        self.started_at = started_at  # wall clock of the sidecar's start

    def record(
        self,
        run: WatchedRun,
        how: str,
        *,
        at: float,
        inferred: bool = False,
        trainer_gone: bool = False,
    ) -> None:
        """The run stops (or stopped, ``inferred``) because the sidecar or the machine went.

        ``trainer_gone``: no trainer writes any more, so train.sh is pointed at the newest
        state now, for whoever starts it next (a replacement pod's trainer)."""
        ledger = run.record.ledger
        if trainer_gone:
            run.pointer.keep_current(ledger, now=at, settle=0.0, trainer_stopped=True)
        newest = run.pointer.newest(ledger, now=at, settle=0.0)
        ledger.record_interruption(
            Interruption(
                at=at, how=how, newest_state_completed_at=newest.completed_at if newest else None
            )
        )
        run.record.save()
        self.log.warning(
            events.RUN_INTERRUPTED,
            how=how,
            inferred=inferred,
            interrupted_at=_iso(at),
            consecutive_interruptions=ledger.consecutive_interruptions,
            newest_state=str(newest.path) if newest else None,
        )

    def take_stock(
        self,
        run: WatchedRun,
        *,
        acts: bool,
        relaunches: bool,
        trainer_running: bool,
        survivor: bool,
        wall: float,
    ) -> InterruptionPlan | None:
        """At start: was the run interrupted, and what now? None: it was not.

        ``survivor``: a running trainer can be the one watched before (it outlived the
        sidecar); otherwise a trainer running now is a new start of the run.
        """
        ledger = run.record.ledger
        run.check_abandoned(self.log)
        # An abandoned run can be interrupted too (and is then left alone, saying so).
        unresumed = ledger.interruptions and ledger.interruptions[-1].resumed_at is None
        if ledger.supervising and not unresumed and not (ledger.completed or ledger.gave_up):
            if trainer_running and survivor:
                ledger.supervising = False  # the trainer outlived the sidecar: nothing stopped
                run.record.save()
                return None
            # Still watching when it went: no clean exit recorded it (SIGKILL, power, a crash).
            # A trainer running now is a new start (it reads train.sh): leave train.sh alone.
            self.record(
                run,
                "unclean",
                at=_went_at(run, wall),
                inferred=True,
                trainer_gone=not trainer_running,
            )
        last = ledger.interruptions[-1] if ledger.interruptions else None
        if last is None or last.resumed_at is not None or ledger.gave_up:
            return None  # not interrupted, or already back, or given up before
        completed = ledger.completed or run.paths.final_model_present(since=ledger.run_started_at)
        plan = plan_after_interruption(
            enabled=self.options.resume,
            acts=acts,
            relaunches=relaunches,
            completed=completed,
            abandoned=ledger.abandoned,
            trainer_running=trainer_running,
            consecutive=ledger.consecutive_interruptions,
            max_interruptions=self.options.max_in_a_row,
        )
        if plan.plan is Plan.AWAIT_TRAINER and not trainer_running:
            # The orchestrator starts it (a replacement pod's trainer, after this sidecar's
            # startup probe): from the newest state, also one completed just before the end.
            run.pointer.keep_current(ledger, now=wall, settle=0.0, trainer_stopped=True)
        if plan.plan is Plan.LEAVE:
            self.log.info(
                events.INTERRUPTION_NOT_RESUMED,
                cause=plan.cause,
                reason=plan.reason,
                train_script=str(run.paths.train_script),
            )
        return plan

    def resumed(self, run: WatchedRun, *, by: str, wall: float) -> None:
        """A trainer of the interrupted run trains again (``by`` the sidecar, or by itself)."""
        ledger = run.record.ledger
        interruption = ledger.interrupted
        if interruption is None:
            return
        interruption.resumed_at = wall
        interruption.down_seconds = down_seconds(interruption.at, wall)
        run.record.save()
        self.log.info(
            events.RUN_RESUMED_AFTER_INTERRUPTION,
            down_seconds=interruption.down_seconds,
            how=interruption.how,
            by=by,
            checkpoint=run.pointer.resumed_checkpoint(),
            consecutive_interruptions=ledger.consecutive_interruptions,
            interruptions=len(ledger.interruptions),
            seconds_since_sidecar_start=round(max(0.0, wall - self.started_at), 3),
            note="not charged to the restart budget",
        )


def _went_at(run: WatchedRun, wall: float) -> float:
    """When an unclean end happened, as near as the volume tells: the run's last sign of life,
    never before its last attempt began (it died before leaving any), never after now."""
    ledger = run.record.ledger
    floor = max(
        [attempt.launched_at for attempt in ledger.attempts[-1:]]
        + [i.resumed_at for i in ledger.interruptions[-1:] if i.resumed_at is not None],
        default=0.0,
    )
    return min(wall, max(run.last_sign_of_life() or floor, floor))


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
