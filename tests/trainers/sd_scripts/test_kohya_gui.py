"""A run the kohya_ss GUI launched: its --config_file TOML, and its capture into a launch script."""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sidecar.run.captured_launch import (
    CapturedLaunch,
    capture_process,
    captured_script_path,
    find_gui_trainer,
    is_gui_trainer_command,
    launch_script_text,
    write_launch_script,
)
from sidecar.trainers.sd_scripts import SD_SCRIPTS
from sidecar.trainers.sd_scripts.config_file import (
    SIDECAR_OPTIONS,
    ConfigFileError,
    config_path,
    effective_command,
    effective_options,
)
from sidecar.trainers.sd_scripts.launch_script import (
    rewrite_train_script,
    rewritten_train_script,
)
from sidecar.trainers.shell.launch_processes import launch_process_count
from sidecar.trainers.shell.train_script import parse_train_script

sys.path.insert(0, str(Path(__file__).parent))
import kohya_gui_standin as standin  # a test helper beside this file

STANDIN = Path(standin.__file__)

# ---------------------------------------------------------------------------
# The TOML: sd-scripts' precedence


def _sd_scripts_rule(cli: list[str], toml_text: str) -> dict[str, object]:
    """The oracle: argparse itself, used the way library/train_util.py read_config_from_file
    uses it (a namespace made of the flattened TOML, the command line parsed into it)."""
    import tomllib

    parser = argparse.ArgumentParser()
    for name, option in SIDECAR_OPTIONS.items():
        if option.kind == "flag":
            parser.add_argument(f"--{name}", action="store_true")
        else:
            kind = int if option.kind == "int" else str
            parser.add_argument(f"--{name}", type=kind, default=option.default)
    parser.add_argument("--config_file")
    flat: dict[str, object] = {}
    for key, value in tomllib.loads(toml_text).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return vars(parser.parse_args(cli, namespace=argparse.Namespace(**flat)))


PRECEDENCE_CASES = {
    "command line beats the TOML": (
        ["--save_every_n_steps", "25", "--output_dir=/cli/out"],
        'output_dir = "/toml/out"\nsave_every_n_steps = 100\nmax_train_steps = 400\n',
    ),
    "the TOML beats the defaults": (
        [],
        'output_name = "lora"\nmax_train_steps = 400\nsave_state = true\n',
    ),
    "a TOML flag cannot be turned off, a command-line one is added": (
        ["--skip_until_initial_step", "--initial_step", "40"],
        "save_state = true\ninitial_step = 10\n",
    ),
    "tables are lifted, the later one wins": (
        ["--resume", "/cli/state"],
        'resume = "/toml/state"\n[model]\noutput_dir = "/a"\n[saving]\noutput_dir = "/b"\n'
        "save_last_n_steps_state = 200\n",
    ),
    "nothing anywhere: the parser's defaults": ([], ""),
}


@pytest.mark.parametrize("cli, toml_text", PRECEDENCE_CASES.values(), ids=PRECEDENCE_CASES)
def test_effective_options_follow_sd_scripts_precedence(cli, toml_text):
    """Command line over TOML over default, exactly as argparse into a TOML namespace does."""
    expected = _sd_scripts_rule(cli, toml_text)
    found = effective_options(cli, toml_text)
    for name in SIDECAR_OPTIONS:
        assert found[name] == expected[name], name


def test_unknown_toml_keys_come_back_as_written():
    """The GUI writes keys sd-scripts never defines (``epoch``); they pass through untouched."""
    found = effective_options([], 'epoch = 4\nnetwork_args = ["a=1", "b=2"]\n')
    assert found["epoch"] == 4 and found["network_args"] == ["a=1", "b=2"]


def test_a_toml_that_does_not_parse_names_file_line_and_key():
    text = 'output_dir = "/out"\nsave_every_n_steps = 10 0\n'
    with pytest.raises(ConfigFileError) as error:
        effective_options([], text, source="/out/config_lora-20260101-000000.toml")
    message = str(error.value)
    assert "/out/config_lora-20260101-000000.toml" in message
    assert "line 2" in message and "`save_every_n_steps`" in message


def test_a_value_of_the_wrong_type_names_the_key():
    """sd-scripts does not convert TOML values, so "100" for a count is the file's mistake."""
    with pytest.raises(ConfigFileError, match=r"key `save_every_n_steps`.*whole number"):
        effective_options([], 'save_every_n_steps = "100"\n', source="c.toml")
    with pytest.raises(ConfigFileError, match="key `max_train_steps`"):
        effective_options([], "max_train_steps = true\n", source="c.toml")


def test_config_path_as_sd_scripts_opens_it():
    """``.toml`` appended unless present, the last --config_file, relative to the trainer's cwd."""
    assert config_path(["--config_file", "a", "--config_file=b/c"], "/gui") == "/gui/b/c.toml"
    assert config_path(["--config_file", "/abs/x.toml"], "/gui") == "/abs/x.toml"
    assert config_path(["--output_dir", "/o"], "/gui") is None


def test_effective_command_gives_the_sidecar_the_toml_settings():
    """run_location and the cadence read through it see the TOML, command line first."""
    command = parse_train_script(
        "accelerate launch sd-scripts/flux_train_network.py --config_file c.toml "
        "--save_every_n_steps 20\n"
    )
    toml_text = (
        'output_dir = "/runs/one"\noutput_name = "my-lora"\nsave_state = true\n'
        "save_every_n_steps = 100\n"
    )
    merged = effective_command(command, toml_text)
    location = SD_SCRIPTS.run_location(merged, Path)
    assert location.output_dir == Path("/runs/one") and location.output_name == "my-lora"
    assert SD_SCRIPTS.state_cadence(merged, None) == 20, "the command line's cadence wins"
    assert SD_SCRIPTS.run_location(command, Path).output_dir is None, "not on the command line"


# ---------------------------------------------------------------------------
# Recognising the GUI's trainer and writing its launch script


def test_is_gui_trainer_command():
    toml = "/o/config_lora-20260101-120000.toml"
    assert is_gui_trainer_command(
        ["python", "/k/sd-scripts/flux_train_network.py", "--config_file", toml]
    )
    assert is_gui_trainer_command(
        ["accelerate", "launch", "train_network.py", f"--config_file={toml}"]
    )
    assert not is_gui_trainer_command(
        ["python", "flux_train_network.py", "--config_file", "/o/my.toml"]
    )
    assert not is_gui_trainer_command(["python", "train_db.py", "--config_file", toml])
    assert not is_gui_trainer_command(["python", "kohya_gui.py", "--listen", "0.0.0.0"])


AWKWARD_ARGV = (
    "/venv/bin/accelerate",
    "launch",
    "--num_processes",
    "2",
    "/k/sd-scripts/flux_train_network.py",
    "--config_file",
    "/o/config_lora-20260101-120000.toml",
    "--sample_prompts=a 'quoted' $HOME `x` \\ prompt",
    "",
    "'--quoted_by_the_gui'",  # run_cmd_advanced_training shlex.quotes "additional parameters"
    "ünïcode\nnewline",
)


def _launch(argv=AWKWARD_ARGV, environment=None) -> CapturedLaunch:
    return CapturedLaunch(
        pid=4242,
        argv=argv,
        workdir="/gui dir/it's here",
        environment=environment or {"HF_TOKEN": "hf_x'y", "PATH": "/venv/bin:/usr/bin"},
        started_at=0.0,
    )


def test_the_captured_script_reads_back_as_the_same_command():
    text = launch_script_text(_launch())
    assert text.startswith(
        "#!/usr/bin/env bash\n# Captured by the training sidecar from process 4242"
    )
    command = parse_train_script(text)
    assert command.words == AWKWARD_ARGV
    assert SD_SCRIPTS.recognises(command)
    assert launch_process_count(command.words) == 2


def test_bash_runs_the_captured_script_with_its_cwd_env_and_argv(tmp_path):
    """Ground truth: bash itself, with a stub in place of accelerate, a scrubbed environment."""
    workdir = tmp_path / "gui dir"
    workdir.mkdir()
    stub = tmp_path / "stub"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'token': os.environ.get('HF_TOKEN'),"
        " 'shlvl': os.environ.get('SHLVL')}, sys.stdout)\n"
    )
    stub.chmod(0o755)
    argv = (str(stub), *AWKWARD_ARGV[1:])
    launch = CapturedLaunch(1, argv, str(workdir), {"HF_TOKEN": "hf_x'y", "SHLVL": "9"}, 0.0)
    script = tmp_path / "launch.sh"
    script.write_text(launch_script_text(launch))
    result = subprocess.run(
        ["bash", str(script)],
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=30,
    )
    seen = json.loads(result.stdout)
    assert seen["argv"] == list(AWKWARD_ARGV[1:]) and seen["cwd"] == str(workdir)
    assert seen["token"] == "hf_x'y"
    assert seen["shlvl"] != "9", "bash sets its own SHLVL; a captured one is never written"


def test_unexportable_and_left_out_variables_are_not_written():
    launch = _launch(environment={"BASH_FUNC_f%%": "() { :; }", "A": "1", "NCCL_X": "mine"})
    text = launch_script_text(launch, leave_out=["NCCL_X"])
    assert "export A=1\n" in text and "NCCL_X" not in text
    assert "# Not exportable from bash, so left out: BASH_FUNC_f%%" in text
    assert "export BASH_FUNC" not in text


def test_resume_added_and_removed_in_the_captured_script():
    """The sd-scripts rewrite edits the captured script; removing gives back the bytes."""
    text = launch_script_text(_launch())
    resumed = rewritten_train_script(
        text, resume_from="/o/my-lora-step00000100-state", ensure_save_state=False, initial_step=100
    )
    command = parse_train_script(resumed)
    assert command.resume == "/o/my-lora-step00000100-state"
    assert command.option("--initial_step") == "100" and command.has_option(
        "--skip_until_initial_step"
    )
    assert command.trainer_args[-6:] == AWKWARD_ARGV[-6:], "the GUI's own arguments untouched"
    again = rewritten_train_script(resumed, resume_from=None, ensure_save_state=False)
    assert again == text


def test_the_script_is_private(tmp_path):
    """It holds the environment (tokens among it): 0600 in a 0700 folder."""
    path = captured_script_path(tmp_path / "out" / ".sidecar")
    assert write_launch_script(path, "#!/usr/bin/env bash\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not write_launch_script(path, "#!/usr/bin/env bash\n"), "unchanged: not rewritten"


# ---------------------------------------------------------------------------
# The whole take-over, with real processes: GUI -> capture -> stop -> --resume relaunch


def _invocations(output_dir: Path, count: int, timeout: float = 30.0) -> list[dict]:
    log = output_dir / "invocations.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            lines = log.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
        time.sleep(0.05)
    pytest.fail(f"the trainer wrote {log} fewer than {count} times in {timeout}s")


def _stop_tree(process: psutil.Process) -> None:
    """What the sidecar does to a stalled run (and the GUI's kill_command): children, then it."""
    for child in process.children(recursive=True):
        child.kill()
    process.kill()
    psutil.wait_procs([process], timeout=10)


@pytest.mark.parametrize("launcher", ["accelerate", "python"])
def test_a_gui_launched_run_is_captured_and_relaunched_with_resume(tmp_path, launcher):
    gui_dir = tmp_path / "kohya_ss"
    trainer, accelerate = standin.install(gui_dir, tmp_path / "venv")
    output_dir = gui_dir / "outputs" / "run1"  # the GUI was given a relative "outputs/run1"
    gui = subprocess.Popen(
        [
            sys.executable,
            str(STANDIN),
            str(gui_dir),
            "outputs/run1",
            "--launcher",
            launcher,
            "--accelerate",
            str(accelerate),
        ],
        cwd=gui_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = _invocations(output_dir, 1)[0]
        found = find_gui_trainer()
        assert found is not None and found.ppid() == gui.pid, "the root: what the GUI started"
        assert find_gui_trainer(not_under=[gui.pid]) is None, "a relauncher's own tree is left out"
        launch = capture_process(found)
        if launcher == "accelerate":
            assert launch.argv[0] == str(accelerate), "python <console script> folded back"
            assert found.pid != first["pid"], "accelerate started the trainer as its child"
        assert launch.workdir == str(gui_dir)
        assert launch.environment[standin.MARK] == "from-the-gui"
        assert "SHLVL" not in launch.environment and "OLDPWD" not in launch.environment

        script = captured_script_path(output_dir / ".sidecar")
        write_launch_script(script, launch_script_text(launch))
        command = parse_train_script(script.read_text())
        assert SD_SCRIPTS.recognises(command)
        toml = config_path(command.trainer_args, launch.workdir)
        assert toml is not None and Path(toml).parent == output_dir
        settings = effective_options(command.trainer_args, Path(toml).read_text(), source=toml)
        assert settings["save_every_n_steps"] == 50 and settings["save_state"] is True
        assert settings["output_dir"] == "outputs/run1", "relative to the trainer's cwd"

        _stop_tree(found)  # the stall: the sidecar stops the GUI's run
        gui.wait(timeout=10)  # the GUI sees its child end
        state = str(output_dir / "my-lora-step00000100-state")
        changed, _, _ = rewrite_train_script(
            script, resume_from=state, ensure_save_state=False, initial_step=100
        )
        assert changed and stat.S_IMODE(script.stat().st_mode) == 0o600
        subprocess.run(  # the process restarter: bash <script>, from elsewhere, another env
            ["bash", str(script)],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )
        second = _invocations(output_dir, 2)[1]
        relaunched = parse_train_script(script.read_text())
    finally:
        if gui.poll() is None:
            _stop_tree(psutil.Process(gui.pid))
        gui.wait(timeout=10)

    added = ["--resume", state, "--initial_step", "100", "--skip_until_initial_step"]
    assert second["argv"][0] == first["argv"][0] == str(trainer)  # a script's argv[0]: its path
    assert second["argv"][1:] == list(relaunched.trainer_args)
    assert sorted(second["argv"][1:]) == sorted(first["argv"][1:] + added)
    assert second["cwd"] == first["cwd"] == str(gui_dir)
    assert second["environment"][standin.AWKWARD] == standin.AWKWARD_VALUE
    for name in (standin.MARK, "PYTHONPATH", "TF_ENABLE_ONEDNN_OPTS"):
        assert second["environment"][name] == first["environment"][name], name
    # The GUI's per-session values are not repeated (bash's cd sets an OLDPWD of its own).
    assert second["environment"]["OLDPWD"] != "/somewhere/else"
    assert second["environment"]["SHLVL"] != "7"
    assert second["accelerate"] == first["accelerate"]
    assert first["effective"]["resume"] == "outputs/run1/stale-state", "the TOML's"
    assert second["effective"]["resume"] == state, "the command line beats the TOML"
    assert second["effective"]["initial_step"] == 100
    assert (
        second["effective"]["save_state"] is True and second["effective"]["max_train_steps"] == 400
    )
