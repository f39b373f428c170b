"""The sidecar's memory across its own restarts: ``<state dir>/state.json``.

It records every recovery (why, from which checkpoint), how often resuming from
a checkpoint failed, and which checkpoints are quarantined, so that restarting
the sidecar never resets the restart budget. It also records every attempt (when it
started and from which step of the whole schedule), which only the sidecar can know: the
trainer's own step counter restarts at every resume. Written atomically after each change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sidecar.atomic_files import replace_atomically

SCHEMA_VERSION = 2
# Version 1 ledgers (no attempts, no run identity) are read and upgraded on the next write.
_READABLE_VERSIONS = (1, 2)
# Resuming from the same checkpoint failed this often, with no newer checkpoint
# appearing in between: the checkpoint itself is the likely culprit.
QUARANTINE_AFTER_FAILURES = 2


_Record = TypeVar("_Record")


class LedgerError(Exception):
    """state.json exists but cannot be read; the message says what to do."""


@dataclass
class Recovery:
    at: str
    reason: str
    kind: str  # stall | crash
    checkpoint: str | None  # sidecar-view path resumed from; None = from scratch
    diagnosis: str | None = None  # a stall's hang class (decide/diagnosis.HangClass)
    # The checkpoint the failed attempt had resumed from: the same class from the same
    # checkpoint again is a repeat, told with its mitigation.
    failed_from: str | None = None


@dataclass
class Attempt:
    """One launch of the trainer within this run."""

    launched_at: float  # wall clock; states completed from then on are this attempt's
    initial_step: int  # the trainer's initial step, as it computes it (0: from the start)
    resumed_from: str | None = None  # the state it was told to load (sidecar view)
    by_sidecar: bool = True  # False: started by someone else (FluxGym's UI, a restart policy)


@dataclass
class Interruption:
    """The run stopped because the sidecar or the machine went away, not by its own fault."""

    at: float  # wall clock: when it went away (after an unclean end: its last sign of life)
    how: str  # sigterm | unclean | container_stopped
    # The newest complete state then (its completion time): a streak of interruptions with
    # no newer state in between is a machine that never lets the run progress.
    newest_state_completed_at: float | None = None
    resumed_at: float | None = None  # when a trainer of the run ran again
    down_seconds: float | None = None


@dataclass
class SetAside:
    """An incomplete state the sidecar renamed so that the trainer's own "latest" rule
    cannot pick it; never deleted, and put back by ``training-sidecar checkpoints --put-back``."""

    original: str  # sidecar-view path it had
    moved_to: str  # sidecar-view path it has now
    at: str  # UTC time
    problems: list[str] = field(default_factory=list)  # why it was not complete
    put_back_at: str | None = None


@dataclass
class Ledger:
    recoveries: list[Recovery] = field(default_factory=list)
    resume_failures: dict[str, int] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)
    current_checkpoint: str | None = None  # what the running attempt resumed from
    # sd-scripts restarts step numbering after a resume, so a later save can reuse the same
    # folder name: the completion time tells a rewritten checkpoint from the one resumed.
    current_checkpoint_completed_at: float | None = None
    consecutive_failures: int = 0  # recoveries with no new checkpoint in between (backoff)
    # Recoveries in a row whose failed attempt saved no newer state (SIDECAR_MAX_FUTILE_
    # RECOVERIES); unlike the backoff's count, a fallback to an older state does not reset it.
    futile_recoveries: int = 0
    completed: bool = False
    gave_up: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    steps_per_epoch: int | None = None  # learned from the trainer's start-up output
    gradient_accumulation: int | None = None
    total_steps: int | None = None
    # The run boundary: this run's launch script (without the sidecar's own edits) and when
    # it began; states and final models written before then belong to an earlier run.
    run_digest: str | None = None
    run_started_at: float | None = None
    script_mtime_ns: int | None = None  # train.sh as the sidecar last wrote or saw it
    # A trainer of this run ran under the sidecar's watch: still true at the next start, the
    # sidecar (or the machine) went away without saying so.
    supervising: bool = False
    interruptions: list[Interruption] = field(default_factory=list)
    consecutive_interruptions: int = 0  # in a row, with no newer complete state in between
    abandoned: bool = False  # the user said: do not resume this run
    # Why the run was given up: the restart budget ("gave up"), "no progress", "gpu needs
    # reset" or "host needs attention" (recover/recovery.OutcomeKind).
    stopped_because: str | None = None
    remedies: list[str] = field(default_factory=list)  # hang classes whose remedy was applied
    set_aside: list[SetAside] = field(default_factory=list)
    # `training-sidecar run -- <command>`: the command as given, which the launch script
    # the sidecar writes runs (with the trainer's resume arguments added on each relaunch).
    command: list[str] | None = None

    @property
    def restarts(self) -> int:
        return len(self.recoveries)

    def record_recovery(
        self,
        kind: str,
        reason: str,
        checkpoint: str | None,
        *,
        diagnosis: str | None = None,
        failed_from: str | None = None,
    ) -> None:
        self.recoveries.append(
            Recovery(
                at=_utc_now(),
                reason=reason,
                kind=kind,
                checkpoint=checkpoint,
                diagnosis=diagnosis,
                failed_from=failed_from,
            )
        )

    @property
    def interrupted(self) -> Interruption | None:
        """The interruption the run has not come back from yet (None: none, or it ended)."""
        if not self.interruptions or self.completed or self.gave_up or self.abandoned:
            return None
        last = self.interruptions[-1]
        return last if last.resumed_at is None else None

    @property
    def state(self) -> str:
        """One word for the run: abandoned, completed, gave_up, interrupted, watched or idle."""
        if self.abandoned:
            return "abandoned"
        if self.completed:
            return "completed"
        if self.gave_up:
            return "gave_up"
        if self.interrupted is not None:
            return "interrupted"
        return "watched" if self.supervising else "idle"

    def record_interruption(self, interruption: Interruption) -> None:
        """Count ``interruption`` into the streak unless a newer state completed since the last."""
        previous = self.interruptions[-1] if self.interruptions else None
        progressed = previous is None or (
            interruption.newest_state_completed_at is not None
            and (
                previous.newest_state_completed_at is None
                or interruption.newest_state_completed_at > previous.newest_state_completed_at
            )
        )
        self.consecutive_interruptions = 1 if progressed else self.consecutive_interruptions + 1
        self.interruptions.append(interruption)
        self.supervising = False

    def record_attempt(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    def attempt_that_wrote(self, completed_at: float | None) -> Attempt | None:
        """The attempt running when a state completed: the last one launched before it."""
        if completed_at is None:
            return None
        writer = None
        for attempt in self.attempts:
            if attempt.launched_at <= completed_at:
                writer = attempt
        return writer

    def record_failed_resume(self, checkpoint: str) -> bool:
        """Count a failed attempt from ``checkpoint``; True when it is now quarantined."""
        failures = self.resume_failures.get(checkpoint, 0) + 1
        self.resume_failures[checkpoint] = failures
        if failures >= QUARANTINE_AFTER_FAILURES and checkpoint not in self.quarantined:
            self.quarantined.append(checkpoint)
            return True
        return False

    def to_json(self) -> str:
        return json.dumps({"version": SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict) or data.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"expected a version {SCHEMA_VERSION} ledger")
        data.pop("version")
        data["recoveries"] = [_known(Recovery, item) for item in data.get("recoveries", [])]
        data["attempts"] = [_known(Attempt, item) for item in data.get("attempts", [])]
        data["interruptions"] = [
            _known(Interruption, item) for item in data.get("interruptions", [])
        ]
        data["set_aside"] = [_known(SetAside, item) for item in data.get("set_aside", [])]
        return _known(cls, data)


def _known(cls: type[_Record], item: dict[str, Any]) -> _Record:
    """``cls`` from the fields it has: a key a newer sidecar added (one that ran this run
    before a downgrade) is left out instead of making the whole ledger unreadable."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{key: value for key, value in item.items() if key in names})


class LedgerStore:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "state.json"

    def load(self) -> Ledger:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Ledger()
        try:
            return Ledger.from_json(text)
        except (ValueError, TypeError, KeyError) as error:
            raise LedgerError(
                f"{self.path} is not a ledger this sidecar can read ({error}); "
                "move it away to start with a fresh restart budget"
            ) from None

    def save(self, ledger: Ledger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.path, ledger.to_json())


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
