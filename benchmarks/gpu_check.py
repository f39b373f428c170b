"""The sidecar against a real CUDA trainer on a real NVIDIA GPU, in one command.

    python benchmarks/gpu_check.py

Without a GPU (no CUDA for torch, or no usable NVML) it prints one ``gpu_check: skipped:``
line and exits 0, so it can sit in any CI job. With one, it builds a FluxGym-shaped tree
whose train.sh runs the REAL ``accelerate launch`` on the real-accelerate stand-in of
sd-scripts (tests/real_accelerate/sd_trainer.py: accelerate + a tqdm "steps" bar +
``accelerator.save_state`` every few steps), which accelerate places on the GPU, and runs the
REAL sidecar (``python -m sidecar run``, process mode) on it twice:

- ``hang idle``: after step HANG_STEP the trainer sleeps, the GPU idle, its memory held;
- ``hang busy``: after step HANG_STEP it loops CUDA kernels, the GPU 100% busy, no steps.

For each it reports the detection time (from the hang to ``stall_detected``), the
diagnosis class from that event's ``diagnosis`` field, the health gate's wait for the dead
trainer's GPU memory (``gpu_memory_released``), and whether the resume worked
(``trainer_restarted``, the step of the state ``checkpoint_selected`` chose, then
``training_progressing`` and ``training_completed``); "-" where the sidecar logged no such
field or event. All of it is
bounded (TOTAL_SECONDS) and every process of the trees is killed at the end. Exit status 0
when both runs recovered and completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

REAL_TRAINER = REPO / "tests" / "real_accelerate" / "sd_trainer.py"
sys.path.insert(0, str(REAL_TRAINER.parent))
from stand_in_launch import fluxgym_train_sh  # noqa: E402  (the stand-in's train.sh)

TOTAL_SECONDS = 480.0  # the whole check, both runs
RUN_SECONDS = 210.0  # one sidecar run: CUDA start-up twice, the hang, the resume, the end
HANG_STEP = 10
EPOCHS, BATCHES = 4, 8  # 32 steps of 0.2 s
HANG_AT_FILE = ".gpu_check_hang_at"  # the trainer writes time.time() here when it hangs
BUSY_VARIABLE = "GPU_CHECK_BUSY_AT"

TRAIN_SH = fluxgym_train_sh(EPOCHS)
CADENCE = "--save_every_n_epochs 4 --save_every_n_steps 4"

# sd-scripts/flux_train_network.py of the tree: sd_trainer.py on CUDA, with the time of the
# hang recorded and a busy-GPU hang added (sd_trainer's own faults only sleep or crash).
TRAINER_WRAPPER = """\
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, {trainer_dir!r})
import torch
import sd_trainer

if not torch.cuda.is_available():
    raise SystemExit("gpu_check trainer: torch sees no CUDA device")

BUSY_AT = os.environ.get({busy_variable!r})


def record_hang(folder):
    Path(folder, {hang_at_file!r}).write_text(repr(time.time()) + "\\n")


def keep_gpu_busy():
    # Kernels back to back with a sync after each batch of them: the GPU stays at 100 %,
    # the host waits in cudaStreamSynchronize as it would on a collective that never ends.
    x = torch.randn(4096, 4096, device="cuda")
    while True:
        for _ in range(20):
            x = torch.tanh(x @ x)
        torch.cuda.synchronize()


original_fire = sd_trainer.Faults.fire
original_after_step = sd_trainer.Faults.after_step


def fire(self, item):
    record_hang(self.marker.parent)
    original_fire(self, item)


def after_step(self, step):
    marker = self.marker.parent / ".gpu_check_busy_fired"
    if BUSY_AT and step >= int(BUSY_AT) and not marker.exists():
        marker.write_text("busy\\n")
        record_hang(self.marker.parent)
        print(f"[fault] busy@{{BUSY_AT}}", file=sys.stderr, flush=True)
        keep_gpu_busy()
    original_after_step(self, step)


sd_trainer.Faults.fire = fire
sd_trainer.Faults.after_step = after_step
print(f"gpu_check trainer on {{torch.cuda.get_device_name(0)}}", flush=True)
raise SystemExit(sd_trainer.main())
"""

SETTINGS = {
    "SIDECAR_POLL_INTERVAL": "0.5s",
    # CUDA start-up of the launcher and the trainer, twice per run.
    "SIDECAR_STARTUP_GRACE": "120s",
    "SIDECAR_STALL_TIMEOUT": "10s",
    "SIDECAR_GPU_IDLE_TIMEOUT": "5s",
    "SIDECAR_KILL_GRACE": "5s",
    "SIDECAR_RESTART_BACKOFF": "0s",
    "SIDECAR_GPU_RELEASE_TIMEOUT": "30s",
    "SIDECAR_MAX_RESTARTS": "2",
    "SD_TRAINER_STEP_SECONDS": "0.2",
    "SD_TRAINER_BATCHES": str(BATCHES),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    settings: dict[str, str]


SCENARIOS = (
    Scenario("hang idle", {"SD_TRAINER_FAULTS": f"hang@{HANG_STEP}"}),
    Scenario("hang busy", {BUSY_VARIABLE: str(HANG_STEP)}),
)


@dataclass
class Outcome:
    name: str
    detection: str = "-"
    diagnosis: str = "-"
    memory_wait: str = "-"
    restarted: bool = False
    resumed_from: str = "-"  # the step of the state the relaunch resumed from
    progressing: bool = False  # steps seen after the relaunch
    completed: bool = False
    note: str = ""

    @property
    def recovered(self) -> bool:
        return self.restarted and self.progressing and self.completed


def gpu_absent_reason() -> str | None:
    """Why this machine cannot run the check, or None when it has a usable NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:
        return f"NVML is not usable here ({error})"
    if count == 0:
        return "NVML sees no GPU"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU build, or CUDA_VISIBLE_DEVICES hides them)"
    return None


def build_tree(root: Path) -> Any:
    """A FluxGym tree whose train.sh runs the real accelerate on the CUDA stand-in trainer."""
    from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

    tree = build_fluxgym_tree(root, script_text=TRAIN_SH, extra_trainer_args=CADENCE)
    (tree.root / "sd-scripts" / "flux_train_network.py").write_text(
        TRAINER_WRAPPER.format(
            trainer_dir=str(REAL_TRAINER.parent),
            busy_variable=BUSY_VARIABLE,
            hang_at_file=HANG_AT_FILE,
        )
    )
    launcher = tree.bin_dir / "accelerate"  # the real accelerate CLI, not the simulator's shim
    launcher.write_text(
        f"#!{sys.executable}\n"
        "from accelerate.commands.accelerate_cli import main\n"
        "raise SystemExit(main())\n"
    )
    launcher.chmod(0o755)
    return tree


def run_scenario(scenario: Scenario, root: Path, timeout: float) -> Outcome:
    from sidecar.simulator.harness import event_time, run_sidecar

    outcome = Outcome(scenario.name)
    tree = build_tree(root)
    try:
        run = run_sidecar(tree, settings={**SETTINGS, **scenario.settings}, timeout=timeout)
    except subprocess.TimeoutExpired:
        outcome.note = f"sidecar did not finish within {timeout:.0f} s"
        return outcome
    finally:
        kill_leftovers(tree.root)
    hang_file = tree.output_dir / HANG_AT_FILE
    hang_at = float(hang_file.read_text()) if hang_file.exists() else None
    stalls = run.named("stall_detected")
    if stalls and hang_at is not None:
        outcome.detection = f"{event_time(stalls[0]) - hang_at:.1f}"
    if stalls:
        outcome.diagnosis = diagnosis_class(stalls[0].get("diagnosis"))
    released = run.named("gpu_memory_released")
    not_released = run.named("gpu_memory_not_released")
    if released:
        outcome.memory_wait = f"{float(released[0].get('seconds', 0.0)):.1f}"
    elif not_released:
        outcome.memory_wait = f"not released ({not_released[0].get('seconds', '?')} s)"
    restarts = run.named("trainer_restarted")
    outcome.restarted = bool(restarts)
    if restarts:
        restarted_at = event_time(restarts[0])
        chosen = [e for e in run.named("checkpoint_selected") if event_time(e) <= restarted_at]
        if chosen and chosen[-1].get("step") is not None:
            outcome.resumed_from = str(chosen[-1]["step"])
        outcome.progressing = any(
            event_time(event) > restarted_at for event in run.named("training_progressing")
        )
    outcome.completed = run.exit_code == 0 and bool(run.named("training_completed"))
    if not outcome.recovered:
        log = tree.output_dir / "train.log"
        tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
        outcome.note = f"sidecar exit {run.exit_code}; events {run.names()[-8:]}; {tail!r}"
    if hang_at is None:
        outcome.note = (outcome.note + "; the trainer never reached its hang").lstrip("; ")
    return outcome


def diagnosis_class(value: Any) -> str:
    """The class named by a stall's ``diagnosis`` field, whatever its shape; "-" if absent."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        for key in ("class", "hang_class", "kind", "name"):
            if key in value:
                return str(value[key])
    return str(value)


def kill_leftovers(root: Path) -> None:
    """SIGKILL every process still running something of this tree (by path in its cmdline)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(root) in " ".join(process.info["cmdline"] or ()):
                process.send_signal(signal.SIGKILL)


def print_table(outcomes: list[Outcome]) -> None:
    header = (
        "run",
        "detect s",
        "diagnosis",
        "memory wait s",
        "restarted",
        "resumed from step",
        "progressing",
        "done",
    )
    rows = [
        (
            o.name,
            o.detection,
            o.diagnosis,
            o.memory_wait,
            "yes" if o.restarted else "no",
            o.resumed_from,
            "yes" if o.progressing else "no",
            "yes" if o.completed else "no",
        )
        for o in outcomes
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    for outcome in outcomes:
        if outcome.note:
            print(f"note ({outcome.name}): {outcome.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the trees for inspection")
    options = parser.parse_args(argv)
    reason = gpu_absent_reason()
    if reason is not None:
        print(f"gpu_check: skipped: {reason}")
        return 0
    deadline = time.monotonic() + TOTAL_SECONDS
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    outcomes: list[Outcome] = []
    try:
        for index, scenario in enumerate(SCENARIOS):
            left = deadline - time.monotonic()
            if left < 60:
                outcomes.append(Outcome(scenario.name, note="skipped: out of time"))
                continue
            timeout = min(RUN_SECONDS, left / (len(SCENARIOS) - index))
            print(f"gpu_check: {scenario.name} (up to {timeout:.0f} s)...", flush=True)
            outcomes.append(run_scenario(scenario, work / f"run{index}", timeout))
    finally:
        kill_leftovers(work)
        if options.keep:
            print(f"gpu_check: trees kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(outcomes)
    return 0 if all(outcome.recovered for outcome in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
