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
from sidecar.trainers.base import StartupReport


class RunObserver:
    def __init__(
        self,
        paths: RunPaths,
        gpu: GpuMonitor | None,
        *,
        run_started_at: Callable[[], float | None] = lambda: None,
    ) -> None:
        """``run_started_at`` says when this run began: an earlier run's final model does
        not mean this one completed."""
        self.paths = paths
        self.gpu = gpu
        self._run_started_at = run_started_at
        self.follower = LogFollower(paths.train_log, step_bar=paths.trainer.step_bar)
        self.outputs = OutputWatcher(paths.output_dir, ignore=[paths.state_dir, paths.train_log])
        self._writes = TreeWrites()
        self._previous_poll: float | None = None
        # What the trainer said before its first step (schedule, resume); read only until then.
        self.startup = StartupReport()
        self.saw_output = False  # this attempt's output could be read from its launch on
        self._stepping = False
        self._launch_mark: int | None = None  # where the log ended when a launch began
        self._from_launch = False

    def mark_launch(self) -> None:
        """The sidecar is about to launch the trainer: its output begins here."""
        self._launch_mark = self.follower.end()

    def forget_launch(self) -> None:
        """The launch that was marked did not happen."""
        self._launch_mark = None

    def start_attempt(self) -> bool:
        """A new attempt: only what it writes is its progress. True when its output is
        read from its launch on (the sidecar marked it), so its start-up lines are seen;
        an attempt someone else started is read from now on."""
        marked, self._launch_mark = self._launch_mark, None
        self._from_launch = marked is not None
        if marked is None:
            self.follower.start_at_end()
        else:
            self.follower.start_at(marked)
        self.outputs.poll()
        self._writes = TreeWrites()
        self.startup, self.saw_output, self._stepping = StartupReport(), False, False
        return marked is not None

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
        if delta.text and not self._stepping:
            self.saw_output = self._from_launch
            self.startup = self.startup.merged(self.paths.trainer.read_startup(delta.text))
            self._stepping = delta.progress is not None
        outputs_changed = self.outputs.poll()
        final_model = self.paths.final_model_present(since=self._run_started_at())
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
            section=self.paths.trainer.section_at_end(delta.text) if delta.text else None,
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
