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


def step_state_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def epoch_state_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def final_state_name(name: str) -> str:
    return f"{name}-state"


def stale_step_state(step: int, keep_steps: int, every_n_steps: int) -> int | None:
    """The step state sd-scripts removes after saving at ``step``, or None.

    ``--save_last_n_steps_state`` counts steps, not folders: the state saved just over
    ``keep_steps`` steps ago (rounded down to the save cadence) is removed
    (train_util.save_and_remove_state_stepwise: ``if remove_step_no > 0``).
    """
    candidate = step - keep_steps - 1
    candidate -= candidate % every_n_steps
    return candidate if candidate > 0 else None


def stale_step_model(step: int, keep_steps: int | None, every_n_steps: int) -> int | None:
    """train_util.get_remove_step_no: the step model file removed after saving at ``step``.

    Same arithmetic as for states, but only ``--save_last_n_steps`` counts and the test is
    ``remove_step_no < 0`` (so step 0 is "removed", which finds no file).
    """
    if keep_steps is None:
        return None
    candidate = step - keep_steps - 1
    candidate -= candidate % every_n_steps
    return None if candidate < 0 else candidate


def stale_epoch_model(epoch: int, keep_epochs: int | None, every_n_epochs: int) -> int | None:
    """train_util.get_remove_epoch_no: the epoch model file removed after saving ``epoch``."""
    if keep_epochs is None:
        return None
    candidate = epoch - every_n_epochs * keep_epochs
    return None if candidate < 0 else candidate


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
