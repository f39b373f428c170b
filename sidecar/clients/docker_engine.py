"""Every Docker Engine call the sidecar makes, behind one gateway with retries.

The sidecar must outlive the things that go wrong around a long training run: the
daemon restarting, a socket proxy hiccuping, an engine too busy to answer. Those
failures are retried here (bounded, with backoff, ending promptly on shutdown);
failures that waiting cannot fix (no such container, permission denied, a
conflict) are raised at once as a handful of exceptions whose messages say what
to change (sidecar.clients.docker_errors). The rest of the sidecar never sees
requests, urllib3 or docker-py exception trees, only `ContainerInfo`, `ExecInfo`
and `DockerError`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import structlog

from sidecar import events
from sidecar.clients.docker_answers import (
    ContainerInfo,
    ExecInfo,
    container_info,
    exec_info,
    labels,
    preference,
)
from sidecar.clients.docker_errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    is_transient,
    may_have_taken_effect,
    to_docker_error,
    worth_retrying,
)
from sidecar.clients.docker_own_container import own_container_ids
from sidecar.clients.retry import (
    SHUTTING_DOWN,
    RetriedCall,
    backoff_sleep,
    describe_error,
    log_retry,
)

T = TypeVar("T")

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_ONEOFF_LABEL = "com.docker.compose.oneoff"


class DockerGateway:
    """The sidecar's only door to the Docker Engine.

    Constructing it never contacts the daemon: the client is created on first use with a
    fixed API version (``version="auto"`` would ask the daemon at once and fail a sidecar
    that merely started before dockerd). After a connection failure the client is dropped
    and rebuilt, so the sidecar survives the daemon restarting.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_version: str = "1.41",
        timeout: float = 30.0,
        retry_window: float = 60.0,
        stop_event: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
        log: Any | None = None,
    ) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        self.api_version = api_version
        self.timeout = timeout
        self.retry_window = retry_window
        # Set on SIGTERM: retries end then, instead of waiting out the window in an outage.
        self._stop_event = stop_event
        self._sleep = backoff_sleep(sleep, stop_event)
        self._log = log or structlog.get_logger("sidecar.docker")
        self._client: Any | None = None
        self._client_lock = threading.Lock()

    # -- containers ------------------------------------------------------------------------

    def find_container(self, ref: str, *, project: str | None = None) -> ContainerInfo:
        """The container named or identified by ``ref``, else compose service ``ref``.

        Compose names containers ``<project>-<service>-<n>`` (or with underscores), so a
        service is found by its labels, never by guessing that name. ``compose run``
        containers are skipped: they are one-off helpers, not the trainer.
        """
        if not ref:
            raise ValueError("container reference must not be empty")
        try:
            return self.inspect(ref)
        except ContainerNotFound:
            pass
        candidates = self._compose_service_containers(ref, project)
        if not candidates:
            where = f"in project '{project}'" if project else "in any compose project"
            raise ContainerNotFound(
                f"no container named '{ref}' and no compose service '{ref}' {where} "
                "(one-off `compose run` containers are ignored)"
            )
        chosen = max(candidates, key=preference)
        projects = sorted({str(labels(raw).get(COMPOSE_PROJECT_LABEL)) for raw in candidates})
        if len(projects) > 1:
            self._log.warning(
                events.DOCKER_SERVICE_AMBIGUOUS,
                service=ref,
                projects=projects,
                chosen=chosen["Id"][:12],
                hint="set the compose project to pick one",
            )
        return container_info(chosen)

    def own_compose_project(self) -> str | None:
        """The compose project of the container the sidecar runs in; None when unknown.

        Used to look for the trainer service in the sidecar's own project. Never raises:
        not running in a container, or in one the engine does not know, is an answer.
        An unreachable daemon is still retried for the retry window (or until shutdown) first,
        then logged.
        """
        for candidate in own_container_ids():
            try:
                raw = self._inspect_raw(candidate)
            except ContainerNotFound:
                continue
            except DockerError as error:
                self._log.warning(events.DOCKER_OWN_CONTAINER_UNKNOWN, error=str(error))
                return None
            # A hex-looking container *name* can match too; only an id prefix is us.
            if raw["Id"].startswith(candidate):
                return labels(raw).get(COMPOSE_PROJECT_LABEL)
        return None

    def inspect(self, container_id: str) -> ContainerInfo:
        return container_info(self._inspect_raw(container_id))

    def restart(self, container_id: str, *, timeout: float) -> None:
        """Restart through the Engine API, so the restart policy stays in force.

        ``kill`` or ``stop`` + ``start`` would mark the container as manually stopped,
        and its restart policy would not bring it back after a later crash.
        """
        # The Engine parses ``t`` as an integer (a fraction is a 500 "strconv.Atoi" error);
        # rounding up never shortens the grace period asked for. docker-py sets this call's
        # read timeout to the client timeout plus ``t``, so a long grace is no ReadTimeout.
        grace = max(0, math.ceil(timeout))
        # Replaying a restart whose answer was lost costs one more restart of a trainer
        # that has only just started: harmless, unlike giving up.
        self._call(
            "restart",
            _container(container_id),
            lambda api: api.restart(container_id, timeout=grace),
        )

    def start(self, container_id: str) -> None:
        """Start a stopped container; starting a running one is a no-op for the Engine."""
        self._call("start", _container(container_id), lambda api: api.start(container_id))

    # -- exec ------------------------------------------------------------------------------

    def exec_detached(
        self,
        container_id: str,
        command: list[str],
        *,
        workdir: str | None = None,
        user: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> str:
        """Start ``command`` in the container without waiting; returns the exec id.

        ``environment`` is laid over the container's own (the Engine merges: a variable given
        here wins, one not given keeps the container's value); ``workdir`` None is the
        container's working directory.

        The start is not repeated when its answer was lost: the command may already run,
        and a second trainer on the same GPU is worse than a reported failure.
        """
        exec_id = self._exec_create(
            container_id,
            command,
            attach=False,
            workdir=workdir,
            user=user,
            environment=environment,
        )
        self._call(
            "exec start",
            _exec_instance(exec_id, container_id),
            lambda api: api.exec_start(exec_id, detach=True),
            replay_safe=False,
        )
        return exec_id

    def exec_inspect(self, exec_id: str) -> ExecInfo:
        raw = self._call(
            "exec inspect", f"exec instance '{exec_id}'", lambda api: api.exec_inspect(exec_id)
        )
        return exec_info(raw)

    def exec_output(
        self, container_id: str, command: list[str], *, user: str | None = None
    ) -> tuple[int, str]:
        """Run a short command in the container; its exit code and stdout+stderr.

        The output is read with the client timeout, so this is for commands that finish
        in seconds (``cat``, ``ps``), not for anything long-running.
        """
        exec_id = self._exec_create(container_id, command, attach=True, user=user)
        output = self._call(
            "exec start",
            _exec_instance(exec_id, container_id),
            lambda api: api.exec_start(exec_id, detach=False, tty=False),
            replay_safe=False,
        )
        text = (output or b"").decode("utf-8", errors="replace")
        return self._exit_code_after_output(exec_id, command), text

    def close(self) -> None:
        """Release pooled connections; the next call reconnects."""
        self._drop_client()

    # -- internals -------------------------------------------------------------------------

    def _inspect_raw(self, container_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "inspect", _container(container_id), lambda api: api.inspect_container(container_id)
        )
        return result

    def _compose_service_containers(
        self, service: str, project: str | None
    ) -> list[dict[str, Any]]:
        wanted = [f"{COMPOSE_SERVICE_LABEL}={service}"]
        if project:
            wanted.append(f"{COMPOSE_PROJECT_LABEL}={project}")
        listed = self._call(
            "list",
            f"compose service '{service}'",
            lambda api: api.containers(all=True, filters={"label": wanted}),
        )
        found = []
        for summary in listed:
            if str((summary.get("Labels") or {}).get(COMPOSE_ONEOFF_LABEL, "")).lower() == "true":
                continue
            try:
                found.append(self._inspect_raw(summary["Id"]))
            except ContainerNotFound:
                continue  # removed between listing and inspecting
        return found

    def _exec_create(
        self,
        container_id: str,
        command: list[str],
        *,
        attach: bool,
        workdir: str | None = None,
        user: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> str:
        # A replayed create leaves at most an unused exec instance behind: safe to retry.
        created = self._call(
            "exec create",
            _container(container_id),
            lambda api: api.exec_create(
                container_id,
                command,
                stdout=attach,
                stderr=attach,
                user=user or "",
                environment=environment,
                workdir=workdir,
            ),
        )
        return str(created["Id"])

    def _exit_code_after_output(self, exec_id: str, command: list[str]) -> int:
        # The output stream can close a moment before the engine records the exit code.
        deadline = time.monotonic() + 5.0
        while True:
            info = self.exec_inspect(exec_id)
            if info.exit_code is not None:
                return info.exit_code
            if time.monotonic() >= deadline:
                raise DockerError(f"exec {command!r} ended its output but reported no exit code")
            time.sleep(0.05)

    def _call(
        self,
        operation: str,
        subject: str,
        action: Callable[[Any], T],
        *,
        replay_safe: bool = True,
    ) -> T:
        """Run ``action(api)`` with retries on transient failures; translate the rest."""
        call: RetriedCall[T] = RetriedCall(
            worth_retrying=lambda error: worth_retrying(error, replay_safe=replay_safe),
            window=self.retry_window,
            stop_event=self._stop_event,
            sleep=self._sleep,
            before_sleep=log_retry(
                self._log,
                events.DOCKER_RETRY,
                operation=operation,
                subject=subject,
                docker_host=self.base_url,
            ),
        )
        try:
            return call(lambda: self._attempt(action))
        except (docker.errors.DockerException, OSError) as error:
            raise self._failure(error, operation, subject, call, replay_safe=replay_safe) from error

    def _attempt(self, action: Callable[[Any], T]) -> T:
        api = self._api()
        try:
            return action(api)
        except (docker.errors.DockerException, OSError) as error:
            if is_transient(error) and not isinstance(error, docker.errors.APIError):
                # Pooled connections to a daemon that went away are useless; start afresh.
                self._drop_client()
            raise

    def _failure(
        self,
        error: BaseException,
        operation: str,
        subject: str,
        call: RetriedCall[Any],
        *,
        replay_safe: bool,
    ) -> DockerError:
        if not is_transient(error):
            return to_docker_error(
                error, operation=operation, subject=subject, endpoint=self.base_url
            )
        if call.shutting_down:
            return DockerUnavailable(
                f"gave up Docker {operation} of {subject} after {call.attempts} attempt(s): "
                f"{SHUTTING_DOWN}; last error from {self.base_url}: {describe_error(error)}"
            )
        if not replay_safe and may_have_taken_effect(error):
            return DockerUnavailable(
                f"Docker {operation} of {subject} was interrupted ({describe_error(error)}); the "
                f"daemon at {self.base_url} may have carried it out, so it was not repeated"
            )
        return DockerUnavailable(
            f"Docker daemon at {self.base_url} unreachable for {operation} of {subject}: "
            f"{call.attempts} attempt(s) over {call.spent:.1f} s (retry window "
            f"{self.retry_window:g} s); last error: {describe_error(error)}"
        )

    def _api(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = docker.DockerClient(
                    base_url=self.base_url, version=self.api_version, timeout=self.timeout
                )
            return self._client.api

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _container(container_id: str) -> str:
    return f"container '{container_id}'"


def _exec_instance(exec_id: str, container_id: str) -> str:
    return f"exec instance '{exec_id[:12]}' in container '{container_id}'"
