"""The simulated GPU's activity, published to a file for the stand-in NVML library."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from sidecar.atomic_files import replace_atomically


class GpuActivity(Enum):
    """(utilisation %, power in mW) as NVML would report them for each phase."""

    IDLE = (0, 30_000)  # loading, saving, idle hangs, after exit
    TRAINING = (97, 250_000)  # steps and sample generation
    BUSY_HANG = (100, 60_000)  # a hung collective: "100% busy" at near-idle power


class GpuStateFile:
    """Publishes simulated GPU activity for the stand-in NVML library; no-op without a path."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._current: GpuActivity | None = None

    def show(self, activity: GpuActivity) -> None:
        if self._path is None or activity is self._current:
            return
        utilisation, power_mw = activity.value
        self._path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self._path, f"util={utilisation}\npower_mw={power_mw}\n")
        self._current = activity
