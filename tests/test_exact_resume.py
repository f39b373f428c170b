"""Resume exactly right, every time: the real sidecar on the simulator with sd-scripts' exact
resume rules (global_step restarts at every resume; train_state.json is relative).

The check is the final LoRA's lineage, the (epoch, batch) pairs it was trained on: equal to
an uninterrupted run's after any number of recoveries means no epoch trained again and no
batch skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_sidecar

from sidecar.simulator import Fault, format_faults, read_lineage, uninterrupted_lineage
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4
EPOCHS = 16  # FluxGym's default --max_train_epochs
UNINTERRUPTED = uninterrupted_lineage(STEPS_PER_EPOCH, EPOCHS)
ENOUGH_RESTARTS = {"SIDECAR_MAX_RESTARTS": "6"}


def final_lineage(tree: FluxgymTree) -> list[tuple[int, int]]:
    return read_lineage(tree.output_dir / f"{tree.name}.safetensors")


def recoveries(tree: FluxgymTree) -> list[dict[str, object]]:
    ledger = json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())
    return ledger["recoveries"]


def test_three_faults_with_fluxgym_epoch_cadence_end_exactly_like_an_uninterrupted_run(
    fluxgym: FluxgymTree,
) -> None:
    """Idle hang, busy hang, crash (states every 4 epochs): the second and third resumes are
    the ones sd-scripts' own rule gets wrong; the final lineage is the uninterrupted one."""
    faults = format_faults(
        [
            Fault("hang_idle", step=22, run=1),
            Fault("hang_busy", step=20, run=2),
            Fault("crash", step=10, run=3),
        ]
    )
    run = run_sidecar(
        fluxgym, settings=ENOUGH_RESTARTS, simulation={"SIM_FAULTS": faults}, timeout=120
    )
    assert run.exit_code == 0, run.names()
    assert len(recoveries(fluxgym)) == 3
    positions = [event["initial_step"] for event in run.named("checkpoint_selected")]
    assert positions == [16, 32, 32]  # absolute steps of the epoch-4 and epoch-8 states
    assert not run.named("resume_failed")
    assert final_lineage(fluxgym) == UNINTERRUPTED


def test_mid_epoch_step_states_that_come_round_again_resume_exactly(tmp_path: Path) -> None:
    """States every 5 steps (mid-epoch, names reused after each resume, overwritten in
    place): three recoveries, each from the absolute step of the newest state."""
    tree = build_fluxgym_tree(
        tmp_path / "fluxgym", extra_trainer_args="--save_every_n_steps 5 --save_state"
    )
    faults = format_faults(
        [
            Fault("hang_idle", step=13, run=1),
            Fault("hang_busy", step=12, run=2),
            Fault("crash", step=9, run=3),
        ]
    )
    run = run_sidecar(tree, settings=ENOUGH_RESTARTS, simulation={"SIM_FAULTS": faults})
    assert run.exit_code == 0, run.names()
    positions = [event["initial_step"] for event in run.named("checkpoint_selected")]
    assert positions == [10, 18, 21]
    assert final_lineage(tree) == UNINTERRUPTED


def test_a_hang_in_the_middle_of_an_in_place_overwrite_is_never_loaded(tmp_path: Path) -> None:
    """The second attempt's first save overwrites the first attempt's step-5 folder and hangs
    after two files: that folder is mixed, rejected with the reason, and the older state
    is used; the run still ends exactly."""
    tree = build_fluxgym_tree(
        tmp_path / "fluxgym", extra_trainer_args="--save_every_n_steps 5 --save_state"
    )
    faults = format_faults(
        [Fault("hang_idle", step=11, run=1), Fault("hang_in_save", save=1, files=2, run=2)]
    )
    run = run_sidecar(tree, settings=ENOUGH_RESTARTS, simulation={"SIM_FAULTS": faults})
    assert run.exit_code == 0, run.names()
    second = run.named("checkpoint_selected")[1]
    rejected = {Path(r["checkpoint"]).name: r["problems"] for r in second["rejected"]}
    assert any("mixed" in problem for problem in rejected[f"{tree.name}-step00000005-state"])
    assert Path(second["checkpoint"]).name == f"{tree.name}-step00000010-state"
    assert final_lineage(tree) == UNINTERRUPTED


def test_an_earlier_finished_run_of_the_same_name_is_left_alone(tmp_path: Path) -> None:
    """A finished run lies in the folder; FluxGym writes train.sh for a new run (other
    settings): the sidecar trains it, resumes only from its own states, and the earlier
    final model does not count as this run's completion."""
    root = tmp_path / "fluxgym"
    first = build_fluxgym_tree(root, extra_trainer_args="--save_every_n_steps 5 --save_state")
    assert run_sidecar(first).exit_code == 0
    earlier_states = {p.name for p in first.output_dir.glob("*-state")}
    second = build_fluxgym_tree(
        root, extra_trainer_args="--save_every_n_steps 3 --save_state --seed 7"
    )
    run = run_sidecar(
        second, simulation={"SIM_FAULTS": format_faults([Fault("crash", step=8, run=2)])}
    )
    assert run.exit_code == 0, run.names()
    assert not [e for e in run.named("training_completed") if e.get("launched") is False]
    assert run.named("earlier_run_files")
    (selected,) = run.named("checkpoint_selected")
    assert Path(selected["checkpoint"]).name == f"{second.name}-step00000006-state"
    assert selected["initial_step"] == 6
    assert final_lineage(second) == UNINTERRUPTED
    assert earlier_states <= {p.name for p in second.output_dir.glob("*-state")}  # kept


def test_a_sidecar_restarted_after_this_run_completed_never_trains_again(
    fluxgym: FluxgymTree,
) -> None:
    assert run_sidecar(fluxgym).exit_code == 0
    model = fluxgym.output_dir / f"{fluxgym.name}.safetensors"
    written = model.stat().st_mtime_ns
    again = run_sidecar(fluxgym)
    assert again.exit_code == 0
    assert [e["launched"] for e in again.named("training_completed")] == [False]
    assert model.stat().st_mtime_ns == written


def test_lost_work_is_bounded_by_a_denser_state_cadence(fluxgym: FluxgymTree) -> None:
    """States every 4 epochs (16 steps of 0.05 s) could lose 0.8 s of training, over a
    0.5 s bound: once the step time is known the next launch saves about every 8 steps
    (keeping twice that of step states), so the second hang loses less than the bound."""
    faults = format_faults([Fault("hang_idle", step=46, run=1), Fault("hang_idle", step=13, run=2)])
    run = run_sidecar(
        fluxgym,
        settings={**ENOUGH_RESTARTS, "SIDECAR_MAX_LOST_WORK": "0.5s"},
        simulation={"SIM_FAULTS": faults},
    )
    assert run.exit_code == 0, run.names()
    (added,) = run.named("save_cadence_added")
    # About 8: the most steps that fit in 80 % of the bound (a margin for wandering step
    # times); the logged step time is rounded to the millisecond.
    every, step = added["save_every_n_steps"], added["step_seconds"]
    assert every * (step - 0.0005) <= 0.4 < (every + 1) * (step + 0.0005)
    assert added["save_last_n_steps_state"] == 2 * every
    assert added["state_every_steps"] == 16
    command = fluxgym.train_script.read_text()
    assert "--save_every_n_steps" in command and "--save_last_n_steps_state" in command
    first, second = run.named("checkpoint_selected")
    hang_at = [event["last_step"] for event in run.named("stall_detected")]
    lost_first = 46 - first["initial_step"]  # the first attempt's own step counter is absolute
    lost_second = (first["initial_step"] + hang_at[1]) - second["initial_step"]
    assert lost_first * 0.05 > 0.5 >= lost_second * 0.05
    assert final_lineage(fluxgym) == UNINTERRUPTED


def test_a_users_initial_epoch_is_respected_then_replaced_by_the_exact_step(
    tmp_path: Path,
) -> None:
    """The user starts at epoch 2 (`--initial_epoch 2`: sd-scripts skips epoch 1). The first
    attempt runs as they asked; the relaunch replaces it by the absolute step of the newest
    state (the end of epoch 4: 16 = 4 skipped + its own 12), shown in the diff, and the run
    ends as theirs would have."""
    tree = build_fluxgym_tree(
        tmp_path / "fluxgym",
        extra_trainer_args="--initial_epoch 2 --save_every_n_steps 5 --save_state",
    )
    faults = format_faults([Fault("hang_idle", step=13, run=1)])
    run = run_sidecar(tree, settings=ENOUGH_RESTARTS, simulation={"SIM_FAULTS": faults})
    assert run.exit_code == 0, run.names()
    (selected,) = run.named("checkpoint_selected")
    assert Path(selected["checkpoint"]).name == f"{tree.name}-000004-state"
    assert (selected["step"], selected["initial_step"]) == (12, 16)
    rewrite = next(e for e in run.named("train_script_rewritten") if e.get("resume"))
    assert any(line.startswith("-") and "--initial_epoch" in line for line in rewrite["diff"])
    assert "--initial_epoch" not in tree.train_script.read_text()
    assert final_lineage(tree) == UNINTERRUPTED[STEPS_PER_EPOCH:]
