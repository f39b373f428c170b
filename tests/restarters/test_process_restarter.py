"""The process restarter on its own: pipes drained, trees stopped, launch retried."""

from __future__ import annotations

import io
import time

import psutil
import pytest

from sidecar.restarters.base import RestartError
from sidecar.restarters.process import ProcessRestarter


def restarter(tmp_path, script_text, **kwargs):
    script = tmp_path / "train.sh"
    script.write_text(script_text)
    return ProcessRestarter(
        train_script=script,
        workdir=tmp_path,
        train_log=tmp_path / "out" / "train.log",
        kill_grace=kwargs.pop("kill_grace", 2.0),
        **kwargs,
    )


def wait_exit(trainer, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = trainer.status()
        if not status.running:
            return status.exit_code
        time.sleep(0.05)
    raise AssertionError("trainer did not exit")


def test_output_goes_to_the_log_and_is_echoed(tmp_path):
    """A trainer printing far more than a pipe buffer on both streams never blocks; all of it
    lands in train.log and is echoed."""
    echo = io.BytesIO()
    trainer = restarter(
        tmp_path,
        "head -c 3000000 /dev/zero | tr '\\0' o\nhead -c 3000000 /dev/zero | tr '\\0' e >&2\n",
        echo=echo,
    )
    trainer.start()
    assert wait_exit(trainer) == 0
    trainer.stop()  # echoes what is left
    log = (tmp_path / "out" / "train.log").read_bytes()
    assert log.count(b"o") == 3_000_000 and log.count(b"e") == 3_000_000
    assert len(echo.getvalue()) == 6_000_000


def test_log_is_appended_across_launches(tmp_path):
    """Each relaunch appends; earlier output is never truncated."""
    trainer = restarter(tmp_path, "echo run\n")
    trainer.start()
    wait_exit(trainer)
    trainer.restart()
    wait_exit(trainer)
    trainer.stop()
    assert (tmp_path / "out" / "train.log").read_text() == "run\nrun\n"


def test_stop_kills_the_whole_tree_even_when_sigterm_is_ignored(tmp_path):
    """Children that ignore SIGTERM are SIGKILLed after the grace; none survive."""
    trainer = restarter(
        tmp_path,
        "trap '' TERM\n(trap '' TERM; sleep 300) &\nsleep 300\n",
        kill_grace=0.5,
    )
    trainer.start()
    time.sleep(0.5)
    pids = trainer.trainer_pids()
    assert len(pids) >= 2
    trainer.stop()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and _alive(pid)]


def test_orphaned_group_members_are_stopped(tmp_path):
    """A worker whose parent already exited is still found through the process group."""
    marker = tmp_path / "worker.pid"
    trainer = restarter(tmp_path, f"sleep 300 & echo $! > {marker}\nexit 3\n")
    trainer.start()
    assert wait_exit(trainer) == 3
    worker = int(marker.read_text())
    assert _alive(worker)
    trainer.stop()
    assert not _alive(worker)


def test_launch_is_retried_and_then_reported(tmp_path):
    """A launch that keeps failing is retried with backoff, then raises RestartError."""
    delays = []
    trainer = restarter(tmp_path, "true\n", launch_sleep=delays.append)
    trainer.workdir = tmp_path / "missing"  # Popen fails with FileNotFoundError
    with pytest.raises(RestartError, match="cannot launch"):
        trainer.start()
    assert len(delays) == 2  # three attempts, two waits


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_trainer_outlives_the_sidecar(tmp_path):
    """The trainer writes to a file, not a pipe: a sidecar that dies does not take it along
    (with a pipe, its next progress line would kill it with SIGPIPE)."""
    import subprocess
    import sys

    script = tmp_path / "train.sh"
    script.write_text("for i in $(seq 200); do echo step $i; sleep 0.02; done\n")
    launcher = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from sidecar.restarters.process import ProcessRestarter\n"
        "r = ProcessRestarter(train_script=Path(sys.argv[1]), workdir=Path(sys.argv[2]),"
        " train_log=Path(sys.argv[2]) / 'train.log', kill_grace=1.0)\n"
        "r.start(); print(r.pid, flush=True); time.sleep(60)\n"
    )
    sidecar = subprocess.Popen(
        [sys.executable, "-c", launcher, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    trainer_pid = int(sidecar.stdout.readline())
    sidecar.kill()
    sidecar.wait()
    try:
        deadline = time.monotonic() + 20
        while _alive(trainer_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "step 200" in (tmp_path / "train.log").read_text()
    finally:
        if _alive(trainer_pid):
            psutil.Process(trainer_pid).kill()
