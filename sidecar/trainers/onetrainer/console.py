"""What OneTrainer's console output says: its step bar, where it resumed, what it is doing.

Read from Nerogar/OneTrainer ``modules/trainer/GenericTrainer.py``:

- ``train``: two tqdm bars on stderr, ``tqdm(epochs, desc="epoch")`` (n/epochs) and
  ``tqdm(..., desc="step", total=current_epoch_length, initial=train_progress.epoch_step)``,
  whose count is the step *within the epoch* and whose total is the epoch's length;
  validation has its own ``validation_step`` bar;
- ``start``: ``print(f"Continuing training from backup '{last_backup_path}'...")`` or
  ``print("No backup found, continuing without backup...")`` (stdout);
- ``__backup``: ``tqdm.write("Creating Backup " + backup_path)``; ``__save`` and ``end``:
  ``"Saving " + save_path``.

Its prints go to stdout, which Python buffers when it is not a terminal: launch it with
``PYTHONUNBUFFERED=1`` for these lines to arrive when they are said.
"""

from __future__ import annotations

import re

from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar, last_bar, tqdm_bars
from sidecar.trainers.base import StartupReport

__all__ = ["EPOCH_BAR", "STEP_BAR", "section_at_end", "startup_report", "step_bar"]

STEP_BAR = "step"
EPOCH_BAR = "epoch"
_CONTINUING = re.compile(r"^Continuing training from backup '(?P<path>.*)'\.\.\.\s*$", re.M)
_NO_BACKUP = re.compile(r"^No backup found, continuing without backup\.\.\.", re.M)
_START = r"(?:^|(?<=[\r\n]))"
_MARKERS: tuple[tuple[Section, re.Pattern[str]], ...] = (
    (Section.SAVING, re.compile(_START + r"(?:Creating Backup |Saving )\S", re.M)),
    (
        Section.STARTUP,
        re.compile(_START + r"(?:Continuing training from backup |No backup found, )", re.M),
    ),
    (Section.EPOCH, re.compile(_START + r"epoch:\s+\d+%\|")),
    (Section.TRAINING, re.compile(_START + r"step:\s+\d+%\|")),
)


def step_bar(text: str) -> TqdmBar | None:
    """The last redraw of the step bar (its count restarts at 0 every epoch)."""
    return last_bar(text, STEP_BAR)


def startup_report(text: str) -> StartupReport:
    """The backup it said it continues from, and the schedule's shape its bars show."""
    continuing = None
    for match in _CONTINUING.finditer(text):
        continuing = match["path"]
    steps = epochs = None
    for bar in tqdm_bars(text):
        if bar.description == STEP_BAR:
            steps = bar.total
        elif bar.description == EPOCH_BAR:
            epochs = bar.total
    return StartupReport(
        steps_per_epoch=steps or None,
        total_steps=steps * epochs if steps and epochs else None,
        resumed_from=continuing,
        # It restores the progress from meta.json without a word (_load_internal_data).
        train_state_loaded=False,
    )


def said_no_backup(text: str) -> bool:
    """Whether it said it found no backup to continue from."""
    return _NO_BACKUP.search(text) is not None


def section_at_end(text: str) -> Section | None:
    """What it announced last in ``text``: a backup or a save, start-up, an epoch bar being
    drawn, or the step bar (training); None when none of them."""
    best: tuple[int, Section] | None = None
    for section, pattern in _MARKERS:
        for match in pattern.finditer(text):
            if best is None or match.start() >= best[0]:
                best = (match.start(), section)
    return best[1] if best else None
