"""The soak's short version: three minutes of one supervised run through 20+ random faults.

benchmarks/soak.py runs the real sidecar in process mode over the simulated trainer, one
disruptive fault per trainer run (hangs idle and busy, crashes, hangs and crashes inside a
save) with slow saves and slow starts riding along, and judges the outcome itself; this test
runs it for three minutes and checks the same conditions from its JSON summary. The full soak
(about 30 minutes) is ``python benchmarks/soak.py``.

What changed with exact resumes (the simulator follows sd-scripts' rules and the sidecar
relaunches with ``--initial_step <absolute> --skip_until_initial_step``): no step is trained
twice across recoveries, so the soak plans each run from where it will resume (its
``global_step`` starts at the remainder of that step) and sizes the schedule so every planned
fault is reached; a verdict's step is checked in that run's bar terms (fault step minus the
remainder), every resume must start at the step the plan predicts, and the final model's
lineage must be exactly an uninterrupted run's. ``crash_in_save`` joined the fault kinds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

pytestmark = pytest.mark.slow
SOAK = REPO_ROOT / "benchmarks" / "soak.py"


@pytest.mark.timeout(900)
def test_three_minute_soak_recovers_every_fault_and_nothing_else(tmp_path: Path) -> None:
    """Every disruptive fault is recovered, each resume starting exactly where the last
    complete state left off; no healthy stretch is restarted, slow saves and slow starts cost
    nothing, the final model is there with an uninterrupted run's lineage (nothing lost,
    nothing trained twice) and the ledger agrees with the log."""
    summary_file = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "3", "--json", str(summary_file)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(summary_file.read_text())
    assert summary["problems"] == []
    assert summary["faults"] >= 20
    assert all(count >= 2 for count in summary["fault_kinds"].values()), summary["fault_kinds"]
    assert summary["recovered"] == summary["disruptive_faults"] > 0
    assert summary["restarts_logged"] == summary["disruptive_faults"]
    assert summary["ledger_restarts"] == summary["restarts_logged"]
    assert summary["trainer_runs"] == summary["disruptive_faults"] + 1
    assert summary["final_model"] is True and summary["exit_code"] == 0
    assert summary["lineage_exact"] is True
    assert summary["lineage_steps"] == summary["max_train_steps"]
    assert summary["most_trainers_at_once"] == 1
    assert summary["minutes"] >= 2.0, "the soak ended far sooner than planned"
