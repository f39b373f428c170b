"""The Hugging Face transformers Trainer and the front ends built on it (TrainingArguments
scripts, TRL's scripts, Axolotl, LLaMA-Factory). :data:`HF_TRAINER` is all of it as one
:class:`~sidecar.trainers.base.Trainer`.

Its resume is exact: ``trainer_state.json`` restores ``global_step`` and the Trainer skips
the batches it already trained (``Trainer._inner_training_loop``), so the sidecar only names
the checkpoint and sets aside any incomplete one that ``get_last_checkpoint`` would prefer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar
from sidecar.trainers.base import (
    ExpectedResume,
    LaunchCommand,
    ResumePosition,
    RunLocation,
    StartupReport,
)
from sidecar.trainers.hf_trainer import checkpoints, launch, progress
from sidecar.trainers.sd_scripts.launch_script import script_diff
from sidecar.trainers.shell.launch_processes import launch_process_count
from sidecar.trainers.shell.train_script import remove_option, set_option

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

__all__ = ["HF_TRAINER", "HfTrainer"]

# Options only TrainingArguments defines among the supported trainers' command lines
# (diffusers' scripts say --train_batch_size, --checkpointing_steps, --max_train_steps;
# sd-scripts --save_every_n_steps, --max_train_steps), in both of HfArgumentParser's spellings.
_OWN_OPTIONS = tuple(
    spelling
    for name in (
        "per_device_train_batch_size",
        "save_steps",
        "save_total_limit",
        "save_strategy",
        "save_only_model",
        "logging_steps",
        "eval_strategy",
        "evaluation_strategy",
        "overwrite_output_dir",
        "do_train",
        "max_steps",
        "use_cpu",
    )
    for spelling in (f"--{name}", f"--{name.replace('_', '-')}")
)
_FINAL_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)
_EXACT = (
    "exact: trainer_state.json restores global_step and the Trainer skips the batches it "
    "already trained (transformers Trainer._inner_training_loop)"
)
DATALOADER_WORKERS = "--dataloader_num_workers"


class HfTrainer:
    """The HF Trainer behind the :class:`~sidecar.trainers.base.Trainer` seam (no state)."""

    name = "hf-trainer"

    def recognises(self, command: LaunchCommand) -> bool:
        script = command.trainer_script
        if script in ("axolotl train", "llamafactory-cli train") or script.startswith("trl "):
            return True
        if script.startswith("axolotl.cli") or script.startswith("llamafactory."):
            return True
        if script.replace("\\", "/").endswith("llamafactory/launcher.py"):
            return True
        return any(command.option(flag) is not None for flag in _OWN_OPTIONS)

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        command = launch.as_hf_command(command)
        why = command.unresolved("output_dir")
        if why:
            return RunLocation(None, "", why_unknown=why)
        output_dir = command.output_dir
        if output_dir is None:
            output_dir, why = launch.config_value(command, "output_dir", sidecar_path)
        if output_dir is None:
            flag = command.dialect.output_flags[:1] or ("output_dir=",)
            why = why or (f"the launch command sets no {flag[0]} (nor its config file)")
            return RunLocation(None, "", why_unknown=why)
        return RunLocation(sidecar_path(output_dir), "")

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        return checkpoints.find_checkpoints(
            output_dir, now=now, settle_seconds=settle_seconds, memo=memo
        )

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        return checkpoints.in_the_way(candidates, chosen)

    def aside_path(self, state: Path, stamp: str) -> Path:
        return state.with_name(checkpoints.aside_name(state.name, stamp))

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        # Trainer.save_model() into output_dir, as the scripts call it after train().
        return [output_dir / name for name in _FINAL_MODEL_FILES]

    def resumed_state_step(self, state: Path) -> int | None:
        return checkpoints.trainer_state_step(state)

    def step_bar(self, text: str) -> TqdmBar | None:
        return progress.step_bar(text)

    def section_at_end(self, text: str) -> Section | None:
        return progress.section_at_end(text)

    def read_launch_script(self, text: str) -> launch.HfTrainerCommand:
        return launch.read_command(text)

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        # Every checkpoint is resumable state already; the exact trainer ignores initial_step.
        return launch.with_resume(text, resume_from)

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        return _rewrite(script, lambda text: launch.with_resume(text, resume_from))

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        text = read_text_exact(script)
        return False, text, text  # each checkpoint holds optimizer, scheduler and RNG state

    def read_startup(self, text: str) -> StartupReport:
        return progress.read_startup(text)

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        return ResumePosition(None, _EXACT)

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        command = launch.as_hf_command(command)
        if not command.save_state:
            return None
        strategy = _option(command, "save_strategy")
        if strategy == "epoch":
            return steps_per_epoch
        steps = _option(command, "save_steps")
        if steps is None:
            return 500  # TrainingArguments.save_steps' default, with save_strategy "steps"
        try:
            value = float(steps)
        except ValueError:
            return None
        return int(value) if value >= 1 else None  # below 1: a ratio of the total steps

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        def edit(text: str) -> str:
            command = launch.read_command(text)
            if command.dialect.name != "arguments":
                return text  # the cadence is in the config file: not edited
            if _option(command, "save_strategy") not in (None, "steps"):
                return text
            own = _int(_option(command, "save_steps"))
            if own is None or own > every_n_steps:
                text = set_option(text, "--save_steps", str(every_n_steps))
            if _option(command, "save_total_limit") is None:
                keep = max(2, math.ceil(keep_last_steps / every_n_steps))
                text = set_option(text, "--save_total_limit", str(keep))
            return text

        return _rewrite(script, edit)

    def launch_ranks(self, command: LaunchCommand) -> int:
        if not command.launcher_args:
            return 1  # an entry point (axolotl, llamafactory-cli) starts its own launcher
        try:
            return launch_process_count(command.words)
        except ValueError:
            return 1  # a line its launcher would refuse starts no ranks at all

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        def edit(text: str) -> str:
            command = launch.read_command(text)
            if hang != "dataloader_wait" or command.dialect.name != "arguments":
                return text
            if command.option(DATALOADER_WORKERS) == "0":
                return text
            # TrainingArguments.dataloader_num_workers 0: load in the main process.
            return set_option(text, DATALOADER_WORKERS, "0")

        return _rewrite(script, edit)

    def run_identity(self, text: str) -> str:
        bare = launch.with_resume(text, None)
        if DATALOADER_WORKERS in bare:
            bare = remove_option(bare, DATALOADER_WORKERS)
        return hashlib.sha256(bare.encode("utf-8", "surrogateescape")).hexdigest()

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        resume = launch.as_hf_command(command).resume
        return ExpectedResume(resume, None) if resume else None

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        return (state_step or 0) if launch.as_hf_command(command).resume else 0

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return script_diff(old, new, script, context=context)


HF_TRAINER = HfTrainer()


def _option(command: launch.HfTrainerCommand, name: str) -> str | None:
    return command.option(name) or command.option(name.replace("_", "-"))


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _rewrite(script: Path, edit: Callable[[str], str]) -> tuple[bool, str, str]:
    old = read_text_exact(script)
    new = edit(old)
    if new == old:
        return False, old, new
    copy_once(script, script.with_name(script.name + ".orig"))
    replace_atomically(script, new)
    return True, old, new
