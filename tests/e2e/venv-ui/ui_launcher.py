"""A stand-in for a venv-based FluxGym web UI: the container's main process, which stays up.

It activates its venv in its own process only (PATH and VIRTUAL_ENV), then, once asked (the
file named by UI_START_FILE appears), starts train.sh as FluxGym does: `bash <absolute
train.sh>` as its child, from the FluxGym root, with the UI's environment, its output read
line by line as the UI streams it into the page (an unread pipe could hang the trainer).

The script comes from UI_TRAIN_SCRIPT rather than the command line: the sidecar's trainer
pattern matches "train.sh" in command lines, and the UI must never look like a trainer.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path("/app/fluxgym")
VENV = ROOT / "env"


def main() -> None:
    os.environ["VIRTUAL_ENV"] = str(VENV)
    os.environ["PATH"] = f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"
    start_file = Path(os.environ["UI_START_FILE"])
    while not start_file.exists():
        time.sleep(0.1)
    training = subprocess.Popen(
        ["bash", os.environ["UI_TRAIN_SCRIPT"]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert training.stdout is not None
    for _line in training.stdout:
        pass  # shown in the UI, which the tests do not read
    training.wait()  # "Training Complete", also when the sidecar stopped it
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
