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

from sidecar.decide.cadence import AdaptiveTimeout, Cadence
from sidecar.decide.sections import Section, SectionCadence, SectionTimeouts


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"
    CRASHED = "crashed"
    COMPLETED = "completed"


class VerdictKind(StrEnum):
    STALL = "stall"
    CRASH = "crash"
    RESUME_FAILED = "resume_failed"  # it stepped, but not from the state it was pointed at
    COMPLETED = "completed"


@dataclass(frozen=True)
class Policy:
    stall_timeout: float
    gpu_idle_timeout: float
    gpu_idle_percent: float
    startup_grace: float
    adaptive: AdaptiveTimeout | None = None  # section-blind learning (the fallback)
    sections: SectionTimeouts | None = None  # SIDECAR_STALL_TIMEOUT=auto: per section

    def stall_timeout_for(self, state: RunState) -> float:
        if self.sections is not None:
            return self.sections.timeout(state.section, state.sections)
        return self.adaptive.timeout(state.cadence) if self.adaptive else self.stall_timeout

    def explain_timeout(self, state: RunState) -> str:
        timeout = self.stall_timeout_for(state)
        if self.sections is not None:
            how = f"; {self.sections.explain(state.section, state.sections)}"
        else:
            how = f"; {self.adaptive.explain(state.cadence)}" if self.adaptive else ""
        return f"stall timeout {timeout:.0f} s{how}"


@dataclass(frozen=True)
class Observation:
    """What one poll saw. ``now`` is monotonic seconds."""

    now: float
    step: int | None = None
    total_steps: int | None = None
    log_grew: bool = False
    outputs_changed: bool = False
    gpu_utilization: tuple[int, ...] | None = None  # None: no GPU signal this poll
    gpu_power_watts: tuple[float | None, ...] | None = None  # same GPUs, same order
    exited: bool = False  # the trainer is no longer running
    exit_code: int | None = None  # its exit status, where the restart mode can see it
    final_model_present: bool = False
    output_written: bool = False  # the trainer's processes wrote bytes (when no log is readable)
    # When the progress seen at this poll happened, if known more precisely than ``now``
    # (the log's last write); never before the previous poll, never after ``now``.
    progress_at: float | None = None
    # What the trainer announced last in this poll's output (None: nothing recognised).
    section: Section | None = None


@dataclass(frozen=True)
class RunState:
    phase: Phase
    launched_at: float
    last_progress_at: float
    last_step: int | None = None
    total_steps: int | None = None
    gpu_idle_since: float | None = None
    last_gpu_utilization: tuple[int, ...] | None = None
    cadence: Cadence = field(default_factory=Cadence)
    gpu_peak_watts: float = 0.0  # the most any watched GPU drew in this run
    last_poll_at: float | None = None  # the previous observation
    section: Section | None = None  # what the trainer is doing, as far as it said
    sections: SectionCadence = field(default_factory=SectionCadence)


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def started(
    now: float, cadence: Cadence | None = None, sections: SectionCadence | None = None
) -> RunState:
    """A new attempt; ``cadence`` and ``sections`` carry what earlier attempts taught."""
    return RunState(
        phase=Phase.STARTING,
        launched_at=now,
        last_progress_at=now,
        cadence=cadence or Cadence(),
        sections=sections or SectionCadence(),
    )


def advance(state: RunState, seen: Observation, policy: Policy) -> tuple[RunState, Verdict | None]:
    """Fold one observation into the run state; a verdict when the run needs attention."""
    if state.phase in (Phase.STALLED, Phase.CRASHED, Phase.COMPLETED):
        return state, None
    state = _track_progress(state, seen)
    state = dataclasses.replace(_track_gpu(state, seen, policy), last_poll_at=seen.now)
    if seen.exited or seen.exit_code is not None:
        return _exited(state, seen)
    verdict = _stall_verdict(state, seen.now, policy)
    if verdict and seen.final_model_present:
        # The final model is written and the trainer only fails to exit (slow teardown, a
        # dataloader worker that never ends): resuming would train a finished run again.
        completed = dataclasses.replace(state, phase=Phase.COMPLETED)
        return completed, Verdict(
            VerdictKind.COMPLETED,
            "the final model is written and the trainer has been silent for "
            f"{verdict.figures.get('seconds_since_progress', 0):.0f} s without exiting",
            {**verdict.figures, "trainer_still_running": True},
        )
    if verdict:
        return dataclasses.replace(state, phase=Phase.STALLED), verdict
    return state, None


def in_section(
    stalled: RunState, section: Section, phase: Phase, now: float, policy: Policy
) -> RunState | None:
    """The run as if the trainer had announced ``section`` (its stacks show it there and
    moving), when that section's budget has not run out yet; None when it has (the stall
    stands). Only section-aware timeouts have a section to extend into."""
    if policy.sections is None or stalled.section is section:
        return None
    extended = dataclasses.replace(stalled, section=section, phase=phase)
    deadline = stall_deadline(extended, policy)
    return extended if deadline is not None and deadline > now else None


def stall_deadline(state: RunState, policy: Policy) -> float | None:
    """When a stall verdict becomes due if nothing progresses meanwhile (None: not watching).

    The loop polls at this moment too, so a hang is reported at the timeout itself rather
    than up to one poll interval later.
    """
    if state.phase not in (Phase.STARTING, Phase.RUNNING):
        return None
    timeout = policy.stall_timeout_for(state)
    deadline = state.last_progress_at + timeout
    if state.phase is Phase.STARTING:
        deadline = max(deadline, state.launched_at + policy.startup_grace)
    elif state.gpu_idle_since is not None:
        idle_from = max(state.gpu_idle_since, state.last_progress_at)
        deadline = min(deadline, idle_from + policy.gpu_idle_timeout)
    return deadline


def _track_progress(state: RunState, seen: Observation) -> RunState:
    step_moved = seen.step is not None and seen.step != state.last_step
    if not (step_moved or is_progress(seen)):
        return state
    phase = Phase.RUNNING if (state.phase is Phase.RUNNING or step_moved) else state.phase
    cadence, sections = state.cadence, state.sections
    if state.phase is Phase.RUNNING:  # start-up pauses (loading, caching) are not cadence
        progress_at = seen.progress_at if seen.progress_at is not None else seen.now
        gap = progress_at - state.last_progress_at
        cadence = cadence.observe(gap)
        if state.section is not None:  # the silence belonged to what the trainer was doing
            sections = sections.observe(state.section, gap)
    section = seen.section or (Section.TRAINING if step_moved else state.section)
    return dataclasses.replace(
        state,
        phase=phase,
        cadence=cadence,
        sections=sections,
        section=section,
        last_progress_at=seen.progress_at if seen.progress_at is not None else seen.now,
        last_step=seen.step if seen.step is not None else state.last_step,
        total_steps=seen.total_steps if seen.total_steps is not None else state.total_steps,
    )


def is_progress(seen: Observation) -> bool:
    """Progress other than the step counter: output grew or files were written."""
    return seen.log_grew or seen.outputs_changed or seen.output_written


# A GPU "100% busy" that draws under this share of its peak in this run is spinning on a
# hung collective or a stalled copy, not computing: it counts as idle.
COLD_BUSY_POWER_SHARE = 0.35
_MEANINGFUL_PEAK_WATTS = 50.0


def _track_gpu(state: RunState, seen: Observation, policy: Policy) -> RunState:
    utilization = seen.gpu_utilization
    powers = seen.gpu_power_watts or ()
    peak = max([state.gpu_peak_watts, *(p for p in powers if p is not None)])
    padded = [*powers, *[None] * (len(utilization or ()) - len(powers))]
    idle = [
        u < policy.gpu_idle_percent or _busy_but_cold(p, peak)
        for u, p in zip(utilization or (), padded, strict=False)
    ]
    if not (idle and all(idle)):
        idle_since = None
    elif state.gpu_idle_since is not None:
        idle_since = state.gpu_idle_since
    else:
        # It went idle since the previous poll; from then on, nothing has progressed either.
        since = state.last_poll_at if state.last_poll_at is not None else seen.now
        idle_since = max(since, state.last_progress_at)
    return dataclasses.replace(
        state, gpu_idle_since=idle_since, last_gpu_utilization=utilization, gpu_peak_watts=peak
    )


def _busy_but_cold(power: float | None, peak: float) -> bool:
    return (
        power is not None
        and peak >= _MEANINGFUL_PEAK_WATTS
        and power < COLD_BUSY_POWER_SHARE * peak
    )


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
    timeout = policy.stall_timeout_for(state)
    quiet_since = state.last_progress_at
    if state.phase is Phase.STARTING:
        quiet_since = max(quiet_since, state.launched_at + policy.startup_grace - timeout)
    quiet = now - quiet_since
    if quiet >= timeout:
        return Verdict(
            VerdictKind.STALL,
            f"no progress for {quiet:.0f} s ({policy.explain_timeout(state)})",
            {**_figures(state, now), "stall_timeout": round(timeout, 1)},
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
        "section": state.section.value if state.section else None,
        "seconds_since_progress": round(now - state.last_progress_at, 1),
        "last_step": state.last_step,
        "total_steps": state.total_steps,
        "gpu_utilization": list(state.last_gpu_utilization)
        if state.last_gpu_utilization is not None
        else None,
    }
