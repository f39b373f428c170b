"""A stand-in for a venv-based FluxGym web UI: the container's main process, which stays up.

It activates its venv in its own process only (PATH and VIRTUAL_ENV), then, once asked (the
file named by UI_START_FILE appears), starts train.sh as FluxGym does: `bash <absolute
train.sh>` as its child, from the FluxGym root, with the UI's environment, its output read
as the UI streams it into the page (an unread pipe could hang the trainer).

The script comes from UI_TRAIN_SCRIPT rather than the command line: the sidecar's trainer
pattern matches "train.sh" in command lines, and the UI must never look like a trainer.

Optional, for the interruption tests (unset, the UI behaves as above: one Start, then idle):

- UI_REPEAT=1: each Start consumes the start file (it is removed when taken, so a file left
  in the container's /tmp does not start a training again after a container restart); once
  the training ends ("Training Complete") the UI waits for the next Start.
- UI_REGENERATE_FROM=<file>: like FluxGym's Start, which writes train.sh anew from its form,
  each Start first replaces UI_TRAIN_SCRIPT with a copy of that pristine file (so without any
  --resume the sidecar put there), atomically: a temporary file in the same folder, then
  os.replace, so that a bash already running the old script keeps reading the old inode.
- UI_OUTPUT_FILE=<file>: what the page shows is also appended there, raw (tqdm's carriage
  returns included), after a line `=== ui start <n> pid <pid> ===` for each Start.
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
    repeat = os.environ.get("UI_REPEAT") == "1"
    starts = 0
    while True:
        while not start_file.exists():
            time.sleep(0.1)
        if repeat:
            start_file.unlink(missing_ok=True)
        starts += 1
        train(starts)
        if not repeat:
            break
    while True:
        time.sleep(3600)


def train(start: int) -> None:
    """One Start: (regenerate train.sh,) run it as the UI's child, show its output."""
    script = Path(os.environ["UI_TRAIN_SCRIPT"])
    form = os.environ.get("UI_REGENERATE_FROM")
    if form:
        regenerate(script, Path(form))
    training = subprocess.Popen(
        ["bash", str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert training.stdout is not None
    output = os.environ.get("UI_OUTPUT_FILE")
    if output:
        with open(output, "ab", buffering=0) as page:
            page.write(f"\n=== ui start {start} pid {training.pid} ===\n".encode())
            while chunk := os.read(training.stdout.fileno(), 65536):
                page.write(chunk)
    else:
        for _line in training.stdout:
            pass  # shown in the UI, which the tests do not read
    training.wait()  # "Training Complete", also when the sidecar stopped it


def regenerate(script: Path, form: Path) -> None:
    partial = script.with_name(f".{script.name}.ui-partial")
    partial.write_bytes(form.read_bytes())
    os.replace(partial, script)


if __name__ == "__main__":
    main()
