"""Helpers for tests that run against the real Docker engine.

Every container made here comes from `BASE_IMAGE` (nothing can be pulled on the
build machines), carries `training-sidecar-test=1` plus this session's id, and is
force-removed when its context ends, so a failed test leaves nothing running.
`FlakyDockerProxy` stands between a client and the engine and can make the
daemon "unreachable" on demand without stopping dockerd. `build_image` builds (and
`image_id` names) the images the end-to-end tests run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import docker
import docker.errors
import pytest
import requests

BASE_IMAGE = os.environ.get("SIDECAR_TEST_BASE_IMAGE", "sidecar-base:bookworm")
DOCKER_SOCKET = "/var/run/docker.sock"
TEST_LABEL = "training-sidecar-test"
SESSION_LABEL = "training-sidecar-test-session"
# Distinguishes this pytest process's containers from those of a parallel run.
SESSION_ID = uuid.uuid4().hex[:12]
# Two commands for throwaway containers: one stops at once on SIGTERM, one ignores it
# (PID 1 without a handler does not die of SIGTERM), so only SIGKILL stops it.
GRACEFUL_COMMAND = ["bash", "-c", 'trap "exit 0" TERM; sleep 1000 & wait']
STUBBORN_COMMAND = ["sleep", "infinity"]


def docker_client(timeout: float = 30) -> Any:
    """A client for setting up and checking tests, separate from the code under test."""
    return docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}", version="1.41", timeout=timeout)


@functools.cache
def docker_available() -> bool:
    """Whether the engine answers and has the base image (cached: asked once per session)."""
    return _unavailable_reason() is None


@functools.cache
def _unavailable_reason() -> str | None:
    client = docker_client(timeout=5)
    try:
        client.ping()
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        return f"base image {BASE_IMAGE} missing (build it with .ci/bootstrap-base-image.sh)"
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        return f"Docker engine not reachable at {DOCKER_SOCKET}: {error}"
    finally:
        client.close()
    return None


def require_docker() -> None:
    """Skip without Docker on a laptop; fail in CI, where a missing engine is a broken setup."""
    reason = _unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but Docker tests cannot run: {reason}")
    pytest.skip(reason)


def unique_name(prefix: str) -> str:
    return f"sidecar-test-{prefix}-{uuid.uuid4().hex[:10]}"


# A cold build installs the dependencies from the package index; later ones hit the cache.
BUILD_TIMEOUT = 900


def run_command(
    command: list[str], timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def image_id(reference: str) -> str | None:
    result = run_command(["docker", "image", "inspect", "--format", "{{.Id}}", reference])
    return result.stdout.strip() if result.returncode == 0 else None


def build_image(tag: str, context: Path, build_args: dict[str, str]) -> int:
    """Build ``tag``; drop the image it replaces (as test_packaging does); its size in bytes."""
    previous = image_id(tag)
    arguments = [
        part for name, value in build_args.items() for part in ("--build-arg", f"{name}={value}")
    ]
    result = run_command(
        ["docker", "build", *arguments, "--tag", tag, str(context)], timeout=BUILD_TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail(
            f"docker build of {tag} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    current = image_id(tag)
    if previous and previous != current:
        # Refused while a container uses it: harmless.
        run_command(["docker", "image", "rm", previous])
    size = run_command(["docker", "image", "inspect", "--format", "{{.Size}}", tag])
    return int(size.stdout.strip())


class ThrowawayContainers:
    """Creates containers from BASE_IMAGE and removes every one of them in `remove_all`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._created: list[Any] = []

    def create(
        self,
        command: list[str] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        start: bool = True,
        **options: Any,
    ) -> Any:
        """A new container (started unless `start=False`); options go to `containers.create`."""
        container = self.client.containers.create(
            BASE_IMAGE,
            command or STUBBORN_COMMAND,
            name=name or unique_name("box"),
            labels={**(labels or {}), TEST_LABEL: "1", SESSION_LABEL: SESSION_ID},
            **options,
        )
        self._created.append(container)
        if start:
            container.start()
        container.reload()
        return container

    def remove_all(self) -> None:
        for container in self._created:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        self._created.clear()
        # Catches containers a test made directly with the client but labelled as ours.
        remove_session_containers(self.client)


def remove_session_containers(client: Any) -> None:
    for container in client.containers.list(
        all=True, filters={"label": f"{SESSION_LABEL}={SESSION_ID}"}
    ):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


@contextlib.contextmanager
def throwaway_containers() -> Iterator[ThrowawayContainers]:
    """A container factory whose containers are force-removed when the block ends."""
    client = docker_client()
    factory = ThrowawayContainers(client)
    try:
        yield factory
    finally:
        factory.remove_all()
        client.close()


@contextlib.contextmanager
def throwaway_container(command: list[str] | None = None, **options: Any) -> Iterator[Any]:
    """One started container, force-removed when the block ends."""
    with throwaway_containers() as containers:
        yield containers.create(command, **options)


class FlakyDockerProxy:
    """A unix-socket proxy to the Docker socket whose link can be cut and restored.

    `cut()` closes the listening socket and every open connection: in-flight calls see
    the connection drop, new ones are refused, as when dockerd restarts. `restore()`
    listens again at the same path. Bytes are forwarded untouched (HTTP, exec streams).
    """

    _ACCEPT_POLL = 0.1

    def __init__(self, upstream: str = DOCKER_SOCKET) -> None:
        self.upstream = upstream
        self._directory = tempfile.mkdtemp(prefix="flaky-docker-")
        self.path = os.path.join(self._directory, "docker.sock")
        self.url = f"unix://{self.path}"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.accepted = 0
        self.restore()

    # -- control ---------------------------------------------------------------------------

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            _close(listener)
        for connection in connections:
            _close(connection)

    def restore(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("proxy is closed")
            if self._listener is not None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
            listener.listen(64)
            listener.settimeout(self._ACCEPT_POLL)
            self._listener = listener
        self._spawn(self._accept_loop, listener)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=1)
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> FlakyDockerProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- forwarding ------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        # Polls instead of blocking in accept(): closing a socket from another thread
        # does not reliably wake a thread blocked on it.
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed by cut()
            client.settimeout(None)
            self._link(client)

    def _link(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:
            _close(client)
            _close(upstream)
            return
        with self._lock:
            if self._listener is None:  # cut while we were connecting
                _close(client)
                _close(upstream)
                return
            self._connections.update((client, upstream))
            self.accepted += 1
        self._spawn(self._serve_link, client, upstream)

    def _serve_link(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward both ways; once both directions ended, release the pair."""
        replies = self._spawn(_pump, upstream, client)
        _pump(client, upstream)
        replies.join()
        with self._lock:
            self._connections.difference_update((client, upstream))
        _close(client)
        _close(upstream)

    def _spawn(self, target: Any, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [known for known in self._threads if known.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread


def _pump(source: socket.socket, destination: socket.socket) -> None:
    """Copy one direction until end of stream, then pass the end on (half-close)."""
    try:
        while data := source.recv(65536):
            destination.sendall(data)
    except OSError:
        _close(source)
        _close(destination)
        return
    try:
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        _close(destination)


def _close(sock: socket.socket) -> None:
    """Shut down first: it wakes any thread blocked on the socket, which close() alone does not."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def poll_until(predicate: Any, *, timeout: float, interval: float = 0.05) -> Any:
    """The first truthy value of `predicate()`, or the last one once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class ContainerReachableProxy(FlakyDockerProxy):
    """FlakyDockerProxy whose socket a UID 1000 process in a container may connect to.

    Its folder is bind-mounted into the sidecar (a folder, not the socket file, so that the
    socket `restore()` makes anew is seen there too); the socket is created world-writable
    (connect(2) needs write permission) in one step, so a client never meets it half-ready.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folder = os.path.dirname(self.path)
        os.chmod(self.folder, 0o755)

    def restore(self) -> None:
        previous = os.umask(0)
        try:
            super().restore()
        finally:
            os.umask(previous)
