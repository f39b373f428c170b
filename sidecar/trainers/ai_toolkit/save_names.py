"""ai-toolkit's save file names, and which files its own rules pick up (pure, no I/O).

``jobs/process/BaseSDTrainProcess.py`` (ostris/ai-toolkit at 27a03a9):

- ``save(step)`` writes ``<name>_<step zero-padded to 9>.safetensors`` (its
  ``training_info`` metadata holds the same step), then ONE ``optimizer.pt`` shared by every
  save and overwritten each time, then calls ``clean_up_saves``. The end of the run saves
  ``<name>.safetensors`` (``save()`` without a step).
- ``clean_up_saves`` globs ``<name>_*`` and removes all but the newest
  ``max_step_saves_to_keep`` ``.safetensors`` files by ``os.path.getctime``.
- ``get_latest_save_path`` globs ``<name>*.safetensors``, ``<name>*.pt`` and ``<name>*``
  (together: everything ``<name>*`` matches), drops paths that contain ``_LoRA``,
  ``_refiner``, ``_t2i`` or ``_cn`` (the WHOLE path, folders included) unless the name does,
  and resumes from ``max(paths, key=os.path.getctime)``: no completeness check, and no flag
  picks another one.

Python's ``glob`` never lets ``*`` match a leading ``.``, so a name that starts with a dot
is invisible to both globs: that is where a set-aside save goes.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Sequence

__all__ = [
    "ASIDE_PREFIX",
    "OPTIMIZER_FILE",
    "SAVE_SUFFIX",
    "aside_name",
    "final_name",
    "latest_rule_sees",
    "pruned_by_clean_up",
    "save_name",
    "step_of_save",
]

OPTIMIZER_FILE = "optimizer.pt"
SAVE_SUFFIX = ".safetensors"
ASIDE_PREFIX = ".incomplete-"
# get_latest_save_path's "false positive" filters: a path holding one of these is dropped
# unless the name it looks for holds it too.
_FILTERED_MARKS = ("_LoRA", "_refiner", "_t2i", "_cn")
_STEP_DIGITS = 9  # save(): str(step).zfill(9)


def save_name(name: str, step: int) -> str:
    """The file ``save(step)`` writes for a LoRA or single-file model."""
    return f"{name}_{str(step).zfill(_STEP_DIGITS)}{SAVE_SUFFIX}"


def final_name(name: str) -> str:
    """The file the end of the run writes (``save()`` with no step)."""
    return f"{name}{SAVE_SUFFIX}"


def step_of_save(file_name: str, name: str | None) -> int | None:
    """The step in a step save's file name (of job ``name``; None: any name), or None."""
    stem = re.escape(name) if name is not None else r".+"
    # zfill pads to at least 9 digits; a step of 10^9 or more simply has more.
    match = re.fullmatch(rf"{stem}_(\d{{{_STEP_DIGITS},}})\.safetensors", file_name)
    return int(match.group(1)) if match else None


def _globbed(pattern: str, file_name: str) -> bool:
    """Whether glob.glob's ``pattern`` (a name pattern, no folder) matches ``file_name``."""
    if file_name.startswith(".") and not pattern.startswith("."):
        return False  # glob: wildcards never match a leading dot (hidden files)
    return fnmatch.fnmatchcase(file_name, pattern)


def latest_rule_sees(save_root: str, name: str, file_name: str) -> bool:
    """Whether ``get_latest_save_path(name)`` considers the entry ``file_name`` of
    ``save_root`` (trainer's view: its filters read the whole path)."""
    patterns = (f"{name}*.safetensors", f"{name}*.pt", f"{name}*")
    if not any(_globbed(pattern, file_name) for pattern in patterns):
        return False
    path = posixpath.join(save_root, file_name)
    return not any(mark not in name and mark in path for mark in _FILTERED_MARKS)


def pruned_by_clean_up(name: str, file_name: str) -> bool:
    """Whether ``clean_up_saves`` counts ``file_name`` among the saves it may remove."""
    return _globbed(f"{name}_*", file_name) and file_name.endswith(SAVE_SUFFIX)


def aside_name(file_name: str, stamp: str, names: Sequence[str] = ()) -> str:
    """A name for ``file_name`` set aside at ``stamp`` that neither glob matches for any of
    the job ``names``: a leading dot, doubled for a job whose own name starts with a dot."""
    prefix = ASIDE_PREFIX
    for _ in range(8):
        candidate = f"{prefix}{stamp}-{file_name}"
        if not any(_globbed(f"{name}*", candidate) for name in names):
            return candidate
        prefix = "." + prefix  # only a job named like ".incomplete-..." gets here
    raise ValueError(f"no name to set {file_name!r} aside that jobs {list(names)} never match")
