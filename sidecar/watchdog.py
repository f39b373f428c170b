"""The loop: observe the run, decide, and recover it through a restarter.

Everything that touches the world sits behind the adapters handed in (restarter,
GPU monitor, run locator, clocks), so the loop is the same whichever way the
trainer is restarted. Between runs (container modes) the loop idles and starts
watching again when a trainer appears.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.checkpoints.scan import Candidate, choose_checkpoint, find_candidates
from sidecar.config import Settings
from sidecar.decide import decision
from sidecar.decide.cadence import AdaptiveTimeout, Cadence
from sidecar.decide.decision import Observation, Phase, Policy, RunState, Verdict, VerdictKind
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.log_follower import LogFollower
from sidecar.observe.output_activity import OutputWatcher
from sidecar.observe.process_tree import TreeWrites, tree_of, usage_of
from sidecar.recover.resume_plan import NoCheckpointLeft, choose_resume_point
from sidecar.restarters.base import Restarter, RestartError, TrainerStatus
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.locator import RunLocator
from sidecar.run.lock import RunLock, RunLockHeld
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.trainers.sd_scripts.launch_script import KEEP_RESUME, rewrite_train_script, script_diff
from sidecar.trainers.sd_scripts.train_script import TrainScriptError

EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_GAVE_UP = 3


@dataclass(frozen=True)
class Clocks:
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


class Watchdog:
    def __init__(
        self,
        *,
        settings: Settings,
        locator: RunLocator,
        restarter: Restarter | None,
        gpu: GpuMonitor | None,
        log: Any,
        stop_event: threading.Event,
        clocks: Clocks | None = None,
        before_stop: Callable[[Verdict, dict[str, Any]], None] | None = None,
        on_poll: Callable[[], None] | None = None,
    ):
        """``before_stop`` runs after a stall verdict, before the trainer is stopped (e.g. to
        save an incident report while the hung processes can still be inspected)."""
        self.settings = settings
        self.locator = locator
        self.restarter = restarter
        self.gpu = gpu
        self.log = log
        self.stop_event = stop_event
        self.clocks = clocks or Clocks()
        self.policy = Policy(
            stall_timeout=settings.stall_timeout_bound,
            gpu_idle_timeout=settings.gpu_idle_timeout,
            gpu_idle_percent=settings.gpu_idle_percent,
            startup_grace=settings.startup_grace,
            adaptive=AdaptiveTimeout(settings.stall_timeout_floor, settings.stall_timeout_ceiling)
            if settings.stall_timeout == "auto"
            else None,
        )
        self.paths: RunPaths | None = None
        self.ledger = Ledger()
        self.attempt: RunState | None = None  # None: no trainer being watched (idle)
        self._cadence = Cadence()  # learned by the attempts of the current run
        self._previous_poll: float | None = None
        self._pending_recovery: Verdict | None = None  # a recovery to retry (e.g. disk full)
        self._last_recovery_error: str | None = None
        self._attempt_key: str | None = None
        self._awaiting_restart_until: float | None = None
        self._last_status_problem: str | None = None
        self._last_pointer_check = 0.0
        self._writes = TreeWrites()
        self._heartbeat_failed = False
        self._before_stop = before_stop
        self._on_poll = on_poll  # after every poll (live progress line, step rate, metrics)
        self.ready = False  # the first poll is done
        self.last_poll_seconds: float | None = None

    @property
    def stays_up(self) -> bool:
        return self.restarter is not None and not self.restarter.exits_with_run

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self._select_run(self.locator.current())
        if self.restarter is None:
            self._begin_attempt(source="already running")
        elif self.restarter.exits_with_run:
            outcome = self._first_launch()
            if outcome is not None:
                return outcome
        else:
            self._check_trainer_reachable()
        next_poll = self.clocks.monotonic() + self.settings.poll_interval
        while not self._wait(self._until_next_poll(next_poll)):
            # Fixed-rate polls: the time a poll takes does not stretch the interval.
            now = self.clocks.monotonic()
            if now >= next_poll:
                next_poll = max(next_poll + self.settings.poll_interval, now)
            started = self.clocks.monotonic()
            outcome = self._tick()
            self.last_poll_seconds = self.clocks.monotonic() - started
            self.ready = True
            if self._on_poll is not None:
                self._on_poll()
            if outcome is not None:
                return outcome
        self._shutdown()
        return EXIT_COMPLETED

    def _tick(self) -> int | None:
        if self._pending_recovery is not None:
            return self._recover(self._pending_recovery)
        if self.stays_up:
            self._follow_active_run()
        if self.paths is None:
            return None
        status = self._status()
        if self.attempt is None:
            self._maybe_begin(status)
            return None
        if status is None and self.restarter is not None:
            # The trainer cannot be seen this poll (daemon down, container gone): no verdict
            # on a run we cannot observe, and nothing spent on a recovery that cannot work.
            return None
        if status is not None and self._replaced_underneath(status):
            # Restarted by someone else between two polls (a restart policy after a crash):
            # a new attempt, resuming from wherever train.sh pointed.
            self._begin_attempt(source="restarted outside the sidecar", key=status.attempt)
            return None
        verdict = self._poll_once(status)
        if verdict is None:
            if self.stays_up and self.settings.keep_resume_current:
                self._keep_resume_current()
            return None
        return self._handle(verdict)

    def _replaced_underneath(self, status: TrainerStatus) -> bool:
        return (
            status.running
            and self._attempt_key is not None
            and status.attempt is not None
            and status.attempt != self._attempt_key
        )

    def _maybe_begin(self, status: TrainerStatus | None) -> None:
        if status is None or not status.running:
            if (
                self._awaiting_restart_until
                and self.clocks.monotonic() > self._awaiting_restart_until
            ):
                self._awaiting_restart_until = None
                self.log.error(
                    "restart_failed",
                    reason="the trainer did not come back within the startup grace; check its "
                    "container's restart policy (it must restart after its processes are killed)",
                )
            return
        if status.attempt == self._attempt_key:
            return  # the attempt that already ended is still being torn down
        if self._awaiting_restart_until is not None:
            self._awaiting_restart_until = None
            self._begin_attempt(source="restart policy", key=status.attempt)
            self._log_restarted()
            return
        if self.paths and (self.ledger.completed or self.ledger.gave_up):
            self.log.info("new_run_detected", train_script=str(self.paths.train_script))
            self.ledger = Ledger()
            self._save_ledger()
        self._begin_attempt(source="external", key=status.attempt)

    def _poll_once(self, status: TrainerStatus | None) -> Verdict | None:
        seen = self._observe(status)
        assert self.attempt is not None
        if (
            self.restarter is None
            and self.attempt.phase is Phase.STALLED
            and decision.is_progress(seen)
        ):
            self.log.info("progress_resumed", last_step=seen.step)
            self.attempt = decision.started(seen.now, self.attempt.cadence)
        before = self.attempt.phase
        self.attempt, verdict = decision.advance(self.attempt, seen, self.policy)
        if before is Phase.STARTING and self.attempt.phase is Phase.RUNNING:
            # The first step of this attempt: after a restart, the moment training resumed.
            self.log.info(
                "training_progressing",
                step=self.attempt.last_step,
                total_steps=self.attempt.total_steps,
                seconds_since_start=round(seen.now - self.attempt.launched_at, 3),
            )
        return verdict

    def _observe(self, status: TrainerStatus | None) -> Observation:
        assert self.paths is not None and self.attempt is not None
        now = self.clocks.monotonic()
        previous_poll, self._previous_poll = self._previous_poll, now
        delta = self.follower.poll()
        outputs_changed = self.outputs.poll()
        final_model = self.paths.final_model_present()
        utilization, power = self._gpu_reading()
        exited = status is not None and not status.running
        if self.restarter is None and final_model and not delta.grew:
            exited = True  # detect-only mode cannot see the exit; the final model says it ended
        # Without a readable log (a run FluxGym's UI started streams into the UI), bytes the
        # trainer's processes write — its progress bar among them — stand in for log growth.
        wrote = False
        if not delta.size and self.restarter is not None and not exited:
            wrote = self._writes.grew(self.restarter.trainer_pids())
        return Observation(
            now=now,
            step=delta.progress.step if delta.progress else None,
            total_steps=delta.progress.total if delta.progress else None,
            log_grew=delta.grew,
            outputs_changed=outputs_changed,
            gpu_utilization=utilization,
            gpu_power_watts=power,
            exited=exited,
            exit_code=status.exit_code if status else None,
            final_model_present=final_model,
            output_written=wrote,
            progress_at=self._when_written(delta.mtime, now, previous_poll) if delta.grew else None,
        )

    def _until_next_poll(self, next_poll: float) -> float:
        """Seconds to the next poll: the regular one, or earlier when a verdict falls due."""
        now, wake = self.clocks.monotonic(), next_poll
        if self.attempt is not None:
            due = decision.stall_deadline(self.attempt, self.policy)
            if due is not None and due > now:  # a deadline already past waits for the poll
                wake = min(wake, due + 0.001)
        return max(0.0, wake - now)

    def _when_written(
        self, mtime: float | None, now: float, previous: float | None
    ) -> float | None:
        """The log's last write on the monotonic clock, clamped to this poll interval, so a
        wall-clock jump can shift it by at most one interval."""
        if mtime is None:
            return None
        written = now - (self.clocks.wall() - mtime)
        return min(now, max(previous if previous is not None else now, written))

    def _status(self) -> TrainerStatus | None:
        """The trainer's status; None when it cannot be known this poll (logged once)."""
        if self.restarter is None:
            return None
        try:
            status = self.restarter.status()
        except RestartError as error:
            if str(error) != self._last_status_problem:
                self._last_status_problem = str(error)
                self.log.error("trainer_unreachable", reason=str(error))
            return None
        if self._last_status_problem is not None:
            self._last_status_problem = None
            self.log.info("trainer_reachable")
        return status

    def _gpu_reading(self) -> tuple[tuple[int, ...] | None, tuple[float | None, ...] | None]:
        """Utilisation and power per watched GPU; (None, None) without a GPU signal."""
        if self.gpu is None:
            return None, None
        reading = self.gpu.sample()
        if reading is None or reading.error is not None or not reading.samples:
            return None, None
        return (
            tuple(sample.utilization_percent for sample in reading.samples),
            tuple(sample.power_watts for sample in reading.samples),
        )

    # -- runs and attempts -------------------------------------------------------------------

    def _select_run(self, paths: RunPaths | None) -> None:
        self.paths = paths
        self._cadence = Cadence()  # another run steps at its own pace
        if paths is None:
            return
        self.follower = LogFollower(paths.train_log)
        self.outputs = OutputWatcher(paths.output_dir, ignore=[paths.state_dir, paths.train_log])
        self.store = LedgerStore(paths.state_dir)
        self.ledger = self.store.load()
        if self.restarter is not None and hasattr(self.restarter, "use_run"):
            self.restarter.use_run(paths)
        if self.stays_up:
            self._ensure_save_state()
        if self.locator.following:
            self.log.info(
                "run_selected",
                train_script=str(paths.train_script),
                output_dir=str(paths.output_dir),
            )

    def _follow_active_run(self) -> None:
        if not self.locator.following:
            return
        executing = self.locator.executing_run()
        switch = self.attempt is None or (
            executing is not None and self.paths is not None and executing != self.paths.output_dir
        )
        if not switch:
            return
        try:
            paths = self.locator.current()
        except RunSetupError as error:
            self.log.error("configuration_invalid", reason=str(error))
            return
        if paths != self.paths:
            self.attempt = None
            self._select_run(paths)

    def _begin_attempt(self, *, source: str, key: str | None = None) -> None:
        assert self.paths is not None
        self.follower.start_at_end()
        self.outputs.poll()
        self._writes = TreeWrites()
        # The run's cadence outlives one attempt: a restart does not change how it steps.
        learned = self.attempt.cadence if self.attempt else self._cadence
        self.attempt = decision.started(self.clocks.monotonic(), learned)
        self._attempt_key = key
        if source != "sidecar":
            self._note_resume_pointer()
        if source == "sidecar" or self.restarter is None:
            return
        pids = self.restarter.trainer_pids()
        self.log.info(
            "trainer_started",
            source=source,
            mode=self.restarter.mode,
            pid=pids[0] if pids else None,
            script=str(self.paths.train_script),
        )

    def _note_resume_pointer(self) -> None:
        """Remember which checkpoint an attempt we did not launch resumes from."""
        assert self.paths is not None
        try:
            _, command = read_train_script(self.paths.train_script)
        except RunSetupError:
            return
        if command.resume is None:
            return
        resumed = self.paths.path_map.to_sidecar(command.resume)
        if resumed != self.ledger.current_checkpoint:
            self.ledger.current_checkpoint = resumed
            self.ledger.current_checkpoint_completed_at = None
            self._save_ledger()

    def _first_launch(self) -> int | None:
        assert self.restarter is not None and self.paths is not None
        if self.paths.final_model_present():
            self.log.info(
                "training_completed", reason="final model already present", launched=False
            )
            return EXIT_COMPLETED
        try:
            self._run_lock = RunLock(self.paths.state_dir)
            self._run_lock.acquire()
        except (RunLockHeld, OSError) as error:
            self.log.error("configuration_invalid", reason=str(error))
            return EXIT_ERROR
        if self._budget_spent():
            return self._give_up("restart budget already spent in an earlier session")
        try:
            self._prepare_first_launch()
            self.restarter.start()
        except NoCheckpointLeft as error:
            return self._give_up(str(error))
        except (RestartError, TrainScriptError, OSError) as error:
            self.log.error("restart_failed", reason=str(error), attempt="initial launch")
            return EXIT_ERROR
        key = self.restarter.status().attempt
        self._begin_attempt(source="sidecar", key=key)
        self._log_started()
        return None

    def _check_trainer_reachable(self) -> None:
        assert self.restarter is not None
        try:
            self.restarter.start()
        except RestartError as error:
            self._last_status_problem = str(error)
            self.log.error("trainer_unreachable", reason=str(error))

    # -- verdicts ----------------------------------------------------------------------------

    def _handle(self, verdict: Verdict) -> int | None:
        figures = {**verdict.figures, **self._trainer_usage()}
        if verdict.kind is VerdictKind.COMPLETED:
            self.ledger.completed = True
            self._save_ledger()
            self.log.info("training_completed", reason=verdict.reason, **figures)
            return self._run_over(EXIT_COMPLETED)
        event = "stall_detected" if verdict.kind is VerdictKind.STALL else "trainer_crashed"
        self.log.warning(event, reason=verdict.reason, **figures)
        if self.restarter is None:
            return None  # detect-only: report, then wait for progress to resume
        if self._before_stop is not None and verdict.kind is VerdictKind.STALL:
            try:
                self._before_stop(verdict, figures)
            except Exception as error:  # a report must never block recovery
                self.log.error("incident_report_failed", error=repr(error))
        return self._recover(verdict)

    def snapshot(self) -> dict[str, Any]:
        """The loop's current view, for the HTTP surface and metrics (read from another thread)."""
        attempt, paths, now = self.attempt, self.paths, self.clocks.monotonic()
        return {
            "phase": attempt.phase.value if attempt else "idle",
            "seconds_since_progress": now - attempt.last_progress_at if attempt else None,
            "last_step": attempt.last_step if attempt else None,
            "total_steps": attempt.total_steps if attempt else None,
            "gpu_utilization": attempt.last_gpu_utilization if attempt else None,
            "restarts": self.ledger.restarts,
            "recoveries": [(r.kind, r.reason) for r in self.ledger.recoveries],
            "quarantined": list(self.ledger.quarantined),
            "train_script": str(paths.train_script) if paths else None,
            "output_dir": str(paths.output_dir) if paths else None,
            "ready": self.ready,
            "last_poll_seconds": self.last_poll_seconds,
        }

    def _run_over(self, code: int) -> int | None:
        """Process mode ends with the run; container modes idle until the next one."""
        if self.restarter is not None and self.restarter.exits_with_run:
            return code
        self._forget_attempt()
        return None

    def _recover(self, verdict: Verdict) -> int | None:
        assert self.restarter is not None
        retrying = self._pending_recovery is not None  # the trainer was stopped last time
        if self.restarter.stop_before_rewrite and not retrying and not self._stop_trainer():
            return self._run_over(EXIT_GAVE_UP)
        if self._budget_spent():
            return self._give_up(f"restart budget of {self.settings.max_restarts} spent")
        # No settling: a stalled trainer wrote nothing for the whole stall timeout and a
        # crashed or stopped one writes nothing at all, so every file is as complete as it
        # will get — and a wall clock that jumped cannot make a good checkpoint look fresh.
        try:
            checkpoint = self._choose_and_point(settle=0.0)
        except NoCheckpointLeft as error:
            self.log.error("restart_failed", reason=str(error))
            return self._give_up(str(error))
        except (TrainScriptError, OSError) as error:
            # A full disk, a read-only volume, a train.sh being edited: nothing was changed
            # (the rewrite is atomic), and the next poll tries again.
            self._pending_recovery = verdict
            if _problem_of(error) != self._last_recovery_error:
                self._last_recovery_error = _problem_of(error)
                self.log.error("restart_failed", reason=str(error), retrying="every poll")
            return None
        self._pending_recovery = None
        self._last_recovery_error = None
        self.ledger.record_recovery(verdict.kind.value, verdict.reason, checkpoint)
        self._save_ledger()
        delay = self._backoff_delay()
        if delay > 0:
            self.log.info("restart_backoff", seconds=delay)
            if self._wait(delay):
                return None  # shutting down; run() stops the trainer
        # After a crash under a restart policy the runtime restarts the trainer by itself;
        # stopping now could only kill the new attempt it already started.
        leave_to_runtime = verdict.kind is VerdictKind.CRASH and not self.restarter.relaunches
        try:
            if not leave_to_runtime:
                self.restarter.restart()
        except RestartError as error:
            self.log.error("restart_failed", reason=str(error))
            return self._give_up(str(error))
        if not self.restarter.relaunches:
            # The runtime's restart policy brings it back; _maybe_begin sees it return.
            self._forget_attempt()
            self._awaiting_restart_until = self.clocks.monotonic() + self.settings.startup_grace
            return None
        self._begin_attempt(source="sidecar", key=self._status_key())
        self._log_restarted(reason=verdict.kind.value, checkpoint=checkpoint)
        return None

    def _forget_attempt(self) -> None:
        if self.attempt is not None:
            self._cadence = self.attempt.cadence
        self.attempt = None

    def _stop_trainer(self) -> bool:
        assert self.restarter is not None
        stopping_since = self.clocks.monotonic()
        try:
            self.restarter.stop()
        except RestartError as error:
            self.log.error("restart_failed", reason=str(error))
            self._give_up(str(error))
            return False
        self.log.info("trainer_stopped", seconds=round(self.clocks.monotonic() - stopping_since, 3))
        return True

    def _status_key(self) -> str | None:
        status = self._status()
        return status.attempt if status else None

    def _choose_and_point(self, *, settle: float, after_failure: bool = True) -> str | None:
        """Resolve the checkpoint, rewrite train.sh; the chosen checkpoint (sidecar view).

        The ledger's updates (the failed resume counted, quarantine, backoff) are kept only
        once train.sh points at the choice: a rewrite that failed (a full disk) is retried
        every poll, and a retry must not count the same failed resume again.
        """
        assert self.paths is not None
        ledger = copy.deepcopy(self.ledger)
        candidates = self._candidates(settle)
        try:
            choice = choose_resume_point(
                candidates,
                ledger,
                allow_scratch=self.settings.fallback == "scratch",
                after_failure=after_failure,
            )
        except NoCheckpointLeft:
            self.ledger = ledger  # giving up: keep the quarantine that led to it
            raise
        chosen = str(choice.checkpoint.path) if choice.checkpoint else None
        completed_at = choice.checkpoint.completed_at if choice.checkpoint else None
        same_as_before = (chosen, completed_at) == (
            ledger.current_checkpoint,
            ledger.current_checkpoint_completed_at,
        )
        # Back off harder only while recoveries find nothing newer to resume from.
        ledger.consecutive_failures = ledger.consecutive_failures + 1 if same_as_before else 0
        self.log.info(
            "checkpoint_selected",
            checkpoint=chosen,
            reason=choice.reason,
            completed_at=completed_at,
            step=choice.checkpoint.step if choice.checkpoint else None,
            rejected=_rejections(candidates, choice.checkpoint),
        )
        self._point_script_at(chosen, reason=choice.reason)
        ledger.current_checkpoint = chosen
        ledger.current_checkpoint_completed_at = completed_at
        self.ledger = ledger
        for path in choice.quarantined_now:
            self.log.warning(
                "checkpoint_quarantined",
                checkpoint=path,
                failures=ledger.resume_failures.get(path),
                reason="resuming from it failed again before a newer checkpoint appeared",
            )
        return chosen

    def _ensure_save_state(self) -> None:
        """Add --save_state for the next start of a run we did not launch (FluxGym omits it)."""
        if self.paths is None or not self.settings.ensure_save_state:
            return
        try:
            self._point_script_at(
                KEEP_RESUME,
                reason="added --save_state: without it sd-scripts writes nothing resumable",
            )
        except (TrainScriptError, OSError) as error:
            self.log.warning("train_script_not_updated", reason=str(error))

    def _point_script_at(self, checkpoint: str | None, *, reason: str) -> None:
        assert self.paths is not None
        if checkpoint is KEEP_RESUME:
            trainer_path: str | None = KEEP_RESUME
        else:
            trainer_path = self.paths.path_map.to_trainer(checkpoint) if checkpoint else None
        changed, old, new = rewrite_train_script(
            self.paths.train_script,
            resume_from=trainer_path,
            ensure_save_state=self.settings.ensure_save_state,
        )
        if changed:
            self.log.info(
                "train_script_rewritten",
                path=str(self.paths.train_script),
                resume=None if trainer_path is KEEP_RESUME else trainer_path,
                reason=reason,
                diff=script_diff(old, new, self.paths.train_script),
            )

    def _keep_resume_current(self) -> None:
        """While healthy, point train.sh at each new complete checkpoint, so that a restart
        by anyone (the orchestrator after a crash, a person) resumes from it."""
        assert self.paths is not None and self.attempt is not None
        now = self.clocks.monotonic()
        if self.attempt.phase is not Phase.RUNNING:
            return
        if now - self._last_pointer_check < max(self.settings.checkpoint_settle, 1.0):
            return
        self._last_pointer_check = now
        newest = choose_checkpoint(
            self._candidates(self.settings.checkpoint_settle),
            exclude=[Path(p) for p in self.ledger.quarantined],
        )
        if newest is None:
            return
        try:
            _, command = read_train_script(self.paths.train_script)
            target = self.paths.path_map.to_trainer(str(newest.path))
            if command.resume != target:
                self._point_script_at(str(newest.path), reason="newer complete checkpoint")
        except (RunSetupError, TrainScriptError, OSError) as error:
            self.log.warning("resume_pointer_not_updated", reason=str(error))

    def _candidates(self, settle: float) -> list[Candidate]:
        assert self.paths is not None
        return find_candidates(
            self.paths.output_dir,
            now=self.clocks.wall(),
            settle_seconds=settle,
            output_name=self.paths.output_name,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _wait(self, seconds: float) -> bool:
        """Sleep until ``seconds`` passed or a stop was requested (True), beating the heart."""
        deadline = self.clocks.monotonic() + seconds
        while True:
            self.heartbeat()
            remaining = deadline - self.clocks.monotonic()
            if remaining <= 0:
                return self.stop_event.is_set()
            if self.stop_event.wait(min(remaining, self.settings.poll_interval)):
                return True

    def heartbeat(self) -> None:
        try:
            self.settings.heartbeat_file.touch()
        except OSError as error:
            if not self._heartbeat_failed:
                self._heartbeat_failed = True
                self.log.warning(
                    "heartbeat_failed", path=str(self.settings.heartbeat_file), error=str(error)
                )

    def _prepare_first_launch(self) -> None:
        assert self.paths is not None
        candidates = self._candidates(self.settings.checkpoint_settle)
        if any(candidate.complete for candidate in candidates) or self.ledger.current_checkpoint:
            # An earlier attempt left checkpoints: resume rather than redo its work.
            self._choose_and_point(settle=self.settings.checkpoint_settle, after_failure=False)
        elif self.settings.ensure_save_state:
            self._point_script_at(
                None, reason="added --save_state: without it sd-scripts writes nothing resumable"
            )
        self._save_ledger()

    def _log_started(self) -> None:
        assert self.restarter is not None and self.paths is not None
        pids = self.restarter.trainer_pids()
        self.log.info(
            "trainer_started",
            source="sidecar",
            mode=self.restarter.mode,
            pid=pids[0] if pids else None,
            script=str(self.paths.train_script),
            workdir=str(self.paths.trainer_workdir),
        )

    def _log_restarted(self, **details: Any) -> None:
        assert self.restarter is not None and self.paths is not None
        pids = self.restarter.trainer_pids()
        self.log.info(
            "trainer_restarted",
            restarts=self.ledger.restarts,
            budget_left=self.settings.max_restarts - self.ledger.restarts,
            mode=self.restarter.mode,
            pid=pids[0] if pids else None,
            script=str(self.paths.train_script),
            **details,
        )

    def _trainer_usage(self) -> dict[str, Any]:
        if self.restarter is None:
            return {}
        pids = self.restarter.trainer_pids()
        if not pids:
            return {}  # not visible from here (container mode without a shared namespace)
        usage = usage_of([process for pid in pids for process in tree_of(pid)][: 4 * len(pids)])
        return {
            "trainer_processes": usage.processes,
            "trainer_cpu_seconds": usage.cpu_seconds,
            "trainer_write_bytes": usage.write_bytes,
        }

    def _budget_spent(self) -> bool:
        return self.ledger.restarts >= self.settings.max_restarts

    def _backoff_delay(self) -> float:
        exponent = min(self.ledger.consecutive_failures, 30)
        return min(self.settings.restart_backoff_max, self.settings.restart_backoff * 2**exponent)

    def _give_up(self, reason: str) -> int | None:
        self.ledger.gave_up = True
        self._save_ledger()
        self.log.error(
            "gave_up",
            reason=reason,
            restarts=self.ledger.restarts,
            max_restarts=self.settings.max_restarts,
            quarantined=self.ledger.quarantined,
            note="train.sh and every checkpoint are left as they are",
        )
        return self._run_over(EXIT_GAVE_UP)

    def _save_ledger(self) -> None:
        if self.paths is None:
            return
        try:
            self.store.save(self.ledger)
        except OSError as error:
            # Losing the ledger write must not stop recovery; the next write tries again.
            self.log.error("ledger_write_failed", path=str(self.store.path), error=str(error))

    def _shutdown(self) -> None:
        if self.restarter is None or not self.restarter.exits_with_run:
            return  # only a trainer we launched ourselves is ours to stop
        status = self._status()
        if status is not None and status.running:
            self.log.info("stopping_trainer", reason="sidecar shutting down")
            try:
                self.restarter.stop()
            except RestartError as error:
                self.log.error("restart_failed", reason=str(error))


def _problem_of(error: Exception) -> str:
    """A failure without the file it names: an OSError from the atomic rewrite names a new
    random temporary file on every retry, and the same problem must be logged only once."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return str(error)


def _rejections(candidates: list[Candidate], chosen: Candidate | None) -> list[dict[str, Any]]:
    return [
        {"checkpoint": str(c.path), "problems": list(c.problems) or ["older than the chosen one"]}
        for c in candidates
        if chosen is None or c.path != chosen.path
    ]
