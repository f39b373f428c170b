"""Following the trainer's log incrementally and reading its step counter."""

from __future__ import annotations

import os

from sidecar.observe.log_follower import LogFollower
from sidecar.observe.progress import parse_epoch, parse_step

BAR = "steps:  33%|███▎      | {step}/30 [08:04<16:08, 48.44s/it, avr_loss=0.407]"


def test_parses_the_tqdm_step_bar():
    """The steps bar gives N/M; other bars (caching) do not count."""
    assert parse_step(BAR.format(step=10)).step == 10
    assert parse_step(BAR.format(step=10)).total == 30
    assert parse_step("caching latents: 100%|██████████| 20/20 [00:03<00:00]") is None
    assert parse_step("epoch 2/16") is None


def test_takes_the_last_bar_of_a_carriage_return_stream():
    """tqdm rewrites the line with \\r; the newest update wins."""
    text = "\r" + "\r".join(BAR.format(step=s) for s in (1, 2, 3))
    assert parse_step(text).step == 3


def test_epoch_banner():
    """`epoch 2/16` banners are recognised."""
    assert parse_epoch("epoch 2/16") == (2, 16)
    assert parse_epoch("epoch two") is None


def test_reads_only_what_was_appended(tmp_path):
    """Each poll sees the new bytes and the latest step."""
    log = tmp_path / "train.log"
    log.write_text("loading model\n")
    follower = LogFollower(log)
    assert follower.poll().grew
    assert not follower.poll().grew
    with log.open("a") as handle:
        handle.write("\r" + BAR.format(step=4))
    delta = follower.poll()
    assert delta.grew and delta.progress.step == 4
    with log.open("a") as handle:
        handle.write("\r" + BAR.format(step=5))
    assert follower.poll().progress.step == 5


def test_start_at_end_ignores_earlier_output(tmp_path):
    """Output of an earlier run is not new progress."""
    log = tmp_path / "train.log"
    log.write_text(BAR.format(step=29))
    follower = LogFollower(log)
    follower.start_at_end()
    assert not follower.poll().grew


def test_truncated_log_is_followed_from_the_start(tmp_path):
    """A log that shrank (rotated or truncated) is read again from offset 0."""
    log = tmp_path / "train.log"
    log.write_text("x" * 1000)
    follower = LogFollower(log)
    follower.poll()
    log.write_text(BAR.format(step=2))
    delta = follower.poll()
    assert delta.grew and delta.progress.step == 2


def test_missing_log_is_no_growth(tmp_path):
    """Before the trainer wrote anything, there is simply no growth."""
    assert not LogFollower(tmp_path / "none.log").poll().grew


def test_large_backlog_reads_only_the_tail(tmp_path):
    """A huge append is not read whole; the newest step still comes through."""
    log = tmp_path / "train.log"
    follower = LogFollower(log, max_read_bytes=4096)
    with log.open("w") as handle:
        handle.write("x" * 5_000_000 + "\r" + BAR.format(step=17))
    delta = follower.poll()
    assert delta.new_bytes > 5_000_000
    assert delta.progress.step == 17


def test_poll_cost_does_not_grow_with_the_log(tmp_path):
    """A poll after a 1-byte append reads one byte, however big the log is."""
    log = tmp_path / "train.log"
    with log.open("wb") as handle:
        handle.truncate(2 * 1024**3)  # sparse 2 GB
    follower = LogFollower(log)
    follower.start_at_end()
    with log.open("ab") as handle:
        handle.write(b"x")
    delta = follower.poll()
    assert delta.new_bytes == 1
    assert os.path.getsize(log) == 2 * 1024**3 + 1
