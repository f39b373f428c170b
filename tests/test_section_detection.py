"""Section-aware detection, the default, on the real sidecar supervising the simulator.

The simulated sd-scripts prints what the real one prints before each section ("generating
sample images at step N", "saving state at step N") and then pauses silently, as sampling and
saving do. Time-scaled: steps of 0.05 s, a 2.5 s silent sampling, a 1.2 s silent save; the
training floor 0.6 s and the ceiling 6 s stand for the defaults' 1 min and 15 min.
"""

from __future__ import annotations

import pytest
from conftest import run_sidecar

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

pytestmark = pytest.mark.slow

ARGS = "--save_every_n_steps 50 --sample_every_n_steps 60 --max_train_epochs 60"
SETTINGS = {
    "SIDECAR_STALL_TIMEOUT": "auto",
    "SIDECAR_STALL_TIMEOUT_FLOOR": "0.6s",
    "SIDECAR_STALL_TIMEOUT_CEILING": "6s",
    "SIDECAR_STARTUP_GRACE": "4s",
}
SIMULATION = {
    "SIM_STEPS_PER_EPOCH": "4",
    "SIM_STEP_SECONDS": "0.05",
    "SIM_SAMPLE_SECONDS": "2.5",
    "SIM_SAVE_SECONDS": "1.2",
}


def _tree(root):
    return build_fluxgym_tree(
        root, fixture="fluxgym-12g-save-state-steps.sh", extra_trainer_args=ARGS
    )


def test_long_silent_sampling_and_saves_are_not_stalls(tmp_path):
    """Every sampling is silent for 4 x the training floor, every save for 2 x: none is taken
    for a hang, because each is announced and gets its own budget."""
    tree = _tree(tmp_path / "healthy")
    run = run_sidecar(tree, settings=SETTINGS, simulation={**SIMULATION, "SIM_FAULTS": ""})
    assert run.exit_code == 0, run.stderr[-2000:]
    assert run.named("stall_detected") == [], run.named("stall_detected")
    assert run.named("training_completed")


def test_a_hang_in_a_training_step_is_caught_near_the_floor(tmp_path):
    """After the step time is learned, a hang inside a step is caught at the training floor,
    well before the ceiling a silent sampling may take; the verdict names the section."""
    tree = _tree(tmp_path / "hung")
    run = run_sidecar(
        tree,
        settings=SETTINGS,
        simulation={**SIMULATION, "SIM_FAULTS": "hang_idle@step=200:once"},
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    (stall,) = run.named("stall_detected")
    assert stall["section"] == "training", stall
    assert stall["last_step"] == 200
    assert stall["stall_timeout"] < 2.0, stall  # the floor, not the 6 s ceiling
    assert stall["seconds_since_progress"] < 3.0, stall
    assert "section training" in stall["reason"]
    assert run.named("trainer_restarted") and run.named("training_completed")


def test_a_trainer_that_announces_a_save_and_hangs_in_it(tmp_path):
    """ "saving state at step N" and then nothing: judged by the saves' learned allowance
    (3 x the longest save, well under the ceiling), and diagnosed from the stacks as a hang
    inside the save."""
    tree = _tree(tmp_path / "save")
    run = run_sidecar(
        tree,
        settings=SETTINGS,
        simulation={**SIMULATION, "SIM_FAULTS": "hang_in_save@save=3:once"},
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    (stall,) = run.named("stall_detected")
    assert stall["section"] == "saving", stall
    assert stall["diagnosis"] == "hang_in_save" and stall["diagnosis_basis"] == "stacks"
    assert stall["stall_timeout"] < 6.0, stall  # learned from two saves, not the ceiling
    assert run.named("trainer_restarted") and run.named("training_completed")
