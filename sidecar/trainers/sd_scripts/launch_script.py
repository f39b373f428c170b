"""Editing FluxGym's train.sh for the next launch: --resume and --save_state, atomically.

The user's original is kept once as ``train.sh.orig``; a rewrite that would change nothing
writes nothing.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.trainers.sd_scripts.train_script import ensure_option, remove_resume, set_resume

KEEP_RESUME = "<keep --resume as it is>"


def rewrite_train_script(
    script: Path, *, resume_from: str | None, ensure_save_state: bool
) -> tuple[bool, str, str]:
    """Point train.sh at ``resume_from`` (the trainer's view; None = no --resume;
    KEEP_RESUME = leave it).

    Reads the script afresh, so an edit the user made since the verdict is kept.
    Keeps the user's original once as ``train.sh.orig``. Returns (changed, old, new).
    """
    old = read_text_exact(script)
    new = ensure_option(old, "--save_state") if ensure_save_state else old
    if resume_from is None:
        new = remove_resume(new)
    elif resume_from is not KEEP_RESUME:
        new = set_resume(new, resume_from)
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
