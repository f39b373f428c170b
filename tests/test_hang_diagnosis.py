"""A diagnosis for every hang, repeats and remedies, the health gate and the futile stop, on the
real sidecar (process mode) supervising the simulator's hang classes, with the stand-in NVML
library (the trainer lists itself on the GPU; the stand-in frees it when it exits).

The classification of every hang class is measured by ``benchmarks/diagnosis_bench.py``
(CI runs it through ``bench.py --quick --check``); here are the behaviours around it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_sidecar

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import diagnosis_bench  # noqa: E402  (the benchmark's runner: libraries and one case)


def _tree(root: Path, args: str):
    return build_fluxgym_tree(
        root, fixture="fluxgym-12g-save-state-steps.sh", extra_trainer_args=args
    )


def _run(tmp_path: Path, faults: str, *, args: str, **settings: str):
    libraries = diagnosis_bench.libraries(tmp_path / "libraries")
    tree = _tree(tmp_path / "run", args)
    run = run_sidecar(
        tree,
        settings={
            "SIDECAR_STALL_TIMEOUT": "1.5s",
            "SIDECAR_MAX_LOST_WORK": "0",
            "LD_LIBRARY_PATH": libraries["LD_LIBRARY_PATH"],
            "FAKE_NVML_STATE_FILE": libraries["FAKE_NVML_STATE_FILE"],
            **settings,
        },
        simulation={
            "SIM_FAULTS": faults,
            "SIM_GPU_STATE_FILE": libraries["SIM_GPU_STATE_FILE"],
            "SIM_DSTATE_LIBRARY": libraries["SIM_DSTATE_LIBRARY"],
        },
        timeout=150,
    )
    return tree, run


def test_a_repeated_dataloader_deadlock_is_remedied_and_the_run_completes(tmp_path):
    """FluxGym's 2 persistent workers deadlock at step 6 of every run. The first run began
    from nothing; the second and third resume from the step-4 state: the third is the same
    class from the same checkpoint again, told with its mitigation and, with
    SIDECAR_REMEDIATE, applied; with --max_data_loader_n_workers 0 there is no worker to
    deadlock, and the fourth run completes."""
    tree, run = _run(
        tmp_path,
        "hang_dataloader@step=6",
        args="--save_every_n_steps 4 --max_train_epochs 4",
        SIDECAR_REMEDIATE="true",
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    stalls = run.named("stall_detected")
    assert [stall["diagnosis"] for stall in stalls] == ["dataloader_wait"] * 3
    assert all(stall["diagnosis_basis"] == "stacks" for stall in stalls)
    (repeat,) = run.named("hang_repeated")
    assert repeat["times"] == 2 and repeat["checkpoint"].endswith("my-lora-step00000004-state")
    assert "--max_data_loader_n_workers 0" in repeat["mitigation"]
    (remedy,) = run.named("remedy_applied")
    assert any("--max_data_loader_n_workers" in line for line in remedy["diff"] if line[0] == "+")
    command = parse_train_script(tree.train_script.read_text())
    assert command.option("--max_data_loader_n_workers") == "0"
    assert not command.has_option("--persistent_data_loader_workers")
    original = parse_train_script((tree.output_dir / "train.sh.orig").read_text())
    assert original.option("--max_data_loader_n_workers") == "2", "the user's script is kept"
    assert run.named("training_completed")
    assert not run.named("new_run_detected"), "the remedied script is the same run"
    # Each relaunch waited for the killed trainer's GPU memory, freed when it exited.
    released = run.named("gpu_memory_released")
    assert len(released) == 3 and all(event["seconds"] < 5 for event in released)
    assert run.names().index("gpu_memory_released") < run.names().index("trainer_restarted")


def test_without_remediate_the_mitigation_is_only_told(tmp_path):
    tree, run = _run(
        tmp_path,
        ";".join(f"hang_dataloader@step=6:run={n}" for n in (1, 2, 3)),
        args="--save_every_n_steps 4 --max_train_epochs 4",
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    (repeat,) = run.named("hang_repeated")
    assert "SIDECAR_REMEDIATE=true" in repeat["remedy"]
    assert run.named("remedy_applied") == []
    command = parse_train_script(tree.train_script.read_text())
    assert command.option("--max_data_loader_n_workers") == "2"


def test_recoveries_that_never_get_past_their_checkpoint_stop_with_exit_4(tmp_path):
    """After the first hang every relaunch hangs before its first step: two from the newest
    state (then quarantined), one from the older: the third futile recovery stops the run
    with "no progress", well inside the restart budget."""
    faults = ";".join(
        ["hang_stopped@step=9:run=1"] + [f"hang_dataloader@step=0:run={n}" for n in (2, 3, 4, 5)]
    )
    _, run = _run(
        tmp_path,
        faults,
        args="--save_every_n_steps 4 --max_train_epochs 4",
        SIDECAR_MAX_RESTARTS="10",
    )
    assert run.exit_code == 4, run.stderr[-2000:]
    (gave_up,) = run.named("gave_up")
    assert gave_up["stopped_because"] == "no progress"
    assert "SIDECAR_MAX_FUTILE_RECOVERIES=3" in gave_up["reason"]
    assert len(run.named("trainer_restarted")) == 3
    diagnoses = [stall["diagnosis"] for stall in run.named("stall_detected")]
    assert diagnoses[0] == "process_stopped" and diagnoses[1:] == ["dataloader_wait"] * 3


def test_a_lost_gpu_is_not_relaunched_onto(tmp_path):
    """The card falls off the bus (NVML: GPU is lost): diagnosed, and the health gate stops
    the run with exit code 5 instead of relaunching."""
    case = diagnosis_bench.run_case(
        tmp_path / "lost", "gpu_lost@step=6:once", "gpu_lost", stacks=True
    )
    assert case.diagnosis == "gpu_lost" and case.basis == "nvml"
    assert case.exit_code == 5 and case.recovered
