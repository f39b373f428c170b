"""Signal mode without Docker: a shared process table and a restart policy stand-in.

The sidecar may only signal processes; a supervisor process plays whatever starts the
trainer again: a container runtime's on-failure restart policy, or the Kubernetes Job that
replaces the failed pod (restartPolicy Never). What both rely on is exercised for real: the
sidecar kills the trainer's processes, the "runtime" starts train.sh again, and train.sh
already points at the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST_SETTINGS, FAST_SIMULATION, kill_everything
from restart_policy import start_runtime, tree_pattern
from sidecar_process import spawn_sidecar

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = pytest.mark.slow


class Scene:
    """A trainer under the restart-policy stand-in, and a signal-mode sidecar beside it."""

    def __init__(self, root: Path, faults: str, step_seconds: str = "0.05"):
        self.tree = build_fluxgym_tree(
            root, extra_trainer_args="--save_every_n_steps 6 --save_state"
        )
        pattern = tree_pattern(self.tree)
        sidecar_env = {
            **os.environ,
            **FAST_SETTINGS,
            "SIDECAR_RESTART_MODE": "signal",
            "SIDECAR_TRAINER_PATTERN": pattern,
            "SIDECAR_TRAIN_SCRIPT": str(self.tree.train_script),
            "SIDECAR_HEARTBEAT_FILE": str(root / "heartbeat"),
            "SIDECAR_CHECKPOINT_SETTLE": "0.3s",
        }
        self.sidecar = spawn_sidecar(sidecar_env)
        self.runtime: subprocess.Popen[bytes] | None = None
        self.events: list[dict] = []
        # The sidecar watches before the runtime starts train.sh: a trainer someone else
        # started is read from the moment it is first seen, and a loaded machine can take
        # longer to start the sidecar than the trainer takes to reach its fault.
        self.wait_for("sidecar_started")
        self.runtime = start_runtime(
            self.tree, {**FAST_SIMULATION, "SIM_FAULTS": faults, "SIM_STEP_SECONDS": step_seconds}
        )

    def wait_for(self, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        assert self.sidecar.stdout is not None
        while time.monotonic() < deadline:
            line = self.sidecar.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == name:
                return event
        raise AssertionError(
            f"no {name} within {timeout} s; saw {[e['event'] for e in self.events]}"
        )

    def close(self) -> None:
        for process in (self.sidecar, self.runtime):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        try:
            self.sidecar.wait(timeout=10)
        finally:
            if self.runtime is not None:
                kill_everything(self.runtime.pid)
            kill_everything(self.sidecar.pid)
            if self.runtime is not None:
                self.runtime.wait(timeout=10)


@pytest.fixture
def scene_factory(tmp_path):
    scenes = []

    def make(faults: str, **options: str) -> Scene:
        scenes.append(Scene(tmp_path / f"s{len(scenes)}", faults, **options))
        return scenes[-1]

    yield make
    for scene in scenes:
        scene.close()


def test_hang_is_killed_and_the_runtime_restart_resumes(scene_factory):
    """Stall: train.sh rewritten first, processes killed, the runtime restarts, the run resumes."""
    scene = scene_factory("hang_idle@step=20:once")
    stall = scene.wait_for("stall_detected")
    assert stall["last_step"] == 20
    restarted = scene.wait_for("trainer_restarted")
    assert restarted["mode"] == "signal"
    scene.wait_for("training_completed")
    assert scene.runtime.wait(timeout=30) == 0, "the restarted trainer completed"
    assert (scene.tree.output_dir / "my-lora.safetensors").is_file()
    log = (scene.tree.output_dir / "train.log").read_text()
    assert "resuming from" in log and "my-lora-step00000018-state" in log
    names = [e["event"] for e in scene.events]
    assert names.index("train_script_rewritten") < names.index("trainer_restarted")
    assert scene.sidecar.poll() is None, "in signal mode the sidecar stays up after completion"


def test_resume_pointer_is_kept_current_so_a_crash_restart_resumes(scene_factory):
    """While healthy, train.sh follows the newest checkpoint; a crash restarted by the runtime
    alone resumes from it."""
    scene = scene_factory("crash@step=14:code=9:once", step_seconds="0.2")
    rewritten = scene.wait_for("train_script_rewritten")
    assert rewritten["reason"] == "newer complete checkpoint"
    assert rewritten["resume"].endswith("my-lora-step00000006-state")
    scene.wait_for("training_completed", timeout=90)
    names = [e["event"] for e in scene.events]
    assert "stall_detected" not in names
    assert scene.runtime.wait(timeout=30) == 0
    log = (scene.tree.output_dir / "train.log").read_text()
    assert "resuming from" in log
    command = parse_train_script(scene.tree.train_script.read_text())
    assert command.resume is not None and command.resume.endswith("-state")
