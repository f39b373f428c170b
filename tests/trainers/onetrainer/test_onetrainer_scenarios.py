"""The real sidecar supervising the OneTrainer stand-in in process mode: hang, crash, kill
mid-backup, two faults in one run, rolling pruning racing the scan, and auto-detection.

The stand-in (``standin.py``) runs as ``<tree>/OneTrainer/scripts/train.py`` from a launch
script, ``python scripts/train.py --config-path <config.json>``, the way OneTrainer's CLI is
started, with 5 steps per epoch, 4 epochs and a backup every 3 steps (``backup_after`` 3
STEP: before steps 3, 6, 9, ... at global steps 2, 5, 8, ...). OneTrainer's resume is exact:
the attempt continuing from the backup of global step N trains step N+1 first, on the right
batch of its epoch (meta.json's epoch_sample), so each attempt's steps follow on from its
backup with no gap; steps after that backup which the failed attempt had trained are trained
again, as after any resume from an earlier state.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.simulator.harness import FAST_SETTINGS, run_sidecar_process
from sidecar.trainers.onetrainer import backup_rules

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).with_name("standin.py")
STEPS_PER_EPOCH = 5
EPOCHS = 4
MAX_STEPS = STEPS_PER_EPOCH * EPOCHS


@dataclass
class Tree:
    root: Path
    workspace: Path
    train_script: Path
    final_model: Path


@dataclass
class Run:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]

    def describe(self) -> str:
        return (
            f"exit {self.exit_code}; events {[e['event'] for e in self.events]}\n"
            + (self.stderr[-3000:])
        )


def build_tree(root: Path, **config: Any) -> Tree:
    """OneTrainer's checkout (the stand-in as scripts/train.py), a config file, a workspace
    and a launch script, as a user's volume would have them."""
    script = root / "OneTrainer" / "scripts" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text(f"import runpy\nrunpy.run_path({str(STANDIN)!r}, run_name='__main__')\n")
    workspace = root / "workspace" / "run"
    workspace.mkdir(parents=True)  # where the sidecar keeps its own files from the start
    final_model = root / "models" / "final.safetensors"
    settings = {
        "training_method": "LORA",
        "workspace_dir": str(workspace),
        "output_model_destination": str(final_model),
        "epochs": EPOCHS,
        "backup_after": 3,
        "backup_after_unit": "STEP",
        "backup_before_save": False,
        **config,
    }
    config_file = root / "run.json"
    config_file.write_text(json.dumps(settings))
    train_script = root / "train.sh"
    train_script.write_text(
        f"#!/bin/bash\n{sys.executable} scripts/train.py \\\n  --config-path {config_file}\n"
    )
    return Tree(root, workspace, train_script, final_model)


def run_sidecar(
    tree: Tree, faults: dict[str, str], *, trainer: str = "onetrainer", timeout: float = 120
) -> Run:
    environment = {
        **os.environ,
        **FAST_SETTINGS,
        "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        "SIDECAR_TRAINER": trainer,
        "SIDECAR_TRAINER_WORKDIR": str(tree.root / "OneTrainer"),
        "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
        "SIDECAR_MAX_RESTARTS": "4",
        "STANDIN_STEPS_PER_EPOCH": str(STEPS_PER_EPOCH),
        # Backups (every 3 steps) more than a second apart, so that their timestamps differ
        # and OneTrainer's name order is their order in time (see the pruning test).
        "STANDIN_STEP_SECONDS": "0.35",
        **faults,
    }
    result = run_sidecar_process(environment, root=tree.root, timeout=timeout)
    return Run(result.exit_code, result.events, result.stderr)


def steps_by_attempt(tree: Tree) -> list[list[int]]:
    lines = (tree.workspace / "standin-steps.jsonl").read_text().splitlines()
    attempts: dict[int, list[int]] = {}
    for line in lines:
        entry = json.loads(line)
        attempts.setdefault(entry["attempt"], []).append(entry["step"])
    return [attempts[key] for key in sorted(attempts)]


def continued_from(tree: Tree) -> list[str]:
    """The backups the attempts said they continued from (train.log, OneTrainer's own line)."""
    log = (tree.workspace / "train.log").read_text()
    # Found anywhere: the previous attempt's last bar redraw has no newline after it.
    return re.findall(r"Continuing training from backup '([^']*)'\.\.\.", log)


def assert_completed_exactly(run: Run, tree: Tree, *, restarts: int) -> list[list[int]]:
    """The run completed; every step 1..max was trained; each resumed attempt started right
    after the backup it continued from (which the sidecar chose) and trained on to the end
    or to its fault without a gap or a repeat."""
    assert run.exit_code == 0, run.describe()
    assert run.named("training_completed"), run.describe()
    assert len(run.named("trainer_restarted")) == restarts, run.describe()
    assert tree.final_model.is_file()
    attempts = steps_by_attempt(tree)
    assert len(attempts) == restarts + 1
    for steps in attempts:
        assert steps == list(range(steps[0], steps[0] + len(steps))), steps  # no gap, no repeat
    assert attempts[0][0] == 1 and attempts[-1][-1] == MAX_STEPS
    assert set().union(*map(set, attempts)) == set(range(1, MAX_STEPS + 1))
    selected = [e for e in run.named("checkpoint_selected") if e.get("checkpoint")]
    assert len(selected) == restarts, run.describe()
    backups = continued_from(tree)
    assert len(backups) == restarts
    for event, backup, steps in zip(selected, backups, attempts[1:], strict=True):
        name = backup_rules.parse_backup_name(Path(backup).name)
        assert name is not None and backup == event["checkpoint"]
        assert event["step"] == name.global_step and steps[0] == name.global_step + 1
    return attempts


def test_a_hang_is_resumed_from_the_newest_backup(tmp_path):
    """Hung before step 8, the run continues from the backup of step 5 and completes."""
    tree = build_tree(tmp_path)
    run = run_sidecar(tree, {"STANDIN_HANG_AT_STEP": "8"})
    attempts = assert_completed_exactly(run, tree, restarts=1)
    assert run.named("stall_detected")
    assert attempts[0] == list(range(1, 8)) and attempts[1][0] == 6
    command = tree.train_script.read_text()
    assert '--config-value "continue_last_backup=true"' in command
    assert (tree.root / "train.sh.orig").is_file()


def test_a_crash_is_resumed_from_the_newest_backup(tmp_path):
    """Exit 1 before step 11: continues from the backup of step 8."""
    tree = build_tree(tmp_path)
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "11"})
    attempts = assert_completed_exactly(run, tree, restarts=1)
    assert run.named("trainer_crashed")[0]["exit_code"] == 1
    assert attempts[1][0] == 9


def test_a_kill_mid_backup_is_set_aside_not_resumed(tmp_path):
    """SIGKILLed in the backup of step 8 before its meta.json: OneTrainer would take that
    newest name; the sidecar sets it aside (renamed into the workspace, not deleted) and the
    run continues from the backup of step 5."""
    tree = build_tree(tmp_path)
    run = run_sidecar(tree, {"STANDIN_KILL_MID_SAVE_AT_STEP": "8"})
    attempts = assert_completed_exactly(run, tree, restarts=1)
    assert attempts[1][0] == 6
    (aside,) = run.named("checkpoint_set_aside")
    original, moved = Path(aside["checkpoint"]), Path(aside["moved_to"])
    assert backup_rules.parse_backup_name(original.name).global_step == 8
    assert moved.parent == tree.workspace and moved.is_dir() and not original.exists()
    assert (moved / "lora" / "lora.safetensors").is_file()  # evidence kept as it was
    assert not (moved / "meta.json").exists()
    assert all("backup-8-" not in backup for backup in continued_from(tree))


def test_two_faults_in_one_run(tmp_path):
    """A crash before step 7, then a hang before step 16 of the resumed attempt: both
    recovered, each from the newest backup at the time."""
    tree = build_tree(tmp_path)
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "7", "STANDIN_HANG_AT_STEP": "16"})
    attempts = assert_completed_exactly(run, tree, restarts=2)
    assert [steps[0] for steps in attempts] == [1, 6, 15]


def test_rolling_pruning_racing_the_scan(tmp_path):
    """Rolling backups (keep 2) deleted while the sidecar scans every poll: no error, and
    the crash is resumed from a backup that survived, the one OneTrainer itself takes.

    The backups here come within one second, so their timestamps are equal and OneTrainer's
    string order ranks ``backup-9-...`` above ``backup-13-...``: its pruning keeps the two
    greatest names, not the two newest backups (``GenericTrainer.__prune_backups``)."""
    tree = build_tree(tmp_path, backup_after=2, rolling_backup=True, rolling_backup_count=2)
    faults = {"STANDIN_CRASH_AT_STEP": "14", "STANDIN_SAVE_FILE_SECONDS": "0.03"}
    run = run_sidecar(tree, {**faults, "STANDIN_STEP_SECONDS": "0.05"})
    attempts = assert_completed_exactly(run, tree, restarts=1)
    assert attempts[1][0] - 1 in range(1, 14, 2)  # one of the backups of steps 1, 3, ... 13
    made = (tree.workspace / "train.log").read_text().count("Creating Backup ")
    assert made >= 8 and len(list((tree.workspace / "backup").iterdir())) == 2  # pruned
    assert not [e for e in run.events if e.get("level") in ("error", "critical")], run.describe()


def test_auto_detection_finds_onetrainer(tmp_path):
    """SIDECAR_TRAINER=auto recognises the launch and recovers a crash the same way."""
    tree = build_tree(tmp_path)
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "5"}, trainer="auto")
    attempts = assert_completed_exactly(run, tree, restarts=1)
    assert attempts[1][0] == 3
