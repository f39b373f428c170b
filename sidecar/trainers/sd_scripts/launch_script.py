"""Editing FluxGym's train.sh for the next launch: --resume and --save_state, atomically.

The user's original is kept once as ``train.sh.orig``; a rewrite that would change nothing
writes nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.trainers.sd_scripts.train_script import ensure_option, remove_resume, set_resume

__all__ = ["add_save_state", "rewrite_train_script", "rewritten_train_script", "script_diff"]


def rewrite_train_script(
    script: Path, *, resume_from: str | None, ensure_save_state: bool
) -> tuple[bool, str, str]:
    """Point train.sh at ``resume_from`` (the trainer's view; None = no --resume).

    Reads the script afresh, so an edit the user made since the verdict is kept.
    Keeps the user's original once as ``train.sh.orig``. Returns (changed, old, new).
    """
    return _rewrite(
        script,
        lambda text: rewritten_train_script(
            text, resume_from=resume_from, ensure_save_state=ensure_save_state
        ),
    )


def add_save_state(script: Path) -> tuple[bool, str, str]:
    """Add --save_state and leave --resume as it is (a run the sidecar did not launch)."""
    return _rewrite(script, lambda text: ensure_option(text, "--save_state"))


def rewritten_train_script(text: str, *, resume_from: str | None, ensure_save_state: bool) -> str:
    """``text`` as :func:`rewrite_train_script` would write it; pure, for dry runs."""
    new = ensure_option(text, "--save_state") if ensure_save_state else text
    return remove_resume(new) if resume_from is None else set_resume(new, resume_from)


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
