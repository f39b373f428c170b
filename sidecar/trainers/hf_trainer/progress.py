"""What the HF Trainer says on its console: its step bar, the schedule, the resume.

Read from transformers (``src/transformers/trainer_callback.py``, ``trainer.py``):

- ``ProgressCallback.on_train_begin`` opens the step bar as ``tqdm(total=state.max_steps,
  dynamic_ncols=True)``: no description. ``on_prediction_step`` opens evaluation bars with
  no description either, whose total is the evaluation dataloader's length; so the step bar
  is the last undescribed bar whose total is the run's ``max_steps`` (from "Total
  optimization steps = N" when it was printed, else the largest undescribed total seen).
- ``Trainer._inner_training_loop`` logs, at INFO (seen only with ``TRANSFORMERS_VERBOSITY=info``
  or a script that sets ``transformers.logging.set_verbosity_info()``; the default is WARNING):
  "  Num update steps per epoch = N" (5.x), "  Gradient Accumulation steps = N",
  "  Total optimization steps = N" (with thousands separators), and on a resume
  5.x: "  Resuming training from checkpoint with epoch E and global step G" and
  "  Fast-forwarding the dataloader past E epochs and S batches ...";
  4.x: "  Continuing training from checkpoint, will skip to saved global_step",
  "  Continuing training from global step G", "  Will skip the first E epochs then the
  first S batches in the first epoch.". ``_load_from_checkpoint`` logs "Loading model from
  <checkpoint>." on both.
- ``Trainer._save`` logs "Saving model checkpoint to <dir>" (INFO), the start of a save.
"""

from __future__ import annotations

import re

from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar, tqdm_bars
from sidecar.trainers.base import StartupReport

__all__ = ["read_startup", "section_at_end", "step_bar"]

_NUMBER = r"(\d[\d,]*)"
_TOTAL_STEPS = re.compile(r"Total optimization steps = " + _NUMBER)
_STEPS_PER_EPOCH = re.compile(r"Num update steps per epoch = " + _NUMBER)
_ACCUMULATION = re.compile(r"Gradient Accumulation steps = " + _NUMBER)
_LOADING = re.compile(r"Loading model from (.+?)\.?[ \t]*$", re.MULTILINE)
_RESUMED_5 = re.compile(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)")
_RESUMED_4 = re.compile(r"Continuing training from global step (\d+)")
_RESUMING_4 = "Continuing training from checkpoint, will skip to saved global_step"
_SKIPPED_5 = re.compile(r"Fast-forwarding the dataloader past (\d+) epochs and (\d+) batches")
_SKIPPED_4 = re.compile(r"Will skip the first (\d+) epochs then the first (\d+) batches")
_SAVING = re.compile(r"Saving model checkpoint to ")
_TRAINING = re.compile(r"\*\*\*\*\* Running training \*\*\*\*\*")


def step_bar(text: str) -> TqdmBar | None:
    """The last redraw of the training step bar in ``text``."""
    bars = [bar for bar in tqdm_bars(text) if bar.description == ""]
    if not bars:
        return None
    total = _last_number(_TOTAL_STEPS, text) or max(bar.total for bar in bars)
    matching = [bar for bar in bars if bar.total == total]
    return matching[-1] if matching else None


def read_startup(text: str) -> StartupReport:
    """The schedule and the resume, as far as ``text`` says them."""
    resumed_step = _last_number(_RESUMED_5, text) or _last_number(_RESUMED_4, text)
    loading = _LOADING.findall(text)
    skipped = _SKIPPED_5.findall(text) or _SKIPPED_4.findall(text)
    return StartupReport(
        steps_per_epoch=_last_number(_STEPS_PER_EPOCH, text),
        gradient_accumulation=_last_number(_ACCUMULATION, text),
        total_steps=_last_number(_TOTAL_STEPS, text),
        resumed_from=loading[-1].strip() if loading else None,
        train_state_loaded=resumed_step is not None or _RESUMING_4 in text,
        skipped_steps=int(skipped[-1][1]) if skipped else None,
    )


def section_at_end(text: str) -> Section | None:
    """What the Trainer did last in ``text``: saving, training, or starting up (None when
    it said nothing this knows)."""
    marks = []
    for pattern, section in (
        (_SAVING, Section.SAVING),
        (_TRAINING, Section.TRAINING),
        (_LOADING, Section.STARTUP),
    ):
        found = list(pattern.finditer(text))
        if found:
            marks.append((found[-1].start(), section))
    bar = _last_bar_offset(text)
    if bar is not None:
        marks.append((bar, Section.TRAINING))
    return max(marks)[1] if marks else None


def _last_bar_offset(text: str) -> int | None:
    # A redraw starts after \r; the last one's offset is where training was last seen.
    at = text.rfind("\r")
    if at < 0 or step_bar(text[at:]) is None:
        return None
    return at


def _last_number(pattern: re.Pattern[str], text: str) -> int | None:
    found = pattern.findall(text)
    if not found:
        return None
    value = found[-1]
    return int((value if isinstance(value, str) else value[0]).replace(",", ""))
