"""Process mode's first launch of train.sh: one sidecar per run, and resume rather than redo
what an earlier attempt (or an earlier sidecar) already trained."""

from __future__ import annotations

from enum import Enum
from typing import Any

from sidecar import events
from sidecar.checkpoints.choice import NoCheckpointLeft
from sidecar.recover.recovery import Recovery
from sidecar.recover.resume_point import SAVE_STATE_REASON
from sidecar.restarters.base import Restarter, RestartError
from sidecar.trainers import LaunchScriptError
from sidecar.watched_run import WatchedRun


class Launch(Enum):
    STARTED = "started"
    ALREADY_COMPLETE = "already complete"  # the final model is there: nothing to train
    REFUSED = "refused"  # the launch failed (logged)
    GAVE_UP = "gave up"  # nothing left to resume from, or the budget was spent before


def launch_first(
    run: WatchedRun,
    *,
    restarter: Restarter,
    recovery: Recovery,
    settle: float,
    wall: float,
    log: Any,
) -> Launch:
    ledger = run.record.ledger
    if ledger.completed or run.paths.final_model_present(since=ledger.run_started_at):
        # This run's own final model (an earlier run's does not count: see the run boundary).
        log.info(events.TRAINING_COMPLETED, reason="final model already present", launched=False)
        return Launch.ALREADY_COMPLETE
    if recovery.rules.budget_spent(run.record.ledger.restarts):
        recovery.give_up(run.record, "restart budget already spent in an earlier session")
        return Launch.GAVE_UP
    try:
        _point_for_first_launch(run, recovery, settle=settle, wall=wall)
        restarter.start()
    except NoCheckpointLeft as error:
        run.record.ledger = error.ledger  # keep the quarantine that led here
        recovery.give_up(run.record, str(error))
        return Launch.GAVE_UP
    except (RestartError, LaunchScriptError, OSError) as error:
        log.error(events.RESTART_FAILED, reason=str(error), attempt="initial launch")
        return Launch.REFUSED
    return Launch.STARTED


def _point_for_first_launch(
    run: WatchedRun, recovery: Recovery, *, settle: float, wall: float
) -> None:
    candidates = run.pointer.candidates(now=wall, settle=settle)
    left = any(candidate.complete or candidate.unreadable for candidate in candidates)
    if left or run.record.ledger.current_checkpoint:
        # An earlier attempt left checkpoints: resume rather than redo its work (one that
        # cannot be read stops here with CheckpointUnreadable, never restarts from zero).
        choice = run.pointer.choose_and_point(
            run.record.ledger, now=wall, settle=settle, after_failure=False
        )
        run.record.ledger = choice.ledger
    elif run.pointer.options.ensure_save_state:
        run.pointer.point_at(None, reason=SAVE_STATE_REASON)
    run.record.save()
