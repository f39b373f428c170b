"""ai-toolkit's launch line: ``python run.py <job config>``, and what it means to the sidecar.

ai-toolkit's ``run.py`` (``main``) takes config files and ``-r/--recover``, ``-n/--name``,
``-l/--log``, nothing else: no option picks a save to resume from (``get_latest_save_path``
decides, see ``save_names``), so the sidecar never edits this line. Its UI starts
``python <toolkit>/run.py <training_folder>/<name>/.job_config.json``
(``ui/cron/actions/startJob.ts``), rewriting that JSON on every start.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from sidecar.trainers.ai_toolkit.job_config import (
    BARE_OPTIONS,
    CONFIG_SUFFIXES,
    VALUE_OPTIONS,
    config_arguments,
)
from sidecar.trainers.base import LaunchCommand
from sidecar.trainers.shell.train_script import TrainCommand

__all__ = ["AiToolkitCommand", "recognises"]

_ENTRY_POINT = "run.py"
_TOOLKIT_FOLDERS = ("ai-toolkit", "ai_toolkit")


@dataclass(frozen=True)
class AiToolkitCommand(TrainCommand):
    """The shell reader's command, with ai-toolkit's meaning: it names no state to resume
    from, and every save is resumable (weights with their step, and optimizer.pt)."""

    @property
    def resume(self) -> str | None:
        return None

    @property
    def output_dir(self) -> str | None:
        return None  # in the job config, not on the command line (see job_config)

    @property
    def output_name(self) -> str | None:
        return None

    @property
    def save_state(self) -> bool:
        return True


def as_ai_toolkit(command: TrainCommand) -> AiToolkitCommand:
    return AiToolkitCommand(
        trainer_script=command.trainer_script,
        launcher_args=command.launcher_args,
        trainer_args=command.trainer_args,
        unknown_values=command.unknown_values,
    )


def recognises(command: LaunchCommand) -> bool:
    """``run.py`` with only run.py's own arguments, and a config file among them: by its
    suffix, or any argument when run.py lies in an ``ai-toolkit`` folder."""
    script = command.trainer_script.replace("\\", "/")
    if posixpath.basename(script) != _ENTRY_POINT:
        return False
    arguments = command.trainer_args
    if not _only_run_py_options(arguments):
        return False
    files = config_arguments(arguments).files
    if not files:
        return False
    in_toolkit = any(part in _TOOLKIT_FOLDERS for part in script.split("/")[:-1])
    return in_toolkit or all(file.endswith(CONFIG_SUFFIXES) for file in files)


def _only_run_py_options(arguments: tuple[str, ...]) -> bool:
    for word in arguments:
        if not word.startswith("-"):
            continue
        flag = word.split("=", 1)[0]
        glued = word[:2] in ("-n", "-l") and not word.startswith("--")
        if word not in BARE_OPTIONS and flag not in VALUE_OPTIONS and not glued:
            return False
    return True
