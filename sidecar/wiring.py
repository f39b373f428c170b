"""Assembles a run from the settings: the restarter for the mode, with its clients.

The only place that turns the settings into parts; each part gets the few values it needs.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from sidecar.config import Settings
from sidecar.restarters.base import Restarter
from sidecar.run.paths import RunPaths


def build_restarter(
    settings: Settings,
    paths: RunPaths | None,
    log: Any,
    *,
    stop_event: threading.Event | None = None,
) -> Restarter | None:
    """The restarter for ``SIDECAR_RESTART_MODE``; None in detect-only mode."""
    mode = settings.restart_mode
    pattern = re.compile(settings.trainer_pattern)
    if mode == "none":
        return None
    if mode == "process":
        from sidecar.restarters.process import ProcessRestarter, default_echo
        from sidecar.run.lock import TrainerPidFile

        assert paths is not None
        return ProcessRestarter(
            train_script=paths.train_script,
            workdir=paths.trainer_workdir,
            train_log=paths.train_log,
            kill_grace=settings.kill_grace,
            echo=default_echo() if settings.echo_trainer_output else None,
            log=log.info,
            pid_file=TrainerPidFile(paths.state_dir),
        )
    if mode == "signal":
        from sidecar.restarters.signal import SignalRestarter

        return SignalRestarter(pattern=pattern, kill_grace=settings.kill_grace, log=log.info)
    if mode == "pod":
        from sidecar.clients.kubernetes_api import KubernetesGateway
        from sidecar.restarters.pod import PodRestarter

        assert settings.pod_name and settings.pod_namespace  # checked by the settings model
        return PodRestarter(
            pattern=pattern,
            kill_grace=settings.kill_grace,
            pod_name=settings.pod_name,
            namespace=settings.pod_namespace,
            # Credentials are loaded on the first call, so a pod without a token mounted
            # reports it as a restart problem instead of failing to start.
            gateway=KubernetesGateway(stop_event=stop_event, log=log),
            log=log.info,
        )
    from sidecar.clients.docker_engine import DockerGateway

    gateway = DockerGateway(
        retry_window=settings.docker_retry_window, stop_event=stop_event, log=log
    )
    project = settings.compose_project or gateway.own_compose_project()
    assert settings.trainer_container is not None  # checked by the settings model
    if mode == "container":
        from sidecar.restarters.container import ContainerRestarter

        return ContainerRestarter(
            gateway=gateway,
            container=settings.trainer_container,
            project=project,
            kill_grace=settings.kill_grace,
        )
    from sidecar.restarters.exec import ExecRestarter

    return ExecRestarter(
        gateway=gateway,
        container=settings.trainer_container,
        project=project,
        pattern=pattern,
        kill_grace=settings.kill_grace,
        log=log.info,
    )
