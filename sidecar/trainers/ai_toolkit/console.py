"""What ai-toolkit prints: its step bar and the lines that say what it resumed from.

``BaseSDTrainProcess.run`` (ostris/ai-toolkit) draws the step counter as a tqdm bar
(``toolkit/progress_bar.py`` ``ToolkitProgressBar``) described by the JOB name, starting at
the step it resumed from::

    my-lora:  42%|████▏     | 420/1000 [03:10<04:23, 2.20it/s, lr: 1.0e-04 loss: 3.1e-01]

and, while starting, ``#### IMPORTANT RESUMING FROM <path> ####`` (``get_latest_save_path``
found a save), ``Found step <n> in metadata, starting from there``
(``load_training_state_from_metadata``) and ``Loading optimizer state from <path>`` /
``Failed to load optimizer state from <path>``. Pure: text in, readings out.
"""

from __future__ import annotations

import re

from sidecar.observe.progress import TqdmBar, last_bar
from sidecar.trainers.base import StartupReport

__all__ = ["optimizer_load_failed", "startup_report", "step_bar"]

_RESUMING = re.compile(r"#### IMPORTANT RESUMING FROM (.+?) ####")
_FOUND_STEP = re.compile(r"Found step (\d+) in metadata, starting from there")
_OPTIMIZER_FAILED = re.compile(r"Failed to load optimizer state from (.+)")


def step_bar(text: str, job_name: str | None) -> TqdmBar | None:
    """The last redraw of the job's step bar (None: the job's name is not known yet)."""
    return last_bar(text, job_name) if job_name else None


def startup_report(text: str, job_name: str | None) -> StartupReport:
    """What a piece of ai-toolkit's output says about the schedule and the resume."""
    resumed = _RESUMING.findall(text)
    found = _FOUND_STEP.findall(text)
    bar = step_bar(text, job_name)
    return StartupReport(
        total_steps=bar.total if bar is not None else None,
        resumed_from=resumed[-1].strip() if resumed else None,
        train_state_loaded=bool(found),
    )


def optimizer_load_failed(text: str) -> str | None:
    """The optimizer.pt that ai-toolkit failed to load (and trained on without), if any."""
    found = _OPTIMIZER_FAILED.findall(text)
    return found[-1].strip() if found else None
