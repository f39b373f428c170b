"""Where a (resumed) attempt starts, computed exactly as sd-scripts' ``train_network.py`` does.

Read at sd3 == main 48d368f, the block after ``train_util.resume_from_local_or_hf_if_specified``
("calculate steps to skip when resuming or starting from a specific step") and the skip loop
before the progress bar ("training loop", ``if initial_step > 0``). The simulator runs one
process with ``gradient_accumulation_steps`` 1, which is what FluxGym runs, so sd-scripts'
``math.ceil(len(train_dataloader) / num_processes / gradient_accumulation_steps)`` and
``initial_step *= gradient_accumulation_steps`` reduce to ``steps_per_epoch`` and a no-op.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.simulator.schedule import TrainingPlan

Log = Callable[[str, str], None]  # (message, level), like Terminal.log

STATE_STEPS_IGNORED = (
    "steps from the state is ignored because initial_step is specified / "
    "initial_stepが指定されているため、stateからのステップ数は無視されます"
)
NOT_RESUMING = (
    "initial_step is specified but not resuming. lr scheduler will be started from the "
    "beginning / initial_stepが指定されていますがresumeしていないため、"
    "lr schedulerは最初から始まります"
)


@dataclass(frozen=True)
class ResumePosition:
    """``epoch_to_start`` and the ``initial_step`` left for the training loop.

    ``initial_step`` is non-zero only with ``--skip_until_initial_step``: sd-scripts sets it to
    0 otherwise ("do not skip"), so the partial epoch is trained again from its first batch.
    """

    epoch_to_start: int
    initial_step: int
    steps_per_epoch: int

    def skipped_epoch_messages(self) -> list[str]:
        """The loop's ``skipping epoch {k+1} because initial_step (multiplied) is {n}`` lines."""
        messages: list[str] = []
        remaining = self.initial_step
        if remaining > 0:  # "only if skip_until_initial_step is specified"
            for skip_epoch in range(self.epoch_to_start):
                messages.append(
                    f"skipping epoch {skip_epoch + 1} because initial_step (multiplied) is "
                    f"{remaining}"
                )
                remaining -= self.steps_per_epoch
        return messages

    @property
    def batches_to_discard(self) -> int:
        """Batches of the first epoch read and thrown away; also where ``global_step`` starts.

        After the skip loop sd-scripts sets ``global_step = initial_step`` (the remainder inside
        the epoch, not an absolute step) and makes the bar ``max_train_steps - initial_step``.
        """
        if self.initial_step <= 0:
            return 0
        return self.initial_step - self.epoch_to_start * self.steps_per_epoch


def requested_initial_step(
    args: argparse.Namespace, steps_from_state: int | None, steps_per_epoch: int, log: Log
) -> int:
    """``initial_step``: --initial_step wins over --initial_epoch, both over train_state.json."""
    if args.initial_epoch is not None or args.initial_step is not None:
        # sd-scripts: "steps_from_state is ignored even when resuming", with a warning
        if steps_from_state is not None:
            log(STATE_STEPS_IGNORED, "WARNING")
        if args.initial_step is not None:
            return int(args.initial_step)
        return (int(args.initial_epoch) - 1) * steps_per_epoch
    # "if initial_epoch and initial_step are not specified, steps_from_state is used"
    return steps_from_state if steps_from_state is not None else 0


def resume_position(
    args: argparse.Namespace, steps_from_state: int | None, plan: TrainingPlan, log: Log
) -> ResumePosition:
    """Compute the start of training, logging sd-scripts' lines; may fail its assertion.

    Raises AssertionError, worded like sd-scripts, when ``initial_step`` is not below
    ``max_train_steps`` (for instance when resuming from a finished run's final state).
    """
    initial_step = requested_initial_step(args, steps_from_state, plan.steps_per_epoch, log)
    if initial_step > 0 and not plan.max_train_steps > initial_step:
        raise AssertionError(
            "max_train_steps should be greater than initial step / "
            f"max_train_stepsは初期ステップより大きい必要があります: "
            f"{plan.max_train_steps} vs {initial_step}"
        )
    epoch_to_start = 0
    if initial_step > 0:
        # both branches: epoch_to_start = initial_step // ceil(len(dataloader) / grad_accum)
        epoch_to_start = initial_step // plan.steps_per_epoch
        if args.skip_until_initial_step:
            if not args.resume:
                log(NOT_RESUMING, "INFO")
            log(f"skipping {initial_step} steps / {initial_step}ステップをスキップします", "INFO")
        else:
            initial_step = 0  # "only epoch no is skipped for informative purpose"
    return ResumePosition(epoch_to_start, initial_step, plan.steps_per_epoch)
