"""``training-sidecar demo``: a FluxGym run that hangs, recovered before your eyes.

Builds a temporary FluxGym-like tree around the simulated trainer, with
FluxGym's own default train.sh (which lacks ``--save_state``), makes the first
run hang with an idle CPU half-way through, and runs the real sidecar on it as
a child process. Its JSON events are shown as short lines, then summarised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar import events
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

DEMO_SETTINGS = {
    "SIDECAR_POLL_INTERVAL": "0.5s",
    "SIDECAR_STALL_TIMEOUT": "4s",
    "SIDECAR_GPU_IDLE_TIMEOUT": "4s",
    "SIDECAR_STARTUP_GRACE": "10s",
    "SIDECAR_KILL_GRACE": "2s",
    "SIDECAR_RESTART_BACKOFF": "0s",
    "SIDECAR_CHECKPOINT_SETTLE": "1s",
    "SIDECAR_LOG_FORMAT": "json",
    "SIDECAR_ECHO_TRAINER_OUTPUT": "false",
    # The demo must run beside a real sidecar, which holds the default port.
    "SIDECAR_HTTP_PORT": "0",
}
SIMULATION = {
    "SIM_STEPS_PER_EPOCH": "4",
    "SIM_STEP_SECONDS": "0.15",
    "SIM_STARTUP_SECONDS": "1",
    "SIM_FAULTS": "hang_idle@step=40:once",
}
_SHOWN = {
    events.SIDECAR_STARTED: lambda e: f"watching {e.get('train_script')}",
    events.TRAIN_SCRIPT_REWRITTEN: lambda e: " ".join(
        line for line in e.get("diff", []) if line.startswith("+") and not line.startswith("+++")
    ),
    events.TRAINER_STARTED: lambda e: f"trainer launched (pid {e.get('pid')})",
    events.STALL_DETECTED: lambda e: (
        f"{e.get('reason')}; last step {e.get('last_step')}/"
        f"{e.get('total_steps')}, trainer CPU {e.get('trainer_cpu_seconds')} s"
    ),
    events.TRAINER_CRASHED: lambda e: e.get("reason", ""),
    events.CHECKPOINT_SELECTED: lambda e: (
        f"{Path(e['checkpoint']).name if e.get('checkpoint') else 'none'} ({e.get('reason')})"
    ),
    events.TRAINER_RESTARTED: lambda e: (
        f"restart {e.get('restarts')}, budget left {e.get('budget_left')}"
    ),
    events.TRAINING_COMPLETED: lambda e: e.get("reason", ""),
    events.GAVE_UP: lambda e: e.get("reason", ""),
    events.CONFIGURATION_INVALID: lambda e: e.get("reason", ""),
    events.RESTART_FAILED: lambda e: e.get("reason", ""),
}


def run_demo(*, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    try:
        tree = build_fluxgym_tree(root / "fluxgym")
        print(f"demo: simulated FluxGym at {tree.root}; the first run will hang at step 40\n")
        seen = _watch(tree.train_script, tree.env({**SIMULATION, **DEMO_SETTINGS}))
        return _summarise(seen, tree.output_dir)
    finally:
        if keep:
            print(f"\ndemo folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _watch(train_script: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        **env,
        "SIDECAR_TRAIN_SCRIPT": str(train_script),
        # Its own heartbeat: a real sidecar on this machine keeps the default one.
        "SIDECAR_HEARTBEAT_FILE": str(train_script.parent / ".sidecar" / "heartbeat"),
    }
    command = [sys.executable, "-m", "sidecar", "run"]
    seen: list[dict[str, Any]] = []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as sidecar:
        assert sidecar.stdout is not None
        try:
            for line in sidecar.stdout:
                event = _parse(line)
                if event is None:
                    continue
                seen.append(event)
                render = _SHOWN.get(event["event"])
                if render:
                    print(f"{_clock(event)}  {event['event']:<22} {render(event)}", flush=True)
        except KeyboardInterrupt:
            sidecar.terminate()
        code = sidecar.wait()
        if code != 0 and sidecar.stderr is not None:
            print(sidecar.stderr.read()[-2000:], file=sys.stderr)
        seen.append({"event": "_exit", "code": code})
    return seen


def _summarise(seen: list[dict[str, Any]], output_dir: Path) -> int:
    code = seen[-1]["code"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in seen:
        by_name.setdefault(event["event"], []).append(event)
    print("\nsummary")
    for stall, restart in zip(
        by_name.get(events.STALL_DETECTED, []),
        by_name.get(events.TRAINER_RESTARTED, []),
        strict=False,
    ):
        recovery = _seconds_between(stall, restart)
        print(
            f"  stall noticed after {stall.get('seconds_since_progress')} s without progress; "
            f"trainer running again {recovery:.2f} s later"
        )
    finals = sorted(p.name for p in output_dir.glob("*.safetensors"))
    states = sorted(p.name for p in output_dir.glob("*-state"))
    print(f"  restarts: {len(by_name.get(events.TRAINER_RESTARTED, []))}, sidecar exit code {code}")
    print(f"  state folders: {', '.join(states) or 'none'}")
    print(f"  final model present: {any(name == 'my-lora.safetensors' for name in finals)}")
    return int(code)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _clock(event: dict[str, Any]) -> str:
    stamp = event.get("timestamp")
    return (
        datetime.fromisoformat(stamp).strftime("%H:%M:%S") if stamp else time.strftime("%H:%M:%S")
    )


def _seconds_between(first: dict[str, Any], second: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(second["timestamp"]) - datetime.fromisoformat(first["timestamp"])
    ).total_seconds()
