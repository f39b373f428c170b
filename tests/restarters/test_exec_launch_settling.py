"""exec mode waits out the moment when the Engine and /proc disagree about a launch.

A relaunch's processes show a little after its exec starts, and the Engine records the
exec's exit a little after its process ends: meanwhile it answers "running" with no exit
code. A finished run read then would end without its exit status (CI once saw
``training_completed`` with ``exit_code: None``). The Docker gateway is a stand-in that
answers as the Engine does in that moment (tests/e2e runs the real one); the processes and
/proc are real, and the clock is injected.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.clients.docker_answers import ContainerInfo, ExecInfo
from sidecar.restarters.exec import SETTLE_WAIT, ExecRestarter


class LateEngine:
    """A running container whose exec reports "running" for ``late`` inspections first."""

    def __init__(self, *, late: int, exit_code: int | None = 0) -> None:
        self.late = late
        self.exit_code = exit_code
        self.inspections = 0

    def find_container(self, ref: str, *, project: str | None = None) -> ContainerInfo:
        return ContainerInfo(
            id="c0ffee", name=ref, status="running", running=True, exit_code=None,
            started_at=None, finished_at=None, restart_count=0, pid=None, labels={}, image="",
        )  # fmt: skip

    def exec_detached(self, container_id: str, command: list[str], **options: Any) -> str:
        return "exec-1"

    def exec_inspect(self, exec_id: str) -> ExecInfo:
        self.inspections += 1
        if self.inspections <= self.late:
            return ExecInfo(running=True, exit_code=None, pid=None)
        return ExecInfo(running=False, exit_code=self.exit_code, pid=None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps = 0
        self.on_sleep: list[Any] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        for hook in self.on_sleep:
            hook()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def relaunched(engine: LateEngine, clock: Clock, tmp_path: Path) -> ExecRestarter:
    """A restarter whose pattern matches only this test's processes, after one relaunch."""
    restarter = ExecRestarter(
        gateway=engine,  # type: ignore[arg-type]
        container="fluxgym",
        project=None,
        pattern=re.compile(re.escape(str(tmp_path)) + r"/\S+\.sh"),
        kill_grace=2.0,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    )
    restarter.script, restarter.train_log, restarter.workdir = "/run/train.sh", "/run/log", "/"
    restarter.restart()
    return restarter


@pytest.fixture
def late_trainer(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Where a test starts the relaunch's process late; it is killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait(timeout=10)


def test_an_exit_the_engine_records_late_is_waited_for(clock: Clock, tmp_path: Path) -> None:
    engine = LateEngine(late=3, exit_code=0)
    status = relaunched(engine, clock, tmp_path).status()
    assert not status.running
    assert status.exit_code == 0, "the run's exit status, not 'ended without one'"
    assert engine.inspections == 4 and clock.sleeps == 3


def test_a_failed_exit_is_reported_as_it_is(clock: Clock, tmp_path: Path) -> None:
    status = relaunched(LateEngine(late=1, exit_code=137), clock, tmp_path).status()
    assert (status.running, status.exit_code) == (False, 137)


def test_the_wait_is_bounded_and_not_repeated_for_the_same_launch(
    clock: Clock, tmp_path: Path
) -> None:
    engine = LateEngine(late=10**6)  # an exec the pattern never sees: it "runs" for ever
    restarter = relaunched(engine, clock, tmp_path)
    began = clock.now
    status = restarter.status()
    assert (status.running, status.exit_code) == (False, None)
    assert SETTLE_WAIT <= clock.now - began <= SETTLE_WAIT + 0.1
    sleeps = clock.sleeps
    restarter.status()  # the next poll asks the Engine once, without waiting again
    assert clock.sleeps == sleeps


def test_a_relaunch_whose_processes_show_late_is_running(
    clock: Clock, tmp_path: Path, late_trainer: list[subprocess.Popen[bytes]]
) -> None:
    script = tmp_path / "train.sh"
    script.write_text("sleep 60\n")

    def start_it_on_the_second_sleep() -> None:
        if clock.sleeps == 2:
            late_trainer.append(subprocess.Popen(["bash", str(script)]))
            time.sleep(0.5)  # until bash shows in /proc under its command line

    clock.on_sleep.append(start_it_on_the_second_sleep)
    status = relaunched(LateEngine(late=10**6), clock, tmp_path).status()
    assert status.running, "the launch's processes, once they showed"
    assert status.exit_code is None
