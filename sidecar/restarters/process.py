"""Process mode: the sidecar launches ``bash train.sh`` itself and supervises it.

The trainer runs in its own process group so the whole tree (bash, the
accelerate launcher, the python trainer, dataloader workers) can be signalled at
once. Both of its pipes are drained continuously by threads: an unread pipe
fills up and blocks the trainer (sd-scripts issue 536), which would be a hang
of our own making. What it prints is appended to ``train.log`` and echoed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

import tenacity

from sidecar.process_tree import group_members, terminate_tree, tree_of
from sidecar.restarters.base import RestartError, TrainerStatus

_CHUNK = 64 * 1024


class ProcessRestarter:
    mode = "process"
    exits_with_run = True
    stop_before_rewrite = True
    relaunches = True

    def __init__(
        self,
        *,
        train_script: Path,
        workdir: Path,
        train_log: Path,
        kill_grace: float,
        echo: BinaryIO | None = None,
        log: Callable[..., None] | None = None,
        launch_attempts: int = 3,
        launch_sleep: Callable[[float], None] | None = None,
    ):
        self.train_script = train_script
        self.workdir = workdir
        self.train_log = train_log
        self.kill_grace = kill_grace
        self._echo = echo
        self._log = log or (lambda *args, **kwargs: None)
        self._launch_attempts = launch_attempts
        self._launch_sleep = launch_sleep
        self._process: subprocess.Popen[bytes] | None = None
        self._drains: list[threading.Thread] = []
        self._write_lock = threading.Lock()

    # -- Restarter ---------------------------------------------------------------------------

    def start(self) -> None:
        self._launch_with_retries()

    def restart(self) -> None:
        self.stop()
        self._launch_with_retries()

    def status(self) -> TrainerStatus:
        if self._process is None:
            return TrainerStatus(running=False)
        code = self._process.poll()
        return TrainerStatus(running=code is None, exit_code=code, attempt=str(self._process.pid))

    def trainer_pids(self) -> list[int]:
        if self._process is None:
            return []
        return [process.pid for process in tree_of(self._process.pid)]

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        # The group catches processes whose parent already died (orphaned dataloader workers).
        tree = {p.pid: p for p in [*tree_of(process.pid), *group_members(process.pid)]}
        survivors = terminate_tree(
            list(tree.values()),
            grace=self.kill_grace,
            send_group_signal=lambda signum: self._signal_group(process.pid, signum),
            on_kill=lambda alive: self._log(
                "trainer_killed",
                pids=[p.pid for p in alive],
                reason=f"still running {self.kill_grace:g} s after SIGTERM",
            ),
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if survivors:
            raise RestartError(
                f"trainer processes {[p.pid for p in survivors]} survived SIGKILL "
                "(uninterruptible I/O?); not starting a second trainer beside them"
            )
        self._join_drains()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- internals -------------------------------------------------------------------------

    def _launch_with_retries(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OSError),
            stop=tenacity.stop_after_attempt(self._launch_attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=5.0) + tenacity.wait_random(0, 0.5),
            before_sleep=lambda state: self._log(
                "launch_retry",
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else None,
            ),
            sleep=self._launch_sleep or tenacity.nap.sleep,
            reraise=True,
        )
        try:
            retrying(self._launch)
        except OSError as error:
            raise RestartError(f"cannot launch bash {self.train_script}: {error}") from error

    def _launch(self) -> None:
        self.train_log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.train_log, "ab", buffering=0)  # noqa: SIM115 - owned by drains
        try:
            self._process = subprocess.Popen(
                ["bash", str(self.train_script)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # own process group: one signal reaches the whole tree
            )
        except OSError:
            log_file.close()
            raise
        assert self._process.stdout is not None and self._process.stderr is not None
        remaining = [2]
        self._drains = [
            threading.Thread(
                target=self._drain,
                args=(stream, log_file, remaining),
                name=f"drain-{name}-{self._process.pid}",
                daemon=True,
            )
            for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr))
        ]
        for thread in self._drains:
            thread.start()

    def _drain(self, stream: IO[bytes], log_file: BinaryIO, remaining: list[int]) -> None:
        descriptor = stream.fileno()
        try:
            while chunk := os.read(descriptor, _CHUNK):
                with self._write_lock:
                    log_file.write(chunk)
                    if self._echo is not None:
                        with contextlib.suppress(OSError, ValueError):
                            self._echo.write(chunk)
                            self._echo.flush()
        finally:
            stream.close()
            with self._write_lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    log_file.close()

    def _join_drains(self) -> None:
        # Once every process holding the pipes is gone the drains see EOF promptly.
        for thread in self._drains:
            thread.join(timeout=5)

    @staticmethod
    def _signal_group(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


def default_echo() -> BinaryIO:
    return sys.stderr.buffer
