"""A live ``step N/M · rate · ETA`` line at the bottom of a terminal.

Only for people watching a console: with JSON logs (machines, ``docker logs``) nothing is
drawn, so the log holds events and no redraws. While the sidecar echoes the trainer's own
output (process mode), the trainer's tqdm bar is already that line; a second one would
fight it for the same row. Before every log event the line is wiped (this object is also a
structlog processor), and the next poll draws it again below the event.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from typing import TextIO

import structlog

from sidecar.surface.step_rate import Speed, format_duration

_WIPE = "\r\x1b[2K"


def wanted(
    *,
    log_format: str | None,
    restart_mode: str,
    echo_trainer_output: bool,
    stdout: TextIO,
    stderr: TextIO,
) -> bool:
    """Whether to draw the line, from ``SIDECAR_LOG_FORMAT`` (None: console on a terminal),
    ``SIDECAR_RESTART_MODE``, ``SIDECAR_ECHO_TRAINER_OUTPUT`` and the two streams."""
    console = log_format == "console" or (log_format is None and stdout.isatty())
    echoing = restart_mode == "process" and echo_trainer_output
    return console and stderr.isatty() and not echoing


class ProgressLine:
    def __init__(
        self,
        stream: TextIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.5,
    ):
        self._stream = stream
        self._clock = clock
        self._min_interval = min_interval  # redraws per second a person can read
        self._shown = ""
        self._drawn_at = float("-inf")
        self._lock = threading.Lock()

    def update(self, phase: str, speed: Speed | None) -> None:
        text = describe(phase, speed)
        now = self._clock()
        with self._lock:
            if text == self._shown or now - self._drawn_at < self._min_interval:
                return
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._stream.write(_WIPE + text[:width])
            self._stream.flush()
            self._shown, self._drawn_at = text, now

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self._stream.write(_WIPE)
                self._stream.flush()
                self._shown = ""

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        self.clear()
        return event_dict


def describe(phase: str, speed: Speed | None) -> str:
    if speed is None:
        return f"{phase}: waiting for the first step"
    total = f"/{speed.total}" if speed.total else ""
    percent = f" ({100 * speed.step / speed.total:.0f}%)" if speed.total else ""
    parts = [f"{phase}: step {speed.step}{total}{percent}"]
    if speed.steps_per_second:
        rate = speed.steps_per_second
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
    if speed.eta_seconds is not None and phase == "running":
        parts.append(f"ETA {format_duration(speed.eta_seconds)}")
    return " · ".join(parts)
