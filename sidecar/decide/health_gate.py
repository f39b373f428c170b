"""May the trainer be relaunched on this GPU now? A pure verdict on one health reading.

Asked after the hung or crashed trainer was stopped and before it is started again:

- a GPU that is lost, that NVML says needs a reset or a reboot, or that reported an XID
  meaning it is unusable, cannot run the relaunch: the user must act (GPU_NEEDS_RESET);
- memory still held by the stopped trainer's processes (the driver frees it only once
  their CUDA contexts are gone) would make the relaunch run out of memory: wait for it,
  up to a bound, then go anyway and say so;
- no GPU signal at all is normal (no NVML here): go.

No I/O: the caller reads the probe and the clock and passes ``waited``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sidecar.observe.gpu_health import GPU_LOST_ERROR, HealthReading


class Gate(Enum):
    GO = "go"
    WAIT = "wait"
    GPU_NEEDS_RESET = "gpu_needs_reset"


@dataclass(frozen=True)
class GateDecision:
    gate: Gate
    reason: str
    # What the verdict rests on, for the log: memory used per device, XIDs and recovery
    # actions per device, pids still holding memory, seconds waited.
    figures: dict[str, Any] = field(default_factory=dict)


# What the user must do for each recovery action that leaves the GPU unusable
# (nvml.h nvmlDeviceGpuRecoveryAction_t; NVIDIA's fault-tolerant launcher gates restarts
# on the same field). drain_p2p (stop peer-to-peer traffic) and recover_imex_domain (a
# multi-node NVLink domain) do not stop a single-node relaunch: evidence only.
_ACTION_REMEDY: dict[str, str] = {
    "gpu_reset": "reset the GPU (nvidia-smi --gpu-reset -i {index}, with nothing using it)",
    "drain_and_reset": "stop all work on it, then reset it (nvidia-smi --gpu-reset -i {index})",
    "bus_reset": "reset the GPU's PCIe bus, or reboot the machine",
    "node_reboot": "reboot the machine",
    "system_reboot": "reboot the machine",
}

# XIDs after which the GPU cannot run a relaunch until it is reset (or the machine
# rebooted): those whose immediate action in NVIDIA's Xid catalogue is a GPU reset or a
# reboot (https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html, "Resolution
# Bucket (Immediate Action)"; descriptions from https://docs.nvidia.com/deploy/xid-errors/).
# Application-level XIDs (13 graphics engine exception, 31 MMU fault, 43 GPU stopped
# processing, 45 preemptive cleanup, 94 contained ECC error, ...) end the process that
# hit them, not the GPU: they are only evidence in the figures.
FATAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping recording failure",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}


def judge(
    reading: HealthReading | None, *, held_by: frozenset[int], waited: float, bound: float
) -> GateDecision:
    """The gate for one reading; ``held_by`` are the host pids whose memory must be freed.

    ``waited`` is how long the caller has already waited for that memory, ``bound`` the
    most it may wait (both seconds, >= 0).
    """
    if waited < 0 or bound < 0:
        raise ValueError(f"waited and bound must be >= 0 seconds, got {waited=} {bound=}")
    if reading is None:
        return GateDecision(Gate.GO, "no GPU signal", {"waited_seconds": waited})

    if reading.error is not None:
        figures: dict[str, Any] = {"error": reading.error, "waited_seconds": waited}
        if reading.error == GPU_LOST_ERROR:
            return GateDecision(
                Gate.GPU_NEEDS_RESET,
                "the GPU is lost (NVML: GPU is lost): reset it or reboot the machine "
                "before the trainer can run again",
                figures,
            )
        # A query glitch is no reason to hold a recovery back: the relaunch will tell.
        return GateDecision(Gate.GO, f"GPU health unreadable ({reading.error})", figures)

    holding = sorted(
        {process.pid for device in reading.devices for process in device.processes} & held_by
    )
    figures = {
        "memory_used_bytes": {device.index: device.memory_used_bytes for device in reading.devices},
        "xids": {device.index: list(device.xids) for device in reading.devices if device.xids},
        "recovery_actions": {device.index: device.recovery_action for device in reading.devices},
        "holding_pids": holding,
        "waited_seconds": waited,
    }

    for device in reading.devices:
        remedy = _ACTION_REMEDY.get(device.recovery_action or "")
        if remedy is not None:
            return GateDecision(
                Gate.GPU_NEEDS_RESET,
                f"NVML reports recovery action {device.recovery_action} for GPU "
                f"{device.index}: {remedy.format(index=device.index)} before relaunching",
                figures,
            )
    for device in reading.devices:
        fatal = [xid for xid in device.xids if xid in FATAL_XIDS]
        if fatal:
            described = ", ".join(f"XID {xid} ({FATAL_XIDS[xid]})" for xid in fatal)
            return GateDecision(
                Gate.GPU_NEEDS_RESET,
                f"GPU {device.index} reported {described}: reset it "
                f"(nvidia-smi --gpu-reset -i {device.index}) or reboot the machine "
                "before relaunching",
                figures,
            )

    if holding:
        pids = ", ".join(str(pid) for pid in holding)
        if waited < bound:
            return GateDecision(
                Gate.WAIT, f"GPU memory still held by the stopped trainer (pids {pids})", figures
            )
        return GateDecision(
            Gate.GO,
            f"GPU memory was not released within {bound:g} s (pids {pids} still hold it): "
            "relaunching anyway; the relaunch may run out of memory",
            figures,
        )
    if held_by:
        return GateDecision(Gate.GO, "GPU memory released", figures)
    return GateDecision(Gate.GO, "GPU healthy", figures)
