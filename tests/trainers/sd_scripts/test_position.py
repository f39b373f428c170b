"""sd-scripts' resume position rules (train_network.py, sd3 == main 48d368f), as pure code."""

from __future__ import annotations

import pytest

from sidecar.trainers.sd_scripts import position
from sidecar.trainers.sd_scripts.position import (
    absolute_step,
    attempt_offset,
    initial_step_of,
    plan_position,
    startup_report,
)

# sd-scripts' own start-up block and resume lines, verbatim in shape.
STARTUP = """\
INFO     resume training from local state: /app/fluxgym/outputs/my-lora/my-lora-step00000005-state
INFO     load train state from /app/fluxgym/outputs/my-lora/my-lora-step00000005-state/train_state.json: {'current_epoch': 3, 'current_step': 5}
WARNING  steps from the state is ignored because initial_step is specified / initial_stepが指定されているため、stateからのステップ数は無視されます
running training / 学習開始
  num train images * repeats / 学習画像の数×繰り返し回数: 80
  num batches per epoch / 1epochのバッチ数: 8
  num epochs / epoch数: 4
  gradient accumulation steps / 勾配を合計するステップ数 = 1
  total optimization steps / 学習ステップ数: 32
INFO     skipping 21 steps / 21ステップをスキップします
"""  # noqa: E501


def test_initial_step_wins_over_initial_epoch_which_wins_over_the_state() -> None:
    """--initial_step, else (--initial_epoch - 1) * steps per epoch, else current_step."""
    common = {"steps_per_epoch": 8}
    assert initial_step_of(initial_step=21, initial_epoch=3, steps_from_state=5, **common) == 21
    assert initial_step_of(initial_step=None, initial_epoch=3, steps_from_state=5, **common) == 16
    assert initial_step_of(initial_step=None, initial_epoch=None, steps_from_state=5, **common) == 5
    assert (
        initial_step_of(initial_step=None, initial_epoch=None, steps_from_state=None, **common) == 0
    )


def test_an_attempts_step_zero_sits_at_its_first_whole_epoch() -> None:
    """epoch_to_start = initial // steps per epoch: 21 -> epoch 2 -> step 16."""
    assert attempt_offset(21, 8) == 16
    assert attempt_offset(16, 8) == 16
    assert attempt_offset(0, 8) == 0


def test_absolute_step_across_three_recoveries() -> None:
    """The bug: from the second resume on current_step is relative. Attempt 1 saves at 5 (abs
    5). Attempt 2 starts at 5 (skip: global_step 5), saves current_step 13 (abs 13). Attempt 3
    starts at 13 (epoch 1, global_step 5), saves current_step 10: abs 8 + 10 = 18."""
    assert absolute_step(5, attempt_initial_step=0, steps_per_epoch=8) == 5
    assert absolute_step(13, attempt_initial_step=5, steps_per_epoch=8) == 13
    assert absolute_step(10, attempt_initial_step=13, steps_per_epoch=8) == 18
    # Without the ledger, sd-scripts itself would start the next attempt at 10: 8 steps early.


def test_plan_uses_the_writers_offset_and_says_why() -> None:
    step, why = plan_position(
        state_step=10,
        state_kind="step",
        state_number=10,
        writer_initial_step=13,
        steps_per_epoch=8,
        gradient_accumulation=1,
    )
    assert step == 18 and "8 before the attempt" in why


def test_plan_falls_back_on_the_folder_name_when_train_state_is_unreadable() -> None:
    """A step state is named by the same global_step; an epoch state ends its epoch."""
    step, why = plan_position(
        state_step=None,
        state_kind="step",
        state_number=6,
        writer_initial_step=0,
        steps_per_epoch=None,
        gradient_accumulation=None,
    )
    assert step == 6 and "folder" in why
    step, _ = plan_position(
        state_step=None,
        state_kind="epoch",
        state_number=3,
        writer_initial_step=13,
        steps_per_epoch=8,
        gradient_accumulation=1,
    )
    assert step == 24


@pytest.mark.parametrize(
    ("accumulation", "per_epoch", "writer"),
    [(2, 8, 0), (None, None, 13)],
)
def test_plan_refuses_to_guess(accumulation, per_epoch, writer) -> None:
    """Accumulation above 1 (sd-scripts mixes units) or an unknown steps-per-epoch behind a
    non-zero offset: no exact position, and the reason says why."""
    step, why = plan_position(
        state_step=4,
        state_kind="step",
        state_number=4,
        writer_initial_step=writer,
        steps_per_epoch=per_epoch,
        gradient_accumulation=accumulation,
    )
    assert step is None and why


def test_the_startup_block_is_read() -> None:
    """Steps per epoch, accumulation, total, the state loaded and the steps skipped."""
    report = startup_report(STARTUP)
    assert (report.steps_per_epoch, report.gradient_accumulation, report.total_steps) == (8, 1, 32)
    assert report.resumed_from == ("/app/fluxgym/outputs/my-lora/my-lora-step00000005-state")
    assert report.train_state_loaded and report.skipped_steps == 21


def test_lines_that_only_look_alike_are_not_read() -> None:
    """A prompt or a caption mentioning the words is not the start-up block."""
    noise = "prompt: num batches per epoch 99, skipping steps, resume training from memory\n"
    report = startup_report(noise)
    assert report == position.StartupReport()


# rich 14.1's RichHandler at 80 columns (sd-scripts' setup_logging, stderr redirected to a file),
# captured byte for byte: the resume lines are wrapped, and the state's path is folded.
RICH_80 = (
    "2026-12-01 12:58:16 INFO     resume training from local       train_util.py:4777\n"
    "                             state:                                             \n"
    "                             /app/fluxgym/outputs/my-lora/my-                   \n"
    "                             lora-step00000018-state                            \n"
    "                    INFO     load train state from          train_network.py:969\n"
    "                             /app/fluxgym/outputs/my-lora/m                     \n"
    "                             y-lora-step00000018-state/trai                     \n"
    "                             n_state.json:                                      \n"
    "                             {'current_epoch': 5,                               \n"
    "                             'current_step': 18}                                \n"
    "                    INFO     skipping 18 steps /           train_network.py:1265\n"
    "                             18ステップをスキップします                         \n"
)


def test_resume_lines_are_read_from_records_rich_wrapped_at_80_columns():
    report = startup_report(RICH_80)
    assert report.resumed_from == "/app/fluxgym/outputs/my-lora/my-lora-step00000018-state"
    assert report.train_state_loaded
    assert report.skipped_steps == 18


def test_records_glued_after_a_bar_and_prints_pass_through_unwrap():
    from sidecar.trainers.sd_scripts.rich_log import unwrap

    glued = "\rsteps:  50%|█████     | 2/4 [00:00<00:00]" + RICH_80.splitlines(keepends=True)[0]
    glued += "".join(RICH_80.splitlines(keepends=True)[1:4]) + "epoch 2/4\n"
    unwrapped = unwrap(glued).split("\n")
    assert unwrapped[0].endswith(
        "INFO     resume training from local state: "
        "/app/fluxgym/outputs/my-lora/my-lora-step00000018-state"
    )
    assert unwrapped[0].startswith("\rsteps:  50%")
    assert unwrapped[1] == "epoch 2/4"
