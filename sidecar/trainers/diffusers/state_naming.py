"""diffusers' checkpoint folder names, its own "latest" rule, and a set-aside name it ignores.

Read from huggingface/diffusers at main (58eb52c), the same block in every example script
that resumes (``examples/dreambooth/train_dreambooth_lora_flux.py`` ``main``,
``train_dreambooth_lora_sdxl.py``, ``text_to_image/train_text_to_image_lora.py``,
``controlnet/train_controlnet.py``):

- a save goes to ``os.path.join(args.output_dir, f"checkpoint-{global_step}")``: the
  absolute optimizer step, not zero-padded;
- ``--resume_from_checkpoint latest`` lists ``os.listdir(output_dir)``, keeps the names that
  ``startswith("checkpoint")``, sorts them by ``int(name.split("-")[1])`` and takes the last:
  the highest number, with no check that the folder is whole;
- ``--checkpoints_total_limit`` pruning lists and sorts the same way and deletes the lowest;
- any other value is reduced to ``os.path.basename(value)`` and loaded from
  ``output_dir/<basename>``, and ``global_step = int(basename.split("-")[1])``.

So every name under ``output_dir`` that starts with "checkpoint" must be
``checkpoint-<int>...``: ``checkpoint-30.incomplete`` would make both the listing and the
pruning raise ValueError (``int("30.incomplete")``), and ``checkpoints`` an IndexError. A
state is set aside under a name that does not start with "checkpoint" at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.checkpoints.naming import CandidateKind, NamedState

if TYPE_CHECKING:
    from sidecar.checkpoints.scan import Candidate

__all__ = [
    "ASIDE_PREFIX",
    "DiffusersStateNaming",
    "aside_name",
    "listed_by_upstream",
    "state_naming",
    "step_in_name",
    "upstream_latest",
]

# Only what diffusers itself writes: "checkpoint-" and the decimal global_step.
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
ASIDE_PREFIX = "incomplete-"
NOT_RESUMABLE = (
    "diffusers resumes only a checkpoint-<step> folder directly in --output_dir "
    "(it takes global_step from the name)"
)


@dataclass(frozen=True)
class DiffusersStateNaming:
    """``checkpoint-<global_step>`` folders (diffusers has no output name)."""

    @property
    def ignored_folders(self) -> frozenset[str]:
        # validation images go to trackers, not to output_dir; the final LoRA is a file.
        return frozenset()

    def classify(self, folder_name: str) -> NamedState | None:
        match = _CHECKPOINT.fullmatch(folder_name)
        return ("step", int(match[1])) if match else None

    def refusal(self, kind: CandidateKind) -> str | None:
        # An unnamed folder holding accelerate's files (a set-aside one, a copy): diffusers
        # could only be pointed at it by a name it would parse for the step.
        return None if kind == "step" else NOT_RESUMABLE


_NAMING = DiffusersStateNaming()


def state_naming(output_name: str | None) -> DiffusersStateNaming:
    """diffusers' naming; ``output_name`` is ignored (the folder names carry none)."""
    return _NAMING


def step_in_name(name: str) -> int | None:
    """The global_step diffusers takes from a checkpoint name (``int(name.split("-")[1])``),
    or None where it would raise."""
    parts = name.split("-")
    if len(parts) < 2:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


def listed_by_upstream(name: str) -> bool:
    """Whether diffusers' ``latest`` listing and its pruning see a folder of this name."""
    return name.startswith("checkpoint")


def upstream_latest(names: Sequence[str]) -> str | None:
    """What ``--resume_from_checkpoint latest`` loads among folder ``names`` (a ValueError
    or IndexError where diffusers itself would raise on one of them)."""
    listed = sorted(
        (name for name in names if listed_by_upstream(name)), key=lambda n: int(n.split("-")[1])
    )
    return listed[-1] if listed else None


def upstream_pruned(names: Sequence[str], limit: int) -> list[str]:
    """The folders ``--checkpoints_total_limit limit`` deletes before the next save."""
    listed = sorted(
        (name for name in names if listed_by_upstream(name)), key=lambda n: int(n.split("-")[1])
    )
    if len(listed) < limit:
        return []
    return listed[: len(listed) - limit + 1]


def aside_name(name: str, stamp: str) -> str:
    """``incomplete-<stamp>-checkpoint-30``: the step stays readable, and the name does not
    start with "checkpoint", so diffusers' listing, resume and pruning never see it."""
    return f"{ASIDE_PREFIX}{stamp}-{name}"


def incomplete_above(candidates: Sequence[Candidate], chosen: Candidate | None) -> list[Candidate]:
    """The incomplete ``checkpoint-N`` folders numbered above ``chosen`` (all of them when
    starting afresh): ``latest`` would load the highest, the pruning would keep them and
    delete whole ones, and the resumed run would overwrite them in place file by file."""
    floor = chosen.number if chosen is not None and chosen.number is not None else -1
    return [
        candidate
        for candidate in candidates
        if not candidate.complete
        and candidate.kind == "step"
        and candidate.number is not None
        and candidate.number > floor
        and candidate.path != (chosen.path if chosen is not None else None)
    ]


def aside_path(state: Path, stamp: str) -> Path:
    return state.with_name(aside_name(state.name, stamp))
