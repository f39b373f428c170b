"""The health gate's verdict on one reading: pure, so plain values in and a decision out."""

from __future__ import annotations

import pytest

from sidecar.decide.health_gate import FATAL_XIDS, Gate, judge
from sidecar.observe.gpu_health import GPU_LOST_ERROR, DeviceHealth, GpuProcess, HealthReading

GIB = 1024**3


def device(
    index: int = 0,
    *,
    pids: tuple[int, ...] = (),
    xids: tuple[int, ...] = (),
    action: str | None = "none",
    used: int = 2 * GIB,
) -> DeviceHealth:
    return DeviceHealth(
        index=index,
        memory_used_bytes=used,
        memory_total_bytes=24 * GIB,
        processes=tuple(GpuProcess(pid=pid, used_bytes=GIB) for pid in pids),
        xids=xids,
        recovery_action=action,
    )


def reading(*devices: DeviceHealth) -> HealthReading:
    return HealthReading(devices=devices)


def test_no_reading_means_go_without_gpu_signal():
    """No NVML here is normal: the relaunch goes ahead."""
    decision = judge(None, held_by=frozenset({10}), waited=0.0, bound=30.0)
    assert decision.gate is Gate.GO
    assert decision.reason == "no GPU signal"


def test_lost_gpu_needs_a_reset():
    """A reading that says the GPU is lost stops the relaunch."""
    lost = HealthReading(devices=(), error=GPU_LOST_ERROR)
    decision = judge(lost, held_by=frozenset(), waited=0.0, bound=30.0)
    assert decision.gate is Gate.GPU_NEEDS_RESET
    assert "lost" in decision.reason
    assert decision.figures["error"] == GPU_LOST_ERROR


def test_other_read_errors_do_not_block_the_relaunch():
    """A query glitch (Unknown Error) is reported but the gate goes."""
    glitch = HealthReading(devices=(), error="Unknown Error")
    decision = judge(glitch, held_by=frozenset({10}), waited=0.0, bound=30.0)
    assert decision.gate is Gate.GO
    assert "Unknown Error" in decision.reason


@pytest.mark.parametrize(
    ("action", "remedy"),
    [
        ("gpu_reset", "nvidia-smi --gpu-reset -i 1"),
        ("node_reboot", "reboot the machine"),
        ("drain_and_reset", "nvidia-smi --gpu-reset -i 1"),
        ("bus_reset", "PCIe bus"),
        ("system_reboot", "reboot the machine"),
    ],
)
def test_recovery_actions_that_make_the_gpu_unusable_need_a_reset(action: str, remedy: str):
    """The reason names the action, the GPU and what the user must do."""
    decision = judge(
        reading(device(0), device(1, action=action)), held_by=frozenset(), waited=0, bound=30
    )
    assert decision.gate is Gate.GPU_NEEDS_RESET
    assert action in decision.reason
    assert "GPU 1" in decision.reason
    assert remedy in decision.reason
    assert decision.figures["recovery_actions"] == {0: "none", 1: action}


@pytest.mark.parametrize("action", ["none", "drain_p2p", "recover_imex_domain", None])
def test_other_recovery_actions_are_evidence_only(action: str | None):
    decision = judge(reading(device(action=action)), held_by=frozenset(), waited=0, bound=30)
    assert decision.gate is Gate.GO
    assert decision.figures["recovery_actions"] == {0: action}


def test_fallen_off_the_bus_needs_a_reset():
    """XID 79 among other XIDs: the reason names it and what to do."""
    decision = judge(reading(device(xids=(13, 79))), held_by=frozenset(), waited=0, bound=30)
    assert decision.gate is Gate.GPU_NEEDS_RESET
    assert "XID 79 (GPU has fallen off the bus)" in decision.reason
    assert "XID 13" not in decision.reason
    assert decision.figures["xids"] == {0: [13, 79]}


def test_every_fatal_xid_needs_a_reset():
    for xid in FATAL_XIDS:
        decision = judge(reading(device(xids=(xid,))), held_by=frozenset(), waited=0, bound=30)
        assert decision.gate is Gate.GPU_NEEDS_RESET, xid


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 94])
def test_application_xids_are_only_evidence(xid: int):
    """An XID that ended the process, not the GPU, is in the figures and the gate goes."""
    decision = judge(reading(device(xids=(xid,))), held_by=frozenset(), waited=0, bound=30)
    assert decision.gate is Gate.GO
    assert decision.figures["xids"] == {0: [xid]}


def test_held_memory_waits_while_within_the_bound():
    decision = judge(
        reading(device(pids=(10, 99))), held_by=frozenset({10, 11}), waited=29.9, bound=30
    )
    assert decision.gate is Gate.WAIT
    assert "10" in decision.reason
    assert decision.figures["holding_pids"] == [10]
    assert decision.figures["waited_seconds"] == 29.9


def test_held_memory_goes_after_the_bound_with_the_risk_said():
    decision = judge(reading(device(pids=(10,))), held_by=frozenset({10}), waited=30, bound=30)
    assert decision.gate is Gate.GO
    assert "not released within 30 s" in decision.reason
    assert "out of memory" in decision.reason
    assert decision.figures["holding_pids"] == [10]


def test_released_memory_goes():
    """Only other processes on the GPU: the stopped trainer's memory is free."""
    decision = judge(
        reading(device(pids=(99,), used=GIB)), held_by=frozenset({10}), waited=1.5, bound=30
    )
    assert decision.gate is Gate.GO
    assert decision.reason == "GPU memory released"
    assert decision.figures == {
        "memory_used_bytes": {0: GIB},
        "xids": {},
        "recovery_actions": {0: "none"},
        "holding_pids": [],
        "waited_seconds": 1.5,
    }


def test_a_pid_on_any_device_holds_the_gate():
    decision = judge(
        reading(device(0), device(1, pids=(10,))), held_by=frozenset({10}), waited=0, bound=30
    )
    assert decision.gate is Gate.WAIT


def test_reset_outranks_waiting_for_memory():
    """A GPU that needs a reset is said at once, not after the memory wait."""
    decision = judge(
        reading(device(pids=(10,), action="gpu_reset")),
        held_by=frozenset({10}),
        waited=0,
        bound=30,
    )
    assert decision.gate is Gate.GPU_NEEDS_RESET


def test_nothing_held_and_healthy_goes():
    decision = judge(reading(device()), held_by=frozenset(), waited=0, bound=0)
    assert decision.gate is Gate.GO
    assert decision.reason == "GPU healthy"


@pytest.mark.parametrize(("waited", "bound"), [(-1, 30), (0, -1)])
def test_negative_seconds_are_refused(waited: float, bound: float):
    with pytest.raises(ValueError, match="must be >= 0"):
        judge(reading(device()), held_by=frozenset(), waited=waited, bound=bound)
