"""``training-sidecar run -- <command>``: any trainer command supervised in process mode.

The real sidecar runs the simulated sd-scripts trainer from a command line (no train.sh):
it writes the launch script itself, keeps the command in its ledger, and adds the resume
arguments to the launch script before the relaunch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_sidecar

from sidecar.config import load_settings
from sidecar.run.command_launch import LAUNCH_SCRIPT, launch_script_text, prepare_command_run
from sidecar.run.paths import RunSetupError
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script

FREQUENT_SAVES = "--save_every_n_steps 6 --save_state"


def command_words(tree) -> list[str]:
    """The trainer command of the tree's train.sh, as words (what a user would type)."""
    command = parse_train_script(tree.train_script.read_text())
    return list(command.words)


def test_launch_script_runs_the_command_word_for_word():
    """Every word survives the round trip through bash quoting, spaces and quotes included."""
    words = ["python", "train.py", "--output_dir", "/out dir/it's", "--lr=1e-4", "$HOME"]
    command = parse_train_script(launch_script_text(words))
    assert list(command.words) == words


def test_a_command_word_with_a_newline_is_refused():
    """A newline cannot be written into the one-line launch script: said, not mangled."""
    with pytest.raises(RunSetupError, match="newline"):
        launch_script_text(["python", "train.py", "--name", "a\nb"])


def test_an_unknown_trainer_command_names_the_setting_and_its_values(tmp_path):
    """A command no trainer recognises is refused with SIDECAR_TRAINER and what it takes."""
    settings = load_settings({})
    with pytest.raises(RunSetupError) as raised:
        prepare_command_run(settings, ["python", "mystery.py", "--x", "1"], cwd=tmp_path)
    message = str(raised.value)
    assert "SIDECAR_TRAINER" in message
    for value in ("auto", "sd-scripts"):
        assert value in message


def test_another_restart_mode_is_refused(tmp_path):
    """`run --` launches the command itself; a container mode with it is a contradiction."""
    settings = load_settings({"restart_mode": "signal"})
    with pytest.raises(RunSetupError, match="SIDECAR_RESTART_MODE=signal"):
        prepare_command_run(
            settings,
            ["python", "sd-scripts/train_network.py", "--output_dir", str(tmp_path)],
            cwd=tmp_path,
        )


def test_the_same_command_keeps_its_launch_script_and_another_replaces_it(tmp_path):
    """Starting again with the same command keeps the resume the script holds."""
    out = tmp_path / "out"
    out.mkdir()
    words = ["python", "sd-scripts/train_network.py", "--output_dir", str(out), "--save_state"]
    settings = prepare_command_run(load_settings({}), words, cwd=tmp_path)
    script = settings.train_script
    assert script == out / ".sidecar" / LAUNCH_SCRIPT
    assert settings.restart_mode == "process" and settings.trainer_workdir == tmp_path
    resumed = script.read_text().replace("--save_state", "--save_state --resume /s", 1)
    script.write_text(resumed)
    prepare_command_run(load_settings({}), words, cwd=tmp_path)
    assert script.read_text() == resumed
    prepare_command_run(load_settings({}), [*words, "--max_train_steps", "9"], cwd=tmp_path)
    assert "--resume" not in script.read_text()
    ledger = json.loads((out / ".sidecar" / "state.json").read_text())
    assert ledger["command"] == [*words, "--max_train_steps", "9"]


@pytest.mark.slow
def test_a_command_hangs_and_is_resumed_from_its_launch_script(fluxgym):
    """The whole loop from a command line: hang, resume from the newest state, complete."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    words = command_words(tree)
    run = run_sidecar(
        tree,
        settings={"SIDECAR_TRAIN_SCRIPT": None, "SIDECAR_TRAINER": "auto"},
        simulation={"SIM_FAULTS": "hang_idle@step=20:once"},
        arguments=["--", *words],
        cwd=str(tree.root),
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    assert len(run.named("trainer_restarted")) == 1
    assert run.named("training_completed")
    launch = tree.output_dir / ".sidecar" / LAUNCH_SCRIPT
    relaunched = parse_train_script(launch.read_text())
    assert relaunched.resume == str(tree.output_dir / "my-lora-step00000018-state")
    assert run.named("checkpoint_selected")[-1]["checkpoint"] == relaunched.resume
    ledger = json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())
    assert ledger["command"] == words
    assert Path(tree.output_dir / "my-lora.safetensors").is_file()


def test_leading_assignments_set_the_commands_environment(tmp_path):
    """`run -- FOO=1 python ...` runs as a shell would: FOO in the trainer's environment."""
    text = launch_script_text(["FOO=1", "B=x y", "python", "train.py", "--output_dir", "o"])
    assert text.splitlines()[-1] == "exec env FOO=1 'B=x y' python train.py --output_dir o"
    assert list(parse_train_script(text).words) == ["python", "train.py", "--output_dir", "o"]
    with pytest.raises(RunSetupError, match="needs a command after its NAME=value"):
        launch_script_text(["FOO=1"])


def test_a_command_and_a_train_script_together_are_refused(tmp_path):
    """Two launches named at once: the error says to give one."""
    settings = load_settings({"train_script": str(tmp_path / "train.sh")})
    with pytest.raises(RunSetupError, match="give one of the two"):
        prepare_command_run(settings, ["python", "sd-scripts/train_network.py"], cwd=tmp_path)


def test_a_supervised_output_folder_keeps_its_command(tmp_path):
    """While another sidecar holds the run's lock, its launch script is not replaced."""
    from sidecar.run.lock import RunLock

    out = tmp_path / "out"
    out.mkdir()
    words = ["python", "sd-scripts/train_network.py", "--output_dir", str(out)]
    script = prepare_command_run(load_settings({}), words, cwd=tmp_path).train_script
    before = script.read_text()
    held = RunLock(out / ".sidecar")
    held.acquire()
    try:
        with pytest.raises(RunSetupError, match="already supervises"):
            prepare_command_run(load_settings({}), [*words, "--save_state"], cwd=tmp_path)
    finally:
        held.release()
    assert script.read_text() == before
