"""The trainer seam: finding a trainer by name, and sd-scripts behind it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from sidecar.config import TrainerName
from sidecar.trainers import LaunchScriptError, trainer_named, trainer_names
from sidecar.trainers.sd_scripts import SD_SCRIPTS
from sidecar.trainers.shell.train_script import TrainScriptError

SCRIPT = (
    "accelerate launch --num_cpu_threads_per_process 1 sd-scripts/flux_train_network.py \\\n"
    '  --output_dir "/app/outputs/my-lora" \\\n'
    "  --output_name my-lora \\\n"
    "  --max_train_epochs 16\n"
)


def test_sd_scripts_is_found_by_name() -> None:
    assert trainer_named("sd-scripts") is SD_SCRIPTS


def test_every_trainer_setting_value_names_one_package() -> None:
    """SIDECAR_TRAINER's values are exactly auto and the registered trainers."""
    values = set(get_args(TrainerName))
    assert values == {"auto", *trainer_names()}
    assert trainer_names() == ("ai-toolkit", "diffusers", "hf-trainer", "onetrainer", "sd-scripts")
    for name in trainer_names():
        assert trainer_named(name).name == name


def test_an_unknown_trainer_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: ai-toolkit, diffusers, hf-trainer"):
        trainer_named("axolotl")


def test_sd_scripts_reads_its_names_and_its_step_bar() -> None:
    naming = SD_SCRIPTS.state_naming("my-lora")
    assert naming.classify("my-lora-step00000100-state") == ("step", 100)
    assert naming.classify("my-lora-000004-state") == ("epoch", 4)
    assert naming.refusal("final") is not None and naming.refusal("step") is None
    bar = SD_SCRIPTS.step_bar("\rvalidation steps:  50%|█| 1/2 \rsteps:  10%|█| 3/30 [00:03<00:27]")
    assert bar is not None and (bar.n, bar.total) == (3, 30)


def test_sd_scripts_reads_and_rewrites_its_launch_script(tmp_path: Path) -> None:
    """The dry run's text is what the rewrite writes; the diff names the change."""
    command = SD_SCRIPTS.read_launch_script(SCRIPT)
    assert (command.output_dir, command.output_name, command.resume) == (
        "/app/outputs/my-lora",
        "my-lora",
        None,
    )
    assert not command.save_state
    script = tmp_path / "train.sh"
    script.write_text(SCRIPT)
    state = "/app/outputs/my-lora/my-lora-step00000100-state"
    planned = SD_SCRIPTS.rewritten_launch_script(SCRIPT, resume_from=state, ensure_save_state=True)
    changed, old, new = SD_SCRIPTS.rewrite_launch_script(
        script, resume_from=state, ensure_save_state=True
    )
    assert changed and old == SCRIPT and new == planned == script.read_text()
    assert SD_SCRIPTS.read_launch_script(new).resume == state
    assert f'+  --resume "{state}" \\' in SD_SCRIPTS.launch_script_diff(old, new, script)
    assert SD_SCRIPTS.add_save_state(script) == (False, new, new)  # already there: no write


def test_adding_save_state_keeps_the_resume_argument(tmp_path: Path) -> None:
    """A run the sidecar did not launch gets --save_state; its --resume stays as it was."""
    state = "/app/outputs/my-lora/my-lora-step00000100-state"
    script = tmp_path / "train.sh"
    script.write_text(
        SD_SCRIPTS.rewritten_launch_script(SCRIPT, resume_from=state, ensure_save_state=False)
    )
    changed, _, new = SD_SCRIPTS.add_save_state(script)
    command = SD_SCRIPTS.read_launch_script(new)
    assert changed and command.save_state and command.resume == state
    assert (tmp_path / "train.sh.orig").is_file()


def test_its_errors_are_launch_script_errors() -> None:
    """The core catches one error type for every trainer; sd-scripts' is still a ValueError."""
    with pytest.raises(LaunchScriptError) as raised:
        SD_SCRIPTS.read_launch_script("echo hello\n")
    assert isinstance(raised.value, TrainScriptError) and isinstance(raised.value, ValueError)
