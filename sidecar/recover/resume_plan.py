"""Choosing where to resume from, and pointing train.sh at it.

The choice is the newest complete checkpoint that is not quarantined. When the
attempt that just failed had resumed from that same checkpoint (no newer one
appeared in between), the failure counts against it; after two such failures it
is quarantined and the next older complete one is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.run.ledger import Ledger


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
