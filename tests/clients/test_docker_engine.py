"""The Docker gateway against the real engine, plus its retry classification.

Containers come from the local base image and are force-removed after each test.
`FlakyDockerProxy` makes the daemon unreachable on demand; a recording `sleep`
shows the backoff schedule without waiting it out.
"""

from __future__ import annotations

import http.client
import json
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
import structlog
import urllib3.exceptions
from docker_support import (
    BASE_IMAGE,
    DOCKER_SOCKET,
    GRACEFUL_COMMAND,
    STUBBORN_COMMAND,
    FlakyDockerProxy,
    ThrowawayContainers,
    poll_until,
    require_docker,
    throwaway_containers,
    unique_name,
)
from repo_paths import REPO_ROOT

from sidecar import events
from sidecar.clients.docker_answers import parse_docker_time
from sidecar.clients.docker_engine import (
    COMPOSE_ONEOFF_LABEL,
    COMPOSE_PROJECT_LABEL,
    COMPOSE_SERVICE_LABEL,
    DockerGateway,
)
from sidecar.clients.docker_errors import (
    ContainerNotFound,
    ContainerNotRunning,
    DockerError,
    DockerPermissionDenied,
    DockerUnavailable,
    is_transient,
    may_have_taken_effect,
    to_docker_error,
)
from sidecar.clients.docker_own_container import own_container_id_candidates

pytestmark = pytest.mark.docker


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_engine() -> None:
    require_docker()


@pytest.fixture
def containers(docker_engine: None) -> Iterator[ThrowawayContainers]:
    with throwaway_containers() as factory:
        yield factory


@pytest.fixture
def sleeps() -> list[float]:
    """Delays the gateway asked to sleep; appending instead of sleeping keeps tests fast."""
    return []


@pytest.fixture
def gateway(docker_engine: None, sleeps: list[float]) -> Iterator[DockerGateway]:
    gateway = DockerGateway(base_url=f"unix://{DOCKER_SOCKET}", retry_window=5, sleep=sleeps.append)
    yield gateway
    gateway.close()


@pytest.fixture
def proxy(docker_engine: None) -> Iterator[FlakyDockerProxy]:
    with FlakyDockerProxy() as flaky:
        yield flaky


def recording_real_sleep(delays: list[float]) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        delays.append(seconds)
        time.sleep(seconds)

    return sleep


def later(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


def started(info_started_at: str | None) -> Any:
    assert info_started_at is not None
    return parse_docker_time(info_started_at)


# -- classification (no engine needed) -----------------------------------------------------


def engine_error(status: int, message: str) -> docker.errors.APIError:
    """The APIError docker-py itself builds from an Engine answer with this status."""
    response = requests.Response()
    response.status_code = status
    response.url = "http+docker://localhost/v1.41/containers/trainer/json"
    response.reason = http.client.responses.get(status, "")
    response._content = json.dumps({"message": message}).encode()
    with pytest.raises(docker.errors.APIError) as raised:
        docker.errors.create_api_error_from_http_exception(
            requests.exceptions.HTTPError(response=response)
        )
    return raised.value


def aborted(cause: BaseException) -> requests.exceptions.ConnectionError:
    """What requests raises when the unix socket fails: the OSError two wrappers deep."""
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", cause)
    )


REFUSED = aborted(ConnectionRefusedError(111, "Connection refused"))
DROPPED = aborted(http.client.RemoteDisconnected("Remote end closed connection"))


@pytest.mark.parametrize(
    ("error", "transient", "permanent_type"),
    [
        (REFUSED, True, None),
        (aborted(FileNotFoundError(2, "No such file or directory")), True, None),
        (requests.exceptions.ReadTimeout("read timed out"), True, None),
        (engine_error(500, "containerd: connection error"), True, None),
        (engine_error(502, "bad gateway"), True, None),
        (engine_error(503, "proxy: upstream unavailable"), True, None),
        (engine_error(404, "No such container: trainer"), False, ContainerNotFound),
        (engine_error(500, "No such container: trainer"), False, ContainerNotFound),
        (engine_error(500, "Container abc is not running"), False, ContainerNotRunning),
        (engine_error(409, "Container abc is not running"), False, ContainerNotRunning),
        (engine_error(409, "removal of container abc is already in progress"), False, DockerError),
        (engine_error(403, "Forbidden"), False, DockerPermissionDenied),
        (engine_error(401, "Unauthorized"), False, DockerPermissionDenied),
        (aborted(PermissionError(13, "Permission denied")), False, DockerPermissionDenied),
        (docker.errors.DockerException("Error while fetching server API version"), False, None),
        (docker.errors.NullResource("Resource ID was not provided"), False, DockerError),
    ],
    ids=[
        "refused",
        "socket-missing",
        "read-timeout",
        "500",
        "502",
        "503",
        "404",
        "500-no-such-container",
        "500-not-running",
        "409-not-running",
        "409-conflict",
        "403",
        "401",
        "socket-eacces",
        "bare-docker-exception",
        "null-resource",
    ],
)
def test_classification(
    error: BaseException, transient: bool, permanent_type: type[DockerError] | None
) -> None:
    """Only unreachable, slow or internally failing daemons are retried; the rest map to a type."""
    assert is_transient(error) is transient
    if permanent_type is not None:
        translated = to_docker_error(
            error, operation="inspect", subject="container 'trainer'", endpoint="unix:///s"
        )
        assert type(translated) is permanent_type


def test_version_probe_failure_wrapping_a_connection_error_is_transient() -> None:
    """docker.from_env() wraps an unreachable daemon in a bare DockerException; still transient."""
    try:
        raise docker.errors.DockerException("Error while fetching server API version") from REFUSED
    except docker.errors.DockerException as error:
        assert is_transient(error)


def test_403_message_says_how_to_fix() -> None:
    """A proxy's 403 names the call and the proxy settings that would allow it."""
    error = to_docker_error(
        engine_error(403, "Forbidden"),
        operation="restart",
        subject="container 'trainer'",
        endpoint="tcp://socket-proxy:2375",
    )
    message = str(error)
    assert isinstance(error, DockerPermissionDenied)
    assert "restart of container 'trainer'" in message
    assert "tcp://socket-proxy:2375" in message
    assert "ALLOW_RESTARTS=1" in message and "EXEC=1" in message


def test_socket_eacces_message_says_how_to_fix() -> None:
    """EACCES on the socket explains the mount and the group to add."""
    error = to_docker_error(
        aborted(PermissionError(13, "Permission denied")),
        operation="inspect",
        subject="container 'trainer'",
        endpoint="unix:///var/run/docker.sock",
    )
    assert isinstance(error, DockerPermissionDenied)
    assert "/var/run/docker.sock" in str(error) and "group_add" in str(error)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (REFUSED, False),
        (aborted(FileNotFoundError(2, "No such file or directory")), False),
        (engine_error(500, "internal"), False),
        (DROPPED, True),
        (requests.exceptions.ReadTimeout("read timed out"), True),
    ],
    ids=["refused", "socket-missing", "http-error", "dropped", "read-timeout"],
)
def test_may_have_taken_effect(error: BaseException, expected: bool) -> None:
    """Only a connection never made proves the daemon did not act."""
    assert may_have_taken_effect(error) is expected


def test_own_container_id_candidates() -> None:
    """Hostname first when it looks like an id, then ids from mounts and cgroups; layers ignored."""
    full = "1e7805fdceef1ef688a8349272ae10278374c78f7dc9d37a5f293afa87340227"
    layer = "52ef27ed06370fa2c8654595edb2c204dda9e53cdbfd6c0e35ba2cd10da38e41"
    mountinfo = (
        f"72 48 0:39 / / rw - overlay overlay rw,upperdir=/var/lib/docker/overlay2/{layer}/diff\n"
        f"90 72 254:0 /var/lib/docker/containers/{full}/hostname /etc/hostname rw - ext4 /dev/vda\n"
    )
    cgroup = f"8:pids:/docker/{full}\n"
    assert own_container_id_candidates(full[:12], mountinfo, cgroup) == [full[:12], full]
    assert own_container_id_candidates("trainer-box", mountinfo, "0::/\n") == [full]
    assert own_container_id_candidates("laptop", "", "0::/\n") == []


# -- lazy client and retries without an engine ---------------------------------------------


def test_construction_contacts_no_daemon_and_failure_is_clear(tmp_path: Path) -> None:
    """A gateway to a missing socket builds fine; a call retries, then names host and call."""
    url = f"unix://{tmp_path}/missing.sock"
    delays: list[float] = []
    with structlog.testing.capture_logs() as events:
        gateway = DockerGateway(base_url=url, retry_window=3, sleep=delays.append)
        with pytest.raises(DockerUnavailable) as raised:
            gateway.inspect("trainer")
    message = str(raised.value)
    assert url in message and "inspect of container 'trainer'" in message
    assert "FileNotFoundError" in message and "retry window 3 s" in message
    assert delays, "transient failures must be retried"
    assert sum(delays) <= 3
    retries = [event for event in events if event["event"] == "docker_retry"]
    assert [event["attempt"] for event in retries] == list(range(1, len(delays) + 1))
    assert all(event["operation"] == "inspect" for event in retries)


def test_backoff_grows_exponentially_with_bounded_jitter(tmp_path: Path) -> None:
    """Delays follow 0.5 * 2^n (capped at 10 s) plus up to 0.5 s of jitter."""
    delays: list[float] = []
    gateway = DockerGateway(
        base_url=f"unix://{tmp_path}/x.sock", retry_window=60, sleep=delays.append
    )
    with pytest.raises(DockerUnavailable):
        gateway.inspect("trainer")
    assert len(delays) >= 6
    for attempt, delay in enumerate(delays):
        base = min(0.5 * 2**attempt, 10)
        assert base <= delay <= base + 0.5
    assert sum(delays) <= 60


def test_docker_host_is_the_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without base_url the gateway follows DOCKER_HOST, else the standard socket."""
    monkeypatch.setenv("DOCKER_HOST", "tcp://socket-proxy:2375")
    assert DockerGateway().base_url == "tcp://socket-proxy:2375"
    monkeypatch.delenv("DOCKER_HOST")
    assert DockerGateway().base_url == "unix:///var/run/docker.sock"


class _FakeApi:
    """Just enough of docker-py's APIClient for an exec start whose answer gets lost."""

    def __init__(self, start_failures: list[BaseException]) -> None:
        self.start_failures = start_failures
        self.starts = 0

    def exec_create(self, container: str, command: list[str], **options: Any) -> dict[str, str]:
        return {"Id": "feedface"}

    def exec_start(self, exec_id: str, **options: Any) -> bytes:
        self.starts += 1
        if self.start_failures:
            raise self.start_failures.pop(0)
        return b""


class _FakeClient:
    def __init__(self, api: _FakeApi) -> None:
        self.api = api

    def close(self) -> None:
        pass


def fake_engine(monkeypatch: pytest.MonkeyPatch, api: _FakeApi) -> list[_FakeClient]:
    """Every client the gateway builds, in order."""
    built: list[_FakeClient] = []

    def build(**options: Any) -> _FakeClient:
        built.append(_FakeClient(api))
        return built[-1]

    monkeypatch.setattr(docker, "DockerClient", build)
    return built


def test_exec_start_with_lost_answer_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed-out detached exec start may have launched the trainer: it is reported, not rerun."""
    api = _FakeApi([requests.exceptions.ReadTimeout("read timed out")])
    fake_engine(monkeypatch, api)
    delays: list[float] = []
    gateway = DockerGateway(retry_window=30, sleep=delays.append)
    with pytest.raises(DockerUnavailable, match="may have carried it out"):
        gateway.exec_detached("trainer", ["bash", "train.sh"])
    assert api.starts == 1
    assert delays == []


def test_exec_start_refused_before_sending_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection proves the start never happened, so it is safe to try again."""
    api = _FakeApi([REFUSED])
    clients = fake_engine(monkeypatch, api)
    delays: list[float] = []
    gateway = DockerGateway(retry_window=30, sleep=delays.append)
    assert clients == [], "constructing the gateway must not build a client"
    assert gateway.exec_detached("trainer", ["bash", "train.sh"]) == "feedface"
    assert api.starts == 2
    assert len(delays) == 1
    # The connection failure discarded the client; the retry ran on a fresh one.
    assert len(clients) == 2


class _DeadEngineApi(_FakeApi):
    """An APIClient whose daemon refuses every connection; counts the inspects tried."""

    def __init__(self) -> None:
        super().__init__([])
        self.inspects = 0

    def inspect_container(self, container: str) -> dict[str, Any]:
        self.inspects += 1
        raise REFUSED


def test_stop_during_backoff_ends_retries_without_another_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while backing off: the daemon is not asked again, and the error says why."""
    api = _DeadEngineApi()
    fake_engine(monkeypatch, api)
    stop = threading.Event()
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        stop.set()

    gateway = DockerGateway(retry_window=120, stop_event=stop, sleep=sleep)
    with pytest.raises(DockerUnavailable) as raised:
        gateway.inspect("trainer")
    assert "the sidecar is shutting down" in str(raised.value)
    assert "after 1 attempt(s)" in str(raised.value)
    assert (api.inspects, len(delays)) == (1, 1)


def test_unset_stop_event_retries_the_whole_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given but never set, the event changes nothing: the outage is retried as before."""
    api = _DeadEngineApi()
    fake_engine(monkeypatch, api)
    delays: list[float] = []
    gateway = DockerGateway(retry_window=20, stop_event=threading.Event(), sleep=delays.append)
    with pytest.raises(DockerUnavailable, match=r"unreachable for inspect .*\(retry window 20 s\)"):
        gateway.inspect("trainer")
    assert api.inspects == len(delays) + 1 >= 5
    assert sum(delays) <= 20


def test_stop_wakes_the_default_backoff_at_once(tmp_path: Path) -> None:
    """Without an injected sleep the backoff waits on the event: a stop ends it then."""
    stop = threading.Event()
    gateway = DockerGateway(
        base_url=f"unix://{tmp_path}/missing.sock", retry_window=120, stop_event=stop
    )
    later(0.3, stop.set)
    began = time.monotonic()
    with (
        structlog.testing.capture_logs() as logged,
        pytest.raises(DockerUnavailable, match="shutting down"),
    ):
        gateway.inspect("trainer")
    # The first backoff alone lasts 0.5-1 s; only the event can end the call sooner.
    assert time.monotonic() - began < 0.5
    assert len([event for event in logged if event["event"] == events.DOCKER_RETRY]) <= 1


# -- finding containers ----------------------------------------------------------------------


def test_find_by_name(containers: ThrowawayContainers, gateway: DockerGateway) -> None:
    """An exact container name resolves to that container, fully described."""
    container = containers.create(name=unique_name("byname"), labels={"purpose": "find"})
    info = gateway.find_container(container.name)
    assert info.id == container.id
    assert info.name == container.name
    assert (info.status, info.running, info.exit_code) == ("running", True, None)
    assert info.pid is not None and info.pid > 0
    assert info.started_at is not None and info.finished_at is None
    assert info.labels["purpose"] == "find"
    assert info.image == BASE_IMAGE


def test_find_by_id_prefix(containers: ThrowawayContainers, gateway: DockerGateway) -> None:
    """A short id (as `docker ps` prints it) resolves like the Docker CLI does."""
    container = containers.create()
    assert gateway.find_container(container.id[:12]).id == container.id


def compose_labels(project: str, service: str, *, oneoff: bool = False) -> dict[str, str]:
    return {
        COMPOSE_PROJECT_LABEL: project,
        COMPOSE_SERVICE_LABEL: service,
        COMPOSE_ONEOFF_LABEL: "True" if oneoff else "False",
    }


def test_find_compose_service_prefers_running_and_skips_oneoff(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """In a project a running service container beats a stopped one; `compose run` is ignored."""
    service, project, other = unique_name("svc"), unique_name("proj"), unique_name("other")
    running = containers.create(labels=compose_labels(project, service))
    containers.create(labels=compose_labels(project, service), start=False)  # newer, stopped
    containers.create(labels=compose_labels(project, service, oneoff=True))  # newest, running
    elsewhere = containers.create(labels=compose_labels(other, service))

    assert gateway.find_container(service, project=project).id == running.id
    with structlog.testing.capture_logs() as events:
        assert gateway.find_container(service).id == elsewhere.id  # newest running anywhere
    warnings = [event for event in events if event["event"] == "docker_service_ambiguous"]
    assert warnings and warnings[0]["projects"] == sorted([project, other])


def test_find_compose_service_prefers_newest_when_none_runs(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """Among stopped service containers the most recently created one is chosen."""
    service, project = unique_name("svc"), unique_name("proj")
    containers.create(labels=compose_labels(project, service), start=False)
    newest = containers.create(labels=compose_labels(project, service), start=False)
    assert gateway.find_container(service, project=project).id == newest.id


def test_oneoff_only_is_not_found(containers: ThrowawayContainers, gateway: DockerGateway) -> None:
    """A service that exists only as a `compose run` container is not the trainer."""
    service, project = unique_name("svc"), unique_name("proj")
    containers.create(labels=compose_labels(project, service, oneoff=True))
    with pytest.raises(ContainerNotFound):
        gateway.find_container(service, project=project)


def test_not_found_is_clear_and_not_retried(gateway: DockerGateway, sleeps: list[float]) -> None:
    """A missing container is reported at once with what was looked for and where."""
    name, project = unique_name("ghost"), unique_name("proj")
    with pytest.raises(ContainerNotFound) as raised:
        gateway.find_container(name, project=project)
    assert (
        f"no container named '{name}' and no compose service '{name}' in project '{project}'"
        in str(raised.value)
    )
    assert sleeps == []


def test_inspect_reports_exit_code(containers: ThrowawayContainers, gateway: DockerGateway) -> None:
    """A finished container reports its exit status and when it finished."""
    container = containers.create(["bash", "-c", "exit 7"])
    container.wait(timeout=10)
    info = gateway.inspect(container.id)
    assert (info.status, info.running, info.exit_code, info.pid) == ("exited", False, 7, None)
    assert info.finished_at is not None


# -- restart and start ---------------------------------------------------------------------


def test_restart_keeps_container_and_stops_gracefully(
    containers: ThrowawayContainers, gateway: DockerGateway, sleeps: list[float]
) -> None:
    """Restart sends SIGTERM first (fast for a cooperative process) and keeps the same container."""
    container = containers.create(GRACEFUL_COMMAND)
    before = gateway.inspect(container.id)
    began = time.monotonic()
    gateway.restart(container.id, timeout=9.5)  # the Engine takes whole seconds only
    elapsed = time.monotonic() - began
    after = gateway.inspect(container.id)
    assert after.id == before.id and after.running
    assert started(after.started_at) > started(before.started_at)
    assert after.pid != before.pid
    assert elapsed < 5, f"a process that exits on SIGTERM took {elapsed:.1f} s"
    assert sleeps == []


def test_restart_kills_after_timeout(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """A process ignoring SIGTERM is killed once the timeout passes, then started again."""
    container = containers.create(STUBBORN_COMMAND)
    before = gateway.inspect(container.id)
    began = time.monotonic()
    gateway.restart(container.id, timeout=1)
    elapsed = time.monotonic() - began
    after = gateway.inspect(container.id)
    assert 0.9 <= elapsed < 6
    assert after.running and started(after.started_at) > started(before.started_at)


def test_restart_grace_longer_than_http_timeout(
    containers: ThrowawayContainers, sleeps: list[float]
) -> None:
    """A stop timeout beyond the HTTP timeout is waited out, not mistaken for a dead daemon."""
    container = containers.create(STUBBORN_COMMAND)
    gateway = DockerGateway(
        base_url=f"unix://{DOCKER_SOCKET}", timeout=2, retry_window=5, sleep=sleeps.append
    )
    began = time.monotonic()
    gateway.restart(container.id, timeout=3)
    assert time.monotonic() - began >= 2.9
    assert sleeps == []
    assert gateway.inspect(container.id).running


def test_start_stopped_container(containers: ThrowawayContainers, gateway: DockerGateway) -> None:
    """start() brings a created or stopped container up; again on a running one is harmless."""
    container = containers.create(start=False)
    gateway.start(container.id)
    assert gateway.inspect(container.id).running
    gateway.start(container.id)
    assert gateway.inspect(container.id).running


# -- exec ------------------------------------------------------------------------------------


def test_exec_detached_runs_with_options(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """A detached exec runs with the given workdir, user and environment and reports its status."""
    container = containers.create()
    script = 'echo "$GREETING $(pwd) $(id -un)" > /tmp/marker; exit 3'
    exec_id = gateway.exec_detached(
        container.id,
        ["bash", "-c", script],
        workdir="/var",
        user="nobody",
        environment={"GREETING": "hello"},
    )
    finished = poll_until(lambda: not gateway.exec_inspect(exec_id).running, timeout=10)
    assert finished
    assert gateway.exec_inspect(exec_id).exit_code == 3
    assert gateway.exec_output(container.id, ["cat", "/tmp/marker"]) == (0, "hello /var nobody\n")


def test_exec_inspect_while_running(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """A running exec has a pid and no exit code yet."""
    container = containers.create()
    exec_id = gateway.exec_detached(container.id, ["sleep", "30"])
    info = gateway.exec_inspect(exec_id)
    assert info.running and info.exit_code is None
    assert info.pid is not None and info.pid > 0


def test_exec_output_collects_both_streams_and_status(
    containers: ThrowawayContainers, gateway: DockerGateway
) -> None:
    """exec_output waits for the command and returns its exit code with stdout and stderr."""
    container = containers.create()
    code, output = gateway.exec_output(
        container.id, ["bash", "-c", "echo out; echo err >&2; exit 2"]
    )
    assert code == 2
    assert "out\n" in output and "err\n" in output


def test_exec_in_stopped_container_is_not_running(
    containers: ThrowawayContainers, gateway: DockerGateway, sleeps: list[float]
) -> None:
    """An exec into a stopped container fails at once as ContainerNotRunning."""
    container = containers.create(start=False)
    with pytest.raises(ContainerNotRunning, match="is not running"):
        gateway.exec_detached(container.id, ["true"])
    assert sleeps == []


def test_unknown_exec_is_not_found(gateway: DockerGateway, sleeps: list[float]) -> None:
    """Inspecting an exec id the engine does not know is a not-found, not an outage."""
    with pytest.raises(ContainerNotFound, match="exec instance"):
        gateway.exec_inspect("0" * 64)
    assert sleeps == []


# -- an unreachable daemon -----------------------------------------------------------------


def test_cut_then_restored_daemon_is_retried(
    containers: ThrowawayContainers, proxy: FlakyDockerProxy
) -> None:
    """While the daemon is unreachable the call backs off and retries, then succeeds."""
    container = containers.create()
    delays: list[float] = []
    gateway = DockerGateway(base_url=proxy.url, retry_window=10, sleep=recording_real_sleep(delays))
    assert gateway.inspect(container.id).running  # connection pooled before the cut
    proxy.cut()
    later(1.0, proxy.restore)
    with structlog.testing.capture_logs() as events:
        began = time.monotonic()
        info = gateway.inspect(container.id)
    assert info.id == container.id
    assert 1 <= len(delays) <= 3
    assert 0.5 <= delays[0] <= 1.0
    assert time.monotonic() - began < 5
    retries = [event for event in events if event["event"] == "docker_retry"]
    assert len(retries) == len(delays)
    assert "Connection" in retries[0]["error"]
    gateway.close()


def test_cut_longer_than_window_is_unavailable(proxy: FlakyDockerProxy) -> None:
    """A daemon unreachable for the whole window ends in DockerUnavailable naming call and host."""
    delays: list[float] = []
    gateway = DockerGateway(base_url=proxy.url, retry_window=4, sleep=delays.append)
    proxy.cut()
    with pytest.raises(DockerUnavailable) as raised:
        gateway.find_container("trainer")
    message = str(raised.value)
    assert proxy.url in message and "unreachable" in message and "ConnectionRefusedError" in message
    assert "inspect of container 'trainer'" in message
    assert delays and sum(delays) <= 4


def test_stop_event_already_set_ends_retries(proxy: FlakyDockerProxy) -> None:
    """During shutdown one failed attempt is enough: no backoff at all."""
    stop = threading.Event()
    stop.set()
    delays: list[float] = []
    gateway = DockerGateway(base_url=proxy.url, stop_event=stop, sleep=delays.append)
    proxy.cut()
    with pytest.raises(DockerUnavailable, match="shutdown requested"):
        gateway.inspect("trainer")
    assert delays == []


def test_stop_event_interrupts_backoff_promptly(proxy: FlakyDockerProxy) -> None:
    """Setting the stop event mid-backoff ends the wait at once, not after the delay."""
    stop = threading.Event()
    gateway = DockerGateway(base_url=proxy.url, stop_event=stop, retry_window=60)
    proxy.cut()
    later(1.2, stop.set)
    began = time.monotonic()
    with pytest.raises(DockerUnavailable, match="shutdown requested"):
        gateway.inspect("trainer")
    # The second backoff cannot end before 1.5 s (0.5 s + 1 s at least); the event cut it short.
    assert 1.1 <= time.monotonic() - began < 1.45


def test_restart_interrupted_by_daemon_outage_is_replayed(
    containers: ThrowawayContainers, proxy: FlakyDockerProxy
) -> None:
    """A restart whose connection drops mid-call is retried after the daemon is back."""
    container = containers.create(STUBBORN_COMMAND)
    before = container.attrs["State"]["StartedAt"]
    delays: list[float] = []
    gateway = DockerGateway(base_url=proxy.url, retry_window=10, sleep=recording_real_sleep(delays))
    later(0.3, proxy.cut)
    later(0.6, proxy.restore)
    gateway.restart(container.id, timeout=1)
    after = gateway.inspect(container.id)
    assert delays, "the dropped restart must have been retried"
    assert after.running and started(after.started_at) > parse_docker_time(before)
    gateway.close()


# -- the sidecar's own compose project -------------------------------------------------------


@pytest.mark.parametrize("hostname", [None, "custom-hostname"], ids=["id-hostname", "renamed"])
def test_own_compose_project_inside_a_container(
    containers: ThrowawayContainers, hostname: str | None
) -> None:
    """In a compose-labelled container the gateway finds its project (by hostname or mounts)."""
    project = unique_name("proj")
    probe = containers.create(
        [
            "python3",
            "-c",
            "from sidecar.clients.docker_engine import DockerGateway as G; "
            "print(G(retry_window=5).own_compose_project())",
        ],
        labels=compose_labels(project, "sidecar"),
        hostname=hostname,
        environment={"PYTHONPATH": "/src:/deps"},
        volumes={
            DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
            str(REPO_ROOT): {"bind": "/src", "mode": "ro"},
            sysconfig.get_paths()["purelib"]: {"bind": "/deps", "mode": "ro"},
        },
    )
    result = probe.wait(timeout=30)
    output = probe.logs().decode()
    assert result["StatusCode"] == 0, output
    assert output.strip().splitlines()[-1] == project
