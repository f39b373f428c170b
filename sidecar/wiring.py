"""Assembles a run from the settings: the loop's options (policy, recovery rules, resume
options) and the restarter for the mode with its clients.

The only place that turns the settings into parts; each part gets the few values it needs.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from sidecar.config import Settings
from sidecar.decide.decision import Policy
from sidecar.decide.interruption import InterruptionOptions
from sidecar.decide.recovery_rules import RecoveryRules
from sidecar.decide.sections import SectionTimeouts
from sidecar.loop_options import LoopOptions
from sidecar.recover.resume_point import ResumeOptions
from sidecar.restarters.base import Restarter
from sidecar.run.paths import RunPaths


def build_restarter(
    settings: Settings,
    paths: RunPaths | None,
    log: Any,
    *,
    stop_event: threading.Event | None = None,
) -> Restarter:
    """The restarter for ``SIDECAR_RESTART_MODE``. ``stop_event`` ends the Docker and
    Kubernetes clients' retries when the sidecar is told to stop."""
    mode = settings.restart_mode
    pattern = re.compile(settings.trainer_pattern)
    if mode == "none":
        from sidecar.restarters.detect_only import DetectOnly

        return DetectOnly()
    if mode == "process":
        assert paths is not None  # process mode watches one train.sh, located at start
        return _process_restarter(settings, paths, log)
    if mode == "signal":
        from sidecar.restarters.signal import SignalRestarter

        return SignalRestarter(
            pattern=pattern,
            kill_grace=settings.kill_grace,
            log=log.info,
            termination_file=settings.termination_file,
        )
    if mode == "pod":
        return _pod_restarter(settings, pattern, log, stop_event)
    return _docker_restarter(settings, pattern, log, stop_event)


def _process_restarter(settings: Settings, paths: RunPaths, log: Any) -> Restarter:
    from sidecar.observe.flight_recorder import launch_environment
    from sidecar.restarters.process import ProcessRestarter, default_echo
    from sidecar.run.lock import TrainerPidFile

    return ProcessRestarter(
        train_script=paths.train_script,
        workdir=paths.trainer_workdir,
        train_log=paths.train_log,
        kill_grace=settings.kill_grace,
        echo=default_echo() if settings.echo_trainer_output else None,
        log=log.info,
        pid_file=TrainerPidFile(paths.state_dir),
        # The NCCL flight recorder, for a launch of more than one process.
        environment=lambda: launch_environment(paths.flight_recorder, paths.launch_ranks()),
    )


def _pod_restarter(
    settings: Settings, pattern: re.Pattern[str], log: Any, stop_event: threading.Event | None
) -> Restarter:
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
        termination_file=settings.termination_file,
    )


def _docker_restarter(
    settings: Settings, pattern: re.Pattern[str], log: Any, stop_event: threading.Event | None
) -> Restarter:
    from sidecar.clients.docker_engine import DockerGateway

    gateway = DockerGateway(
        retry_window=settings.docker_retry_window, stop_event=stop_event, log=log
    )
    project = settings.compose_project or gateway.own_compose_project()
    assert settings.trainer_container is not None  # checked by the settings model
    if settings.restart_mode == "container":
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


def policy_of(settings: Settings) -> Policy:
    """How verdicts are reached: the stall, GPU-idle and start-up rules."""
    sections = None
    if settings.stall_timeout == "auto":
        sections = SectionTimeouts(settings.stall_timeout_floor, settings.stall_timeout_ceiling)
    return Policy(
        stall_timeout=settings.stall_timeout_bound,
        gpu_idle_timeout=settings.gpu_idle_timeout,
        gpu_idle_percent=settings.gpu_idle_percent,
        startup_grace=settings.startup_grace,
        sections=sections,
    )


def recovery_rules_of(settings: Settings) -> RecoveryRules:
    return RecoveryRules(
        max_restarts=settings.max_restarts,
        backoff=settings.restart_backoff,
        backoff_max=settings.restart_backoff_max,
        startup_grace=settings.startup_grace,
        max_futile=settings.max_futile_recoveries,
    )


def resume_options_of(settings: Settings) -> ResumeOptions:
    return ResumeOptions(
        ensure_save_state=settings.ensure_save_state,
        allow_scratch=settings.fallback == "scratch",
    )


def loop_options_of(settings: Settings) -> LoopOptions:
    return LoopOptions(
        poll_interval=settings.poll_interval,
        checkpoint_settle=settings.checkpoint_settle,
        keep_resume_current=settings.keep_resume_current,
        resume=resume_options_of(settings),
        policy=policy_of(settings),
        rules=recovery_rules_of(settings),
        max_lost_work=settings.max_lost_work,
        remediate=settings.remediate,
        interruptions=InterruptionOptions(
            resume=settings.resume_interrupted, max_in_a_row=settings.max_interruptions
        ),
    )
