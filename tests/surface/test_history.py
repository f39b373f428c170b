"""The chart's history: bounded however long the run, written atomically, read back after a
restart, and never lost to a file it cannot read."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from sidecar import events
from sidecar.surface.history import (
    HISTORY_FILE,
    PREVIOUS_RUN_FILE,
    History,
    HistoryMarks,
    Sample,
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(at: float, step: int | None = 1, gpu: float | None = 97.0) -> Sample:
    return Sample(at=at, step=step, total=400, gpu_percent=gpu, power_watts=250.0)


def test_three_days_of_polls_stay_bounded_and_keep_the_whole_span(tmp_path: Path) -> None:
    clock = Clock()
    history = History(clock=clock, flush_every=0)
    history.follow(tmp_path)
    start = clock.now
    for poll in range(3 * 24 * 3600 // 2):  # a poll every 2 s for three days
        clock.now = start + 2 * poll + 0.123456789  # time.time()'s digits
        history.append(sample(clock.now, step=poll, gpu=97.333333333))
        if poll % 600 == 0:
            history.mark("restart", "x" * 300)  # longer texts are cut to 300 characters
    history.flush(force=True)

    samples, _ = history.view()
    assert 720 <= len(samples) <= 1440
    assert samples[0].at - start < 600, "the beginning of the run is still there"
    assert clock.now - samples[-1].at < 600, "and its end"
    gaps = {round(b.at - a.at) for a, b in itertools.pairwise(samples)}
    assert max(gaps) <= 2 * min(gaps), f"evenly thinned, not a hole: {sorted(gaps)[:5]}"
    assert len(history.view()[1]) == 200, "the newest 200 marks"
    size = (tmp_path / HISTORY_FILE).stat().st_size
    assert size < 150_000, f"the file stays small: {size} bytes"


def test_samples_closer_than_the_spacing_are_dropped(tmp_path: Path) -> None:
    history = History(spacing=5.0, clock=Clock())
    history.follow(tmp_path)
    for at in (0.0, 1.0, 4.9, 5.0, 7.0, 10.5):
        history.append(sample(1_800_000_000.0 + at))
    assert [s.at - 1_800_000_000.0 for s in history.view()[0]] == [0.0, 5.0, 10.5]


def test_it_survives_a_restart_of_the_sidecar(tmp_path: Path) -> None:
    clock = Clock()
    first = History(clock=clock)
    first.follow(tmp_path)
    first.append(sample(clock.now, step=10))
    first.mark("stall", "stall detected; diagnosis: dataloader_wait")
    first.flush(force=True)

    again = History(clock=clock)
    again.mark("interrupted", "run interrupted; how: sigterm")  # logged before the first poll
    again.follow(tmp_path)
    samples, marks = again.view()
    assert [s.step for s in samples] == [10]
    assert [m.kind for m in marks] == ["stall", "interrupted"]


def test_it_is_written_at_most_every_flush_interval_and_atomically(tmp_path: Path) -> None:
    clock = Clock()
    history = History(clock=clock, flush_every=30.0)
    history.follow(tmp_path)
    history.append(sample(clock.now))
    history.flush()
    assert not (tmp_path / HISTORY_FILE).exists(), "not due yet"
    clock.now += 31
    history.flush()
    written = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert len(written["samples"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [HISTORY_FILE], "no temporary file left"


def test_an_unreadable_file_is_set_aside_not_deleted(tmp_path: Path) -> None:
    clock = Clock()
    for bad in ('{"format": 1, "samples": [[1, 2]]', '{"format": 1, "samples": []}'):
        (tmp_path / HISTORY_FILE).write_text(bad)
        history = History(clock=clock)
        with capture_logs() as logs:
            history.follow(tmp_path)
        assert history.view() == ([], [])
        assert logs[0]["event"] == events.HISTORY_UNREADABLE
        assert Path(logs[0]["kept_as"]).read_text() == bad
        clock.now += 1
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [
        "history.json.unreadable-20270115T080000Z",
        "history.json.unreadable-20270115T080001Z",
    ], "a second bad file does not replace the first"


@pytest.mark.parametrize(
    "values",
    [
        {"spacing": float("nan")},
        {"spacing": 1e9},
        {"samples": [[1e300, 1, 2, 3, 4]]},
        {"samples": [[1_800_000_000, 1, 2, float("inf"), 4]]},
        {"marks": [[-5, "stall", "x"]]},
    ],
)
def test_values_no_sidecar_writes_are_refused_not_drawn(tmp_path: Path, values: dict) -> None:
    good = {"format": 1, "run": None, "spacing": 2.0, "samples": [], "marks": []}
    (tmp_path / HISTORY_FILE).write_text(json.dumps({**good, **values}))
    history = History(clock=Clock())
    history.follow(tmp_path)
    assert history.view() == ([], [])
    assert not (tmp_path / HISTORY_FILE).exists(), "set aside"


def test_a_new_run_of_the_same_name_starts_a_new_chart(tmp_path: Path) -> None:
    clock = Clock()
    history = History(clock=clock)
    history.follow(tmp_path, run="1800000000.0")
    history.append(sample(clock.now, step=400))
    history.mark("completed", "training completed")
    history.follow(tmp_path, run="1800009999.0")  # FluxGym's Start again, same LoRA name
    assert history.view() == ([], [])
    previous = json.loads((tmp_path / PREVIOUS_RUN_FILE).read_text())
    assert previous["run"] == "1800000000.0" and previous["marks"][0][1] == "completed"
    # A sidecar started later reads the new run's file, not the old one's.
    history.append(sample(clock.now + 10, step=1))
    history.flush(force=True)
    again = History(clock=clock)
    again.follow(tmp_path, run="1800009999.0")
    assert [s.step for s in again.view()[0]] == [1]


def test_the_newest_sample_survives_thinning_and_a_clock_step_back_is_kept(
    tmp_path: Path,
) -> None:
    for size in (4, 5):
        history = History(max_samples=size, spacing=1.0, clock=Clock())
        history.follow(tmp_path / str(size))
        for at in range(size + 1):
            history.append(sample(1_800_000_000.0 + at, step=at))
        assert history.view()[0][-1].step == size, size
    history.append(sample(1_700_000_000.0, step=99))  # NTP stepped the clock back
    assert history.view()[0][-1].step == 99


def test_following_another_run_writes_the_first_and_starts_the_second(tmp_path: Path) -> None:
    clock = Clock()
    history = History(clock=clock)
    history.follow(tmp_path / "a")
    history.append(sample(clock.now, step=3))
    history.follow(tmp_path / "b")
    assert history.view() == ([], [])
    assert json.loads((tmp_path / "a" / HISTORY_FILE).read_text())["samples"][0][1] == 3


def test_the_events_that_change_a_run_leave_marks() -> None:
    history = History(clock=Clock())
    structlog.configure(processors=[HistoryMarks(history), structlog.testing.LogCapture()])
    try:
        log = structlog.get_logger()
        log.info(events.STALL_DETECTED, diagnosis="cuda_sync", reason="no progress for 61 s")
        log.info(events.TRAINING_PROGRESSING, step=3)
        log.info(events.TRAINER_RESTARTED, reason="stall", checkpoint="/o/a-state")
        log.info(events.TRAINING_COMPLETED, reason="final model present")
    finally:
        structlog.reset_defaults()
    marks = history.view()[1]
    assert [m.kind for m in marks] == ["stall", "restart", "completed"]
    assert marks[0].text == "stall detected; diagnosis: cuda_sync; reason: no progress for 61 s"
    assert "checkpoint: /o/a-state" in marks[1].text
