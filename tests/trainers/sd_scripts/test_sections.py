"""sd-scripts' sections, from output shaped exactly as it writes it into a file.

Rich's records (stderr, 80 columns when not on a terminal) as sd-scripts wrote them with rich
14.1: the time (19 spaces when the second repeats), the level padded to 8, the message wrapped
at word boundaries, the source right-aligned on the first row. tqdm redraws with ``\\r`` and a
record can be glued after a bar on the same line. Prints (stdout) come without a prefix.
"""

from __future__ import annotations

import pytest

from sidecar.decide.sections import Section
from sidecar.trainers.sd_scripts.sections import section_at_end

BAR = "\rsteps:  50%|█████     | 20/40 [00:10<00:10,  1.98it/s, avr_loss=0.412]"
SAMPLE = (
    "                    INFO     generating sample images at  flux_train_utils.py:61\n"
    "                             step / サンプル画像生成                            \n"
    "                             ステップ: 20                                       \n"
    "                    INFO     prompt: a photo of sks dog  flux_train_utils.py:182\n"
)
SAVE = "2026-12-01 12:17:31 INFO     saving state at step 20          train_util.py:5964\n"
LAST_SAVE = "                    INFO     saving last state.               train_util.py:5990\n"
CACHING = (
    "                    INFO     caching Text Encoder outputs     train_util.py:1306\n"
    "                             with caching strategy.                             \n"
)
WORKER = (
    "                    INFO     epoch is incremented.             train_util.py:784\n"
    "                             current_epoch: 0, epoch: 2                         \n"
)


@pytest.mark.parametrize(
    ("text", "section"),
    [
        (BAR, Section.TRAINING),
        (BAR + "\n" + SAMPLE, Section.SAMPLING),
        # A record glued after the bar it interrupted.
        (BAR + SAVE, Section.SAVING),
        (LAST_SAVE, Section.SAVING),
        (
            "\nsaving checkpoint: /app/fluxgym/outputs/my-lora/my-lora-000004.safetensors\n",
            Section.SAVING,
        ),
        # The epoch's batches begin (the banner itself comes late: stdout is buffered).
        (WORKER, Section.TRAINING),
        (CACHING, Section.STARTUP),
        # The denoising bar of a sample has no description: still sampling.
        (SAMPLE + "\r 45%|████▌     | 9/20 [00:04<00:05,  2.10it/s]", Section.SAMPLING),
        # After the save, the step bar's postfix is redrawn: training again.
        (BAR + SAVE + BAR, Section.TRAINING),
    ],
)
def test_the_last_announcement_is_the_section(text, section):
    assert section_at_end(text) is section


@pytest.mark.parametrize(
    "text",
    [
        "",
        "                    INFO     prompt: saving state at step 5 flux_train_utils.py:182\n",
        "                    INFO     prompt: generating sample images at dawn, epoch 3/16\n",
        "a line that mentions steps:  10%| somewhere in the middle\n",
        "validation steps:  10%|█         | 1/10 [00:01<00:09,  1.00it/s]",
        "  num epochs / epoch数: 16\n",
        # Held in stdout's buffer until a sample's bar: it says nothing about now.
        "\nepoch 3/16\n\n",
    ],
)
def test_lookalikes_inside_messages_are_not_sections(text):
    """A prompt, a caption or a validation bar that happens to hold a marker's words."""
    assert section_at_end(text) is None


def test_a_log_full_of_markers_costs_little():
    """Polling a burst of output stays cheap: 10,000 records read in well under a second."""
    import time

    burst = (SAVE + BAR + SAMPLE) * 3_000
    started = time.perf_counter()
    assert section_at_end(burst) is Section.SAMPLING
    assert time.perf_counter() - started < 2.0
