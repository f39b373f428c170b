"""The real sidecar resuming a trainer built on the REAL accelerate and torch (CPU).

``sd_trainer.py`` beside this file follows sd-scripts' save/load hooks and resume rules
(train_network.py at 48d368f, see its docstring); FluxGym's launch line starts it
(``accelerate launch --mixed_precision bf16 --num_cpu_threads_per_process 1
sd-scripts/flux_train_network.py ...``). The final model records the LINEAGE: AdamW's own step
count (restored by ``load_state`` from optimizer.bin) and every (epoch, batch) pair trained
(restored from model.safetensors). A recovered run is exact only when both, and the weights,
equal the uninterrupted run's.

sd-scripts' own rule restarts ``global_step`` at 0 on every resume, so from the second
recovery on ``train_state.json`` is relative and the run retrains epochs (REFERENCE section
2); a mid-epoch state retrains its partial epoch unless the relaunch passes
``--initial_step <absolute> --skip_until_initial_step``. These tests assert exactness all the
same: they fail until the sidecar writes that flag pair on every relaunch. The kill inside a
save can also leave a folder that two saves wrote (new weights and train_state.json beside an
older optimizer.bin): every file present and well-formed; resuming from it shows as an
optimizer step count that disagrees with the number of pairs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import FAST_SETTINGS, run_sidecar
from stand_in_launch import fluxgym_train_sh

from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import SidecarRun

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where they are used: imported at collection they would
# make the whole pytest process half a gigabyte, and every child it forks with it (a memory
# bound on a sidecar command elsewhere measures the child's peak).

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TRAINER = Path(__file__).resolve().parent / "sd_trainer.py"
EPOCHS = 4
BATCHES = 8  # steps per epoch: batch size 1, no gradient accumulation, one process

TRAIN_SH = fluxgym_train_sh(EPOCHS)
EPOCH_STATES = "--save_every_n_epochs 1"
# Mid-epoch states only: FluxGym's default --save_every_n_epochs 4 is the last epoch here, for
# which sd-scripts saves no epoch state (train_network.py ~1692).
STEP_STATES = "--save_every_n_epochs 4 --save_every_n_steps 3 --save_last_n_steps_state 6"

SETTINGS = {
    **FAST_SETTINGS,
    # Starting torch and accelerate twice (launcher, then trainer) takes seconds on 2 cores.
    "SIDECAR_STARTUP_GRACE": "60s",
    # Above the seconds the two processes take to exit after "model saved." (interpreter
    # teardown of torch: ~2 s alone, more on 2 busy cores): a shorter timeout calls the finished
    # run's exit a stall and resumes it.
    "SIDECAR_STALL_TIMEOUT": "8s",
    "SIDECAR_MAX_RESTARTS": "6",
    "SD_TRAINER_STEP_SECONDS": "0.05",
    "SD_TRAINER_BATCHES": str(BATCHES),
}
SIDECAR_TIMEOUT = 120.0


@dataclass(frozen=True)
class Lineage:
    """What the final model says was trained."""

    optimizer_step: int
    pairs: list[tuple[int, int]]
    weight: torch.Tensor
    bias: torch.Tensor

    def summary(self) -> str:
        per_epoch = Counter(epoch for epoch, _ in self.pairs)
        epochs = ", ".join(f"epoch {e}: {per_epoch[e]}" for e in sorted(per_epoch))
        return f"optimizer step {self.optimizer_step}, {len(self.pairs)} pairs ({epochs})"


def build_real_tree(root: Path, cadence: str) -> FluxgymTree:
    """A FluxGym tree whose train.sh runs the real ``accelerate launch`` on sd_trainer.py."""
    tree = build_fluxgym_tree(root, script_text=TRAIN_SH, extra_trainer_args=cadence)
    (tree.root / "sd-scripts" / "flux_train_network.py").write_text(
        f"import runpy\nrunpy.run_path({str(TRAINER)!r}, run_name='__main__')\n"
    )
    # The real accelerate CLI of this interpreter, in place of the simulator's shim.
    launcher = tree.bin_dir / "accelerate"
    launcher.write_text(
        f"#!{sys.executable}\n"
        "from accelerate.commands.accelerate_cli import main\n"
        "raise SystemExit(main())\n"
    )
    launcher.chmod(0o755)
    return tree


def read_lineage(model_file: Path) -> Lineage:
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as model:
        metadata = model.metadata()
        weight = model.get_tensor("linear.weight")
        bias = model.get_tensor("linear.bias")
        buffer = model.get_tensor("lineage")
        count = int(model.get_tensor("lineage_len").item())
    pairs = [(int(e), int(b)) for e, b in json.loads(metadata["lineage_pairs"])]
    # The metadata and the buffer are two records of one list; they must agree.
    assert pairs == [tuple(row) for row in buffer[:count].tolist()], "lineage records disagree"
    return Lineage(int(metadata["lineage_optimizer_step"]), pairs, weight, bias)


def train(tmp_path: Path, cadence: str, faults: str = "") -> tuple[FluxgymTree, SidecarRun]:
    tree = build_real_tree(tmp_path / "fluxgym", cadence)
    run = run_sidecar(
        tree, settings={**SETTINGS, "SD_TRAINER_FAULTS": faults}, timeout=SIDECAR_TIMEOUT
    )
    return tree, run


def assert_completed(tree: FluxgymTree, run: SidecarRun, *, restarts: int) -> None:
    log = tree.output_dir / "train.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no train.log)"
    assert run.exit_code == 0, f"sidecar exit {run.exit_code}\n{run.stderr[-2000:]}\n{tail}"
    assert run.named("training_completed"), run.names()
    assert len(run.named("trainer_restarted")) == restarts, run.names()
    assert (tree.output_dir / "my-lora.safetensors").is_file()


def assert_same_lineage(recovered: Lineage, baseline: Lineage) -> None:
    report = f"recovered: {recovered.summary()}; uninterrupted: {baseline.summary()}"
    # The pairs come from model.safetensors, the step count from optimizer.bin: they disagree
    # when the run resumed from a folder that two saves wrote (REFERENCE section 2).
    assert recovered.optimizer_step == len(recovered.pairs), f"mixed-save state? {report}"
    assert recovered.optimizer_step == baseline.optimizer_step, report
    assert recovered.pairs == baseline.pairs, report
    import torch

    assert torch.equal(recovered.weight, baseline.weight), report
    assert torch.equal(recovered.bias, baseline.bias), report


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """The uninterrupted run under the sidecar: the lineage every recovery must reproduce."""
    tree, run = train(tmp_path_factory.mktemp("baseline"), EPOCH_STATES)
    assert_completed(tree, run, restarts=0)
    return read_lineage(tree.output_dir / "my-lora.safetensors")


def fired_faults(tree: FluxgymTree) -> list[str]:
    marker = tree.output_dir / ".sd_trainer_faults_fired"
    return marker.read_text().split() if marker.exists() else []


def test_uninterrupted_run_trains_every_batch_once(baseline: Lineage) -> None:
    expected = [(epoch, batch) for epoch in range(1, EPOCHS + 1) for batch in range(BATCHES)]
    assert baseline.pairs == expected, baseline.summary()
    assert baseline.optimizer_step == EPOCHS * BATCHES


def test_one_crash_after_an_epoch_state_resumes_exactly(tmp_path: Path, baseline: Lineage) -> None:
    """The first recovery from an epoch-end state: sd-scripts' own rule is already exact."""
    tree, run = train(tmp_path, EPOCH_STATES, faults="crash@13")
    assert_completed(tree, run, restarts=1)
    assert fired_faults(tree) == ["crash@13"]
    assert_same_lineage(read_lineage(tree.output_dir / "my-lora.safetensors"), baseline)


def test_hang_crash_and_kill_mid_save_with_epoch_states(tmp_path: Path, baseline: Lineage) -> None:
    """Three recoveries from epoch-end states; the third fault dies inside a state save after
    model.safetensors (a folder with train_state.json and weights only, or - where epochs are
    retrained - new weights over an older save's optimizer)."""
    faults = "hang@11,crash@19,save_kill@24"
    tree, run = train(tmp_path, EPOCH_STATES, faults=faults)
    assert_completed(tree, run, restarts=3)
    assert sorted(fired_faults(tree)) == sorted(faults.split(","))
    assert_same_lineage(read_lineage(tree.output_dir / "my-lora.safetensors"), baseline)


def test_hang_crash_and_kill_mid_save_with_step_states(tmp_path: Path, baseline: Lineage) -> None:
    """Three recoveries from mid-epoch step states (every 3 steps, old ones pruned)."""
    faults = "hang@7,crash@17,save_kill@22"
    tree, run = train(tmp_path, STEP_STATES, faults=faults)
    assert_completed(tree, run, restarts=3)
    assert sorted(fired_faults(tree)) == sorted(faults.split(","))
    assert_same_lineage(read_lineage(tree.output_dir / "my-lora.safetensors"), baseline)
