"""The HF Trainer's ``checkpoint-<N>`` folders: which are whole, which are in the way.

Read from transformers 5.24 (``src/transformers/trainer.py``, ``trainer_utils.py``):

- ``Trainer._save_checkpoint`` writes ``<output_dir>/checkpoint-<global_step>`` in this order:
  ``save_model`` (``model.safetensors`` or ``pytorch_model.bin``, sharded as
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, or for a PEFT
  model ``adapter_model.safetensors`` + ``adapter_config.json``; plus ``config.json`` and
  ``training_args.bin``), then ``_save_optimizer_and_scheduler`` (``optimizer.pt``,
  ``scheduler.pt``), ``_save_scaler`` (``scaler.pt``, mixed precision only),
  ``_save_rng_state`` (``rng_state.pth``, or ``rng_state_<rank>.pth`` for more than one
  process), and LAST ``trainer_state.json`` (``TrainerState.save_to_json``); then
  ``rotate_checkpoints`` deletes the oldest folders beyond ``save_total_limit``.
- Nothing marks a folder complete, so a folder counts only when ``trainer_state.json``
  parses, its ``global_step`` is the folder's number, it is the newest file of the folder
  (a save cut short after it rewrote other files of a reused folder leaves it older), and
  every other file of the save is present and structurally whole
  (``file_checks.inspect_state_file``).
- ``trainer_utils.get_last_checkpoint`` (what TrainingArguments scripts, LLaMA-Factory and
  ``resume_from_checkpoint=True`` resume from) takes the highest number matching
  ``^checkpoint\\-(\\d+)$`` with no check at all; ``sort_checkpoints`` (rotation) globs
  ``checkpoint-*`` and orders by folder mtime (by number on filesystems with coarse mtimes).

DeepSpeed and FSDP saves keep the optimizer (and sometimes the model) in files and folders of
their own: ``layouts`` says which, and what each must hold.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sidecar.checkpoints.file_checks import inspect_state_file
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate, newest_complete_first
from sidecar.trainers.hf_trainer.layouts import Listing, examine_layout, list_folder

__all__ = [
    "CHECKPOINT_NAME",
    "TRAINER_STATE",
    "aside_name",
    "find_checkpoints",
    "in_the_way",
    "trainer_state_step",
]

# trainer_utils._re_checkpoint, the name get_last_checkpoint takes.
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"
# A trainer_state.json holds the whole log_history (one entry per logging step): a long run
# with logging_steps=1 writes megabytes. Beyond this it is not a state file.
MAX_TRAINER_STATE_BYTES = 64 * 1024 * 1024
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_Read = TypeVar("_Read")
_RNG_STATE = re.compile(r"rng_state(?:_\d+)?\.pth")
# What Trainer._save_checkpoint writes before trainer_state.json, in that one process
# (transformers trainer.py: _save_checkpoint, _save_optimizer_and_scheduler,
# _save_rng_state): weights, optimizer, scheduler, scaler, rank 0's random state. Files
# written after it by design stay out of the order check: LLaMA-Factory's on_save callbacks
# (processor, value head; src/llamafactory/train/callbacks.py) and other ranks'
# rng_state_<r>.pth, which no barrier orders before rank 0's trainer_state.json.
# DeepSpeed's tag folder and ``latest`` and FSDP's files come before it too (layouts), all of
# them from the save's closing barrier or rank 0.
_BEFORE_STATE = re.compile(
    r"(?:model|pytorch_model|adapter_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
    r"|(?:optimizer|scheduler|scaler)\.pt|rng_state(?:_0)?\.pth"
    r"|latest|global_step\d+/.+_states\.pt"
    r"|pytorch_model_fsdp\S*\.bin|optimizer(?:_\d+)?\.bin"
    r"|(?:pytorch_model_fsdp|optimizer)_\d+/(?:\.metadata|.+\.distcp)"
)
# Files of a save that inspect_state_file checks by their kind when present.
_CHECKED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def aside_name(name: str, stamp: str) -> str:
    """The name a set-aside checkpoint gets: a prefix, because the rotation glob
    ``checkpoint-*`` would still match (and delete) ``checkpoint-N.<suffix>``, while
    ``incomplete-...`` matches neither it nor ``^checkpoint\\-(\\d+)$``."""
    return f"incomplete-{stamp}-{name}"


def in_the_way(candidates: Sequence[Candidate], chosen: Candidate | None) -> list[Candidate]:
    """Incomplete checkpoints that get_last_checkpoint would take over ``chosen``: every one
    whose number is higher (all of them when nothing is chosen)."""
    floor = chosen.number if chosen is not None and chosen.number is not None else -1
    return [
        candidate
        for candidate in candidates
        if not candidate.complete and candidate.number is not None and candidate.number > floor
    ]


def trainer_state_step(folder: Path) -> int | None:
    """``global_step`` of the folder's trainer_state.json; None when it cannot be read."""
    state = _read_trainer_state(folder / TRAINER_STATE)
    return state.global_step if isinstance(state, _TrainerState) else None


def find_checkpoints(
    output_dir: Path, *, now: float, settle_seconds: float, memo: FileReportMemo | None = None
) -> list[Candidate]:
    """Every ``checkpoint-<N>`` folder directly in ``output_dir``, complete ones newest
    first; a folder rotation deletes while it is read is left out. ``memo`` keeps the
    reports of files already checked (only new or changed ones are opened again)."""
    reads = _Reads(memo)
    try:
        with os.scandir(output_dir) as entries:
            folders = [
                (Path(entry.path), int(match.group(1)))
                for entry in entries
                if (match := CHECKPOINT_NAME.fullmatch(entry.name))
                and entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []
    candidates = []
    for folder, number in folders:
        candidate = _examine(folder, number, now=now, settle_seconds=settle_seconds, reads=reads)
        if candidate is not None:
            candidates.append(candidate)
    return newest_complete_first(candidates)


@dataclass(frozen=True)
class _Reads:
    """How a scan reads the files of a save: through the poll's memo when there is one, with
    the status the folder listing already took (no second stat)."""

    memo: FileReportMemo | None

    def __call__(
        self, read: Callable[[str], _Read], path: str, status: os.stat_result | None
    ) -> _Read:
        if self.memo is None or status is None:
            return read(path)
        return self.memo.recall(path, status, read)


@dataclass(frozen=True)
class _TrainerState:
    global_step: int
    epoch: float | None
    mtime_ns: int


def _read_trainer_state(path: str | Path) -> _TrainerState | str:
    """The state's step and epoch, or why it is not a whole trainer_state.json."""
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if status.st_size > MAX_TRAINER_STATE_BYTES:
                return f"{status.st_size} bytes is too large for {TRAINER_STATE}"
            raw = file.read()
    except FileNotFoundError:
        return f"{TRAINER_STATE} missing (the save did not finish: it is written last)"
    except OSError as error:
        return f"{TRAINER_STATE}: unreadable: {error.strerror or error}"
    try:
        state = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return f"{TRAINER_STATE}: not valid JSON (cut short?)"
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return f"{TRAINER_STATE}: no integer global_step"
    epoch = state.get("epoch")
    return _TrainerState(
        step, float(epoch) if isinstance(epoch, (int, float)) else None, status.st_mtime_ns
    )


def _examine(
    folder: Path, number: int, *, now: float, settle_seconds: float, reads: _Reads
) -> Candidate | None:
    try:
        listing = list_folder(folder)
    except FileNotFoundError:
        return None  # rotated away (save_total_limit) since the listing
    except OSError as error:
        return _candidate(folder, number, [f"unreadable: {error.strerror or error}"], None, None)
    problems, files = _missing(folder, listing)
    problems += _broken(folder, files, reads)
    state = reads(
        _read_trainer_state, os.path.join(folder, TRAINER_STATE), files.get(TRAINER_STATE)
    )
    newest_ns = max((status.st_mtime_ns for status in files.values()), default=None)
    if isinstance(state, str):
        problems.append(state)
    else:
        if state.global_step != number:
            problems.append(
                f"{TRAINER_STATE}: global_step {state.global_step} is not the folder's {number}"
            )
        older = sorted(
            name
            for name, status in files.items()
            if status.st_mtime_ns > state.mtime_ns and _BEFORE_STATE.fullmatch(name)
        )
        if older:
            # trainer_state.json is written last: a file newer than it is from a later save
            # into the same folder that did not finish.
            problems.append(
                f"{TRAINER_STATE} is older than {', '.join(older)}: a later save into "
                "this folder did not finish"
            )
    completed_at = newest_ns / 1e9 if newest_ns is not None else None
    if completed_at is not None and settle_seconds > 0 and now - completed_at < settle_seconds:
        problems.append(f"{STILL_WRITTEN} (last change {now - completed_at:.1f} s ago)")
    if problems and not folder.exists():
        return None  # deleted while read: its problems are an artefact of that
    good = state if isinstance(state, _TrainerState) else None
    return _candidate(folder, number, problems, completed_at, good)


def _missing(folder: Path, listing: Listing) -> tuple[list[str], dict[str, os.stat_result]]:
    """What the save lacks, and every file of it (sub-folders' as ``<folder>/<name>``)."""
    layout = examine_layout(folder, listing)
    files = {**listing.files, **layout.nested}
    problems = []
    has_weights = any(name in files for name in (*_WEIGHTS, *_WEIGHT_INDEXES, "adapter_model.bin"))
    if not has_weights and not layout.weights_elsewhere:
        problems.append(
            "model weights missing (model.safetensors, pytorch_model.bin, a sharded index "
            "or adapter_model.safetensors)"
        )
    if any(name.startswith("adapter_model.") for name in files) and (
        "adapter_config.json" not in files
    ):
        problems.append("adapter_config.json missing")
    problems += layout.problems
    if not any(_RNG_STATE.fullmatch(name) for name in files):
        problems.append("rng_state.pth missing")
    return problems, files


def _broken(folder: Path, files: dict[str, os.stat_result], reads: _Reads) -> list[str]:
    problems = []
    base = str(folder)
    for name in sorted(files):
        if name.endswith(_CHECKED_SUFFIXES):
            report = reads(inspect_state_file, os.path.join(base, name), files[name])
            if report.problem is not None:
                problems.append(f"{name}: {report.problem}")
    for index in _WEIGHT_INDEXES:
        if index in files:
            problems.extend(_shards_missing(folder / index, files))
    return problems


def _shards_missing(index: Path, files: dict[str, os.stat_result]) -> list[str]:
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError):
        return [f"{index.name}: not a readable weight index"]
    return [f"{shard} missing (listed in {index.name})" for shard in shards if shard not in files]


def _candidate(
    folder: Path,
    number: int,
    problems: list[str],
    completed_at: float | None,
    state: _TrainerState | None,
) -> Candidate:
    return Candidate(
        path=folder,
        kind="step",
        number=number,
        complete=not problems,
        problems=tuple(problems),
        completed_at=completed_at,
        step=state.global_step if state else None,
        epoch=int(state.epoch) if state and state.epoch is not None else None,
    )
