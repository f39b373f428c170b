"""The short benchmark run: fails when a measured figure misses its target.

Targets are ratios to the configured bounds (detection within the timeout plus one
poll, recovery within 1 s of the trainer's own exit, footprint and resolution
limits), so a slow CI machine does not make it flaky; see benchmarks/bench.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from repo_paths import REPO_ROOT

pytestmark = pytest.mark.slow
BENCH = REPO_ROOT / "benchmarks" / "bench.py"


def test_quick_benchmarks_meet_their_targets():
    """bench.py --quick --check exits 0 and prints every row as met."""
    result = subprocess.run(
        # 25% headroom over each bound: CI machines are shared and noisy.
        [sys.executable, str(BENCH), "--quick", "--check", "--tolerance", "1.25"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "measure" not in line
    ]
    # Every row is held to the same bound: --check exited 0, so no ratio exceeds 1.25.
    assert len(rows) >= 8
