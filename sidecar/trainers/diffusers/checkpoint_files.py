"""Whether a diffusers ``checkpoint-<step>`` folder is whole: accelerate's files plus the
weights the script's own save hook writes in their place.

``accelerator.save_state`` (huggingface/accelerate ``Accelerator.save_state``) calls the
registered save pre-hooks first, then ``checkpointing.save_accelerator_state`` writes the
weights left in its list, ``optimizer.bin``, ``scheduler.bin``, the samplers, ``scaler.pt``
and ``random_states_<i>.pkl`` last. diffusers' LoRA scripts register a ``save_model_hook``
(e.g. ``examples/dreambooth/train_dreambooth_lora_flux.py`` ``main.save_model_hook``) that
writes ``pytorch_lora_weights.safetensors`` (``*Pipeline.save_lora_weights``) and pops every
model from the list, so accelerate writes no ``model.safetensors``; the full fine-tunes'
hooks (``controlnet/train_controlnet.py``, ``text_to_image/train_text_to_image.py``) write
``<model>/diffusion_pytorch_model.safetensors`` with ``save_pretrained`` instead (in shards
named by ``diffusion_pytorch_model.safetensors.index.json`` when the model is large).

The shared accelerate scan (``sidecar.checkpoints.scan.find_candidates``) judges
everything but the weights: presence, structure, settling and write order of accelerate's
own files. Here its "weights missing" is replaced by the hook's file, checked the same way,
and that file must be no newer than ``optimizer.bin``: it comes first in one save, so a
newer one was left by a save into the same folder that died before the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sidecar.checkpoints.accelerate_files import MIXED, missing_files
from sidecar.checkpoints.file_checks import FileReport, inspect_state_file
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import (
    STILL_WRITTEN,
    Candidate,
    find_candidates,
    newest_complete_first,
)
from sidecar.trainers.diffusers.state_naming import state_naming

__all__ = ["LORA_WEIGHTS", "MODEL_WEIGHTS", "find_checkpoints"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers SAFETENSORS_WEIGHTS_NAME
MODEL_INDEX = MODEL_WEIGHTS + ".index.json"  # diffusers SAFE_WEIGHTS_INDEX_NAME
# The problem(s) the accelerate scan gives a folder without accelerate's own weights file.
_NO_ACCELERATE_WEIGHTS = frozenset(missing_files(())) - frozenset(
    missing_files(("model.safetensors",))
)
_FIRST_ACCELERATE_FILE = "optimizer.bin"
WEIGHTS_MISSING = (
    f"weights missing ({LORA_WEIGHTS}, <model>/{MODEL_WEIGHTS} or accelerate's model.safetensors)"
)


def find_checkpoints(
    output_dir: Path,
    *,
    now: float,
    settle_seconds: float,
    memo: FileReportMemo | None = None,
) -> list[Candidate]:
    """Every ``checkpoint-<step>`` (and unnamed accelerate) folder in ``output_dir``: whole
    ones newest first, then the rest, each incomplete one saying why."""
    found = find_candidates(
        output_dir,
        now=now,
        settle_seconds=settle_seconds,
        output_name=None,
        naming=state_naming,
        memo=memo,
    )
    judged = []
    for candidate in found:
        checked = _with_hook_weights(candidate, memo)
        if checked is not None:
            judged.append(checked)
    return newest_complete_first(judged)


def _with_hook_weights(candidate: Candidate, memo: FileReportMemo | None) -> Candidate | None:
    if not _NO_ACCELERATE_WEIGHTS.intersection(candidate.problems):
        return candidate  # accelerate wrote the weights itself (no hook), or it is unreadable
    try:
        weights = _hook_weights(candidate.path, memo)
    except FileNotFoundError:
        return None  # pruned by --checkpoints_total_limit while it was read
    except OSError:
        return candidate  # the scan already named what it could not read
    problems = [p for p in candidate.problems if p not in _NO_ACCELERATE_WEIGHTS]
    if weights is None:  # the save hook had not run yet, or died first
        problems.insert(0, WEIGHTS_MISSING)
        return dataclasses.replace(candidate, problems=tuple(problems))
    name, report = weights
    if report.problem is not None:
        problems.append(f"{name}: {report.problem}")
    elif not any(p.startswith((MIXED, STILL_WRITTEN)) for p in problems):
        # A save under way is out of order until it ends, as the scan says for its own files.
        stale = _newer_than_optimizer(candidate.path, name, report)
        if stale is not None:
            problems.append(stale)
    return dataclasses.replace(
        candidate,
        complete=not problems,
        problems=tuple(problems),
        mixed=candidate.mixed or any(p.startswith(MIXED) for p in problems),
    )


def _hook_weights(folder: Path, memo: FileReportMemo | None) -> tuple[str, FileReport] | None:
    """The weights the save hook wrote (its name inside the folder and its report), if any."""
    with os.scandir(folder) as entries:
        listed = {entry.name: entry for entry in entries}
    lora = listed.get(LORA_WEIGHTS)
    if lora is not None and not lora.is_dir(follow_symlinks=False):
        return LORA_WEIGHTS, _inspect(lora, memo)
    for name in sorted(listed):
        entry = listed[name]
        if name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        model = Path(entry.path) / MODEL_WEIGHTS
        if model.exists():
            return f"{name}/{MODEL_WEIGHTS}", inspect_state_file(model)
        index = Path(entry.path) / MODEL_INDEX
        if index.exists():
            return f"{name}/{MODEL_INDEX}", _sharded_report(index)
    return None


def _sharded_report(index: Path) -> FileReport:
    """A big model saved in shards (``save_pretrained``'s ``max_shard_size``): the index is
    written last, so it must parse and every shard it names must be intact; the newest
    shard's time stands for the weights."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return FileReport(f"not a complete shard index ({error.__class__.__name__})")
    newest: FileReport | None = None
    for shard in shards:
        report = inspect_state_file(index.parent / shard)
        if report.problem is not None:
            return FileReport(f"shard {shard}: {report.problem}")
        if newest is None or (report.mtime_ns or 0) > (newest.mtime_ns or 0):
            newest = report
    return newest if newest is not None else FileReport("the shard index names no shard")


def _inspect(entry: os.DirEntry[str], memo: FileReportMemo | None) -> FileReport:
    return memo.inspect(entry) if memo is not None else inspect_state_file(entry.path)


def _newer_than_optimizer(folder: Path, name: str, weights: FileReport) -> str | None:
    optimizer = folder / _FIRST_ACCELERATE_FILE
    report = inspect_state_file(optimizer)
    if weights.mtime_ns is None or report.mtime_ns is None:
        return None
    if weights.mtime_ns <= report.mtime_ns:
        return None
    return (
        f"{MIXED}{_FIRST_ACCELERATE_FILE} is older than {name} — left by an earlier save; "
        "a save into this folder did not finish (the save hook writes the weights first)"
    )
