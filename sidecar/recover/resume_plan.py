"""Choosing where to resume from, and pointing train.sh at it.

The choice is the newest complete checkpoint that is not quarantined. When the
attempt that just failed had resumed from that same checkpoint (no newer one
appeared in between), the failure counts against it; after two such failures it
is quarantined and the next older complete one is used.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.run.ledger import Ledger
from sidecar.trainers.sd_scripts.train_script import ensure_option, remove_resume, set_resume


class NoCheckpointLeft(Exception):
    """Every usable checkpoint is quarantined and restarting from scratch is not allowed."""


@dataclass(frozen=True)
class ResumeChoice:
    checkpoint: Candidate | None  # None: start from the beginning
    quarantined_now: tuple[str, ...]
    reason: str


def choose_resume_point(
    candidates: Sequence[Candidate],
    ledger: Ledger,
    *,
    allow_scratch: bool,
    after_failure: bool = True,
) -> ResumeChoice:
    """Pick the checkpoint for the next attempt, updating the ledger's failure counts.

    ``after_failure`` False (a sidecar starting up, not a failed attempt) counts nothing
    against the checkpoint the last attempt resumed from: a restart of the sidecar says
    nothing about that checkpoint.
    """
    quarantined_now: list[str] = []
    best = _best(candidates, ledger)
    if after_failure and best is not None and _is_the_one_resumed(best, ledger):
        failed_from = str(best.path)
        if ledger.record_failed_resume(failed_from):
            quarantined_now.append(failed_from)
            best = _best(candidates, ledger)
    if best is not None:
        return ResumeChoice(best, tuple(quarantined_now), "newest complete checkpoint")
    ever_had_checkpoint = bool(ledger.quarantined) or any(c.complete for c in candidates)
    if not ever_had_checkpoint:
        # Nothing resumable was ever written (e.g. a hang in the first epoch): starting
        # over loses nothing.
        return ResumeChoice(None, tuple(quarantined_now), "no checkpoint written yet")
    if allow_scratch:
        return ResumeChoice(None, tuple(quarantined_now), "every checkpoint quarantined")
    raise NoCheckpointLeft(
        "every complete checkpoint is quarantined ("
        + ", ".join(ledger.quarantined)
        + "); set SIDECAR_FALLBACK=scratch to allow restarting from the beginning"
    )


def _is_the_one_resumed(candidate: Candidate, ledger: Ledger) -> bool:
    """True when no newer checkpoint appeared since the failed attempt resumed from this one."""
    if str(candidate.path) != ledger.current_checkpoint:
        return False
    resumed = ledger.current_checkpoint_completed_at
    return resumed is None or candidate.completed_at == resumed


def _best(candidates: Sequence[Candidate], ledger: Ledger) -> Candidate | None:
    return choose_checkpoint(candidates, exclude=[Path(path) for path in ledger.quarantined])


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
