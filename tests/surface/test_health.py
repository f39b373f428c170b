"""The heartbeat: the loop's writer and the age rule liveness, healthcheck and status read."""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from sidecar import events
from sidecar.surface.health import Health, Heartbeat, heartbeat_allowance


def heartbeat(path: Path, now: list[float]) -> Heartbeat:
    # poll 2 s, grace 30 s: 3 * 2 + 30 + 60 = 96 s allowed
    return Heartbeat(path, poll_interval=2, kill_grace=30, clock=lambda: now[0])


def test_the_allowance_covers_three_polls_a_kill_grace_and_a_minute():
    assert heartbeat_allowance(2, 30) == 96
    assert heartbeat_allowance(0.5, 2) == 63.5
    assert Heartbeat(Path("beat"), poll_interval=2, kill_grace=30).allowance == 96


def test_a_missing_heartbeat_is_unhealthy(tmp_path: Path):
    beat = tmp_path / "beat"
    assert heartbeat(beat, [0.0]).health() == Health(False, f"no heartbeat at {beat} yet")


def test_health_follows_the_file_age_on_the_injected_clock(tmp_path: Path):
    beat = tmp_path / "beat"
    beat.touch()
    os.utime(beat, (1000.0, 1000.0))
    now = [1000.5]
    watch = heartbeat(beat, now)
    assert watch.health() == Health(True, "last heartbeat 0.5 s ago")
    now[0] = 1096.0
    assert watch.health().ok, "exactly the allowance is still healthy"
    now[0] = 1097.0
    assert watch.health() == Health(False, "last heartbeat 97 s ago (allowed 96 s)")


def test_an_explicit_now_overrides_the_clock(tmp_path: Path):
    """``status`` reads the heartbeat at the moment its whole report describes."""
    beat = tmp_path / "beat"
    beat.touch()
    os.utime(beat, (1000.0, 1000.0))
    watch = heartbeat(beat, [5000.0])
    assert watch.health(now=1010.0) == Health(True, "last heartbeat 10.0 s ago")


def test_beat_refreshes_what_health_reads(tmp_path: Path):
    beat = tmp_path / "beat"
    watch = Heartbeat(beat, poll_interval=2, kill_grace=30)
    watch.beat()
    assert beat.is_file()
    os.utime(beat, (1000.0, 1000.0))
    watch.beat()
    assert beat.stat().st_mtime > 1000.0
    assert watch.health().ok


def test_a_failing_beat_is_logged_once_and_never_raises(tmp_path: Path):
    """A read-only or missing folder: one warning with the path, not one per poll."""
    beat = tmp_path / "missing-folder" / "beat"
    watch = Heartbeat(beat, poll_interval=2, kill_grace=30, log=structlog.get_logger())
    with capture_logs() as logs:
        watch.beat()
        watch.beat()
    assert [entry["event"] for entry in logs] == [events.HEARTBEAT_FAILED]
    assert logs[0]["path"] == str(beat)
    assert logs[0]["log_level"] == "warning"
    assert "No such file" in logs[0]["error"]
    assert not watch.health().ok
