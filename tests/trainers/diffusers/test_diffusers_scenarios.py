"""The real sidecar supervising the diffusers stand-in in process mode: hang, crash, kill
mid-save, two faults in one run, pruning racing the scan, and auto-detection.

The stand-in (``standin.py``) runs as ``examples/dreambooth/train_dreambooth_lora_flux.py``
under a launch script, with 4 batches per epoch and 24 steps (a whole number of epochs, so
upstream's one-step overshoot after a mid-epoch resume cannot happen). diffusers replays the
partial epoch after a resume: the attempt resumed from ``checkpoint-N`` trains step N+1 on
batch 0 of epoch ``N // 4``. That is upstream's behaviour, asserted exactly here.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.simulator.harness import FAST_SETTINGS, run_sidecar_process
from sidecar.trainers.diffusers import DIFFUSERS

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).with_name("standin.py")
BATCHES = 4
MAX_STEPS = 24
SCRIPT = "examples/dreambooth/train_dreambooth_lora_flux.py"


@dataclass
class Tree:
    root: Path
    output_dir: Path
    train_script: Path


@dataclass
class Run:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]


def build_tree(root: Path, *options: str) -> Tree:
    """A launch script running the stand-in under diffusers' own script name."""
    script = root / SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text(f"import runpy\nrunpy.run_path({str(STANDIN)!r}, run_name='__main__')\n")
    output_dir = root / "out"
    output_dir.mkdir()
    lines = [
        f"--output_dir {output_dir}",
        '--pretrained_model_name_or_path "black-forest-labs/FLUX.1-dev"',
        f"--max_train_steps {MAX_STEPS}",
        *options,
    ]
    train_script = root / "train.sh"
    body = " \\\n  ".join([f"exec {sys.executable} {script}", *lines])
    train_script.write_text(f"#!/bin/bash\n{body}\n")
    return Tree(root, output_dir, train_script)


def run_sidecar(tree: Tree, faults: dict[str, str], *, trainer: str = "diffusers") -> Run:
    environment = {
        **os.environ,
        **FAST_SETTINGS,
        "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        "SIDECAR_TRAINER": trainer,
        "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
        "STANDIN_BATCHES_PER_EPOCH": str(BATCHES),
        "STANDIN_STEP_SECONDS": "0.05",
        **faults,
    }
    result = run_sidecar_process(environment, root=tree.root, timeout=120)
    return Run(result.exit_code, result.events, result.stderr)


def steps_of(tree: Tree) -> list[dict[str, int]]:
    lines = (tree.output_dir / "standin-steps.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def resumed_from(run: Run) -> list[int | None]:
    """The step of each checkpoint the sidecar chose, in order (None: from the beginning)."""
    chosen = []
    for event in run.named("checkpoint_selected"):
        name = Path(event["checkpoint"]).name if event["checkpoint"] else None
        chosen.append(int(name.split("-")[1]) if name else None)
    return chosen


def assert_completed_in_order(run: Run, tree: Tree, *, restarts: int) -> list[int | None]:
    """The run completed; each attempt resumed right after its chosen checkpoint, replaying
    that epoch from its first batch as diffusers does, with no gap and no repeat within it."""
    assert run.exit_code == 0, run.stderr[-3000:]
    assert run.named("training_completed"), [e["event"] for e in run.events]
    assert len(run.named("trainer_restarted")) == restarts
    assert not run.named("resume_failed"), run.named("resume_failed")  # it said it resumed
    assert (tree.output_dir / "pytorch_lora_weights.safetensors").is_file()
    records = steps_of(tree)
    attempts: dict[int, list[dict[str, int]]] = {}
    for record in records:
        attempts.setdefault(record["attempt"], []).append(record)
    assert sorted(attempts) == list(range(1, restarts + 2))
    chosen = resumed_from(run)
    assert len(chosen) == restarts
    for attempt, trained in attempts.items():
        start = 0 if attempt == 1 else chosen[attempt - 2] or 0
        steps = [record["step"] for record in trained]
        assert steps == list(range(start + 1, start + 1 + len(steps))), (attempt, steps)
        first = trained[0]
        # the partial epoch is replayed: the first step after N is on batch 0 of epoch N // 4
        assert (first["epoch"], first["batch"]) == (start // BATCHES, 0), (attempt, first)
        expected = [(e, b) for e in range(start // BATCHES, 99) for b in range(BATCHES)]
        assert [(r["epoch"], r["batch"]) for r in trained] == expected[: len(trained)]
    assert attempts[restarts + 1][-1]["step"] == MAX_STEPS
    assert {record["step"] for record in records} == set(range(1, MAX_STEPS + 1))
    log = (tree.output_dir / "train.log").read_text()
    for step in chosen:
        if step:
            assert f"Resuming from checkpoint checkpoint-{step}" in log
    return chosen


def test_a_hang_is_resumed_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """Hung at step 11 with checkpoint-9 saved: killed, resumed by name from checkpoint-9."""
    tree = build_tree(tmp_path, "--checkpointing_steps 3")
    run = run_sidecar(tree, {"STANDIN_HANG_AT_STEP": "11"})
    assert run.named("stall_detected")
    assert assert_completed_in_order(run, tree, restarts=1) == [9]
    command = DIFFUSERS.read_launch_script(tree.train_script.read_text())
    assert command.option("resume_from_checkpoint") == "checkpoint-9"  # the basename
    assert (tree.root / "train.sh.orig").is_file()


def test_a_crash_is_resumed(tmp_path: Path) -> None:
    tree = build_tree(tmp_path, "--checkpointing_steps 4")
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "14"})
    assert run.named("trainer_crashed")[0]["exit_code"] == 1
    assert assert_completed_in_order(run, tree, restarts=1) == [12]


def test_a_kill_mid_save_sets_the_partial_checkpoint_aside(tmp_path: Path) -> None:
    """checkpoint-12 is cut short: never chosen, renamed out of diffusers' sight (not
    deleted), and saved afresh by the resumed run."""
    tree = build_tree(tmp_path, "--checkpointing_steps 4")
    run = run_sidecar(tree, {"STANDIN_KILL_MID_SAVE_AT_STEP": "12"})
    assert assert_completed_in_order(run, tree, restarts=1) == [8]
    [aside] = run.named("checkpoint_set_aside")
    assert Path(aside["checkpoint"]).name == "checkpoint-12"
    moved = Path(aside["moved_to"])
    assert moved.parent == tree.output_dir and not moved.name.startswith("checkpoint")
    assert (moved / "optimizer.bin").is_file() and not (moved / "random_states_0.pkl").exists()
    assert (tree.output_dir / "checkpoint-12" / "random_states_0.pkl").is_file()


def test_two_faults_in_one_run_are_both_recovered(tmp_path: Path) -> None:
    """A crash, then a kill mid-save in the resumed attempt."""
    tree = build_tree(tmp_path, "--checkpointing_steps 4")
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "6", "STANDIN_KILL_MID_SAVE_AT_STEP": "16"})
    assert assert_completed_in_order(run, tree, restarts=2) == [4, 12]
    assert [Path(e["checkpoint"]).name for e in run.named("checkpoint_set_aside")] == [
        "checkpoint-16"
    ]


def test_pruning_by_the_total_limit_races_the_scan(tmp_path: Path) -> None:
    """A save every step with --checkpoints_total_limit 2 (delete first, then save) while
    the folder is scanned over and over: a vanished folder is never reported, a complete one
    is whole, and the crashed run resumes from the newest complete one."""
    tree = build_tree(tmp_path, "--checkpointing_steps 1", "--checkpoints_total_limit 2")
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def scan_until_stopped() -> None:
        while not stop.is_set():
            try:
                for found in DIFFUSERS.find_states(
                    tree.output_dir, now=time.time(), settle_seconds=0.3, output_name=None
                ):
                    if found.complete:
                        seen.append(found.path.name)
            except BaseException as error:  # the test reports it below
                errors.append(error)
                return

    scanner = threading.Thread(target=scan_until_stopped, daemon=True)
    scanner.start()
    try:
        run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "15"})
    finally:
        stop.set()
        scanner.join(timeout=10)
    assert not errors, errors
    assert seen  # the race was run
    assert assert_completed_in_order(run, tree, restarts=1) == [14]
    left = sorted(p.name for p in tree.output_dir.iterdir() if p.name.startswith("checkpoint"))
    assert left == ["checkpoint-23", "checkpoint-24"]


def test_auto_detects_diffusers(tmp_path: Path) -> None:
    """SIDECAR_TRAINER=auto: the example script's name tells; the resume goes by name."""
    tree = build_tree(tmp_path, "--checkpointing_steps 5")
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "12"}, trainer="auto")
    assert assert_completed_in_order(run, tree, restarts=1) == [10]
