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
``relaunch_environment`` event says which was used. The context read is also kept in
``<state dir>/launch.json`` (mode 0600: values can be secrets), so that a relaunch after a
reboot, when no process of the run is left to read, is still the same launch.

Each relaunch carries ``TRAINING_SIDECAR_LAUNCH=<token>`` in its environment, which tells
the sidecar's own trainer from one the UI starts beside it (never two trainers), and when
the trainer's processes vanish the container is asked whether it stopped or restarted under
them: that is an interruption of the run (a recreate, a reboot), not a crash.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sidecar import events
from sidecar.atomic_files import replace_atomically
from sidecar.clients.docker_engine import DockerGateway
from sidecar.clients.docker_errors import ContainerNotFound, DockerError
from sidecar.observe.trainer_processes import (
    LaunchContext,
    LaunchNotVisible,
    attempt_key,
    find_trainer_processes,
    launch_context,
    launched_with,
    tree_root,
    tree_roots,
)
from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.restarters.signal import SignalRestarter, stop_trees
from sidecar.run.paths import RunPaths

# In the environment of every train.sh the sidecar launches: tells its own from the UI's.
LAUNCH_MARKER = "TRAINING_SIDECAR_LAUNCH"
# How long the Engine's view of a launch is waited for to agree with /proc's.
SETTLE_WAIT = 5.0


class ExecRestarter:
    mode = "exec"
    acts = True
    exits_with_run = False
    stop_before_rewrite = True
    relaunches = True
    outlives_sidecar = False

    def __init__(
        self,
        *,
        gateway: DockerGateway,
        container: str,
        project: str | None,
        pattern: re.Pattern[str],
        kill_grace: float,
        log: Callable[..., Any] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.gateway = gateway
        self._monotonic = monotonic
        self._sleep = sleep
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
        self._launch_file: Path | None = None
        self._token: str | None = None  # LAUNCH_MARKER of the sidecar's latest relaunch
        self._waited_for: str | None = None  # the launch whose settling was waited out
        self._own_roots: dict[tuple[int, float, str], bool] = {}  # roots judged so far
        # The trainer container as it was while the watched trainer ran (id, start time).
        self._container_then: tuple[str, str | None] | None = None

    def use_run(self, paths: RunPaths) -> None:
        """Relaunch this run: its paths as the trainer's container sees them."""
        self.script = paths.path_map.to_trainer(str(paths.train_script))
        self.workdir = str(paths.trainer_workdir)  # already the trainer's view in exec mode
        self.train_log = paths.path_map.to_trainer(str(paths.train_log))
        self._launch_file = paths.state_dir / "launch.json"
        if self._launch is None:
            self._launch = _read_launch(self._launch_file)

    def start(self) -> None:
        """FluxGym's UI starts the first run; check now that the container can be reached."""
        try:
            self.gateway.find_container(self.container, project=self.project)
        except DockerError as error:
            raise RestartError(str(error)) from error

    def status(self) -> TrainerStatus:
        processes = find_trainer_processes(self.pattern)  # in the shared namespace
        exit_code = None
        if not processes:
            processes, exit_code = self._launch_settled()
        if processes:
            attempt = attempt_key(processes)
            self._remember_launch(processes, attempt)
            self._remember_container()
            own, others = self._own_and_others(processes)
            if own is None and self._token is not None:
                # Only someone else's trainer runs (the UI's Start): the exit code to report
                # when it ends is not that of the sidecar's last launch.
                self._exec_id = self._token = None
            return TrainerStatus(running=True, attempt=attempt, own=own, others=others)
        return TrainerStatus(
            running=False, exit_code=exit_code, went_with_container=self._container_went()
        )

    def stop_trees(self, roots: list[int]) -> None:
        """Stop the trainer trees rooted at ``roots`` (one of two trainers), nothing else."""
        own = [root for root in roots if self._is_own_pid(root)]
        stop_trees(roots, self.kill_grace, self._log)
        if own:
            # The trainer watched from now on is not the sidecar's: its exit code is unknown.
            self._exec_id = self._token = None

    def _is_own_pid(self, pid: int) -> bool:
        try:
            return self._is_own(psutil.Process(pid))
        except psutil.Error:
            return False

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
            token = uuid.uuid4().hex
            # Docker adds the exec's variables to the container's own: the marker always goes.
            marked = {**(environment or {}), LAUNCH_MARKER: token}
            self._exec_id = self.gateway.exec_detached(
                target.id, ["bash", "-c", command], workdir=workdir, environment=marked
            )
            self._token = token
        except DockerError as error:
            raise RestartError(str(error)) from error

    def _own_and_others(
        self, processes: list[psutil.Process]
    ) -> tuple[int | None, tuple[int, ...]]:
        """The root of the sidecar's own launch among the trees, and the roots of the others."""
        roots = tree_roots(processes)
        if self._token is None or len(roots) < 2:
            own = roots[0].pid if roots and self._is_own(roots[0]) else None
            return own, ()
        own_roots = [root for root in roots if self._is_own(root)]
        if not own_roots:
            return None, ()
        return own_roots[0].pid, tuple(root.pid for root in roots if root not in own_roots)

    def _is_own(self, root: psutil.Process) -> bool:
        """Whether ``root`` is the sidecar's latest launch; its environment is read once per
        process (a poll sees the same roots again and again)."""
        if self._token is None:
            return False
        try:
            key = (root.pid, root.create_time(), self._token)
        except psutil.Error:
            return False
        if key not in self._own_roots:
            if len(self._own_roots) >= 16:  # roots of launches long gone
                self._own_roots.clear()
            self._own_roots[key] = bool(launched_with(root, LAUNCH_MARKER, self._token))
        return self._own_roots[key]

    def _remember_container(self) -> None:
        """Once per watched trainer: which container instance it runs in."""
        if self._container_then is not None:
            return
        try:
            target = self.gateway.find_container(self.container, project=self.project)
        except DockerError:
            return  # asked again at the next poll
        if target.running:
            self._container_then = (target.id, target.started_at)

    def _container_went(self) -> bool:
        """The trainer's processes are gone: did its container stop or restart under them?"""
        then, self._container_then = self._container_then, None
        if then is None:
            return False
        try:
            target = self.gateway.find_container(self.container, project=self.project)
        except ContainerNotFound:
            return True  # removed with it (a recreate)
        except DockerError as error:
            self._container_then = then  # unknown yet: the next poll asks again
            raise RestartError(str(error)) from error
        return not target.running or (target.id, target.started_at) != then

    def _remember_launch(self, processes: list[psutil.Process], attempt: str | None) -> None:
        """Read the tree root's environment once per attempt (every poll would be wasted work)."""
        if self._launch is not None and attempt == self._launch_attempt:
            return
        root = tree_root(processes)
        if root is None:
            return  # every process ended meanwhile: the next poll tries again
        try:
            launch = launch_context(root)
        except LaunchNotVisible as error:
            self._launch_problem = f"cannot read the environment of {error}"
            return
        launch.environment.pop(LAUNCH_MARKER, None)  # the relaunch gets a token of its own
        self._launch_attempt = attempt
        if self._launch != launch:
            self._launch = launch
            self._keep_launch(launch)

    def _keep_launch(self, launch: LaunchContext) -> None:
        """Keep the launch on the run's volume for a relaunch after a reboot (0600)."""
        if self._launch_file is None:
            return
        record = {"pid": launch.pid, "workdir": launch.workdir, "environment": launch.environment}
        with contextlib.suppress(OSError):  # a full volume costs only the after-reboot relaunch
            self._launch_file.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(self._launch_file, json.dumps(record) + "\n", mode=0o600)

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

    def _launch_settled(self) -> tuple[list[psutil.Process], int | None]:
        """No trainer process is seen: the processes of our launch once they show, or its
        exit status (unknown for a trainer the UI started).

        The Engine's view and /proc's differ for a moment at both ends of a launch: a
        relaunch's processes show a little after the exec starts, and the exec's exit is
        recorded a little after its process ends (on a busy machine, well over a poll later).
        Meanwhile the Engine answers "running" with no code, and a run that finished would
        read as ended without one. So that is waited out, once per launch and for at most
        ``SETTLE_WAIT`` seconds (an exec the pattern never sees is not waited for again).
        """
        exec_id = self._exec_id
        if exec_id is None:
            return [], None
        deadline = self._monotonic() + (0.0 if exec_id == self._waited_for else SETTLE_WAIT)
        while True:
            try:
                info = self.gateway.exec_inspect(exec_id)
            except DockerError:
                return [], None
            if info.exit_code is not None or not info.running:
                return [], info.exit_code
            processes = find_trainer_processes(self.pattern)
            if processes:
                return processes, None
            if self._monotonic() >= deadline:
                self._waited_for = exec_id
                return [], None
            self._sleep(0.05)


def _read_launch(path: Path) -> LaunchContext | None:
    """The launch kept by an earlier sidecar, if there is a readable one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        environment = {str(k): str(v) for k, v in dict(record["environment"]).items()}
        return LaunchContext(int(record["pid"]), environment, record.get("workdir"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
