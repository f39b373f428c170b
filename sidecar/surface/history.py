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

Kept in the run's state folder (``history.json``), written atomically at most every
``flush_every`` seconds and when the sidecar stops, and read back when a sidecar (this one
after a restart, or a new one) watches the run again. It is a view, not progress: a file
that cannot be read is set aside as ``history.json.unreadable`` (never deleted) and the
chart starts again.
"""

from __future__ import annotations

import json
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
_FORMAT = 1
# What a mark's text may carry of an event (reasons can quote a whole log line).
_MARK_TEXT_CHARS = 300


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
        self._dirty = False
        self._flushed_at = float("-inf")

    # -- the run it belongs to ---------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        return self._path

    def follow(self, state_dir: Path) -> None:
        """Keep the history of the run whose state folder is ``state_dir``: the current one
        is written out first, and the run's own file (if any) is read back."""
        path = state_dir / HISTORY_FILE
        if path == self._path:
            return
        self.flush(force=True)
        samples, marks, spacing = self._read(path)
        with self._lock:
            if self._path is None:  # what happened before the run was known (its restart)
                marks = (marks + self._marks)[-self._max_marks :]
            self._path = path
            self._samples, self._marks, self._spacing = samples, marks, spacing
            self._dirty = False
            self._flushed_at = self._clock()

    # -- what the loop and the event stream add ----------------------------------------------

    def append(self, sample: Sample) -> None:
        with self._lock:
            if self._path is None:
                return
            if self._samples and sample.at - self._samples[-1].at < self._spacing:
                return
            self._samples.append(sample)
            if len(self._samples) > self._max_samples:
                # Every other sample goes (the newest stays): the same span, half the detail.
                self._samples = self._samples[len(self._samples) % 2 :: 2]
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
            path, content = self._path, self._serialise()
            self._dirty = False
            self._flushed_at = now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, content)
        except OSError as error:
            self._log.warning(events.HISTORY_NOT_SAVED, path=str(path), error=str(error))

    def _serialise(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "spacing": self._spacing,
                "samples": [
                    [s.at, s.step, s.total, s.gpu_percent, s.power_watts] for s in self._samples
                ],
                "marks": [[m.at, m.kind, m.text] for m in self._marks],
            },
            separators=(",", ":"),
        )

    def _read(self, path: Path) -> tuple[list[Sample], list[Mark], float]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], [], self._base_spacing
        except OSError as error:
            self._log.warning(events.HISTORY_UNREADABLE, path=str(path), error=str(error))
            return [], [], self._base_spacing
        try:
            return _parse(text, self._base_spacing, self._max_samples, self._max_marks)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            aside = path.with_name(path.name + ".unreadable")
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            self._log.warning(
                events.HISTORY_UNREADABLE,
                path=str(path),
                kept_as=str(aside),
                error=f"{type(error).__name__}: {error}",
            )
            return [], [], self._base_spacing


def _parse(
    text: str, base_spacing: float, max_samples: int, max_marks: int
) -> tuple[list[Sample], list[Mark], float]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"expected a history of format {_FORMAT}")
    samples = [
        Sample(float(at), _int(step), _int(total), _float(gpu), _float(power))
        for at, step, total, gpu, power in data["samples"]
    ][-max_samples:]
    marks = [Mark(float(at), str(kind), str(text)) for at, kind, text in data["marks"]]
    spacing = max(float(data.get("spacing", base_spacing)), base_spacing)
    return samples, marks[-max_marks:], spacing


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


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
