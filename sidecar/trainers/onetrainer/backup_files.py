"""Whether one OneTrainer backup is whole, from its files: pure, facts about files in.

A backup (``GenericTrainer.__backup`` → ``model_saver.save(..., ModelFormat.INTERNAL)`` →
``GenericTrainer.__save_backup_config``) is written into a fresh folder in this order:

1. the weights: ``lora/lora.safetensors`` (``LoRASaverMixin._save_internal``),
   ``embeddings/<uuid>.safetensors`` (``EmbeddingSaverMixin._save_internal``), or a whole
   model's component folders (``transformer/``, ``unet/``, ``text_encoder/``... for a fine
   tune);
2. ``optimizer/optimizer.pt``, then ``ema/ema.pt`` when EMA is on, then ``meta.json``
   (``InternalModelSaverMixin._save_internal_data``);
3. ``onetrainer_config/args.json`` (+ ``concepts.json``, ``samples.json``), which nothing
   loads back.

Nothing marks the end and nothing is atomic. So a backup counts as whole when meta.json
parses and matches the folder's name, the weights and the optimizer are present and
structurally intact, meta.json is not older than any of them (the write order), and its
newest file has settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sidecar.checkpoints.accelerate_files import MIXED
from sidecar.checkpoints.access import UnreadableFile
from sidecar.checkpoints.scan import STILL_WRITTEN
from sidecar.trainers.onetrainer.backup_rules import (
    META_FILE,
    BackupName,
    TrainProgress,
    meta_problem,
)

__all__ = [
    "OPTIMIZER_FILE",
    "Assessment",
    "FileFacts",
    "Role",
    "assess_backup",
    "role_of",
]

Role = Literal["weights", "optimizer", "ema", "meta", "config", "other"]

OPTIMIZER_FILE = "optimizer/optimizer.pt"
EMA_FILE = "ema/ema.pt"
CONFIG_FOLDER = "onetrainer_config"  # GenericTrainer.__save_backup_config
# What the savers write weights as; ``inspect_state_file`` checks each of these kinds.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The files that must be whole for a resume, in the order they are written.
_BEFORE_META: tuple[Role, ...] = ("weights", "optimizer", "ema")


@dataclass(frozen=True)
class FileFacts:
    """One file of a backup as the scan saw it (``relative``: below the backup folder)."""

    relative: str
    role: Role
    problem: str | None  # the structural check's finding; None: intact or not checked
    mtime: float | None
    mtime_ns: int | None
    unreadable: UnreadableFile | None = None


@dataclass(frozen=True)
class Assessment:
    problems: tuple[str, ...]
    newest: float | None  # newest mtime of any of its files
    mixed: bool


def role_of(relative: str) -> Role:
    """What the file at ``relative`` (``"optimizer/optimizer.pt"``) is in a backup."""
    if relative == META_FILE:
        return "meta"
    if relative == OPTIMIZER_FILE:
        return "optimizer"
    if relative == EMA_FILE:
        return "ema"
    folder = relative.split("/", 1)[0] if "/" in relative else ""
    if folder == CONFIG_FOLDER:
        return "config"
    if folder not in ("optimizer", "ema") and relative.lower().endswith(WEIGHT_SUFFIXES):
        return "weights"
    return "other"


def assess_backup(
    name: BackupName | None,
    files: Sequence[FileFacts],
    folders: frozenset[str],
    meta: TrainProgress | str | None,
    *,
    now: float,
    settle_seconds: float,
) -> Assessment:
    """What keeps the backup named ``name`` from being resumed (``folders``: its subfolders;
    ``meta``: meta.json's progress, or why it could not be read, None when absent)."""
    problems: list[str] = []
    if name is None:
        problems.append(
            "not named <timestamp>-backup-<step>-<epoch>-<epoch step>: not a backup OneTrainer "
            "wrote, yet continue_last_backup takes any folder here whose name sorts last"
        )
    by_role: dict[Role, list[FileFacts]] = {}
    for facts in files:
        by_role.setdefault(facts.role, []).append(facts)
        if facts.problem is not None:
            problems.append(f"{facts.relative}: {facts.problem}")
    if not by_role.get("weights"):
        problems.append("no model weights (lora/lora.safetensors or a model's folders)")
    if "optimizer" not in by_role:
        problems.append(f"{OPTIMIZER_FILE} missing (written after the weights)")
    if "ema" in folders and "ema" not in by_role:
        problems.append(f"{EMA_FILE} missing: ema/ was made, the file not written")
    if meta is None:
        problems.append(
            f"{META_FILE} missing (written after the optimizer): without it OneTrainer "
            "resumes a fine tune from step 0 without a word and cannot load a LoRA backup"
        )
    elif isinstance(meta, str):
        problems.append(f"{META_FILE}: {meta}")
    else:
        mismatch = meta_problem(name, meta)
        if mismatch is not None:
            problems.append(mismatch)
    newest = max((f.mtime for f in files if f.mtime is not None), default=None)
    mixed = None
    if newest is not None and settle_seconds > 0 and now - newest < settle_seconds:
        problems.append(_still_written(now - newest))
    else:
        mixed = _order_problem(by_role)
        if mixed is not None:
            problems.append(mixed)
    return Assessment(tuple(problems), newest, mixed is not None)


def _order_problem(by_role: dict[Role, list[FileFacts]]) -> str | None:
    """meta.json is written after the weights, the optimizer and the EMA; a file newer than
    it was written by another save (a folder reused, a copy merged over it)."""
    metas = [f.mtime_ns for f in by_role.get("meta", []) if f.mtime_ns is not None]
    if not metas:
        return None
    newer = sorted(
        f.relative
        for role in _BEFORE_META
        for f in by_role.get(role, [])
        if f.mtime_ns is not None and f.mtime_ns > metas[0]
    )
    if not newer:
        return None
    return (
        f"{MIXED}{newer[0]} is newer than {META_FILE}, which OneTrainer writes after it — "
        "files of more than one save"
    )


def _still_written(age: float) -> str:
    if age < 0:
        return f"{STILL_WRITTEN} (last change {-age:.1f} s in the future)"
    return f"{STILL_WRITTEN} (last change {age:.1f} s ago)"
