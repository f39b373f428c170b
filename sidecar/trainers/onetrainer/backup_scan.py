"""Listing and reading OneTrainer's backups in ``<workspace>/backup``: the file I/O around
``backup_files.assess_backup``.

The listing is the one OneTrainer itself makes (``TrainConfig.get_last_backup_path``,
``GenericTrainer.__prune_backups``): every directory, whatever its name, because every one
of them is a folder OneTrainer could resume from or delete. Each is read one level deep
(weights folders, ``optimizer/``, ``ema/``, ``onetrainer_config/``); only file headers are
read (``file_checks``), and meta.json whole. A backup that rolling pruning deletes while it
is read is left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.checkpoints.access import denial
from sidecar.checkpoints.file_checks import FileReport, inspect_state_file
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import Candidate
from sidecar.trainers.onetrainer.backup_files import FileFacts, assess_backup, role_of
from sidecar.trainers.onetrainer.backup_rules import (
    BACKUP_FOLDER,
    MAX_META_BYTES,
    META_FILE,
    TrainProgress,
    onetrainer_order,
    parse_backup_name,
    read_meta,
)

__all__ = ["find_backups", "meta_progress"]


def find_backups(
    workspace: Path, *, now: float, settle_seconds: float, memo: FileReportMemo | None = None
) -> list[Candidate]:
    """Every folder in ``<workspace>/backup``: whole ones in OneTrainer's own order of
    preference (``onetrainer_order``), then the rest."""
    found = []
    for entry in _listed_folders(workspace / BACKUP_FOLDER):
        candidate = _examine(entry, now=now, settle_seconds=settle_seconds, memo=memo)
        if candidate is not None:
            found.append(candidate)
    return onetrainer_order(found)


def meta_progress(backup: Path) -> TrainProgress | None:
    """The progress ``<backup>/meta.json`` records; None when absent or not readable."""
    progress = _read_meta_file(str(backup / META_FILE))
    return progress if isinstance(progress, TrainProgress) else None


def _listed_folders(backup_dir: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(backup_dir) as entries:
            return [entry for entry in entries if _is_folder(entry, follow=True)]
    except (FileNotFoundError, NotADirectoryError):
        return []  # no backup yet


def _is_folder(entry: os.DirEntry[str], *, follow: bool) -> bool:
    try:
        # os.path.isdir, as OneTrainer lists: a link to a folder counts.
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def _examine(
    entry: os.DirEntry[str], *, now: float, settle_seconds: float, memo: FileReportMemo | None
) -> Candidate | None:
    folder = Path(entry.path)
    name = parse_backup_name(entry.name)
    number = name.global_step if name else None
    if entry.is_symlink():
        # Not entered (a link may lead anywhere); OneTrainer would load what it points to.
        return _not_resumable(folder, number, "a symbolic link to a folder; not followed")
    try:
        files, folders = _listing(entry.path)
    except FileNotFoundError:
        return None  # pruned by rolling_backup since the listing
    except OSError as error:
        refused = denial(entry.path, error, is_folder=True)
        return _not_resumable(
            folder,
            number,
            f"unreadable: {error.strerror or error}",
            unreadable=(refused,) if refused else (),
        )
    reports = {relative: _report(relative, file, memo) for relative, file in files.items()}
    facts = [_facts(relative, reports[relative]) for relative in sorted(files)]
    meta = _meta_of(files.get(META_FILE), reports.get(META_FILE))
    assessment = assess_backup(name, facts, folders, meta, now=now, settle_seconds=settle_seconds)
    if assessment.problems and not os.path.lexists(folder):
        return None  # deleted while read: its problems are an artefact of that
    progress = meta if isinstance(meta, TrainProgress) else None
    return Candidate(
        path=folder,
        kind="step",
        number=number,
        complete=not assessment.problems,
        problems=assessment.problems,
        completed_at=assessment.newest,
        step=progress.global_step if progress else None,
        epoch=progress.epoch if progress else None,
        mixed=assessment.mixed,
        unreadable=tuple(f.unreadable for f in facts if f.unreadable is not None),
    )


def _not_resumable(
    folder: Path, number: int | None, problem: str, *, unreadable: tuple = ()
) -> Candidate:
    return Candidate(
        path=folder,
        kind="step",
        number=number,
        complete=False,
        problems=(problem,),
        completed_at=None,
        step=None,
        epoch=None,
        unreadable=unreadable,
    )


def _listing(folder: str) -> tuple[dict[str, os.DirEntry[str]], frozenset[str]]:
    """The files of a backup one level deep, by path below it, and its subfolders' names."""
    files: dict[str, os.DirEntry[str]] = {}
    folders = set()
    with os.scandir(folder) as entries:
        top = list(entries)
    for entry in top:
        if not _is_folder(entry, follow=False):
            files[entry.name] = entry
            continue
        folders.add(entry.name)
        try:
            with os.scandir(entry.path) as inner:
                for file in inner:
                    if not _is_folder(file, follow=False):
                        files[f"{entry.name}/{file.name}"] = file
        except FileNotFoundError:
            raise  # the whole backup went (pruning): the caller leaves it out
        except OSError:
            continue  # an unreadable subfolder: its files count as missing
    return files, frozenset(folders)


def _report(
    relative: str, entry: os.DirEntry[str], memo: FileReportMemo | None
) -> FileReport | os.stat_result | None:
    """The structural check of a file a resume loads; the status of any other one."""
    if role_of(relative) in ("weights", "optimizer", "ema", "meta"):
        return memo.inspect(entry) if memo is not None else inspect_state_file(entry.path)
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None  # a file nothing loads (a config copy) that went: not a problem


def _facts(relative: str, report: FileReport | os.stat_result | None) -> FileFacts:
    role = role_of(relative)
    if isinstance(report, FileReport):
        # meta.json's contents are judged by read_meta, in OneTrainer's terms (_meta_of).
        problem = None if role == "meta" else report.problem
        return FileFacts(relative, role, problem, report.mtime, report.mtime_ns, report.unreadable)
    if report is None:
        return FileFacts(relative, role, None, None, None)
    return FileFacts(relative, role, None, report.st_mtime, report.st_mtime_ns)


def _meta_of(
    entry: os.DirEntry[str] | None, report: FileReport | os.stat_result | None
) -> TrainProgress | str | None:
    if entry is None:
        return None
    if isinstance(report, FileReport) and (
        report.unreadable is not None or report.problem in _NOT_READ
    ):
        return report.problem  # a FIFO must not be opened, a refused file cannot be
    return _read_meta_file(entry.path)


# What the structural check finds that reading meta.json must not try (a FIFO blocks).
_NOT_READ = frozenset({"not a regular file", "empty file"})


def _read_meta_file(path: str) -> TrainProgress | str | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_META_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    return read_meta(raw)
