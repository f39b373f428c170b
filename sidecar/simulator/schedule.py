"""The training schedule, computed as sd-scripts computes it (pure functions of the flags)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingPlan:
    """Step and epoch totals, computed the way sd-scripts computes them."""

    steps_per_epoch: int
    max_train_steps: int
    num_train_epochs: int

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, steps_per_epoch: int) -> TrainingPlan:
        max_steps = args.max_train_steps
        if args.max_train_epochs is not None:  # sd-scripts: epochs override steps
            max_steps = args.max_train_epochs * steps_per_epoch
        return cls(steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))


def initial_step_for(
    args: argparse.Namespace, steps_from_state: int | None, steps_per_epoch: int
) -> int:
    """The step count to start from: --initial_step/--initial_epoch win over train_state.json."""
    if args.initial_step is not None:
        return int(args.initial_step)
    if args.initial_epoch is not None:
        return (int(args.initial_epoch) - 1) * steps_per_epoch
    return steps_from_state or 0


def first_epoch_index(initial_step: int, plan: TrainingPlan) -> int:
    """Index of the first epoch to train; whole epochs before it are skipped.

    Raises AssertionError, worded like sd-scripts, when nothing would be left to train
    (for instance when resuming from a finished run's final state).
    """
    if initial_step <= 0:
        return 0
    if plan.max_train_steps <= initial_step:
        raise AssertionError(
            "max_train_steps should be greater than initial step: "
            f"{plan.max_train_steps} vs {initial_step}"
        )
    return initial_step // plan.steps_per_epoch


def step_state_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def epoch_state_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def final_state_name(name: str) -> str:
    return f"{name}-state"


def stale_step_state(step: int, keep_steps: int, every_n_steps: int) -> int | None:
    """The step state sd-scripts removes after saving at ``step``, or None.

    ``--save_last_n_steps_state`` counts steps, not folders: the state saved just over
    ``keep_steps`` steps ago (rounded down to the save cadence) is removed.
    """
    candidate = step - keep_steps - 1
    candidate -= candidate % every_n_steps
    return candidate if candidate > 0 else None


def should_sample(args: argparse.Namespace, step: int, epoch: int | None) -> bool:
    """sd-scripts' rule: per-epoch sampling, when asked for, replaces per-step sampling."""
    if not args.sample_prompts:
        return False
    if step == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_epochs:
        return epoch is not None and epoch % args.sample_every_n_epochs == 0
    if not args.sample_every_n_steps:
        return False
    return epoch is None and step % args.sample_every_n_steps == 0
