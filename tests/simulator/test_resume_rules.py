"""The simulator resumes exactly as sd-scripts' train_network.py does (sd3 == main 48d368f).

Each test runs FluxGym's train.sh through the accelerate stand-in and reads the simulated
LoRA's lineage (the (epoch, batch) pairs it trained) from the files the runs leave, so a
resume that trains batches again, or skips some, shows in the weights themselves.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from sidecar.simulator import (
    Fault,
    FluxgymTree,
    build_fluxgym_tree,
    format_faults,
    parse_faults,
    read_lineage,
    uninterrupted_lineage,
)
from sidecar.simulator.accelerate_state import load_state
from sidecar.simulator.faults import parse_fault
from sidecar.simulator.resume_position import ResumePosition, resume_position
from sidecar.simulator.schedule import TrainingPlan
from sidecar.simulator.terminal_output import Terminal
from sidecar.trainers.sd_scripts.rich_log import unwrap

SPE = 4  # steps per epoch
EPOCHS = 4
FAST = {
    "SIM_STEPS_PER_EPOCH": str(SPE),
    "SIM_STEP_SECONDS": "0.002",
    "SIM_STARTUP_SECONDS": "0",
    "SIM_SAVE_SECONDS": "0",
    "SIM_SAMPLE_SECONDS": "0",
}
STEP_STATES = f"--save_state --save_every_n_steps 3 --max_train_epochs {EPOCHS}"
PROGRESS = re.compile(r"steps:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[")
EVERY_PAIR = uninterrupted_lineage(SPE, EPOCHS)


def train(
    root: Path, extra: str, faults: list[Fault] | None = None
) -> tuple[FluxgymTree, subprocess.CompletedProcess[str]]:
    """Write train.sh with ``extra`` flags and run it to its end; stderr is merged into stdout.

    Both streams are flushed after every write, so the merged text keeps the trainer's order.
    """
    tree = build_fluxgym_tree(root, extra_trainer_args=extra)
    environment = tree.env({**FAST, "SIM_FAULTS": format_faults(faults or [])})
    done = subprocess.run(
        tree.command,
        cwd=tree.root,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return tree, done


def state(tree: FluxgymTree, step: int) -> Path:
    return tree.output_dir / f"my-lora-step{step:08d}-state"


def train_state(folder: Path) -> dict[str, int]:
    return dict(json.loads((folder / "train_state.json").read_text()))


def optimizer_steps(folder: Path) -> int:
    with zipfile.ZipFile(folder / "optimizer.bin") as archive:
        return int(pickle.loads(archive.read("optimizer/data.pkl"))["optimizer_steps"])


def final_lineage(tree: FluxgymTree) -> list[tuple[int, int]]:
    return read_lineage(tree.output_dir / "my-lora.safetensors")


def last_progress(output: str) -> tuple[int, int]:
    n, total = PROGRESS.findall(output)[-1]
    return int(n), int(total)


# --------------------------------------------------------------------------- lineage


def test_uninterrupted_run_trains_every_batch_once_and_records_it_everywhere(
    tmp_path: Path,
) -> None:
    """The final model's lineage is every (epoch, batch) once; each save holds its prefix."""
    tree, done = train(tmp_path, STEP_STATES)
    assert done.returncode == 0, done.stdout[-2000:]
    assert final_lineage(tree) == EVERY_PAIR
    assert read_lineage(tree.output_dir / "my-lora-state" / "model.safetensors") == EVERY_PAIR
    for step in (3, 6, 9, 12, 15):
        assert read_lineage(state(tree, step) / "model.safetensors") == EVERY_PAIR[:step]
        model_file = tree.output_dir / f"my-lora-step{step:08d}.safetensors"
        assert read_lineage(model_file) == EVERY_PAIR[:step]
        assert optimizer_steps(state(tree, step)) == step
    assert uninterrupted_lineage(2, 3, max_train_steps=5) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
    ]


# --------------------------------------------------------------------------- resume position


def test_resume_without_skip_trains_the_partial_epoch_again(tmp_path: Path) -> None:
    """train_state alone: whole epochs skipped, the partial one redone, global_step from 0."""
    tree, first = train(tmp_path, STEP_STATES, [Fault("crash", step=7, code=3)])
    assert first.returncode == 3
    resumed = state(tree, 6)
    assert train_state(resumed) == {"current_epoch": 2, "current_step": 6}
    _, second = train(tmp_path, f"{STEP_STATES} --resume {resumed}")
    assert second.returncode == 0, second.stdout[-2000:]
    # epoch_to_start = 6 // 4 = 1; initial_step = 0: batches (1, 0) and (1, 1) trained twice
    assert final_lineage(tree) == EVERY_PAIR[:6] + EVERY_PAIR[4:]
    assert "epoch 1/4" not in unwrap(second.stdout) and "epoch 2/4" in unwrap(second.stdout)
    assert "skipping" not in unwrap(second.stdout)
    assert last_progress(second.stdout) == (12, 16)  # counts from 0, total max_train_steps


def test_initial_step_with_skip_until_initial_step_continues_exactly(tmp_path: Path) -> None:
    """--initial_step N --skip_until_initial_step: discards the epoch's first batches, exact."""
    tree, first = train(tmp_path, STEP_STATES, [Fault("crash", step=7, code=3)])
    assert first.returncode == 3
    flags = f"--resume {state(tree, 6)} --initial_step 6 --skip_until_initial_step"
    _, second = train(tmp_path, f"{STEP_STATES} {flags}")
    assert second.returncode == 0, second.stdout[-2000:]
    assert final_lineage(tree) == EVERY_PAIR
    assert (
        "steps from the state is ignored because initial_step is specified / "
        "initial_stepが指定されているため、stateからのステップ数は無視されます"
        in unwrap(second.stdout)
    )
    assert "skipping 6 steps / 6ステップをスキップします" in unwrap(second.stdout)
    assert "skipping epoch 1 because initial_step (multiplied) is 6" in unwrap(second.stdout)
    # global_step starts at the remainder 2; the bar's total is 16 - 2 and it counts from 0
    assert last_progress(second.stdout) == (10, 14)
    assert PROGRESS.findall(second.stdout)[0] == ("0", "14")
    # step names are this attempt's global_step (2 + 1 = 3 is the first step done)
    assert train_state(state(tree, 3)) == {"current_epoch": 2, "current_step": 3}
    assert read_lineage(state(tree, 3) / "model.safetensors") == EVERY_PAIR[:7]


def test_from_the_second_resume_on_train_state_alone_starts_too_early(tmp_path: Path) -> None:
    """A state written by a resumed run holds a relative step: the next resume redoes epochs."""
    crashes = [Fault("crash", step=11, code=3, run=1), Fault("crash", step=7, code=3, run=2)]
    tree, first = train(tmp_path, STEP_STATES, crashes)
    assert first.returncode == 3
    assert train_state(state(tree, 9)) == {"current_epoch": 3, "current_step": 9}
    _, second = train(tmp_path, f"{STEP_STATES} --resume {state(tree, 9)}", crashes)
    assert second.returncode == 3
    # run 2 redid epoch 2 from its start and wrote step-6 again, now in epoch 4
    assert train_state(state(tree, 6)) == {"current_epoch": 4, "current_step": 6}
    after_two = EVERY_PAIR[:9] + EVERY_PAIR[8:14]
    assert read_lineage(state(tree, 6) / "model.safetensors") == after_two
    _, third = train(tmp_path, f"{STEP_STATES} --resume {state(tree, 6)}", crashes)
    assert third.returncode == 0, third.stdout[-2000:]
    # 6 // 4 = 1: epoch index 1 is trained again although the weights have seen epoch 3
    assert final_lineage(tree) == after_two + EVERY_PAIR[4:]
    assert final_lineage(tree).count((1, 0)) == 2 and final_lineage(tree).count((2, 0)) == 3
    assert len(final_lineage(tree)) == 27  # optimizer steps instead of 16


def test_step_state_names_come_round_and_stale_higher_names_stay(tmp_path: Path) -> None:
    """After a resume the step count restarts, so the same names are written again in place."""
    tree, first = train(tmp_path, STEP_STATES, [Fault("crash", step=11, code=3, run=1)])
    assert first.returncode == 3
    assert train_state(state(tree, 3)) == {"current_epoch": 1, "current_step": 3}
    crash = Fault("crash", step=4, code=3, run=2)
    _, second = train(tmp_path, f"{STEP_STATES} --resume {state(tree, 9)}", [crash])
    assert second.returncode == 3
    assert train_state(state(tree, 3)) == {"current_epoch": 3, "current_step": 3}
    assert read_lineage(state(tree, 3) / "model.safetensors") == EVERY_PAIR[:9] + EVERY_PAIR[8:11]
    # the higher-numbered folders are run 1's, older than the step-3 one
    assert train_state(state(tree, 9)) == {"current_epoch": 3, "current_step": 9}
    assert (
        state(tree, 6).stat().st_mtime_ns < (state(tree, 3) / "train_state.json").stat().st_mtime_ns
    )


def test_crash_inside_an_overwrite_leaves_a_mixed_folder(tmp_path: Path) -> None:
    """A fault after train_state.json and the weights leaves them beside the old save's files."""
    extra = f"--save_state --save_every_n_steps 2 --max_train_epochs {EPOCHS}"
    faults = [Fault("crash", step=7, code=3, run=1), Fault("crash_in_save", save=1, run=2)]
    tree, first = train(tmp_path, extra, faults)
    assert first.returncode == 3
    folder = state(tree, 2)
    old_optimizer = (folder / "optimizer.bin").read_bytes()
    _, second = train(tmp_path, f"{extra} --resume {state(tree, 4)}", faults)
    assert second.returncode == 1
    assert "Model weights saved in" in unwrap(second.stdout).rsplit("Saving current state to", 1)[1]
    names = ["train_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "random_states_0.pkl"])
    assert train_state(folder) == {"current_epoch": 2, "current_step": 2}  # new
    assert read_lineage(folder / "model.safetensors") == EVERY_PAIR[:6]  # new
    assert (folder / "optimizer.bin").read_bytes() == old_optimizer  # old
    assert optimizer_steps(folder) == 2
    mtimes = {name: (folder / name).stat().st_mtime_ns for name in names}
    assert mtimes["optimizer.bin"] <= mtimes["scheduler.bin"] < mtimes["train_state.json"]
    # every file well-formed: the loader takes it, with the new weights' lineage
    loaded = load_state(folder, Terminal(io.StringIO(), io.StringIO()))
    assert loaded.steps_from_state == 2 and loaded.lineage == EVERY_PAIR[:6]


def test_in_save_faults_take_a_file_count() -> None:
    """files=N says how many of the save's files come first; crash_in_save takes code=."""
    faults = [Fault("crash_in_save", save=3, files=4, code=9), Fault("hang_in_save", files=0)]
    text = format_faults(faults)
    assert text == "crash_in_save@save=3:code=9:files=4;hang_in_save:files=0"
    assert parse_faults(text) == faults
    assert Fault("hang_in_save").files_before == 2
    for bad, named in [
        ("hang_in_save:files=5", "files=5"),
        ("hang_idle:files=1", "files="),
        ("crash_in_save@step=2", "save=N"),
    ]:
        with pytest.raises(ValueError, match=re.escape(named)):
            parse_fault(bad)


# --------------------------------------------------------------------------- log lines


def test_resume_log_lines_come_in_sd_scripts_order(tmp_path: Path) -> None:
    """resume line, train state line, then the 'running training' block, as sd-scripts prints."""
    tree, first = train(tmp_path, STEP_STATES, [Fault("crash", step=7, code=3)])
    assert first.returncode == 3
    folder = state(tree, 6)
    file = folder / "train_state.json"
    assert f"save train state to {file} at epoch 2 step 6" in unwrap(first.stdout)
    _, second = train(tmp_path, f"{STEP_STATES} --resume {folder}")
    wanted = [
        f"resume training from local state: {folder}",
        f"load train state from {file}: {{'current_epoch': 2, 'current_step': 6}}",
        "running training / 学習開始",
        f"  num batches per epoch / 1epochのバッチ数: {SPE}",
        f"  num epochs / epoch数: {EPOCHS}",
        "  gradient accumulation steps / 勾配を合計するステップ数 = 1",
        f"  total optimization steps / 学習ステップ数: {SPE * EPOCHS}",
        "epoch 2/4",
    ]
    positions = [unwrap(second.stdout).index(line) for line in wanted]
    assert positions == sorted(positions)
    assert (
        f"override steps. steps for {EPOCHS} epochs is / 指定エポックまでのステップ数: 16"
        in unwrap(second.stdout)
    )


def test_initial_step_wins_over_initial_epoch_and_asserts_like_sd_scripts() -> None:
    """--initial_step beats --initial_epoch; without resume the skip says the lr restarts."""
    plan = TrainingPlan(steps_per_epoch=4, max_train_steps=16, num_train_epochs=4)
    logged: list[tuple[str, str]] = []

    def position(**flags: object) -> ResumePosition:
        values = {"initial_epoch": None, "initial_step": None, "skip_until_initial_step": False}
        args = argparse.Namespace(resume=None, **{**values, **flags})
        return resume_position(args, None, plan, lambda text, level: logged.append((level, text)))

    assert position(initial_epoch=3) == ResumePosition(2, 0, 4)
    both = position(initial_epoch=3, initial_step=6, skip_until_initial_step=True)
    assert both == ResumePosition(1, 6, 4) and both.batches_to_discard == 2
    assert both.skipped_epoch_messages() == [
        "skipping epoch 1 because initial_step (multiplied) is 6"
    ]
    assert logged[0][1].startswith("initial_step is specified but not resuming.")
    with pytest.raises(AssertionError, match="max_train_steps should be greater than initial step"):
        position(initial_step=16)


def test_save_last_n_steps_removes_old_step_models(tmp_path: Path) -> None:
    """train_util.get_remove_step_no: --save_last_n_steps prunes step model files too."""
    extra = "--save_every_n_steps 1 --save_last_n_steps 2 --max_train_epochs 1"
    tree, done = train(tmp_path, extra)
    assert done.returncode == 0, done.stdout[-2000:]
    models = sorted(p.name for p in tree.output_dir.glob("my-lora-step*.safetensors"))
    assert models == [f"my-lora-step{step:08d}.safetensors" for step in (2, 3, 4)]
    assert (
        f"removing old checkpoint: {tree.output_dir / 'my-lora-step00000001.safetensors'}"
        in unwrap(done.stdout)
    )
