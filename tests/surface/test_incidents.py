"""Incident bundles of real hung processes: contents, the time bound, size caps and pruning."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.observe.gpu import GpuReading, GpuSample
from sidecar.observe.python_stacks import find_py_spy
from sidecar.surface.incidents import (
    LOG_TAIL_BYTES,
    IncidentRecorder,
    IncidentSources,
    list_bundles,
    prune,
)

# A trainer stand-in: a parent waiting for its worker, the worker blocked reading a pipe
# nobody writes (the shape of sd-scripts issue 536).
HUNG_TRAINER = textwrap.dedent(
    """
    import subprocess, sys
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\\n"
         "def waiting_for_the_dataloader():\\n"
         "    sys.stdin.read()\\n"
         "waiting_for_the_dataloader()\\n"],
        stdin=subprocess.PIPE,
    )
    print(worker.pid, flush=True)
    def waiting_for_the_worker():
        worker.wait()
    waiting_for_the_worker()
    """
)
VERDICT = Verdict(
    VerdictKind.STALL,
    "no progress for 902 s (stall timeout 900 s)",
    {"seconds_since_progress": 902.0, "last_step": 120, "total_steps": 400},
)


class HungTrainer:
    def __init__(self, parent: subprocess.Popen[str], worker_pid: int):
        self.parent = parent
        self.worker_pid = worker_pid

    @property
    def pids(self) -> list[int]:
        return [self.parent.pid, self.worker_pid]


@pytest.fixture
def hung() -> Iterator[HungTrainer]:
    parent = subprocess.Popen(
        [sys.executable, "-c", HUNG_TRAINER],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    time.sleep(0.2)  # let the worker reach its read(2)
    try:
        yield HungTrainer(parent, worker_pid)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


@pytest.fixture
def train_log(tmp_path: Path) -> Path:
    log = tmp_path / "train.log"
    line = "steps:  30%|███       | 120/400 [1:40:00<3:53:20, 50.00s/it, avr_loss=0.41]\r"
    log.write_text(line * 8000 + "\nthe last line\n", encoding="utf-8")
    return log


def recorder(tmp_path: Path, pids: list[int], train_log: Path, **options) -> IncidentRecorder:
    sources = IncidentSources(state_dir=tmp_path / "state", train_log=train_log, pids=pids)
    options.setdefault("keep", 5)
    return IncidentRecorder(lambda: sources, **options)


def read_json(path: Path):
    return json.loads(path.read_text())


def test_bundle_holds_verdict_log_tail_and_the_process_tree(tmp_path, hung, train_log):
    """Verdict, capped log tail, every process with state, wait channel, CPU and I/O."""
    folder = recorder(tmp_path, [hung.parent.pid], train_log).save(VERDICT, {"last_step": 120})
    assert folder is not None
    assert folder.parent == tmp_path / "state" / "incidents"
    assert re.fullmatch(r"\d{8}T\d{6}Z", folder.name)
    verdict = read_json(folder / "verdict.json")
    assert verdict["kind"] == "stall" and verdict["reason"] == VERDICT.reason
    figures = verdict["figures"]
    assert figures["last_step"] == 120
    diagnosis = read_json(folder / "diagnosis.json")
    assert figures["diagnosis"] == diagnosis["class"], "the verdict carries the class"
    assert diagnosis["evidence"] and diagnosis["description"]
    tail = (folder / "train.log.tail").read_text()
    assert tail.endswith("the last line\n")
    assert LOG_TAIL_BYTES - 4 <= len(tail.encode()) <= LOG_TAIL_BYTES
    rows = {row["pid"]: row for row in read_json(folder / "processes.json")}
    assert set(rows) == set(hung.pids), "the worker is found below the given root"
    worker = rows[hung.worker_pid]
    assert worker["status"] == "sleeping"
    assert worker["ppid"] == hung.parent.pid
    assert "waiting_for_the_dataloader" in worker["cmdline"]
    assert worker["io"]["read_chars"] >= 0 and "write_bytes" in worker["io"]
    assert worker["cpu_user_seconds"] >= 0
    assert worker["threads"][0]["state"] == "S"
    if Path("/proc/self/wchan").exists():
        assert worker["wchan"], "the kernel says where it sleeps"
    table = (folder / "processes.txt").read_text()
    assert str(hung.worker_pid) in table and "WCHAN" in table
    manifest = read_json(folder / "manifest.json")
    assert manifest["skipped"]["gpu.json"] == "NVML unavailable"
    assert set(manifest["files"]) >= {"verdict.json", "train.log.tail", "processes.json"}
    assert manifest["seconds"] < 5


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed")
def test_python_stacks_come_from_py_spy(tmp_path, hung, train_log):
    """With py-spy, each Python process's stack shows the function it hangs in."""
    folder = recorder(tmp_path, hung.pids, train_log, py_spy=find_py_spy()).save(VERDICT, {})
    assert folder is not None
    worker_stack = (folder / "stacks" / f"{hung.worker_pid}.txt").read_text()
    parent_stack = (folder / "stacks" / f"{hung.parent.pid}.txt").read_text()
    assert "waiting_for_the_dataloader" in worker_stack, worker_stack
    assert "waiting_for_the_worker" in parent_stack, parent_stack


def test_a_hanging_py_spy_is_cut_off_at_the_deadline(tmp_path, hung, train_log):
    """A stack dump that never ends costs at most the budget; the rest is still saved."""
    stuck = tmp_path / "py-spy"
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    started = time.monotonic()
    folder = recorder(tmp_path, hung.pids, train_log, py_spy=str(stuck), budget=1.0).save(
        VERDICT, {}
    )
    took = time.monotonic() - started
    assert 0.5 < took < 3.0
    assert folder is not None
    assert "cut off" in (folder / "stacks" / f"{hung.worker_pid}.txt").read_text()
    assert (folder / "processes.json").is_file()


def recording_py_spy(tmp_path: Path) -> tuple[Path, Path]:
    """A py-spy that writes its pid to a file, then hangs (exec keeps the pid)."""
    started = tmp_path / "py-spy-pids"
    script = tmp_path / "py-spy"
    script.write_text(f"#!/bin/sh\necho $$ >> {started}\nexec sleep 30\n")
    script.chmod(0o755)
    return script, started


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def still_there(pid: int) -> bool:
    """Running, or a zombie nobody reaped."""
    return psutil.pid_exists(pid)


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def incident_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "incident"]


def test_a_py_spy_that_fails_to_start_ends_those_already_started(
    tmp_path, hung, train_log, monkeypatch
):
    """The second dump cannot start (no more processes): the first is killed and reaped."""
    script, _ = recording_py_spy(tmp_path)
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[str]] = []

    def popen(command, **options):
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        started.append(real_popen(command, **options))
        return started[0]

    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        folder = recorder(tmp_path, hung.pids, train_log, py_spy=str(script)).save(VERDICT, {})
    finally:
        monkeypatch.undo()
        leftover = [process for process in started if process.returncode is None]
        for process in leftover:
            process.kill()
            process.wait()
    assert folder is not None
    assert len(started) == 1
    assert not leftover, "the started py-spy was left running or unreaped"
    stacks = [path.read_text() for path in (folder / "stacks").iterdir()]
    assert stacks == ["py-spy could not start: [Errno 11] Resource temporarily unavailable\n"]


def test_no_py_spy_outlives_a_bundle_abandoned_mid_dump(tmp_path, hung, train_log):
    """The budget runs out while the dumps still run: they end before ``save`` returns."""
    script, started = recording_py_spy(tmp_path)

    # The gathering thread reads a clock 100 s behind, so its dumps would wait ~100 s; the
    # hook's own 1 s budget is what ends them.
    def clock() -> float:
        behind = 100.0 if threading.current_thread().name == "incident" else 0.0
        return time.monotonic() - behind

    begun = time.monotonic()
    try:
        folder = recorder(
            tmp_path, hung.pids, train_log, py_spy=str(script), budget=1.0, clock=clock
        ).save(VERDICT, {})
        took = time.monotonic() - begun
        dumps = pids_in(started)
        leftover = [pid for pid in dumps if still_there(pid)]
    finally:
        kill_leftovers(pids_in(started))
    assert took < 3.0
    assert folder is not None
    assert "deadline" in read_json(folder / "manifest.json")["skipped"]["unfinished"]
    assert len(dumps) == 2, "both dumps had started"
    assert not leftover, f"py-spy {leftover} still running or unreaped after the bundle"


def test_an_abandoned_gatherer_starts_no_py_spy_after_the_deadline(tmp_path, hung):
    """A gatherer stuck before its dumps (a blocking log) starts none once it is released."""
    script, started = recording_py_spy(tmp_path)
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)
    before = set(incident_threads())
    try:
        folder = recorder(tmp_path, hung.pids, fifo, py_spy=str(script), budget=1.0).save(
            VERDICT, {}
        )
    finally:
        os.close(os.open(fifo, os.O_WRONLY))  # release the abandoned gatherer
        for thread in set(incident_threads()) - before:
            thread.join(timeout=10)
        kill_leftovers(pids_in(started))
    assert folder is not None
    assert pids_in(started) == [], "py-spy started after the bundle was written"


def test_a_blocking_read_is_abandoned_at_the_deadline(tmp_path, hung):
    """A log that blocks the reader (a FIFO without writer, a hung mount) cannot hold recovery."""
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        folder = recorder(tmp_path, hung.pids, fifo, budget=1.0).save(VERDICT, {})
        took = time.monotonic() - started
    finally:
        # Release the abandoned worker thread blocked in open().
        os.close(os.open(fifo, os.O_WRONLY))
    assert took < 3.0
    assert folder is not None
    manifest = read_json(folder / "manifest.json")
    assert "deadline" in manifest["skipped"]["unfinished"]
    assert (folder / "verdict.json").is_file()
    assert not (folder / "train.log.tail").exists()


def test_gpu_snapshot_is_saved_when_nvml_answers(tmp_path, train_log):
    class OneGpu:
        def sample(self):
            return GpuReading(samples=(GpuSample(0, 0, 20 << 30, 24 << 30, 61.5),))

        def close(self):
            pass

    folder = recorder(tmp_path, [], train_log, gpu=OneGpu()).save(VERDICT, {})
    assert folder is not None
    gpu = read_json(folder / "gpu.json")
    assert gpu["samples"][0]["utilization_percent"] == 0
    assert gpu["samples"][0]["power_watts"] == 61.5


def test_only_the_newest_bundles_are_kept(tmp_path, train_log):
    """keep=2: older bundles and half-written leftovers are removed; names stay unique."""
    incidents = tmp_path / "state" / "incidents"
    (incidents / ".20000101T000000Z.partial").mkdir(parents=True)
    record = recorder(tmp_path, [], train_log, keep=2)
    folders = [record.save(VERDICT, {}) for _ in range(3)]
    assert len({folder.name for folder in folders if folder}) == 3
    kept = list_bundles(incidents)
    assert kept == folders[1:]
    assert sorted(p.name for p in incidents.iterdir()) == sorted(p.name for p in kept)


def test_bundle_order_is_numeric_within_one_second(tmp_path):
    for name in ("20250101T000000Z-10", "20250101T000000Z-2", "20250101T000000Z"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_bundles(tmp_path)] == [
        "20250101T000000Z",
        "20250101T000000Z-2",
        "20250101T000000Z-10",
    ]
    assert [p.name for p in prune(tmp_path, 1)] == ["20250101T000000Z", "20250101T000000Z-2"]


def test_keep_zero_saves_nothing(tmp_path, train_log):
    assert recorder(tmp_path, [], train_log, keep=0).save(VERDICT, {}) is None
    assert not (tmp_path / "state").exists()


def test_keep_zero_still_diagnoses(tmp_path, hung, train_log):
    """Bundles off: the stall_detected line still gets its class."""
    figures = recorder(tmp_path, hung.pids, train_log, keep=0)(VERDICT, {"section": "training"})
    assert figures["diagnosis"] and figures["diagnosis_evidence"]
    assert not (tmp_path / "state").exists()


def test_missing_stacks_are_said_once_and_noted_every_time(tmp_path, hung, train_log):
    """No py-spy: one stacks_unavailable line for the sidecar's life; each diagnosis notes it."""
    hook = recorder(tmp_path, hung.pids, train_log, py_spy=None)
    with capture_logs() as logs:
        first = hook(VERDICT, {"section": "training"})
        second = hook(VERDICT, {"section": "training"})
    said = [entry for entry in logs if entry["event"] == "stacks_unavailable"]
    assert len(said) == 1 and said[0]["reason"] == "py-spy is not installed"
    for figures in (first, second):
        assert any("py-spy is not installed" in note for note in figures["diagnosis_notes"])
