"""benchmarks/gpu_check.py is safe to run anywhere: without a GPU it skips in one line."""

from __future__ import annotations

import os
import subprocess
import sys

from repo_paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_skips_cleanly_without_a_gpu() -> None:
    """With CUDA hidden (and here no NVML at all) the check prints its skip line and exits 0."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU where there is one
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("gpu_check: skipped: "), lines
    assert "NVML" in lines[0] or "CUDA" in lines[0], lines
    assert "Traceback" not in result.stderr
