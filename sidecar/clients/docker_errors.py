"""What a failed Docker Engine call means: retry it, or raise which of the sidecar's errors.

docker-py, requests and urllib3 each raise their own exception trees, and wrap the real
cause (an OSError) in different places. This module reads through them once, so the
gateway only asks two questions (may the same call succeed later? may the daemon have
carried it out?) and raises one of the few `DockerError`s below, whose messages say what
to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import docker.errors
import requests
import urllib3.exceptions

from sidecar.clients.retry import describe_error

# Older engines answer some of these with a 500 instead of a 404/409; retrying cannot help.
_MISSING = re.compile(r"no such (container|exec instance)", re.IGNORECASE)
_NOT_RUNNING = re.compile(r"is not running|is restarting|is paused", re.IGNORECASE)


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
    return DockerError(f"Docker {operation} of {subject} failed: {describe_error(error)}")


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


def worth_retrying(error: BaseException, *, replay_safe: bool) -> bool:
    """Retry a transient failure, unless the call must not run twice and may have run once."""
    if not is_transient(error):
        return False
    return replay_safe or not may_have_taken_effect(error)
