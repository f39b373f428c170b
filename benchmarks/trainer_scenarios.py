"""Per trainer: what its scenarios did, read back from the files each run left behind.

Runs the slow scenario tests of every trainer package (``tests/trainers/<trainer>``, the real
sidecar on a real HF Trainer or on a stand-in) into a kept temporary folder, then reads each
run's ledger (``.sidecar/state.json``) and incident bundles: the recoveries and what each
resumed from, the step each attempt started at, the states set aside, and for a stall the
quiet time the verdict saw. The tests assert the behaviour; this prints the figures.

    .venv/bin/python benchmarks/trainer_scenarios.py [trainer ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("hf_trainer", "diffusers", "ai_toolkit", "onetrainer")


def run_scenarios(trainer: str, base: Path) -> tuple[int, float]:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "slow",
            "-p",
            "no:cacheprovider",
            f"--basetemp={base}",
            f"tests/trainers/{trainer}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr)
    return result.returncode, time.monotonic() - started


def stall_quiet_seconds(state_dir: Path) -> list[float]:
    quiet = []
    for verdict in sorted(state_dir.glob("incidents/*/verdict.json")):
        data = json.loads(verdict.read_text())
        seconds = data.get("figures", {}).get("seconds_since_progress")
        if seconds is not None:
            quiet.append(round(float(seconds), 1))
    return quiet


def report(trainer: str, base: Path) -> None:
    for ledger_file in sorted(base.glob("*/**/.sidecar/state.json")):
        test = ledger_file.relative_to(base).parts[0]
        if test.endswith("current"):
            continue  # pytest's link to the newest folder of the same test
        ledger = json.loads(ledger_file.read_text())
        resumed = [
            (r["kind"], Path(r["checkpoint"]).name if r["checkpoint"] else "start")
            for r in ledger.get("recoveries", [])
        ]
        starts = [a["initial_step"] for a in ledger.get("attempts", [])]
        aside = [Path(m["moved_to"]).name for m in ledger.get("set_aside", [])]
        print(
            f"  {test:<58} recoveries={resumed} attempt_starts={starts} "
            f"set_aside={aside} stall_quiet_s={stall_quiet_seconds(ledger_file.parent)} "
            f"completed={ledger.get('completed')}"
        )


def main(argv: list[str]) -> int:
    failed = 0
    for trainer in argv or TRAINERS:
        base = Path(tempfile.mkdtemp(prefix=f"scenarios-{trainer}-"))
        print(f"{trainer}:")
        code, seconds = run_scenarios(trainer, base)
        print(f"  scenarios took {seconds:.1f} s (exit {code})")
        report(trainer, base)
        failed |= code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
