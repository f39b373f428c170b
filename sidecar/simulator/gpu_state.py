"""The simulated GPU's activity, published to a file for the stand-in NVML library."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from sidecar.atomic_files import replace_atomically


class GpuActivity(Enum):
    """(utilisation %, power in mW) as NVML would report them for each phase."""

    IDLE = (0, 30_000)  # loading, saving, idle hangs, after exit
    TRAINING = (97, 250_000)  # steps and sample generation
    BUSY_HANG = (100, 60_000)  # a hung collective: "100% busy" at near-idle power


# What a Flux LoRA holds on a 24 GB card while it trains (fp8 base, cached latents).
HELD_BYTES = 18 * 1024**3


class GpuStateFile:
    """Publishes simulated GPU activity for the stand-in NVML library; no-op without a path.

    The trainer also lists itself as the GPU's compute process holding ``HELD_BYTES``, and
    asks the stand-in to drop it once it has exited (``free_on_exit``), as the driver frees a
    process's memory when its contexts go: nobody has to edit the file after a kill.
    """

    def __init__(self, path: Path | None, pid: int | None = None) -> None:
        self._path = path
        self._pid = os.getpid() if pid is None else pid
        self._current: GpuActivity | None = None

    def show(self, activity: GpuActivity) -> None:
        if self._path is None or activity is self._current:
            return
        utilisation, power_mw = activity.value
        self._path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(
            self._path,
            f"util={utilisation}\npower_mw={power_mw}\n"
            f"procs={self._pid}:{HELD_BYTES}\nfree_on_exit=1\n",
        )
        self._current = activity
