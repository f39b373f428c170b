"""Process mode: the sidecar launches ``bash train.sh`` itself and supervises it.

The trainer runs in its own process group so the whole tree (bash, the
accelerate launcher, the python trainer, dataloader workers) can be signalled at
once. Its stdout and stderr are opened on ``train.log`` itself (append mode), not
on pipes: a pipe that is not drained fills up and blocks the trainer (sd-scripts
issue 536), and a pipe whose reader dies kills the trainer with SIGPIPE at its
next progress line — so a crash of the sidecar would take the training down with
it. A file never blocks and outlives the sidecar; a thread tails it to echo the
output.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psutil
import tenacity

from sidecar import events
from sidecar.observe.process_tree import group_members, kernel_view, terminate_tree, tree_of
from sidecar.observe.trainer_processes import script_runner
from sidecar.restarters.base import RestartError, SurvivedKill, TrainerStatus
from sidecar.restarters.signal import stop_trees
from sidecar.run.lock import TrainerPidFile
from sidecar.run.paths import RunPaths

_CHUNK = 64 * 1024


class ProcessRestarter:
    mode = "process"
    acts = True
    exits_with_run = True
    stop_before_rewrite = True
    relaunches = True
    outlives_sidecar = True

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
        pid_file: TrainerPidFile | None = None,
        environment: Callable[[], dict[str, str]] | None = None,
    ):
        """``environment``: variables added to the trainer's at each launch (the NCCL
        flight recorder's, for a launch of more than one process)."""
        self.train_script = train_script
        self.workdir = workdir
        self.train_log = train_log
        self.kill_grace = kill_grace
        self._echo = echo
        self._log = log or (lambda *args, **kwargs: None)
        self._launch_attempts = launch_attempts
        self._launch_sleep = launch_sleep
        self._pid_file = pid_file
        self._environment = environment
        self._adopted: psutil.Process | None = None  # a trainer an earlier sidecar launched
        self._process: subprocess.Popen[bytes] | None = None
        self._echo_thread: LogEcho | None = None

    # -- Restarter ---------------------------------------------------------------------------

    def use_run(self, paths: RunPaths) -> None:
        """Nothing to follow: this mode acts on the trainer, not on a run's files."""

    def start(self) -> None:
        """Launch train.sh, or adopt the trainer a previous sidecar left running."""
        survivor = self._survivor()
        if survivor is not None:
            self._adopted = survivor
            self._log(
                events.TRAINER_ADOPTED,
                pid=survivor.pid,
                reason="still running from before this sidecar started (an earlier "
                "sidecar's launch, or the kohya_ss GUI's run it took over); watching it instead "
                "of starting a second trainer",
            )
            return
        self._launch_with_retries()

    def restart(self) -> None:
        self.stop()
        self._launch_with_retries()

    def stop_trees(self, roots: list[int]) -> None:
        stop_trees(roots, self.kill_grace, self._log)

    def _survivor(self) -> psutil.Process | None:
        """A trainer of this script that an earlier sidecar launched and that still runs."""
        survivor = self._pid_file.live_trainer() if self._pid_file else None
        # Killed between launching and recording the pid: the running script still tells.
        return survivor or script_runner(str(self.train_script))

    def status(self) -> TrainerStatus:
        if self._process is None and self._adopted is None:
            # Before the first launch: whether an earlier sidecar's trainer still runs.
            survivor = self._survivor()
            if survivor is not None:
                return TrainerStatus(running=True, attempt=f"adopted {survivor.pid}")
        if self._adopted is not None:
            alive = _alive(self._adopted)
            return TrainerStatus(running=alive, attempt=f"adopted {self._adopted.pid}")
        if self._process is None:
            return TrainerStatus(running=False)
        code = self._process.poll()
        return TrainerStatus(running=code is None, exit_code=code, attempt=str(self._process.pid))

    def trainer_pids(self) -> list[int]:
        root = self._adopted.pid if self._adopted else self.pid
        return [process.pid for process in tree_of(root)] if root else []

    def stop(self) -> None:
        root = self._adopted.pid if self._adopted else self.pid
        if root is None:
            return
        # The group catches processes whose parent already died (orphaned dataloader workers).
        tree = {p.pid: p for p in [*tree_of(root), *group_members(root)]}
        survivors = terminate_tree(
            list(tree.values()),
            grace=self.kill_grace,
            send_group_signal=lambda signum: self._signal_group(root, signum),
            on_kill=lambda alive: self._log(
                events.TRAINER_KILLED,
                pids=[p.pid for p in alive],
                reason=f"still running {self.kill_grace:g} s after SIGTERM",
            ),
        )
        self._adopted = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        if self._echo_thread is not None:
            self._echo_thread.copy_new()  # the trainer's last words
        if survivors:
            raise SurvivedKill(kernel_view(survivors))

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
                events.LAUNCH_RETRY,
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
        with open(self.train_log, "ab") as log_file:  # the child keeps its own descriptors
            extra = self._environment() if self._environment is not None else {}
            self._process = subprocess.Popen(
                ["bash", str(self.train_script)],
                cwd=self.workdir,
                env={**os.environ, **extra} if extra else None,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one signal reaches the whole tree
            )
        if self._pid_file is not None:
            try:
                self._pid_file.record(self._process.pid)
            except OSError as error:
                # The trainer runs: a full or read-only state folder must not make the launch
                # look failed, or the retry would start a second trainer beside it. A restarted
                # sidecar still finds this one by its command line.
                self._log(
                    events.TRAINER_PID_NOT_RECORDED, path=str(self._pid_file.path), error=str(error)
                )
        if self._echo is not None and self._echo_thread is None:
            self._echo_thread = LogEcho(self.train_log, self._echo)
            self._echo_thread.start()

    @staticmethod
    def _signal_group(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


class LogEcho(threading.Thread):
    """Copies what the trainer appends to train.log to the sidecar's stderr."""

    def __init__(self, path: Path, sink: BinaryIO, interval: float = 0.2):
        super().__init__(name="train-log-echo", daemon=True)
        self.path = path
        self.sink = sink
        self.interval = interval
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        try:
            self._offset = path.stat().st_size  # earlier runs' output was echoed then
        except FileNotFoundError:
            self._offset = 0

    def run(self) -> None:
        while not self._stop_requested.wait(self.interval):
            self.copy_new()

    def copy_new(self) -> None:
        with self._lock:
            self._copy_new()

    def _copy_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                while chunk := handle.read(_CHUNK):
                    self._offset += len(chunk)
                    with contextlib.suppress(OSError, ValueError):
                        self.sink.write(chunk)
                        self.sink.flush()
        except FileNotFoundError:
            return

    def stop(self) -> None:
        self._stop_requested.set()


def default_echo() -> BinaryIO:
    return sys.stderr.buffer


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
