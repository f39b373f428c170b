"""The files accelerate's ``save_state`` writes into a state folder, and which must be there.

They are accelerate's, not one trainer's: every trainer that saves its state through
accelerate (sd-scripts among them) leaves the same set, so the scan judges any such
folder by this one list.
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = [
    "ACCELERATE_MARKER",
    "MIXED",
    "STATE_FILE",
    "missing_files",
    "mixed_save_problem",
    "write_position",
]

# Files accelerate's save_state writes, in its order; the numbered "_<i>" forms are
# the extra models, optimizers, schedulers and dataloaders, and one random state per process.
_WEIGHTS = re.compile(r"(?:model(?:_\d+)?\.safetensors|pytorch_model(?:_\d+)?\.bin)")
STATE_FILE = re.compile(
    r"train_state\.json"
    r"|model(?:_\d+)?\.safetensors|pytorch_model(?:_\d+)?\.bin"
    r"|(?:optimizer|scheduler|sampler|dl_state_dict)(?:_\d+)?\.bin"
    r"|scaler\.pt"
    r"|(?:random_states|custom_checkpoint)_\d+\.pkl"
)
# Any of these makes an otherwise unnamed folder an accelerate state folder.
ACCELERATE_MARKER = re.compile(
    r"(?:optimizer|scheduler)(?:_\d+)?\.bin|random_states_\d+\.pkl|" + _WEIGHTS.pattern
)
_PRIMARY_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_REQUIRED = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def missing_files(names: Collection[str]) -> list[str]:
    """One problem per required file absent from ``names`` (a state folder's file names)."""
    problems = []
    if not any(weights in names for weights in _PRIMARY_WEIGHTS):
        problems.append("model weights missing (model.safetensors or pytorch_model.bin)")
    problems.extend(f"{name} missing" for name in _REQUIRED if name not in names)
    return problems


# ----------------------------------------------------------------------------- write order

# The prefix of the problem of a folder whose files come from more than one save.
MIXED = "mixed: "

# Position of each file in one save: sd-scripts' pre-save hook writes train_state.json,
# then accelerate's save_accelerator_state writes weights, optimizers, schedulers, the
# dataloaders' sampler/dl_state_dict, scaler.pt and the main process's random states,
# and save_state the custom checkpoints last. Files of one position (model.safetensors
# and model_1.safetensors, or sampler_1.bin beside dl_state_dict_0.bin) are not ordered
# against each other here. random_states_<i>.pkl for i > 0 has no position: process i
# writes it itself, while only the main process writes the weights and the rest, so it
# may land before them in a save that did finish.
_RANKS = {
    "train_state.json": 0,
    "model.safetensors": 1,
    "pytorch_model.bin": 1,
    "optimizer.bin": 2,
    "scheduler.bin": 3,
    "sampler.bin": 4,
    "dl_state_dict.bin": 4,
    "scaler.pt": 5,
    "random_states_0.pkl": 6,
}
_NUMBERED_RANKS = (
    (re.compile(r"(?:model_\d+\.safetensors|pytorch_model_\d+\.bin)"), 1),
    (re.compile(r"optimizer_\d+\.bin"), 2),
    (re.compile(r"scheduler_\d+\.bin"), 3),
    (re.compile(r"(?:sampler|dl_state_dict)_\d+\.bin"), 4),
    (re.compile(r"custom_checkpoint_\d+\.pkl"), 7),
)


def write_position(name: str) -> int | None:
    """Where ``name`` comes in one save, or None for a file with no fixed place in it."""
    rank = _RANKS.get(name)
    if rank is not None:
        return rank
    for pattern, numbered_rank in _NUMBERED_RANKS:
        if pattern.fullmatch(name):
            return numbered_rank
    return None


def mixed_save_problem(ordered: list[tuple[int, int, str]]) -> str | None:
    """Why the files cannot all be from one save; None when they can.

    ``ordered`` holds (write_position(name), st_mtime_ns, name) for each state file with
    a position; it is sorted in place. One save writes its files one after another in a
    fixed order, so their mtimes never go backwards along it. Equal mtimes are allowed: a
    coarse filesystem clock gives a whole save one time. A file older than one written
    before it was left by an earlier save into the same folder — sd-scripts reuses a step
    state's name after a resume and accelerate overwrites the folder in place, file by
    file (REFERENCE section 2).
    """
    # Sorted by position (then time), one save's times never decrease. This pass is all
    # that every poll of every whole folder costs; only a mixed one is looked at again.
    ordered.sort()
    previous = ordered[0][1] if ordered else 0
    for _, mtime_ns, _ in ordered:
        if mtime_ns < previous:
            break
        previous = mtime_ns
    else:
        return None
    stale, reference = _stale_files(ordered)
    also = f" (also older than files written before them: {', '.join(stale[1:])})"
    return (
        f"{MIXED}{stale[0]} is older than {reference} — left by an earlier save; "
        f"a save into this folder did not finish{also if len(stale) > 1 else ''}"
    )


def _stale_files(ranked: list[tuple[int, int, str]]) -> tuple[list[str], str]:
    """The files older than one of an earlier position, and the newest file before the first.

    ``ranked`` is (position, st_mtime_ns, name) sorted, and out of order somewhere.
    """
    newest_before: tuple[int, str] | None = None  # among the positions already passed
    newest_here: tuple[int, str] | None = None
    position = -1
    stale: list[str] = []
    reference = ""
    for rank, mtime_ns, name in ranked:
        if rank != position:
            newest_before = _later(newest_before, newest_here)
            newest_here, position = None, rank
        if newest_before is not None and mtime_ns < newest_before[0]:
            reference = reference or newest_before[1]
            stale.append(name)
        newest_here = _later(newest_here, (mtime_ns, name))
    return stale, reference


def _later(first: tuple[int, str] | None, second: tuple[int, str] | None) -> tuple[int, str] | None:
    # On a tie the later one in the write order: the file written just before the stale one.
    if first is None or (second is not None and second[0] >= first[0]):
        return second
    return first
