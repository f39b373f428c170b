"""The real sidecar supervising the ai-toolkit stand-in in process mode: hang, crash, kill
mid-save, two faults in one run, pruning racing the scan, and auto-detection.

The launch script is ``exec python run.py config/my-lora.yaml`` in an ai-toolkit checkout
whose ``run.py`` runs the stand-in; the job saves every 5 steps and keeps 2 (``save_every``,
``max_step_saves_to_keep``). ai-toolkit resumes by itself from its newest save by ctime,
starting AT the save's step: the attempt resumed from ``<name>_<N>.safetensors`` trains
1-based step N+1 again (the save was made after it). That replay of one step is upstream's
behaviour (``BaseSDTrainProcess.run``), asserted exactly here. The sidecar's part is to keep
the newest save whole: a cut one is set aside, never deleted, and never resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ai_toolkit_tree import ToolkitTree, build_toolkit_tree

from sidecar.simulator.harness import FAST_SETTINGS, run_sidecar_process
from sidecar.trainers.ai_toolkit import save_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

STEPS = 30
SAVE_EVERY = 5


@dataclass
class Run:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]

    def describe(self) -> str:
        return f"events {[e['event'] for e in self.events]}\nstderr:\n{self.stderr[-3000:]}"


def run_sidecar(
    tree: ToolkitTree, faults: dict[str, str], *, trainer: str = "ai-toolkit", **settings: str
) -> Run:
    environment = {
        **os.environ,
        **FAST_SETTINGS,
        "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        "SIDECAR_TRAINER": trainer,
        "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
        "STANDIN_STEP_SECONDS": "0.05",
        **settings,
        **faults,
    }
    result = run_sidecar_process(environment, root=tree.root, timeout=150)
    return Run(result.exit_code, result.events, result.stderr)


def chosen_steps(run: Run) -> list[int | None]:
    """The step of each save the sidecar named as the resume point, in order."""
    chosen = []
    for event in run.named("checkpoint_selected"):
        path = event.get("checkpoint")
        chosen.append(save_names.step_of_save(Path(path).name, None) if path else None)
    return chosen


def assert_completed(tree: ToolkitTree, run: Run, *, restarts: int) -> list[dict[str, int]]:
    """The run ended well, every step 1..STEPS was trained, and each attempt after the first
    started right after a save (trained one step again: upstream's rule) and ran in order."""
    assert run.exit_code == 0, run.describe()
    assert run.named("training_completed"), run.describe()
    assert len(run.named("trainer_restarted")) == restarts, run.describe()
    assert (tree.save_root / save_names.final_name(tree.name)).is_file()
    steps = tree.steps()
    assert {entry["step"] for entry in steps} == set(range(1, STEPS + 1))
    attempts: dict[int, list[int]] = {}
    for entry in steps:
        attempts.setdefault(entry["attempt"], []).append(entry["step"])
    for attempt, trained in attempts.items():
        assert trained == list(range(trained[0], trained[-1] + 1)), (attempt, trained)
    first, *resumed = attempts.values()
    assert first[0] == 1
    for trained in resumed:
        save_step = trained[0] - 1  # the save of step s was made after 1-based step s + 1
        assert save_step % SAVE_EVERY == 0 and save_step > 0, trained
    assert list(attempts.values())[-1][-1] == STEPS
    return steps


def build(tmp_path: Path, *, keep: int = 2) -> ToolkitTree:
    return build_toolkit_tree(tmp_path / "toolkit", steps=STEPS, save_every=SAVE_EVERY, keep=keep)


def test_a_crash_is_resumed_from_the_newest_save(tmp_path: Path) -> None:
    tree = build(tmp_path)
    run = run_sidecar(tree, {"STANDIN_CRASH_AT_STEP": "13"})
    steps = assert_completed(tree, run, restarts=1)
    assert chosen_steps(run)[-1] == 10
    second = [entry["step"] for entry in steps if entry["attempt"] == 2]
    assert second[0] == 11  # step 11 again: the save of step 10 was made after it


def test_a_hang_is_detected_and_resumed(tmp_path: Path) -> None:
    tree = build(tmp_path)
    run = run_sidecar(tree, {"STANDIN_HANG_AT_STEP": "18"})
    assert_completed(tree, run, restarts=1)
    assert run.named("stall_detected"), run.describe()
    assert chosen_steps(run)[-1] == 15


def test_a_kill_mid_save_sets_the_cut_save_aside(tmp_path: Path) -> None:
    """The newest save is cut: it is set aside (renamed, kept) and the relaunch resumes from
    the one before, which ai-toolkit alone would never do (it loads the newest by ctime)."""
    tree = build(tmp_path)
    run = run_sidecar(tree, {"STANDIN_KILL_MID_SAVE_AT_STEP": "15"})
    steps = assert_completed(tree, run, restarts=1)
    (aside,) = run.named("checkpoint_set_aside")
    assert aside["checkpoint"] == str(tree.save_root / save_names.save_name(tree.name, 15))
    moved = Path(aside["moved_to"])
    assert moved.parent == tree.save_root and moved.name.startswith(".incomplete-")
    assert moved.is_file() and moved.stat().st_size > 0  # kept, not deleted
    assert chosen_steps(run)[-1] == 10
    assert next(entry["step"] for entry in steps if entry["attempt"] == 2) == 11
    assert "IMPORTANT RESUMING FROM" in (tree.save_root / "train.log").read_text()


def test_two_faults_in_one_run(tmp_path: Path) -> None:
    """A kill inside a save, then a crash after the resume: two recoveries, each from the
    newest whole save."""
    tree = build(tmp_path)
    faults = {"STANDIN_KILL_MID_SAVE_AT_STEP": "10", "STANDIN_CRASH_AT_STEP": "22"}
    run = run_sidecar(tree, faults)
    assert_completed(tree, run, restarts=2)
    assert chosen_steps(run)[-2:] == [5, 20]
    assert len(run.named("checkpoint_set_aside")) == 1


def test_pruning_races_the_scan(tmp_path: Path) -> None:
    """Keeping one save, ai-toolkit removes the previous one at every save while the sidecar
    polls its folder; large saves keep each write long. A crash late in the run resumes."""
    tree = build(tmp_path, keep=1)
    run = run_sidecar(
        tree,
        {"STANDIN_CRASH_AT_STEP": "27", "STANDIN_SAVE_BYTES": str(8 * 1024 * 1024)},
        SIDECAR_POLL_INTERVAL="0.05s",
    )
    assert_completed(tree, run, restarts=1)
    assert chosen_steps(run)[-1] == 25
    saves = [p.name for p in tree.save_root.glob(f"{tree.name}_*.safetensors")]
    assert saves == [save_names.save_name(tree.name, 25)]


def test_auto_detection_finds_ai_toolkit(tmp_path: Path) -> None:
    tree = build(tmp_path)
    run = run_sidecar(tree, {"STANDIN_KILL_MID_SAVE_AT_STEP": "20"}, trainer="auto")
    assert_completed(tree, run, restarts=1)
    assert chosen_steps(run)[-1] == 15


def test_a_kill_inside_optimizer_pt_resumes_from_that_save_and_says_so(tmp_path: Path) -> None:
    """The weights of the save are whole but the shared optimizer.pt is cut: that save is still
    the best there is (no older optimizer state survives), nothing is set aside, and ai-toolkit
    starts the optimizer afresh and says so (the scan's note on it: see the unit tests)."""
    tree = build(tmp_path)
    run = run_sidecar(tree, {"STANDIN_KILL_MID_OPTIMIZER_AT_STEP": "15"})
    assert_completed(tree, run, restarts=1)
    assert chosen_steps(run)[-1] == 15
    assert not run.named("checkpoint_set_aside")
    assert "Failed to load optimizer state" in (tree.save_root / "train.log").read_text()
