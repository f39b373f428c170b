"""sd-scripts' progress lines: its ``steps`` tqdm bar and its ``epoch N/M`` banners.

sd-scripts prints the step counter as a tqdm bar on stderr::

    steps:  33%|███▎      | 10/30 [08:04<16:08, 48.44s/it, avr_loss=0.407]

and ``epoch 2/16`` banners on stdout. Caching phases before the first step print tqdm
bars too, under other descriptions, and validation runs a "validation steps" bar: only
the bar described exactly ``steps`` is the step counter.
"""

from __future__ import annotations

import re

from sidecar.observe.progress import StepProgress, TqdmBar, bar_to_step, last_bar

__all__ = ["STEP_BAR_DESCRIPTION", "parse_epoch", "parse_step", "step_bar"]

STEP_BAR_DESCRIPTION = "steps"
_EPOCH_BANNER = re.compile(r"^\s*epoch (\d+)/(\d+)\s*$")


def step_bar(text: str) -> TqdmBar | None:
    """The last redraw of the step counter bar in ``text``, with tqdm's rate and time left."""
    return last_bar(text, STEP_BAR_DESCRIPTION)


def parse_step(fragment: str) -> StepProgress | None:
    """The step counter in one ``\\r``- or newline-separated piece of output, if any."""
    return bar_to_step(step_bar(fragment))


def parse_epoch(line: str) -> tuple[int, int] | None:
    match = _EPOCH_BANNER.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None
