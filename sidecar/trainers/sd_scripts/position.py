"""Where sd-scripts resumes, and the arguments that make a resume exact.

Read from sd-scripts' train_network.py (sd3 == main, 48d368f):

- the save pre-hook writes ``train_state.json`` with ``current_step = global_step``, and
  ``global_step`` counts only this attempt's steps (it restarts at 0 after every resume);
- on ``--resume`` the load pre-hook takes ``steps_from_state = current_step``; with neither
  ``--initial_step`` nor ``--initial_epoch`` that is the initial step; ``--initial_step``
  wins over ``--initial_epoch``, which means ``(initial_epoch - 1) * steps_per_epoch``;
- ``epoch_to_start = initial_step // steps_per_epoch``; without ``--skip_until_initial_step``
  the partial epoch is trained again and ``global_step`` starts at 0; with it, the partial
  epoch's first batches are discarded and ``global_step`` starts at the remainder.

So an attempt's ``global_step`` 0 sits at ``epoch_to_start * steps_per_epoch`` of the whole
schedule, whatever the flags, and a state's absolute step is that offset plus its
``current_step``. Only whoever launches the attempts knows the offsets; the ledger keeps
them. ``--initial_step <absolute> --skip_until_initial_step`` then makes the next attempt
start exactly there. With gradient accumulation sd-scripts multiplies the initial step
before dividing by optimizer steps per epoch, mixing units; the exact arguments are only
written with accumulation 1 (FluxGym's).
"""

from __future__ import annotations

import math
import re

from sidecar.trainers.base import StartupReport
from sidecar.trainers.sd_scripts.rich_log import unwrap

INITIAL_STEP = "--initial_step"
INITIAL_EPOCH = "--initial_epoch"
SKIP_UNTIL_INITIAL_STEP = "--skip_until_initial_step"

# The "running training" block sd-scripts prints after loading (train_network.py).
_BATCHES_PER_EPOCH = re.compile(r"num batches per epoch / 1epochのバッチ数: (\d+)")
_ACCUMULATION = re.compile(r"gradient accumulation steps / 勾配を合計するステップ数 = (\d+)")
_TOTAL_STEPS = re.compile(r"total optimization steps / 学習ステップ数: (\d+)")
# train_util.resume_from_local_or_hf_if_specified and the load pre-hook.
_RESUMED_FROM = re.compile(r"resume training from local state: (.+?)\s*$", re.MULTILINE)
_TRAIN_STATE_LOADED = re.compile(r"load train state from (.+?): \{", re.MULTILINE)
_SKIPPING = re.compile(r"skipping (\d+) steps / ")


def initial_step_of(
    *,
    initial_step: int | None,
    initial_epoch: int | None,
    steps_from_state: int | None,
    steps_per_epoch: int,
) -> int:
    """The initial step sd-scripts computes from its flags and the loaded state."""
    if initial_step is not None:
        return initial_step
    if initial_epoch is not None:
        return (initial_epoch - 1) * steps_per_epoch
    return steps_from_state or 0


def attempt_offset(initial_step: int, steps_per_epoch: int) -> int:
    """Where the attempt's ``global_step`` 0 sits in the whole schedule."""
    return (initial_step // steps_per_epoch) * steps_per_epoch


def absolute_step(state_step: int, *, attempt_initial_step: int, steps_per_epoch: int) -> int:
    """A state's step in the whole schedule, from its ``current_step`` and the initial step
    of the attempt that wrote it."""
    return attempt_offset(attempt_initial_step, steps_per_epoch) + state_step


def startup_report(text: str) -> StartupReport:
    """The schedule figures and the resume lines in a piece of sd-scripts' output (its log
    records wrapped by rich at 80 columns, which the resume lines always are)."""
    text = unwrap(text)
    batches = _last_number(_BATCHES_PER_EPOCH, text)
    accumulation = _last_number(_ACCUMULATION, text)
    resumed = _RESUMED_FROM.findall(text)
    return StartupReport(
        steps_per_epoch=math.ceil(batches / (accumulation or 1)) if batches else None,
        gradient_accumulation=accumulation,
        total_steps=_last_number(_TOTAL_STEPS, text),
        resumed_from=resumed[-1] if resumed else None,
        train_state_loaded=bool(_TRAIN_STATE_LOADED.search(text)),
        skipped_steps=_last_number(_SKIPPING, text),
    )


def _last_number(pattern: re.Pattern[str], text: str) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


def plan_position(
    *,
    state_step: int | None,
    state_kind: str,
    state_number: int | None,
    writer_initial_step: int | None,
    steps_per_epoch: int | None,
    gradient_accumulation: int | None,
) -> tuple[int | None, str]:
    """The absolute step of a state, and why; None when it cannot be known exactly.

    ``state_step`` is its train_state.json ``current_step`` (None: missing or unreadable,
    then the folder's name stands in: a step state is named by the same ``global_step``,
    an epoch state ends epoch N); ``writer_initial_step`` the initial step of the attempt
    that wrote it (None: before any recorded attempt, i.e. the run's first).
    """
    if gradient_accumulation not in (None, 1):
        return None, (
            f"gradient accumulation {gradient_accumulation}: sd-scripts' skip arithmetic "
            "mixes batches and optimizer steps, so it resumes by its own rule"
        )
    initial = writer_initial_step or 0
    if initial and not steps_per_epoch:
        return None, "steps per epoch not seen in the trainer's output yet; its own rule applies"
    offset = attempt_offset(initial, steps_per_epoch) if initial and steps_per_epoch else 0
    if state_step is not None:
        step, source = state_step, "train_state.json"
    elif state_kind == "step" and state_number is not None:
        step, source = state_number, "the folder's step number (train_state.json unreadable)"
    elif state_kind == "epoch" and state_number is not None and steps_per_epoch:
        return state_number * steps_per_epoch, (
            f"end of epoch {state_number} (train_state.json unreadable)"
        )
    else:
        return None, "the state's step is unknown (train_state.json unreadable)"
    absolute = offset + step
    how = f"step {step} from {source}"
    if offset:
        how += f" + {offset} before the attempt that wrote it"
    return absolute, f"step {absolute} of the whole run ({how})"
