"""``training-sidecar run -- <command ...>``: supervise any trainer command in process mode.

The command is kept twice: in the ledger as given (``Ledger.command``), and as a launch
script the sidecar writes, ``<state dir>/launch.sh``, which the rest of the sidecar treats
like FluxGym's train.sh: the run's trainer adds or replaces its resume arguments there
before each relaunch (``trainers.shell`` edits it in place), and process mode runs it from
the working directory the command was given in. Starting the sidecar again with the same
command keeps that script, with the resume it holds; another command replaces it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from sidecar.atomic_files import read_text_exact, replace_atomically
from sidecar.config import Settings
from sidecar.run.ledger import LedgerError, LedgerStore
from sidecar.run.lock import RunLock, RunLockHeld
from sidecar.run.paths import RunSetupError, check_write_scope
from sidecar.trainers import LaunchScriptError, Trainer, trainer_for
from sidecar.trainers.shell.train_script import parse_train_script

__all__ = ["LAUNCH_SCRIPT", "launch_script_text", "prepare_command_run"]

LAUNCH_SCRIPT = "launch.sh"
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)

_HEADER = """#!/usr/bin/env bash
# Written by `training-sidecar run -- <command>` (the command as given is also in
# state.json). Before each relaunch the sidecar adds or replaces the trainer's resume
# arguments below; to train something else, start the sidecar with the new command.
"""


def launch_script_text(words: Sequence[str]) -> str:
    """The launch script that runs ``words`` (one command, every word quoted for bash);
    leading ``NAME=value`` words set the command's environment, as in a shell."""
    if not words:
        raise RunSetupError("`training-sidecar run --` needs a command after `--`")
    for word in words:
        if "\n" in word or "\0" in word:
            raise RunSetupError(
                f"command word {word!r} holds a newline or NUL; a launch script cannot run it"
            )
    assignments = 0
    while assignments < len(words) and _ASSIGNMENT.fullmatch(words[assignments]):
        assignments += 1
    if assignments == len(words):
        raise RunSetupError("`training-sidecar run --` needs a command after its NAME=value words")
    quoted = " ".join(shlex.quote(word) for word in words)
    return _HEADER + ("exec env " if assignments else "exec ") + quoted + "\n"


def prepare_command_run(settings: Settings, words: Sequence[str], *, cwd: Path) -> Settings:
    """Write (or keep) the launch script of ``words`` and return the settings that run it:
    process mode, that script, the command's working directory and its output folder.
    RunSetupError says what is missing (e.g. an output folder the command does not name)."""
    if settings.train_script is not None:
        raise RunSetupError(
            "`training-sidecar run -- <command>` writes its own launch script; "
            f"SIDECAR_TRAIN_SCRIPT={settings.train_script} names another: give one of the two"
        )
    if "restart_mode" in settings.model_fields_set and settings.restart_mode != "process":
        raise RunSetupError(
            f"`training-sidecar run -- <command>` launches the command itself (process mode); "
            f"SIDECAR_RESTART_MODE={settings.restart_mode} is for a trainer started by "
            "someone else: unset it, or give SIDECAR_TRAIN_SCRIPT instead of a command"
        )
    text = launch_script_text(words)
    try:
        trainer = trainer_for(settings.trainer, parse_train_script(text))
        command = trainer.read_launch_script(text)
    except LaunchScriptError as error:
        raise RunSetupError(f"command `{shlex.join(words)}`: {error}") from None
    workdir = (settings.trainer_workdir or cwd).absolute()
    path_map = settings.path_mapping

    def sidecar_path(path: str) -> Path:
        mapped = Path(path_map.to_sidecar(path))
        return mapped if mapped.is_absolute() else workdir / mapped

    location = trainer.run_location(command, sidecar_path)
    output_dir = settings.output_dir or location.output_dir
    if output_dir is None:
        why = f" ({location.why_unknown})" if location.why_unknown else ""
        raise RunSetupError(
            f"command `{shlex.join(words)}`: where {trainer.name} writes its checkpoints "
            f"cannot be told from it{why}; name the folder with SIDECAR_OUTPUT_DIR"
        )
    output_dir = output_dir.absolute()
    check_write_scope(output_dir)
    state_dir = (settings.state_dir or output_dir / ".sidecar").absolute()
    script = state_dir / LAUNCH_SCRIPT
    _refuse_while_supervised(state_dir)
    _write_unless_same_run(script, text, trainer)
    _remember(state_dir, list(words))
    return settings.model_copy(
        update={
            "train_script": script,
            "restart_mode": "process",
            "trainer_workdir": workdir,
            "output_dir": output_dir,
            "state_dir": state_dir,
            "trainer": trainer.name,
        }
    )


def _refuse_while_supervised(state_dir: Path) -> None:
    """Another sidecar supervising this output folder keeps its command and launch script."""
    lock = RunLock(state_dir)
    try:
        lock.acquire()
    except RunLockHeld as error:
        raise RunSetupError(f"{error}: stop it before starting another command there") from None
    lock.release()


def _write_unless_same_run(script: Path, text: str, trainer: Trainer) -> None:
    """Keep a launch script of the same command (it holds the resume of the run so far)."""
    try:
        if trainer.run_identity(read_text_exact(script)) == trainer.run_identity(text):
            return
    except (OSError, UnicodeDecodeError, LaunchScriptError):
        pass  # none yet, or not one to keep: written anew
    script.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(script, text, mode=0o755)


def _remember(state_dir: Path, words: list[str]) -> None:
    store = LedgerStore(state_dir)
    try:
        ledger = store.load()
    except LedgerError as error:
        raise RunSetupError(str(error)) from None
    if ledger.command != words:
        ledger.command = words
        store.save(ledger)
