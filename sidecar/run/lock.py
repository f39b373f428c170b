"""One supervisor, one trainer per run — also across sidecar crashes.

An exclusive ``flock`` on ``<state dir>/sidecar.lock`` keeps a second sidecar off a
run that one already supervises (the kernel drops the lock when its holder dies,
even by SIGKILL). ``<state dir>/trainer.pid`` names the trainer the sidecar
launched, with its start time so that a recycled PID is never mistaken for it: a
sidecar restarted while its trainer still runs adopts that trainer instead of
starting a second one on the same GPU and output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import psutil

from sidecar.atomic_files import replace_atomically


class RunLockHeld(Exception):
    """Another sidecar already supervises this run."""


class RunLock:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "sidecar.lock"
        self._descriptor: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = self.path.read_text().strip() or "unknown"
            raise RunLockHeld(
                f"another sidecar (pid {holder}) already supervises this run ({self.path})"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None


class TrainerPidFile:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "trainer.pid"

    def record(self, pid: int) -> None:
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.path, json.dumps({"pid": pid, "create_time": started}) + "\n")

    def live_trainer(self) -> psutil.Process | None:
        """The recorded trainer if that very process still runs."""
        try:
            recorded = json.loads(self.path.read_text())
            process = psutil.Process(int(recorded["pid"]))
            same = abs(process.create_time() - float(recorded["create_time"])) < 0.01
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        return process if same and alive else None
