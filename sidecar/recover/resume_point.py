"""The one pipeline that chooses where to resume and points the launch at it.

Used by the recovery after a verdict, by "keep --resume current" while the run is
healthy, by the first launch in process mode, and by ``training-sidecar resume``.
The launch script names paths as the trainer sees them, so the choice is translated
through the run's path map before it is written; the run's trainer knows the dialect.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sidecar import events
from sidecar.checkpoints.choice import (
    ResumeChoice,
    choose_resume_point,
    run_candidates,
)
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.checkpoints.set_aside import SetAsideError, aside_stamp, move_state
from sidecar.decide.run_boundary import written_by_this_run
from sidecar.run.ledger import Ledger, SetAside
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.trainers import LaunchScriptError
from sidecar.trainers.base import ResumePosition

EARLIER_RUN = "written by an earlier run of this name"
SAVE_STATE_REASON = (
    "made the trainer save resumable state (sd-scripts: added --save_state): without it "
    "nothing is resumable"
)


@dataclass(frozen=True)
class ResumeOptions:
    ensure_save_state: bool  # SIDECAR_ENSURE_SAVE_STATE
    allow_scratch: bool  # SIDECAR_FALLBACK=scratch


class ResumePointer:
    """Chooses checkpoints of one run and writes the choice into its launch script."""

    def __init__(
        self,
        paths: RunPaths,
        options: ResumeOptions,
        log: Any,
        *,
        run_started_at: Callable[[], float | None] = lambda: None,
    ) -> None:
        """``run_started_at`` says when this run began: states written before then are an
        earlier run's and are never chosen."""
        self.paths = paths
        self.options = options
        self.log = log
        self._run_started_at = run_started_at
        self.last_write_ns: int | None = None  # train.sh's st_mtime_ns after our last rewrite
        # This run's folders are scanned again at every recovery and every pointer check.
        self.memo = FileReportMemo()

    def candidates(
        self, *, now: float, settle: float, whole_folder: bool = False
    ) -> list[Candidate]:
        """The run's state folders; ``now`` is the wall clock (compared with file times).
        An earlier run's states are listed as not resumable, unless ``whole_folder``."""
        found = run_candidates(self.paths, now=now, settle=settle, memo=self.memo)
        started_at = self._run_started_at()
        if whole_folder or started_at is None:
            return found
        return earlier_run_excluded(found, started_at)

    def choose_and_point(
        self,
        ledger: Ledger,
        *,
        now: float,
        settle: float,
        after_failure: bool = True,
        trainer_stopped: bool = False,
    ) -> ResumeChoice:
        """Resolve the checkpoint and rewrite train.sh; the choice carries the new ledger.

        The ledger's updates (the failed resume counted, quarantine, backoff) are the
        caller's to keep once this returns, that is once train.sh points at the choice: a
        rewrite that failed (a full disk) raises and is retried, and a retry must not count
        the same failed resume twice. Raises NoCheckpointLeft, LaunchScriptError or OSError.
        """
        candidates = self.candidates(now=now, settle=settle)
        choice = choose_resume_point(
            candidates,
            ledger,
            allow_scratch=self.options.allow_scratch,
            after_failure=after_failure,
        )
        checkpoint = choice.checkpoint
        if trainer_stopped:  # nothing it writes can be moved under it
            self.clear_the_way(candidates, checkpoint, choice.ledger, now=now)
        position = self.position_of(checkpoint, choice.ledger)
        self.log.info(
            events.CHECKPOINT_SELECTED,
            checkpoint=choice.path,
            reason=choice.reason,
            completed_at=checkpoint.completed_at if checkpoint else None,
            step=checkpoint.step if checkpoint else None,
            # A complete state can still carry a note (ai-toolkit: its shared optimizer
            # state was lost), which the log must say.
            notes=list(checkpoint.problems) if checkpoint and checkpoint.problems else None,
            initial_step=position.initial_step,
            position=position.reason,
            rejected=_rejections(candidates, checkpoint),
        )
        self.point_at(choice.path, reason=choice.reason, initial_step=position.initial_step)
        for path in choice.quarantined_now:
            self.log.warning(
                events.CHECKPOINT_QUARANTINED,
                checkpoint=path,
                failures=choice.ledger.resume_failures.get(path),
                reason="resuming from it failed again before a newer checkpoint appeared",
            )
        return choice

    def newest(self, ledger: Ledger, *, now: float, settle: float) -> Candidate | None:
        """The newest complete checkpoint that is not quarantined."""
        candidates = self.candidates(now=now, settle=settle)
        return choose_checkpoint(candidates, exclude=ledger.quarantined)

    def position_of(self, checkpoint: Candidate | None, ledger: Ledger) -> ResumePosition:
        """Where the next attempt must start, resuming from ``checkpoint``."""
        if checkpoint is None:
            return ResumePosition(0, "from the beginning")
        return self.paths.trainer.resume_position(checkpoint, ledger)

    def point_at(
        self, checkpoint: str | None, *, reason: str, initial_step: int | None = None
    ) -> bool:
        """Make the next launch resume from ``checkpoint`` (sidecar view; None: from the
        beginning) at ``initial_step`` of the whole schedule (None: the trainer's own rule),
        adding --save_state where the settings ask for it; True if it changed."""
        trainer_path = self.paths.path_map.to_trainer(checkpoint) if checkpoint else None
        changed, old, new = self.paths.trainer.rewrite_launch_script(
            self.paths.train_script,
            resume_from=trainer_path,
            ensure_save_state=self.options.ensure_save_state,
            initial_step=initial_step,
        )
        self._log_rewrite(changed, old, new, resume=trainer_path, reason=reason)
        return changed

    def ensure_save_state(self) -> None:
        """Add --save_state for the next start of a run we did not launch (FluxGym omits it);
        a failure is logged, not raised: the run goes on as it is."""
        if not self.options.ensure_save_state:
            return
        try:
            changed, old, new = self.paths.trainer.add_save_state(self.paths.train_script)
        except (LaunchScriptError, OSError) as error:
            self.log.warning(events.TRAIN_SCRIPT_NOT_UPDATED, reason=str(error))
            return
        self._log_rewrite(changed, old, new, resume=None, reason=SAVE_STATE_REASON)

    def planned_rewrite(self, checkpoint: Candidate, ledger: Ledger) -> list[str]:
        """The diff that pointing train.sh at ``checkpoint`` would make; nothing is written.
        Raises RunSetupError when the script cannot be read."""
        old, _ = read_train_script(self.paths.train_script, self.paths.trainer)
        new = self.paths.trainer.rewritten_launch_script(
            old,
            resume_from=self.paths.path_map.to_trainer(str(checkpoint.path)),
            ensure_save_state=self.options.ensure_save_state,
            initial_step=self.position_of(checkpoint, ledger).initial_step,
        )
        return self.paths.trainer.launch_script_diff(old, new, self.paths.train_script, context=1)

    def keep_current(
        self, ledger: Ledger, *, now: float, settle: float, trainer_stopped: bool = False
    ) -> None:
        """Point train.sh at the newest complete checkpoint if it names another one, so that
        a restart by anyone (the orchestrator after a crash, a person) resumes from it."""
        candidates = self.candidates(now=now, settle=settle)
        newest = choose_checkpoint(candidates, exclude=ledger.quarantined)
        if trainer_stopped:  # no trainer runs (an interruption): as at a recovery
            self.clear_the_way(candidates, newest, ledger, now=now)
        if newest is None:
            return
        try:
            _, command = read_train_script(self.paths.train_script, self.paths.trainer)
            if command.resume != self.paths.path_map.to_trainer(str(newest.path)):
                position = self.position_of(newest, ledger)
                self.point_at(
                    str(newest.path),
                    reason="newer complete checkpoint",
                    initial_step=position.initial_step,
                )
        except (RunSetupError, LaunchScriptError, OSError) as error:
            self.log.warning(events.RESUME_POINTER_NOT_UPDATED, reason=str(error))

    def clear_the_way(
        self, candidates: list[Candidate], chosen: Candidate | None, ledger: Ledger, *, now: float
    ) -> list[SetAside]:
        """Set aside (rename, never delete) each incomplete state the trainer's own "latest"
        rule would take over ``chosen`` at its next start; recorded in ``ledger``. Only while
        the trainer is stopped (the caller knows: a settle time of 0 alone does not say it),
        and only when there is a state to resume from instead. A state that cannot be moved
        is logged and left: the next start may then fail on it, as it would without the
        sidecar, and say so."""
        moved: list[SetAside] = []
        if chosen is None:
            return moved  # nothing better to resume from: hide nothing from the trainer
        in_the_way = self.paths.trainer.in_the_way(
            [c for c in candidates if _may_set_aside(c, ledger.quarantined)], chosen
        )
        for state in in_the_way:
            target = self.paths.trainer.aside_path(state.path, aside_stamp(now))
            try:
                move_state(state.path, target)
            except SetAsideError as error:
                self.log.warning(
                    events.CHECKPOINT_NOT_SET_ASIDE, checkpoint=str(state.path), reason=str(error)
                )
                continue
            record = SetAside(
                original=str(state.path),
                moved_to=str(target),
                at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                problems=list(state.problems),
            )
            ledger.set_aside.append(record)
            moved.append(record)
            self.log.warning(
                events.CHECKPOINT_SET_ASIDE,
                checkpoint=record.original,
                moved_to=record.moved_to,
                problems=record.problems,
                reason=f"incomplete, and {self.paths.trainer.name} would resume from it "
                "itself; renamed, not deleted (training-sidecar checkpoints --put-back "
                f"{target.name} renames it back)",
            )
        return moved

    def resumed_checkpoint(self) -> str | None:
        """The checkpoint train.sh resumes from now (sidecar view), if it can be read."""
        try:
            _, command = read_train_script(self.paths.train_script, self.paths.trainer)
        except RunSetupError:
            return None
        return self.paths.path_map.to_sidecar(command.resume) if command.resume else None

    def _log_rewrite(
        self, changed: bool, old: str, new: str, *, resume: str | None, reason: str
    ) -> None:
        if changed:
            script = self.paths.train_script
            with contextlib.suppress(OSError):
                self.last_write_ns = script.stat().st_mtime_ns
            self.log.info(
                events.TRAIN_SCRIPT_REWRITTEN,
                path=str(script),
                resume=resume,
                reason=reason,
                diff=self.paths.trainer.launch_script_diff(old, new, script),
            )


def _may_set_aside(candidate: Candidate, quarantined: list[str]) -> bool:
    """Only a state of this run that is readable and broken (incomplete, or quarantined:
    resuming from it failed twice): an earlier run's states and states the sidecar may not
    read (perhaps whole: the run's newest progress) stay put."""
    if candidate.unreadable or EARLIER_RUN in candidate.problems:
        return False
    return not candidate.complete or str(candidate.path) in quarantined


def earlier_run_excluded(candidates: list[Candidate], started_at: float) -> list[Candidate]:
    """``candidates`` with the states of an earlier run marked as such (never chosen)."""
    marked = [
        candidate
        if written_by_this_run(candidate.completed_at, started_at)
        else dataclasses.replace(
            candidate,
            complete=False,
            problems=(*candidate.problems, EARLIER_RUN),
        )
        for candidate in candidates
    ]
    # Complete ones first, as the scan orders them; the order among each kind is kept.
    return sorted(marked, key=lambda candidate: not candidate.complete)


def _rejections(candidates: list[Candidate], chosen: Candidate | None) -> list[dict[str, Any]]:
    return [
        {"checkpoint": str(c.path), "problems": list(c.problems) or ["older than the chosen one"]}
        for c in candidates
        if chosen is None or c.path != chosen.path
    ]
