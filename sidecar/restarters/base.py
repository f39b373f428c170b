"""The contract every restart mode fulfils, so the watchdog loop never knows which it has."""

from __future__ import annotations

from typing import Protocol


class RestartError(Exception):
    """The trainer could not be (re)started; the message says why."""


class Restarter(Protocol):
    mode: str

    def start(self) -> None:
        """Launch the trainer for the first time (or make sure it runs)."""

    def exit_code(self) -> int | None:
        """The trainer's exit status once it has ended; None while it runs or when unknowable."""

    def trainer_pids(self) -> list[int]:
        """Process ids of the trainer's processes (for figures and incident reports)."""

    def stop(self) -> None:
        """Stop every process of the trainer and wait until they are gone."""

    def restart(self) -> None:
        """Start the trainer again after train.sh was rewritten; raises RestartError."""
