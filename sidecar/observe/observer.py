"""One observer per watched run: everything a poll sees, folded into an Observation.

The log's growth and step counter, output files written, the trainer's own writes (when
no log is readable), the final model and the GPU. The clock is read by the loop, once
per cycle, and passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sidecar.decide.decision import Observation
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.log_follower import LogFollower
from sidecar.observe.output_activity import OutputWatcher
from sidecar.observe.process_tree import TreeWrites
from sidecar.restarters.base import TrainerStatus
from sidecar.run.paths import RunPaths


class RunObserver:
    def __init__(self, paths: RunPaths, gpu: GpuMonitor | None) -> None:
        self.paths = paths
        self.gpu = gpu
        self.follower = LogFollower(paths.train_log, step_bar=paths.trainer.step_bar)
        self.outputs = OutputWatcher(paths.output_dir, ignore=[paths.state_dir, paths.train_log])
        self._writes = TreeWrites()
        self._previous_poll: float | None = None

    def start_attempt(self) -> None:
        """A new attempt: only what it writes from now on is its progress."""
        self.follower.start_at_end()
        self.outputs.poll()
        self._writes = TreeWrites()

    def observe(
        self,
        *,
        now: float,
        wall: float,
        status: TrainerStatus | None,
        trainer_pids: Callable[[], Sequence[int]],
        sees_exit: bool,
    ) -> Observation:
        """``now`` is monotonic, ``wall`` the wall clock of the same moment; ``sees_exit``
        False (detect-only mode) takes the final model appearing for the trainer's end.
        ``trainer_pids`` is called only when the log cannot tell (it may scan processes)."""
        previous_poll, self._previous_poll = self._previous_poll, now
        delta = self.follower.poll()
        outputs_changed = self.outputs.poll()
        final_model = self.paths.final_model_present()
        utilization, power = self._gpu_reading()
        exited = status is not None and not status.running
        if not sees_exit and final_model and not delta.grew:
            exited = True  # detect-only mode cannot see the exit; the final model says it ended
        # Without a readable log (a run FluxGym's UI started streams into the UI), bytes the
        # trainer's processes write — its progress bar among them — stand in for log growth.
        wrote = False
        if not delta.size and sees_exit and not exited:
            wrote = self._writes.grew(trainer_pids())
        progress_at = None
        if delta.grew:
            progress_at = _when_written(delta.mtime, now, wall, previous_poll)
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
            progress_at=progress_at,
        )

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


def _when_written(
    mtime: float | None, now: float, wall: float, previous: float | None
) -> float | None:
    """The log's last write on the monotonic clock, clamped to this poll interval, so a
    wall-clock jump can shift it by at most one interval."""
    if mtime is None:
        return None
    written = now - (wall - mtime)
    return min(now, max(previous if previous is not None else now, written))
