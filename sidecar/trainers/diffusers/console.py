"""What a diffusers example script says on its console: its step bar, sections, start-up.

Read from huggingface/diffusers at main (58eb52c), ``examples/dreambooth/
train_dreambooth_lora_flux.py`` ``main`` (the other examples print the same):

- ``logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
  datefmt="%m/%d/%Y %H:%M:%S", level=INFO)``: the script's and accelerate's loggers write
  ``12/01/2026 20:00:00 - INFO - __main__ - ...`` to stderr, one record at a time;
- before the first step: ``***** Running training *****``, ``  Num batches each epoch = B``,
  ``  Gradient Accumulation steps = A``, ``  Total optimization steps = T``; then, resuming,
  ``accelerator.print(f"Resuming from checkpoint {path}")`` (``path``: the folder's basename;
  a print on stdout, which is block-buffered when redirected, so it can arrive late) and
  accelerate's ``Accelerator.load_state`` logs ``Loading states from <output_dir>/<path>``
  (stderr, at once); ``latest`` with no folder prints ``Checkpoint 'latest' does not exist.
  Starting a new training run.``;
- the step counter: ``tqdm(range(0, max_train_steps), initial=initial_global_step,
  desc="Steps")`` — a resumed run's bar starts at the checkpoint's step;
- a save: ``N checkpoints already exist, removing K checkpoints`` / ``removing checkpoints:
  ...`` (pruning, only with ``--checkpoints_total_limit``), accelerate's ``Saving current
  state to ...``, then ``Saved state to <output_dir>/checkpoint-<N>``;
- validation: ``log_validation`` logs ``Running validation...``.
"""

from __future__ import annotations

import posixpath
import re

from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar, last_bar
from sidecar.trainers.base import StartupReport

__all__ = ["STEP_BAR_DESCRIPTION", "section_at_end", "startup_report", "step_bar"]

STEP_BAR_DESCRIPTION = "Steps"

# Where a message begins: a line's start (a print), or after the logging prefix.
_START = (
    r"(?:^|(?<=[\r\n]))"
    r"(?:\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2} - (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) - \S+ - )?"
)
_BATCHES_PER_EPOCH = re.compile(_START + r"\s*Num batches each epoch = (\d+)", re.MULTILINE)
_ACCUMULATION = re.compile(_START + r"\s*Gradient Accumulation steps = (\d+)", re.MULTILINE)
_TOTAL_STEPS = re.compile(_START + r"\s*Total optimization steps = (\d+)", re.MULTILINE)
_RESUMING = re.compile(_START + r"Resuming from checkpoint (\S+)[ \t]*$", re.MULTILINE)
_LOADING = re.compile(_START + r"Loading states from (.+?)[ \t]*$", re.MULTILINE)

_MARKERS: tuple[tuple[Section, re.Pattern[str]], ...] = tuple(
    (section, re.compile(_START + f"(?:{words})", re.MULTILINE))
    for section, words in (
        (Section.SAMPLING, r"Running validation\.\.\."),
        (
            Section.SAVING,
            r"\d+ checkpoints already exist, removing|removing checkpoints: "
            r"|Saving current state to\b",
        ),
        (
            Section.STARTUP,
            r"\*\*\*\*\* Running training \*\*\*\*\*|Resuming from checkpoint\b"
            r"|Loading states from\b",
        ),
        # Back to stepping: the save is over (the bar is redrawn at the next step).
        (Section.TRAINING, r"Saved state to\b|Steps:\s+\d+%\|"),
    )
)


def step_bar(text: str) -> TqdmBar | None:
    """The last redraw of the ``Steps`` bar: its ``n`` is the absolute global_step."""
    return last_bar(text, STEP_BAR_DESCRIPTION)


def section_at_end(text: str) -> Section | None:
    """The section announced last in ``text`` (None: nothing recognised)."""
    best: tuple[int, Section] | None = None
    for section, pattern in _MARKERS:
        for match in pattern.finditer(text):
            if best is None or match.start() > best[0]:
                best = (match.start(), section)
    return best[1] if best else None


def startup_report(text: str) -> StartupReport:
    """What a piece of output says about the schedule and the resume.

    ``steps_per_epoch`` is the batches per epoch, as sd-scripts reports it (with
    ``gradient_accumulation`` beside it; diffusers' ``num_update_steps_per_epoch`` is
    ``ceil(batches / accumulation)``): the two lines may come in two pieces. ``resumed_from``
    is the folder's name as diffusers resolved it (``checkpoint-<N>``), from whichever of its
    two lines came; ``skipped_steps`` stays None: diffusers skips no batch.
    """
    resumed = _last_text(_RESUMING, text)
    loading = _last_text(_LOADING, text)
    if resumed is None and loading is not None:
        resumed = posixpath.basename(loading.rstrip("/"))
    return StartupReport(
        steps_per_epoch=_last_number(_BATCHES_PER_EPOCH, text),
        gradient_accumulation=_last_number(_ACCUMULATION, text),
        total_steps=_last_number(_TOTAL_STEPS, text),
        resumed_from=resumed,
        train_state_loaded=resumed is not None,
        skipped_steps=None,
    )


def _last_number(pattern: re.Pattern[str], text: str) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


def _last_text(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None
