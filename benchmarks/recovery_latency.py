"""Detection and recovery latency of process mode, per fault scenario, on the simulator.

Runs the real ``python -m sidecar run`` against the simulated FluxGym trainer for each
scenario and prints, from the sidecar's own JSON events:

- quiet: seconds without progress when ``stall_detected`` fired (the stall onset is the
  last progress the sidecar observed, so the true onset is at most one poll earlier);
- detect→running: ``stall_detected``/``trainer_crashed`` to ``trainer_restarted``.

Usage: ``python benchmarks/recovery_latency.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

SETTINGS = {
    "SIDECAR_POLL_INTERVAL": "0.2s",
    "SIDECAR_STALL_TIMEOUT": "2s",
    "SIDECAR_GPU_IDLE_TIMEOUT": "1h",
    "SIDECAR_STARTUP_GRACE": "4s",
    "SIDECAR_KILL_GRACE": "2s",
    "SIDECAR_RESTART_BACKOFF": "0s",
    "SIDECAR_CHECKPOINT_SETTLE": "0.5s",
    "SIDECAR_LOG_FORMAT": "json",
    "SIDECAR_ECHO_TRAINER_OUTPUT": "false",
}
SIMULATION = {"SIM_STEPS_PER_EPOCH": "4", "SIM_STEP_SECONDS": "0.05", "SIM_STARTUP_SECONDS": "0.2"}
SCENARIOS = {
    "hang, idle CPU": "hang_idle@step=20:once",
    "hang, busy CPU": "hang_busy@step=20:once",
    "crash mid-run": "crash@step=20:code=7:once",
    "hang inside a state save": "hang_in_save@save=3:once",
}


def run_once(fault: str) -> tuple[float | None, float, int]:
    with tempfile.TemporaryDirectory() as folder:
        tree = build_fluxgym_tree(
            Path(folder) / "fluxgym", extra_trainer_args="--save_every_n_steps 6"
        )
        env = {
            **os.environ,
            **tree.env({**SIMULATION, "SIM_FAULTS": fault}),
            **SETTINGS,
            "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
        }
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    verdict = next(e for e in events if e["event"] in ("stall_detected", "trainer_crashed"))
    restarted = next(e for e in events if e["event"] == "trainer_restarted")
    seconds = (_when(restarted) - _when(verdict)).total_seconds()
    quiet = verdict.get("seconds_since_progress") if verdict["event"] == "stall_detected" else None
    return quiet, seconds, result.returncode


def _when(event: dict) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    print(f"stall timeout 2 s, poll 0.2 s, kill grace 2 s; {repeat} runs each; min / median / max")
    print(f"{'scenario':<26} {'quiet at verdict (s)':<24} {'verdict -> running (s)':<24} exit")
    for name, fault in SCENARIOS.items():
        runs = [run_once(fault) for _ in range(repeat)]
        quiet = [q for q, _, _ in runs if q is not None]
        recovery = [r for _, r, _ in runs]
        codes = sorted({c for _, _, c in runs})
        print(f"{name:<26} {_spread(quiet):<24} {_spread(recovery):<24} {codes}")


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a (exit seen)"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


if __name__ == "__main__":
    main()
