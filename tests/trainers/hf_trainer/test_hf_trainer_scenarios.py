"""The real sidecar (process mode) supervising a real transformers Trainer run (tiny_clm.py).

Each fault strikes the first attempt only; the sidecar must notice it, resume from the newest
complete checkpoint-<N> (setting aside a partial newer one, which get_last_checkpoint would
otherwise take), and the run must end with global_step == max_steps and a log_history whose
loss entries cover every step once: the HF Trainer's resume is exact.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.simulator.harness import FAST_SETTINGS, run_sidecar_process
from sidecar.trainers.hf_trainer import HF_TRAINER

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TINY_CLM = Path(__file__).with_name("tiny_clm.py")
MAX_STEPS = 40
SETTINGS = {
    **FAST_SETTINGS,
    # Importing torch and transformers prints nothing for seconds on two cores.
    "SIDECAR_STARTUP_GRACE": "60s",
    "SIDECAR_STALL_TIMEOUT": "3s",
}


@dataclass
class Run:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str
    output_dir: Path

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]

    def describe(self) -> str:
        names = [event["event"] for event in self.events]
        return f"exit {self.exit_code}; events {names}; stderr tail {self.stderr[-3000:]}"


def write_train_script(root: Path, *, save_steps: int = 5, save_total_limit: int = 3) -> Path:
    output_dir = root / "out"
    # The sidecar takes the command's --output_dir only once it exists (run/paths.py).
    output_dir.mkdir()
    script = root / "train.sh"
    words = [
        sys.executable,
        str(TINY_CLM),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        str(save_steps),
        "--save_total_limit",
        str(save_total_limit),
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--use_cpu",
    ]
    # INFO: the Trainer's "Resuming training from checkpoint ..." lines (progress.py).
    script.write_text(
        "#!/bin/bash\nTRANSFORMERS_VERBOSITY=info exec "
        + " \\\n  ".join(shlex.quote(word) for word in words)
        + "\n"
    )
    return script


def run_sidecar(script: Path, *, trainer: str, faults: dict[str, str], timeout: float = 150) -> Run:
    root = script.parent
    environment = {
        **os.environ,
        **SETTINGS,
        **faults,
        "SIDECAR_TRAINER": trainer,
        "SIDECAR_TRAIN_SCRIPT": str(script),
        "SIDECAR_HEARTBEAT_FILE": str(root / "heartbeat"),
        "OMP_NUM_THREADS": "1",
    }
    result = run_sidecar_process(environment, root=root, timeout=timeout)
    events = result.events + [
        json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")
    ]
    return Run(result.exit_code, events, result.stderr, root / "out")


def final_state(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())


def assert_completed_exactly(run: Run) -> None:
    """Exit 0, the final model, global_step == max_steps, each step's loss logged once."""
    assert run.exit_code == 0, run.describe()
    assert (run.output_dir / "model.safetensors").is_file(), run.describe()
    state = final_state(run.output_dir)
    assert state["global_step"] == MAX_STEPS
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged == list(range(1, MAX_STEPS + 1)), logged


def trained_steps(output_dir: Path) -> list[tuple[int, int]]:
    lines = (output_dir / "tiny-steps.jsonl").read_text().splitlines()
    return [(record["attempt"], record["step"]) for record in map(json.loads, lines)]


def assert_resumed_after(run: Run, checkpoint: int) -> None:
    """The second attempt trained checkpoint+1 .. max_steps, in order, and nothing else."""
    second = [step for attempt, step in trained_steps(run.output_dir) if attempt == 2]
    assert second == list(range(checkpoint + 1, MAX_STEPS + 1)), second
    selected = run.named("checkpoint_selected")
    assert selected, run.describe()
    assert selected[-1]["checkpoint"].endswith(f"checkpoint-{checkpoint}"), selected[-1]


def test_a_hang_is_resumed_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """Hung after step 12: killed, resumed from checkpoint-10, completed exactly."""
    script = write_train_script(tmp_path)
    run = run_sidecar(script, trainer="hf-trainer", faults={"TINY_HANG_AT_STEP": "12"})
    assert_completed_exactly(run)
    assert run.named("stall_detected"), run.describe()
    assert_resumed_after(run, 10)
    assert HF_TRAINER.read_launch_script(script.read_text()).resume == str(
        run.output_dir / "checkpoint-10"
    )
    assert (tmp_path / "train.sh.orig").is_file()


def test_a_crash_is_resumed_with_trainer_auto(tmp_path: Path) -> None:
    """Exit 1 after step 23 (SIDECAR_TRAINER=auto finds hf-trainer): resumed from 20."""
    script = write_train_script(tmp_path)
    run = run_sidecar(script, trainer="auto", faults={"TINY_CRASH_AT_STEP": "23"})
    assert_completed_exactly(run)
    assert_resumed_after(run, 20)


def test_a_kill_mid_save_sets_the_partial_checkpoint_aside(tmp_path: Path) -> None:
    """SIGKILL inside checkpoint-15's save (before trainer_state.json): the partial folder
    is set aside, not resumed and not deleted; the run resumes from checkpoint-10."""
    script = write_train_script(tmp_path)
    run = run_sidecar(script, trainer="hf-trainer", faults={"TINY_KILL_MID_SAVE_AT_STEP": "15"})
    assert_completed_exactly(run)
    assert_resumed_after(run, 10)
    (aside,) = [path for path in run.output_dir.iterdir() if path.name.startswith("incomplete-")]
    assert aside.name.endswith("-checkpoint-15")
    assert (aside / "optimizer.pt").is_file()
    assert not (aside / "trainer_state.json").exists()


def test_two_faults_in_one_run_and_rotation_racing_the_scans(tmp_path: Path) -> None:
    """A save every 2 steps kept to 2 (rotation deletes while the sidecar scans), a crash and
    then a kill mid-save on the relaunch: both recovered, the run exact."""
    script = write_train_script(tmp_path, save_steps=2, save_total_limit=2)
    run = run_sidecar(
        script,
        trainer="hf-trainer",
        faults={"TINY_CRASH_AT_STEP": "9", "TINY_KILL_MID_SAVE_AT_STEP": "30"},
    )
    assert_completed_exactly(run)
    selected = [event["checkpoint"] for event in run.named("checkpoint_selected")]
    assert selected[0].endswith("checkpoint-8"), selected
    assert selected[-1].endswith("checkpoint-28"), selected
    assert not run.named("error"), run.describe()


def test_scanning_while_the_trainer_rotates_is_never_an_error(tmp_path: Path) -> None:
    """find_states in a loop while a real Trainer saves every step and keeps one: no error,
    and every folder reported complete is a whole save of its own step."""
    output_dir = tmp_path / "out"
    stop = threading.Event()
    seen: list[tuple[int, int | None]] = []
    failures: list[BaseException] = []

    def scan_until_stopped() -> None:
        while not stop.is_set():
            try:
                for found in HF_TRAINER.find_states(
                    output_dir, now=time.time(), settle_seconds=0, output_name=None
                ):
                    if found.complete:
                        seen.append((found.number or -1, found.step))
            except BaseException as error:
                failures.append(error)
                return

    scanner = threading.Thread(target=scan_until_stopped)
    scanner.start()
    try:
        subprocess.run(
            [
                sys.executable,
                str(TINY_CLM),
                *("--output_dir", str(output_dir), "--max_steps", "30", "--save_steps", "1"),
                *("--save_total_limit", "1", "--report_to", "none", "--use_cpu"),
                "--disable_tqdm=true",
            ],
            check=True,
            timeout=120,
            env={**os.environ, "TINY_STEP_SECONDS": "0", "OMP_NUM_THREADS": "1"},
            capture_output=True,
        )
    finally:
        stop.set()
        scanner.join()
    assert not failures, failures
    assert seen, "the scans never saw a complete checkpoint"
    assert all(number == step for number, step in seen)
