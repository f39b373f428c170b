"""SIDECAR_TRAINER=auto: every launch command people run is recognised as exactly one trainer.

Each line is a command as its project documents it (or as its front end starts it); the
shared shell reader reads it, and exactly one trainer package must claim it. A command no
trainer claims is refused with an error naming SIDECAR_TRAINER and its values.
"""

from __future__ import annotations

import pytest

from sidecar.simulator.fluxgym_tree import FIXTURE_SCRIPTS, fixture_script
from sidecar.trainers import UnknownTrainer, detect_trainer, trainer_for, trainer_names
from sidecar.trainers.shell.train_script import parse_train_script

COMMANDS = [
    # FluxGym's generator (the shared fixtures are checked below as files).
    (
        "accelerate launch --mixed_precision bf16 sd-scripts/flux_train_network.py "
        "--output_dir /o --output_name my-lora --save_state",
        "sd-scripts",
    ),
    # kohya_ss GUI: accelerate launch ... <scriptdir>/sd-scripts/<x>_train_network.py
    # --config_file <output_dir>/config_lora-<time>.toml (kohya_gui/lora_gui.py train_model).
    (
        "/venv/bin/accelerate launch --dynamo_backend no --num_processes 1 "
        "/app/sd-scripts/sdxl_train_network.py --config_file "
        "/app/outputs/config_lora-20261201-120000.toml",
        "sd-scripts",
    ),
    (
        "python train_network.py --pretrained_model_name_or_path m --network_module networks.lora "
        "--output_dir out",
        "sd-scripts",
    ),
    # FluxGym's advanced options come from sd-scripts' parser: some share HF's names.
    (
        "accelerate launch sd-scripts/flux_train_network.py --output_dir /o "
        "--lr_scheduler_type CosineAnnealingLR --learning_rate 1e-4",
        "sd-scripts",
    ),
    # sd-scripts' full fine-tunes, by their own names.
    ("accelerate launch sdxl_train.py --output_dir o --max_train_steps 10", "sd-scripts"),
    # HF Trainer scripts (transformers examples), TRL, Axolotl, LLaMA-Factory.
    (
        "trl sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name d --output_dir out",
        "hf-trainer",
    ),
    (
        "deepspeed train.py --deepspeed ds_config.json --output_dir out "
        "--per_device_train_batch_size 1",
        "hf-trainer",
    ),
    (
        "python run_clm.py --model_name_or_path gpt2 --output_dir out --do_train "
        "--per_device_train_batch_size 8 --save_steps 500",
        "hf-trainer",
    ),
    (
        "torchrun --nproc_per_node 2 train_sft.py --output_dir out --save_total_limit 3 "
        "--per_device_train_batch_size 4",
        "hf-trainer",
    ),
    ("accelerate launch -m axolotl.cli.train examples/llama-3/lora-1b.yml", "hf-trainer"),
    ("axolotl train examples/llama-3/lora-1b.yml", "hf-trainer"),
    ("llamafactory-cli train examples/train_lora/llama3_lora_sft.yaml", "hf-trainer"),
    # diffusers example scripts.
    (
        "accelerate launch examples/dreambooth/train_dreambooth_lora_flux.py "
        "--pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --instance_data_dir dog "
        "--output_dir out --checkpointing_steps 100 --resume_from_checkpoint latest",
        "diffusers",
    ),
    (
        "accelerate launch train_text_to_image_lora.py --train_data_dir d --output_dir out "
        "--checkpoints_total_limit 3",
        "diffusers",
    ),
    # ai-toolkit: python run.py <job config> (its README; its UI's .job_config.json).
    ("python run.py config/my_first_flux_lora.yaml", "ai-toolkit"),
    ("python /app/ai-toolkit/run.py /app/ai-toolkit/output/my_lora/.job_config.json", "ai-toolkit"),
    # OneTrainer: scripts/train.py --config-path <config.json>.
    ("python scripts/train.py --config-path training_presets/my.json", "onetrainer"),
]


@pytest.mark.parametrize(("line", "expected"), COMMANDS, ids=[e for _, e in COMMANDS])
def test_each_command_is_recognised_as_exactly_its_trainer(line: str, expected: str) -> None:
    """Exactly one package claims it (detect_trainer refuses two), and it is the right one."""
    assert detect_trainer(parse_train_script(line + "\n")).name == expected


def test_every_trainer_has_a_recognised_command() -> None:
    """The table above covers every package, so none is only claimed in theory."""
    assert {expected for _, expected in COMMANDS} == set(trainer_names())


@pytest.mark.parametrize("fixture", FIXTURE_SCRIPTS)
def test_fluxgym_generated_scripts_are_sd_scripts(fixture: str) -> None:
    """FluxGym's own train.sh files (from its generator, shipped with the simulator)."""
    assert detect_trainer(parse_train_script(fixture_script(fixture))).name == "sd-scripts"


def test_an_unknown_trainer_names_the_setting_and_every_value() -> None:
    """A command no package claims: the error says what to set, and to what."""
    with pytest.raises(UnknownTrainer) as raised:
        detect_trainer(parse_train_script("python my_own_loop.py --epochs 3\n"))
    message = str(raised.value)
    assert "SIDECAR_TRAINER" in message and "my_own_loop.py" in message
    for value in ("auto", *trainer_names()):
        assert value in message


def test_a_named_trainer_is_used_whatever_the_command_looks_like() -> None:
    """SIDECAR_TRAINER=hf-trainer for a script auto cannot place: the setting decides."""
    command = parse_train_script("python my_own_loop.py --output_dir out\n")
    assert trainer_for("hf-trainer", command).name == "hf-trainer"
    with pytest.raises(UnknownTrainer, match="SIDECAR_TRAINER='axolotl' is not a supported"):
        trainer_for("axolotl", command)
