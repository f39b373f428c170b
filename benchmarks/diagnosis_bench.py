"""How often the real sidecar names an injected hang right: classification accuracy.

Each case runs the real sidecar (process mode) on a simulated FluxGym run whose trainer
hangs once in one of the simulator's hang classes (``sidecar/simulator/hangs.py``: upstream's
call chains and process shapes), with the stand-in NVML library and the uninterruptible-sleep
library built from ``tests/``. The first ``stall_detected`` event's ``diagnosis`` is compared
with the class the hang is; the run must then recover (or, for a lost GPU, stop with exit
code 5). Measured with the trainer's Python stacks (py-spy, the default) and without them
(``SIDECAR_PYTHON_STACKS=false``: thread states and the section only). Trigger steps vary
with the seed, so no one position is what the rules were tuned on.

    python benchmarks/diagnosis_bench.py [--seeds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree  # noqa: E402
from sidecar.simulator.harness import event_time, run_sidecar  # noqa: E402

# fault (its trigger filled in per seed) -> the class it is
CASES: dict[str, str] = {
    "hang_dataloader@step={step}:once": "dataloader_wait",
    "hang_cuda_sync@step={step}:once": "cuda_sync",
    "hang_busy@step={step}:once": "collective_wait",
    "hang_dstate@step={step}:once": "uninterruptible_io",
    "hang_stopped@step={step}:once": "process_stopped",
    "hang_in_sample@step={step}:once": "hang_in_sampling",
    "hang_in_save@save={save}:once": "hang_in_save",
    "gpu_lost@step={step}:once": "gpu_lost",
}
ARGS = "--save_every_n_steps 4 --sample_every_n_steps 5 --max_train_epochs 8"
SETTINGS = {"SIDECAR_STALL_TIMEOUT": "1.5s", "SIDECAR_GPU_RELEASE_TIMEOUT": "10s"}


@dataclass(frozen=True)
class Case:
    fault: str
    expected: str
    stacks: bool
    diagnosis: str | None  # None: no stall was detected
    basis: str | None
    exit_code: int
    recovered: bool  # restarted and completed (a lost GPU: stopped with exit 5 instead)
    released_seconds: float | None  # the health gate's wait for the GPU memory

    @property
    def right(self) -> bool:
        return self.diagnosis == self.expected


def libraries(folder: Path) -> dict[str, str]:
    """The stand-in NVML and the uninterruptible-sleep library (gcc needed)."""
    from dstate.build import DSTATE_LIBRARY_VARIABLE, build_dstate_library
    from nvml_stub.build import build_fake_nvml

    nvml = build_fake_nvml(folder / "nvml")
    dstate = build_dstate_library(folder / "dstate")
    state = folder / "gpu.state"
    return {
        "LD_LIBRARY_PATH": str(nvml.parent),
        "FAKE_NVML_STATE_FILE": str(state),
        "SIM_GPU_STATE_FILE": str(state),
        DSTATE_LIBRARY_VARIABLE: str(dstate),
    }


def run_case(scratch: Path, fault: str, expected: str, *, stacks: bool) -> Case:
    scratch.mkdir(parents=True)
    environment = libraries(scratch)
    tree = build_fluxgym_tree(
        scratch / "run", fixture="fluxgym-12g-save-state-steps.sh", extra_trainer_args=ARGS
    )
    settings = {**SETTINGS, "SIDECAR_PYTHON_STACKS": "true" if stacks else "false"}
    # The sidecar's own NVML reads the same stand-in the trainer writes.
    settings.update({k: v for k, v in environment.items() if k in ("LD_LIBRARY_PATH",)})
    settings["FAKE_NVML_STATE_FILE"] = environment["FAKE_NVML_STATE_FILE"]
    simulation = {
        "SIM_FAULTS": fault,
        "SIM_GPU_STATE_FILE": environment["SIM_GPU_STATE_FILE"],
        "SIM_DSTATE_LIBRARY": environment["SIM_DSTATE_LIBRARY"],
    }
    run = run_sidecar(tree, settings=settings, simulation=simulation, timeout=120)
    stalls = run.named("stall_detected")
    first = stalls[0] if stalls else {}
    released = run.named("gpu_memory_released")
    if expected == "gpu_lost":
        recovered = run.exit_code == 5 and bool(run.named("gpu_needs_reset"))
    else:
        recovered = (
            run.exit_code == 0
            and bool(run.named("trainer_restarted"))
            and bool(run.named("training_completed"))
        )
    return Case(
        fault=fault,
        expected=expected,
        stacks=stacks,
        diagnosis=first.get("diagnosis"),
        basis=first.get("diagnosis_basis"),
        exit_code=run.exit_code,
        recovered=recovered,
        released_seconds=released[0].get("seconds") if released else None,
    )


def measure(scratch: Path, seeds: int) -> list[Case]:
    cases = []
    for seed in range(seeds):
        step, save = 6 + 3 * seed, 2 + seed
        for template, expected in CASES.items():
            fault = template.format(step=step, save=save)
            for stacks in (True, False):
                name = f"{seed}-{fault.split('@')[0]}-{'stacks' if stacks else 'kernel'}"
                cases.append(run_case(scratch / name, fault, expected, stacks=stacks))
    return cases


def accuracy(cases: list[Case], *, stacks: bool) -> tuple[int, int]:
    chosen = [case for case in cases if case.stacks is stacks]
    return sum(case.right for case in chosen), len(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-diagnosis-") as folder:
        cases = measure(Path(folder), arguments.seeds)
    print(f"| {'fault':<34} | {'expected':<18} | {'stacks':<6} | {'diagnosis':<18} | basis | ok |")
    for case in cases:
        print(
            f"| {case.fault:<34} | {case.expected:<18} | {case.stacks!s:<6} | "
            f"{case.diagnosis or '-':<18} | {case.basis or '-'} | "
            f"{'yes' if case.right else 'NO'}{'' if case.recovered else ' (not recovered)'} |"
        )
    for stacks in (True, False):
        right, total = accuracy(cases, stacks=stacks)
        print(f"{'with' if stacks else 'without'} stacks: {right}/{total} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CASES", "Case", "accuracy", "event_time", "measure"]
