"""Which run to watch: one fixed train.sh, or the active run under an outputs root.

FluxGym gives every training its own ``outputs/<name>/``. When
``SIDECAR_OUTPUT_DIR`` names that outputs root (and no ``SIDECAR_TRAIN_SCRIPT`` is
set), the sidecar follows the active run: the one whose train.sh a bash process
is executing (visible with a shared PID namespace, mapped through
``SIDECAR_PATH_MAP``), else the one most recently active on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sidecar.config import Settings
from sidecar.observe.trainer_processes import executing_scripts, find_trainer_processes
from sidecar.run.paths import RunPaths, RunSetupError, resolve_run_paths

SCRIPT_NAME = "train.sh"


class RunLocator:
    def __init__(self, settings: Settings, pattern: re.Pattern[str]):
        self.settings = settings
        self.pattern = pattern
        root = settings.output_dir
        self.root = root.absolute() if root and settings.train_script is None else None
        self._cache: dict[Path, tuple[int, RunPaths]] = {}

    @property
    def following(self) -> bool:
        return self.root is not None

    def current(self) -> RunPaths | None:
        """The run to watch now; None while an outputs root holds no run yet."""
        if self.root is None:
            return self._resolve(None)
        run_folder = self._executing_run() or self._most_recent_run()
        return self._resolve(run_folder) if run_folder else None

    def executing_run(self) -> Path | None:
        """The run folder whose train.sh is being executed, if one is visible."""
        return self._executing_run() if self.root else None

    def _resolve(self, run_folder: Path | None) -> RunPaths:
        if run_folder is None:
            return resolve_run_paths(self.settings)
        script = run_folder / SCRIPT_NAME
        try:
            stamp = script.stat().st_mtime_ns
        except FileNotFoundError:
            raise RunSetupError(f"{script} vanished") from None
        cached = self._cache.get(run_folder)
        if cached and cached[0] == stamp:
            return cached[1]
        paths = resolve_run_paths(self.settings, train_script=script, output_dir=run_folder)
        self._cache[run_folder] = (stamp, paths)
        return paths

    def _executing_run(self) -> Path | None:
        assert self.root is not None
        path_map = self.settings.path_mapping
        for script in executing_scripts(find_trainer_processes(self.pattern)):
            folder = Path(path_map.to_sidecar(script)).parent
            if folder.parent == self.root and (folder / SCRIPT_NAME).is_file():
                return folder
        return None

    def _most_recent_run(self) -> Path | None:
        assert self.root is not None
        best: tuple[float, Path] | None = None
        for folder in _run_folders(self.root):
            activity = max(_mtime(folder / name) for name in (SCRIPT_NAME, "train.log", "."))
            if best is None or activity > best[0]:
                best = (activity, folder)
        return best[1] if best else None


def _run_folders(root: Path) -> list[Path]:
    try:
        with os.scandir(root) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if entry.is_dir(follow_symlinks=False)
                and not entry.name.startswith(".")
                and os.path.isfile(os.path.join(entry.path, SCRIPT_NAME))
            ]
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
