"""Follows the trainer's log incrementally: growth and the latest step counter.

The log of a multi-day run reaches gigabytes, so each poll reads only what was
appended since the previous one (and at most ``max_read_bytes`` of it: when more
arrived, only the tail matters for the latest step). A truncated or replaced
file is followed from its start again. Which line is the step counter is the
trainer's knowledge: the follower is given its reader (sd-scripts' by default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.observe.progress import StepProgress, TqdmBar, bar_to_step
from sidecar.trainers.sd_scripts.progress_lines import step_bar as sd_scripts_step_bar

_SEPARATORS = ("\r", "\n")


@dataclass(frozen=True)
class LogDelta:
    grew: bool
    new_bytes: int
    progress: StepProgress | None  # latest step counter seen in the new output, if any
    size: int
    mtime: float | None = None  # wall-clock time of the last write, when it grew
    text: str = ""  # the newly read output (after what was carried over), decoded leniently


class LogFollower:
    def __init__(
        self,
        path: Path,
        *,
        max_read_bytes: int = 1 << 20,
        carry_limit: int = 4096,
        step_bar: Callable[[str], TqdmBar | None] = sd_scripts_step_bar,
    ):
        """``step_bar`` finds the trainer's last step counter bar in newly read output."""
        self.path = path
        self._step_bar = step_bar
        self._max_read = max_read_bytes
        self._carry_limit = carry_limit
        self._offset = 0
        self._inode: tuple[int, int] | None = None
        self._carry = ""

    def start_at_end(self) -> None:
        """Ignore what is already in the log (output of earlier runs)."""
        self.start_at(self.end())

    def end(self) -> int:
        """Where the log ends now (0 when there is none yet)."""
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def start_at(self, offset: int) -> None:
        """Read from ``offset`` on: what was written since a launch began, all of it."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._inode, self._offset, self._carry = None, 0, ""
            return
        self._inode = (status.st_dev, status.st_ino)
        self._offset = min(offset, status.st_size)
        self._carry = ""

    def poll(self) -> LogDelta:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return LogDelta(grew=False, new_bytes=0, progress=None, size=0)
        inode = (status.st_dev, status.st_ino)
        if inode != self._inode or status.st_size < self._offset:
            self._inode, self._offset, self._carry = inode, 0, ""
        pending = status.st_size - self._offset
        if pending <= 0:
            return LogDelta(grew=False, new_bytes=0, progress=None, size=status.st_size)
        start = max(self._offset, status.st_size - self._max_read)
        if start != self._offset:
            self._carry = ""
        chunk = self._read(start, status.st_size - start)
        self._offset = start + len(chunk)
        text = self._carry + chunk.decode("utf-8", errors="replace")
        self._carry = _last_fragment(text)[-self._carry_limit :]
        return LogDelta(
            grew=True,
            new_bytes=pending,
            progress=bar_to_step(self._step_bar(text)),
            size=status.st_size,
            mtime=status.st_mtime,
            text=text,
        )

    def _read(self, start: int, length: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(length)


def _last_fragment(text: str) -> str:
    cut = max(text.rfind(separator) for separator in _SEPARATORS)
    return text[cut + 1 :]


def tail_text(path: Path, max_bytes: int = 4096) -> str:
    """The last ``max_bytes`` of a log, decoded leniently (for reports)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
