"""The loop: observe the run, decide, and recover it through a restarter.

Everything that touches the world sits behind the adapters handed in (restarter,
GPU monitor, log follower, output watcher, ledger store, clocks), so the loop is
the same whichever way the trainer is restarted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar import decision
from sidecar.checkpoints import Candidate, find_candidates
from sidecar.config import Settings
from sidecar.decision import Observation, Phase, Policy, Verdict, VerdictKind
from sidecar.gpu import GpuMonitor
from sidecar.ledger import Ledger, LedgerStore
from sidecar.log_follower import LogFollower
from sidecar.output_activity import OutputWatcher
from sidecar.process_tree import tree_of, usage_of
from sidecar.restarters.base import Restarter, RestartError
from sidecar.resume_plan import (
    NoCheckpointLeft,
    choose_resume_point,
    rewrite_train_script,
    script_diff,
)
from sidecar.run_paths import RunPaths
from sidecar.train_script import TrainScriptError

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
        paths: RunPaths,
        restarter: Restarter | None,
        gpu: GpuMonitor | None,
        store: LedgerStore,
        log: Any,
        stop_event: threading.Event,
        clocks: Clocks | None = None,
    ):
        self.settings = settings
        self.paths = paths
        self.restarter = restarter
        self.gpu = gpu
        self.store = store
        self.log = log
        self.stop_event = stop_event
        self.clocks = clocks or Clocks()
        self.policy = Policy(
            stall_timeout=settings.stall_timeout,
            gpu_idle_timeout=settings.gpu_idle_timeout,
            gpu_idle_percent=settings.gpu_idle_percent,
            startup_grace=settings.startup_grace,
        )
        self.follower = LogFollower(paths.train_log)
        self.outputs = OutputWatcher(paths.output_dir, ignore=[paths.state_dir, paths.train_log])
        self.ledger = Ledger()
        self.state = decision.started(self.clocks.monotonic())
        self._heartbeat_failed = False

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.ledger = self.store.load()
        if self.paths.final_model_present() and self.restarter is not None:
            self.log.info(
                "training_completed", reason="final model already present", launched=False
            )
            return EXIT_COMPLETED
        if self._budget_spent():
            return self._give_up("restart budget already spent in an earlier session")
        if self.restarter is not None:
            try:
                self._prepare_first_launch()
                self.restarter.start()
            except (RestartError, TrainScriptError, OSError) as error:
                self.log.error("restart_failed", reason=str(error), attempt="initial launch")
                return EXIT_ERROR
            self._trainer_started(restart=False)
        else:
            self.follower.start_at_end()
            self.outputs.poll()
        while not self._wait(self.settings.poll_interval):
            verdict = self._poll_once()
            if verdict is None:
                continue
            outcome = self._handle(verdict)
            if outcome is not None:
                return outcome
        self._shutdown()
        return EXIT_COMPLETED

    def _poll_once(self) -> Verdict | None:
        seen = self._observe()
        if self.restarter is None and self.state.phase is Phase.STALLED and _is_progress(seen):
            self.log.info("progress_resumed", last_step=seen.step)
            self.state = decision.started(seen.now)
        self.state, verdict = decision.advance(self.state, seen, self.policy)
        return verdict

    def _observe(self) -> Observation:
        now = self.clocks.monotonic()
        exit_code = self.restarter.exit_code() if self.restarter else None
        delta = self.follower.poll()
        outputs_changed = self.outputs.poll()
        utilization = self._gpu_utilization()
        final_model = self.paths.final_model_present()
        if self.restarter is None and final_model and not delta.grew:
            exit_code = 0  # detect-only mode cannot see the exit; the final model says it ended
        return Observation(
            now=now,
            step=delta.progress.step if delta.progress else None,
            total_steps=delta.progress.total if delta.progress else None,
            log_grew=delta.grew,
            outputs_changed=outputs_changed,
            gpu_utilization=utilization,
            exit_code=exit_code,
            final_model_present=final_model,
        )

    def _gpu_utilization(self) -> tuple[int, ...] | None:
        if self.gpu is None:
            return None
        reading = self.gpu.sample()
        if reading is None or reading.error is not None or not reading.samples:
            return None
        return tuple(sample.utilization_percent for sample in reading.samples)

    # -- verdicts ----------------------------------------------------------------------------

    def _handle(self, verdict: Verdict) -> int | None:
        figures = {**verdict.figures, **self._trainer_usage()}
        if verdict.kind is VerdictKind.COMPLETED:
            self.ledger.completed = True
            self._save_ledger()
            self.log.info("training_completed", reason=verdict.reason, **figures)
            return EXIT_COMPLETED
        event = "stall_detected" if verdict.kind is VerdictKind.STALL else "trainer_crashed"
        self.log.warning(event, reason=verdict.reason, **figures)
        if self.restarter is None:
            return None  # detect-only: report, then wait for progress to resume
        return self._recover(verdict)

    def _recover(self, verdict: Verdict) -> int | None:
        assert self.restarter is not None
        stopping_since = self.clocks.monotonic()
        try:
            self.restarter.stop()
        except RestartError as error:
            self.log.error("restart_failed", reason=str(error))
            return self._give_up(str(error))
        self.log.info("trainer_stopped", seconds=round(self.clocks.monotonic() - stopping_since, 3))
        if self._budget_spent():
            return self._give_up(f"restart budget of {self.settings.max_restarts} spent")
        try:
            checkpoint = self._choose_and_point(settle=0.0)
        except (NoCheckpointLeft, TrainScriptError, OSError) as error:
            self.log.error("restart_failed", reason=str(error))
            return self._give_up(str(error))
        delay = self._backoff_delay()
        self.ledger.record_recovery(verdict.kind.value, verdict.reason, checkpoint)
        self._save_ledger()
        if delay > 0:
            self.log.info("restart_backoff", seconds=delay)
            if self._wait(delay):
                self._shutdown()
                return EXIT_COMPLETED
        try:
            self.restarter.restart()
        except RestartError as error:
            self.log.error("restart_failed", reason=str(error))
            return self._give_up(str(error))
        self._trainer_started(restart=True, reason=verdict.kind.value, checkpoint=checkpoint)
        return None

    def _choose_and_point(self, *, settle: float) -> str | None:
        """Resolve the checkpoint, rewrite train.sh; the chosen checkpoint (sidecar view)."""
        candidates = find_candidates(
            self.paths.output_dir,
            now=self.clocks.wall(),
            settle_seconds=settle,
            output_name=self.paths.output_name,
        )
        choice = choose_resume_point(
            candidates, self.ledger, allow_scratch=self.settings.fallback == "scratch"
        )
        for path in choice.quarantined_now:
            self.log.warning(
                "checkpoint_quarantined",
                checkpoint=path,
                failures=self.ledger.resume_failures.get(path),
                reason="resuming from it failed again before a newer checkpoint appeared",
            )
        chosen = str(choice.checkpoint.path) if choice.checkpoint else None
        completed_at = choice.checkpoint.completed_at if choice.checkpoint else None
        same_as_before = (chosen, completed_at) == (
            self.ledger.current_checkpoint,
            self.ledger.current_checkpoint_completed_at,
        )
        # Back off harder only while recoveries find nothing newer to resume from.
        self.ledger.consecutive_failures = (
            self.ledger.consecutive_failures + 1 if same_as_before else 0
        )
        self.log.info(
            "checkpoint_selected",
            checkpoint=chosen,
            reason=choice.reason,
            completed_at=completed_at,
            step=choice.checkpoint.step if choice.checkpoint else None,
            rejected=_rejections(candidates, choice.checkpoint),
        )
        trainer_path = self.paths.path_map.to_trainer(chosen) if chosen else None
        changed, old, new = rewrite_train_script(
            self.paths.train_script,
            resume_from=trainer_path,
            ensure_save_state=self.settings.ensure_save_state,
        )
        if changed:
            self.log.info(
                "train_script_rewritten",
                path=str(self.paths.train_script),
                resume=trainer_path,
                diff=script_diff(old, new, self.paths.train_script),
            )
        self.ledger.current_checkpoint = chosen
        self.ledger.current_checkpoint_completed_at = completed_at
        return chosen

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
        candidates = find_candidates(
            self.paths.output_dir,
            now=self.clocks.wall(),
            settle_seconds=self.settings.checkpoint_settle,
            output_name=self.paths.output_name,
        )
        if any(candidate.complete for candidate in candidates) or self.ledger.current_checkpoint:
            # An earlier attempt left checkpoints: resume rather than redo its work.
            self._choose_and_point(settle=self.settings.checkpoint_settle)
        elif self.settings.ensure_save_state:
            changed, old, new = rewrite_train_script(
                self.paths.train_script,
                resume_from=None,
                ensure_save_state=True,
            )
            if changed:
                self.log.info(
                    "train_script_rewritten",
                    path=str(self.paths.train_script),
                    reason="added --save_state: without it sd-scripts writes nothing resumable",
                    diff=script_diff(old, new, self.paths.train_script),
                )
        self._save_ledger()

    def _trainer_started(self, *, restart: bool, **details: Any) -> None:
        assert self.restarter is not None
        self.follower.start_at_end()
        self.outputs.poll()
        self.state = decision.started(self.clocks.monotonic())
        pids = self.restarter.trainer_pids()
        common = {
            "mode": self.restarter.mode,
            "pid": pids[0] if pids else None,
            "script": str(self.paths.train_script),
            "workdir": str(self.paths.trainer_workdir),
        }
        if restart:
            self.log.info(
                "trainer_restarted",
                restarts=self.ledger.restarts,
                budget_left=self.settings.max_restarts - self.ledger.restarts,
                **common,
                **details,
            )
        else:
            self.log.info("trainer_started", **common)

    def _trainer_usage(self) -> dict[str, Any]:
        if self.restarter is None:
            return {}
        pids = self.restarter.trainer_pids()
        if not pids:
            return {"trainer_processes": 0}
        usage = usage_of(tree_of(pids[0]))
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

    def _give_up(self, reason: str) -> int:
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
        return EXIT_GAVE_UP

    def _save_ledger(self) -> None:
        try:
            self.store.save(self.ledger)
        except OSError as error:
            # Losing the ledger write must not stop recovery; the next write tries again.
            self.log.error("ledger_write_failed", path=str(self.store.path), error=str(error))

    def _shutdown(self) -> None:
        if self.restarter is not None and self.restarter.exit_code() is None:
            self.log.info("stopping_trainer", reason="sidecar shutting down")
            try:
                self.restarter.stop()
            except RestartError as error:
                self.log.error("restart_failed", reason=str(error))


def _is_progress(seen: Observation) -> bool:
    return seen.log_grew or seen.outputs_changed


def _rejections(candidates: list[Candidate], chosen: Candidate | None) -> list[dict[str, Any]]:
    return [
        {"checkpoint": str(c.path), "problems": list(c.problems) or ["older than the chosen one"]}
        for c in candidates
        if chosen is None or c.path != chosen.path
    ]
