"""kohya-ss sd-scripts, as FluxGym launches it: train.sh dialect and rewriting, state folder
names, progress lines. :data:`SD_SCRIPTS` is all of it as one
:class:`~sidecar.trainers.base.Trainer`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.checkpoints.file_checks import inspect_state_file
from sidecar.checkpoints.scan import find_candidates
from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar
from sidecar.trainers.base import (
    ExpectedResume,
    LaunchCommand,
    ResumePosition,
    RunLocation,
    StartupReport,
)
from sidecar.trainers.sd_scripts import (
    config_file,
    launch_script,
    position,
    progress_lines,
    sections,
)
from sidecar.trainers.sd_scripts import state_naming as naming
from sidecar.trainers.shell import train_script
from sidecar.trainers.shell.launch_processes import launch_process_count

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

__all__ = ["SD_SCRIPTS", "SdScripts"]

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt")  # what --save_model_as may write
# sd-scripts' training entry points (kohya-ss/sd-scripts, repository root): the LoRA ones
# (`*train_network.py`), the full fine-tunes and the rest.
_SCRIPT_NAME = re.compile(
    r"(?:(?:sdxl|sd3|flux|lumina|hunyuan_image)_)?"
    r"(?:train_network|train|train_db|fine_tune|train_textual_inversion|train_control_net"
    r"|train_controlnet|train_control_net_lllite)\.py"
)
# Options only sd-scripts' argparse defines (train_util.add_training_arguments and friends).
_OWN_OPTIONS = (
    "--output_name",
    "--save_state",
    "--network_module",
    "--dataset_config",
    "--save_every_n_epochs",
    "--max_train_epochs",
    "--resume",
    "--config_file",
)


class SdScripts:
    """sd-scripts behind the :class:`~sidecar.trainers.base.Trainer` seam (no state of its own)."""

    name = "sd-scripts"

    def recognises(self, command: LaunchCommand) -> bool:
        script = command.trainer_script.replace("\\", "/")
        if "sd-scripts/" in script or "/sd_scripts/" in script:
            return True
        name = script.rsplit("/", 1)[-1]
        # Its entry points by name, but for the two names that are anyone's (`train.py`, and
        # diffusers' `train_controlnet.py`): those need one of its own options.
        if _SCRIPT_NAME.fullmatch(name) and name not in ("train.py", "train_controlnet.py"):
            return True
        return any(command.option(flag) is not None for flag in _OWN_OPTIONS)

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        why = command.unresolved("output_dir")
        output_dir = sidecar_path(command.output_dir) if command.output_dir and not why else None
        # "last": sd-scripts' own default output_name (train_util.add_training_arguments).
        return RunLocation(
            output_dir, command.output_name or "last", why_unknown=why, made_by_trainer=False
        )

    def state_naming(self, output_name: str | None) -> naming.SdScriptsStateNaming:
        return naming.state_naming(output_name)

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        return find_candidates(
            output_dir,
            now=now,
            settle_seconds=settle_seconds,
            output_name=output_name,
            naming=naming.state_naming,
            memo=memo,
        )

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        return []  # --resume names the state: sd-scripts picks nothing by itself

    def aside_path(self, state: Path, stamp: str) -> Path:
        return state.with_name(f"{state.name}.incomplete-{stamp}")

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        return [output_dir / f"{output_name}{suffix}" for suffix in MODEL_SUFFIXES]

    def resumed_state_step(self, state: Path) -> int | None:
        return inspect_state_file(state / "train_state.json").step

    def step_bar(self, text: str) -> TqdmBar | None:
        return progress_lines.step_bar(text)

    def section_at_end(self, text: str) -> Section | None:
        return sections.section_at_end(text)

    def read_launch_script(self, text: str) -> train_script.TrainCommand:
        command = train_script.parse_train_script(text)
        # The kohya_ss GUI's runs name a TOML with the options (command line beats it):
        # read as sd-scripts reads it, where the path is absolute (a captured launch).
        path = config_file.config_path(command.trainer_args)
        if path is None or not Path(path).is_absolute():
            return command
        return config_file.effective_command(
            command, config_file.read_config_text(path), source=path
        )

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        return launch_script.rewritten_train_script(
            text,
            resume_from=resume_from,
            ensure_save_state=ensure_save_state,
            initial_step=initial_step,
        )

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        return launch_script.rewrite_train_script(
            script,
            resume_from=resume_from,
            ensure_save_state=ensure_save_state,
            initial_step=initial_step,
        )

    def read_startup(self, text: str) -> StartupReport:
        return position.startup_report(text)

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        writer = ledger.attempt_that_wrote(state.completed_at)
        initial_step, reason = position.plan_position(
            state_step=state.step,
            state_kind=state.kind,
            state_number=state.number,
            writer_initial_step=writer.initial_step if writer else None,
            steps_per_epoch=ledger.steps_per_epoch,
            gradient_accumulation=ledger.gradient_accumulation,
        )
        return ResumePosition(initial_step, reason)

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        assert isinstance(command, train_script.TrainCommand)
        return launch_script.state_cadence(command, steps_per_epoch)

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        return launch_script.add_save_cadence(
            script, every_n_steps=every_n_steps, keep_last_steps=keep_last_steps
        )

    def launch_ranks(self, command: LaunchCommand) -> int:
        assert isinstance(command, train_script.TrainCommand)
        try:
            return launch_process_count(
                [*command.launcher_args, command.trainer_script, *command.trainer_args]
            )
        except ValueError:
            return 1  # a line its launcher would refuse starts no ranks at all

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        return launch_script.remedy(script, hang)

    def run_identity(self, text: str) -> str:
        bare = launch_script.rewritten_train_script(
            text, resume_from=None, ensure_save_state=False, initial_step=None
        )
        # A remedy (SIDECAR_REMEDIATE) changes how data is loaded, not what is trained.
        for flag in (*launch_script.SIDECAR_MANAGED_FLAGS, *launch_script.REMEDY_FLAGS):
            bare = train_script.remove_option(bare, flag)
        return hashlib.sha256(bare.encode("utf-8", "surrogateescape")).hexdigest()

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        if not command.resume:
            return None
        exact = command.option(position.SKIP_UNTIL_INITIAL_STEP) is not None
        initial = _int_option(command, position.INITIAL_STEP) if exact else None
        return ExpectedResume(command.resume, initial)

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        initial_step = _int_option(command, position.INITIAL_STEP)
        initial_epoch = _int_option(command, position.INITIAL_EPOCH)
        if initial_step is None and initial_epoch is not None and not steps_per_epoch:
            return None  # --initial_epoch needs the steps per epoch, not seen yet
        return position.initial_step_of(
            initial_step=initial_step,
            initial_epoch=initial_epoch,
            steps_from_state=state_step if command.resume else None,
            steps_per_epoch=steps_per_epoch or 1,
        )

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        return launch_script.add_save_state(script)

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return launch_script.script_diff(old, new, script, context=context)


SD_SCRIPTS = SdScripts()


def _int_option(command: LaunchCommand, flag: str) -> int | None:
    value = command.option(flag)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # not a number: sd-scripts' argparse would refuse it at launch
