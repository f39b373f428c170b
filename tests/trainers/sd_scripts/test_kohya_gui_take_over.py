"""The kohya_ss GUI's run, taken over: captured from /proc, watched, relaunched with --resume.

A stand-in "GUI" (a Python process, as the GUI is) writes ``config_lora-<time>.toml`` and
starts the simulated sd-scripts trainer through the tree's ``accelerate`` as its child, no
shell, its output piped to itself (bmaltais/kohya_ss ``kohya_gui/lora_gui.py``
``train_model``, ``class_command_executor.py``). The real sidecar runs with
``SIDECAR_FOLLOW=kohya-gui`` and no train.sh.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import FAST_SIMULATION, run_sidecar

from sidecar.run.captured_launch import CAPTURED_SCRIPT_NAME
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = pytest.mark.slow

GUI = textwrap.dedent(
    """
    import json, subprocess, sys
    # The GUI's own command line is `python kohya_gui.py`: the run's is built inside it.
    with open(sys.argv[1]) as handle:
        command = json.load(handle)
    # No shell, no cwd, the output piped back into the GUI (CommandExecutor.execute_command).
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in child.stdout:
        pass
    sys.exit(child.wait())
    """
)


def start_gui(tree, toml, simulation):
    """The GUI's click: its TOML, then `accelerate launch ... --config_file <toml> <extra>`."""
    command = parse_train_script(tree.train_script.read_text())
    toml.write_text(
        f'output_dir = "{tree.output_dir}"\noutput_name = "my-lora"\nsave_state = true\n'
        "save_every_n_steps = 6\n"
    )
    words = [*command.launcher_args, command.trainer_script, "--config_file", str(toml)]
    # The GUI's "additional parameters" come after; the simulator reads its schedule here.
    # (The simulator reads no TOML: what it must do is repeated there, as a user may.)
    words += [*command.trainer_args, "--save_state", "--save_every_n_steps", "6"]
    click = tree.root / "click.json"
    click.write_text(json.dumps(words))
    gui = tree.root / "kohya_gui.py"
    gui.write_text(GUI)
    return subprocess.Popen(
        [sys.executable, str(gui), str(click)],
        cwd=tree.root,
        env=tree.env({**FAST_SIMULATION, **simulation}),
    )


def test_a_gui_run_that_hangs_is_captured_and_resumed(fluxgym):
    """Captured with its cwd and environment, adopted, stopped on the stall, relaunched
    from the captured script with --resume, and run to the end."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t")
    toml = tree.output_dir / "config_lora-20261201-120000.toml"
    gui = start_gui(tree, toml, {"SIM_FAULTS": "hang_idle@step=20:once"})
    try:
        run = run_sidecar(
            tree,
            settings={"SIDECAR_TRAIN_SCRIPT": None, "SIDECAR_FOLLOW": "kohya-gui"},
            simulation={"SIM_FAULTS": "hang_idle@step=20:once"},
        )
    finally:
        gui.kill()
        gui.wait()
    assert run.exit_code == 0, run.stderr[-3000:]
    captured = run.named("gui_run_captured")
    assert len(captured) == 1 and captured[0]["pid"] != gui.pid
    script = tree.output_dir / ".sidecar" / CAPTURED_SCRIPT_NAME
    assert captured[0]["launch_script"] == str(script)
    assert run.named("stall_detected")
    assert len(run.named("trainer_restarted")) == 1
    assert run.named("training_completed")
    relaunched = parse_train_script(script.read_text())
    assert relaunched.resume == run.named("checkpoint_selected")[-1]["checkpoint"]
    assert relaunched.resume.endswith("-state")
    assert relaunched.option("config_file") == str(toml)  # the GUI's TOML, as it was
    assert (tree.output_dir / "my-lora.safetensors").is_file()
    ledger = json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())
    assert ledger["completed"]


def test_a_healthy_gui_run_is_watched_to_its_end_and_left_alone(fluxgym):
    """Adopted and watched, never stopped or relaunched: the GUI's own trainer finishes,
    the GUI sees it exit 0, and the sidecar reports the run completed."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t")
    toml = tree.output_dir / "config_lora-20261201-130000.toml"
    gui = start_gui(tree, toml, {})
    try:
        run = run_sidecar(
            tree, settings={"SIDECAR_TRAIN_SCRIPT": None, "SIDECAR_FOLLOW": "kohya-gui"}
        )
        gui_exit = gui.wait(timeout=60)
    finally:
        if gui.poll() is None:
            gui.kill()
            gui.wait()
    assert run.exit_code == 0, run.stderr[-3000:]
    (captured,) = run.named("gui_run_captured")
    (adopted,) = run.named("trainer_adopted")
    assert adopted["pid"] == captured["pid"] and "kohya_ss GUI" in adopted["reason"]
    (started,) = run.named("trainer_started")
    assert started["pid"] == captured["pid"], "the GUI's own trainer is watched, none is started"
    for event in ("stall_detected", "trainer_crashed", "trainer_stopped", "trainer_restarted"):
        assert not run.named(event), event
    assert run.named("training_completed")
    assert gui_exit == 0, "the GUI's child ran to its end, untouched"
    # Only kept ready for a relaunch: pointed at the newest complete state seen at the start
    # (when the GUI's run had written one by then), never run.
    script = parse_train_script((tree.output_dir / ".sidecar" / CAPTURED_SCRIPT_NAME).read_text())
    rewritten = run.named("train_script_rewritten")
    assert script.resume == (rewritten[-1]["resume"] if rewritten else None)
    assert (tree.output_dir / "my-lora.safetensors").is_file()


def test_a_restarted_sidecar_keeps_the_script_of_its_own_relaunch(tmp_path):
    """The relaunch (bash exec'd the trainer: the recorded pid) runs with the sidecar's own
    environment: it is adopted with the script that holds the resume, not captured anew."""
    import threading

    from sidecar.config import load_settings
    from sidecar.run.gui_take_over import take_over_gui_run
    from sidecar.run.lock import TrainerPidFile

    out = tmp_path / "outputs" / "my-lora"
    state_dir = out / ".sidecar"
    state_dir.mkdir(parents=True)
    toml = out / "config_lora-20261201-120000.toml"
    toml.write_text(f'output_dir = "{out}"\noutput_name = "my-lora"\nsave_state = true\n')
    trainer = tmp_path / "sd-scripts" / "flux_train_network.py"
    trainer.parent.mkdir()
    trainer.write_text("import time\ntime.sleep(60)\n")
    script = state_dir / CAPTURED_SCRIPT_NAME
    script.write_text(
        f"#!/usr/bin/env bash\nexec {sys.executable} {trainer} --config_file {toml} "
        f"--resume {out}/my-lora-step00000012-state\n"
    )
    relaunch = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env={"SIDECAR_X": "1"})
    try:
        TrainerPidFile(state_dir).record(relaunch.pid)
        held = script.read_text()
        settings = take_over_gui_run(
            load_settings({"follow": "kohya-gui"}),
            stop_event=threading.Event(),
            log=__import__("structlog").get_logger(),
        )
    finally:
        relaunch.kill()
        relaunch.wait()
    assert settings is not None and settings.train_script == script
    assert script.read_text() == held  # the resume it holds, no SIDECAR_X frozen in
