"""Faults in action: hangs that stall the process and crashes that end it like a CUDA error."""

from __future__ import annotations

import math

from sidecar.simulator.context import TrainerContext
from sidecar.simulator.faults import Fault
from sidecar.simulator.gpu_state import GpuActivity


class SimulatedCrash(Exception):
    """Unwinds the simulated training to main(), which prints the crash and exits with its code."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.to_spec())
        self.fault = fault


def crash_report(fault: Fault, script: str) -> str:
    """A traceback shaped like a CUDA failure inside sd-scripts' training step."""
    return (
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 519, in <module>\n'
        "    trainer.train(args)\n"
        '  File "train_network.py", line 1230, in train\n'
        "    accelerator.backward(loss)\n"
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
        f"(simulated by sidecar.simulator: {fault.to_spec()})\n"
    )


class FaultActor:
    """Carries out a hang or crash; hangs last forever unless the fault gives ``seconds``."""

    def __init__(self, context: TrainerContext) -> None:
        self._context = context

    def suffer(self, fault: Fault) -> None:
        if fault.kind in ("crash", "crash_in_save"):
            raise SimulatedCrash(fault)
        if fault.kind == "hang_busy":
            self._context.gpu.show(GpuActivity.BUSY_HANG)
            self._spin(fault.seconds)
        else:  # hang_idle, hang_in_save
            self._context.gpu.show(GpuActivity.IDLE)
            self._idle(fault.seconds)

    def _idle(self, seconds: float | None) -> None:
        if seconds is not None:
            self._context.sleep(seconds)
            return
        while True:
            self._context.sleep(3600)

    def _spin(self, seconds: float | None) -> None:
        deadline = math.inf if seconds is None else self._context.clock() + seconds
        while self._context.clock() < deadline:
            pass  # burn one CPU, like a thread stuck polling a collective
