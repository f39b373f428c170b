"""What bash really passes to a trainer: the ground truth for the train.sh reader's tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def run_with_stub_accelerate(script: str, folder: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` with bash from ``folder``, a stub ``accelerate`` first on PATH that
    prints its arguments NUL-separated."""
    bin_folder = folder / "bin"
    bin_folder.mkdir(exist_ok=True)
    stub = bin_folder / "accelerate"
    stub.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    stub.chmod(0o755)
    path = folder / "train.sh"
    path.write_text(script, encoding="utf-8", newline="")
    return subprocess.run(
        ["bash", str(path)],
        cwd=folder,
        env={**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        check=True,
        timeout=30,
    )


def argv_bash_passes(script: str, folder: Path) -> list[str]:
    """The arguments the stub ``accelerate`` received from bash running ``script``."""
    return run_with_stub_accelerate(script, folder).stdout.decode("utf-8").split("\0")[:-1]
