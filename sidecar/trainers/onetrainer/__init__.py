"""OneTrainer (Nerogar/OneTrainer) run from its command line, ``python scripts/train.py
--config-path <config.json>``: :data:`ONETRAINER` is all of it as one
:class:`~sidecar.trainers.base.Trainer`.

- Where: the config JSON names ``workspace_dir``; backups are
  ``<workspace>/backup/<timestamp>-backup-<global_step>-<epoch>-<epoch_step>/``, the final
  model is ``output_model_destination`` (``run_config``). The sidecar's output folder is the
  workspace (never ``backup/`` itself: OneTrainer would take the sidecar's own folder there
  for a backup, and prune it).
- Complete: meta.json parses and matches the name, weights and ``optimizer/optimizer.pt``
  whole, meta.json not older than them, settled (``backup_files``).
- Resume: ``--config-value continue_last_backup=true`` (``launch_command``); OneTrainer then
  takes the newest *name*, so whatever sorts after the chosen backup is set aside into the
  workspace (``backup_rules``).
- Position: exact. meta.json restores global_step, epoch, epoch_step and epoch_sample, and
  the data loader starts the epoch at ``epoch_sample`` (``DataLoaderMgdsMixin``:
  ``initial_epoch_sample``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.atomic_files import copy_once, read_text_exact, replace_atomically
from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar
from sidecar.trainers.base import (
    ExpectedResume,
    LaunchCommand,
    ResumePosition,
    RunLocation,
    StartupReport,
)
from sidecar.trainers.onetrainer import backup_rules, console
from sidecar.trainers.onetrainer.backup_scan import find_backups, meta_progress
from sidecar.trainers.onetrainer.launch_command import (
    CONTINUE_KEY,
    OneTrainerCommand,
    OneTrainerScriptError,
    as_onetrainer_command,
    is_onetrainer,
    read_command,
    set_config_value,
    without_config_value,
)
from sidecar.trainers.onetrainer.run_config import (
    RunConfigError,
    overrides,
    read_run_config,
    run_config,
)
from sidecar.trainers.sd_scripts.launch_script import script_diff
from sidecar.trainers.shell.launch_processes import launch_process_count
from sidecar.trainers.shell.train_script import TrainCommand

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

__all__ = ["ONETRAINER", "OneTrainer", "OneTrainerScriptError"]

EXACT = (
    "OneTrainer restores global_step, epoch and epoch_sample from the backup's meta.json and "
    "its data loader starts the epoch after the samples already trained"
)


class OneTrainer:
    """OneTrainer behind the :class:`~sidecar.trainers.base.Trainer` seam (no state of its own)."""

    name = "onetrainer"

    def recognises(self, command: LaunchCommand) -> bool:
        return is_onetrainer(command)

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        command = _own(command)
        for option in ("config-path", "preset-path", "config-value"):
            why = command.unresolved(option)
            if why:
                return RunLocation(None, "", why_unknown=f"--{option} {why}")
        if not command.config_path:
            return RunLocation(None, "", why_unknown="the command has no --config-path")
        try:
            config = read_run_config(
                command.config_path, command.preset_path, command.config_values, sidecar_path
            )
        except RunConfigError as error:
            return RunLocation(None, "", why_unknown=str(error))
        # output_name carries the final model's path (sidecar view): final_model_paths
        # needs it, and OneTrainer's runs have no other name.
        final_model = sidecar_path(config.output_model_destination)
        return RunLocation(sidecar_path(config.workspace_dir), str(final_model))

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        return find_backups(output_dir, now=now, settle_seconds=settle_seconds, memo=memo)

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        return backup_rules.picked_before(candidates, chosen)

    def aside_path(self, state: Path, stamp: str) -> Path:
        return backup_rules.aside_name(state, stamp)

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        if not output_name:
            return []
        destination = output_dir / output_name  # output_name is absolute: it wins
        if destination.is_dir():
            # GenericTrainer.end: a folder gets <prefix><timestamp><extension> inside it.
            try:
                with os.scandir(destination) as entries:
                    return [Path(entry.path) for entry in entries if entry.is_file()]
            except OSError:
                return []
        return [destination]

    def resumed_state_step(self, state: Path) -> int | None:
        progress = meta_progress(state)
        return progress.global_step if progress else None

    def step_bar(self, text: str) -> TqdmBar | None:
        return console.step_bar(text)

    def section_at_end(self, text: str) -> Section | None:
        return console.section_at_end(text)

    def read_launch_script(self, text: str) -> OneTrainerCommand:
        return read_command(text)

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        # No option names a backup: continuing takes the newest one, which the sidecar makes
        # the chosen one (in_the_way); off, it starts over whatever the config file says.
        # initial_step is ignored: the position is exact.
        read_command(text)
        return set_config_value(text, CONTINUE_KEY, "false" if resume_from is None else "true")

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        return _rewrite(
            script,
            lambda text: self.rewritten_launch_script(
                text, resume_from=resume_from, ensure_save_state=ensure_save_state
            ),
        )

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        text = read_text_exact(script)
        return False, text, text  # every backup is resumable; backup_after is the config's

    def read_startup(self, text: str) -> StartupReport:
        return console.startup_report(text)

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        return ResumePosition(None, EXACT)

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        said = overrides(_own(command).config_values)
        if "backup_after" not in said or "backup_after_unit" not in said:
            return None  # in the config file, which the command alone does not show
        return run_config([], _own(command).config_values).backup_every_steps(steps_per_epoch)

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        # The cadence is the config file's backup_after; an override on the command line
        # could make a user's denser cadence sparser, so none is added.
        text = read_text_exact(script)
        return False, text, text

    def launch_ranks(self, command: LaunchCommand) -> int:
        # multi_gpu (the config) spawns its ranks inside the one process started here.
        try:
            return launch_process_count(
                [*command.launcher_args, command.trainer_script, *command.trainer_args]
            )
        except ValueError:
            return 1

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        text = read_text_exact(script)
        return False, text, text  # no known mitigation through OneTrainer's options

    def run_identity(self, text: str) -> str:
        bare = without_config_value(text, CONTINUE_KEY)
        return hashlib.sha256(bare.encode("utf-8", "surrogateescape")).hexdigest()

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        return None  # the command names no backup: continue_last_backup takes the newest

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        continuing = _own(command).continues_last_backup
        return (state_step or 0) if continuing else 0

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return script_diff(old, new, script, context=context)


ONETRAINER = OneTrainer()


def _own(command: LaunchCommand) -> OneTrainerCommand:
    """``command`` with OneTrainer's reading of its options (the shared reader's words)."""
    if isinstance(command, OneTrainerCommand):
        return command
    if isinstance(command, TrainCommand):
        return as_onetrainer_command(command)
    raise OneTrainerScriptError(f"`{command.trainer_script}` was not read from a launch script")


def _rewrite(script: Path, edit: Callable[[str], str]) -> tuple[bool, str, str]:
    old = read_text_exact(script)
    new = edit(old)
    if new == old:
        return False, old, new
    copy_once(script, script.with_name(script.name + ".orig"))
    replace_atomically(script, new)
    return True, old, new
