"""Where everything of one run is, as the sidecar sees it, derived once from the settings.

train.sh names paths as the trainer sees them; ``SIDECAR_PATH_MAP`` turns them
into paths the sidecar can open. Defaults follow FluxGym's layout: the script
lives at ``<root>/outputs/<name>/train.sh`` and runs with ``<root>`` as its
working directory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sidecar.atomic_files import read_text_exact
from sidecar.config import Settings
from sidecar.run.path_map import PathMap
from sidecar.trainers import LaunchCommand, LaunchScriptError, Trainer, trainer_for
from sidecar.trainers.base import RunLocation
from sidecar.trainers.sd_scripts import SD_SCRIPTS


class RunSetupError(Exception):
    """The run cannot be located; the message names the setting to fix."""


@dataclass(frozen=True)
class RunPaths:
    train_script: Path
    output_dir: Path
    trainer_workdir: Path
    state_dir: Path
    train_log: Path
    output_name: str
    path_map: PathMap
    trainer: Trainer = SD_SCRIPTS  # whose launch script, state folders and progress lines

    def launch_ranks(self) -> int:
        """How many processes train.sh starts now (1 when it cannot be read)."""
        try:
            _, command = read_train_script(self.train_script, self.trainer)
        except RunSetupError:
            return 1
        return self.trainer.launch_ranks(command)

    @property
    def flight_recorder(self) -> Path:
        """Where a multi-process launch's ranks keep their NCCL dump FIFOs and dumps."""
        return self.state_dir / "flight-recorder"

    def final_model_present(self, since: float | None = None) -> bool:
        """Whether the final model is there, written at ``since`` or later (None: ever)."""
        written = self.final_model_mtime()
        return written is not None and (since is None or written >= since)

    def final_model_mtime(self) -> float | None:
        """When the newest final model file was written; None when there is none."""
        times = []
        for path in self.trainer.final_model_paths(self.output_dir, self.output_name):
            try:
                status = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(status.st_mode):
                times.append(status.st_mtime)
        return max(times, default=None)


def read_train_script(path: Path, trainer: Trainer = SD_SCRIPTS) -> tuple[str, LaunchCommand]:
    """The script text and its parsed trainer command, or a RunSetupError saying what is wrong."""
    try:
        # Opening a FIFO blocks until someone writes to it: look before reading.
        if not stat.S_ISREG(path.stat().st_mode):
            raise RunSetupError(
                f"train script {path} is not a regular file; expected FluxGym's train.sh"
            )
        text = read_text_exact(path)
    except FileNotFoundError:
        raise RunSetupError(f"train script {path} does not exist (SIDECAR_TRAIN_SCRIPT)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunSetupError(f"train script {path} cannot be read: {error}") from None
    try:
        return text, trainer.read_launch_script(text)
    except LaunchScriptError as error:
        raise RunSetupError(f"train script {path} is not understood: {error}") from None


def resolve_run_paths(
    settings: Settings, *, train_script: Path | None = None, output_dir: Path | None = None
) -> RunPaths:
    """The paths of one run; ``train_script``/``output_dir`` name a run found in an outputs root."""
    script_setting = train_script or settings.train_script
    if script_setting is None:
        raise RunSetupError(
            "SIDECAR_TRAIN_SCRIPT (--train-script) is required: the path of train.sh "
            "(or SIDECAR_OUTPUT_DIR pointing at an outputs root with <run>/train.sh folders)"
        )
    script = script_setting.absolute()
    trainer = _trainer_of(script, settings.trainer)
    _, command = read_train_script(script, trainer)
    path_map = settings.path_mapping
    workdir = (settings.trainer_workdir or default_workdir(script)).absolute()
    if settings.restart_mode == "exec" and settings.trainer_workdir is None:
        # train.sh is launched inside the trainer's container: its root, in its view.
        workdir = default_workdir(Path(path_map.to_trainer(str(script))))
    location = trainer.run_location(command, lambda path: _sidecar_path(path, path_map, workdir))
    if output_dir is None:
        output_dir = settings.output_dir or _output_dir_from_script(location, script)
    check_write_scope(output_dir)
    state_dir = (
        settings.state_dir if settings.state_dir and train_script is None else None
    ) or output_dir / ".sidecar"
    return RunPaths(
        train_script=script,
        output_dir=output_dir.absolute(),
        trainer_workdir=workdir,  # in the view of whoever launches train.sh
        state_dir=state_dir.absolute(),
        train_log=(settings.train_log or output_dir / "train.log").absolute(),
        output_name=location.output_name,
        path_map=path_map,
        trainer=trainer,
    )


def _trainer_of(script: Path, setting: str) -> Trainer:
    """The trainer ``SIDECAR_TRAINER`` names, or (auto) the one the script's command starts."""
    _, command = read_train_script(script, SD_SCRIPTS)  # the shared shell reader
    try:
        return trainer_for(setting, command)
    except LaunchScriptError as error:
        raise RunSetupError(f"train script {script}: {error}") from None


def _sidecar_path(path: str, path_map: PathMap, workdir: Path) -> Path:
    """A path as the trainer sees it, as the sidecar can open it."""
    mapped = Path(path_map.to_sidecar(path))
    return mapped if mapped.is_absolute() else workdir / mapped


# The sidecar writes into the output folder (its ledger, train.log, incident reports): a
# train.sh whose --output_dir names one of these is refused rather than obeyed.
_SYSTEM_FOLDERS = tuple(
    Path(p)
    for p in (
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/proc",
        "/sbin",
        "/sys",
        "/usr",
    )
)


def check_write_scope(output_dir: Path) -> None:
    """Refuse an output folder the sidecar must never write into."""
    real = Path(os.path.realpath(output_dir))
    if real == Path(real.anchor) or any(real.is_relative_to(s) for s in _SYSTEM_FOLDERS):
        raise RunSetupError(
            f"refusing output folder {output_dir} (resolves to {real}): the sidecar writes its "
            "ledger and logs there; expected the run's own folder, e.g. <fluxgym>/outputs/<name>"
        )


def default_workdir(script: Path) -> Path:
    """FluxGym runs train.sh from its root, where ``sd-scripts/`` is relative to."""
    run_folder = script.parent
    if run_folder.parent.name == "outputs":
        return run_folder.parent.parent
    return run_folder


def _output_dir_from_script(location: RunLocation, script: Path) -> Path:
    # `--output_dir "$OUT"` with OUT from the environment: the script's folder would be a
    # guess, and a wrong guess resumes from an older state.
    if location.why_unknown:
        raise RunSetupError(
            f"train script {script}: the output folder cannot be known, "
            f"{location.why_unknown}; write the path in train.sh (or assign the variable "
            "earlier in it) or set SIDECAR_OUTPUT_DIR"
        )
    if location.output_dir is not None and (
        location.made_by_trainer or location.output_dir.is_dir()
    ):
        return location.output_dir
    return script.parent
