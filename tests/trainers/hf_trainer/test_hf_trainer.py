"""The HF Trainer behind the seam: recognition, the resume lever per front end, progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.decide.sections import Section
from sidecar.trainers.hf_trainer import HF_TRAINER
from sidecar.trainers.hf_trainer.launch import HfLaunchError
from sidecar.trainers.sd_scripts import SD_SCRIPTS

FLUXGYM = (
    "accelerate launch --mixed_precision bf16 sd-scripts/flux_train_network.py \\\n"
    '  --output_dir "/app/outputs/my-lora" --output_name my-lora --save_state\n'
)
RUN_CLM = (
    "torchrun --nproc_per_node 2 examples/pytorch/language-modeling/run_clm.py \\\n"
    "  --model_name_or_path gpt2 \\\n"
    "  --per_device_train_batch_size 8 \\\n"
    "  --output_dir /data/out \\\n"
    "  --save_steps 100\n"
)
AXOLOTL = "axolotl train examples/llama/lora.yml --output-dir /data/ax\n"
LLAMAFACTORY = "FORCE_TORCHRUN=1 llamafactory-cli train cfg/sft.yaml \\\n  logging_steps=5\n"
DIFFUSERS = (
    "accelerate launch train_dreambooth_lora_sdxl.py --output_dir out "
    "--resume_from_checkpoint latest --checkpointing_steps 100 --train_batch_size 1 "
    "--max_train_steps 500\n"
)


@pytest.mark.parametrize(
    "text",
    [
        RUN_CLM,
        AXOLOTL,
        LLAMAFACTORY,
        "python train.py --output-dir o --save-steps 5\n",
        "accelerate launch -m axolotl.cli.train cfg.yml\n",
        "python -m trl.scripts.sft --max_steps 10 --output_dir o\n",
        "torchrun --nproc_per_node 8 src/llamafactory/launcher.py cfg.yaml\n",
    ],
)
def test_hf_trainer_commands_are_recognised_by_it_alone(text: str) -> None:
    """TrainingArguments options or a known front end: hf-trainer, and not sd-scripts."""
    command = HF_TRAINER.read_launch_script(text)
    assert HF_TRAINER.recognises(command)
    assert not SD_SCRIPTS.recognises(command)


@pytest.mark.parametrize("text", [FLUXGYM, DIFFUSERS, "python run.py config/train.yaml\n"])
def test_other_trainers_commands_are_not_recognised(text: str) -> None:
    """sd-scripts, a diffusers script (its own --resume_from_checkpoint) and ai-toolkit: no."""
    assert not HF_TRAINER.recognises(HF_TRAINER.read_launch_script(text))


def test_a_training_arguments_script_is_pointed_at_a_checkpoint(tmp_path: Path) -> None:
    """Added after the script, replaced where it stands (either spelling), removed again."""
    script = tmp_path / "train.sh"
    script.write_text(RUN_CLM)
    changed, old, new = HF_TRAINER.rewrite_launch_script(
        script, resume_from="/data/out/checkpoint-200", ensure_save_state=True, initial_step=7
    )
    assert changed and old == RUN_CLM
    assert '--resume_from_checkpoint "/data/out/checkpoint-200" \\\n' in new
    assert (tmp_path / "train.sh.orig").read_text() == RUN_CLM
    command = HF_TRAINER.read_launch_script(script.read_text())
    assert command.resume == "/data/out/checkpoint-200"
    assert HF_TRAINER.expected_resume(command).state == "/data/out/checkpoint-200"
    assert HF_TRAINER.launch_initial_step(command, state_step=200, steps_per_epoch=None) == 200
    again = HF_TRAINER.rewrite_launch_script(
        script, resume_from="/data/out/checkpoint-200", ensure_save_state=True
    )
    assert again[0] is False
    hyphen = RUN_CLM.replace("--save_steps 100", "--save_steps 100 --resume-from-checkpoint old")
    moved = HF_TRAINER.rewritten_launch_script(hyphen, resume_from="new", ensure_save_state=False)
    assert "--resume-from-checkpoint" not in moved
    assert HF_TRAINER.read_launch_script(moved).resume == "new"
    assert (
        HF_TRAINER.rewritten_launch_script(new, resume_from=None, ensure_save_state=False)
        == RUN_CLM
    )
    assert HF_TRAINER.run_identity(new) == HF_TRAINER.run_identity(RUN_CLM)
    assert HF_TRAINER.run_identity(RUN_CLM.replace("100", "50")) != HF_TRAINER.run_identity(RUN_CLM)


def test_axolotl_takes_the_hyphen_spelling() -> None:
    """click's options are the config fields with hyphens: --resume-from-checkpoint."""
    new = HF_TRAINER.rewritten_launch_script(
        AXOLOTL, resume_from="/data/ax/checkpoint-9", ensure_save_state=False
    )
    assert new == (
        'axolotl train --resume-from-checkpoint "/data/ax/checkpoint-9" '
        "examples/llama/lora.yml --output-dir /data/ax\n"
    )
    assert HF_TRAINER.read_launch_script(new).resume == "/data/ax/checkpoint-9"


def test_llamafactory_takes_a_key_value_override_after_its_config() -> None:
    """OmegaConf dotlist: resume_from_checkpoint=<dir> after the yaml, replaced and removed."""
    new = HF_TRAINER.rewritten_launch_script(
        LLAMAFACTORY, resume_from="saves/checkpoint-4", ensure_save_state=False
    )
    assert new == (
        "FORCE_TORCHRUN=1 llamafactory-cli train cfg/sft.yaml "
        'resume_from_checkpoint="saves/checkpoint-4" \\\n'
        "  logging_steps=5\n"
    )
    command = HF_TRAINER.read_launch_script(new)
    assert command.resume == "saves/checkpoint-4"
    assert command.trainer_args == (
        "cfg/sft.yaml",
        "resume_from_checkpoint=saves/checkpoint-4",
        "logging_steps=5",
    )
    other = HF_TRAINER.rewritten_launch_script(
        new, resume_from="saves/checkpoint-8", ensure_save_state=False
    )
    assert HF_TRAINER.read_launch_script(other).resume == "saves/checkpoint-8"
    assert other.count("resume_from_checkpoint") == 1
    assert (
        HF_TRAINER.rewritten_launch_script(other, resume_from=None, ensure_save_state=False)
        == LLAMAFACTORY
    )


def test_a_path_read_as_an_option_is_refused() -> None:
    with pytest.raises(HfLaunchError, match="cannot be passed"):
        HF_TRAINER.rewritten_launch_script(RUN_CLM, resume_from="-x", ensure_save_state=False)


def test_the_output_folder_comes_from_the_command_or_its_config(tmp_path: Path) -> None:
    """--output_dir on the command wins; else the config file's output_dir; else unknown."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "sft.yaml").write_text("model_name_or_path: x\noutput_dir: saves/sft\n")

    def sidecar_path(path: str) -> Path:
        return tmp_path / path

    located = HF_TRAINER.run_location(HF_TRAINER.read_launch_script(LLAMAFACTORY), sidecar_path)
    assert located.output_dir == tmp_path / "saves/sft"
    override = LLAMAFACTORY.replace("logging_steps=5", "output_dir=elsewhere")
    located = HF_TRAINER.run_location(HF_TRAINER.read_launch_script(override), sidecar_path)
    assert located.output_dir == tmp_path / "elsewhere"
    assert (
        HF_TRAINER.run_location(HF_TRAINER.read_launch_script(RUN_CLM), sidecar_path).output_dir
        == tmp_path / "/data/out"
    )
    unknown = HF_TRAINER.run_location(
        HF_TRAINER.read_launch_script("python t.py --max_steps 3\n"), sidecar_path
    )
    assert unknown.output_dir is None and "--output_dir" in (unknown.why_unknown or "")


def test_cadence_ranks_and_the_save_cadence_edit(tmp_path: Path) -> None:
    """save_steps is the cadence; a sparser one is tightened and the checkpoints bounded."""
    command = HF_TRAINER.read_launch_script(RUN_CLM)
    assert HF_TRAINER.state_cadence(command, None) == 100
    assert HF_TRAINER.launch_ranks(command) == 2
    assert HF_TRAINER.launch_ranks(HF_TRAINER.read_launch_script(AXOLOTL)) == 1
    script = tmp_path / "train.sh"
    script.write_text(RUN_CLM)
    changed, _, new = HF_TRAINER.add_save_cadence(script, every_n_steps=50, keep_last_steps=200)
    edited = HF_TRAINER.read_launch_script(new)
    assert (
        changed and edited.option("save_steps") == "50" and edited.option("save_total_limit") == "4"
    )
    assert HF_TRAINER.add_save_state(script)[0] is False


HF5_START = (
    "***** Running training *****\n"
    "  Num examples = 640\n  Num Epochs = 1\n  Num update steps per epoch = 1,280\n"
    "  Gradient Accumulation steps = 2\n  Total optimization steps = 1,280\n"
    "Loading model from out/checkpoint-20.\n"
    "  Resuming training from checkpoint with epoch 0 and global step 20\n"
    "  Fast-forwarding the dataloader past 0 epochs and 40 batches to resume from the exact "
    "training state.\n"
)
HF4_START = (
    "  Total optimization steps = 40\n"
    "  Continuing training from checkpoint, will skip to saved global_step\n"
    "  Continuing training from epoch 0\n  Continuing training from global step 20\n"
    "  Will skip the first 0 epochs then the first 20 batches in the first epoch.\n"
)


def test_startup_lines_of_both_majors_are_read() -> None:
    """5.x "Resuming training ..." and 4.x "Continuing training ..." both say the resume."""
    report = HF_TRAINER.read_startup(HF5_START)
    assert (report.total_steps, report.steps_per_epoch, report.gradient_accumulation) == (
        1280,
        1280,
        2,
    )
    assert (report.resumed_from, report.train_state_loaded, report.skipped_steps) == (
        "out/checkpoint-20",
        True,
        40,
    )
    old = HF_TRAINER.read_startup(HF4_START)
    assert (old.total_steps, old.train_state_loaded, old.skipped_steps) == (40, True, 20)
    assert not HF_TRAINER.read_startup("  Total optimization steps = 40\n").train_state_loaded


def test_the_step_bar_is_the_undescribed_one_of_max_steps() -> None:
    """An evaluation bar (no description either, another total) is not the step bar."""
    text = (
        "  Total optimization steps = 40\n"
        "\r 25%|██▌       | 10/40 [00:02<00:06,  4.50it/s]"
        "\r 50%|█████     | 20/40 [00:04<00:04,  4.60it/s]\n"
        "\r 40%|████      | 2/5 [00:00<00:00, 12.0it/s]"
        "\rMap: 100%|██████████| 64/64 [00:00<00:00, 900.0 examples/s]"
    )
    bar = HF_TRAINER.step_bar(text)
    assert bar is not None and (bar.n, bar.total) == (20, 40)
    assert HF_TRAINER.step_bar("\r 50%|█████     | 20/40 [00:04<00:04,  4.60it/s]").n == 20
    assert HF_TRAINER.step_bar("no bar here") is None


def test_the_section_at_the_end() -> None:
    """Saving, training (a bar redraw) or start-up, whichever came last."""
    bar = "\r 50%|█████     | 20/40 [00:04<00:04,  4.60it/s]"
    assert (
        HF_TRAINER.section_at_end(bar + "\nSaving model checkpoint to out/checkpoint-20\n")
        == Section.SAVING
    )
    assert HF_TRAINER.section_at_end("Saving model checkpoint to x\n" + bar) == Section.TRAINING
    assert HF_TRAINER.section_at_end("Loading model from out/checkpoint-20.\n") == Section.STARTUP
    assert HF_TRAINER.section_at_end("hello\n") is None
