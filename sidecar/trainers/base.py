"""The seam between the sidecar's core and one trainer: what the core asks of a trainer.

Everything else (watching the log, scanning state folders, deciding, restarting) is the
same for every trainer; this is what differs, gathered in one object per trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from sidecar.decide.sections import Section
from sidecar.observe.progress import TqdmBar

if TYPE_CHECKING:
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.checkpoints.scan import Candidate
    from sidecar.run.ledger import Ledger

_T = TypeVar("_T")

__all__ = [
    "ExpectedResume",
    "LaunchCommand",
    "LaunchScriptError",
    "ResumePosition",
    "RunLocation",
    "StartupReport",
    "Trainer",
]


@dataclass(frozen=True)
class StartupReport:
    """What a trainer said while starting an attempt (None / False: not said, or not seen)."""

    steps_per_epoch: int | None = None
    gradient_accumulation: int | None = None
    total_steps: int | None = None
    resumed_from: str | None = None  # the state it said it loaded (the trainer's view)
    train_state_loaded: bool = False  # it read the state's position file
    skipped_steps: int | None = None  # it said it skips this many steps to get there

    def merged(self, newer: StartupReport) -> StartupReport:
        """This report updated with what a later piece of output said."""
        return StartupReport(
            steps_per_epoch=_newer(newer.steps_per_epoch, self.steps_per_epoch),
            gradient_accumulation=_newer(newer.gradient_accumulation, self.gradient_accumulation),
            total_steps=_newer(newer.total_steps, self.total_steps),
            resumed_from=_newer(newer.resumed_from, self.resumed_from),
            train_state_loaded=newer.train_state_loaded or self.train_state_loaded,
            skipped_steps=_newer(newer.skipped_steps, self.skipped_steps),
        )


@dataclass(frozen=True)
class ExpectedResume:
    """What a launch script asks the trainer to resume from."""

    state: str  # the state folder it names (the trainer's view)
    initial_step: int | None  # the exact step it asks for; None: the trainer's own rule


@dataclass(frozen=True)
class ResumePosition:
    """Where the next attempt must start in the whole schedule."""

    initial_step: int | None  # None: the trainer's own rule (the exact step is not known)
    reason: str


@dataclass(frozen=True)
class RunLocation:
    """Where a launch command's run keeps its files, as the sidecar sees them."""

    output_dir: Path | None  # where its states are; None: not known from the command
    output_name: str  # the name its final model and states carry ("" where none)
    why_unknown: str | None = None  # why output_dir cannot be known (a setting to name)
    # The trainer makes output_dir at its start: it is the run's folder before it exists.
    # False (sd-scripts under FluxGym): a folder not there yet falls back to the script's.
    made_by_trainer: bool = True


def _newer(value: _T | None, old: _T | None) -> _T | None:
    return value if value is not None else old


class LaunchScriptError(ValueError):
    """The launch script cannot be understood or safely edited; the message says where."""


class LaunchCommand(Protocol):
    """The trainer command a launch script runs, as far as the core reads it."""

    @property
    def trainer_script(self) -> str: ...

    @property
    def launcher_args(self) -> tuple[str, ...]:
        """The launcher and its own arguments (``accelerate launch --num_processes 2``)."""
        ...

    @property
    def trainer_args(self) -> tuple[str, ...]:
        """The arguments after the trainer script (or entry point)."""
        ...

    @property
    def words(self) -> tuple[str, ...]:
        """The whole command, as the launcher receives it."""
        ...

    @property
    def resume(self) -> str | None:
        """The state folder it resumes from (as the trainer sees it), if any."""
        ...

    @property
    def output_dir(self) -> str | None: ...

    @property
    def output_name(self) -> str | None: ...

    def option(self, name: str) -> str | None:
        """The value of option ``name`` among the trainer's arguments (the last one wins)."""
        ...

    def unresolved(self, name: str) -> str | None:
        """Why the value of option ``name`` cannot be known from the script alone (it
        comes from a variable the script does not set); None when it can."""
        ...

    @property
    def save_state(self) -> bool:
        """Whether it saves resumable state at all."""
        ...


class Trainer(Protocol):
    """One trainer: its state folder names, its step counter and its launch script dialect.

    The launch script methods raise :class:`LaunchScriptError` (a trainer's own subclass)
    for a script they cannot read or edit safely.
    """

    @property
    def name(self) -> str:
        """What ``trainer_named`` finds it by (a ``SIDECAR_TRAINER`` value)."""
        ...

    def recognises(self, command: LaunchCommand) -> bool:
        """Whether ``command`` (read by the shared shell reader) starts this trainer: what
        ``SIDECAR_TRAINER=auto`` decides by. At most one trainer recognises a command."""
        ...

    def run_location(
        self, command: LaunchCommand, sidecar_path: Callable[[str], Path]
    ) -> RunLocation:
        """Where the run of ``command`` writes; ``sidecar_path`` turns a path as the trainer
        sees it (relative to its working directory, or absolute) into one the sidecar can
        open (for a config file the command names)."""
        ...

    def find_states(
        self,
        output_dir: Path,
        *,
        now: float,
        settle_seconds: float,
        output_name: str | None,
        memo: FileReportMemo | None = None,
    ) -> list[Candidate]:
        """Every state it could resume from in ``output_dir``, complete ones newest first
        (by completion time), then the rest; each incomplete one says why. A state deleted
        while it is read (the trainer's own pruning) is left out, not reported."""
        ...

    def in_the_way(
        self, candidates: Sequence[Candidate], chosen: Candidate | None
    ) -> list[Candidate]:
        """The incomplete states that the trainer's own "latest" rule would take over
        ``chosen`` on its next start (its auto-resume, its pruning): the sidecar sets them
        aside. Empty where the sidecar names the state to resume from and the trainer obeys."""
        ...

    def aside_path(self, state: Path, stamp: str) -> Path:
        """Where ``state`` goes when set aside at ``stamp`` (a UTC time): beside it, under a
        name that the trainer's own listing, resume and pruning never match."""
        ...

    def final_model_paths(self, output_dir: Path, output_name: str) -> Sequence[Path]:
        """Where its final model may be written: its presence says the run completed."""
        ...

    def resumed_state_step(self, state: Path) -> int | None:
        """The step that the state at ``state`` records (None: not readable)."""
        ...

    def step_bar(self, text: str) -> TqdmBar | None:
        """The last redraw of its step counter bar in console output, if any."""
        ...

    def section_at_end(self, text: str) -> Section | None:
        """What it announced last in a stretch of console output (None: nothing known)."""
        ...

    def read_launch_script(self, text: str) -> LaunchCommand:
        """The trainer command in the launch script's text."""
        ...

    def rewritten_launch_script(
        self,
        text: str,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> str:
        """The launch script's text as ``rewrite_launch_script`` would write it (dry runs)."""
        ...

    def rewrite_launch_script(
        self,
        script: Path,
        *,
        resume_from: str | None,
        ensure_save_state: bool,
        initial_step: int | None = None,
    ) -> tuple[bool, str, str]:
        """Point the script at ``resume_from`` (the trainer's view of the path; None: no
        resume) starting at ``initial_step`` of the whole schedule (None: the trainer's own
        rule), atomically. Returns (changed, old text, new text)."""
        ...

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        """Make the script save resumable state, leaving its resume argument as it is."""
        ...

    def read_startup(self, text: str) -> StartupReport:
        """What a piece of its console output says about the schedule and the resume."""
        ...

    def resume_position(self, state: Candidate, ledger: Ledger) -> ResumePosition:
        """The absolute step of ``state`` (written by one of the ledger's attempts), which
        the next launch must start from to go on exactly where the state was saved."""
        ...

    def state_cadence(self, command: LaunchCommand, steps_per_epoch: int | None) -> int | None:
        """Steps between two resumable saves; None when it saves none (or it is unknown)."""
        ...

    def add_save_cadence(
        self, script: Path, *, every_n_steps: int, keep_last_steps: int
    ) -> tuple[bool, str, str]:
        """Save resumable state at least every ``every_n_steps`` steps, keeping the step
        states of the last ``keep_last_steps`` steps; a user's own denser cadence or own
        bound stays."""
        ...

    def launch_ranks(self, command: LaunchCommand) -> int:
        """How many training processes the command starts (more than one: collectives)."""
        ...

    def remedy(self, script: Path, hang: str) -> tuple[bool, str, str]:
        """Apply the known mitigation of the hang class ``hang`` (a ``HangClass`` value) to
        the launch script, atomically, keeping the original; unchanged when it has none.
        Returns (changed, old text, new text)."""
        ...

    def run_identity(self, text: str) -> str:
        """The launch script's identity without the sidecar's own edits (resume, position,
        state saving): equal for every relaunch of one run, different for other settings."""
        ...

    def expected_resume(self, command: LaunchCommand) -> ExpectedResume | None:
        """What this command asks the trainer to resume from; None: not resuming."""
        ...

    def launch_initial_step(
        self, command: LaunchCommand, *, state_step: int | None, steps_per_epoch: int | None
    ) -> int | None:
        """The initial step the trainer will compute for this command, resuming from a
        state whose own step is ``state_step`` (None: not resuming, or not readable);
        None when it needs ``steps_per_epoch`` and that is not known yet."""
        ...

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        """A unified diff of a rewrite, for logs and dry runs."""
        ...
