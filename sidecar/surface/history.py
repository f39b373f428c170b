"""The run's history for the status page's chart: progress and GPU samples, and the marks of
what happened (stalls, crashes, restarts, quarantines, completion).

The loop appends one sample per poll (:meth:`History.append`, a list append under a lock);
a structlog processor (:class:`HistoryMarks`) adds a mark for each event that changes the
run's course. Nothing is read or computed for a page nobody looks at.

Bounded however long the run: at most ``max_samples`` samples, each at least ``spacing``
seconds after the one before. When the list is full every other sample is dropped and
the spacing doubles, so a three-day run keeps its whole shape at a coarser grain (about four
minutes between points with the defaults) instead of only its last hours. Marks are few
and kept at full detail, the newest ``max_marks`` of them.

Kept in the run's state folder (``history.json``), written at most every ``flush_every``
seconds and when the sidecar stops, and read back when a sidecar (this one after a restart,
or a new one) watches the run again. The file names the run it belongs to (the ledger's run
start): a new run of the same name starts a new chart, and the previous run's is kept as
``history.previous.json``. It is a view, not progress: it is replaced atomically (a
temporary file renamed over it) but not fsynced, so a write never makes the loop wait on a
disk busy with checkpoints; a file that cannot be read, or holds values no sidecar writes,
is set aside as ``history.json.unreadable-<time>`` (never deleted) and the chart starts
again.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sidecar import events
from sidecar.atomic_files import replace_atomically

HISTORY_FILE = "history.json"
PREVIOUS_RUN_FILE = "history.previous.json"
_FORMAT = 1
# What a mark's text may carry of an event (reasons can quote a whole log line).
_MARK_TEXT_CHARS = 300
_LATEST_PLAUSIBLE_TIME = 1e11  # wall-clock seconds, the year 5138: beyond it a file is bad
_MOST_SPACING = 86_400.0


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock
    step: int | None
    total: int | None
    gpu_percent: float | None  # mean utilisation of the watched GPUs
    power_watts: float | None  # their summed power draw


@dataclass(frozen=True)
class Mark:
    at: float  # wall clock
    kind: str  # one of MARK_KINDS
    text: str


# The events that change the run's course, and the kind of mark each leaves on the chart.
MARK_KINDS = {
    events.STALL_DETECTED: "stall",
    events.TRAINER_CRASHED: "crash",
    events.TRAINER_RESTARTED: "restart",
    events.CHECKPOINT_QUARANTINED: "quarantine",
    events.TRAINING_COMPLETED: "completed",
    events.GAVE_UP: "gave_up",
    events.RUN_INTERRUPTED: "interrupted",
}


class History:
    def __init__(
        self,
        *,
        max_samples: int = 1440,
        max_marks: int = 200,
        spacing: float = 2.0,
        flush_every: float = 30.0,
        clock: Callable[[], float] = time.time,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ):
        if max_samples < 4:
            raise ValueError(f"max_samples must be at least 4, got {max_samples}")
        self._max_samples = max_samples
        self._max_marks = max_marks
        self._base_spacing = spacing
        self._spacing = spacing
        self._flush_every = flush_every
        self._clock = clock
        self._log = log or structlog.get_logger("sidecar")
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._marks: list[Mark] = []
        self._path: Path | None = None
        self._run: str | None = None
        self._dirty = False
        self._flushed_at = float("-inf")

    # -- the run it belongs to ---------------------------------------------------------------

    def follow(self, state_dir: Path, run: str | None = None) -> None:
        """Keep the history of the run whose state folder is ``state_dir`` and which began
        as ``run`` says (the ledger's run start): the current one is written out first, and
        the run's own file (if any) is read back. A file of another run of the same name is
        kept as the previous run's, and the chart starts empty."""
        path = state_dir / HISTORY_FILE
        if path == self._path and run == self._run:
            return
        self.flush(force=True)
        samples, marks, spacing = self._read(path, run)
        with self._lock:
            if self._path is None:  # what happened before the run was known (its restart)
                marks = (marks + self._marks)[-self._max_marks :]
            self._path, self._run = path, run
            self._samples, self._marks, self._spacing = samples, marks, spacing
            self._dirty = bool(samples or marks)
            self._flushed_at = self._clock()

    # -- what the loop and the event stream add ----------------------------------------------

    def append(self, sample: Sample) -> None:
        with self._lock:
            if self._path is None:
                return
            # A sample before the last one (the wall clock stepped back) is kept: the chart
            # goes on, instead of waiting for the clock to catch up.
            if self._samples and 0 <= sample.at - self._samples[-1].at < self._spacing:
                return
            self._samples.append(sample)
            if len(self._samples) > self._max_samples:
                # Every other sample goes (the newest stays): the same span, half the detail.
                self._samples = self._samples[(len(self._samples) - 1) % 2 :: 2]
                self._spacing *= 2
            self._dirty = True

    def mark(self, kind: str, text: str, at: float | None = None) -> None:
        """Kept even before the run is known: a sidecar logs a run's interruption before
        its first poll, and the mark joins that run's history on :meth:`follow`."""
        with self._lock:
            self._marks.append(Mark(self._clock() if at is None else at, kind, text))
            del self._marks[: -self._max_marks]
            self._dirty = True

    def view(self) -> tuple[list[Sample], list[Mark]]:
        """Copies, for a page being drawn on another thread."""
        with self._lock:
            return list(self._samples), list(self._marks)

    # -- the file ----------------------------------------------------------------------------

    def flush(self, *, force: bool = False) -> None:
        """Write the file when something changed and ``flush_every`` has passed (or ``force``).
        A failure is logged and the history kept in memory: the page still shows it."""
        with self._lock:
            now = self._clock()
            if self._path is None or not self._dirty:
                return
            if not force and now - self._flushed_at < self._flush_every:
                return
            path, run, spacing = self._path, self._run, self._spacing
            samples, marks = list(self._samples), list(self._marks)
            self._dirty = False
            self._flushed_at = now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, _serialise(run, spacing, samples, marks), durable=False)
        except OSError as error:
            self._log.warning(events.HISTORY_NOT_SAVED, path=str(path), error=str(error))

    def _read(self, path: Path, run: str | None) -> tuple[list[Sample], list[Mark], float]:
        empty: tuple[list[Sample], list[Mark], float] = ([], [], self._base_spacing)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty
        except OSError as error:
            self._log.warning(events.HISTORY_UNREADABLE, path=str(path), error=str(error))
            return empty
        try:
            written_for, parsed = _parse(text, self._base_spacing, self._max_samples)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            aside = self._set_aside(path, f"{HISTORY_FILE}.unreadable-{self._stamp()}")
            self._log.warning(
                events.HISTORY_UNREADABLE,
                path=str(path),
                kept_as=str(aside),
                error=f"{type(error).__name__}: {error}",
            )
            return empty
        if run is not None and written_for is not None and written_for != run:
            self._set_aside(path, PREVIOUS_RUN_FILE)  # an earlier run of this name
            return empty
        samples, marks, spacing = parsed
        return samples, marks[-self._max_marks :], spacing

    @staticmethod
    def _set_aside(path: Path, name: str) -> Path:
        aside = path.with_name(name)
        try:
            os.replace(path, aside)
        except OSError:
            return path
        return aside

    def _stamp(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))


def _serialise(run: str | None, spacing: float, samples: list[Sample], marks: list[Mark]) -> str:
    """Compact JSON; times to 0.1 s and readings to 0.1 (what the chart can show)."""
    return json.dumps(
        {
            "format": _FORMAT,
            "run": run,
            "spacing": spacing,
            "samples": [
                [round(s.at, 1), s.step, s.total, _round(s.gpu_percent), _round(s.power_watts)]
                for s in samples
            ],
            "marks": [[round(m.at, 1), m.kind, m.text] for m in marks],
        },
        separators=(",", ":"),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _parse(
    text: str, base_spacing: float, max_samples: int
) -> tuple[str | None, tuple[list[Sample], list[Mark], float]]:
    """The run the file was written for, and its samples, marks and spacing; ValueError (or
    TypeError, KeyError, IndexError) for anything this module would not have written."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"expected a history of format {_FORMAT}")
    samples = [
        Sample(_time(at), _int(step), _int(total), _float(gpu), _float(power))
        for at, step, total, gpu, power in data["samples"]
    ][-max_samples:]
    marks = [Mark(_time(at), str(kind), str(text)) for at, kind, text in data["marks"]]
    spacing = _float(data.get("spacing")) or base_spacing
    if not base_spacing <= spacing <= _MOST_SPACING:
        raise ValueError(f"spacing {spacing} is outside {base_spacing}..{_MOST_SPACING} s")
    run = data.get("run")
    return (None if run is None else str(run)), (samples, marks, spacing)


def _time(value: Any) -> float:
    at = float(value)
    if not 0 < at < _LATEST_PLAUSIBLE_TIME:
        raise ValueError(f"time {value!r} is not a plausible wall-clock time")
    return at


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


class HistoryMarks:
    """A structlog processor: a mark for each event in ``MARK_KINDS``; it changes nothing."""

    def __init__(self, history: History):
        self._history = history

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        kind = MARK_KINDS.get(str(event_dict.get("event")))
        if kind is not None:
            self._history.mark(kind, mark_text(event_dict))
        return event_dict


def mark_text(event_dict: structlog.typing.EventDict) -> str:
    """The line a person reads on the mark: what happened and why, from the event's fields."""
    parts = [str(event_dict["event"]).replace("_", " ")]
    for key in ("diagnosis", "reason", "checkpoint", "how"):
        value = event_dict.get(key)
        if value not in (None, ""):
            parts.append(f"{key}: {value}")
    return "; ".join(parts)[:_MARK_TEXT_CHARS]
