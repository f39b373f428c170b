"""Evidence read from real hung processes: /proc twice, py-spy twice, then the diagnosis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from sidecar.decide.diagnosis import HangClass, diagnose
from sidecar.decide.sections import Section
from sidecar.observe.hang_evidence import Gathered, evidence, gather
from sidecar.observe.python_stacks import PySpyRuns, find_py_spy, parse_dump

# A main process waiting on a queue its worker child never fills, named like torch's
# DataLoader iterator (_next_data -> _get_data -> _try_get_data -> Queue.get).
DATALOADER = textwrap.dedent(
    """
    import multiprocessing, sys, time

    def worker(queue):
        time.sleep(3600)

    def _try_get_data(queue):
        return queue.get()

    def _get_data(queue):
        return _try_get_data(queue)

    def _next_data(queue):
        return _get_data(queue)

    if __name__ == "__main__":
        queue = multiprocessing.Queue()
        child = multiprocessing.Process(target=worker, args=(queue,))
        child.start()
        print("ready", child.pid, flush=True)
        _next_data(queue)
    """
)

SPINNING = textwrap.dedent(
    """
    import sys
    def all_reduce():
        print("ready", flush=True)
        while True:
            pass
    all_reduce()
    """
)


def start(tmp_path: Path, source: str) -> subprocess.Popen[str]:
    script = tmp_path / "hung.py"
    script.write_text(source)
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("ready")
    time.sleep(0.3)  # into the wait
    return process


@pytest.fixture
def hung(tmp_path):
    started: list[subprocess.Popen[str]] = []

    def run(source: str) -> subprocess.Popen[str]:
        process = start(tmp_path, source)
        started.append(process)
        return process

    yield run
    for process in started:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def look(pid: int, *, py_spy: str | None, **options) -> Gathered:
    into = Gathered()
    runs = PySpyRuns()
    try:
        gather(
            [pid],
            into,
            py_spy=py_spy,
            dumps=runs,
            deadline=time.monotonic() + 8.0,
            **options,
        )
    finally:
        runs.end_all()
    return into


def needs_py_spy() -> str:
    executable = find_py_spy()
    if executable is None:
        pytest.fail("py-spy is a test dependency ([test] extra): it must be installed")
    return executable


def test_a_dataloader_deadlock_is_named_from_its_stacks(hung):
    process = hung(DATALOADER)
    gathered = look(process.pid, py_spy=needs_py_spy())
    assert len(gathered.stacks) == 2, "two looks, each with its stacks"
    seen = evidence(gathered, section=Section.TRAINING, gpu_error=None, gpu_busy=False, ranks=1)
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.DATALOADER_WAIT
    assert diagnosis.basis == "stacks"
    assert diagnosis.stacks_unchanged is True
    assert f"pid {process.pid}" in diagnosis.evidence[0]


def test_without_py_spy_the_kernel_still_shows_the_dataloader_wait(hung):
    process = hung(DATALOADER)
    gathered = look(process.pid, py_spy=None)
    assert gathered.stacks == [] and gathered.stacks_missing == "py-spy is not installed"
    seen = evidence(gathered, section=Section.TRAINING, gpu_error=None, gpu_busy=False, ranks=1)
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.DATALOADER_WAIT, diagnosis
    assert diagnosis.basis == "kernel"
    assert "py-spy is not installed" in diagnosis.notes[0]


def test_a_forbidden_py_spy_falls_back_and_says_why(hung, tmp_path):
    """py-spy that may not attach exits non-zero naming ptrace; the stacks are then missing."""
    refusing = tmp_path / "py-spy"
    refusing.write_text(
        "#!/bin/sh\necho 'Error: Permission Denied: Try running again with elevated "
        "permissions by going sudo' >&2\nexit 1\n"
    )
    refusing.chmod(0o755)
    process = hung(DATALOADER)
    gathered = look(process.pid, py_spy=str(refusing))
    assert gathered.stacks_missing is not None
    assert "may not attach" in gathered.stacks_missing
    assert len(gathered.stacks) == 1, "no second try once py-spy was refused"
    diagnosis = diagnose(
        evidence(gathered, section=Section.TRAINING, gpu_error=None, gpu_busy=None, ranks=1)
    )
    assert diagnosis.kind is HangClass.DATALOADER_WAIT and diagnosis.basis == "kernel"


def test_a_spinning_thread_is_measured_between_the_looks(hung):
    process = hung(SPINNING)
    gathered = look(process.pid, py_spy=None, window=0.6)
    seen = evidence(gathered, section=Section.TRAINING, gpu_error=None, gpu_busy=True, ranks=1)
    main = seen.processes[0].threads[0]
    assert main.cpu_share is not None and main.cpu_share > 0.5, main
    assert diagnose(seen).kind is HangClass.CUDA_SYNC


def test_a_stopped_process(hung):
    process = hung(SPINNING)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        psutil.Process(process.pid).status()  # settle
        time.sleep(0.1)
        gathered = look(process.pid, py_spy=None)
        seen = evidence(gathered, section=None, gpu_error=None, gpu_busy=None, ranks=1)
        assert diagnose(seen).kind is HangClass.PROCESS_STOPPED
    finally:
        os.kill(process.pid, signal.SIGCONT)


def test_py_spy_output_is_parsed_into_threads_and_frames(hung):
    process = hung(DATALOADER)
    text = subprocess.run(
        [needs_py_spy(), "dump", "--pid", str(process.pid)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    stacks = parse_dump(process.pid, text)
    main = next(s for s in stacks if s.name == "MainThread")
    assert main.frames[-1] == "<module>"
    assert {"_try_get_data", "_get_data", "_next_data"} <= main.functions()
    assert any(file.endswith("hung.py") for file in main.files)


def test_parse_skips_what_is_not_a_stack():
    text = 'Error: process 1 not found\n\nThread 7 (active): "w"\n    run (x.py:3)\n  garbage\n'
    (only,) = parse_dump(1, text)
    assert only.frames == ("run",) and only.active and only.name == "w"
    assert parse_dump(1, "") == ()
