"""A launch script running a diffusers example script: what it resumes from, and the edits.

The resume lever is ``--resume_from_checkpoint``. diffusers reduces any value other than
``latest`` to ``os.path.basename(value)`` and loads ``os.path.join(args.output_dir, that)``
(``examples/dreambooth/train_dreambooth_lora_flux.py`` ``main``, the same in every example
that resumes): a path into another folder is silently read from ``--output_dir``. So the
sidecar writes the bare folder name, ``--resume_from_checkpoint checkpoint-<N>``, which says
in the script what the trainer really loads, and refuses a state that is not directly in
the script's ``--output_dir`` rather than let diffusers load a namesake there.

Saves: diffusers always saves resumable state, every ``--checkpointing_steps`` (argparse
default 500) optimizer steps, keeping at most ``--checkpoints_total_limit`` (default None:
all). The user's original is kept once as ``<script>.orig``; a rewrite that would change
nothing writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from collections.abc import Callable
from pathlib import Path

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.trainers.shell.script_words import TrainScriptError
from sidecar.trainers.shell.train_script import (
    TrainCommand,
    parse_train_script,
    remove_option,
    set_option,
)

__all__ = [
    "CHECKPOINTING_STEPS",
    "CHECKPOINTS_TOTAL_LIMIT",
    "DEFAULT_CHECKPOINTING_STEPS",
    "LATEST",
    "RESUME_FROM_CHECKPOINT",
    "DiffusersCommand",
    "read_command",
    "rewrite",
    "rewritten",
    "with_save_cadence",
]

RESUME_FROM_CHECKPOINT = "--resume_from_checkpoint"
CHECKPOINTING_STEPS = "--checkpointing_steps"
CHECKPOINTS_TOTAL_LIMIT = "--checkpoints_total_limit"
DEFAULT_CHECKPOINTING_STEPS = 500  # parse_args' default in every example script
LATEST = "latest"
# Options the sidecar may change for its own reasons; they are not part of a run's identity.
SIDECAR_MANAGED_FLAGS = (RESUME_FROM_CHECKPOINT, CHECKPOINTING_STEPS, CHECKPOINTS_TOTAL_LIMIT)


@dataclasses.dataclass(frozen=True)
class DiffusersCommand(TrainCommand):
    """The trainer command, with diffusers' meaning of its options."""

    @property
    def resume_value(self) -> str | None:
        """``--resume_from_checkpoint`` as written (None: absent, or given no value)."""
        return self.option(RESUME_FROM_CHECKPOINT) or None

    @property
    def resume(self) -> str | None:
        """The folder diffusers loads, as it resolves it: ``output_dir/basename(value)``;
        ``latest`` as it is (the highest-numbered folder, chosen by diffusers)."""
        value = self.resume_value
        if value is None or value == LATEST:
            return value
        name = posixpath.basename(value)
        return posixpath.join(self.output_dir, name) if self.output_dir else name

    @property
    def output_name(self) -> str | None:
        return None  # diffusers names no file after the run: checkpoint-<N>, fixed weights

    @property
    def save_state(self) -> bool:
        return True  # every --checkpointing_steps, whatever the other options say

    @property
    def checkpointing_steps(self) -> int | None:
        value = self.option(CHECKPOINTING_STEPS)
        return DEFAULT_CHECKPOINTING_STEPS if value is None else _int(value)


def read_command(text: str) -> DiffusersCommand:
    """The trainer command of a launch script (TrainScriptError saying where, otherwise)."""
    command = parse_train_script(text)
    fields = {field.name: getattr(command, field.name) for field in dataclasses.fields(command)}
    return DiffusersCommand(**fields)


def rewritten(text: str, *, resume_from: str | None) -> str:
    """``text`` resuming from ``resume_from`` (the trainer's view of a ``checkpoint-<N>``
    folder; None: from the beginning, no ``--resume_from_checkpoint``). Pure, for dry runs."""
    if resume_from is None:
        if RESUME_FROM_CHECKPOINT not in text:
            return text
        return remove_option(text, RESUME_FROM_CHECKPOINT)
    folder = resume_from.rstrip("/")
    name = posixpath.basename(folder)
    if not name or name in (".", ".."):
        raise TrainScriptError(f"checkpoint path {resume_from!r} names no folder")
    _check_in_output_dir(read_command(text), folder)
    return set_option(text, RESUME_FROM_CHECKPOINT, name)


def _check_in_output_dir(command: DiffusersCommand, folder: str) -> None:
    """Refuse a state whose namesake diffusers would load from ``--output_dir`` instead."""
    output_dir = command.output_dir
    parent = posixpath.dirname(folder)
    if not output_dir or not parent or command.unresolved("output_dir"):
        return  # nothing to compare with: the scan only offers folders of output_dir
    if posixpath.isabs(parent) != posixpath.isabs(output_dir):
        return  # one is relative to a working directory only the launch knows
    if posixpath.normpath(parent) != posixpath.normpath(output_dir):
        raise TrainScriptError(
            f"{folder} is not in --output_dir {output_dir}: diffusers loads "
            f"{posixpath.join(output_dir, posixpath.basename(folder))} for "
            f"{RESUME_FROM_CHECKPOINT} {posixpath.basename(folder)}"
        )


def rewrite(script: Path, edit: Callable[[str], str]) -> tuple[bool, str, str]:
    """Apply ``edit`` to the script atomically, keeping the original once as ``.orig``;
    unchanged text is not rewritten. Returns (changed, old, new)."""
    old = read_text_exact(script)
    new = edit(old)
    if new == old:
        return False, old, new
    copy_once(script, script.with_name(script.name + ".orig"))
    replace_atomically(script, new)
    return True, old, new


def with_save_cadence(text: str, *, every_n_steps: int, keep_last_steps: int) -> str:
    """Save every ``every_n_steps`` (unless the script already saves as often) and keep the
    checkpoints of the last ``keep_last_steps`` steps (unless it bounds them itself).

    diffusers prunes BEFORE it saves (``if len(checkpoints) >= checkpoints_total_limit``:
    delete down to ``limit - 1``, then ``save_state``), so while a save is written only
    ``limit - 1`` whole checkpoints exist: the bound is one more than the steps need, and
    never below 2, where a kill mid-save would leave nothing to resume from.
    """
    command = read_command(text)
    own = command.checkpointing_steps
    every = every_n_steps if own is None or own > every_n_steps else own
    if own is None or own > every_n_steps:
        text = set_option(text, CHECKPOINTING_STEPS, str(every_n_steps))
    if command.option(CHECKPOINTS_TOTAL_LIMIT) is None:
        limit = max(2, math.ceil(keep_last_steps / every) + 1)
        text = set_option(text, CHECKPOINTS_TOTAL_LIMIT, str(limit))
    return text


def state_cadence(command: DiffusersCommand) -> int | None:
    every = command.checkpointing_steps
    return every if every and every > 0 else None


def without_sidecar_edits(text: str) -> str:
    """``text`` without the options the sidecar manages (for the run's identity)."""
    for flag in SIDECAR_MANAGED_FLAGS:
        if flag in text:
            text = remove_option(text, flag)
    return text


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None  # not a number: the script's argparse would refuse it at launch
