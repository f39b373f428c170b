"""Signal mode: no Docker socket, only a shared PID namespace (the Kubernetes way).

The sidecar stops the trainer's processes with SIGTERM, then SIGKILL after the
grace; the container runtime's restart policy brings the trainer container back,
and it re-reads train.sh, which already points at the newest complete checkpoint.

When the platform stops the pod (a preemption, an eviction, a node drain), the kubelet stops
the trainer before a native sidecar, so the sidecar sees the trainer go first, exactly as
after a crash. The trainer container's wrapper creates ``SIDECAR_TERMINATION_FILE`` (on a
volume both share) when it gets the kubelet's SIGTERM, before passing it on: a trainer found
gone while that file exists was interrupted, not crashed. The sidecar's own stop signals
train.sh's processes, never the wrapper, so it never creates the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sidecar import events
from sidecar.observe.process_tree import kernel_view, terminate_tree, tree_of
from sidecar.observe.trainer_processes import attempt_key, find_trainer_processes
from sidecar.restarters.base import RestartError, SurvivedKill, TrainerStatus
from sidecar.run.paths import RunPaths


class SignalRestarter:
    mode = "signal"
    acts = True
    exits_with_run = False
    stop_before_rewrite = False
    relaunches = False
    outlives_sidecar = True

    def __init__(
        self,
        *,
        pattern: re.Pattern[str],
        kill_grace: float,
        log: Callable[..., Any] | None = None,
        termination_file: Path | None = None,
    ):
        self.pattern = pattern
        self.kill_grace = kill_grace
        self._log = log or (lambda *args, **kwargs: None)
        self.termination_file = termination_file

    def use_run(self, paths: RunPaths) -> None:
        """Nothing to follow: this mode acts on the trainer, not on a run's files."""

    def start(self) -> None:
        """The orchestrator starts the trainer; nothing to do."""

    def status(self) -> TrainerStatus:
        processes = find_trainer_processes(self.pattern)
        # Exit codes belong to the trainer's parent (the runtime), not to us.
        return TrainerStatus(
            running=bool(processes),
            attempt=attempt_key(processes),
            went_with_container=not processes and self._pod_terminating(),
        )

    def _pod_terminating(self) -> bool:
        return self.termination_file is not None and self.termination_file.exists()

    def trainer_pids(self) -> list[int]:
        return sorted(process.pid for process in find_trainer_processes(self.pattern))

    def stop(self) -> None:
        stop_processes(self.pattern, self.kill_grace, self._log)

    def restart(self) -> None:
        """Stopping is the restart: the runtime's restart policy starts the container again."""
        self.stop()

    def stop_trees(self, roots: list[int]) -> None:
        stop_trees(roots, self.kill_grace, self._log)


def stop_processes(pattern: re.Pattern[str], grace: float, log: Callable[..., Any]) -> None:
    _terminate(
        find_trainer_processes(pattern),
        grace,
        log,
        denied="not allowed to signal the trainer's processes ({error}); run the sidecar as "
        "the trainer's UID or give it CAP_KILL",
    )


def stop_trees(roots: list[int], grace: float, log: Callable[..., Any]) -> None:
    """Stop the process trees rooted at ``roots`` only (one launch of two)."""
    processes = [process for root in roots for process in tree_of(root)]
    _terminate(
        processes, grace, log, denied=f"not allowed to signal trainer processes {roots} ({{error}})"
    )


def _terminate(
    processes: list[psutil.Process], grace: float, log: Callable[..., Any], *, denied: str
) -> None:
    """SIGTERM, then SIGKILL after ``grace``; ``denied`` (with ``{error}``) says what to fix
    when signalling is not allowed."""
    if not processes:
        return
    try:
        survivors = terminate_tree(
            processes,
            grace=grace,
            on_kill=lambda alive: log(
                events.TRAINER_KILLED,
                pids=[p.pid for p in alive],
                reason=f"still running {grace:g} s after SIGTERM",
            ),
        )
    except (PermissionError, psutil.AccessDenied) as error:
        raise RestartError(denied.format(error=error)) from error
    if survivors:
        raise SurvivedKill(kernel_view(survivors))
