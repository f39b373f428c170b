"""Detect-only mode (``SIDECAR_RESTART_MODE=none``): watch and report, never act.

The sidecar cannot see this trainer's processes or exit status: it reports verdicts and
watches again once progress resumes. Asking it to stop or restart is a programming error.
"""

from __future__ import annotations

from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.run.paths import RunPaths


class DetectOnly:
    mode = "none"
    acts = False
    exits_with_run = False
    stop_before_rewrite = False
    relaunches = False
    outlives_sidecar = True

    def use_run(self, paths: RunPaths) -> None:
        """Nothing to follow: this mode never touches the trainer."""

    def start(self) -> None:
        """The trainer was started by someone else."""

    def status(self) -> TrainerStatus:
        # Not visible from here: taken as running until the final model says otherwise.
        return TrainerStatus(running=True)

    def trainer_pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        raise RestartError("detect-only mode never stops the trainer")

    def restart(self) -> None:
        raise RestartError("detect-only mode never restarts the trainer")

    def stop_trees(self, roots: list[int]) -> None:
        raise RestartError("detect-only mode never stops the trainer")
