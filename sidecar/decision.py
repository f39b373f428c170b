"""Deciding whether the run is healthy: pure code, no I/O, the clock passed in.

Phases: starting -> running -> stalled / crashed / completed.

Progress is the step counter moving, the log growing or output files being
written. A busy GPU is never progress: a hung NCCL collective reads 100%. An
idle GPU is strong evidence of a stall, so it shortens the verdict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"
    CRASHED = "crashed"
    COMPLETED = "completed"


class VerdictKind(StrEnum):
    STALL = "stall"
    CRASH = "crash"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Policy:
    stall_timeout: float
    gpu_idle_timeout: float
    gpu_idle_percent: float
    startup_grace: float


@dataclass(frozen=True)
class Observation:
    """What one poll saw. ``now`` is monotonic seconds."""

    now: float
    step: int | None = None
    total_steps: int | None = None
    log_grew: bool = False
    outputs_changed: bool = False
    gpu_utilization: tuple[int, ...] | None = None  # None: no GPU signal this poll
    exited: bool = False  # the trainer is no longer running
    exit_code: int | None = None  # its exit status, where the restart mode can see it
    final_model_present: bool = False
    output_written: bool = False  # the trainer's processes wrote bytes (when no log is readable)


@dataclass(frozen=True)
class RunState:
    phase: Phase
    launched_at: float
    last_progress_at: float
    last_step: int | None = None
    total_steps: int | None = None
    gpu_idle_since: float | None = None
    last_gpu_utilization: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def started(now: float) -> RunState:
    return RunState(phase=Phase.STARTING, launched_at=now, last_progress_at=now)


def advance(state: RunState, seen: Observation, policy: Policy) -> tuple[RunState, Verdict | None]:
    """Fold one observation into the run state; a verdict when the run needs attention."""
    if state.phase in (Phase.STALLED, Phase.CRASHED, Phase.COMPLETED):
        return state, None
    state = _track_progress(state, seen)
    state = _track_gpu(state, seen, policy)
    if seen.exited or seen.exit_code is not None:
        return _exited(state, seen)
    verdict = _stall_verdict(state, seen.now, policy)
    if verdict:
        return dataclasses.replace(state, phase=Phase.STALLED), verdict
    return state, None


def _track_progress(state: RunState, seen: Observation) -> RunState:
    step_moved = seen.step is not None and seen.step != state.last_step
    if not (step_moved or is_progress(seen)):
        return state
    phase = Phase.RUNNING if (state.phase is Phase.RUNNING or step_moved) else state.phase
    return dataclasses.replace(
        state,
        phase=phase,
        last_progress_at=seen.now,
        last_step=seen.step if seen.step is not None else state.last_step,
        total_steps=seen.total_steps if seen.total_steps is not None else state.total_steps,
    )


def is_progress(seen: Observation) -> bool:
    """Progress other than the step counter: output grew or files were written."""
    return seen.log_grew or seen.outputs_changed or seen.output_written


def _track_gpu(state: RunState, seen: Observation, policy: Policy) -> RunState:
    utilization = seen.gpu_utilization
    all_idle = bool(utilization) and all(u < policy.gpu_idle_percent for u in utilization or ())
    if not all_idle:
        idle_since = None
    else:
        idle_since = state.gpu_idle_since if state.gpu_idle_since is not None else seen.now
    return dataclasses.replace(state, gpu_idle_since=idle_since, last_gpu_utilization=utilization)


def _exited(state: RunState, seen: Observation) -> tuple[RunState, Verdict]:
    figures = {**_figures(state, seen.now), "exit_code": seen.exit_code}
    if seen.exit_code in (0, None) and seen.final_model_present:
        completed = dataclasses.replace(state, phase=Phase.COMPLETED)
        how = "exited 0" if seen.exit_code == 0 else "ended"
        return completed, Verdict(
            VerdictKind.COMPLETED, f"trainer {how} with the final model present", figures
        )
    if seen.exit_code is None:
        reason = "trainer ended without the final model (its exit status is not visible here)"
    elif seen.exit_code == 0:
        reason = "trainer exited 0 but the final model is missing"
    else:
        reason = f"trainer exited with code {seen.exit_code}"
    return dataclasses.replace(state, phase=Phase.CRASHED), Verdict(
        VerdictKind.CRASH, reason, figures
    )


def _stall_verdict(state: RunState, now: float, policy: Policy) -> Verdict | None:
    if now - state.launched_at < policy.startup_grace and state.phase is Phase.STARTING:
        return None
    # A slow start that ends within the grace is not a stall: count silence from the later
    # of the last progress and the end of the grace.
    quiet_since = state.last_progress_at
    if state.phase is Phase.STARTING:
        quiet_since = max(
            quiet_since, state.launched_at + policy.startup_grace - policy.stall_timeout
        )
    quiet = now - quiet_since
    if quiet >= policy.stall_timeout:
        return Verdict(
            VerdictKind.STALL,
            f"no progress for {quiet:.0f} s (stall timeout {policy.stall_timeout:.0f} s)",
            _figures(state, now),
        )
    if state.gpu_idle_since is not None:
        idle_for = now - state.gpu_idle_since
        gpu_quiet = min(idle_for, now - state.last_progress_at)
        if gpu_quiet >= policy.gpu_idle_timeout:
            return Verdict(
                VerdictKind.STALL,
                f"GPU idle (below {policy.gpu_idle_percent:g}%) and no progress for "
                f"{gpu_quiet:.0f} s (GPU idle timeout {policy.gpu_idle_timeout:.0f} s)",
                _figures(state, now),
            )
    return None


def _figures(state: RunState, now: float) -> dict[str, Any]:
    return {
        "phase_before": state.phase.value,
        "seconds_since_progress": round(now - state.last_progress_at, 1),
        "last_step": state.last_step,
        "total_steps": state.total_steps,
        "gpu_utilization": list(state.last_gpu_utilization)
        if state.last_gpu_utilization is not None
        else None,
    }
