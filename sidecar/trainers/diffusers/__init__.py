"""diffusers' example training scripts (``examples/dreambooth/train_dreambooth_lora_flux.py``
and its siblings): checkpoint folders, the resume lever, console lines.
:data:`DIFFUSERS` is all of it as one :class:`~sidecar.trainers.base.Trainer`.

Position: exact in steps. diffusers takes ``global_step = int("checkpoint-N".split("-")[1])``
(absolute), ``first_epoch = global_step // num_update_steps_per_epoch``, and the progress bar
starts at ``initial_global_step = global_step``; it then runs epoch ``first_epoch`` from its
first batch (the examples at main skip nothing; only a few older ones, e.g.
``unconditional_image_generation/train_unconditional.py``, still skip with ``resume_step``),
so the ``N % num_update_steps_per_epoch`` updates of that epoch already trained are trained
again on the same epoch's batches as steps N+1...: no step number is lost or repeated, those
batches are seen twice. Nothing the sidecar could add changes that.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.atomic_files import read_text_exact
from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar
from sidecar.trainers.base import (
    ExpectedResume,
    LaunchCommand,
    ResumePosition,
    RunLocation,
    StartupReport,
)
from sidecar.trainers.diffusers import checkpoint_files, console, launch_script, state_naming
from sidecar.trainers.sd_scripts.launch_script import script_diff
from sidecar.trainers.shell.launch_processes import launch_process_count

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

__all__ = ["DIFFUSERS", "Diffusers"]

# diffusers' example training scripts at main (huggingface/diffusers examples/*/): the name
# alone tells. train_controlnet.py is also an sd-scripts file name (kohya-ss/sd-scripts,
# repository root), so that one needs a diffusers-only option or an examples/ path as well.
_SCRIPT_NAME = re.compile(
    r"train_(?:dreambooth|text_to_image|controlnet_(?:flux|sd3|sdxl)|instruct_pix2pix_sdxl"
    r"|lcm_distill|custom_diffusion|t2i_adapter|cogvideox|control_(?:flux|lora_flux|cogview4))"
    r"\w*\.py|textual_inversion(?:_sdxl)?\.py"
)
_SHARED_NAME = "train_controlnet.py"
# Examples at main that resume another way: train_instruct_pix2pix.py and
# unconditional_image_generation/train_unconditional.py still skip the partial epoch
# (resume_step) under a bar that is not the absolute step; amused/train_amused.py and
# vqgan/train_vqgan.py load the value as a path, not as a name under output_dir.
_RESUMES_OTHERWISE = frozenset(
    ("train_instruct_pix2pix.py", "train_unconditional.py", "train_amused.py", "train_vqgan.py")
)
# Options only diffusers' examples define (sd-scripts, HF TrainingArguments and
# transformers' *_no_trainer.py examples have none of them).
_OWN_OPTIONS = ("--checkpoints_total_limit", "--instance_data_dir", "--instance_prompt")
_CONTROLNET_OPTIONS = (*_OWN_OPTIONS, "--checkpointing_steps", "--controlnet_model_name_or_path")
_SD_SCRIPTS_PATHS = ("sd-scripts/", "/sd_scripts/")
_FINAL_MODELS = (
    checkpoint_files.LORA_WEIGHTS,  # the LoRA scripts' save_lora_weights(output_dir)
    checkpoint_files.MODEL_WEIGHTS,  # controlnet & co.: model.save_pretrained(output_dir)
    "model_index.json",  # full fine-tunes: pipeline.save_pretrained(output_dir)
)


class Diffusers:
    """diffusers behind the :class:`~sidecar.trainers.base.Trainer` seam (no state of its own)."""

    name = "diffusers"

    def recognises(self, command: LaunchCommand) -> bool:
        script = command.trainer_script.replace("\\", "/")
        if any(marker in script for marker in _SD_SCRIPTS_PATHS):
            return False
        base = script.rsplit("/", 1)[-1]
        if base in _RESUMES_OTHERWISE:
            return False
        if _SCRIPT_NAME.fullmatch(base):
            return True
        if base == _SHARED_NAME:
            return "examples/controlnet/" in script or _has_any(command, _CONTROLNET_OPTIONS)
        return _has_any(command, _OWN_OPTIONS)

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        why = command.unresolved("output_dir")
        # parse_args' own default: every example script has --output_dir, most default it.
        output_dir = sidecar_path(command.output_dir) if command.output_dir and not why else None
        return RunLocation(output_dir, "", why_unknown=why)

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        return checkpoint_files.find_checkpoints(
            output_dir, now=now, settle_seconds=settle_seconds, memo=memo
        )

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        # The sidecar names the checkpoint, but a person's `latest`, the pruning (it counts
        # and keeps the highest numbers) and the in-place overwrite at step N all go by number.
        return state_naming.incomplete_above(candidates, chosen)

    def aside_path(self, state: Path, stamp: str) -> Path:
        return state_naming.aside_path(state, stamp)

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        return [output_dir / name for name in _FINAL_MODELS]

    def resumed_state_step(self, state: Path) -> int | None:
        # diffusers reads no file for the step: global_step = int(name.split("-")[1]).
        return state_naming.step_in_name(state.name)

    def step_bar(self, text: str) -> TqdmBar | None:
        return console.step_bar(text)

    def section_at_end(self, text: str) -> Section | None:
        return console.section_at_end(text)

    def read_launch_script(self, text: str) -> launch_script.DiffusersCommand:
        return launch_script.read_command(text)

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        # ensure_save_state: diffusers always saves; initial_step: exact, nothing to add.
        return launch_script.rewritten(text, resume_from=resume_from)

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        return launch_script.rewrite(
            script, lambda text: launch_script.rewritten(text, resume_from=resume_from)
        )

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        return launch_script.rewrite(script, lambda text: text)  # it always saves state

    def read_startup(self, text: str) -> StartupReport:
        return console.startup_report(text)

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        updates = None
        if ledger.steps_per_epoch:  # batches per epoch, as the start-up lines said
            updates = math.ceil(ledger.steps_per_epoch / (ledger.gradient_accumulation or 1))
        return ResumePosition(None, resume_reason(state.number, updates))

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        assert isinstance(command, launch_script.DiffusersCommand)
        return launch_script.state_cadence(command)

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        return launch_script.rewrite(
            script,
            lambda text: launch_script.with_save_cadence(
                text, every_n_steps=every_n_steps, keep_last_steps=keep_last_steps
            ),
        )

    def launch_ranks(self, command: LaunchCommand) -> int:
        try:
            return launch_process_count(command.words)
        except ValueError:
            return 1  # a line its launcher would refuse starts no ranks at all

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        text = read_text_exact(script)
        return False, text, text  # no known mitigation is specific to diffusers

    def run_identity(self, text: str) -> str:
        bare = launch_script.without_sidecar_edits(text)
        return hashlib.sha256(bare.encode("utf-8", "surrogateescape")).hexdigest()

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        assert isinstance(command, launch_script.DiffusersCommand)
        value = command.resume_value
        if value is None or value == launch_script.LATEST:
            return None  # latest: diffusers' own pick, not known from the command
        # It says the basename it resolved ("Resuming from checkpoint checkpoint-20").
        return ExpectedResume(value.rsplit("/", 1)[-1], None)

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        # Exact: the step in the folder's name (latest: diffusers' own pick, not known here).
        return (state_step or 0) if command.resume else 0

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return script_diff(old, new, script, context=context)


DIFFUSERS = Diffusers()


def resume_reason(state_step: int | None, steps_per_epoch: int | None) -> str:
    """Why resuming at ``checkpoint-<state_step>`` is exact, and what diffusers trains again
    (``steps_per_epoch``: its num_update_steps_per_epoch, None where not known yet)."""
    base = (
        "exact: diffusers takes the absolute global_step from the folder name and its "
        "Steps bar starts there"
    )
    if state_step is None:
        return base
    if not steps_per_epoch:
        return (
            f"{base}; it restarts epoch {state_step} // steps_per_epoch from its first batch, "
            "so that epoch's batches already trained are trained again as the next steps"
        )
    replayed = state_step % steps_per_epoch
    epoch = state_step // steps_per_epoch
    return (
        f"{base}; it restarts epoch {epoch} from its first batch, so its first {replayed} "
        f"update(s) of batches are trained again as steps {state_step + 1}... (no step is lost "
        "or repeated)"
    )


def _has_any(command: LaunchCommand, flags: Sequence[str]) -> bool:
    return any(command.option(flag) is not None for flag in flags)
