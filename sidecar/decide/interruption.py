"""What to do at start about a run that was interrupted: pure, no I/O.

Interrupted means the sidecar or the machine went away while a trainer of the run was
training (a reboot, a preemption, a recreated container, a SIGTERM). Such a run is resumed
by itself from its newest complete state, unless it is finished, the user abandoned it,
resuming is turned off, or the machine keeps dying before the run gets anywhere. It is
never charged to the restart budget, which is for the run's own failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class InterruptionOptions:
    resume: bool  # SIDECAR_RESUME_INTERRUPTED
    max_in_a_row: int  # SIDECAR_MAX_INTERRUPTIONS


class Plan(Enum):
    RELAUNCH = "relaunch"  # the sidecar starts it again (process, exec, container modes)
    AWAIT_TRAINER = "await trainer"  # a trainer of it runs, or the orchestrator starts one
    LEAVE = "leave"  # not resumed, for the reason given
    GIVE_UP = "give up"  # interrupted too often in a row


@dataclass(frozen=True)
class InterruptionPlan:
    plan: Plan
    cause: str | None = None  # LEAVE: completed | abandoned | disabled | detect_only
    reason: str = ""


def plan_after_interruption(
    *,
    enabled: bool,
    acts: bool,
    relaunches: bool,
    completed: bool,
    abandoned: bool,
    trainer_running: bool,
    consecutive: int,
    max_interruptions: int,
) -> InterruptionPlan:
    if completed:
        return InterruptionPlan(Plan.LEAVE, "completed", "the run had already completed")
    if abandoned:
        return InterruptionPlan(Plan.LEAVE, "abandoned", "the run was abandoned")
    if not acts:
        return InterruptionPlan(Plan.LEAVE, "detect_only", "detect-only mode starts nothing")
    if not enabled:
        return InterruptionPlan(Plan.LEAVE, "disabled", "SIDECAR_RESUME_INTERRUPTED is false")
    if consecutive > max_interruptions:
        return InterruptionPlan(
            Plan.GIVE_UP,
            reason=f"interrupted {consecutive} times in a row with no new complete state in "
            f"between (SIDECAR_MAX_INTERRUPTIONS={max_interruptions}): the machine does not "
            "stay up long enough for the run to progress",
        )
    if trainer_running or not relaunches:
        return InterruptionPlan(Plan.AWAIT_TRAINER)
    return InterruptionPlan(Plan.RELAUNCH)


def down_seconds(interrupted_at: float, resumed_at: float) -> float:
    """How long the run was down; never negative (a wall clock that stepped back)."""
    return round(max(0.0, resumed_at - interrupted_at), 3)
