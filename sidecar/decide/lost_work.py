"""Bounded lost work: save resumable state often enough that an incident costs at most
``SIDECAR_MAX_LOST_WORK`` of training.

FluxGym saves state every 4 epochs by default; on a slow card that can be hours between
states, all of it trained again after a hang. Once the run's step time is known, a state
cadence that could lose more than the bound gets a denser step cadence for the next
launch, and a disk bound for the step states it adds. A user's own denser cadence, or
their own disk bound, is never touched. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Steps to average over before trusting the step time (the first steps are slower: caches
# warm up, and the first after a resume pays for the skipped batches).
STEPS_TO_MEASURE = 20
# The added cadence aims at this share of the bound: step times wander by a few tens of
# percent, and the next attempt's measurement must not find it over the bound again.
BOUND_SHARE = 0.8


@dataclass(frozen=True)
class SaveCadence:
    every_n_steps: int  # --save_every_n_steps
    keep_last_steps: int  # --save_last_n_steps_state: step states within this many steps stay


def denser_cadence(
    *, bound_seconds: float, step_seconds: float, state_every_steps: int | None
) -> SaveCadence | None:
    """The cadence to add, or None when the present one already loses less than the bound
    (``state_every_steps`` None: no resumable state is saved at all, or not known)."""
    if bound_seconds <= 0 or step_seconds <= 0:
        return None
    if state_every_steps is not None and state_every_steps * step_seconds <= bound_seconds:
        return None
    every = max(1, math.floor(BOUND_SHARE * bound_seconds / step_seconds))
    # Two saves' worth of step states stay: the newest may be the one a hang cut short.
    return SaveCadence(every_n_steps=every, keep_last_steps=2 * every)


@dataclass(frozen=True)
class StepClock:
    """The step time of one attempt, from its first step on."""

    first_step: int
    first_at: float

    def seconds_per_step(self, step: int, now: float) -> float | None:
        done = step - self.first_step
        if done < STEPS_TO_MEASURE or now <= self.first_at:
            return None
        return (now - self.first_at) / done
