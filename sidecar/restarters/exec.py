"""Exec mode: the trainer is a process inside a long-lived container (FluxGym's own).

FluxGym's web UI started train.sh; the container's main process is the UI and
must survive. On a stall the sidecar stops the training processes it sees in the
shared PID namespace, then starts train.sh again inside that container through
the Docker exec API, from the FluxGym root, appending to train.log.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

from sidecar.clients.docker_engine import DockerGateway
from sidecar.clients.docker_errors import DockerError
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
        seen = self._processes.status()  # the training processes, in the shared namespace
        if seen.running:
            return seen
        return TrainerStatus(running=False, exit_code=self._own_exit_code())

    def trainer_pids(self) -> list[int]:
        return self._processes.trainer_pids()

    def stop(self) -> None:
        self._processes.stop()

    def restart(self) -> None:
        self.stop()
        # `exec` keeps the shell's PID for bash, so train.sh's processes match the pattern.
        command = f"exec bash {shlex.quote(self.script)} >> {shlex.quote(self.train_log)} 2>&1"
        try:
            target = self.gateway.find_container(self.container, project=self.project)
            if not target.running:
                raise RestartError(f"container {target.name} is {target.status}, not running")
            self._exec_id = self.gateway.exec_detached(
                target.id, ["bash", "-c", command], workdir=self.workdir
            )
        except DockerError as error:
            raise RestartError(str(error)) from error

    def _own_exit_code(self) -> int | None:
        """The exit status of the train.sh we launched; unknown for one the UI started."""
        if self._exec_id is None:
            return None
        try:
            return self.gateway.exec_inspect(self._exec_id).exit_code
        except DockerError:
            return None
