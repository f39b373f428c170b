"""Whether the trainer can be seen this poll, with each change of reachability logged once.

A Docker daemon that is down or a container that was removed makes the trainer's status
unknowable for a while: the loop must neither judge nor recover a run it cannot see.
"""

from __future__ import annotations

from typing import Any

from sidecar import events
from sidecar.restarters.base import Restarter, RestartError, TrainerStatus


class TrainerVisibility:
    def __init__(self, restarter: Restarter, log: Any) -> None:
        self.restarter = restarter
        self.log = log
        self._problem: str | None = None  # the reason it could not be seen, logged once

    def status(self) -> TrainerStatus | None:
        """The trainer's status; None when it cannot be known this poll."""
        try:
            status = self.restarter.status()
        except RestartError as error:
            self._note_problem(error)
            return None
        if self._problem is not None:
            self._problem = None
            self.log.info(events.TRAINER_REACHABLE)
        return status

    def start(self) -> None:
        """Container modes: check the trainer can be reached at all, before the first poll."""
        try:
            self.restarter.start()
        except RestartError as error:
            self._note_problem(error)

    def _note_problem(self, error: RestartError) -> None:
        if str(error) != self._problem:
            self._problem = str(error)
            self.log.error(events.TRAINER_UNREACHABLE, reason=str(error))
