"""exec mode relaunches with the environment and directory of the run's original process.

Real processes with environments of their own stand in for FluxGym's UI and the train.sh it
started; /proc is read for real. Only the Docker gateway is a stand-in: what the relaunch
would send to the Engine is what these tests look at (tests/e2e proves it on a real one).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sidecar import events
from sidecar.clients.docker_answers import ContainerInfo, ExecInfo
from sidecar.observe.trainer_processes import (
    LaunchNotVisible,
    find_trainer_processes,
    launch_context,
    launch_environment,
    tree_root,
)
from sidecar.restarters.exec import LAUNCH_MARKER, ExecRestarter

CONFIGURED_WORKDIR = "/configured/fluxgym"


class RecordingGateway:
    """Answers as a running container would; records every exec instead of starting it."""

    def __init__(self) -> None:
        self.execs: list[dict[str, Any]] = []

    def find_container(self, ref: str, *, project: str | None = None) -> ContainerInfo:
        return ContainerInfo(
            id="c0ffee", name=ref, status="running", running=True, exit_code=None,
            started_at=None, finished_at=None, restart_count=0, pid=None, labels={}, image="",
        )  # fmt: skip

    def exec_detached(self, container_id: str, command: list[str], **options: Any) -> str:
        self.execs.append({"command": command, **options})
        return f"exec-{len(self.execs)}"

    def exec_inspect(self, exec_id: str) -> ExecInfo:
        return ExecInfo(running=False, exit_code=0, pid=None)


@pytest.fixture
def ui_environment(tmp_path: Path) -> dict[str, str]:
    """What a venv-based UI exports, plus what a shell and a launcher add per process."""
    venv = tmp_path / "env"
    return {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(venv),
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "0",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "WITH_SPACES": "a b  c=d",
        "_": "/usr/bin/python3",
        "SHLVL": "2",
        "PWD": "/somewhere/else",
        "OLDPWD": "/",
        "RANK": "3",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "none",
    }


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A FluxGym-like root whose train.sh starts one more matching process and waits."""
    root = tmp_path / "fluxgym root"  # a space, as in real install paths
    (root / "outputs").mkdir(parents=True)
    # The child gets per-worker variables the root does not have: reading it would show them.
    (root / "outputs" / "train.sh").write_text(
        f'RANK=0 LOCAL_RANK=0 bash "{root}/outputs/worker.sh" &\nwait\n'
    )
    (root / "outputs" / "worker.sh").write_text("sleep 60\n")
    return root


@pytest.fixture
def launched(run_root: Path, ui_environment: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """train.sh started as this test's child, with the UI's environment, from the root."""
    process = subprocess.Popen(
        ["bash", str(run_root / "outputs" / "train.sh")], env=ui_environment, cwd=run_root
    )
    try:
        yield process
    finally:
        for child in _alive_tree(process.pid):
            child.kill()
        process.wait(timeout=10)


def _alive_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []


def _pattern(root: Path) -> re.Pattern[str]:
    """This test's processes only: other tests run trainers at the same time."""
    return re.compile(re.escape(str(root)) + r"/outputs/\S+\.sh")


def _wait_for_both(pattern: re.Pattern[str]) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while len(found := find_trainer_processes(pattern)) < 2:
        assert time.monotonic() < deadline, f"only {found} started"
        time.sleep(0.02)
    return found


def _expected(ui_environment: dict[str, str]) -> dict[str, str]:
    dropped = {"_", "SHLVL", "PWD", "OLDPWD", "RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    return {name: value for name, value in ui_environment.items() if name not in dropped}


def _restarter(gateway: RecordingGateway, pattern: re.Pattern[str], logged: list[Any]) -> Any:
    restarter = ExecRestarter(
        gateway=gateway,  # type: ignore[arg-type]
        container="fluxgym",
        project=None,
        pattern=pattern,
        kill_grace=2.0,
        log=lambda event, **fields: logged.append((event, fields)),
    )
    restarter.script, restarter.train_log = "/run/train.sh", "/run/train.log"
    restarter.workdir = CONFIGURED_WORKDIR
    return restarter


# -- reading a process ---------------------------------------------------------------------


def test_launch_context_reads_a_real_process_environment_and_directory(
    launched: subprocess.Popen[bytes], run_root: Path, ui_environment: dict[str, str]
) -> None:
    context = launch_context(psutil.Process(launched.pid))
    assert context.pid == launched.pid
    assert context.workdir == str(run_root)
    assert context.environment == _expected(ui_environment)


def test_the_tree_root_is_the_process_the_ui_started(
    launched: subprocess.Popen[bytes], run_root: Path, ui_environment: dict[str, str]
) -> None:
    found = _wait_for_both(_pattern(run_root))
    root = tree_root(found)
    assert root is not None and root.pid == launched.pid
    # The child's own variables stay out: the root's environment is the launch's.
    assert "LOCAL_RANK" in next(p for p in found if p.pid != launched.pid).environ()
    assert "LOCAL_RANK" not in launch_context(root).environment


def test_an_ended_process_is_not_visible(tmp_path: Path) -> None:
    process = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    handle = psutil.Process(process.pid)  # taken while it ran, asked after it is gone
    process.kill()
    process.wait()
    with pytest.raises(LaunchNotVisible, match=f"process {process.pid}: NoSuchProcess"):
        launch_context(handle)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes as two other UIDs")
def test_a_process_of_another_uid_is_not_visible(tmp_path: Path) -> None:
    """What a sidecar with the wrong UID meets: no /proc/<pid>/environ, so the fallback."""
    os.chmod(tmp_path, 0o755)
    target = subprocess.Popen(["sleep", "30"], user=65534, cwd=tmp_path)
    try:
        answer = _as_uid(65533, lambda: _visibility(target.pid))
    finally:
        target.kill()
        target.wait()
    assert answer == f"not visible: process {target.pid}: AccessDenied"


def _visibility(pid: int) -> str:
    try:
        launch_context(psutil.Process(pid))
    except LaunchNotVisible as error:
        return f"not visible: {error}"
    return "visible"


def _as_uid(uid: int, question: Callable[[], str]) -> str:
    """``question()`` answered in a forked child that gave up root for ``uid``."""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child; it never returns into pytest
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.write(writing, question().encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as answer:
        text = answer.read()
    os.waitpid(child, 0)
    return text


def test_per_process_and_undecodable_variables_are_not_copied() -> None:
    raw = {"PATH": "/venv/bin", "_": "x", "SHLVL": "1", "LOCAL_WORLD_SIZE": "2", "BAD": "\udcff"}
    assert launch_environment(raw) == {"PATH": "/venv/bin"}


# -- the restarter ---------------------------------------------------------------------------


def test_relaunch_uses_the_original_environment_and_keeps_it_for_later_relaunches(
    launched: subprocess.Popen[bytes], run_root: Path, ui_environment: dict[str, str]
) -> None:
    gateway, logged = RecordingGateway(), list[Any]()
    restarter = _restarter(gateway, _pattern(run_root), logged)
    _wait_for_both(restarter.pattern)
    assert restarter.status().running  # the poll that reads it, while the trainer runs

    restarter.restart()  # stops the tree first, then relaunches
    assert launched.wait(timeout=10) is not None
    restarter.restart()  # a second relaunch, with nothing of the original left to read

    assert len(gateway.execs) == 2
    tokens = set()
    for sent in gateway.execs:
        environment = dict(sent["environment"])
        tokens.add(environment.pop(LAUNCH_MARKER))  # tells the sidecar's launch from the UI's
        assert environment == _expected(ui_environment)
        assert sent["workdir"] == str(run_root)
    assert len(tokens) == 2, "each relaunch has a marker of its own"
    relaunches = [fields for event, fields in logged if event == events.RELAUNCH_ENVIRONMENT]
    assert [fields["environment"] for fields in relaunches] == ["original_process"] * 2
    assert relaunches[0]["source_pid"] == launched.pid
    assert "VIRTUAL_ENV" in relaunches[0]["variables"]
    assert all(value not in str(relaunches) for value in ("a b  c=d", str(run_root / "hf")))


def test_a_trainer_stopped_before_any_poll_is_read_before_it_is_stopped(
    launched: subprocess.Popen[bytes], run_root: Path, ui_environment: dict[str, str]
) -> None:
    gateway, logged = RecordingGateway(), list[Any]()
    restarter = _restarter(gateway, _pattern(run_root), logged)
    _wait_for_both(restarter.pattern)
    restarter.restart()  # no status() first
    environment = dict(gateway.execs[0]["environment"])
    environment.pop(LAUNCH_MARKER)
    assert environment == _expected(ui_environment)


def test_without_a_visible_original_the_relaunch_falls_back_and_says_so(tmp_path: Path) -> None:
    gateway, logged = RecordingGateway(), list[Any]()
    restarter = _restarter(gateway, _pattern(tmp_path), logged)
    assert not restarter.status().running
    restarter.restart()
    # The container's exec environment, plus only the marker of the sidecar's own launch.
    assert list(gateway.execs[0]["environment"]) == [LAUNCH_MARKER]
    assert gateway.execs[0]["workdir"] == CONFIGURED_WORKDIR
    assert logged == [
        (
            events.RELAUNCH_ENVIRONMENT,
            {
                "environment": "container_default",
                "workdir": CONFIGURED_WORKDIR,
                "reason": "no training process seen since the sidecar started",
            },
        )
    ]
