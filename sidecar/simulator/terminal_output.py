"""The trainer's terminal output: stdout/stderr lines, tqdm bars and the loss they show."""

from __future__ import annotations

import math
import random
import re
import time
from typing import TextIO

from sidecar.simulator.context import Clock

_TQDM_BAR_WIDTH = 10  # tqdm's bar width when it writes to a pipe (no terminal size known)
_TQDM_BLOCKS = " ▏▎▍▌▋▊▉█"


def format_interval(seconds: float) -> str:
    """tqdm's ``[mm:ss]`` / ``[h:mm:ss]`` rendering."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_progress(
    n: int, total: int, elapsed: float, desc: str = "steps", postfix: str = ""
) -> str:
    """One tqdm status line as tqdm draws it into a pipe (10-character unicode bar)."""
    fraction = min(n / total, 1.0) if total else 0.0
    full, partial = divmod(int(fraction * _TQDM_BAR_WIDTH * 8), 8)
    bar = _TQDM_BLOCKS[-1] * full
    if full < _TQDM_BAR_WIDTH:
        bar += _TQDM_BLOCKS[partial] + " " * (_TQDM_BAR_WIDTH - full - 1)
    rate = n / elapsed if n and elapsed > 0 else None
    if rate is None:
        rate_text, remaining_text = "?it/s", "?"
    else:
        rate_text = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
        remaining_text = format_interval((total - n) / rate)
    prefix = f"{desc}: " if desc else ""
    extra = f", {postfix}" if postfix else ""
    return (
        f"{prefix}{fraction * 100:3.0f}%|{bar}| {n}/{total} "
        f"[{format_interval(elapsed)}<{remaining_text}, {rate_text}{extra}]"
    )


class Terminal:
    """The trainer's two output streams, flushed after every write like a live trainer's."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self._last_stamp: str | None = None

    def say(self, text: str = "") -> None:
        """A line on stdout, where sd-scripts' ``accelerator.print`` goes."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def log(self, message: str, level: str = "INFO", source: str = "train_util.py:1000") -> None:
        """A record on stderr exactly as sd-scripts' rich handler draws it into a file."""
        self.stderr.write(rich_record(message, level, source, self._last_stamp))
        self.stderr.flush()
        self._last_stamp = time.strftime(_STAMP)

    def draw(self, text: str) -> None:
        """Raw stderr output (progress bars redraw with a leading carriage return)."""
        self.stderr.write(text)
        self.stderr.flush()


_STAMP = "%Y-%m-%d %H:%M:%S"
_CONSOLE_WIDTH = 80  # rich's width when no stream is a terminal and COLUMNS is unset


def rich_record(message: str, level: str, source: str, last_stamp: str | None) -> str:
    """One log record as rich's ``RichHandler`` renders it into a file (rich 13.7, sd-scripts'
    ``setup_logging``): the time, or 19 spaces when the second repeats the previous record's;
    the level padded to 8; the message word-wrapped at spaces in its column, a word longer
    than the column folded to fill it; the source right-aligned on the first row; every row
    padded to 80 columns."""
    stamp = time.strftime(_STAMP)
    shown = " " * len(stamp) if stamp == last_stamp else stamp
    width = _CONSOLE_WIDTH - 29 - 1 - len(source)
    rows = _wrap(message, width)
    lines = [f"{shown} {level:<8} {rows[0]:<{width}} {source}"]
    lines += [f"{' ' * 29}{row:<{width}}{' ' * (len(source) + 1)}" for row in rows[1:]]
    return "\n".join(lines) + "\n"


# A word as rich splits a message: leading blanks (the first word's), the word, and the
# blanks after it, which travel with it (rich/_wrap.py ``words``).
_RICH_WORD = re.compile(r"\s*\S+\s*")


def _wrap(message: str, width: int) -> list[str]:
    """The message's rows as rich 13.7 (sd-scripts' pin) divides them (``rich/_wrap.py``
    ``divide_line``, then ``Text.wrap``): a word goes on the row while the row has room for
    it without its trailing blanks; one that has no room starts the next row; one longer than
    the column starts a row of its own and is cut into column-wide pieces, its trailing blank
    included, so a word exactly k columns wide leaves that blank to start the next row
    (`` at epoch 2``). Blanks past the column's end are dropped."""
    rows: list[str] = []
    row, used = "", 0
    for match in _RICH_WORD.finditer(message):
        word = match.group()
        needed = len(word.rstrip())
        if width - used >= needed:
            row, used = row + word, used + len(word)
        elif needed > width:
            pieces = [word[at : at + width] for at in range(0, len(word), width)]
            if match.start():
                rows.append(row)
            rows.extend(pieces[:-1])
            row, used = pieces[-1], len(pieces[-1])
        else:
            rows.append(row)
            row, used = word, len(word)
    rows.append(row)
    return [row[:width] + row[width:].rstrip() for row in rows]


class ProgressBar:
    """A tqdm bar on stderr: redrawn in place with ``\\r`` and no newline until it closes."""

    def __init__(self, terminal: Terminal, total: int, clock: Clock, desc: str = "steps") -> None:
        self._terminal = terminal
        self._total = total
        self._clock = clock
        self._desc = desc
        self._started = clock()
        self._last_length = 0
        self.n = 0
        self.postfix = ""
        self.refresh()

    def update(self, postfix: str | None = None) -> None:
        self.n += 1
        if postfix is not None:
            self.postfix = postfix
        self.refresh()

    def refresh(self) -> None:
        line = format_progress(
            self.n, self._total, self._clock() - self._started, self._desc, self.postfix
        )
        padding = " " * max(self._last_length - len(line), 0)
        self._last_length = len(line)
        self._terminal.draw("\r" + line + padding)

    def close(self) -> None:
        self.refresh()
        self._terminal.draw("\n")


class LossCurve:
    """Plausible, reproducible ``avr_loss`` values: a noisy, slowly falling moving average."""

    def __init__(self, seed: int = 42) -> None:
        self._random = random.Random(seed)
        self._losses: list[float] = []

    def next_average(self) -> float:
        base = 0.45 * math.exp(-len(self._losses) / 400) + 0.3
        self._losses.append(base + self._random.uniform(-0.05, 0.05))
        window = self._losses[-50:]
        return sum(window) / len(window)
