"""Editing FluxGym's train.sh for the next launch: --resume and --save_state, atomically.

The user's original is kept once as ``train.sh.orig``; a rewrite that would change nothing
writes nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.trainers.sd_scripts.position import (
    INITIAL_EPOCH,
    INITIAL_STEP,
    SKIP_UNTIL_INITIAL_STEP,
)
from sidecar.trainers.shell.train_script import (
    TrainCommand,
    ensure_option,
    parse_train_script,
    remove_option,
    remove_resume,
    set_option,
    set_resume,
)

SAVE_EVERY_N_STEPS = "--save_every_n_steps"
SAVE_LAST_N_STEPS_STATE = "--save_last_n_steps_state"
# Options the sidecar may add for its own reasons; they are not part of a run's identity.
SIDECAR_MANAGED_FLAGS = ("--save_state", SAVE_EVERY_N_STEPS, SAVE_LAST_N_STEPS_STATE)

__all__ = ["add_save_state", "rewrite_train_script", "rewritten_train_script", "script_diff"]


def rewrite_train_script(
    script: Path,
    *,
    resume_from: str | None,
    ensure_save_state: bool,
    initial_step: int | None = None,
) -> tuple[bool, str, str]:
    """Point train.sh at ``resume_from`` (the trainer's view; None = no --resume) and at
    ``initial_step`` of the whole schedule (see :func:`rewritten_train_script`).

    Reads the script afresh, so an edit the user made since the verdict is kept.
    Keeps the user's original once as ``train.sh.orig``. Returns (changed, old, new).
    """
    return _rewrite(
        script,
        lambda text: rewritten_train_script(
            text,
            resume_from=resume_from,
            ensure_save_state=ensure_save_state,
            initial_step=initial_step,
        ),
    )


def add_save_state(script: Path) -> tuple[bool, str, str]:
    """Add --save_state and leave --resume as it is (a run the sidecar did not launch)."""
    return _rewrite(script, lambda text: ensure_option(text, "--save_state"))


def add_save_cadence(
    script: Path, *, every_n_steps: int, keep_last_steps: int
) -> tuple[bool, str, str]:
    """Save state every ``every_n_steps`` steps (unless the script already saves as often)
    and keep step states within ``keep_last_steps`` steps (unless it bounds them itself)."""
    return _rewrite(
        script,
        lambda text: with_save_cadence(
            text, every_n_steps=every_n_steps, keep_last_steps=keep_last_steps
        ),
    )


def with_save_cadence(text: str, *, every_n_steps: int, keep_last_steps: int) -> str:
    command = parse_train_script(text)
    own = _int(command.option(SAVE_EVERY_N_STEPS))
    if own is None or own > every_n_steps:
        text = set_option(text, SAVE_EVERY_N_STEPS, str(every_n_steps))
    if command.option(SAVE_LAST_N_STEPS_STATE) is None:
        text = set_option(text, SAVE_LAST_N_STEPS_STATE, str(keep_last_steps))
    return text


# The flags a remedy changes (SIDECAR_REMEDIATE): the same run with a mitigation applied.
DATALOADER_WORKERS = "--max_data_loader_n_workers"
PERSISTENT_WORKERS = "--persistent_data_loader_workers"
BLOCKS_TO_SWAP = "--blocks_to_swap"
REMEDY_FLAGS = (DATALOADER_WORKERS, PERSISTENT_WORKERS, BLOCKS_TO_SWAP)


def remedy(script: Path, hang: str) -> tuple[bool, str, str]:
    """Apply the known mitigation of a repeated hang class to train.sh (see
    :func:`with_remedy`); the original stays in ``train.sh.orig``."""
    return _rewrite(script, lambda text: with_remedy(text, hang))


def with_remedy(text: str, hang: str) -> str:
    """``text`` with the mitigation for ``hang`` applied; unchanged when none applies.

    - a dataloader wait: load in the main process (sd-scripts' ``--max_data_loader_n_workers
      0``; ``--persistent_data_loader_workers`` means nothing then, and goes);
    - a CUDA synchronisation in block swapping: half the blocks (``--blocks_to_swap``), at
      least one (off altogether, the model may no longer fit the GPU).
    """
    command = parse_train_script(text)
    if hang == "dataloader_wait":
        workers = command.option(DATALOADER_WORKERS)
        persistent = command.has_option(PERSISTENT_WORKERS)
        if workers == "0" and not persistent:
            return text
        text = set_option(text, DATALOADER_WORKERS, "0")
        return _without(text, PERSISTENT_WORKERS) if persistent else text
    if hang == "cuda_sync":
        blocks = _int(command.option(BLOCKS_TO_SWAP))
        if not blocks or blocks < 2:
            return text  # none left to drop: turning swapping off could run out of memory
        return set_option(text, BLOCKS_TO_SWAP, str(blocks // 2))
    return text


def state_cadence(command: TrainCommand, steps_per_epoch: int | None) -> int | None:
    """Steps between two resumable saves; None when it saves no state (or it is unknown)."""
    if not command.save_state:
        return None
    cadences = [_int(command.option(SAVE_EVERY_N_STEPS))]
    every_epochs = _int(command.option("--save_every_n_epochs"))
    if every_epochs and steps_per_epoch:
        cadences.append(every_epochs * steps_per_epoch)
    known = [cadence for cadence in cadences if cadence]
    return min(known) if known else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def rewritten_train_script(
    text: str,
    *,
    resume_from: str | None,
    ensure_save_state: bool,
    initial_step: int | None = None,
) -> str:
    """``text`` as :func:`rewrite_train_script` would write it; pure, for dry runs.

    The position flags follow ``--resume``: resuming at a known ``initial_step``, train.sh
    gets ``--initial_step <it> --skip_until_initial_step`` and loses any ``--initial_epoch``
    (``--initial_step`` wins in sd-scripts anyway); resuming at a step that is not known,
    every position flag goes (the trainer's own rule then applies), so a stale one from an
    earlier relaunch can never send it to the wrong place. Starting from the beginning, a
    user's own flags stay; the sidecar's pair (with ``--skip_until_initial_step``) goes.
    """
    new = ensure_option(text, "--save_state") if ensure_save_state else text
    if resume_from is None:
        new = remove_resume(new)
        if SKIP_UNTIL_INITIAL_STEP not in new:
            return new  # a user's own position flags for a fresh start stay theirs
        # The pair the sidecar writes for a resume: stale once there is nothing to resume.
        return _without(_without(new, INITIAL_STEP), SKIP_UNTIL_INITIAL_STEP)
    new = _without(set_resume(new, resume_from), INITIAL_EPOCH)
    if initial_step:
        new = set_option(new, INITIAL_STEP, str(initial_step))
        return set_option(new, SKIP_UNTIL_INITIAL_STEP, None)
    return _without(_without(new, INITIAL_STEP), SKIP_UNTIL_INITIAL_STEP)


def _without(text: str, flag: str) -> str:
    # Reading the whole script costs milliseconds; a flag that is nowhere in it (not even in
    # a variable) has nothing to remove.
    return remove_option(text, flag) if flag in text else text


def _rewrite(script: Path, edit: Callable[[str], str]) -> tuple[bool, str, str]:
    old = read_text_exact(script)
    new = edit(old)
    if new == old:
        return False, old, new
    copy_once(script, script.with_name(script.name + ".orig"))
    replace_atomically(script, new)
    return True, old, new


def script_diff(old: str, new: str, script: Path, *, context: int = 0) -> list[str]:
    """A unified diff of a train.sh rewrite, for logs and ``resume --dry-run``."""
    return [
        line.rstrip("\n")
        for line in difflib.unified_diff(
            old.splitlines(True),
            new.splitlines(True),
            str(script),
            f"{script} (rewritten)",
            n=context,
        )
    ]
