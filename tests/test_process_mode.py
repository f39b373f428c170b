"""The whole loop in process mode: the real sidecar supervising the simulated trainer.

Each test runs ``python -m sidecar run`` as a real process on a FluxGym-like tree
whose train.sh is FluxGym's own, driving the simulated sd-scripts trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_SETTINGS, FAST_SIMULATION, run_sidecar, simulator_processes

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = pytest.mark.slow

FREQUENT_SAVES = "--save_every_n_steps 6"


def assert_recovered_and_completed(run, tree, *, restarts=1):
    assert run.exit_code == 0, run.stderr[-2000:]
    assert len(run.named("trainer_restarted")) == restarts
    assert run.named("training_completed")
    assert (tree.output_dir / "my-lora.safetensors").is_file()


def test_hang_with_idle_cpu_is_detected_and_resumed(fluxgym):
    """FluxGym's default script (no --save_state) hangs idle; the flag is added, the run resumes."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    original = tree.train_script.read_text()
    assert not parse_train_script(original).save_state
    run = run_sidecar(tree, simulation={"SIM_FAULTS": "hang_idle@step=20:once"})
    assert_recovered_and_completed(run, tree)
    stall = run.named("stall_detected")[0]
    assert stall["last_step"] == 20
    assert stall["seconds_since_progress"] >= 2
    assert stall["trainer_cpu_seconds"] is not None
    selected = run.named("checkpoint_selected")[-1]
    assert selected["checkpoint"].endswith("my-lora-step00000018-state")
    command = parse_train_script(tree.train_script.read_text())
    assert command.save_state
    assert command.resume == str(tree.output_dir / "my-lora-step00000018-state")
    assert (tree.output_dir / "train.sh.orig").read_text() == original
    assert "resuming from" in (tree.output_dir / "train.log").read_text()
    names = run.names()
    stalled_at = names.index("stall_detected")
    rewritten_at = names.index("train_script_rewritten", stalled_at)
    assert names.index("trainer_restarted", rewritten_at) > rewritten_at


def test_hang_with_busy_cpu_is_detected(fluxgym):
    """A hang that spins a CPU (a hung collective) is still a stall."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    run = run_sidecar(tree, simulation={"SIM_FAULTS": "hang_busy@step=10:once"})
    assert_recovered_and_completed(run, tree)
    stall = run.named("stall_detected")[0]
    assert stall["trainer_cpu_seconds"] >= 1.0  # it was spinning while hung


def test_crash_mid_run_is_recovered(fluxgym):
    """A non-zero exit is a crash and is resumed from the newest state."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    run = run_sidecar(tree, simulation={"SIM_FAULTS": "crash@step=14:code=7:once"})
    assert_recovered_and_completed(run, tree)
    crash = run.named("trainer_crashed")[0]
    assert crash["exit_code"] == 7
    assert run.named("checkpoint_selected")[-1]["checkpoint"].endswith("step00000012-state")


def test_hang_during_a_state_save_skips_the_half_written_state(fluxgym):
    """The state being written when the trainer hung is incomplete and is not chosen."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    run = run_sidecar(tree, simulation={"SIM_FAULTS": "hang_in_save@save=2:once"})
    assert_recovered_and_completed(run, tree)
    selected = run.named("checkpoint_selected")[-1]
    assert selected["checkpoint"].endswith("my-lora-step00000006-state")
    rejected = {item["checkpoint"]: item["problems"] for item in selected["rejected"]}
    half = str(tree.output_dir / "my-lora-step00000012-state")
    assert any("optimizer.bin" in problem for problem in rejected[half])


def test_slow_save_longer_than_the_stall_timeout_is_not_a_stall(fluxgym):
    """A save that takes longer than the stall timeout but keeps writing files is progress."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    run = run_sidecar(tree, simulation={"SIM_FAULTS": "slow_save@save=1:seconds=4"})
    assert run.exit_code == 0, run.stderr[-2000:]
    assert run.named("stall_detected") == []
    assert run.named("trainer_restarted") == []


def test_slow_start_within_the_grace_is_not_a_stall(fluxgym):
    """Silent model loading shorter than the startup grace is left alone."""
    run = run_sidecar(
        fluxgym,
        settings={"SIDECAR_STARTUP_GRACE": "8s"},
        simulation={"SIM_FAULTS": "slow_start:seconds=4"},
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    assert run.named("stall_detected") == []
    assert run.named("training_completed")


def test_normal_completion_exits_0_without_restart(fluxgym):
    """A healthy run is never restarted and the sidecar exits 0 with it."""
    run = run_sidecar(fluxgym)
    assert run.exit_code == 0, run.stderr[-2000:]
    assert run.named("trainer_restarted") == []
    assert run.named("training_completed")[0]["exit_code"] == 0
    assert (fluxgym.output_dir / "my-lora.safetensors").is_file()
    assert simulator_processes(fluxgym) == []
    assert (fluxgym.root / "heartbeat").is_file(), "the loop beats its heartbeat"


def test_crash_loop_gives_up_after_the_budget_and_deletes_nothing(fluxgym):
    """Crashing on every run ends in gave_up with exit 3; train.sh and states stay."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    run = run_sidecar(
        tree,
        settings={"SIDECAR_MAX_RESTARTS": "2"},
        simulation={"SIM_FAULTS": "crash@step=8:code=1"},
    )
    assert run.exit_code == 3
    assert len(run.named("trainer_restarted")) == 2
    assert run.named("gave_up")
    assert (tree.output_dir / "my-lora-step00000006-state" / "optimizer.bin").is_file()
    assert tree.train_script.is_file() and (tree.output_dir / "train.sh.orig").is_file()
    ledger = json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())
    assert len(ledger["recoveries"]) == 2 and ledger["gave_up"] is True

    again = run_sidecar(tree, settings={"SIDECAR_MAX_RESTARTS": "2"})
    assert again.exit_code == 3, "a restarted sidecar must not reset the budget"
    assert "already spent" in again.named("gave_up")[0]["reason"]


def test_checkpoint_that_keeps_failing_is_quarantined(fluxgym):
    """Resuming from the newest state fails twice with nothing newer: the older one is used."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    faults = "crash@step=14:once;crash@step=1:run=2;crash@step=1:run=3"
    run = run_sidecar(
        tree, settings={"SIDECAR_MAX_RESTARTS": "5"}, simulation={"SIM_FAULTS": faults}
    )
    assert_recovered_and_completed(run, tree, restarts=3)
    newest = str(tree.output_dir / "my-lora-step00000012-state")
    assert [e["checkpoint"] for e in run.named("checkpoint_quarantined")] == [newest]
    chosen = [Path(e["checkpoint"]).name for e in run.named("checkpoint_selected")]
    assert chosen == [
        "my-lora-step00000012-state",
        "my-lora-step00000012-state",
        "my-lora-step00000006-state",
    ]
    ledger = json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())
    assert ledger["quarantined"] == [newest]
    assert (tree.output_dir / "my-lora-step00000012-state" / "optimizer.bin").is_file()


def test_sigterm_stops_the_trainer_before_exiting(fluxgym):
    """Stopping the sidecar stops its trainer: no orphan keeps the GPU."""
    env = {
        **os.environ,
        **fluxgym.env({**FAST_SIMULATION, "SIM_FAULTS": "hang_idle@step=3"}),
        **FAST_SETTINGS,
        "SIDECAR_STALL_TIMEOUT": "1h",
        "SIDECAR_TRAIN_SCRIPT": str(fluxgym.train_script),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"], env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not simulator_processes(fluxgym):
        time.sleep(0.2)
    assert simulator_processes(fluxgym), "trainer never started"
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    assert simulator_processes(fluxgym) == []
    assert '"stopping_trainer"' in stdout


def test_detect_only_mode_reports_and_does_not_act(fluxgym):
    """SIDECAR_RESTART_MODE=none reports a stall of a run it did not launch, and touches nothing."""
    log = fluxgym.output_dir / "train.log"
    with log.open("wb") as sink:
        trainer = subprocess.Popen(
            ["bash", str(fluxgym.train_script)],
            cwd=fluxgym.root,
            env={
                **os.environ,
                **fluxgym.env({**FAST_SIMULATION, "SIM_FAULTS": "hang_idle@step=5"}),
            },
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    original = fluxgym.train_script.read_text()
    try:
        env = {
            **os.environ,
            **FAST_SETTINGS,
            "SIDECAR_RESTART_MODE": "none",
            "SIDECAR_TRAIN_SCRIPT": str(fluxgym.train_script),
        }
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"], env=env, stdout=subprocess.PIPE, text=True
        )
        events = []
        deadline = time.monotonic() + 30
        assert sidecar.stdout is not None
        for line in sidecar.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "stall_detected" or time.monotonic() > deadline:
                break
        sidecar.send_signal(signal.SIGTERM)
        sidecar.communicate(timeout=10)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    assert events[-1]["event"] == "stall_detected"
    assert fluxgym.train_script.read_text() == original


def test_restarted_sidecar_adopts_its_running_trainer_instead_of_starting_a_second(fluxgym):
    """A sidecar SIGKILLed while its trainer runs: the next one adopts that trainer (no second
    trainer), and a second sidecar on the same run is refused."""
    env = {
        **os.environ,
        **fluxgym.env({**FAST_SIMULATION, "SIM_FAULTS": "hang_idle@step=3"}),
        **FAST_SETTINGS,
        "SIDECAR_STALL_TIMEOUT": "3s",
        "SIDECAR_TRAIN_SCRIPT": str(fluxgym.train_script),
        "SIDECAR_HEARTBEAT_FILE": str(fluxgym.root / "heartbeat"),
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"], env=env, stdout=subprocess.PIPE, text=True
    )
    # The trainer's processes once they settled: while bash forks, a child that has not
    # exec'd yet shows bash's command line too, and is gone a moment later.
    deadline = time.monotonic() + 30
    trainers: set[int] = set()
    while time.monotonic() < deadline:
        seen = {p.pid for p in simulator_processes(fluxgym)}
        if seen and seen == trainers:
            break
        trainers = seen
        time.sleep(0.5)
    assert trainers, "trainer never started"
    first.kill()  # SIGKILL: no chance to stop its trainer
    first.communicate()
    assert {p.pid for p in simulator_processes(fluxgym)} == trainers, "the trainer survived"

    second = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"], env=env, stdout=subprocess.PIPE, text=True
    )
    events = read_events_until(second, "trainer_adopted")
    third = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert third.returncode == 1, third.stdout
    assert "already supervises this run" in third.stdout
    events += read_events_until(second, "trainer_restarted")
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=30)
    names = [event["event"] for event in events]
    assert names.index("trainer_adopted") < names.index("stall_detected"), names
    assert not trainers & {p.pid for p in simulator_processes(fluxgym)}, "adopted trainer stopped"


def read_events_until(process, name, timeout=60):
    events = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        events.append(json.loads(line))
        if events[-1]["event"] == name:
            return events
    raise AssertionError(f"no {name}; saw {[e['event'] for e in events]}")
