"""Prometheus metrics: the loop's view read at scrape time, and counters fed by its events.

Two sources, two mechanisms. What the loop *knows now* (phase, step, GPU utilisation,
ledger) is read from ``Watchdog.snapshot()`` by a custom collector when Prometheus scrapes,
so no value can go stale between polls. What *happened* (restarts and their reasons,
failed recoveries, quarantines) is counted by a structlog processor that watches the same
event stream people read: the events are the contract, and a counter can never disagree
with the log line it counts.

Names follow Prometheus conventions: base units (seconds, bytes, ratios 0-1), ``_total``
only on counters, and every metric prefixed ``training_sidecar_``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__, events
from sidecar.checkpoints.choice import newest_resumable
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.decide.decision import Phase
from sidecar.decide.diagnosis import HangClass
from sidecar.observe.gpu import GpuMonitor, GpuReading
from sidecar.run.paths import RunPaths
from sidecar.surface.step_rate import Speed

PREFIX = "training_sidecar"
PHASES = ("idle", *(phase.value for phase in Phase))
RESTART_REASONS = ("stall", "crash")
NOTIFICATION_OUTCOMES = ("sent", "failed", "dropped")
# Counted by outcome: the event name is notification_<outcome>.
_NOTIFICATION_EVENTS = (
    events.NOTIFICATION_SENT,
    events.NOTIFICATION_FAILED,
    events.NOTIFICATION_DROPPED,
)
# Polls take milliseconds; a slow one (a huge log tail, a hung NFS mount) takes seconds.
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EventCounters:
    """A structlog processor counting the events operators alert on; it changes nothing."""

    def __init__(self, registry: CollectorRegistry):
        self.restarts = Counter(
            f"{PREFIX}_restarts",
            "Trainer restarts made by this sidecar process, by the verdict that caused them.",
            ["reason"],
            registry=registry,
        )
        self.stalls = Counter(
            f"{PREFIX}_stalls",
            "Stalls detected (stall_detected events), by the hang's diagnosis.",
            ["diagnosis"],
            registry=registry,
        )
        self.crashes = Counter(
            f"{PREFIX}_crashes", "Crashes detected (trainer_crashed events).", registry=registry
        )
        self.recovery_failures = Counter(
            f"{PREFIX}_recovery_failures",
            "Recoveries that failed: the trainer could not be stopped, pointed at a checkpoint "
            "or started again (restart_failed events).",
            registry=registry,
        )
        self.give_ups = Counter(
            f"{PREFIX}_give_ups",
            "Times the sidecar gave up on a run (budget spent or no usable checkpoint).",
            registry=registry,
        )
        self.quarantines = Counter(
            f"{PREFIX}_checkpoints_quarantined",
            "Checkpoints quarantined after resuming from them kept failing.",
            registry=registry,
        )
        self.incidents = Counter(
            f"{PREFIX}_incidents_saved",
            "Incident bundles saved before stopping a stalled trainer.",
            registry=registry,
        )
        self.notifications = Counter(
            f"{PREFIX}_notifications",
            "Webhook notifications, by outcome (sent, failed after retries, dropped: queue full).",
            ["outcome"],
            registry=registry,
        )
        for reason in RESTART_REASONS:
            self.restarts.labels(reason=reason)  # exported as 0 before the first restart
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(outcome=outcome)
        for hang in HangClass:
            self.stalls.labels(diagnosis=hang.value)  # every class exported, at 0 until seen
        # A restart under an orchestrator's restart policy is logged without its reason;
        # it is the verdict seen just before.
        self._last_verdict = "stall"

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event = event_dict.get("event")
        if event == events.STALL_DETECTED:
            self._last_verdict = "stall"
            hang = event_dict.get("diagnosis")
            known = hang in HangClass._value2member_map_
            self.stalls.labels(diagnosis=hang if known else HangClass.UNKNOWN.value).inc()
        elif event == events.TRAINER_CRASHED:
            self._last_verdict = "crash"
            self.crashes.inc()
        elif event == events.TRAINER_RESTARTED:
            reason = event_dict.get("reason")
            self.restarts.labels(
                reason=reason if reason in RESTART_REASONS else self._last_verdict
            ).inc()
        elif event == events.RESTART_FAILED:
            self.recovery_failures.inc()
        elif event == events.GAVE_UP:
            self.give_ups.inc()
        elif event == events.CHECKPOINT_QUARANTINED:
            self.quarantines.inc()
        elif event == events.INCIDENT_SAVED:
            self.incidents.inc()
        elif event in _NOTIFICATION_EVENTS:
            self.notifications.labels(outcome=event.removeprefix("notification_")).inc()
        return event_dict


class PollTimer:
    """The loop's own poll duration, observed once per poll (a histogram, for percentiles)."""

    def __init__(self, registry: CollectorRegistry):
        self.histogram = Histogram(
            f"{PREFIX}_poll_duration_seconds",
            "Time one poll of the loop took (observe, decide; not the recovery it may start).",
            buckets=POLL_BUCKETS,
            registry=registry,
        )

    def observe(self, seconds: float | None) -> None:
        if seconds is not None:
            self.histogram.observe(seconds)


class GpuTap:
    """Wraps the loop's GPU monitor and keeps its last reading for scrapes.

    NVML handles belong to the loop's thread (the monitor is not thread-safe), so a scrape
    never calls NVML itself; it reports what the loop saw, with the device indices the
    snapshot's bare utilisation tuple lacks.
    """

    def __init__(self, inner: GpuMonitor, clock: Callable[[], float] = time.monotonic):
        self._inner = inner
        self._clock = clock
        self._last: tuple[float, GpuReading] | None = None

    def sample(self) -> GpuReading | None:
        reading = self._inner.sample()
        if reading is not None:
            self._last = (self._clock(), reading)
        return reading

    def close(self) -> None:
        self._inner.close()

    def last(self, max_age: float) -> GpuReading | None:
        """The last reading when it is at most ``max_age`` seconds old (else no GPU series)."""
        last = self._last
        if last is None or self._clock() - last[0] > max_age:
            return None
        return last[1]


class CheckpointAge:
    """Age of the newest complete checkpoint, rescanned at most every ``refresh`` seconds
    (a scan reads a few header bytes per state file; a scrape storm must not repeat it)."""

    def __init__(
        self,
        *,
        settle_seconds: float,
        refresh: float = 5.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._settle = settle_seconds
        self._refresh = refresh
        self._wall = wall
        self._monotonic = monotonic
        self._cached: tuple[float, Path, float | None] | None = None  # at, output dir, completed
        self._lock = threading.Lock()
        self._memo = FileReportMemo()  # only new or changed state files are read again

    def seconds(self, paths: RunPaths | None, quarantined: list[str]) -> float | None:
        if paths is None:
            return None
        with self._lock:
            now = self._monotonic()
            cached = self._cached
            if cached is None or cached[1] != paths.output_dir or now - cached[0] > self._refresh:
                newest = newest_resumable(
                    paths, quarantined, now=self._wall(), settle=self._settle, memo=self._memo
                )
                completed = newest.completed_at if newest else None
                cached = self._cached = (now, paths.output_dir, completed)
        completed_at = cached[2]
        return None if completed_at is None else max(self._wall() - completed_at, 0.0)


class SnapshotCollector(Collector):
    """Reads the loop's snapshot at scrape time and turns it into gauges."""

    def __init__(
        self,
        *,
        snapshot: Callable[[], dict[str, Any]],
        paths: Callable[[], RunPaths | None],
        speed: Callable[[], Speed | None],
        mode: str,
        max_restarts: int,
        max_lost_work: float | None = None,
        gpu: GpuTap | None = None,
        gpu_max_age: float = 30.0,
        checkpoint_age: CheckpointAge | None = None,
    ):
        self._snapshot = snapshot
        self._paths = paths
        self._speed = speed
        self._mode = mode
        self._max_restarts = max_restarts
        self._max_lost_work = max_lost_work
        self._gpu = gpu
        self._gpu_max_age = gpu_max_age
        self._checkpoint_age = checkpoint_age

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not take a snapshot or scan the output folder.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        view = self._snapshot()
        info = InfoMetricFamily(PREFIX, "The sidecar's version and restart mode.")
        info.add_metric([], {"version": __version__, "mode": self._mode})
        yield info
        phase = GaugeMetricFamily(
            f"{PREFIX}_phase",
            "1 for the phase the watched run is in (idle: no trainer watched), 0 for the others.",
            labels=["phase"],
        )
        for name in PHASES:
            phase.add_metric([name], 1.0 if view["phase"] == name else 0.0)
        yield phase
        yield _gauge("ready", "1 once the loop completed its first poll.", float(view["ready"]))
        yield from _optional(
            "last_progress_age_seconds",
            "Seconds since the run last made progress (step, log output or files written).",
            view["seconds_since_progress"],
        )
        yield from _optional(
            "last_step", "Last step counter seen in the trainer's output.", view["last_step"]
        )
        yield from _optional(
            "max_steps",
            "Total steps of the run, from the trainer's progress bar.",
            view["total_steps"],
        )
        yield from _optional(
            "stall_allowance_seconds",
            "How long the current silence may last before it is a stall (the section's "
            "learned timeout, the fixed timeout, or the start-up grace).",
            view.get("stall_allowance"),
        )
        yield from _optional(
            "attempt_start_time_seconds",
            "When the trainer's current attempt was launched (Unix time).",
            view.get("attempt_started_at"),
        )
        speed = self._speed()
        yield from _optional(
            "steps_per_second",
            "Training speed over the last steps (falls towards 0 while no step is made).",
            speed.steps_per_second if speed else None,
        )
        yield from _optional(
            "remaining_seconds",
            "Estimated time to the last step at the current speed.",
            speed.eta_seconds if speed else None,
        )
        yield from self._gpu_metrics()
        yield _gauge(
            "run_recoveries",
            "Recoveries recorded in the ledger for this run (kept across sidecar restarts).",
            float(view["restarts"]),
        )
        yield _gauge(
            "max_restarts",
            "Recoveries allowed per run (SIDECAR_MAX_RESTARTS).",
            float(self._max_restarts),
        )
        yield _gauge(
            "quarantined_checkpoints",
            "Checkpoints of this run that are quarantined (never resumed from again).",
            float(len(view["quarantined"])),
        )
        yield from _optional(
            "max_lost_work_seconds",
            "The longest stretch of training a crash may lose (SIDECAR_MAX_LOST_WORK).",
            self._max_lost_work,
        )
        if self._checkpoint_age is not None:
            yield from _optional(
                "last_checkpoint_age_seconds",
                "Seconds since the newest complete, non-quarantined checkpoint was completed.",
                self._checkpoint_age.seconds(self._paths(), view["quarantined"]),
            )

    def _gpu_metrics(self) -> Iterator[Metric]:
        reading = self._gpu.last(self._gpu_max_age) if self._gpu else None
        if reading is None or not reading.samples:
            return
        utilization = GaugeMetricFamily(
            f"{PREFIX}_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU (NVML), 0-1.",
            labels=["gpu"],
        )
        memory = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"]
        )
        power = GaugeMetricFamily(
            f"{PREFIX}_gpu_power_watts",
            "Power drawn by the GPU (NVML; absent when the board does not report it).",
            labels=["gpu"],
        )
        for sample in reading.samples:
            utilization.add_metric([str(sample.index)], sample.utilization_percent / 100.0)
            memory.add_metric([str(sample.index)], float(sample.memory_used_bytes))
            if sample.power_watts is not None:
                power.add_metric([str(sample.index)], sample.power_watts)
        yield utilization
        yield memory
        if power.samples:
            yield power


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _optional(name: str, documentation: str, value: float | None) -> Iterator[Metric]:
    """A gauge only while its value is known: an absent series is honest, a 0 would lie."""
    if value is not None:
        yield _gauge(name, documentation, float(value))
