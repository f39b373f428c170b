"""The loop: observe the run, decide, and hand verdicts to the recovery.

Everything that touches the world sits behind the parts handed in (restarter, observer,
resume pointer, GPU monitor, run locator, clocks), so the loop is the same whichever way
the trainer is restarted. Between runs (container modes) the loop idles and starts
watching again when a trainer appears. The clocks are read once per poll.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from sidecar import events
from sidecar.checkpoints.choice import NoCheckpointLeft
from sidecar.decide import decision
from sidecar.decide.decision import Phase, RunState, Verdict, VerdictKind
from sidecar.decide.diagnosis import Evidence, diagnose
from sidecar.decide.interruption import Plan
from sidecar.decide.recovery_rules import rearm_after_stall, restart_overdue
from sidecar.decide.sections import Section, SectionCadence
from sidecar.loop_options import Clocks, LoopOptions
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.process_tree import usage_figures
from sidecar.observe.trainer_visibility import TrainerVisibility
from sidecar.recover.first_launch import Launch, launch_first
from sidecar.recover.hang_repeats import tell_repeat
from sidecar.recover.health_gate import HealthGate
from sidecar.recover.interruption import Interruptions
from sidecar.recover.recovery import Outcome, OutcomeKind, Recovery
from sidecar.restarters.base import Restarter, RestartError, SurvivedKill, TrainerStatus
from sidecar.run.ledger import Ledger
from sidecar.run.locator import RunLocator
from sidecar.run.lock import RunLock, RunLockHeld
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.trainers import LaunchScriptError
from sidecar.watched_run import WatchedRun

_VERDICT_EVENTS = {
    VerdictKind.STALL: events.STALL_DETECTED,
    VerdictKind.CRASH: events.TRAINER_CRASHED,
    VerdictKind.RESUME_FAILED: events.RESUME_FAILED,
}

# Where the stacks place a silence the trainer's output did not announce.
_STACK_SECTIONS = {"hang_in_sampling": Section.SAMPLING, "hang_in_save": Section.SAVING}

# How an attempt the sidecar starts to resume an interrupted run is logged.
RESUME_SOURCE = "resume after interruption"

EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_GAVE_UP = 3
# Stops that no relaunch can fix; a scheduler should not requeue the job as it is.
EXIT_NO_PROGRESS = 4  # the same checkpoint failed SIDECAR_MAX_FUTILE_RECOVERIES times
EXIT_GPU_NEEDS_RESET = 5  # the GPU is lost, or its driver asks for a reset or a reboot
EXIT_HOST_NEEDS_ATTENTION = 6  # trainer processes SIGKILL cannot end (uninterruptible sleep)

_STOP_CODES = {
    OutcomeKind.GAVE_UP: EXIT_GAVE_UP,
    OutcomeKind.NO_PROGRESS: EXIT_NO_PROGRESS,
    OutcomeKind.GPU_NEEDS_RESET: EXIT_GPU_NEEDS_RESET,
    OutcomeKind.HOST_NEEDS_ATTENTION: EXIT_HOST_NEEDS_ATTENTION,
}


class Watchdog:
    def __init__(
        self,
        *,
        options: LoopOptions,
        locator: RunLocator,
        restarter: Restarter,
        gpu: GpuMonitor | None,
        log: Any,
        stop_event: threading.Event,
        heartbeat: Callable[[], None],
        clocks: Clocks | None = None,
        before_stop: Callable[[Verdict, dict[str, Any]], dict[str, Any]] | None = None,
        on_poll: Callable[[], None] | None = None,
        health_gate: HealthGate | None = None,
    ):
        """``before_stop`` runs on a stall verdict, before it is logged and the trainer is
        stopped: it inspects the hung processes (and saves an incident report) and returns
        the diagnosis's figures for the ``stall_detected`` line;
        ``on_poll`` after every poll (live line, step rate, metrics); ``health_gate`` checks
        the GPU between stopping a trainer and relaunching it (modes that stop it first)."""
        self.options = options
        self.policy = options.policy
        self.rules = options.rules
        self.locator = locator
        self.restarter = restarter
        self.gpu = gpu
        self.log = log
        self.stop_event = stop_event
        self.clocks = clocks or Clocks()
        self._heartbeat = heartbeat
        self._before_stop = before_stop
        self._on_poll = on_poll
        self.recovery = Recovery(
            restarter=restarter,
            rules=options.rules,
            log=log,
            wait=self._wait,
            monotonic=self.clocks.monotonic,
            gate=health_gate,
        )
        self.visibility = TrainerVisibility(restarter, log)
        self.interruptions = Interruptions(
            options.interruptions, log, started_at=self.clocks.wall()
        )
        self.run_lock: RunLock | None = None  # process mode: one sidecar per run
        self._run: WatchedRun | None = None
        self.attempt: RunState | None = None  # None: no trainer being watched (idle)
        self._cadence = decision.Cadence()  # learned by the attempts of the current run
        self._sections = SectionCadence()  # the same, per section
        self._attempt_key: str | None = None
        self._pending_recovery: Verdict | None = None  # a recovery to retry (e.g. disk full)
        self._restart_due_by: float | None = None  # left to the runtime: back by then
        # An interrupted run to relaunch once the trainer's container can take it (exec).
        self._resume_pending = False
        self._resume_problem: str | None = None  # why the last try could not, logged once
        self.ready = False  # the first poll is done
        self.last_poll_seconds: float | None = None

    @property
    def paths(self) -> RunPaths | None:
        return self._run.paths if self._run else None

    @property
    def ledger(self) -> Ledger:
        return self._run.record.ledger if self._run else Ledger()

    @property
    def stays_up(self) -> bool:
        return self.restarter.acts and not self.restarter.exits_with_run

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self._select_run(self.locator.current())
        if not self.restarter.acts:
            self._begin_attempt(source="already running")
        elif self.restarter.exits_with_run:
            outcome = self._first_launch()
            if outcome is not None:
                return outcome
        else:
            self.visibility.start()
            self._take_stock()
        interval = self.options.poll_interval
        next_poll = self.clocks.monotonic() + interval
        while not self._wait(self._until_next_poll(next_poll)):
            # Fixed-rate polls: the time a poll takes does not stretch the interval.
            now = self.clocks.monotonic()
            if now >= next_poll:
                next_poll = max(next_poll + interval, now)
            code = self._tick(now, self.clocks.wall())
            self.last_poll_seconds = self.clocks.monotonic() - now
            self.ready = True
            if self._on_poll is not None:
                self._on_poll()
            if code is not None:
                return code
        self._shutdown()
        return EXIT_COMPLETED

    def _tick(self, now: float, wall: float) -> int | None:
        if self._pending_recovery is not None:
            return self._recover(self._pending_recovery, wall)
        if self.stays_up:
            self._follow_active_run()
        if self._run is None:
            return None
        status = self.visibility.status()
        if self.attempt is None:
            if self._resume_pending:
                self._relaunch_interrupted(status, wall)
            elif self.restarter.acts:
                self._maybe_begin(status, now)
            return None
        if status is None:
            # The trainer cannot be seen this poll (daemon down, container gone): no verdict
            # on a run we cannot observe, and nothing spent on a recovery that cannot work.
            return None
        self._run.touch_alive()
        if status.others:
            self._keep_one_trainer(status, now, wall)
            return None
        if not status.running and status.went_with_container:
            # Its container stopped or restarted under it (a recreate, a reboot, `compose
            # restart`): the run was interrupted, and is relaunched once the container is back.
            self._interrupted("container_stopped", wall)
            self._resume_pending = self.options.interruptions.resume and self.restarter.relaunches
            return None
        self._run.check_abandoned(self.log)  # a verdict on it is reported, not recovered
        if _replaced_underneath(status, self._attempt_key):
            # Restarted by someone else between two polls (a restart policy after a crash):
            # a new attempt, resuming from wherever train.sh pointed.
            self._begin_attempt(source="restarted outside the sidecar", key=status.attempt)
            return None
        verdict = self._poll_once(status, now, wall)
        if verdict is not None:
            return self._handle(verdict, wall)
        if (
            self.stays_up
            and self.options.keep_resume_current
            and self.attempt.phase is Phase.RUNNING
        ):
            # While healthy, point train.sh at each new complete checkpoint, so that a
            # restart by anyone (the orchestrator after a crash, a person) resumes from it.
            self._run.keep_resume_current(now, wall, settle=self.options.checkpoint_settle)
        return None

    def _poll_once(self, status: TrainerStatus, now: float, wall: float) -> Verdict | None:
        assert self._run is not None and self.attempt is not None
        seen = self._run.observer.observe(
            now=now,
            wall=wall,
            status=status,
            trainer_pids=self.restarter.trainer_pids,
            sees_exit=self.restarter.acts,
        )
        if not self.restarter.acts and rearm_after_stall(self.attempt, seen):
            self.log.info(events.PROGRESS_RESUMED, last_step=seen.step)
            self.attempt = decision.started(seen.now, self.attempt.cadence, self.attempt.sections)
        before = self.attempt.phase
        self.attempt, verdict = decision.advance(self.attempt, seen, self.policy)
        if before is Phase.STARTING and self.attempt.phase is Phase.RUNNING:
            # The first step of this attempt: after a restart, the moment training resumed.
            self.log.info(
                events.TRAINING_PROGRESSING,
                step=self.attempt.last_step,
                total_steps=self.attempt.total_steps,
                seconds_since_start=round(seen.now - self.attempt.launched_at, 3),
            )
            problem = self._run.first_step(
                step=self.attempt.last_step or 0, now=seen.now, judge_resume=self.restarter.acts
            )
            if verdict is None and problem is not None:
                # It steps, but not from where it was pointed: a failed resume, not progress.
                self.attempt = dataclasses.replace(self.attempt, phase=Phase.STALLED)
                return Verdict(VerdictKind.RESUME_FAILED, problem)
        elif verdict is None and self.restarter.acts:
            self._run.stepped(
                step=self.attempt.last_step or 0,
                now=seen.now,
                max_lost_work=self.options.max_lost_work,
                log=self.log,
            )
        return verdict

    def _until_next_poll(self, next_poll: float) -> float:
        """Seconds to the next poll: the regular one, or earlier when a verdict falls due."""
        now, wake = self.clocks.monotonic(), next_poll
        if self.attempt is not None:
            due = decision.stall_deadline(self.attempt, self.policy)
            if due is not None and due > now:  # a deadline already past waits for the poll
                wake = min(wake, due + 0.001)
        return max(0.0, wake - now)

    def _wait(self, seconds: float) -> bool:
        """Sleep until ``seconds`` passed or a stop was requested (True), beating the heart."""
        deadline = self.clocks.monotonic() + seconds
        while True:
            self._heartbeat()
            remaining = deadline - self.clocks.monotonic()
            if remaining <= 0:
                return self.stop_event.is_set()
            if self.stop_event.wait(min(remaining, self.options.poll_interval)):
                return True

    # -- the trainer -------------------------------------------------------------------------

    def _maybe_begin(self, status: TrainerStatus | None, now: float) -> None:
        if status is None or not status.running:
            if restart_overdue(self._restart_due_by, now):
                self._restart_due_by = None
                self.log.error(
                    events.RESTART_FAILED,
                    reason="the trainer did not come back within the startup grace; check its "
                    "container's restart policy (it must restart after its processes are "
                    "killed), or that the pod's controller replaces a failed pod",
                )
            return
        if status.attempt == self._attempt_key:
            return  # the attempt that already ended is still being torn down
        if self._restart_due_by is not None:
            self._restart_due_by = None
            self._begin_attempt(source="restart policy", key=status.attempt)
            self._log_restarted()
            return
        run = self._run
        if run is not None and self._replace_fresh_start(run, status):
            return
        ledger = run.record.ledger if run is not None else None
        if (
            run is not None
            and ledger is not None
            and (ledger.completed or ledger.gave_up or ledger.abandoned)
        ):
            run.start_over(self.log, wall=self.clocks.wall())
        self._begin_attempt(source="external", key=status.attempt)

    # -- runs and attempts -------------------------------------------------------------------

    def _select_run(self, paths: RunPaths | None) -> None:
        self._cadence = decision.Cadence()  # another run steps at its own pace
        self._sections = SectionCadence()
        if paths is None:
            self._run = None
            return
        self._run = WatchedRun.open(paths, gpu=self.gpu, resume=self.options.resume, log=self.log)
        self.restarter.use_run(paths)
        if self.stays_up:
            self._run.pointer.ensure_save_state()
        if self.locator.following:
            self.log.info(
                events.RUN_SELECTED,
                train_script=str(paths.train_script),
                output_dir=str(paths.output_dir),
            )

    def _follow_active_run(self) -> None:
        if not self.locator.following:
            return
        executing = self.locator.executing_run()
        paths = self.paths
        switch = self.attempt is None or (
            executing is not None and paths is not None and executing != paths.output_dir
        )
        if not switch:
            return
        try:
            current = self.locator.current()
        except RunSetupError as error:
            self.log.error(events.CONFIGURATION_INVALID, reason=str(error))
            return
        if current != paths:
            self.attempt = None
            self._select_run(current)
            self._take_stock()  # the run followed now may be one the machine interrupted

    def _begin_attempt(self, *, source: str, key: str | None = None) -> None:
        assert self._run is not None
        self._run.begin_attempt(wall=self.clocks.wall(), by_sidecar=source == "sidecar")
        # The run's cadence outlives one attempt: a restart does not change how it steps.
        learned = self.attempt.cadence if self.attempt else self._cadence
        sections = self.attempt.sections if self.attempt else self._sections
        self.attempt = decision.started(self.clocks.monotonic(), learned, sections)
        self._attempt_key = key
        if self.restarter.acts:
            self._run.set_supervising(True)
            by = "sidecar" if source in ("sidecar", RESUME_SOURCE) else "trainer"
            self.interruptions.resumed(self._run, by=by, wall=self.clocks.wall())
        if source == "sidecar":
            return
        self._run.note_resume_pointer()
        if self.restarter.acts:
            self._log_started(source)

    def _log_started(self, source: str, **details: Any) -> None:
        assert self._run is not None
        pids = self.restarter.trainer_pids()
        self.log.info(
            events.TRAINER_STARTED,
            source=source,
            mode=self.restarter.mode,
            pid=pids[0] if pids else None,
            script=str(self._run.paths.train_script),
            **details,
        )

    def _forget_attempt(self) -> None:
        if self.attempt is not None:
            self._cadence, self._sections = self.attempt.cadence, self.attempt.sections
        self.attempt = None
        if self._run is not None:
            self._run.set_supervising(False)

    def _first_launch(self) -> int | None:
        """Process mode: launch train.sh, resuming from what an earlier attempt left."""
        run = self._run
        assert run is not None
        self.run_lock = RunLock(run.paths.state_dir)
        try:
            self.run_lock.acquire()  # before the ledger is read for what happened last time
        except (RunLockHeld, OSError) as error:
            self.log.error(events.CONFIGURATION_INVALID, reason=str(error))
            return EXIT_ERROR
        status = self.visibility.status()
        plan = self.interruptions.take_stock(
            run,
            acts=True,
            relaunches=True,
            trainer_running=bool(status and status.running),
            survivor=self.restarter.outlives_sidecar,
            wall=self.clocks.wall(),
        )
        if plan is not None and plan.plan is Plan.GIVE_UP:
            self.recovery.give_up(run.record, plan.reason)
            return EXIT_GAVE_UP
        abandoned = run.record.ledger.abandoned  # logged by take_stock
        if abandoned or (
            plan is not None and plan.plan is Plan.LEAVE and plan.cause != "completed"
        ):
            return EXIT_COMPLETED  # abandoned, or resuming turned off: nothing is started
        run.observer.mark_launch()
        survivor = bool(status and status.running)
        launch = launch_first(
            run,
            restarter=self.restarter,
            recovery=self.recovery,
            # With no trainer left nothing is being written: a state is as complete as it
            # will get (the file checks still judge it), so the newest one counts at once.
            settle=self.options.checkpoint_settle if survivor else 0.0,
            wall=self.clocks.wall(),
            log=self.log,
        )
        if launch is Launch.ALREADY_COMPLETE:
            return EXIT_COMPLETED
        if launch is Launch.REFUSED:
            return EXIT_ERROR
        if launch is Launch.GAVE_UP:
            return self._run_over(EXIT_GAVE_UP)
        self._begin_attempt(source="sidecar", key=self.restarter.status().attempt)
        self._log_started("sidecar", workdir=str(run.paths.trainer_workdir))
        return None

    # -- interruptions -----------------------------------------------------------------------

    def _take_stock(self) -> None:
        """Container modes at start: resume the run the machine or the sidecar left behind."""
        run = self._run
        if run is None:
            return None
        status = self.visibility.status()
        plan = self.interruptions.take_stock(
            run,
            acts=self.restarter.acts,
            relaunches=self.restarter.relaunches,
            trainer_running=bool(status and status.running),
            survivor=self.restarter.outlives_sidecar,
            wall=self.clocks.wall(),
        )
        self._resume_pending = plan is not None and plan.plan is Plan.RELAUNCH
        if plan is not None and plan.plan is Plan.GIVE_UP:
            self.recovery.give_up(run.record, plan.reason)

    def _interrupted(self, how: str, wall: float) -> None:
        """The watched attempt ends because the sidecar or its trainer's container goes."""
        assert self._run is not None
        self.interruptions.record(self._run, how, at=wall, trainer_gone=how == "container_stopped")
        self._forget_attempt()

    def _relaunch_interrupted(self, status: TrainerStatus | None, wall: float) -> None:
        """Start the interrupted run again from its newest complete state, once possible."""
        run = self._run
        assert run is not None
        if status is not None and status.running:
            # A trainer appeared meanwhile (the UI's Start): keep one of the two.
            self._resume_pending = False
            self._maybe_begin(status, self.clocks.monotonic())
            return
        try:
            choice = run.pointer.choose_and_point(
                run.record.ledger, now=wall, settle=0.0, after_failure=False, trainer_stopped=True
            )
            run.record.ledger = choice.ledger
            run.record.save()
            run.observer.mark_launch()
            self.restarter.restart()
        except NoCheckpointLeft as error:
            run.record.ledger = error.ledger
            self._resume_pending = False
            self.recovery.give_up(run.record, str(error))
            return
        except (RestartError, LaunchScriptError, OSError) as error:
            run.observer.forget_launch()
            if str(error) != self._resume_problem:  # e.g. FluxGym's container still starting
                self._resume_problem = str(error)
                self.log.info(events.WAITING_FOR_TRAINER_CONTAINER, reason=str(error))
            return
        self._resume_pending, self._resume_problem = False, None
        after = self.visibility.status()
        self._begin_attempt(source=RESUME_SOURCE, key=after.attempt if after else None)

    def _replace_fresh_start(self, run: WatchedRun, status: TrainerStatus) -> bool:
        """An interrupted run started again from the beginning by someone else (FluxGym's
        Start regenerates train.sh without --resume) while a complete state of it exists:
        stop that trainer and resume the run instead. True when it was replaced."""
        ledger = run.record.ledger
        if ledger.interrupted is None or status.own is not None or not self.restarter.relaunches:
            return False
        seen = run.script_seen()
        try:
            _, command = read_train_script(run.paths.train_script, run.paths.trainer)
        except RunSetupError:
            return False
        newest = run.pointer.newest(ledger, now=self.clocks.wall(), settle=0.0)
        if seen is None or seen.digest != ledger.run_digest or command.resume or newest is None:
            return False  # a new run, one that resumes by itself, or nothing to resume from
        pids = self.restarter.trainer_pids()
        try:
            self.restarter.stop()
        except RestartError as error:
            self._restart_failed(error)
            return False
        self.log.warning(
            events.DUPLICATE_TRAINER_STOPPED,
            kept="sidecar",
            stopped_pids=pids,
            reason="the interrupted run was started again from the beginning (train.sh without "
            f"--resume) while its state {newest.path.name} exists; resuming from it instead",
        )
        self._resume_pending = True
        return True

    def _keep_one_trainer(self, status: TrainerStatus, now: float, wall: float) -> None:
        """Two trainers: the sidecar's relaunch and one started beside it (the UI's Start).
        The same run keeps the sidecar's, which resumes; a new run (other settings) wins."""
        run = self._run
        assert run is not None
        seen = run.script_seen()
        same_run = seen is not None and seen.digest == run.record.ledger.run_digest
        stop = list(status.others) if same_run or status.own is None else [status.own]
        try:
            self.restarter.stop_trees(stop)
        except RestartError as error:
            self._restart_failed(error)
            return
        self.log.warning(
            events.DUPLICATE_TRAINER_STOPPED,
            kept="sidecar" if same_run else "user",
            stopped_pids=stop,
            reason="a second trainer of the same run started beside the sidecar's resume; "
            "the resume is kept"
            if same_run
            else "a new run (train.sh with other settings) started beside the sidecar's resume "
            "of the old one; the new run is kept",
        )
        if same_run:
            # Its start rewrote train.sh (FluxGym's Start): point it at the newest state again.
            run.pointer.ensure_save_state()
            run.pointer_checked_at = float("-inf")
            run.keep_resume_current(now, wall, settle=0.0)
            return
        self._forget_attempt()
        run.establish_boundary(self.log)  # the new run's ledger; its trainer is begun next poll

    # -- verdicts ----------------------------------------------------------------------------

    def _handle(self, verdict: Verdict, wall: float) -> int | None:
        assert self._run is not None
        figures = {**verdict.figures, **usage_figures(self.restarter.trainer_pids())}
        if verdict.kind is VerdictKind.COMPLETED:
            self._run.record.ledger.completed = True
            self._run.record.save()
            self.log.info(events.TRAINING_COMPLETED, reason=verdict.reason, **figures)
            if verdict.figures.get("trainer_still_running") and self.restarter.acts:
                # A finished trainer that does not exit still holds the GPU.
                self._stop_trainer("training completed; it did not exit")
            return self._run_over(EXIT_COMPLETED)
        event = _VERDICT_EVENTS[verdict.kind]
        if verdict.kind is VerdictKind.STALL:
            # Every stall carries a class, looked at while the hung processes can still be
            # inspected (before the stop), so that the line people alert on says what hung.
            looking_since = self.clocks.monotonic()
            figures.update(self._diagnose(verdict, figures))
            figures["diagnosis_seconds"] = round(self.clocks.monotonic() - looking_since, 3)
            if self._extend_section(figures):
                return None
            verdict = dataclasses.replace(verdict, figures={**verdict.figures, **figures})
        self.log.warning(event, reason=verdict.reason, **figures)
        if verdict.kind is VerdictKind.STALL:
            tell_repeat(
                self._run,
                verdict,
                self.log,
                remediate=self.options.remediate and self.restarter.acts,
            )
        if not self.restarter.acts:
            return None  # detect-only: report, then wait for progress to resume
        return self._recover(verdict, wall)

    def _extend_section(self, figures: dict[str, Any]) -> bool:
        """A silence the output did not explain, with the stacks inside sampling or a save
        and moving between the two looks: the trainer is there, not hung. Judge it by that
        section's budget instead (True: the verdict is withdrawn)."""
        section = _STACK_SECTIONS.get(str(figures.get("diagnosis")))
        moving = (
            figures.get("diagnosis_basis") == "stacks" and figures.get("stacks_unchanged") is False
        )
        if section is None or not moving or self.attempt is None:
            return False
        before = Phase(figures.get("phase_before", Phase.RUNNING.value))
        now = self.clocks.monotonic()
        extended = decision.in_section(self.attempt, section, before, now, self.policy)
        if extended is None:
            return False
        self.attempt = extended
        self.log.info(
            events.STALL_DEFERRED,
            section=section.value,
            reason=f"the trainer's stacks are in {section.value} and moving; judged by that "
            f"section's budget ({self.policy.explain_timeout(extended)})",
            seconds_since_progress=figures.get("seconds_since_progress"),
            diagnosis_evidence=figures.get("diagnosis_evidence"),
        )
        return True

    def _diagnose(self, verdict: Verdict, figures: dict[str, Any]) -> dict[str, Any]:
        """The hang's class from the hook (stacks, threads, section), or from the section."""
        if self._before_stop is not None:
            try:
                found = self._before_stop(verdict, figures)
                if "diagnosis" in found:
                    return found
            except Exception as error:  # a report must never block recovery
                self.log.error(events.INCIDENT_REPORT_FAILED, error=repr(error))
        named = str(figures.get("section"))
        section = Section(named) if named in Section._value2member_map_ else None
        return diagnose(Evidence(section=section, stacks_missing="not looked at")).figures()

    def _recover(self, verdict: Verdict, wall: float) -> int | None:
        assert self._run is not None
        retrying = self._pending_recovery is not None  # the trainer was stopped last time
        self._run.observer.mark_launch()  # the relaunch's output begins after this
        outcome = self.recovery.recover(
            verdict, self._run.record, self._run.pointer, wall=wall, retrying=retrying
        )
        self._pending_recovery = verdict if outcome.kind is OutcomeKind.RETRY else None
        return self._after_recovery(outcome, verdict)

    def _after_recovery(self, outcome: Outcome, verdict: Verdict) -> int | None:
        if outcome.kind in _STOP_CODES:
            if self._run is not None:
                self._run.observer.forget_launch()  # no launch follows this mark
            return self._run_over(_STOP_CODES[outcome.kind])
        if outcome.kind is OutcomeKind.LEFT_TO_RUNTIME:
            # The runtime's restart policy brings it back; _maybe_begin sees it return.
            self._forget_attempt()
            self._restart_due_by = self.rules.restart_due_by(self.clocks.monotonic())
        elif outcome.kind is OutcomeKind.RESTARTED:
            status = self.visibility.status()
            self._begin_attempt(source="sidecar", key=status.attempt if status else None)
            self._log_restarted(reason=verdict.kind.value, checkpoint=outcome.checkpoint)
        elif outcome.kind is OutcomeKind.SHUTTING_DOWN and self._run is not None:
            # Told to stop between stopping the trainer and relaunching it: the next start
            # resumes the run (its recovery was already counted).
            self._interrupted("sigterm", self.clocks.wall())
        return None  # RETRY: at the next poll

    def _run_over(self, code: int) -> int | None:
        """Process mode ends with the run; container modes idle until the next one."""
        if self.restarter.acts and self.restarter.exits_with_run:
            if self._run is not None:
                self._run.set_supervising(False)  # it ended: nothing to infer at the next start
            return code
        self._forget_attempt()
        return None

    def _log_restarted(self, **details: Any) -> None:
        assert self._run is not None
        pids = self.restarter.trainer_pids()
        restarts = self._run.record.ledger.restarts
        self.log.info(
            events.TRAINER_RESTARTED,
            restarts=restarts,
            budget_left=self.rules.budget_left(restarts),
            mode=self.restarter.mode,
            pid=pids[0] if pids else None,
            script=str(self._run.paths.train_script),
            **details,
        )

    def _shutdown(self) -> None:
        if self._run is not None and self.restarter.acts and self.attempt is not None:
            status = self.visibility.status()
            if self._pending_recovery is not None or (status is not None and status.running):
                self._interrupted("sigterm", self.clocks.wall())
            elif status is not None and status.went_with_container:
                self._interrupted("container_stopped", self.clocks.wall())
            elif status is not None and not self._finished(status):
                # It ended by itself just before the stop, too late for a verdict (the kubelet
                # stops a native sidecar right after a crashed trainer): still the run's own
                # failure, counted and pointed at the newest state for whoever restarts it.
                self.recovery.charge_crash(self._run.record, self._run.pointer, self.clocks.wall())
                self._forget_attempt()
            else:
                self._forget_attempt()
        if not (self.restarter.acts and self.restarter.exits_with_run):
            return  # only a trainer we launched ourselves is ours to stop
        status = self.visibility.status()
        if status is not None and status.running:
            self._stop_trainer("sidecar shutting down")

    def _finished(self, status: TrainerStatus) -> bool:
        """An ended trainer that completed (exit 0, or this run's final model is there)."""
        assert self._run is not None
        since = self._run.record.ledger.run_started_at
        return status.exit_code == 0 or self._run.paths.final_model_present(since=since)

    def _stop_trainer(self, reason: str) -> None:
        self.log.info(events.STOPPING_TRAINER, reason=reason)
        try:
            self.restarter.stop()
        except RestartError as error:
            self._restart_failed(error)

    def _restart_failed(self, error: RestartError) -> None:
        """Log a stop or start that failed; survivors of SIGKILL are the host's problem."""
        if isinstance(error, SurvivedKill):
            self.log.error(
                events.HOST_NEEDS_ATTENTION, reason=str(error), processes=error.survivors
            )
        else:
            self.log.error(events.RESTART_FAILED, reason=str(error))

    # -- the view from other threads ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The loop's current view, for the HTTP surface and metrics (read from another thread)."""
        attempt, paths, ledger = self.attempt, self.paths, self.ledger
        now = self.clocks.monotonic()
        deadline = decision.stall_deadline(attempt, self.policy) if attempt else None
        return {
            "phase": attempt.phase.value if attempt else "idle",
            "section": attempt.section.value if attempt and attempt.section else None,
            # How long the current silence may last before it is a stall (None: not watching).
            "stall_allowance": deadline - attempt.last_progress_at
            if attempt and deadline is not None
            else None,
            "seconds_since_progress": now - attempt.last_progress_at if attempt else None,
            # Wall clock, as process_start_time_seconds: a crash now loses at most this much
            # when the run has no checkpoint yet.
            "attempt_started_at": self.clocks.wall() - (now - attempt.launched_at)
            if attempt
            else None,
            "last_step": attempt.last_step if attempt else None,
            "total_steps": attempt.total_steps if attempt else None,
            "gpu_utilization": attempt.last_gpu_utilization if attempt else None,
            "restarts": ledger.restarts,
            "recoveries": [(r.kind, r.reason) for r in ledger.recoveries],
            "quarantined": list(ledger.quarantined),
            "train_script": str(paths.train_script) if paths else None,
            "output_dir": str(paths.output_dir) if paths else None,
            "ready": self.ready,
            "last_poll_seconds": self.last_poll_seconds,
        }


def _replaced_underneath(status: TrainerStatus, watched: str | None) -> bool:
    """Another attempt runs than the one watched (a restart policy restarted it)."""
    return (
        status.running
        and watched is not None
        and status.attempt is not None
        and status.attempt != watched
    )
