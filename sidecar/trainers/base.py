"""The seam between the sidecar's core and one trainer: what the core asks of a trainer.

Everything else (watching the log, scanning state folders, deciding, restarting) is the
same for every trainer; this is what differs, gathered in one object per trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sidecar.checkpoints.naming import StateNaming
from sidecar.observe.progress import TqdmBar

__all__ = ["LaunchCommand", "LaunchScriptError", "Trainer"]


class LaunchScriptError(ValueError):
    """The launch script cannot be understood or safely edited; the message says where."""


class LaunchCommand(Protocol):
    """The trainer command a launch script runs, as far as the core reads it."""

    @property
    def trainer_script(self) -> str: ...

    @property
    def resume(self) -> str | None:
        """The state folder it resumes from (as the trainer sees it), if any."""
        ...

    @property
    def output_dir(self) -> str | None: ...

    @property
    def output_name(self) -> str | None: ...

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
        """What ``trainer_named`` finds it by."""
        ...

    def state_naming(self, output_name: str | None) -> StateNaming:
        """Its state folder names for the run saving as ``output_name`` (None: any name)."""
        ...

    def step_bar(self, text: str) -> TqdmBar | None:
        """The last redraw of its step counter bar in console output, if any."""
        ...

    def read_launch_script(self, text: str) -> LaunchCommand:
        """The trainer command in the launch script's text."""
        ...

    def rewritten_launch_script(
        self, text: str, *, resume_from: str | None, ensure_save_state: bool
    ) -> str:
        """The launch script's text as ``rewrite_launch_script`` would write it (dry runs)."""
        ...

    def rewrite_launch_script(
        self, script: Path, *, resume_from: str | None, ensure_save_state: bool
    ) -> tuple[bool, str, str]:
        """Point the script at ``resume_from`` (the trainer's view of the path; None: no
        resume), atomically. Returns (changed, old text, new text)."""
        ...

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        """Make the script save resumable state, leaving its resume argument as it is."""
        ...

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        """A unified diff of a rewrite, for logs and dry runs."""
        ...
