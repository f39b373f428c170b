"""``SIDECAR_FOLLOW=kohya-gui``: supervise the run the kohya_ss GUI starts, with no train.sh.

The GUI starts ``accelerate launch ... sd-scripts/<x>_train_network.py --config_file
<output>/config_lora-<time>.toml`` as its own child. The sidecar waits for that process,
captures its command line, working directory and environment into a launch script in the
run's sidecar folder (``captured_launch``), and records the process as the run's trainer,
so that process mode adopts it as it adopts a trainer an earlier sidecar launched: watched,
not restarted. After a stall or crash the sidecar stops it and relaunches the captured
script itself, with ``--resume`` and sd-scripts' position flags appended, from then on in
process mode. Capturing again (the sidecar restarted) keeps the script of the same run,
with the resume it holds.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from sidecar import events
from sidecar.atomic_files import read_text_exact
from sidecar.config import Settings
from sidecar.observe.flight_recorder import recorder_environment
from sidecar.run.captured_launch import (
    CapturedLaunch,
    CaptureError,
    capture_process,
    captured_script_path,
    find_gui_trainer,
    launch_script_text,
    write_launch_script,
)
from sidecar.run.lock import TrainerPidFile
from sidecar.run.paths import RunSetupError, check_write_scope
from sidecar.trainers import LaunchScriptError
from sidecar.trainers.sd_scripts import SD_SCRIPTS
from sidecar.trainers.sd_scripts.config_file import CONFIG_FILE, config_path
from sidecar.trainers.shell.trainer_command import find_option

__all__ = ["take_over_gui_run"]

# Set by the sidecar at each launch (process mode's NCCL flight recorder): never frozen
# into the script, where an export would override the launch's own value.
_LAUNCH_VARIABLES = tuple(recorder_environment(Path("/")))
# The sidecar's own settings, in the environment of a process it started: never the run's.
_OWN_PREFIXES = ("SIDECAR_", "TRAINING_SIDECAR_")


def take_over_gui_run(
    settings: Settings, *, stop_event: threading.Event, log: Any
) -> Settings | None:
    """Wait for the GUI's trainer and return the settings that supervise it (None: asked to
    stop while waiting). RunSetupError when it cannot be captured or understood."""
    waiting_logged = False
    while True:
        process = find_gui_trainer()
        if process is not None:
            break
        if not waiting_logged:
            log.info(
                events.WAITING_FOR_GUI_RUN,
                note="waiting for the kohya_ss GUI to start a training run",
            )
            waiting_logged = True
        if stop_event.wait(settings.poll_interval):
            return None
    try:
        launch = _with_absolute_config(capture_process(process))
    except CaptureError as error:
        raise RunSetupError(f"the kohya_ss GUI's run (pid {process.pid}): {error}") from None
    own = [name for name in launch.environment if name.startswith(_OWN_PREFIXES)]
    text = launch_script_text(launch, leave_out=(*_LAUNCH_VARIABLES, *own))
    try:
        command = SD_SCRIPTS.read_launch_script(text)
    except LaunchScriptError as error:
        raise RunSetupError(f"the kohya_ss GUI's run (pid {launch.pid}): {error}") from None
    workdir = Path(launch.workdir)
    location = SD_SCRIPTS.run_location(
        command, lambda path: Path(path) if Path(path).is_absolute() else workdir / path
    )
    output_dir = settings.output_dir or location.output_dir
    if output_dir is None:
        raise RunSetupError(
            f"the kohya_ss GUI's run (pid {launch.pid}) names no output folder in its command "
            "line or its --config_file; set SIDECAR_OUTPUT_DIR"
        )
    check_write_scope(output_dir)
    state_dir = (settings.state_dir or output_dir / ".sidecar").absolute()
    script = captured_script_path(state_dir)
    # An earlier sidecar's relaunch of this run (its `bash <script>` exec'd the trainer, so
    # the pid it recorded is this process): its environment is the sidecar's and its script
    # holds the resume, so the script is kept, never captured anew.
    earlier = TrainerPidFile(state_dir).live_trainer()
    kept = (earlier is not None and earlier.pid == launch.pid and script.is_file()) or (
        _same_run_script(script, text)
    )
    if not kept:
        write_launch_script(script, text)
    TrainerPidFile(state_dir).record(launch.pid)
    log.info(
        events.GUI_RUN_CAPTURED,
        pid=launch.pid,
        launch_script=str(script),
        kept_earlier_capture=kept,
        output_dir=str(output_dir),
        trainer_script=command.trainer_script,
    )
    return settings.model_copy(
        update={
            "train_script": script,
            "restart_mode": "process",
            "trainer_workdir": workdir,
            "output_dir": output_dir.absolute(),
            "state_dir": state_dir,
            "trainer": SD_SCRIPTS.name,
        }
    )


def _with_absolute_config(launch: CapturedLaunch) -> CapturedLaunch:
    """The captured command with its --config_file made absolute (the GUI may pass it
    relative to its own working directory), so that the sidecar reads the same TOML."""
    found = find_option(launch.argv, CONFIG_FILE)
    if not found or Path(found[-1].value).is_absolute():
        return launch
    option = found[-1]
    # sd-scripts opens the value with ".toml" added unless it ends so: the same file.
    absolute = config_path(launch.argv[option.first :], workdir=launch.workdir)
    if absolute is None:
        return launch
    argv = list(launch.argv)
    if option.first == option.last:  # --config_file=<value>
        argv[option.first] = f"{CONFIG_FILE}={absolute}"
    else:
        argv[option.last] = absolute
    return dataclasses.replace(launch, argv=tuple(argv))


def _same_run_script(script: Path, text: str) -> bool:
    """Whether ``script`` already runs this capture's run (it then holds its resume)."""
    try:
        current = read_text_exact(script)
        return SD_SCRIPTS.run_identity(current) == SD_SCRIPTS.run_identity(text)
    except (OSError, UnicodeDecodeError, LaunchScriptError):
        return False
