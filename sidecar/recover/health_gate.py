"""The health gate in front of a relaunch: wait for the GPU memory to be freed, or stop.

A stopped trainer's GPU memory is freed only once the driver has torn down its CUDA
contexts, which can take seconds after the processes are gone (longer for a process in
uninterruptible sleep); a relaunch that starts before that can run out of memory on its
first allocation. And a GPU that NVML reports lost, or in need of a reset, cannot run the
relaunch at all: restarting would only burn the restart budget.

Use: ``held = gate.holders(trainer_pids)`` while the trainer still runs, stop it, then
``gate.wait_until_released(held)`` before relaunching. The verdict is
``sidecar.decide.health_gate.judge``'s; this module only reads, waits and logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from sidecar import events
from sidecar.decide.health_gate import Gate, GateDecision, judge
from sidecar.observe.gpu_health import HealthProbe, HealthReading


class HealthGate:
    """Polls ``probe`` through ``judge`` until the gate is not WAIT (at most ``bound`` s)."""

    def __init__(
        self,
        probe: HealthProbe,
        *,
        bound: float,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        interval: float = 0.5,
    ) -> None:
        """``bound``: longest wait for freed memory (s, >= 0); ``interval``: between polls (> 0)."""
        if bound < 0:
            raise ValueError(f"bound must be >= 0 seconds, got {bound}")
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self._probe = probe
        self._bound = bound
        self._log = log
        self._clock = clock
        self._sleep = sleep
        self._interval = interval
        # XIDs drained by this recovery's earlier reads (the probe reports each once): a
        # card that fell off the bus while the trainer was being stopped must still stop
        # the relaunch. Cleared by holders(), which starts each recovery, so that a GPU
        # reset by the user between two incidents is not held against the next one.
        self._xids_seen: dict[int, tuple[int, ...]] = {}

    def holders(self, trainer_pids: Sequence[int]) -> frozenset[int]:
        """The pids on the GPU whose memory the relaunch must wait for.

        Read BEFORE the trainer is stopped (afterwards its pids may be gone from the list
        for good or not yet). These are the trainer's pids found on the GPU. When none of
        ``trainer_pids`` is there although processes are, NVML is reporting host pids and
        the trainer runs in another PID namespace (a container: ``nvmlDeviceGetCompute
        RunningProcesses`` answers host pids there); then every pid on the GPU is taken,
        as on a GPU dedicated to this run. On a shared GPU that means waiting (at most
        the bound) for someone else's memory too, which delays but never breaks a relaunch.
        """
        self._xids_seen = {}
        reading = self._read()
        if reading is None or reading.error is not None:
            return frozenset()
        if not trainer_pids:
            return frozenset()  # nothing of the trainer left (it crashed): nothing to wait for
        on_gpu = {process.pid for device in reading.devices for process in device.processes}
        trainers = on_gpu & set(trainer_pids)
        return frozenset(trainers or on_gpu)

    def wait_until_released(
        self, held_by: frozenset[int], *, wait: Callable[[float], bool] | None = None
    ) -> GateDecision | None:
        """After the stop: poll until ``held_by`` left the GPU, the bound passed, or the GPU
        needs a reset; logs the outcome and returns the final decision (never WAIT).

        ``wait(seconds)`` sleeps between polls instead of ``sleep`` (the loop's: it beats the
        heartbeat) and returns True when the sidecar is told to stop; the wait then ends
        with None."""
        started = self._clock()
        while True:
            waited = max(0.0, self._clock() - started)
            decision = judge(self._read(), held_by=held_by, waited=waited, bound=self._bound)
            if decision.gate is not Gate.WAIT:
                self._report(decision, held_by)
                return decision
            # Never sleep past the bound: the last poll happens when it is reached.
            pause = max(0.0, min(self._interval, self._bound - waited))
            if wait is None:
                self._sleep(pause)
            elif wait(pause):
                return None

    def _read(self) -> HealthReading | None:
        """Read the probe, folding in the XIDs that earlier reads already drained."""
        reading = self._probe.read()
        if reading is None or reading.error is not None:
            return reading
        devices = []
        for device in reading.devices:
            seen = self._xids_seen.get(device.index, ()) + device.xids
            self._xids_seen[device.index] = seen
            devices.append(replace(device, xids=seen))
        return replace(reading, devices=tuple(devices))

    def _report(self, decision: GateDecision, held_by: frozenset[int]) -> None:
        figures = decision.figures
        if decision.gate is Gate.GPU_NEEDS_RESET:
            self._log.error(events.GPU_NEEDS_RESET, reason=decision.reason, **figures)
        elif figures.get("holding_pids"):
            self._log.warning(
                events.GPU_MEMORY_NOT_RELEASED,
                reason=decision.reason,
                bound=self._bound,
                seconds=round(figures["waited_seconds"], 3),
                **_without(figures, "waited_seconds"),
            )
        elif held_by and "holding_pids" in figures:
            # Only when there was memory to wait for and NVML could show it gone.
            self._log.info(
                events.GPU_MEMORY_RELEASED,
                seconds=round(figures["waited_seconds"], 3),
                pids=sorted(held_by),
                **_without(figures, "waited_seconds", "holding_pids"),
            )


def _without(figures: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in figures.items() if name not in names}
