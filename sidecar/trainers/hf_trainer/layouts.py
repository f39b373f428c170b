"""What a ``checkpoint-<N>`` folder must hold, by how the Trainer saved the optimizer.

Read from transformers 5.24 (``trainer.py``: ``save_model``, ``_save_optimizer_and_scheduler``,
``_load_optimizer_and_scheduler``; ``integrations/deepspeed.py``: ``deepspeed_load_checkpoint``),
DeepSpeed at 38327e0 (``runtime/engine.py``: ``save_checkpoint``, ``_get_ckpt_name``,
``_get_rank_zero_ckpt_name``) and accelerate 1.6 (``utils/fsdp_utils.py``,
``utils/constants.py``):

- **Plain** (one process, DDP): ``optimizer.pt`` and ``scheduler.pt`` beside the weights.
- **DeepSpeed**: ``engine.save_checkpoint(<checkpoint-N>)`` writes a tag folder
  ``global_step<steps>/`` holding ``mp_rank_<mp>_model_states.pt`` (ZeRO-3:
  ``zero_pp_rank_<r>_mp_rank_<mp>_model_states.pt`` per rank) and, with ZeRO or bf16, each
  data-parallel rank's ``[bf16_]zero_pp_rank_<r>_mp_rank_<mp>_optim_states.pt``; then, after
  every rank's files, rank 0 writes ``latest`` (the tag) and all ranks meet at a barrier.
  There is no ``optimizer.pt``; ``scheduler.pt`` only for a scheduler DeepSpeed does not own;
  under ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` the top-level weights are
  removed (they live in the tag folder). ``deepspeed_load_checkpoint`` takes a folder as a
  DeepSpeed checkpoint when it has a ``global_step*`` entry, and loads the tag ``latest`` names.
- **FSDP**: the model as ``pytorch_model_fsdp.bin`` (full state dict),
  ``pytorch_model_fsdp_rank<r>.bin`` (local) or the folder ``pytorch_model_fsdp_0/`` (sharded,
  torch.distributed.checkpoint), the optimizer as ``optimizer.bin`` or ``optimizer_0/``;
  ``scheduler.pt`` as usual. A distributed-checkpoint folder is whole once its ``.metadata`` is
  there: the coordinator writes it after every rank's data files.

Each layout names what is missing, and the files of its sub-folders whose order against
``trainer_state.json`` (written after all of them) tells a whole save from a cut one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Findings", "Listing", "examine_layout", "list_folder"]

# The files a plain save writes beside the weights (what DeepSpeed replaces).
PLAIN_REQUIRED = ("optimizer.pt", "scheduler.pt")
DEEPSPEED_TAG = re.compile(r"global_step\d+")
DEEPSPEED_LATEST = "latest"
_MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
FSDP_MODEL = re.compile(r"pytorch_model_fsdp(?:_\d+)?(?:_rank\d+)?\.bin")
FSDP_MODEL_FOLDER = re.compile(r"pytorch_model_fsdp_\d+")
FSDP_OPTIMIZER = re.compile(r"optimizer(?:_\d+)?\.bin")
FSDP_OPTIMIZER_FOLDER = re.compile(r"optimizer_\d+")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's, written last by the coordinator
_MAX_TAG_BYTES = 4096


@dataclass(frozen=True)
class Listing:
    """One folder's entries: file names with their status (links not followed, so only
    regular files), and sub-folder names."""

    files: dict[str, os.stat_result]
    folders: frozenset[str]


@dataclass
class Findings:
    """What a layout found: what is missing, and files of its sub-folders
    (``<folder>/<name>`` -> status) to check like the top-level ones."""

    problems: list[str] = field(default_factory=list)
    nested: dict[str, os.stat_result] = field(default_factory=dict)
    weights_elsewhere: bool = False  # the model is in the layout's own files


def list_folder(folder: Path) -> Listing:
    """Files and sub-folders directly in ``folder`` (no symlinks followed); raises OSError."""
    files: dict[str, os.stat_result] = {}
    folders = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                files[entry.name] = entry.stat(follow_symlinks=False)
            elif entry.is_dir(follow_symlinks=False):
                folders.add(entry.name)
    return Listing(files, frozenset(folders))


def examine_layout(folder: Path, listing: Listing) -> Findings:
    """The layout of the save in ``folder`` and what it lacks."""
    if any(DEEPSPEED_TAG.fullmatch(name) for name in listing.folders):
        return _deepspeed(folder, listing)
    if any(FSDP_MODEL.fullmatch(name) for name in listing.files) or any(
        FSDP_MODEL_FOLDER.fullmatch(name) for name in listing.folders
    ):
        return _fsdp(folder, listing)
    found = Findings()
    found.problems = [f"{name} missing" for name in PLAIN_REQUIRED if name not in listing.files]
    return found


def _deepspeed(folder: Path, listing: Listing) -> Findings:
    found = Findings(weights_elsewhere=True)
    if DEEPSPEED_LATEST not in listing.files:
        found.problems.append(
            f"{DEEPSPEED_LATEST} missing (DeepSpeed writes it after every rank's files)"
        )
        return found
    try:
        with open(folder / DEEPSPEED_LATEST, "rb") as file:
            tag = file.read(_MAX_TAG_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        found.problems.append(f"{DEEPSPEED_LATEST}: unreadable: {error}")
        return found
    if not tag or "/" in tag or tag.startswith(".") or tag not in listing.folders:
        found.problems.append(
            f"{DEEPSPEED_LATEST} names {tag!r}, which is not a folder of this checkpoint"
        )
        return found
    try:
        tagged = list_folder(folder / tag)
    except OSError as error:
        found.problems.append(f"{tag}/: unreadable: {error}")
        return found
    found.nested = {f"{tag}/{name}": status for name, status in tagged.files.items()}
    model = _ranks(tagged.files, _MODEL_STATES)
    if not model:
        found.problems.append(f"{tag}/: no *_model_states.pt (the model's DeepSpeed state)")
    found.problems += _ranks_missing(tag, "model states", model)
    found.problems += _ranks_missing(tag, "optimizer states", _ranks(tagged.files, _OPTIM_STATES))
    return found


def _ranks(files: dict[str, os.stat_result], pattern: re.Pattern[str]) -> dict[int, set[int]]:
    """Per model-parallel rank, the data-parallel ranks that wrote a file (-1: unpartitioned)."""
    ranks: dict[int, set[int]] = {}
    for name in files:
        if match := pattern.fullmatch(name):
            data_rank = int(match.group(1)) if match.group(1) is not None else -1
            ranks.setdefault(int(match.group(2)), set()).add(data_rank)
    return ranks


def _ranks_missing(tag: str, what: str, ranks: dict[int, set[int]]) -> list[str]:
    """Every data-parallel rank below the highest seen wrote its file (a rank cut short
    before its write leaves a gap; one above the highest is covered by the order check:
    trainer_state.json comes after DeepSpeed's closing barrier)."""
    problems = []
    for model_rank, data_ranks in sorted(ranks.items()):
        partitioned = sorted(rank for rank in data_ranks if rank >= 0)
        if partitioned:
            gaps = sorted(set(range(partitioned[-1] + 1)) - set(partitioned))
            if gaps:
                problems.append(
                    f"{tag}/: {what} of data-parallel rank(s) "
                    f"{', '.join(map(str, gaps))} missing (model-parallel rank {model_rank})"
                )
    return problems


def _fsdp(folder: Path, listing: Listing) -> Findings:
    found = Findings(weights_elsewhere=True)
    for name in sorted(listing.folders):
        if FSDP_MODEL_FOLDER.fullmatch(name) or FSDP_OPTIMIZER_FOLDER.fullmatch(name):
            found.problems += _sharded(folder, name, found)
    has_optimizer = any(FSDP_OPTIMIZER.fullmatch(name) for name in listing.files) or any(
        FSDP_OPTIMIZER_FOLDER.fullmatch(name) for name in listing.folders
    )
    if not has_optimizer:
        found.problems.append("optimizer missing (optimizer.bin or optimizer_0/)")
    if "scheduler.pt" not in listing.files:
        found.problems.append("scheduler.pt missing")
    return found


def _sharded(folder: Path, name: str, found: Findings) -> list[str]:
    """A torch.distributed.checkpoint folder: whole once its .metadata is written."""
    try:
        sharded = list_folder(folder / name)
    except OSError as error:
        return [f"{name}/: unreadable: {error}"]
    found.nested.update({f"{name}/{file}": status for file, status in sharded.files.items()})
    if DCP_METADATA not in sharded.files:
        return [f"{name}/{DCP_METADATA} missing (written after every rank's shards)"]
    if not any(file.endswith(".distcp") for file in sharded.files):
        return [f"{name}/: no .distcp shard"]
    return []
