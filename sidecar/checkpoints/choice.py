"""Choosing where the next attempt resumes from: pure, over a scan and the ledger.

The choice is the newest complete checkpoint that is not quarantined. When the
attempt that just failed had resumed from that same checkpoint (no newer one
appeared in between), the failure counts against it; after two such failures it
is quarantined and the next older complete one is used. Nothing is mutated: the
choice carries the ledger as it must be saved once the launch points at it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import Candidate, choose_checkpoint, find_candidates
from sidecar.run.ledger import Ledger
from sidecar.run.paths import RunPaths


class NoCheckpointLeft(Exception):
    """Every usable checkpoint is quarantined and restarting from scratch is not allowed."""

    def __init__(self, message: str, ledger: Ledger) -> None:
        super().__init__(message)
        self.ledger = ledger  # with the quarantine that led here, to be kept on giving up


def run_candidates(
    paths: RunPaths, *, now: float, settle: float, memo: FileReportMemo | None = None
) -> list[Candidate]:
    """The run's state folders, named its trainer's way; ``now`` is the wall clock."""
    return find_candidates(
        paths.output_dir,
        now=now,
        settle_seconds=settle,
        output_name=paths.output_name,
        naming=paths.trainer.state_naming,
        memo=memo,
    )


def newest_resumable(
    paths: RunPaths,
    quarantined: Collection[str],
    *,
    now: float,
    settle: float,
    memo: FileReportMemo | None = None,
) -> Candidate | None:
    """The run's newest complete checkpoint that is not quarantined: the one query behind
    the recovery, keeping --resume current, ``resume``, ``status`` and the metrics."""
    candidates = run_candidates(paths, now=now, settle=settle, memo=memo)
    return choose_checkpoint(candidates, exclude=quarantined)


@dataclass(frozen=True)
class ResumeChoice:
    checkpoint: Candidate | None  # None: start from the beginning
    quarantined_now: tuple[str, ...]
    reason: str
    ledger: Ledger  # the ledger once the launch points at ``checkpoint``

    @property
    def path(self) -> str | None:
        return str(self.checkpoint.path) if self.checkpoint else None


def choose_resume_point(
    candidates: Sequence[Candidate],
    ledger: Ledger,
    *,
    allow_scratch: bool,
    after_failure: bool = True,
) -> ResumeChoice:
    """Pick the checkpoint for the next attempt; the given ledger is left as it is.

    ``after_failure`` False (a sidecar starting up, not a failed attempt) counts nothing
    against the checkpoint the last attempt resumed from: a restart of the sidecar says
    nothing about that checkpoint. Raises NoCheckpointLeft with the ledger that led to it
    (the quarantine is kept when giving up).
    """
    updated = copy.deepcopy(ledger)
    quarantined_now: list[str] = []
    best = choose_checkpoint(candidates, exclude=updated.quarantined)
    if after_failure and best is not None and _is_the_one_resumed(best, updated):
        failed_from = str(best.path)
        if updated.record_failed_resume(failed_from):
            quarantined_now.append(failed_from)
            best = choose_checkpoint(candidates, exclude=updated.quarantined)
    if best is not None:
        reason = "newest complete checkpoint"
    elif not (updated.quarantined or any(c.complete for c in candidates)):
        # Nothing resumable was ever written (e.g. a hang in the first epoch): starting
        # over loses nothing.
        reason = "no checkpoint written yet"
    elif allow_scratch:
        reason = "every checkpoint quarantined"
    else:
        raise NoCheckpointLeft(
            "every complete checkpoint is quarantined ("
            + ", ".join(updated.quarantined)
            + "); set SIDECAR_FALLBACK=scratch to allow restarting from the beginning",
            updated,
        )
    _point_ledger_at(updated, best)
    return ResumeChoice(best, tuple(quarantined_now), reason, updated)


def _point_ledger_at(ledger: Ledger, chosen: Candidate | None) -> None:
    path = str(chosen.path) if chosen else None
    completed_at = chosen.completed_at if chosen else None
    same_as_before = (path, completed_at) == (
        ledger.current_checkpoint,
        ledger.current_checkpoint_completed_at,
    )
    # Back off harder only while recoveries find nothing newer to resume from.
    ledger.consecutive_failures = ledger.consecutive_failures + 1 if same_as_before else 0
    ledger.current_checkpoint = path
    ledger.current_checkpoint_completed_at = completed_at


def _is_the_one_resumed(candidate: Candidate, ledger: Ledger) -> bool:
    """True when no newer checkpoint appeared since the failed attempt resumed from this one."""
    if str(candidate.path) != ledger.current_checkpoint:
        return False
    resumed = ledger.current_checkpoint_completed_at
    return resumed is None or candidate.completed_at == resumed
