"""Reading training progress out of the trainer's console output.

sd-scripts prints a tqdm bar on stderr, updated in place with ``\\r``::

    steps:  33%|███▎      | 10/30 [08:04<16:08, 48.44s/it, avr_loss=0.407]

and ``epoch 2/16`` banners on stdout. Caching phases before the first step print
tqdm bars too, under other descriptions; only the ``steps`` bar is the step counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Only a bar described exactly "steps" (tqdm starts every redraw with \r, so the description
# follows \r, \n or the start): sd-scripts' "validation steps" bar counts something else. The
# total must be followed by the space tqdm writes after it, so a bar cut mid-number by a
# read of a growing log is not taken for a smaller total.
_STEP_BAR = re.compile(r"(?<![^\r\n])steps:\s*\d{1,3}%\|[^|\r\n]*\|\s*(\d+)/(\d+)(?=\s)")
_EPOCH_BANNER = re.compile(r"^\s*epoch (\d+)/(\d+)\s*$")


@dataclass(frozen=True)
class StepProgress:
    step: int
    total: int


def parse_step(fragment: str) -> StepProgress | None:
    """The step counter in one ``\\r``- or newline-separated piece of output, if any."""
    matches = _STEP_BAR.findall(fragment)
    if not matches:
        return None
    step, total = matches[-1]
    return StepProgress(step=int(step), total=int(total))


def parse_epoch(line: str) -> tuple[int, int] | None:
    match = _EPOCH_BANNER.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None
