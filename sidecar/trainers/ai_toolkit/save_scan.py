"""Finding ai-toolkit's saves in its save root and telling the whole ones from the rest.

A save is one ``.safetensors`` file written in place (not atomically) by ``save(step)``
(``jobs/process/BaseSDTrainProcess.py``), then the one shared ``optimizer.pt`` overwritten,
then ``clean_up_saves`` removes old saves (see ``save_names``). So:

- a save file is complete when it is structurally whole (``inspect_state_file``: header,
  offsets, size) and has settled;
- the NEWEST whole save (by ctime, the order ai-toolkit resumes by) is also checked against
  ``optimizer.pt``: present, whole, and written after it. When it is not, the save stays
  complete - its weights and step are intact, and no older save has a better optimizer
  state, since there is only one file for all of them and nothing can restore an earlier
  version - but the candidate says so in one problem starting with
  :data:`OPTIMIZER_NOT_RESTORABLE`: resuming from it starts the optimizer afresh (ai-toolkit's
  ``run()`` catches a failed ``optimizer.pt`` load, prints it and trains on; a missing one
  it skips without a word). An ``optimizer.pt`` still being written leaves the save
  incomplete: the save is not over.
- anything else ``get_latest_save_path`` would load (every entry named ``<name>*``) is listed
  as incomplete, so that the sidecar can set it aside when it is newer than the choice.

A file removed while it is read (``clean_up_saves``) is left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sidecar.checkpoints.file_checks import FileReport, inspect_state_file
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate, newest_complete_first
from sidecar.trainers.ai_toolkit import save_names

__all__ = ["NOT_A_SAVE", "OPTIMIZER_NOT_RESTORABLE", "change_time", "find_saves"]

OPTIMIZER_NOT_RESTORABLE = "optimizer state not restorable"
NOT_A_SAVE = "not a save the sidecar can check"
_SHARED = (
    "ai-toolkit keeps ONE optimizer.pt for all saves, overwritten at each, so no other save "
    "can restore it: resuming from this save starts the optimizer state afresh"
)


def find_saves(
    save_root: Path,
    *,
    name: str | None,
    now: float,
    settle_seconds: float,
    memo: FileReportMemo | None = None,
    save_root_view: str | None = None,
) -> list[Candidate]:
    """Every save in ``save_root`` (the sidecar's view; ``save_root_view``: the trainer's,
    which ``get_latest_save_path``'s filters read), complete ones newest first."""
    inspect = memo.inspect if memo is not None else _inspect_entry
    view = save_root_view if save_root_view is not None else str(save_root)
    candidates = []
    changed: dict[Path, float] = {}
    for entry in _entries(save_root):
        found = _examine(entry, name, view, now=now, settle=settle_seconds, inspect=inspect)
        if found is not None:
            candidate, ctime = found
            candidates.append(candidate)
            changed[candidate.path] = ctime
    whole = [candidate for candidate in candidates if candidate.complete]
    if whole:
        newest = max(whole, key=lambda candidate: changed[candidate.path])
        checked = _with_optimizer_check(newest, save_root, now=now, settle=settle_seconds)
        candidates = [checked if c is newest else c for c in candidates]
    return newest_complete_first(candidates)


def change_time(path: Path) -> float | None:
    """``os.path.getctime`` without following a link; None when it is gone."""
    try:
        return os.lstat(path).st_ctime
    except OSError:
        return None


def _entries(save_root: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(save_root) as entries:
            return [entry for entry in entries if not entry.name.startswith(".")]
    except FileNotFoundError:
        return []


def _inspect_entry(entry: os.DirEntry[str]) -> FileReport:
    return inspect_state_file(entry.path)


def _examine(
    entry: os.DirEntry[str],
    name: str | None,
    view: str,
    *,
    now: float,
    settle: float,
    inspect: Callable[[os.DirEntry[str]], FileReport],
) -> tuple[Candidate, float] | None:
    file_name = entry.name
    step = save_names.step_of_save(file_name, name)
    final = name is not None and file_name == save_names.final_name(name)
    if step is None and not final:
        if name is None or not save_names.latest_rule_sees(view, name, file_name):
            return None
        return _not_a_save(entry, name)
    if name is not None and not save_names.latest_rule_sees(view, name, file_name):
        return None  # its own path hides it from ai-toolkit's resume (e.g. "_cn" in a folder)
    ctime = change_time(Path(entry.path))
    if ctime is None:
        return None  # pruned since the listing
    report = inspect(entry)
    problems = []
    if report.problem is not None:
        if change_time(Path(entry.path)) is None:
            return None
        problems.append(f"{file_name}: {report.problem}")
    mtime = report.mtime
    if mtime is not None and settle > 0 and now - mtime < settle:
        problems.append(_still_written(file_name, now - mtime))
    candidate = Candidate(
        path=Path(entry.path),
        kind="final" if final else "step",
        number=step,
        complete=not problems,
        problems=tuple(problems),
        completed_at=mtime,
        step=step,
        epoch=None,
        unreadable=(report.unreadable,) if report.unreadable is not None else (),
    )
    return candidate, ctime


def _not_a_save(entry: os.DirEntry[str], name: str) -> tuple[Candidate, float] | None:
    try:
        status = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    why = (
        f"{entry.name}: {NOT_A_SAVE}, yet ai-toolkit's get_latest_save_path loads it when it is "
        f"the newest entry named {name}*"
    )
    candidate = Candidate(
        path=Path(entry.path),
        kind="step",
        number=None,
        complete=False,
        problems=(why,),
        completed_at=status.st_mtime,
        step=None,
        epoch=None,
    )
    return candidate, status.st_ctime


def _with_optimizer_check(
    save: Candidate, save_root: Path, *, now: float, settle: float
) -> Candidate:
    optimizer = save_root / save_names.OPTIMIZER_FILE
    report = inspect_state_file(optimizer)
    if report.mtime is not None and settle > 0 and now - report.mtime < settle:
        # The save goes on until optimizer.pt (and the pruning after it) is written.
        still = _still_written(save_names.OPTIMIZER_FILE, now - report.mtime)
        return replace(save, complete=False, problems=(*save.problems, still))
    if report.problem is not None:
        what = "is missing" if _missing(optimizer) else f"is broken ({report.problem})"
    elif (
        report.mtime_ns is not None
        and save.completed_at is not None
        and report.mtime_ns < int(save.completed_at * 1e9) - 1_000_000
    ):
        what = "is older than this save (the optimizer state of an earlier save)"
    else:
        return save
    note = f"{OPTIMIZER_NOT_RESTORABLE}: {save_names.OPTIMIZER_FILE} {what}; {_SHARED}"
    return replace(save, problems=(*save.problems, note))


def _missing(path: Path) -> bool:
    return change_time(path) is None


def _still_written(file_name: str, age: float) -> str:
    if age < 0:
        return f"{STILL_WRITTEN} ({file_name} changed {-age:.1f} s in the future)"
    return f"{STILL_WRITTEN} ({file_name} changed {age:.1f} s ago)"
