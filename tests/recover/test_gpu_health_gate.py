"""The health gate with the real NVML probe, against the fake ``libnvidia-ml.so.1``.

Each scenario runs in a fresh child (pynvml loads the library once per process). The
child starts a real stand-in trainer (``sleep``), puts its pid on the fake GPU, asks the
gate for the holders, stops the trainer, then waits for the gate while the state file
changes under it: from a thread after a delay, as the driver freeing a context would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nvml_stub.build import CompilerMissing, build_fake_nvml, run_child

from sidecar.recover.health_gate import HealthGate

GIB = 1024**3

# Plan: "before" state text, optional "start_read" (a read at the sidecar's start, which
# registers for XIDs), "during" text appended while the trainer hangs (before holders),
# "after" text appended once the trainer is stopped, "release" {"after": s, "state": text}
# from a thread, "fake_clock" (sleep advances an injected clock), "bound", "interval".
# TRAINER in any text becomes the stand-in trainer's pid.
CHILD = r"""
import dataclasses, json, os, subprocess, sys, threading, time
import structlog
from sidecar.observe.gpu_health import NvmlHealthProbe
from sidecar.recover.health_gate import HealthGate

plan = json.load(sys.stdin)
state_file = os.environ["FAKE_NVML_STATE_FILE"]
trainer = subprocess.Popen(["sleep", "60"])

def put(text, mode="a"):
    with open(state_file, mode) as handle:
        handle.write(text.replace("TRAINER", str(trainer.pid)))

now = [0.0]
sleeps = []
def fake_sleep(seconds):
    sleeps.append(seconds)
    now[0] += seconds
def real_sleep(seconds):
    sleeps.append(seconds)
    time.sleep(seconds)

put(plan.get("before", ""), "w")
with structlog.testing.capture_logs() as logs:
    probe = NvmlHealthProbe(None)
    gate = HealthGate(
        probe,
        bound=plan.get("bound", 30.0),
        log=structlog.get_logger("sidecar"),
        clock=(lambda: now[0]) if plan.get("fake_clock") else time.monotonic,
        sleep=fake_sleep if plan.get("fake_clock") else real_sleep,
        interval=plan.get("interval", 0.1),
    )
    if plan.get("start_read"):
        probe.read()
    put(plan.get("during", ""))
    held = gate.holders([trainer.pid, *plan.get("more_trainer_pids", [])])
    trainer.kill()
    trainer.wait()
    put(plan.get("after", ""))
    release = plan.get("release")
    if release:
        timer = threading.Timer(release["after"], put, args=(release["state"], "w"))
        timer.start()
    started = time.monotonic()
    decision = gate.wait_until_released(held)
    elapsed = time.monotonic() - started
    probe.close()
print(json.dumps({
    "trainer": trainer.pid,
    "held": sorted(held),
    "gate": decision.gate.name,
    "reason": decision.reason,
    "figures": decision.figures,
    "elapsed": elapsed,
    "sleeps": sleeps,
    "logs": logs,
}, default=str))
"""


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml-gate")).parent
    except CompilerMissing as error:
        pytest.skip(str(error))


def run_gate(library_dir: Path, tmp_path: Path, **plan: Any) -> dict[str, Any]:
    return run_child(CHILD, library_dir, tmp_path / "state", plan)


def logged(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [entry for entry in result["logs"] if entry["event"] == name]


GATE_EVENTS = ("gpu_memory_released", "gpu_memory_not_released", "gpu_needs_reset")


def gate_events(result: dict[str, Any]) -> list[str]:
    return [entry["event"] for entry in result["logs"] if entry["event"] in GATE_EVENTS]


def test_waits_until_the_memory_is_freed_then_goes(tmp_path: Path, fake_nvml: Path) -> None:
    """The trainer's pid leaves the GPU 1 s after the stop: the gate waits ~1 s and goes."""
    result = run_gate(
        fake_nvml,
        tmp_path,
        before=f"procs=TRAINER:{3 * GIB},424242:{GIB}\nmem_used={4 * GIB}\n",
        release={"after": 1.0, "state": f"procs=424242:{GIB}\nmem_used={GIB}\n"},
    )
    assert result["held"] == [result["trainer"]]  # the other process is not the trainer's
    assert result["gate"] == "GO"
    assert 0.9 <= result["elapsed"] < 5.0
    [released] = logged(result, "gpu_memory_released")
    assert released["log_level"] == "info"
    assert 0.9 <= released["seconds"] < 5.0
    assert released["pids"] == [result["trainer"]]
    assert released["memory_used_bytes"] == {"0": GIB}
    assert gate_events(result) == ["gpu_memory_released"]


def test_memory_never_freed_goes_after_the_bound_with_a_warning(
    tmp_path: Path, fake_nvml: Path
) -> None:
    """On an injected clock: polls every interval, never sleeps past the bound, then goes."""
    result = run_gate(
        fake_nvml,
        tmp_path,
        before=f"procs=TRAINER:{GIB}\n",
        fake_clock=True,
        bound=3.0,
        interval=0.5,
    )
    assert result["gate"] == "GO"
    assert "not released within 3 s" in result["reason"]
    assert result["sleeps"] == [0.5] * 6
    [warning] = logged(result, "gpu_memory_not_released")
    assert warning["log_level"] == "warning"
    assert warning["seconds"] == 3.0
    assert warning["bound"] == 3.0
    assert warning["holding_pids"] == [result["trainer"]]
    assert gate_events(result) == ["gpu_memory_not_released"]


def test_a_bound_that_is_not_a_multiple_of_the_interval(tmp_path: Path, fake_nvml: Path) -> None:
    result = run_gate(
        fake_nvml, tmp_path, before="procs=TRAINER:1\n", fake_clock=True, bound=1.2, interval=0.5
    )
    assert result["gate"] == "GO"
    assert result["sleeps"] == pytest.approx([0.5, 0.5, 0.2])


def test_trainer_in_another_pid_namespace_waits_for_every_pid_on_the_gpu(
    tmp_path: Path, fake_nvml: Path
) -> None:
    """NVML lists host pids the trainer's namespace does not know: all of them are held."""
    result = run_gate(
        fake_nvml,
        tmp_path,
        before=f"procs=900001:{GIB},900002:{GIB}\n",
        release={"after": 0.5, "state": "procs=\n"},
    )
    assert result["held"] == [900001, 900002]
    assert result["gate"] == "GO"
    assert result["elapsed"] >= 0.4
    assert gate_events(result) == ["gpu_memory_released"]


@pytest.mark.parametrize(
    ("after", "words"),
    [
        ("error=gpu_lost\n", "lost"),
        ("xid=79\n", "XID 79"),
        ("recovery_action=1\n", "gpu_reset"),
    ],
)
def test_a_gpu_that_needs_a_reset_stops_the_relaunch_at_once(
    tmp_path: Path, fake_nvml: Path, after: str, words: str
) -> None:
    """Lost card, XID 79 or NVML's recovery action: GPU_NEEDS_RESET without waiting."""
    result = run_gate(
        fake_nvml, tmp_path, before=f"procs=TRAINER:{GIB}\n", after=after, fake_clock=True
    )
    assert result["gate"] == "GPU_NEEDS_RESET"
    assert words in result["reason"]
    assert result["sleeps"] == []
    [error] = logged(result, "gpu_needs_reset")
    assert error["log_level"] == "error"
    assert words in error["reason"]
    assert gate_events(result) == ["gpu_needs_reset"]


def test_an_xid_drained_while_reading_the_holders_still_counts(
    tmp_path: Path, fake_nvml: Path
) -> None:
    """XID 79 while the trainer hung is drained by holders(); the wait must still see it."""
    result = run_gate(
        fake_nvml,
        tmp_path,
        before=f"procs=TRAINER:{GIB}\n",
        start_read=True,
        during="xid=79\n",
        release={"after": 0.2, "state": "procs=\n"},
    )
    assert result["gate"] == "GPU_NEEDS_RESET"
    assert result["figures"]["xids"] == {"0": [79]}


def test_an_application_xid_is_only_evidence(tmp_path: Path, fake_nvml: Path) -> None:
    result = run_gate(
        fake_nvml,
        tmp_path,
        before=f"procs=TRAINER:{GIB}\n",
        after="xid=13\n",
        release={"after": 0.2, "state": "xid=13\nprocs=\n"},
    )
    assert result["gate"] == "GO"
    [released] = logged(result, "gpu_memory_released")
    assert released["xids"] == {"0": [13]}


def test_no_gpu_goes_at_once_and_says_nothing(tmp_path: Path, fake_nvml: Path) -> None:
    """No NVML driver: nothing is held, the gate goes, none of its events is logged."""
    result = run_gate(fake_nvml, tmp_path, before="error=driver_not_loaded\n", fake_clock=True)
    assert result["held"] == []
    assert result["gate"] == "GO"
    assert result["reason"] == "no GPU signal"
    assert result["sleeps"] == []
    assert gate_events(result) == []


class _NoGpu:
    def read(self) -> None:
        return None

    def close(self) -> None:
        return None


@pytest.mark.parametrize(("bound", "interval"), [(-1.0, 0.5), (30.0, 0.0)])
def test_bad_bound_or_interval_is_refused(bound: float, interval: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        HealthGate(_NoGpu(), bound=bound, log=None, interval=interval)


class _FixedProbe:
    """The probe's answer held still: the gate's own choices, without NVML."""

    def __init__(self, reading) -> None:
        self.reading = reading

    def read(self):
        return self.reading

    def close(self) -> None: ...


def _someone_on_the_gpu():
    from sidecar.observe.gpu_health import DeviceHealth, GpuProcess, HealthReading

    device = DeviceHealth(0, GIB, 24 * GIB, (GpuProcess(99, GIB),), (), None)
    return HealthReading(devices=(device,))


def test_a_trainer_already_gone_leaves_nothing_to_wait_for() -> None:
    """A crash: no trainer pid left, so not every process on the GPU is waited for."""
    import structlog

    gate = HealthGate(_FixedProbe(_someone_on_the_gpu()), bound=5.0, log=structlog.get_logger())
    assert gate.holders([]) == frozenset()
    assert gate.holders([5]) == frozenset({99}), "another PID namespace: everyone on the GPU"


def test_a_stop_request_ends_the_wait() -> None:
    import structlog

    gate = HealthGate(_FixedProbe(_someone_on_the_gpu()), bound=60.0, log=structlog.get_logger())
    asked: list[float] = []

    def told_to_stop(seconds: float) -> bool:
        asked.append(seconds)
        return True

    assert gate.wait_until_released(frozenset({99}), wait=told_to_stop) is None
    assert len(asked) == 1
