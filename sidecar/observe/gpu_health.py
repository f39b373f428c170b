"""GPU health through NVML, read just before a relaunch: memory, processes, XIDs, recovery.

The utilisation monitor (``sidecar.observe.gpu``) answers "is the GPU working?" on every
poll. This probe answers what the health gate asks before the trainer is started again:

- which compute processes still hold GPU memory (a killed trainer's memory is freed only
  once its CUDA context is gone, and a relaunch before that can run out of memory);
- which XID critical errors the driver reported (``nvmlEventTypeXidCriticalError``);
- what NVML says must happen before the GPU is usable again
  (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``, field 230, drivers 570 and later).

XID events reach an NVML event set only once a device is registered on it, so the probe
sees the XIDs that happen **after its first successful read** (the registration), never
earlier ones: read once early (at the sidecar's start) to see those of the whole run.
Each read drains the events pending since the previous read, with a zero timeout, and
reports each XID once.

The probe owns its own ``nvmlInit`` (pynvml counts inits, so it and the utilisation
monitor can share a process) and balances it in ``close()``. Every NVML failure is a
return value: ``None`` when there is no NVML or no watched GPU here (quietly, as on any
machine without a GPU), a ``HealthReading`` with ``error`` when a GPU stopped answering
(``GPU_LOST_ERROR`` for a lost card). A query the driver does not support
(``NotSupported``, ``FunctionNotFound`` on an older driver) degrades only its own field.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pynvml
import structlog

from sidecar import events
from sidecar.observe import nvml_errors

# pynvml's str() of NVMLError_GpuIsLost; the probe reports a lost card with exactly this
# text, which is what the health gate looks for.
GPU_LOST_ERROR = "GPU is lost"

# nvml.h's nvmlDeviceGpuRecoveryAction_t, as pynvml 13 lists it (NVML_GPU_RECOVERY_ACTION_*).
# 5-7 arrived after the first drivers with the field; any other number is unknown (None).
RECOVERY_ACTIONS: dict[int, str] = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}

# pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, spelled out: pynvml releases before the
# driver 570 API lack the constant, and the field id is fixed by nvml.h.
_RECOVERY_ACTION_FIELD = 230

# Bounds one read's drain, so that an event storm cannot hold the gate in a loop.
_MAX_EVENTS_PER_READ = 1024


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU; ``pid`` is a HOST pid even inside a container."""

    pid: int
    used_bytes: int | None  # None when NVML cannot attribute the memory (NOT_AVAILABLE)


@dataclass(frozen=True)
class DeviceHealth:
    """One device at one read."""

    index: int
    memory_used_bytes: int
    memory_total_bytes: int
    processes: tuple[GpuProcess, ...]  # empty also when the driver cannot list them
    xids: tuple[int, ...]  # XID critical errors reported since the previous read, oldest first
    # One of RECOVERY_ACTIONS' values; None when the driver does not report it (< 570) or
    # reports a number this release does not know.
    recovery_action: str | None


@dataclass(frozen=True)
class HealthReading:
    """Every watched device, or why there are none (``error``, e.g. ``GPU_LOST_ERROR``)."""

    devices: tuple[DeviceHealth, ...]
    error: str | None = None


class HealthProbe(Protocol):
    """What the health gate needs from a GPU health source; NVML's is one implementation."""

    def read(self) -> HealthReading | None:
        """Read once; None means no GPU signal here at all (a normal situation)."""
        ...

    def close(self) -> None:
        """Release the underlying library; later reads return None."""
        ...


@dataclass(frozen=True)
class _Device:
    index: int
    handle: object  # pynvml's opaque ctypes pointer


class NvmlHealthProbe:
    """Reads GPU health through pynvml; see the module docstring for what and when.

    Not thread-safe: one caller (the recovery) owns it.
    """

    def __init__(
        self,
        indices: Sequence[int] | None,
        *,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """``indices`` None watches every device, else those GPU indices (duplicates ignored)."""
        if indices is not None:
            bad = [index for index in indices if not isinstance(index, int) or index < 0]
            if bad:
                raise ValueError(f"GPU indices must be integers >= 0, got {bad}")
        self._requested = tuple(dict.fromkeys(indices)) if indices is not None else None
        self._log: structlog.typing.FilteringBoundLogger = logger or structlog.get_logger("sidecar")
        self._devices: tuple[_Device, ...] = ()
        self._initialised = False  # nvmlInit succeeded and nvmlShutdown is owed
        self._seen_gpu = False  # a GPU was once read: later failures are faults, not absence
        self._event_set: object | None = None
        self._events_unsupported = False
        self._closed = False

    def read(self) -> HealthReading | None:
        """Read every watched GPU once; never raises for an NVML failure."""
        if self._closed:
            return None
        if not self._initialised:
            try:
                pynvml.nvmlInit()
            except nvml_errors.FAILURES as error:
                return self._failed(error) if self._seen_gpu else None
            self._initialised = True
        try:
            if not self._devices:
                watched = self._enumerate()
                if not watched:
                    self._shutdown()
                    return None
                self._register_xid_events(watched)
                self._devices = watched
            xids = self._drain_xids()
            health = tuple(self._read_device(device, xids) for device in self._devices)
        except nvml_errors.FAILURES as error:
            return self._failed(error)
        self._seen_gpu = True
        return HealthReading(devices=health)

    def close(self) -> None:
        """Free the event set, shut NVML down (balancing our init) and stop reading."""
        self._shutdown()
        self._closed = True

    # -- connecting ---------------------------------------------------------------------

    def _enumerate(self) -> tuple[_Device, ...]:
        count = pynvml.nvmlDeviceGetCount()
        wanted = self._requested if self._requested is not None else tuple(range(count))
        # An index that does not exist is the utilisation monitor's to report; here it is
        # simply not a GPU we can say anything about.
        return tuple(
            _Device(index=index, handle=pynvml.nvmlDeviceGetHandleByIndex(index))
            for index in wanted
            if index < count
        )

    def _register_xid_events(self, devices: tuple[_Device, ...]) -> None:
        """Register every device for XID critical errors; unsupported leaves xids empty.

        Any other failure frees the set and propagates: the next read starts over.
        """
        if self._events_unsupported:
            return
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except nvml_errors.UNSUPPORTED as error:
            self._events_unavailable(error)
            return
        self._event_set = event_set
        try:
            for device in devices:
                pynvml.nvmlDeviceRegisterEvents(
                    device.handle, pynvml.nvmlEventTypeXidCriticalError, event_set
                )
        except nvml_errors.UNSUPPORTED as error:
            self._free_event_set()
            self._events_unavailable(error)
        except nvml_errors.FAILURES:
            self._free_event_set()
            raise

    def _events_unavailable(self, error: Exception) -> None:
        self._events_unsupported = True
        self._log.debug(
            events.GPU_POLL_FAILED,
            field="xids",
            error=str(error),
            error_type=type(error).__name__,
            degraded=True,
        )

    def _shutdown(self) -> None:
        """Balance a successful nvmlInit; a failing call (lost GPU) changes nothing for us."""
        self._free_event_set()
        self._devices = ()
        if not self._initialised:
            return
        self._initialised = False
        try:
            pynvml.nvmlShutdown()
        except nvml_errors.FAILURES as error:
            self._log.debug(events.GPU_SHUTDOWN_FAILED, error=str(error))

    def _free_event_set(self) -> None:
        event_set, self._event_set = self._event_set, None
        if event_set is None:
            return
        try:
            pynvml.nvmlEventSetFree(event_set)
        except nvml_errors.FAILURES as error:
            self._log.debug(events.GPU_SHUTDOWN_FAILED, error=str(error), what="event set")

    def _failed(self, error: Exception) -> HealthReading:
        """A GPU that answered before does not now: report it, and reconnect next read."""
        if isinstance(error, nvml_errors.NEEDS_REINIT):
            self._shutdown()
        if isinstance(error, pynvml.NVMLError_GpuIsLost):
            return HealthReading(devices=(), error=GPU_LOST_ERROR)
        return HealthReading(devices=(), error=str(error) or type(error).__name__)

    # -- reading ------------------------------------------------------------------------

    def _drain_xids(self) -> dict[int, list[int]]:
        """The XIDs pending on the event set, per device index, oldest first."""
        found: dict[int, list[int]] = {}
        if self._event_set is None:
            return found
        by_address = {_address(device.handle): device.index for device in self._devices}
        for _ in range(_MAX_EVENTS_PER_READ):
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError_Timeout:
                break  # nothing (more) pending
            if not int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
                continue
            index = by_address.get(_address(data.device))
            if index is not None:
                found.setdefault(index, []).append(int(data.eventData))
        return found

    def _read_device(self, device: _Device, xids: dict[int, list[int]]) -> DeviceHealth:
        memory = pynvml.nvmlDeviceGetMemoryInfo(device.handle)
        return DeviceHealth(
            index=device.index,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            processes=self._read_processes(device.handle),
            xids=tuple(xids.get(device.index, ())),
            recovery_action=self._read_recovery_action(device.handle),
        )

    @staticmethod
    def _read_processes(handle: object) -> tuple[GpuProcess, ...]:
        # The versioned entry points, newest first: pynvml's unversioned wrapper turns a
        # missing _v3 (drivers before 510) into NVMLLibraryMismatchError instead of
        # trying _v2, which has the same structure.
        for query in (
            pynvml.nvmlDeviceGetComputeRunningProcesses_v3,
            pynvml.nvmlDeviceGetComputeRunningProcesses_v2,
        ):
            try:
                found = query(handle)
            except pynvml.NVMLError_FunctionNotFound:
                continue
            except pynvml.NVMLError_NotSupported:
                return ()
            # pynvml already maps NVML_VALUE_NOT_AVAILABLE to None.
            return tuple(
                GpuProcess(pid=int(process.pid), used_bytes=_optional_int(process.usedGpuMemory))
                for process in found
            )
        return ()

    @staticmethod
    def _read_recovery_action(handle: object) -> str | None:
        try:
            [value] = pynvml.nvmlDeviceGetFieldValues(handle, [_RECOVERY_ACTION_FIELD])
        except nvml_errors.UNSUPPORTED:
            return None
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            return None  # NOT_SUPPORTED on drivers before 570: the field, not the call, fails
        return RECOVERY_ACTIONS.get(_field_number(value))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _field_number(value: Any) -> int:
    """The integer in an nvmlFieldValue_t, read through the union member its type names."""
    member = {
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }.get(int(value.valueType), "uiVal")
    return int(getattr(value.value, member))


def _address(handle: Any) -> int | None:
    """A device handle's pointer value: how an event's device is matched to an index."""
    return ctypes.cast(handle, ctypes.c_void_p).value
