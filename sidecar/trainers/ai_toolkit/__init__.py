"""ostris/ai-toolkit (``python run.py <job>.yaml``) behind the sidecar's trainer seam.

ai-toolkit resumes by itself: a restarted job loads the newest entry named ``<name>*`` in its
save root by ctime (``BaseSDTrainProcess.get_latest_save_path``), with no completeness check,
and no option picks another. So the sidecar never edits its command; its lever is to keep
"newest" complete: before a relaunch the saves that would be taken over the chosen one are
set aside under a dot-prefixed name that ai-toolkit's globs never match (``in_the_way``,
``aside_path``). Its step comes back from the save's own ``training_info`` metadata, the
step of its file name, and the loop restarts AT that step, so the step the save was made
after is trained once more (``run``: ``for step in range(start_step_num, steps)``): the
position is not exact by one step, and no option of ai-toolkit changes that.
:data:`AI_TOOLKIT` is all of it as one :class:`~sidecar.trainers.base.Trainer`.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.atomic_files import read_text_exact
from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar
from sidecar.trainers.ai_toolkit import console, save_names, save_scan
from sidecar.trainers.ai_toolkit.job_config import JobConfig, JobConfigError, load_job_config
from sidecar.trainers.ai_toolkit.launch_command import AiToolkitCommand, as_ai_toolkit, recognises
from sidecar.trainers.base import (
    ExpectedResume,
    LaunchCommand,
    ResumePosition,
    RunLocation,
    StartupReport,
)
from sidecar.trainers.sd_scripts.launch_script import script_diff
from sidecar.trainers.shell import train_script
from sidecar.trainers.shell.launch_processes import launch_process_count

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

__all__ = ["AI_TOOLKIT", "AiToolkit", "JobConfigError"]

RESUME_REASON = (
    "ai-toolkit resumes by itself from its newest save by ctime and restarts at the step in "
    "that save's training_info metadata, training that step once more; no option changes it"
)


@dataclass(frozen=True)
class _KnownJob:
    """The job a command runs, as ``run_location`` read it from its config file."""

    config: JobConfig
    save_root: Path  # the sidecar's view


class AiToolkit:
    """ai-toolkit behind the :class:`~sidecar.trainers.base.Trainer` seam.

    ``run_location`` reads the job config the command names; what it read is kept for the
    methods given only the command (or only console output): the job name, the save root,
    the save cadence. One sidecar supervises one run, so one job is known at a time.
    """

    name = "ai-toolkit"

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, ...], _KnownJob] = {}
        self._last: _KnownJob | None = None

    def recognises(self, command: LaunchCommand) -> bool:
        return recognises(command)

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        try:
            config, _ = load_job_config(command.trainer_script, command.trainer_args, sidecar_path)
        except JobConfigError as error:
            return RunLocation(None, "", why_unknown=str(error))
        known = _KnownJob(config, sidecar_path(config.save_root))
        self._jobs[command.words] = known
        self._last = known
        return RunLocation(known.save_root, config.name)

    def job_of(self, command: LaunchCommand) -> JobConfig | None:
        """The job config ``run_location`` read for ``command`` (None: not read)."""
        known = self._jobs.get(command.words)
        return known.config if known else None

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        return save_scan.find_saves(
            output_dir,
            name=output_name or None,
            now=now,
            settle_seconds=settle_seconds,
            memo=memo,
            save_root_view=self._view_of(output_dir),
        )

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        """Every save ai-toolkit would take over ``chosen``: each one newer by ctime.

        Those are the incomplete ones, and any complete one the sidecar passed over (a
        quarantined save): ai-toolkit would load it all the same. Without a choice, only the
        incomplete ones (the sidecar starts afresh or lets ai-toolkit take a whole one). A
        rename changes the ctime of the renamed file only, so setting one aside never makes
        another one newer.
        """
        if chosen is None:
            return [candidate for candidate in candidates if not candidate.complete]
        chosen_changed = save_scan.change_time(chosen.path)
        if chosen_changed is None:
            return [candidate for candidate in candidates if not candidate.complete]
        in_the_way = []
        for candidate in candidates:
            if candidate.path == chosen.path:
                continue
            changed = save_scan.change_time(candidate.path)
            # A tie goes to whichever glob lists first: set it aside rather than guess.
            if changed is not None and changed >= chosen_changed:
                in_the_way.append(candidate)
        return in_the_way

    def aside_path(self, state: Path, stamp: str) -> Path:
        names = [known.config.name for known in self._jobs.values()]
        return state.with_name(save_names.aside_name(state.name, stamp, names))

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        return [output_dir / save_names.final_name(output_name)] if output_name else []

    def resumed_state_step(self, state: Path) -> int | None:
        # The name's step is the one save(step) also writes into training_info.
        return save_names.step_of_save(state.name, None)

    def step_bar(self, text: str) -> TqdmBar | None:
        return console.step_bar(text, self._last.config.job_name if self._last else None)

    def section_at_end(self, text: str) -> Section | None:
        return None  # ai-toolkit announces no sections the sidecar tells apart

    def read_launch_script(self, text: str) -> AiToolkitCommand:
        return as_ai_toolkit(train_script.parse_train_script(text))

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        return text  # nothing on run.py's line picks a save: the set-aside step is the lever

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        return _unchanged(script)

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        return _unchanged(script)  # every save is resumable: weights, step, optimizer.pt

    def read_startup(self, text: str) -> StartupReport:
        return console.startup_report(text, self._last.config.job_name if self._last else None)

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        return ResumePosition(None, RESUME_REASON)

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        job = self.job_of(command)
        return job.save_every or None if job is not None else None

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        # save.save_every lives in the job config, which the UI rewrites on every start.
        return _unchanged(script)

    def launch_ranks(self, command: LaunchCommand) -> int:
        try:
            return launch_process_count(
                [*command.launcher_args, command.trainer_script, *command.trainer_args]
            )
        except ValueError:
            return 1  # a line its launcher would refuse starts no ranks at all

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        return _unchanged(script)

    def run_identity(self, text: str) -> str:
        # The sidecar never edits an ai-toolkit launch script: its text is the identity.
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        """The newest complete save by ctime, as ai-toolkit will name it: after the set-aside
        step that is what ``get_latest_save_path`` picks; None: no save, a fresh start."""
        known = self._jobs.get(command.words)
        newest = self._newest_complete(known)
        if known is None or newest is None:
            return None
        return ExpectedResume(posixpath.join(known.config.save_root, newest.path.name), None)

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        known = self._jobs.get(command.words)
        if known is not None and known.config.start_step is not None:
            return known.config.start_step  # train.start_step wins over the save's metadata
        if state_step is not None:
            return state_step
        newest = self._newest_complete(known)
        return newest.step or 0 if newest is not None else 0

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return script_diff(old, new, script, context=context)

    def _view_of(self, save_root: Path) -> str | None:
        for known in self._jobs.values():
            if known.save_root == save_root:
                return known.config.save_root
        return None

    def _newest_complete(self, known: _KnownJob | None) -> Candidate | None:
        if known is None:
            return None
        saves = save_scan.find_saves(
            known.save_root,
            name=known.config.name,
            now=time.time(),
            settle_seconds=0,  # asked at a launch: the previous attempt has stopped
            save_root_view=known.config.save_root,
        )
        whole = [save for save in saves if save.complete]
        return max(whole, key=_ctime_key) if whole else None


def _ctime_key(candidate: Candidate) -> float:
    return save_scan.change_time(candidate.path) or 0.0


def _unchanged(script: Path) -> tuple[bool, str, str]:
    text = read_text_exact(script)
    return False, text, text


AI_TOOLKIT = AiToolkit()
