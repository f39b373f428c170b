"""Choosing where the next attempt resumes from: pure, over a scan and the ledger.

The choice is the newest complete checkpoint that is not quarantined. When the
attempt that just failed had resumed from that same checkpoint (no newer one
appeared in between), the failure counts against it; after two such failures it
is quarantined and the next older complete one is used. Nothing is mutated: the
choice carries the ledger as it must be saved once the launch points at it.

A state the sidecar may not read is progress it cannot see: when one is newer than
the chosen checkpoint (or there is none), the choice raises CheckpointUnreadable
instead of resuming from something older or starting over.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sidecar.checkpoints.access import UnreadableFile, describe_denial
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.run.ledger import Ledger
from sidecar.run.paths import RunPaths


class NoCheckpointLeft(Exception):
    """Every usable checkpoint is quarantined and restarting from scratch is not allowed."""

    def __init__(self, message: str, ledger: Ledger) -> None:
        super().__init__(message)
        self.ledger = ledger  # with the quarantine that led here, to be kept on giving up


class CheckpointUnreadable(NoCheckpointLeft):
    """A state newer than every usable checkpoint exists but the sidecar may not read it.

    Raised by choose_resume_point instead of resuming from an older checkpoint or from
    the beginning, either of which would throw away the progress in ``checkpoint``.
    The message names the file, its owner, group and mode, the sidecar's UID and the
    fix (run the sidecar with the trainer's UID, or give it read access). Recovery
    should stop and report it; nothing has been changed. Being a NoCheckpointLeft, it
    is caught by whoever catches that: ``ledger`` is the ledger to keep, as there.
    """

    def __init__(self, message: str, ledger: Ledger, checkpoint: Candidate) -> None:
        super().__init__(message, ledger)
        self.checkpoint = checkpoint  # the newest unreadable state (its path, its kind)
        self.files: tuple[UnreadableFile, ...] = checkpoint.unreadable


def run_candidates(
    paths: RunPaths, *, now: float, settle: float, memo: FileReportMemo | None = None
) -> list[Candidate]:
    """The run's states, found its trainer's way; ``now`` is the wall clock."""
    return paths.trainer.find_states(
        paths.output_dir,
        now=now,
        settle_seconds=settle,
        output_name=paths.output_name,
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
    (the quarantine is kept when giving up), and its CheckpointUnreadable when a state
    the sidecar may not read is newer than the choice (whether or not scratch is allowed).
    """
    updated = copy.deepcopy(ledger)
    quarantined_now: list[str] = []
    best = choose_checkpoint(candidates, exclude=updated.quarantined)
    if after_failure and best is not None and _is_the_one_resumed(best, updated):
        failed_from = str(best.path)
        if updated.record_failed_resume(failed_from):
            quarantined_now.append(failed_from)
            best = choose_checkpoint(candidates, exclude=updated.quarantined)
    hidden = _newest_unreadable(candidates, best, exclude=updated.quarantined)
    if hidden is not None:
        raise CheckpointUnreadable(_unreadable_message(hidden, best), updated, hidden)
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


def _newest_unreadable(
    candidates: Sequence[Candidate], best: Candidate | None, *, exclude: Collection[str]
) -> Candidate | None:
    """The newest state that only refused access and may be newer than ``best``.

    A state with other problems as well (missing files, a mixed or final state) could not
    be resumed from even if readable, so it hides nothing. A folder that cannot be listed
    is dated by its own mtime: every save renames or creates a file in it (safetensors
    renames its temporary file into place), so that is within its last save. An unknown
    time, or one equal to the choice's (a coarse clock), may be the newer one: never
    discard hours on a guess.
    """
    floor = best.completed_at if best is not None else None
    hiding = [
        candidate
        for candidate in candidates
        if candidate.unreadable_only
        and str(candidate.path) not in exclude
        # An older state beside a newer readable one: nothing is lost by passing over it.
        and not (floor is not None and _latest_known(candidate) < floor)
    ]
    return max(hiding, key=_latest_known, default=None)


def _latest_known(candidate: Candidate) -> float:
    times = [unreadable.mtime for unreadable in candidate.unreadable]
    times.append(candidate.completed_at)
    known = [time for time in times if time is not None]
    return max(known) if known else math.inf


def _unreadable_message(hidden: Candidate, best: Candidate | None) -> str:
    if best is not None:
        situation = (
            f"checkpoint {hidden.path} is newer than the newest readable one ({best.path}) "
            "but cannot be read; recovery stops rather than resume from the older one"
        )
    else:
        situation = (
            f"checkpoint {hidden.path} cannot be read and no other checkpoint can; "
            "recovery stops rather than restart from the beginning"
        )
    first, *others = hidden.unreadable
    more = f"; also unreadable: {', '.join(u.path for u in others)}" if others else ""
    return f"{situation} and lose its progress: {describe_denial(first)}{more}"
