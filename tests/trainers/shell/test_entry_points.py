"""Launch commands beyond `launcher script.py`: torchrun, modules after -m, entry points."""

from __future__ import annotations

import pytest

from sidecar.trainers.shell.train_script import (
    TrainScriptError,
    parse_train_script,
    remove_option,
    set_option,
)


@pytest.mark.parametrize(
    ("text", "launcher", "script", "args"),
    [
        (
            "torchrun --nproc_per_node 2 train.py --output_dir out\n",
            ("torchrun", "--nproc_per_node", "2"),
            "train.py",
            ("--output_dir", "out"),
        ),
        ("python -m my_pkg.train --x 1\n", ("python", "-m"), "my_pkg.train", ("--x", "1")),
        (
            "python3 -u -m my_pkg.train --x 1\n",
            ("python3", "-u", "-m"),
            "my_pkg.train",
            ("--x", "1"),
        ),
        (
            "accelerate launch --num_processes 2 -m axolotl.cli.train cfg.yml --debug\n",
            ("accelerate", "launch", "--num_processes", "2", "-m"),
            "axolotl.cli.train",
            ("cfg.yml", "--debug"),
        ),
        (
            "torchrun --nproc_per_node 2 --module pkg.train --a b\n",
            ("torchrun", "--nproc_per_node", "2", "--module"),
            "pkg.train",
            ("--a", "b"),
        ),
        (
            "python -m torch.distributed.run --nproc_per_node=2 train.py --a b\n",
            ("python", "-m", "torch.distributed.run", "--nproc_per_node=2"),
            "train.py",
            ("--a", "b"),
        ),
        (
            "python -m torch.distributed.run --nproc_per_node=2 -m pkg.train --a b\n",
            ("python", "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"),
            "pkg.train",
            ("--a", "b"),
        ),
        (
            "axolotl train cfg.yml --output-dir o\n",
            (),
            "axolotl train",
            ("cfg.yml", "--output-dir", "o"),
        ),
        (
            "FORCE_TORCHRUN=1 llamafactory-cli train cfg.yaml output_dir=o\n",
            (),
            "llamafactory-cli train",
            ("cfg.yaml", "output_dir=o"),
        ),
        ("exec /opt/venv/bin/axolotl train c.yml\n", (), "/opt/venv/bin/axolotl train", ("c.yml",)),
    ],
)
def test_the_new_shapes_are_read(text, launcher, script, args) -> None:
    """Each shape gives its launcher words, its script (or module, or entry point) and its args."""
    command = parse_train_script(text)
    assert (command.launcher_args, command.trainer_script, command.trainer_args) == (
        launcher,
        script,
        args,
    )


def test_an_entry_point_words_are_the_command_as_bash_passes_it() -> None:
    """`words` splits the entry point back into its two words."""
    command = parse_train_script("axolotl train cfg.yml --debug\n")
    assert command.words == ("axolotl", "train", "cfg.yml", "--debug")
    assert command.script_words == ("axolotl", "train")
    module = parse_train_script("python -m pkg.train --x 1\n")
    assert module.words == ("python", "-m", "pkg.train", "--x", "1")


def test_tool_modules_and_other_subcommands_are_not_the_trainer() -> None:
    """`python -m pip install` and `axolotl preprocess` beside the trainer leave one trainer."""
    text = (
        "python -m pip install -r requirements.txt\n"
        "axolotl preprocess cfg.yml\n"
        "llamafactory-cli export cfg.yaml\n"
        "python train.py --output_dir out\n"
    )
    assert parse_train_script(text).trainer_script == "train.py"


def test_two_entry_point_trainers_are_ambiguous() -> None:
    """Two training commands are refused, naming both lines."""
    with pytest.raises(TrainScriptError, match=r"line 1 \(axolotl train\), line 2 \(pkg.train\)"):
        parse_train_script("axolotl train a.yml\npython -m pkg.train\n")


def test_an_option_goes_right_after_the_entry_point_subcommand() -> None:
    """click takes options before the config argument; a remove gives back the original bytes."""
    text = "axolotl train \\\n  cfg.yml \\\n  --debug\n"
    added = set_option(text, "--resume-from-checkpoint", "out/checkpoint-5")
    resume_line = '  --resume-from-checkpoint "out/checkpoint-5" \\\n'
    assert added == "axolotl train \\\n" + resume_line + "  cfg.yml \\\n  --debug\n"
    assert parse_train_script(added).option("resume-from-checkpoint") == "out/checkpoint-5"
    assert remove_option(added, "--resume-from-checkpoint") == text


def test_an_option_goes_right_after_the_module() -> None:
    """For `-m module`, the module word is where the trainer's arguments begin."""
    text = "accelerate launch -m pkg.train --x 1\n"
    edited = set_option(text, "--resume_from_checkpoint", "c/checkpoint-2")
    assert (
        edited == 'accelerate launch -m pkg.train --resume_from_checkpoint "c/checkpoint-2" --x 1\n'
    )


def test_a_bare_entry_point_or_module_flag_is_no_trainer_command() -> None:
    """`axolotl` alone, or `python -m` with nothing after it, is not a trainer command."""
    with pytest.raises(TrainScriptError, match="no trainer command found"):
        parse_train_script("axolotl\npython -m\n")
