"""The rules of recovery: pure functions of plain values and ``now``, no I/O.

How many restarts a run may have, how long to wait before the next one, when the
runtime (not the sidecar) brings a crashed trainer back, when a restart by the runtime
is overdue, and when detect-only mode watches a stalled run again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.decide.decision import Observation, Phase, RunState, VerdictKind, is_progress

# 2**30 times any base delay is past every sensible maximum; capping the exponent keeps
# the arithmetic finite for a ledger with a huge failure streak.
_MAX_BACKOFF_EXPONENT = 30


@dataclass(frozen=True)
class RecoveryRules:
    max_restarts: int
    backoff: float  # the first delay, doubled per recovery that found nothing newer
    backoff_max: float
    startup_grace: float  # how long the runtime may take to bring a trainer back
    max_futile: int = 3  # recoveries in a row from the same checkpoint before stopping

    def budget_spent(self, restarts: int) -> bool:
        return restarts >= self.max_restarts

    def futile(self, streak: int) -> bool:
        """``streak`` recoveries in a row whose failed attempt saved nothing (the relaunch
        resumes from the same or an older state): relaunching again is futile."""
        return streak >= self.max_futile

    def budget_left(self, restarts: int) -> int:
        return self.max_restarts - restarts

    def backoff_delay(self, consecutive_failures: int) -> float:
        """Seconds to wait before restarting, after ``consecutive_failures`` recoveries in a
        row that had no newer checkpoint to resume from."""
        exponent = min(consecutive_failures, _MAX_BACKOFF_EXPONENT)
        return min(self.backoff_max, self.backoff * 2**exponent)

    def restart_due_by(self, now: float) -> float:
        """When a trainer left to the runtime's restart policy must be back."""
        return now + self.startup_grace


def leave_restart_to_runtime(kind: VerdictKind, *, sidecar_relaunches: bool) -> bool:
    """After a crash under a restart policy the runtime restarts the trainer by itself;
    stopping it then could only kill the new attempt the runtime already started."""
    return kind is VerdictKind.CRASH and not sidecar_relaunches


def restart_overdue(due_by: float | None, now: float) -> bool:
    return due_by is not None and now > due_by


def rearm_after_stall(state: RunState, seen: Observation) -> bool:
    """Detect-only mode reports a stall and then waits: progress afterwards starts a new
    watch of the same trainer (it recovered by itself, or a person fixed it)."""
    return state.phase is Phase.STALLED and is_progress(seen)


def made_progress(chosen_completed_at: float | None, previous_completed_at: float | None) -> bool:
    """Whether the failed attempt left something newer to resume from than the state it
    had resumed from: both times are the state files' own (the storage's clock, never the
    sidecar's). Falling back to an older state, or to the beginning, is no progress."""
    if chosen_completed_at is None:
        return False
    return previous_completed_at is None or chosen_completed_at > previous_completed_at
