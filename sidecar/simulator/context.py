"""What one simulated trainer process acts through, shared by the training loop and its saver.

:data:`Sleep` and :data:`Clock` are injectable so tests can run the trainer without waiting;
:class:`TrainerContext` bundles them with the output streams, the GPU state file and the
fault plan, so each part of the trainer is handed one object instead of the same five.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.simulator.faults import FaultPlan
from sidecar.simulator.gpu_state import GpuStateFile

if TYPE_CHECKING:
    # For the annotation only: terminal_output imports Clock from here, a cycle at run time.
    from sidecar.simulator.terminal_output import Terminal

Sleep = Callable[[float], None]
Clock = Callable[[], float]


@dataclass(frozen=True)
class TrainerContext:
    """The streams, simulated GPU, faults and time of one trainer process."""

    terminal: Terminal
    gpu: GpuStateFile
    faults: FaultPlan
    sleep: Sleep = time.sleep
    clock: Clock = time.monotonic
