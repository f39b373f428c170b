"""Following the trainer's log incrementally, the one tqdm parser, and sd-scripts' step counter."""

from __future__ import annotations

import os

import pytest

from sidecar.observe.log_follower import LogFollower
from sidecar.observe.progress import last_bar, tqdm_bars
from sidecar.trainers.sd_scripts.progress_lines import parse_epoch, parse_step

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


def test_one_tqdm_parser_reads_every_field_of_a_bar():
    """Description, n/total, elapsed<remaining and the rate, whichever way tqdm printed it."""
    (slow,) = tqdm_bars(BAR.format(step=10))
    assert (slow.description, slow.n, slow.total) == ("steps", 10, 30)
    assert (slow.elapsed_seconds, slow.remaining_seconds) == (8 * 60 + 4, 16 * 60 + 8)
    assert slow.rate == pytest.approx(1 / 48.44)
    (fast,) = tqdm_bars("caching latents:  50%|█████     | 10/20 [00:03<00:03,  3.10it/s]")
    assert (fast.description, fast.rate) == ("caching latents", pytest.approx(3.10))
    (unnamed,) = tqdm_bars(" 40%|████      | 4/10 [1:02:03<?, ?it/s]")
    assert unnamed.description == ""
    assert (unnamed.elapsed_seconds, unnamed.remaining_seconds, unnamed.rate) == (3723, None, None)


def test_a_bar_is_picked_by_its_exact_description():
    """ "validation steps" is not "steps"; a bar cut right after its total is not taken."""
    text = "\r" + BAR.format(step=7) + "\rvalidation " + BAR.format(step=2) + "\rsteps: 1%|| 8/3"
    bar = last_bar(text, "steps")
    assert bar is not None and (bar.n, bar.total) == (7, 30)
    assert last_bar(text, "epochs") is None


def test_noise_that_looks_like_a_bar_never_raises():
    """A cut or mangled clock or rate reads as unknown, not as an error."""
    (bar,) = tqdm_bars("steps: 1%|| 1/2 [0<:, 1.2.3it/s]")
    assert (bar.n, bar.total, bar.remaining_seconds, bar.rate) == (1, 2, None, None)


def test_the_follower_reads_the_step_bar_it_is_given(tmp_path):
    """Another trainer's step counter bar: the follower takes the reader, not sd-scripts'."""
    log = tmp_path / "train.log"
    log.write_text("\r" + BAR.format(step=4) + "\rtraining: 10%|█| 12/120 [00:10<01:30, 1.2it/s]")
    delta = LogFollower(log, step_bar=lambda text: last_bar(text, "training")).poll()
    assert (delta.progress.step, delta.progress.total) == (12, 120)
