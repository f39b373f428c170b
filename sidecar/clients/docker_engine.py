"""Every Docker Engine call the sidecar makes, behind one gateway with retries.

The sidecar must outlive the things that go wrong around a long training run: the
daemon restarting, a socket proxy hiccuping, an engine too busy to answer. Those
failures are retried here (bounded, with backoff, ending promptly on shutdown);
failures that waiting cannot fix (no such container, permission denied, a
conflict) are raised at once as a handful of exceptions whose messages say what
to change. The rest of the sidecar never sees requests, urllib3 or docker-py
exception trees, only `ContainerInfo`, `ExecInfo` and `DockerError`.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests
import structlog
import urllib3.exceptions
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_when_event_set,
)
from tenacity.stop import stop_base

from sidecar.clients.retry import RetryWindowSpent, api_backoff

T = TypeVar("T")

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_ONEOFF_LABEL = "com.docker.compose.oneoff"

# Docker reports "never" as the zero time of Go, not as null.
_ZERO_TIME_PREFIX = "0001-01-01T00:00:00"
# Older engines answer some of these with a 500 instead of a 404/409; retrying cannot help.
_MISSING = re.compile(r"no such (container|exec instance)", re.IGNORECASE)
_NOT_RUNNING = re.compile(r"is not running|is restarting|is paused", re.IGNORECASE)
# Short (hostname) or full container id.
_CONTAINER_ID = re.compile(r"[0-9a-f]{12}|[0-9a-f]{64}")
_MOUNTED_CONTAINER_DIR = re.compile(r"/containers/([0-9a-f]{64})/")
_CGROUP_CONTAINER = re.compile(r"(?:/docker/|docker-)([0-9a-f]{64})")


class DockerError(Exception):
    """A Docker Engine call failed; the message names the call and the reason."""


class DockerUnavailable(DockerError):
    """The daemon stayed unreachable (or kept failing internally) for the whole retry window."""


class ContainerNotFound(DockerError):
    """No container (or exec instance) matches what was looked for."""


class ContainerNotRunning(DockerError):
    """The container exists but is stopped, restarting or paused, so it cannot run an exec."""


class DockerPermissionDenied(DockerError):
    """The socket or the API refused us; waiting will not help, configuration will."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    status: str  # created|running|restarting|exited|paused|dead|removing
    running: bool
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    restart_count: int
    pid: int | None
    labels: dict[str, str]
    image: str


@dataclass(frozen=True)
class ExecInfo:
    running: bool
    exit_code: int | None
    pid: int | None


# -- classifying failures ------------------------------------------------------------------


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps.

    urllib3 hides the real OSError in ``args`` (``ProtocolError('Connection aborted.',
    ConnectionRefusedError(...))``) and in ``MaxRetryError.reason`` rather than in
    ``__cause__``, so all three are followed.
    """
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
        if current.__cause__ is not None:
            pending.append(current.__cause__)


def _wraps(
    error: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    return any(isinstance(cause, kinds) for cause in _causes(error))


def _explanation(error: docker.errors.APIError) -> str:
    return str(error.explanation or "").strip() or str(error)


_CONNECTION_FAILURES = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    # Raw socket reads (exec output) raise the builtins unwrapped.
    ConnectionError,
    TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    """True when the same call may succeed later: daemon unreachable, slow, or failing internally.

    With a fixed API version docker-py connects lazily and a dead daemon surfaces as
    ``requests.exceptions.ConnectionError``, which is not a ``DockerException``; with
    ``version="auto"`` it is a bare ``DockerException`` wrapping the same error. Both count.
    """
    if isinstance(error, docker.errors.APIError):
        status = error.status_code
        if status is None or status < 500:
            return False
        explanation = _explanation(error)
        return not (_MISSING.search(explanation) or _NOT_RUNNING.search(explanation))
    if _wraps(error, PermissionError):
        return False
    if isinstance(error, _CONNECTION_FAILURES):
        return True
    if isinstance(error, docker.errors.DockerException):
        return _wraps(error, (*_CONNECTION_FAILURES, FileNotFoundError))
    return False


def may_have_taken_effect(error: BaseException) -> bool:
    """False only when the daemon certainly did not carry the request out.

    An HTTP error answer means the daemon refused or failed the operation; a refused or
    missing socket means the request never left. A timeout or a dropped connection
    leaves it open whether the daemon acted.
    """
    if isinstance(error, docker.errors.APIError):
        return False
    never_sent = (
        ConnectionRefusedError,
        FileNotFoundError,
        urllib3.exceptions.NewConnectionError,
        requests.exceptions.ConnectTimeout,
    )
    return not _wraps(error, never_sent)


def to_docker_error(
    error: BaseException, *, operation: str, subject: str, endpoint: str
) -> DockerError:
    """The sidecar's exception for a failure that retrying cannot fix."""
    if isinstance(error, docker.errors.APIError):
        return _from_api_error(error, operation=operation, subject=subject, endpoint=endpoint)
    if _wraps(error, PermissionError):
        return DockerPermissionDenied(_socket_permission_message(endpoint))
    return DockerError(f"Docker {operation} of {subject} failed: {_describe(error)}")


def _from_api_error(
    error: docker.errors.APIError, *, operation: str, subject: str, endpoint: str
) -> DockerError:
    status = error.status_code
    explanation = _explanation(error)
    if status in (401, 403):
        return DockerPermissionDenied(
            _api_permission_message(endpoint, operation, subject, status, explanation)
        )
    if isinstance(error, docker.errors.NotFound) or _MISSING.search(explanation):
        return ContainerNotFound(f"{subject} not found (Docker {operation}): {explanation}")
    if _NOT_RUNNING.search(explanation):
        return ContainerNotRunning(f"Docker {operation} of {subject} refused: {explanation}")
    if status == 409:
        return DockerError(f"Docker {operation} of {subject} conflicts (HTTP 409): {explanation}")
    return DockerError(f"Docker {operation} of {subject} failed (HTTP {status}): {explanation}")


def _api_permission_message(
    endpoint: str, operation: str, subject: str, status: int, explanation: str
) -> str:
    return (
        f"the Docker API at {endpoint} refused {operation} of {subject} "
        f"(HTTP {status}: {explanation}). A socket proxy in front of the engine is probably "
        "filtering the call: allow it (docker-socket-proxy: CONTAINERS=1 to find and inspect, "
        "POST=1 or ALLOW_RESTARTS=1 to restart, EXEC=1 as well for exec mode), or point "
        "DOCKER_HOST at a socket that permits it"
    )


def _socket_permission_message(endpoint: str) -> str:
    return (
        f"cannot open the Docker socket {endpoint}: permission denied. Mount "
        "/var/run/docker.sock into the sidecar container and run the sidecar as root or with "
        "the socket's group (compose: group_add with the number printed by "
        "`stat -c %g /var/run/docker.sock` on the host), or set DOCKER_HOST to a socket "
        "proxy the sidecar may reach"
    )


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    return f"{type(error).__name__}: {error}"


# -- reading engine answers ----------------------------------------------------------------


def _timestamp_or_none(value: str | None) -> str | None:
    if not value or value.startswith(_ZERO_TIME_PREFIX):
        return None
    return value


def parse_docker_time(value: str) -> datetime:
    """Docker's RFC 3339 timestamps (nanoseconds, ``Z``) as aware datetimes, for ordering."""
    return datetime.fromisoformat(value)


def container_info(raw: dict[str, Any]) -> ContainerInfo:
    """Our view of ``GET /containers/{id}/json``."""
    state = raw.get("State") or {}
    config = raw.get("Config") or {}
    status = str(state.get("Status", "unknown"))
    # Docker keeps ExitCode 0 while a container runs; only a finished one has a real status.
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    return ContainerInfo(
        id=raw["Id"],
        name=str(raw.get("Name", "")).lstrip("/"),
        status=status,
        running=bool(state.get("Running")),
        exit_code=exit_code,
        started_at=_timestamp_or_none(state.get("StartedAt")),
        finished_at=_timestamp_or_none(state.get("FinishedAt")),
        restart_count=int(raw.get("RestartCount") or 0),
        pid=state.get("Pid") or None,
        labels=dict(config.get("Labels") or {}),
        image=str(config.get("Image") or raw.get("Image") or ""),
    )


def own_container_id_candidates(hostname: str, mountinfo: str, cgroup: str) -> list[str]:
    """Ids under which the current process's container may be known to the engine.

    Docker sets the hostname to the short id unless compose or ``--hostname`` overrides
    it; ``/etc/hostname`` is bind-mounted from ``/var/lib/docker/containers/<id>/`` and
    cgroup v1 paths carry ``/docker/<id>``, which covers the override.
    """
    found: list[str] = []
    if _CONTAINER_ID.fullmatch(hostname):
        found.append(hostname)
    found += _MOUNTED_CONTAINER_DIR.findall(mountinfo)
    found += _CGROUP_CONTAINER.findall(cgroup)
    found += _CGROUP_CONTAINER.findall(mountinfo)
    return list(dict.fromkeys(found))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        # Not Linux, or /proc hidden: nothing to learn from it, which is an answer too.
        return ""


# -- retry policy --------------------------------------------------------------------------


def _worth_retrying(error: BaseException, *, replay_safe: bool) -> bool:
    if not is_transient(error):
        return False
    return replay_safe or not may_have_taken_effect(error)


# -- the gateway ---------------------------------------------------------------------------


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
        self._stop_event = stop_event
        # Waiting on the stop event (rather than time.sleep) ends a backoff at once on SIGTERM.
        self._sleep = sleep or (_event_sleep(stop_event) if stop_event else time.sleep)
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
        chosen = max(candidates, key=_preference)
        projects = sorted({str(_labels(raw).get(COMPOSE_PROJECT_LABEL)) for raw in candidates})
        if len(projects) > 1:
            self._log.warning(
                "docker_service_ambiguous",
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
        An unreachable daemon is still retried for the retry window first (then logged).
        """
        candidates = own_container_id_candidates(
            socket.gethostname(),
            _read_text("/proc/self/mountinfo"),
            _read_text("/proc/self/cgroup"),
        )
        for candidate in candidates:
            try:
                raw = self._inspect_raw(candidate)
            except ContainerNotFound:
                continue
            except DockerError as error:
                self._log.warning("docker_own_container_unknown", error=str(error))
                return None
            # A hex-looking container *name* can match too; only an id prefix is us.
            if raw["Id"].startswith(candidate):
                return _labels(raw).get(COMPOSE_PROJECT_LABEL)
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
        running = bool(raw.get("Running"))
        return ExecInfo(
            running=running,
            exit_code=None if running else raw.get("ExitCode"),
            pid=raw.get("Pid") or None,
        )

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
        stop: stop_base = RetryWindowSpent(self.retry_window)
        if self._stop_event is not None:
            stop = stop | stop_when_event_set(self._stop_event)
        retrying = Retrying(
            retry=retry_if_exception(lambda error: _worth_retrying(error, replay_safe=replay_safe)),
            wait=api_backoff(),
            stop=stop,
            sleep=self._sleep,
            before_sleep=lambda state: self._log_retry(operation, subject, state),
            reraise=True,
        )
        try:
            return retrying(self._attempt, action)
        except (docker.errors.DockerException, OSError) as error:
            raise self._failure(
                error, operation, subject, retrying.statistics, replay_safe=replay_safe
            ) from error

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
        statistics: dict[str, Any],
        *,
        replay_safe: bool,
    ) -> DockerError:
        if not is_transient(error):
            return to_docker_error(
                error, operation=operation, subject=subject, endpoint=self.base_url
            )
        attempts = statistics.get("attempt_number", 1)
        if self._stop_event is not None and self._stop_event.is_set():
            return DockerUnavailable(
                f"gave up Docker {operation} of {subject} after {attempts} attempt(s): "
                f"shutdown requested; last error from {self.base_url}: {_describe(error)}"
            )
        if not replay_safe and may_have_taken_effect(error):
            return DockerUnavailable(
                f"Docker {operation} of {subject} was interrupted ({_describe(error)}); the "
                f"daemon at {self.base_url} may have carried it out, so it was not repeated"
            )
        spent = max(
            statistics.get("delay_since_first_attempt", 0.0), statistics.get("idle_for", 0.0)
        )
        return DockerUnavailable(
            f"Docker daemon at {self.base_url} unreachable for {operation} of {subject}: "
            f"{attempts} attempt(s) over {spent:.1f} s (retry window {self.retry_window:g} s); "
            f"last error: {_describe(error)}"
        )

    def _log_retry(self, operation: str, subject: str, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        self._log.warning(
            "docker_retry",
            operation=operation,
            subject=subject,
            attempt=state.attempt_number,
            delay=round(state.upcoming_sleep, 2),
            error=_describe(error),
            docker_host=self.base_url,
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


def _event_sleep(event: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        event.wait(seconds)

    return sleep


def _labels(raw: dict[str, Any]) -> dict[str, str]:
    return dict((raw.get("Config") or {}).get("Labels") or {})


def _preference(raw: dict[str, Any]) -> tuple[bool, datetime]:
    """Running beats stopped; among equals the most recently created wins."""
    return bool((raw.get("State") or {}).get("Running")), parse_docker_time(raw["Created"])


def _container(container_id: str) -> str:
    return f"container '{container_id}'"


def _exec_instance(exec_id: str, container_id: str) -> str:
    return f"exec instance '{exec_id[:12]}' in container '{container_id}'"
