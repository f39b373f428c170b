"""OneTrainer's backup folders: their names, what ``meta.json`` says, and the rules by which
OneTrainer itself picks and prunes them. Pure: names and parsed JSON in, answers out.

Read from Nerogar/OneTrainer (master, 23df3832):

- ``GenericTrainer.__backup`` writes ``<workspace_dir>/backup/<timestamp>-backup-<progress>``
  where the timestamp is ``time_util.get_string_timestamp()`` (local time,
  ``%Y-%m-%d_%H-%M-%S``) and ``<progress>`` is ``TrainProgress.filename_string()``:
  ``<global_step>-<epoch>-<epoch_step>``. No prefix (``save_filename_prefix`` names saves,
  not backups).
- ``TrainConfig.get_last_backup_path`` (what ``continue_last_backup`` resumes from, in
  ``GenericTrainer.start``) lists every *directory* in ``backup/`` (``os.listdir`` +
  ``os.path.isdir``: any name, hidden ones and links to folders included), sorts the names
  descending as strings and takes the first, with no check of its contents.
- ``GenericTrainer.__prune_backups`` (``rolling_backup``) lists the same way and deletes
  every directory past the first ``rolling_backup_count``, whatever its name.
- ``InternalModelSaverMixin._save_internal_data`` writes ``meta.json`` as
  ``{"train_progress": {"epoch", "epoch_step", "epoch_sample", "global_step"}}``, after the
  weights, ``optimizer/optimizer.pt`` and ``ema/ema.pt``; ``InternalModelLoaderMixin.
  _load_internal_data`` restores the progress (and the optimizer) only when it exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.checkpoints.scan import Candidate, newest_complete_first

__all__ = [
    "BACKUP_FOLDER",
    "META_FILE",
    "BackupName",
    "TrainProgress",
    "aside_name",
    "meta_problem",
    "onetrainer_order",
    "parse_backup_name",
    "picked_before",
    "read_meta",
]

BACKUP_FOLDER = "backup"  # under workspace_dir (GenericTrainer.__backup)
META_FILE = "meta.json"
# meta.json holds four integers; anything this large is not one of OneTrainer's.
MAX_META_BYTES = 64 * 1024

_NAME = re.compile(
    r"(?P<stamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-backup-"
    r"(?P<global_step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)"
)


@dataclass(frozen=True)
class BackupName:
    """What a backup folder's name says."""

    stamp: str  # local time of the backup's start, as OneTrainer formats it
    global_step: int
    epoch: int
    epoch_step: int


@dataclass(frozen=True)
class TrainProgress:
    """The position a backup's meta.json records (OneTrainer's ``TrainProgress``)."""

    epoch: int
    epoch_step: int
    epoch_sample: int
    global_step: int


def parse_backup_name(name: str) -> BackupName | None:
    """The parts of a name ``GenericTrainer.__backup`` writes; None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return BackupName(
        stamp=match["stamp"],
        global_step=int(match["global_step"]),
        epoch=int(match["epoch"]),
        epoch_step=int(match["epoch_step"]),
    )


def read_meta(raw: bytes) -> TrainProgress | str:
    """The progress in meta.json's bytes, or why they are not a meta.json OneTrainer wrote."""
    if len(raw) > MAX_META_BYTES:
        return f"{len(raw)} bytes is too large for meta.json"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not valid JSON (cut short?)"
    progress = meta.get("train_progress") if isinstance(meta, dict) else None
    if not isinstance(progress, dict):
        return "no train_progress object"
    values = {}
    for key in ("epoch", "epoch_step", "epoch_sample", "global_step"):
        value = progress.get(key)
        # _load_internal_data indexes all four: a missing one makes the load fail.
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"train_progress.{key} is not a count"
        values[key] = value
    return TrainProgress(**values)


def meta_problem(name: BackupName | None, progress: TrainProgress) -> str | None:
    """Why meta.json does not belong to the backup named ``name``; None when it does."""
    if name is None:
        return None
    said = (progress.global_step, progress.epoch, progress.epoch_step)
    named = (name.global_step, name.epoch, name.epoch_step)
    if said != named:
        return (
            f"meta.json records step {said[0]} (epoch {said[1]}, epoch step {said[2]}) but the "
            f"folder is named for step {named[0]} (epoch {named[1]}, epoch step {named[2]})"
        )
    return None


def onetrainer_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Complete backups in the order ``get_last_backup_path`` prefers them (greatest name
    first), then the rest, newest completion first.

    Not newest completion first: the sidecar's choice must be the backup OneTrainer will
    load once the incomplete ones above it are set aside, and OneTrainer goes by the name.
    The two orders differ where timestamps do not: two backups in one second (the step then
    compares as a string, ``backup-9-`` above ``backup-13-``; the last backup of
    ``backup_before_save`` can follow the previous one within a second) or a clock set back
    (local time, daylight saving). Choosing by completion there would point at a backup
    that OneTrainer passes over.
    """
    complete = sorted(
        (c for c in candidates if c.complete), key=lambda c: c.path.name, reverse=True
    )
    return complete + newest_complete_first([c for c in candidates if not c.complete])


def picked_before(candidates: Sequence[Candidate], chosen: Candidate | None) -> list[Candidate]:
    """The states in ``backup/`` that ``get_last_backup_path`` would take before ``chosen``.

    It takes the name that sorts last as a string, so every folder whose name sorts after
    ``chosen``'s is in the way: incomplete ones, and also a complete one the sidecar passed
    over (quarantined after a failed resume, or dated earlier by a clock set back — local
    time — though written later). None chosen: the sidecar starts from scratch with
    ``continue_last_backup`` off, and OneTrainer then looks at no backup.
    """
    if chosen is None:
        return []
    return [
        candidate
        for candidate in candidates
        if candidate.path.parent == chosen.path.parent and candidate.path.name > chosen.path.name
    ]


def aside_name(state: Path, stamp: str) -> Path:
    """Where ``state`` (in ``<workspace>/backup``) goes when set aside: beside the backup
    folder, in the workspace itself, never inside ``backup/``.

    Inside ``backup/`` no name is safe. ``get_last_backup_path`` takes the greatest name:
    a suffix on the newest timestamp is greater still, and so is any name that is not a
    timestamp (``old``, ``incomplete-...``). ``__prune_backups`` deletes every name below the
    ``rolling_backup_count`` greatest: a name below every timestamp (a leading ``.``) is the
    first it deletes. Nothing in OneTrainer lists the workspace itself (it only joins
    ``backup``, ``save``, ``config``, ``samples`` and ``tensorboard`` under it).
    """
    return state.parent.parent / f"{state.name}.incomplete-{stamp}"
