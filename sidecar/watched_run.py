"""The parts that belong to one watched run, built together and replaced together when the
loop follows another run: where its files are, the sidecar's record of it, the observer of
its output and the pointer that writes its resume argument."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar import events
from sidecar.decide.lost_work import StepClock, denser_cadence
from sidecar.decide.resume_check import resume_problem
from sidecar.decide.run_boundary import ScriptSeen, run_boundary, written_by_this_run
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.observer import RunObserver
from sidecar.recover.resume_point import ResumeOptions, ResumePointer
from sidecar.run.abandon import AbandonMarker
from sidecar.run.ledger import Attempt, Ledger
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.run.record import RunRecord
from sidecar.trainers import LaunchScriptError
from sidecar.trainers.base import ExpectedResume, LaunchCommand, StartupReport


@dataclass
class WatchedRun:
    paths: RunPaths
    record: RunRecord
    observer: RunObserver
    pointer: ResumePointer
    # The attempt being watched: what it must resume from, and its step time once it steps.
    expected: ExpectedResume | None = None
    step_clock: StepClock | None = None
    pointer_checked_at: float = float("-inf")  # monotonic
    # The attempt's launch, when its initial step needs the steps per epoch (--initial_epoch)
    # and those were not known yet: resolved once the trainer reports them.
    unresolved_launch: tuple[LaunchCommand, int | None] | None = None

    @classmethod
    def open(
        cls, paths: RunPaths, *, gpu: GpuMonitor | None, resume: ResumeOptions, log: Any
    ) -> WatchedRun:
        """Raises LedgerError when the run's state.json exists but cannot be read."""
        record = RunRecord(paths, log)
        run = cls(
            paths=paths,
            record=record,
            observer=RunObserver(paths, gpu, run_started_at=lambda: record.ledger.run_started_at),
            pointer=ResumePointer(
                paths, resume, log, run_started_at=lambda: record.ledger.run_started_at
            ),
        )
        # The sidecar's own rewrites of train.sh are not a user's new Start (run boundary).
        record.script_written = lambda: run.pointer.last_write_ns
        run.establish_boundary(log)
        return run

    def establish_boundary(self, log: Any) -> bool:
        """Decide whether the launch script is this recorded run's or a new run's, before
        anything edits it; True for a new run (the ledger then starts afresh)."""
        seen = self.script_seen()
        if seen is None:
            return False  # unreadable now: the launch reports it
        ledger = self.record.ledger
        boundary = run_boundary(
            script=seen,
            recorded_digest=ledger.run_digest,
            recorded_started_at=ledger.run_started_at,
            recorded_script_mtime_ns=ledger.script_mtime_ns,
            completed=ledger.completed,
            final_model_mtime=self.paths.final_model_mtime(),
        )
        if boundary.new_run and (ledger.run_digest is not None or boundary.started_at):
            if ledger.run_digest is not None or ledger.recoveries or ledger.completed:
                log.info(
                    events.NEW_RUN_DETECTED,
                    train_script=str(self.paths.train_script),
                    reason=boundary.reason,
                )
            ledger = Ledger(command=ledger.command)
        ledger.run_digest, ledger.run_started_at = seen.digest, boundary.started_at
        ledger.script_mtime_ns = seen.mtime_ns
        self.record.replace(ledger)
        if boundary.new_run:
            self._report_earlier_run(boundary.started_at, log)
        return boundary.new_run

    def start_over(self, log: Any, *, wall: float) -> None:
        """A trainer started after the recorded run completed or was given up: a new run
        (another launch script), or the same one again with a fresh budget. After a
        completion only what is written from now on belongs to it."""
        ledger = self.record.ledger
        if self.establish_boundary(log):
            return
        ended = (
            "completed"
            if ledger.completed
            else "was abandoned"
            if ledger.abandoned
            else "was given up"
        )
        log.info(
            events.NEW_RUN_DETECTED,
            train_script=str(self.paths.train_script),
            reason=f"a trainer started after the recorded run {ended}",
        )
        fresh = Ledger(
            run_digest=ledger.run_digest,
            script_mtime_ns=ledger.script_mtime_ns,
            command=ledger.command,
        )
        # After a completion (or an abandon) only what is written from now on is the new run's.
        after_end = ledger.completed or ledger.abandoned
        fresh.run_started_at = wall if after_end else ledger.run_started_at
        self.record.replace(fresh)

    def script_seen(self) -> ScriptSeen | None:
        try:
            text, _ = read_train_script(self.paths.train_script, self.paths.trainer)
            status = self.paths.train_script.stat()
        except (RunSetupError, OSError):
            return None
        return ScriptSeen(
            self.paths.trainer.run_identity(text), status.st_mtime, status.st_mtime_ns
        )

    def _report_earlier_run(self, started_at: float | None, log: Any) -> None:
        """Once per run: an earlier run's files are there and are left alone."""
        if started_at is None:
            return
        states = [
            c.path.name
            for c in self.pointer.candidates(now=started_at, settle=0.0, whole_folder=True)
            if not written_by_this_run(c.completed_at, started_at)
        ]
        final = self.paths.final_model_mtime()
        earlier_final = final is not None and final < started_at
        if states or earlier_final:
            log.info(
                events.EARLIER_RUN_FILES,
                states=states,
                final_model=earlier_final,
                note="written before this run began; never resumed, never deleted",
            )

    def keep_resume_current(self, now: float, wall: float, *, settle: float) -> None:
        """Point train.sh at the newest complete checkpoint, at most once per settle time."""
        if now - self.pointer_checked_at < max(settle, 1.0):
            return
        self.pointer_checked_at = now
        self.pointer.keep_current(self.record.ledger, now=wall, settle=settle)

    def begin_attempt(self, *, wall: float, by_sidecar: bool) -> None:
        """A trainer of this run started (``wall``: now): watch only its own output."""
        from_launch = self.observer.start_attempt()
        self.record_attempt(launched_at=wall, by_sidecar=by_sidecar)
        # Only an attempt read from its launch on can be judged by its start-up lines.
        self.expected = self.expected_resume() if from_launch else None
        self.step_clock = None

    def first_step(self, *, step: int, now: float, judge_resume: bool) -> str | None:
        """At the attempt's first step: keep the schedule's shape it reported, and say why
        it did not resume from where train.sh pointed it (None: it did, or cannot be told)."""
        self.step_clock = StepClock(step, now)
        self.learn_shape(self.observer.startup)
        expected, self.expected = self.expected, None
        if expected is None or not judge_resume:
            return None
        observer = self.observer
        return resume_problem(expected, observer.startup, saw_output=observer.saw_output)

    def stepped(self, *, step: int, now: float, max_lost_work: float, log: Any) -> None:
        """Once the step time is known, bound the work an incident can lose (once)."""
        if self.step_clock is None:
            return
        seconds = self.step_clock.seconds_per_step(step, now)
        if seconds is None:
            return
        self.step_clock = None
        if max_lost_work > 0:
            self.bound_lost_work(step_seconds=seconds, bound_seconds=max_lost_work, log=log)

    def record_attempt(self, *, launched_at: float, by_sidecar: bool) -> Attempt:
        """Record an attempt that starts now from what train.sh says (its resume and position
        flags), so that the states it writes can be placed in the whole schedule."""
        resumed = self.pointer.resumed_checkpoint()
        if resumed is None and by_sidecar:
            # A trainer that resumes from its own "latest" (ai-toolkit, OneTrainer) names no
            # state in its command: the one the sidecar chose (and cleared the way to) is it.
            resumed = self.record.ledger.current_checkpoint
        state_step = None
        if resumed is not None:
            state_step = self.paths.trainer.resumed_state_step(Path(resumed))
        ledger = self.record.ledger
        self.unresolved_launch = None
        try:
            _, command = read_train_script(self.paths.train_script, self.paths.trainer)
            initial_step = self.paths.trainer.launch_initial_step(
                command, state_step=state_step, steps_per_epoch=ledger.steps_per_epoch
            )
        except RunSetupError:
            initial_step = 0  # unreadable now; the launch that just happened read it
        if initial_step is None:
            self.unresolved_launch = (command, state_step)
        attempt = Attempt(launched_at, initial_step or 0, resumed, by_sidecar)
        ledger.record_attempt(attempt)
        self.record.save()
        return attempt

    def expected_resume(self) -> ExpectedResume | None:
        """What train.sh asks the attempt starting now to resume from."""
        try:
            _, command = read_train_script(self.paths.train_script, self.paths.trainer)
        except RunSetupError:
            return None
        return self.paths.trainer.expected_resume(command)

    def bound_lost_work(self, *, step_seconds: float, bound_seconds: float, log: Any) -> None:
        """Make the next launch save state often enough that an incident loses at most
        ``bound_seconds`` of training (logged; a user's own denser cadence stays)."""
        trainer = self.paths.trainer
        try:
            _, command = read_train_script(self.paths.train_script, trainer)
        except RunSetupError:
            return
        every = trainer.state_cadence(command, self.record.ledger.steps_per_epoch)
        cadence = denser_cadence(
            bound_seconds=bound_seconds, step_seconds=step_seconds, state_every_steps=every
        )
        if cadence is None or not (command.save_state or self.pointer.options.ensure_save_state):
            return
        try:
            changed, old, new = trainer.add_save_cadence(
                self.paths.train_script,
                every_n_steps=cadence.every_n_steps,
                keep_last_steps=cadence.keep_last_steps,
            )
        except (LaunchScriptError, OSError) as error:
            log.warning(events.TRAIN_SCRIPT_NOT_UPDATED, reason=str(error))
            return
        if changed:
            self.pointer.last_write_ns = self.paths.train_script.stat().st_mtime_ns
            log.info(
                events.SAVE_CADENCE_ADDED,
                step_seconds=round(step_seconds, 3),
                state_every_steps=every,
                work_lost_per_incident_seconds=round(every * step_seconds) if every else None,
                max_lost_work_seconds=bound_seconds,
                save_every_n_steps=cadence.every_n_steps,
                save_last_n_steps_state=cadence.keep_last_steps,
                diff=trainer.launch_script_diff(old, new, self.paths.train_script),
            )
            self.record.save()

    def learn_shape(self, report: StartupReport) -> bool:
        """Keep the schedule's shape the trainer reported; True when it was news."""
        ledger = self.record.ledger
        learned = (report.steps_per_epoch, report.gradient_accumulation, report.total_steps)
        known = (ledger.steps_per_epoch, ledger.gradient_accumulation, ledger.total_steps)
        if report.steps_per_epoch is None or learned == known:
            return False
        ledger.steps_per_epoch, ledger.gradient_accumulation, ledger.total_steps = learned
        if self.unresolved_launch is not None and ledger.attempts:
            command, state_step = self.unresolved_launch
            resolved = self.paths.trainer.launch_initial_step(
                command, state_step=state_step, steps_per_epoch=ledger.steps_per_epoch
            )
            ledger.attempts[-1].initial_step = resolved or 0
            self.unresolved_launch = None
        self.record.save()
        return True

    # -- the run's life across the sidecar's own ----------------------------------------------

    @property
    def alive_file(self) -> Path:
        """Touched on every poll while a trainer of the run is watched: the last sign of life
        after an unclean end (the heartbeat file lives in the container, this on the volume)."""
        return self.paths.state_dir / "alive"

    def touch_alive(self) -> None:
        with contextlib.suppress(OSError):  # a full or read-only volume: the log's time serves
            try:
                os.utime(self.alive_file)
            except FileNotFoundError:
                self.alive_file.parent.mkdir(parents=True, exist_ok=True)
                self.alive_file.touch()

    def last_sign_of_life(self) -> float | None:
        """When the run was last seen training: the alive file or the trainer's log."""
        times = []
        for path in (self.alive_file, self.paths.train_log):
            with contextlib.suppress(OSError):
                times.append(path.stat().st_mtime)
        return max(times) if times else None

    def set_supervising(self, supervising: bool) -> None:
        if supervising:
            self.touch_alive()  # the watch begins: its first sign of life
        ledger = self.record.ledger
        if ledger.supervising != supervising:
            ledger.supervising = supervising
            self.record.save()

    def check_abandoned(self, log: Any) -> bool:
        """Read the user's abandon marker into the ledger (logged once); True if abandoned."""
        ledger = self.record.ledger
        reason = AbandonMarker(self.paths.state_dir).reason_for(ledger.run_started_at)
        if (reason is not None) == ledger.abandoned:
            return ledger.abandoned
        ledger.abandoned = reason is not None  # the marker removed: the run may go on again
        self.record.save()
        if reason is None:
            return False
        log.warning(
            events.RUN_ABANDONED,
            reason=reason,
            train_script=str(self.paths.train_script),
            note="not resumed after an interruption and not recovered; train.sh and every "
            "checkpoint are left as they are",
        )
        return True

    def note_resume_pointer(self) -> None:
        """Remember which checkpoint an attempt we did not launch resumes from."""
        resumed = self.pointer.resumed_checkpoint()
        ledger = self.record.ledger
        if resumed is not None and resumed != ledger.current_checkpoint:
            ledger.current_checkpoint = resumed
            ledger.current_checkpoint_completed_at = None
            self.record.save()
