"""Reading tqdm progress bars out of a trainer's console output.

tqdm redraws its bar in place with ``\\r``, in its default format::

    steps:  33%|███▎      | 10/30 [08:04<16:08, 48.44s/it, avr_loss=0.407]
    {desc}: {percent}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]

(without ``{desc}: `` when the bar has no description). Which bar is a trainer's step
counter is the trainer's own knowledge (``sidecar.trainers``): the one parser here only
reads bars; trainers pick theirs by description.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["StepProgress", "TqdmBar", "bar_to_step", "last_bar", "tqdm_bars"]

# A bar starts a line (tqdm starts every redraw with \r, so it follows \r, \n or the start of
# the text), which keeps "validation steps" from ever reading as a bar described "steps". A
# bar without a description starts with its percentage, padded to three characters.
# The total must be followed by the space tqdm writes after it, so a bar cut mid-number by a
# read of a growing log is not taken for a smaller total.
_BAR = re.compile(
    r"(?<![^\r\n])(?:(?P<desc>[^\r\n]*?):\s*|[ \t]*)\d{1,3}%\|[^|\r\n]*\|"
    r"\s*(?P<n>\d+)/(?P<total>\d+)(?=\s)"
    r"(?:\s*\[(?P<elapsed>[\d:]+)<(?P<left>[\d:?]+)(?:,\s*(?P<rate>[\d.]+)(?P<unit>s/it|it/s))?)?"
)


@dataclass(frozen=True)
class TqdmBar:
    """One redraw of a tqdm bar, as far as it was printed."""

    description: str  # "" for a bar without one
    n: int
    total: int
    elapsed_seconds: float | None
    remaining_seconds: float | None  # None while tqdm shows "?"
    rate: float | None  # iterations per second, whichever way tqdm printed it


@dataclass(frozen=True)
class StepProgress:
    """A trainer's step counter: the step it is at, of how many."""

    step: int
    total: int


def tqdm_bars(text: str) -> Iterator[TqdmBar]:
    """Every tqdm bar in ``text`` (``\\r``- or newline-separated output), in order."""
    for bar in _BAR.finditer(text):
        yield TqdmBar(
            description=bar["desc"] or "",
            n=int(bar["n"]),
            total=int(bar["total"]),
            elapsed_seconds=_clock_seconds(bar["elapsed"]),
            remaining_seconds=_clock_seconds(bar["left"]),
            rate=_rate(bar["rate"], bar["unit"]),
        )


def last_bar(text: str, description: str) -> TqdmBar | None:
    """The last bar in ``text`` described exactly ``description``, if any."""
    found = None
    for bar in tqdm_bars(text):
        if bar.description == description:
            found = bar
    return found


def bar_to_step(bar: TqdmBar | None) -> StepProgress | None:
    """A step counter bar as the counter alone."""
    return None if bar is None else StepProgress(step=bar.n, total=bar.total)


def _clock_seconds(text: str | None) -> float | None:
    """tqdm's ``16:08`` or ``1:02:03``; None for ``?`` (before it can estimate) or a cut one."""
    if not text or "?" in text:
        return None
    seconds = 0.0
    for part in text.split(":"):
        if not part:  # a bar cut mid-field, or noise that only looks like one
            return None
        seconds = seconds * 60 + int(part)
    return seconds


def _rate(value: str | None, unit: str | None) -> float | None:
    try:
        rate = float(value) if value else None
    except ValueError:  # "1.2.3": noise that only looks like a rate
        return None
    if rate is None or unit == "it/s":
        return rate
    return 1.0 / rate if rate else None
