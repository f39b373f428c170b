"""Container mode: the trainer container's command runs train.sh.

train.sh lives on the shared volume, so the sidecar rewrites it first and then
restarts the container through the Engine API with a stop timeout (a restart,
never a kill or a stop: a stopped container counts as stopped by hand and its
restart policy would no longer apply).
"""

from __future__ import annotations

from sidecar.clients.docker_answers import ContainerInfo
from sidecar.clients.docker_engine import DockerGateway
from sidecar.clients.docker_errors import DockerError
from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.run.paths import RunPaths


class ContainerRestarter:
    mode = "container"
    acts = True
    exits_with_run = False
    stop_before_rewrite = False
    relaunches = True
    outlives_sidecar = True

    def __init__(
        self, *, gateway: DockerGateway, container: str, project: str | None, kill_grace: float
    ):
        self.gateway = gateway
        self.container = container
        self.project = project
        self.kill_grace = kill_grace

    def use_run(self, paths: RunPaths) -> None:
        """Nothing to follow: this mode acts on the trainer, not on a run's files."""

    def start(self) -> None:
        """The container is started by compose; only check that it exists."""
        self._find()

    def status(self) -> TrainerStatus:
        info = self._find()
        running = info.running or info.status == "restarting"
        return TrainerStatus(
            running=running,
            exit_code=None if running else info.exit_code,
            attempt=info.started_at,
        )

    def trainer_pids(self) -> list[int]:
        """None visible: the engine reports host PIDs, which mean nothing in our namespace."""
        return []

    def stop(self) -> None:
        """Restarting stops it; nothing to do before train.sh is rewritten."""

    def stop_trees(self, roots: list[int]) -> None:
        raise RestartError("container mode does not see the trainer's processes")

    def restart(self) -> None:
        info = self._find()
        try:
            self.gateway.restart(info.id, timeout=self.kill_grace)
        except DockerError as error:
            raise RestartError(f"restarting container {info.name}: {error}") from error

    def _find(self) -> ContainerInfo:
        try:
            return self.gateway.find_container(self.container, project=self.project)
        except DockerError as error:
            raise RestartError(str(error)) from error
