"""Find the state folders a stalled run can resume from, and pick the newest complete one.

sd-scripts (like any trainer that saves through accelerate) writes resumable state
into immediate subfolders of ``--output_dir`` (REFERENCE sections 2 and 3); the
trainer's ``StateNaming`` reads the folder names and ``accelerate_files`` knows the
files. Nothing marks a folder complete, ``train_state.json`` is written first
rather than last, old folders are deleted while we look, and after a resume the
step numbers in the names restart at 0.
So a folder counts only when every file is present, structurally intact and
has stopped changing, and "newest" means newest completion time, never the
highest number in the name. A folder sd-scripts reused after a resume is rewritten in
place, so its files must also be from ONE save: their mtimes in accelerate's write
order (``accelerate_files.mixed_save_problem``). Files the sidecar may not read are
recorded with owner and mode (``access``), for the choice to stop on rather than skip.

The scan does one directory listing per folder and reads only file headers
(see ``file_checks``); it never walks deeper than one level below the folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sidecar.checkpoints.accelerate_files import (
    ACCELERATE_MARKER,
    STATE_FILE,
    missing_files,
    mixed_save_problem,
    write_position,
)
from sidecar.checkpoints.access import UnreadableFile, denial
from sidecar.checkpoints.file_checks import FileReport, inspect_state_file
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.naming import CandidateKind, NamedState, StateNaming

__all__ = [
    "STILL_WRITTEN",
    "Candidate",
    "CandidateKind",
    "choose_checkpoint",
    "find_candidates",
    "newest_complete_first",
]

_ACCELERATE: NamedState = ("accelerate", None)


@dataclass(frozen=True)
class Candidate:
    """One folder that sd-scripts or accelerate could resume from, and whether it is whole."""

    path: Path
    kind: CandidateKind
    number: int | None  # epoch or step from the name; None for final/accelerate
    complete: bool
    problems: tuple[str, ...]  # why not complete, each naming its file; empty when complete
    completed_at: float | None  # newest st_mtime among its files (wall clock)
    step: int | None  # current_step from train_state.json when readable
    epoch: int | None  # current_epoch from train_state.json when readable
    # Its files come from more than one save (one problem starts with MIXED and says why):
    # an in-place overwrite that did not finish. Never deleted: it is evidence.
    mixed: bool = False
    # Files (or the folder itself) the sidecar was not allowed to read, each also named
    # in ``problems`` with one "unreadable: ..." entry.
    unreadable: tuple[UnreadableFile, ...] = field(default=())

    @property
    def unreadable_only(self) -> bool:
        """Refused access is all that is wrong with it: whole, as far as the sidecar can tell.

        Such a state may be the run's newest progress; the choice must not pass over it.
        """
        return bool(self.unreadable) and len(self.problems) == len(self.unreadable)


def find_candidates(
    output_dir: Path,
    *,
    now: float,
    settle_seconds: float = 10.0,
    output_name: str | None = None,
    naming: Callable[[str | None], StateNaming],
    memo: FileReportMemo | None = None,
) -> list[Candidate]:
    """Every state folder directly in ``output_dir``: complete ones newest first, then the rest.

    ``now`` is the caller's wall clock (compared with file mtimes); a folder whose
    newest file changed less than ``settle_seconds`` before it is still being written.
    A missing ``output_dir`` means no state yet and gives an empty list. ``naming`` is the
    trainer's state naming for an output name; ``output_name``
    None accepts any output name. ``memo`` keeps the reports of files already checked, for
    a caller that scans the same folder again and again (the loop, every poll).
    """
    names = naming(output_name)
    candidates = []
    for folder in _state_folder_entries(output_dir):
        if folder.name in names.ignored_folders:
            continue
        candidate = _examine(
            folder, names, now=now, settle_seconds=settle_seconds, inspect=_inspector(memo)
        )
        if candidate is not None:
            candidates.append(candidate)
    return newest_complete_first(candidates)


def choose_checkpoint(
    candidates: Sequence[Candidate], *, exclude: Collection[str | Path] = ()
) -> Candidate | None:
    """The first complete candidate not in ``exclude`` (e.g. quarantined after a failed resume)."""
    excluded = {Path(path) for path in exclude}
    for candidate in candidates:
        if candidate.complete and candidate.path not in excluded:
            return candidate
    return None


def _state_folder_entries(output_dir: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(output_dir) as entries:
            return [entry for entry in entries if _may_hold_state(entry)]
    except FileNotFoundError:
        return []


def _may_hold_state(entry: os.DirEntry[str]) -> bool:
    # Hidden folders (the sidecar's own .sidecar among them) are never state; the trainer's
    # naming names its own (FluxGym's sample images), which find_candidates skips.
    if entry.name.startswith("."):
        return False
    try:
        # follow_symlinks=False: a link to / or a link loop is neither entered nor escaped through.
        return entry.is_dir(follow_symlinks=False)
    except OSError:  # only where the filesystem gives no file type and the entry vanished
        return False


def _inspector(memo: FileReportMemo | None) -> Callable[[os.DirEntry[str]], FileReport]:
    if memo is not None:
        return memo.inspect
    return lambda entry: inspect_state_file(entry.path)


def _examine(
    entry: os.DirEntry[str],
    naming: StateNaming,
    *,
    now: float,
    settle_seconds: float,
    inspect: Callable[[os.DirEntry[str]], FileReport],
) -> Candidate | None:
    folder = Path(entry.path)
    named = naming.classify(entry.name)
    try:
        files = _list_files(entry.path)
    except FileNotFoundError:  # removed by --save_last_n_*_state since the listing
        return None
    except OSError as error:
        # Without a state name, only its contents could have made it a candidate.
        return None if named is None else _unreadable_folder(folder, named, error, naming.refusal)
    if named is None:
        if not any(ACCELERATE_MARKER.fullmatch(name) for name in files):
            return None
        named = _ACCELERATE
    candidate = _assess(
        folder,
        named,
        files,
        now=now,
        settle_seconds=settle_seconds,
        refusal=naming.refusal,
        inspect=inspect,
    )
    if candidate.problems and not _exists(folder):
        return None  # deleted while we read it; its problems are an artefact of that
    return candidate


def _unreadable_folder(
    folder: Path, named: NamedState, error: OSError, refusal: Callable[[CandidateKind], str | None]
) -> Candidate:
    kind, number = named
    refused = denial(str(folder), error, is_folder=True)
    problems = [f"unreadable: {error.strerror or error}"]
    never_resumable = refusal(kind)
    if never_resumable is not None:  # e.g. sd-scripts' final state: unreadable or not
        problems.insert(0, never_resumable)
    return Candidate(
        path=folder,
        kind=kind,
        number=number,
        complete=False,
        problems=tuple(problems),
        completed_at=None,
        step=None,
        epoch=None,
        unreadable=(refused,) if refused is not None else (),
    )


def _list_files(folder: str) -> dict[str, os.DirEntry[str]]:
    """The folder's non-hidden entries that are not folders (links to files included)."""
    with os.scandir(folder) as entries:
        return {
            entry.name: entry
            for entry in entries
            if not entry.name.startswith(".") and not _is_real_folder(entry)
        }


def _is_real_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _assess(
    folder: Path,
    named: NamedState,
    files: dict[str, os.DirEntry[str]],
    *,
    now: float,
    settle_seconds: float,
    refusal: Callable[[CandidateKind], str | None],
    inspect: Callable[[os.DirEntry[str]], FileReport],
) -> Candidate:
    kind, number = named
    readings = _read_files(files, inspect)
    problems = missing_files(files.keys()) + readings.problems
    newest = readings.newest
    mixed = None
    # settle_seconds 0: the caller knows nothing writes (the trainer is stopped or stalled),
    # so file times — and a wall clock that jumped — do not matter.
    if newest is not None and settle_seconds > 0 and now - newest < settle_seconds:
        # A save under way is out of order until it ends; only its end can tell.
        problems.append(_still_written(now - newest))
    else:
        mixed = mixed_save_problem(readings.ordered)
        if mixed is not None:
            problems.append(mixed)
    refused = refusal(kind)
    if refused is not None:
        problems.insert(0, refused)
    if "\n" in folder.name:
        # train.sh cannot name it safely (quote_word refuses): choosing it would stall the
        # recovery on a rewrite that can never succeed.
        problems.append("name contains a newline; it cannot be written into train.sh")
    return Candidate(
        path=folder,
        kind=kind,
        number=number,
        complete=not problems,
        problems=tuple(problems),
        completed_at=newest,
        step=readings.step,
        epoch=readings.epoch,
        mixed=mixed is not None,
        unreadable=tuple(readings.unreadable),
    )


class _Readings(NamedTuple):
    """What a folder's files said: their problems, times and train state."""

    problems: list[str]
    newest: float | None  # newest st_mtime of any file
    ordered: list[tuple[int, int, str]]  # (write position, st_mtime_ns, name) of state files
    unreadable: list[UnreadableFile]
    epoch: int | None
    step: int | None


def _read_files(
    files: dict[str, os.DirEntry[str]], inspect: Callable[[os.DirEntry[str]], FileReport]
) -> _Readings:
    problems: list[str] = []
    ordered: list[tuple[int, int, str]] = []
    unreadable: list[UnreadableFile] = []
    newest: float | None = None
    epoch = step = None
    for name in sorted(files):
        # The position lookup is a dict hit for the usual names and spares the regex.
        position = write_position(name)
        if position is not None or STATE_FILE.fullmatch(name):
            report = inspect(files[name])
            if report.problem is not None:
                problems.append(f"{name}: {report.problem}")
                if report.unreadable is not None:
                    unreadable.append(report.unreadable)
            elif name == "train_state.json":
                epoch, step = report.epoch, report.step
            mtime = report.mtime
            if position is not None and report.mtime_ns is not None:
                ordered.append((position, report.mtime_ns, name))
        else:
            mtime = _mtime_of_other_file(files[name])
        if mtime is not None and (newest is None or mtime > newest):
            newest = mtime
    return _Readings(problems, newest, ordered, unreadable, epoch, step)


def _mtime_of_other_file(entry: os.DirEntry[str]) -> float | None:
    # A file accelerate does not write still counts as a change to the folder, but its
    # loss (deleted, dangling link) says nothing about the state, so it is not a problem.
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return None


STILL_WRITTEN = "still being written"  # how a folder that has not settled yet is told


def _still_written(age: float) -> str:
    if age < 0:
        # A clock step or a network filesystem's skew; wait until it is in the past.
        return f"{STILL_WRITTEN} (last change {-age:.1f} s in the future)"
    return f"{STILL_WRITTEN} (last change {age:.1f} s ago)"


def _exists(folder: Path) -> bool:
    try:
        os.lstat(folder)
    except FileNotFoundError:
        return False
    return True


def newest_complete_first(candidates: list[Candidate]) -> list[Candidate]:
    """Complete candidates newest (by completion) first, then the rest: every trainer's order."""
    # Name descending first, so equal completion times (coarse mtimes) fall back to the
    # later name of one run; the stable sort by completion then decides everything else.
    by_name = sorted(candidates, key=lambda candidate: candidate.path.name, reverse=True)
    return sorted(
        by_name,
        key=lambda candidate: (
            not candidate.complete,
            candidate.completed_at is None,
            -(candidate.completed_at or 0.0),
        ),
    )
