"""GPU utilisation through NVML, as one optional signal among several.

An idle GPU is strong evidence that training has stalled; a busy GPU is never proof
of progress (a hung NCCL collective reads 100 %). The sidecar often runs where NVML
is absent (no GPU request, ``NVIDIA_VISIBLE_DEVICES`` not honoured, no driver), so
"no GPU" is a normal answer here, reported once and then left alone. A GPU that
was seen and then fails (lost card, driver reload) is a different matter: it is
reported as a failed reading so the decision logic can weigh it, and NVML is
re-initialised on the next poll.

pynvml loads ``libnvidia-ml.so.1`` lazily with ``CDLL`` inside ``nvmlInit``, so the
first ``sample()`` is where the library is found (or not); nothing happens at import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import pynvml
import structlog

from sidecar import events
from sidecar.observe import nvml_errors


@dataclass(frozen=True)
class GpuSample:
    """One device at one poll; utilisation is NVML's coarse "any kernel ran" percentage."""

    index: int
    utilization_percent: int
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None  # None when the board does not report power


@dataclass(frozen=True)
class GpuReading:
    """The result of one poll: samples for every watched device, or why there are none."""

    samples: tuple[GpuSample, ...]
    error: str | None = None  # set when this poll failed (e.g. "GPU is lost"); samples empty


class GpuMonitor(Protocol):
    """What the watch loop needs from a GPU source; the NVML adapter is one implementation."""

    def sample(self) -> GpuReading | None:
        """Poll once; None means no GPU signal is available at all (a normal situation)."""
        ...

    def close(self) -> None:
        """Release the underlying library; later samples return None."""
        ...


@dataclass(frozen=True)
class _Device:
    index: int
    handle: object  # pynvml's opaque ctypes pointer


class _PollFailed(Exception):
    """Internal: a connection attempt after an earlier success failed; report, do not raise."""

    def __init__(self, error: str, error_type: str) -> None:
        super().__init__(error)
        self.error = error
        self.error_type = error_type


class NvmlGpuMonitor:
    """Samples utilisation, memory and power of the watched GPUs through pynvml.

    Not thread-safe: one watch loop owns it. Every NVML failure is turned into a
    return value (None or a reading with ``error``) because a monitoring glitch must
    never take the sidecar down.
    """

    def __init__(
        self,
        indices: Sequence[int] | None = None,
        *,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        retry_interval: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``indices`` None watches every device; ``retry_interval`` None never retries init.

        The retry exists because a driver can appear after the sidecar starts (device
        plugin still setting up); once a minute is cheap and keeps the log quiet.
        """
        self._requested = tuple(dict.fromkeys(indices)) if indices is not None else None
        self._log: structlog.typing.FilteringBoundLogger = logger or structlog.get_logger("sidecar")
        self._retry_interval = retry_interval
        self._clock = clock

        self._devices: tuple[_Device, ...] = ()
        self._initialised = False  # nvmlInit succeeded and nvmlShutdown is owed
        self._needs_connect = True
        self._seen_gpu = False  # a GPU was once found: later failures are faults, not absence
        self._unavailable_logged = False
        self._next_init_attempt = -math.inf
        self._last_poll_error: str | None = None
        self._reported_missing: set[int] = set()
        self._closed = False

    def sample(self) -> GpuReading | None:
        """Poll every watched GPU once; see the class docstring for the failure contract."""
        if self._closed:
            return None
        if self._needs_connect:
            try:
                if not self._connect():
                    return None
            except _PollFailed as failure:
                return self._poll_failed(failure.error, failure.error_type, reinitialise=True)
        try:
            samples = tuple(self._read_device(device) for device in self._devices)
        except nvml_errors.FAILURES as error:
            reinitialise = isinstance(error, nvml_errors.NEEDS_REINIT)
            if reinitialise:
                self._needs_connect = True
            return self._poll_failed(str(error), type(error).__name__, reinitialise=reinitialise)
        self._note_recovery()
        return GpuReading(samples=samples)

    def close(self) -> None:
        """Shut NVML down (pynvml counts inits) and stop sampling."""
        self._shutdown()
        self._closed = True

    # -- connecting ---------------------------------------------------------------------

    def _connect(self) -> bool:
        """Initialise NVML and resolve the watched devices.

        Returns False when there is no GPU signal (the normal no-GPU case), raises
        _PollFailed when a GPU seen earlier cannot be reached again.
        """
        now = self._clock()
        if now < self._next_init_attempt:
            return False
        self._shutdown()
        try:
            pynvml.nvmlInit()
        except nvml_errors.FAILURES as error:
            return self._init_failed(str(error), type(error).__name__, now)
        self._initialised = True
        try:
            devices, names = self._enumerate()
        except nvml_errors.FAILURES as error:
            # The library answers but a card does not: report it like any failed poll.
            raise _PollFailed(str(error), type(error).__name__) from error
        if not devices:
            self._shutdown()
            return self._init_failed(self._no_device_reason(), "NoDevice", now)
        self._devices = devices
        self._needs_connect = False
        if not self._seen_gpu:
            self._seen_gpu = True
            self._log.info(
                events.GPU_DETECTED,
                count=len(devices),
                indices=[device.index for device in devices],
                names=names,
                driver_version=self._driver_version(),
            )
        return True

    def _init_failed(self, reason: str, error_type: str, now: float) -> bool:
        """Decide between "there is no GPU here" (quiet None) and "the GPU went away"."""
        if self._seen_gpu:
            raise _PollFailed(reason, error_type)
        if not self._unavailable_logged:
            self._unavailable_logged = True
            self._log.info(
                events.GPU_UNAVAILABLE,
                reason=reason,
                error_type=error_type,
                retry_interval=self._retry_interval,
            )
        else:
            self._log.debug(events.GPU_INIT_RETRY_FAILED, reason=reason, error_type=error_type)
        if self._retry_interval is None:
            self._next_init_attempt = math.inf
        else:
            self._next_init_attempt = now + self._retry_interval
        return False

    def _enumerate(self) -> tuple[tuple[_Device, ...], list[str]]:
        """Resolve handles for the requested indices, skipping (and reporting) absent ones."""
        count = pynvml.nvmlDeviceGetCount()
        wanted = self._requested if self._requested is not None else tuple(range(count))
        devices: list[_Device] = []
        names: list[str] = []
        for index in wanted:
            if not 0 <= index < count:
                self._report_missing(index, count)
                continue
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            devices.append(_Device(index=index, handle=handle))
            names.append(_as_text(pynvml.nvmlDeviceGetName(handle)))
        return tuple(devices), names

    def _report_missing(self, index: int, count: int) -> None:
        if index in self._reported_missing:
            return
        self._reported_missing.add(index)
        self._log.warning(events.GPU_INDEX_MISSING, index=index, device_count=count)

    def _no_device_reason(self) -> str:
        if self._requested is None:
            return "NVML reports no GPU"
        return f"none of the requested GPU indices {list(self._requested)} exist"

    def _driver_version(self) -> str | None:
        # Only for the detection log line; a driver that cannot say is still usable.
        try:
            return _as_text(pynvml.nvmlSystemGetDriverVersion())
        except nvml_errors.FAILURES as error:
            self._log.debug(events.GPU_DRIVER_VERSION_UNKNOWN, error=str(error))
            return None

    def _shutdown(self) -> None:
        """Balance a successful nvmlInit; a failing shutdown (lost GPU) changes nothing for us."""
        self._devices = ()
        if not self._initialised:
            return
        self._initialised = False
        try:
            pynvml.nvmlShutdown()
        except nvml_errors.FAILURES as error:
            self._log.debug(events.GPU_SHUTDOWN_FAILED, error=str(error))

    # -- polling ------------------------------------------------------------------------

    def _read_device(self, device: _Device) -> GpuSample:
        utilization = pynvml.nvmlDeviceGetUtilizationRates(device.handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(device.handle)
        return GpuSample(
            index=device.index,
            utilization_percent=int(utilization.gpu),
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            power_watts=self._read_power_watts(device.handle),
        )

    @staticmethod
    def _read_power_watts(handle: object) -> float | None:
        try:
            milliwatts = pynvml.nvmlDeviceGetPowerUsage(handle)
        except nvml_errors.UNSUPPORTED:
            return None  # an answer, not a failure: this board does not report power
        return int(milliwatts) / 1000.0

    def _poll_failed(self, error: str, error_type: str, *, reinitialise: bool) -> GpuReading:
        """Report a failed poll; log it only when it is new, so a dead card cannot flood the log."""
        if error != self._last_poll_error:
            self._log.warning(
                events.GPU_POLL_FAILED,
                error=error,
                error_type=error_type,
                reinitialise_next_poll=reinitialise,
            )
        self._last_poll_error = error
        return GpuReading(samples=(), error=error)

    def _note_recovery(self) -> None:
        if self._last_poll_error is None:
            return
        self._log.info(events.GPU_POLL_RECOVERED, previous_error=self._last_poll_error)
        self._last_poll_error = None


def _as_text(value: str | bytes) -> str:
    """pynvml returned bytes before 11.x and str since; accept both."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
