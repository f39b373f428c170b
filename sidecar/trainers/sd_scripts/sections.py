"""What sd-scripts says it is doing, from its console output (no code changes to it).

Read from sd-scripts itself (kohya-ss/sd-scripts ``sd3``, 3265f2ed; ``main`` 48d368fa has the
same tree):

- sampling: ``flux_train_utils.sample_images`` logs "generating sample images at step /
  サンプル画像生成 ステップ: N" (flux_train_utils.py:61), then per prompt "prompt: ..." (182)
  and a denoising bar with no description; ``train_util.sample_images_common`` (SD/SDXL) logs
  the same words;
- saves: ``train_util.save_and_remove_state_stepwise`` / ``_on_epoch_end`` /
  ``save_state_on_train_end`` log "saving state at step N" / "saving state at epoch N" /
  "saving last state." (train_util.py:5964, 5942, 5990) before ``accelerator.save_state``,
  which logs "Saving current state to ..." (accelerate accelerator.py:3241);
  ``train_network.save_model`` prints "saving checkpoint: <path>" (train_network.py:1300,
  stdout);
- epoch boundaries: "epoch N/M" (train_network.py:1402, stdout: buffered, see below, so not
  used) and each dataloader worker's "epoch is incremented. current_epoch: a, epoch: b"
  (train_util.py:784) when it starts the epoch's batches (training again);
- start-up: "Loading state dict from ..." (flux_utils.py), "caching latents..."
  (train_util.py:1170), "caching Text Encoder outputs..." (1348), "checking cache
  validity..." (1317), "prepare optimizer, data loader etc." (train_network.py:730);
- training: the tqdm bar described "steps" (train_network.py:1357) redrawn.

Its logger writes through rich to stderr, prefixed with a time and a level and wrapped at 80
columns when not on a terminal: the words matched here all fall within a record's first row.
Its prints (stdout) are block-buffered under ``accelerate launch`` when redirected, so "epoch
N/M" and "saving checkpoint:" can arrive late; the logger's lines arrive at once. What is said
last in a stretch of output is what the trainer is doing now.
"""

from __future__ import annotations

import re

from sidecar.decide.sections import Section

# Where a message begins: a line's start (a print), or a rich record's message column, which
# may follow a bar drawn on the same line. A marker inside a message ("prompt: saving ...") is
# not one. Rich wraps messages at 80 columns: only the words of a record's first row are used.
_START = (
    r"(?:^|(?<=[\r\n\]]))"
    r"(?:(?:\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}| {19}) (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +)?"
)
_MARKERS: tuple[tuple[Section, re.Pattern[str]], ...] = tuple(
    (section, re.compile(_START + f"(?:{words})", re.MULTILINE))
    for section, words in (
        (Section.SAMPLING, r"generating sample images at\b"),
        (
            Section.SAVING,
            r"saving state at (?:step|epoch) \d+|saving last state\.|saving checkpoint: "
            r"|Saving current state to\b",
        ),
        (
            Section.STARTUP,
            r"Loading state dict from\b|caching latents|caching Text Encoder outputs"
            r"|checking cache validity|prepare optimizer, data loader etc\.",
        ),
    )
)
# Back to training: a redraw of the step bar, or a dataloader worker starting the epoch's
# batches ("epoch is incremented.", logged, so timely). The "epoch N/M" banner is not used:
# it is a print, held in stdout's buffer until the next tqdm bar is created (a sample's
# denoising bar) — it arrives during sampling, long after the epoch began.
_TRAINING = re.compile(
    r"(?:^|(?<=[\r\n]))steps:\s+\d+%\||" + _START + r"epoch is incremented\.", re.MULTILINE
)


def section_at_end(text: str) -> Section | None:
    """The section the trainer announced last in ``text`` (None: nothing recognised)."""
    best: tuple[int, Section] | None = None
    for section, pattern in _MARKERS:
        for match in pattern.finditer(text):
            if best is None or match.start() > best[0]:
                best = (match.start(), section)
    for match in _TRAINING.finditer(text):
        if best is None or match.start() > best[0]:
            best = (match.start(), Section.TRAINING)
    return best[1] if best else None
