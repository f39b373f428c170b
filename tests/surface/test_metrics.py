"""Metrics: event counters, the snapshot collector, naming conventions, and the step rate."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from state_factory import write_state_folder

from sidecar import __version__
from sidecar.log_setup import configure_logging, get_logger
from sidecar.observe.gpu import GpuReading, GpuSample
from sidecar.run.path_map import PathMap
from sidecar.run.paths import RunPaths
from sidecar.surface.metrics import (
    CheckpointAge,
    EventCounters,
    GpuTap,
    PollTimer,
    SnapshotCollector,
)
from sidecar.surface.step_rate import Speed, StepRate, format_duration


def snapshot(**changes: Any) -> dict[str, Any]:
    view = {
        "phase": "running",
        "seconds_since_progress": 3.5,
        "last_step": 120,
        "total_steps": 400,
        "gpu_utilization": (97,),
        "restarts": 2,
        "recoveries": [("stall", "no progress"), ("crash", "exit 1")],
        "quarantined": ["/out/my-lora-step00000100-state"],
        "train_script": "/out/train.sh",
        "output_dir": "/out",
        "ready": True,
        "last_poll_seconds": 0.004,
    }
    return {**view, **changes}


class FakeGpu:
    def __init__(self, reading: GpuReading | None):
        self.reading = reading
        self.closed = False

    def sample(self) -> GpuReading | None:
        return self.reading

    def close(self) -> None:
        self.closed = True


def sample(index: int, percent: int) -> GpuSample:
    return GpuSample(index, percent, 20 << 30, 24 << 30, 250.0)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def collector_registry(**options: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    arguments: dict[str, Any] = {
        "snapshot": snapshot,
        "paths": lambda: None,
        "speed": lambda: Speed(step=120, total=400, steps_per_second=0.5, eta_seconds=560.0),
        "mode": "process",
        "max_restarts": 10,
    }
    arguments.update(options)
    registry.register(SnapshotCollector(**arguments))
    return registry


# -- counters fed by events ----------------------------------------------------------------


def test_restarts_are_counted_by_reason():
    """trainer_restarted counts under its reason; a reasonless one under the last verdict."""
    registry = CollectorRegistry()
    counters = EventCounters(registry)
    for event in (
        {"event": "stall_detected", "diagnosis": "dataloader_wait"},
        {"event": "stall_detected", "diagnosis": "not-a-class"},
        {"event": "trainer_restarted", "reason": "stall"},
        {"event": "trainer_crashed"},
        # A restart policy brought it back: the sidecar logs no reason, the crash was it.
        {"event": "trainer_restarted"},
        {"event": "restart_failed"},
        {"event": "checkpoint_quarantined"},
        {"event": "gave_up"},
        {"event": "incident_saved"},
        {"event": "notification_failed"},
        {"event": "poll_something_else"},
    ):
        assert counters(None, "info", dict(event)) == event
    assert value(registry, "training_sidecar_restarts_total", reason="stall") == 1
    assert value(registry, "training_sidecar_restarts_total", reason="crash") == 1
    assert value(registry, "training_sidecar_stalls_total", diagnosis="dataloader_wait") == 1
    assert value(registry, "training_sidecar_stalls_total", diagnosis="unknown") == 1
    assert value(registry, "training_sidecar_stalls_total", diagnosis="cuda_sync") == 0
    assert value(registry, "training_sidecar_crashes_total") == 1
    assert value(registry, "training_sidecar_recovery_failures_total") == 1
    assert value(registry, "training_sidecar_checkpoints_quarantined_total") == 1
    assert value(registry, "training_sidecar_give_ups_total") == 1
    assert value(registry, "training_sidecar_incidents_saved_total") == 1
    assert value(registry, "training_sidecar_notifications_total", outcome="failed") == 1
    assert value(registry, "training_sidecar_notifications_total", outcome="sent") == 0


def test_counters_see_info_events_even_when_the_log_shows_only_errors():
    """SIDECAR_LOG_LEVEL=ERROR hides trainer_restarted from the log but not from the counter."""
    registry = CollectorRegistry()
    counters = EventCounters(registry)
    stream = io.StringIO()
    configure_logging("json", "ERROR", stream=stream, observers=[counters])
    log = get_logger()
    log.info("trainer_restarted", reason="crash")
    log.debug("poll_detail")
    log.error("gave_up", reason="budget spent")
    assert value(registry, "training_sidecar_restarts_total", reason="crash") == 1
    assert value(registry, "training_sidecar_give_ups_total") == 1
    shown = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert shown == ["gave_up"]


def test_without_observers_the_level_filters_as_before():
    """No observers: the bound logger itself filters, nothing below the level is processed."""
    stream = io.StringIO()
    configure_logging("json", "WARNING", stream=stream)
    log = get_logger()
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]


def test_poll_durations_form_a_histogram():
    registry = CollectorRegistry()
    timer = PollTimer(registry)
    for seconds in (0.002, 0.004, 3.0, None):
        timer.observe(seconds)
    assert value(registry, "training_sidecar_poll_duration_seconds_count") == 3
    assert value(registry, "training_sidecar_poll_duration_seconds_bucket", le="0.005") == 2


# -- the snapshot collector ------------------------------------------------------------------


def test_snapshot_becomes_gauges_at_scrape_time():
    """Phase one-hot, progress, speed, ledger figures: each read when scraped."""
    views = [snapshot()]
    registry = collector_registry(snapshot=lambda: views[-1])
    assert value(registry, "training_sidecar_phase", phase="running") == 1
    assert value(registry, "training_sidecar_phase", phase="stalled") == 0
    assert value(registry, "training_sidecar_last_progress_age_seconds") == 3.5
    assert value(registry, "training_sidecar_last_step") == 120
    assert value(registry, "training_sidecar_max_steps") == 400
    assert value(registry, "training_sidecar_steps_per_second") == 0.5
    assert value(registry, "training_sidecar_remaining_seconds") == 560
    assert value(registry, "training_sidecar_run_recoveries") == 2
    assert value(registry, "training_sidecar_max_restarts") == 10
    assert value(registry, "training_sidecar_quarantined_checkpoints") == 1
    assert value(registry, "training_sidecar_ready") == 1
    assert value(registry, "training_sidecar_info", mode="process", version=__version__) == 1
    views.append(snapshot(phase="stalled", last_step=121))
    assert value(registry, "training_sidecar_phase", phase="stalled") == 1
    assert value(registry, "training_sidecar_last_step") == 121


def test_unknown_values_are_absent_rather_than_zero():
    """Idle (no trainer): no step, no progress age, no speed series; phase idle."""
    registry = collector_registry(
        snapshot=lambda: snapshot(
            phase="idle", seconds_since_progress=None, last_step=None, total_steps=None
        ),
        speed=lambda: None,
    )
    assert value(registry, "training_sidecar_phase", phase="idle") == 1
    for name in ("last_step", "max_steps", "last_progress_age_seconds", "steps_per_second"):
        assert value(registry, f"training_sidecar_{name}") is None, name


def test_gpu_utilisation_per_watched_gpu_as_a_ratio():
    """Each watched GPU by its NVML index, 0-1; no series once the loop's reading is stale."""
    now = [100.0]
    tap = GpuTap(FakeGpu(GpuReading(samples=(sample(0, 97), sample(2, 3)))), clock=lambda: now[0])
    assert tap.sample() is not None  # the loop's poll
    registry = collector_registry(gpu=tap, gpu_max_age=30.0)
    assert value(registry, "training_sidecar_gpu_utilization_ratio", gpu="0") == 0.97
    assert value(registry, "training_sidecar_gpu_utilization_ratio", gpu="2") == 0.03
    assert value(registry, "training_sidecar_gpu_memory_used_bytes", gpu="2") == 20 << 30
    now[0] += 31
    assert value(registry, "training_sidecar_gpu_utilization_ratio", gpu="0") is None


def test_power_per_gpu_only_where_the_board_reports_it():
    silent = GpuSample(1, 50, 1 << 30, 80 << 30, power_watts=None)
    tap = GpuTap(FakeGpu(GpuReading(samples=(sample(0, 97), silent))))
    tap.sample()
    registry = collector_registry(gpu=tap)
    assert value(registry, "training_sidecar_gpu_power_watts", gpu="0") == 250.0
    assert value(registry, "training_sidecar_gpu_power_watts", gpu="1") is None


def test_the_stall_allowance_and_the_lost_work_bound_are_exported_while_known():
    registry = collector_registry(
        snapshot=lambda: snapshot(stall_allowance=61.0, attempt_started_at=1.8e9),
        max_lost_work=1800.0,
    )
    assert value(registry, "training_sidecar_stall_allowance_seconds") == 61.0
    assert value(registry, "training_sidecar_attempt_start_time_seconds") == 1.8e9
    assert value(registry, "training_sidecar_max_lost_work_seconds") == 1800.0
    registry = collector_registry(snapshot=lambda: snapshot(stall_allowance=None))
    exposition = generate_latest(registry).decode()
    assert "stall_allowance_seconds" not in exposition  # not watching: no series, not 0
    assert "max_lost_work_seconds" not in exposition  # SIDECAR_MAX_LOST_WORK=0: turned off


def test_no_nvml_means_no_gpu_series():
    tap = GpuTap(FakeGpu(None))
    assert tap.sample() is None
    registry = collector_registry(gpu=tap)
    assert "gpu" not in generate_latest(registry).decode()


def run_paths(output_dir: Path) -> RunPaths:
    return RunPaths(
        train_script=output_dir / "train.sh",
        output_dir=output_dir,
        trainer_workdir=output_dir,
        state_dir=output_dir / ".sidecar",
        train_log=output_dir / "train.log",
        output_name="my-lora",
        path_map=PathMap.parse(""),
    )


def test_last_checkpoint_age_skips_quarantined_and_is_cached(tmp_path):
    """The newest complete, non-quarantined state's age; rescanned only after the refresh."""
    write_state_folder(tmp_path / "my-lora-step00000006-state", mtime=1000.0)
    write_state_folder(tmp_path / "my-lora-step00000012-state", mtime=1100.0)
    monotonic = [0.0]
    age = CheckpointAge(
        settle_seconds=10, refresh=5, wall=lambda: 1500.0, monotonic=lambda: monotonic[0]
    )
    paths = run_paths(tmp_path)
    assert age.seconds(paths, []) == 400
    quarantined = [str(tmp_path / "my-lora-step00000012-state")]
    assert age.seconds(paths, quarantined) == 400, "cached within the refresh"
    monotonic[0] = 6.0
    assert age.seconds(paths, quarantined) == 500
    assert age.seconds(None, []) is None
    registry = collector_registry(paths=lambda: paths, checkpoint_age=age)
    assert value(registry, "training_sidecar_last_checkpoint_age_seconds") == 500


def test_names_and_labels_follow_prometheus_conventions(tmp_path):
    """Prefixed, snake case, base units as suffixes, _total only on counters, no percent."""
    write_state_folder(tmp_path / "my-lora-step00000006-state", mtime=1000.0)
    registry = CollectorRegistry()
    EventCounters(registry)
    PollTimer(registry).observe(0.01)
    tap = GpuTap(FakeGpu(GpuReading(samples=(sample(0, 50),))))
    tap.sample()
    paths = run_paths(tmp_path)
    registry.register(
        SnapshotCollector(
            snapshot=snapshot,
            paths=lambda: paths,
            speed=lambda: Speed(1, 2, 0.5, 2.0),
            mode="process",
            max_restarts=3,
            gpu=tap,
            checkpoint_age=CheckpointAge(settle_seconds=0),
        )
    )
    families = [
        family
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        # prometheus_client's own creation-time series (the sidecar turns them off globally)
        if not family.name.endswith("_created")
    ]
    assert len(families) >= 20
    for family in families:
        assert re.fullmatch(r"training_sidecar(_[a-z]+)+", family.name), family.name
        assert "percent" not in family.name and "millis" not in family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        else:
            assert not family.name.endswith("_total"), family.name
        if "seconds" in family.name:
            assert family.name.endswith("_seconds"), family.name
        for metric_sample in family.samples:
            assert all(re.fullmatch(r"[a-z_]+", label) for label in metric_sample.labels)


# -- the step rate ---------------------------------------------------------------------------


def test_step_rate_measures_speed_and_eta():
    rate = StepRate()
    assert rate.speed(0.0) is None
    rate.observe(0.0, 10, 100)
    assert rate.speed(1.0) == Speed(step=10, total=100, steps_per_second=None, eta_seconds=None)
    rate.observe(5.0, 15, None)
    rate.observe(10.0, 20, None)
    speed = rate.speed(10.0)
    assert speed is not None
    assert speed.steps_per_second == pytest.approx(1.0)
    assert speed.eta_seconds == pytest.approx(80.0)


def test_step_rate_decays_while_stalled_and_restarts_after_a_resume():
    """No new step: the speed falls; a step going backwards (sd-scripts resume) starts over."""
    rate = StepRate()
    rate.observe(0.0, 0, 100)
    rate.observe(10.0, 10, 100)
    stalled = rate.speed(40.0)
    assert stalled is not None and stalled.steps_per_second == pytest.approx(0.25)
    rate.observe(50.0, 1, 100)
    resumed = rate.speed(50.0)
    assert resumed is not None and resumed.step == 1 and resumed.steps_per_second is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (42, "42s"), (329, "5m29s"), (3 * 3600 + 300, "3h05m"), (50 * 3600, "2d02h")],
)
def test_durations_are_short(seconds, text):
    assert format_duration(seconds) == text


@pytest.fixture(autouse=True)
def _quiet_structlog():
    yield
    structlog.reset_defaults()


def test_the_rate_follows_the_loop_and_restarts_with_each_attempt(tmp_path: Path):
    """on_poll feeds the step rate, the poll histogram and the page's history; a new attempt
    starts a new rate."""
    from types import SimpleNamespace

    from sidecar.config import Settings
    from sidecar.surface.observability import Observability

    class FakeWatchdog:
        def __init__(self) -> None:
            self.view = snapshot(last_step=10, last_poll_seconds=0.003)
            self.paths = SimpleNamespace(state_dir=tmp_path)
            self.ledger = SimpleNamespace(run_started_at=1_800_000_000.0)

        def snapshot(self) -> dict[str, Any]:
            return self.view

    observability = Observability(Settings(log_format="json"), registry=CollectorRegistry())
    watchdog = FakeWatchdog()
    observability.watchdog = watchdog  # type: ignore[assignment]
    observability.on_poll()
    watchdog.view = snapshot(last_step=12, last_poll_seconds=0.003)
    observability.on_poll()
    speed = observability.rate.speed(time.monotonic())
    assert speed is not None and speed.step == 12 and speed.steps_per_second
    assert value(observability.registry, "training_sidecar_poll_duration_seconds_count") == 2
    assert [sample.step for sample in observability.history.view()[0]] == [10]  # 2 s apart
    watchdog.view = snapshot(phase="starting", last_step=None)  # relaunched, no step yet
    observability.on_poll()
    assert observability.rate.speed(time.monotonic()) is None
