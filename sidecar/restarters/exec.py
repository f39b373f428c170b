"""Exec mode: the trainer is a process inside a long-lived container (FluxGym's own).

FluxGym's web UI started train.sh; the container's main process is the UI and
must survive. On a stall the sidecar stops the training processes it sees in the
shared PID namespace, then starts train.sh again inside that container through
the Docker exec API, appending to train.log.

The relaunch must be the same launch. FluxGym's train.sh inherits the UI's environment (in
venv installs, the venv's PATH and variables), which a plain exec does not have; so while the
trainer runs, the environment and working directory of its process tree's root are read
from /proc and kept, and every relaunch uses them. Where they cannot be read (another UID, no
process seen since the sidecar started), the relaunch falls back to the container's own exec
environment and the configured trainer working directory (the FluxGym root). The
``relaunch_environment`` event says which was used.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

import psutil

from sidecar import events
from sidecar.clients.docker_engine import DockerGateway
from sidecar.clients.docker_errors import DockerError
from sidecar.observe.trainer_processes import (
    LaunchContext,
    LaunchNotVisible,
    attempt_key,
    find_trainer_processes,
    launch_context,
    tree_root,
)
from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.restarters.signal import SignalRestarter
from sidecar.run.paths import RunPaths


class ExecRestarter:
    mode = "exec"
    acts = True
    exits_with_run = False
    stop_before_rewrite = True
    relaunches = True

    def __init__(
        self,
        *,
        gateway: DockerGateway,
        container: str,
        project: str | None,
        pattern: re.Pattern[str],
        kill_grace: float,
        log: Callable[..., Any] | None = None,
    ):
        self.gateway = gateway
        self.container = container
        self.project = project
        self.pattern = pattern
        self.kill_grace = kill_grace
        self._log = log or (lambda *args, **kwargs: None)
        self._processes = SignalRestarter(pattern=pattern, kill_grace=kill_grace, log=log)
        self._exec_id: str | None = None
        self.script = self.workdir = self.train_log = ""
        # Kept across relaunches: a relaunched tree is read again (it has the same environment
        # plus the container's), and a failed read never discards a good earlier one.
        self._launch: LaunchContext | None = None
        self._launch_attempt: str | None = None  # the attempt self._launch was read from
        self._launch_problem = "no training process seen since the sidecar started"

    def use_run(self, paths: RunPaths) -> None:
        """Relaunch this run: its paths as the trainer's container sees them."""
        self.script = paths.path_map.to_trainer(str(paths.train_script))
        self.workdir = str(paths.trainer_workdir)  # already the trainer's view in exec mode
        self.train_log = paths.path_map.to_trainer(str(paths.train_log))

    def start(self) -> None:
        """FluxGym's UI starts the first run; check now that the container can be reached."""
        try:
            self.gateway.find_container(self.container, project=self.project)
        except DockerError as error:
            raise RestartError(str(error)) from error

    def status(self) -> TrainerStatus:
        processes = find_trainer_processes(self.pattern)  # in the shared namespace
        if processes:
            attempt = attempt_key(processes)
            self._remember_launch(processes, attempt)
            return TrainerStatus(running=True, attempt=attempt)
        return TrainerStatus(running=False, exit_code=self._own_exit_code())

    def trainer_pids(self) -> list[int]:
        return self._processes.trainer_pids()

    def stop(self) -> None:
        # The last chance to read how the run was launched: after this, nothing of it is left.
        processes = find_trainer_processes(self.pattern)
        if processes:
            self._remember_launch(processes, attempt_key(processes))
        self._processes.stop()

    def restart(self) -> None:
        self.stop()
        # `exec` keeps the shell's PID for bash, so train.sh's processes match the pattern.
        command = f"exec bash {shlex.quote(self.script)} >> {shlex.quote(self.train_log)} 2>&1"
        try:
            target = self.gateway.find_container(self.container, project=self.project)
            if not target.running:
                raise RestartError(f"container {target.name} is {target.status}, not running")
            environment, workdir = self._relaunch_context()
            self._exec_id = self.gateway.exec_detached(
                target.id, ["bash", "-c", command], workdir=workdir, environment=environment
            )
        except DockerError as error:
            raise RestartError(str(error)) from error

    def _remember_launch(self, processes: list[psutil.Process], attempt: str | None) -> None:
        """Read the tree root's environment once per attempt (every poll would be wasted work)."""
        if self._launch is not None and attempt == self._launch_attempt:
            return
        root = tree_root(processes)
        if root is None:
            return  # every process ended meanwhile: the next poll tries again
        try:
            self._launch = launch_context(root)
        except LaunchNotVisible as error:
            self._launch_problem = f"cannot read the environment of {error}"
            return
        self._launch_attempt = attempt

    def _relaunch_context(self) -> tuple[dict[str, str] | None, str]:
        """The environment (None: the container's exec default) and directory to relaunch in."""
        launch = self._launch
        if launch is None:
            self._log(
                events.RELAUNCH_ENVIRONMENT,
                environment="container_default",
                workdir=self.workdir,
                reason=self._launch_problem,
            )
            return None, self.workdir
        workdir = launch.workdir or self.workdir
        # Names only: values can be secrets (HF_TOKEN), and logs travel to webhooks and files.
        self._log(
            events.RELAUNCH_ENVIRONMENT,
            environment="original_process",
            source_pid=launch.pid,
            workdir=workdir,
            workdir_from="original_process" if launch.workdir else "configured",
            variables=sorted(launch.environment),
        )
        return launch.environment, workdir

    def _own_exit_code(self) -> int | None:
        """The exit status of the train.sh we launched; unknown for one the UI started."""
        if self._exec_id is None:
            return None
        try:
            return self.gateway.exec_inspect(self._exec_id).exit_code
        except DockerError:
            return None
