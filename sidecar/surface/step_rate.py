"""Training speed and time left, from the step counter the loop sees.

Only moments when the step changes are kept, so a slow trainer (sd-scripts on a 12 GB
card takes ~50 s per step) gets as good an estimate as a fast one, and the rate is
measured up to *now*: a stalled run decays towards zero instead of showing its last speed
forever. sd-scripts counts from 0 again after a resume; a step going backwards starts a
new window.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Speed:
    step: int
    total: int | None
    steps_per_second: float | None  # None until two different steps were seen
    eta_seconds: float | None  # None without a rate or a total


class StepRate:
    """Fed by the loop's thread, read by scrapes and the progress line (hence the lock)."""

    def __init__(self, window: int = 20):
        self._changes: deque[tuple[float, int]] = deque(maxlen=window)
        self._total: int | None = None
        self._lock = threading.Lock()

    def observe(self, now: float, step: int | None, total: int | None) -> None:
        if step is None:
            return
        with self._lock:
            if total is not None:
                self._total = total
            if self._changes and step < self._changes[-1][1]:
                self._changes.clear()  # a resumed run counts from 0 again
            if not self._changes or step != self._changes[-1][1]:
                self._changes.append((now, step))

    def reset(self) -> None:
        with self._lock:
            self._changes.clear()

    def speed(self, now: float) -> Speed | None:
        with self._lock:
            if not self._changes:
                return None
            first_at, first_step = self._changes[0]
            step = self._changes[-1][1]
            total = self._total
        rate = None
        if step > first_step and now > first_at:
            rate = (step - first_step) / (now - first_at)
        eta = None
        if rate and total is not None:
            eta = max(total - step, 0) / rate
        return Speed(step=step, total=total, steps_per_second=rate, eta_seconds=eta)


def format_duration(seconds: float | None) -> str:
    """``3h05m``, ``5m29s``, ``42s``: short enough for a status line."""
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
