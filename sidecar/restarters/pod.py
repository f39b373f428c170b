"""Pod mode: restart the whole pod, for multi-node runs that must restart as a group.

The sidecar watches the trainer exactly as in signal mode (a shared PID namespace,
processes found by their command line), but recovers by deleting its own pod
through the Kubernetes API. The pod's controller (a Job, an indexed Job, a
PyTorchJob) creates a replacement, and the distributed launcher (torchrun elastic)
or the controller restarts the other members of the group; the replacement runs
train.sh, which already points at the newest complete checkpoint. This module owns
no coordination of its own: it only makes its pod fail in the way those engines
already handle.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar import events
from sidecar.clients.kubernetes_api import KubernetesError, KubernetesGateway
from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.restarters.signal import SignalRestarter
from sidecar.run.paths import RunPaths


class PodRestarter:
    mode = "pod"
    acts = True
    exits_with_run = False
    # train.sh is rewritten while the trainer still runs: deleting the pod restarts it at
    # once on the replacement, which must find the new --resume already in place.
    stop_before_rewrite = False
    relaunches = False
    outlives_sidecar = True

    def __init__(
        self,
        *,
        pattern: re.Pattern[str],
        kill_grace: float,
        pod_name: str,
        namespace: str,
        gateway: KubernetesGateway,
        log: Callable[..., Any] | None = None,
        termination_file: Path | None = None,
    ):
        # Seeing and stopping the trainer's processes is signal mode's job; only the
        # restart differs.
        self.processes = SignalRestarter(
            pattern=pattern, kill_grace=kill_grace, log=log, termination_file=termination_file
        )
        self.kill_grace = kill_grace
        self.pod_name = pod_name
        self.namespace = namespace
        self.gateway = gateway
        self._log = log or (lambda *args, **kwargs: None)

    def use_run(self, paths: RunPaths) -> None:
        """Nothing to follow: this mode acts on the trainer, not on a run's files."""

    def start(self) -> None:
        """Check at start-up that RBAC allows deleting this pod, so a missing rule is
        reported now rather than at the first stall; the trainer is the kubelet's to start."""
        try:
            allowed, reason = self.gateway.may_delete_pod(self.pod_name, self.namespace)
        except KubernetesError as error:
            raise RestartError(f"cannot check pod mode's permission: {error}") from error
        if not allowed:
            raise RestartError(
                f"RBAC does not allow deleting pod '{self.pod_name}' in namespace "
                f"'{self.namespace}'{f' ({reason})' if reason else ''}: the sidecar's "
                'ServiceAccount needs a Role rule apiGroups [""], resources ["pods"], verbs '
                '["delete"] and a RoleBinding to it (k8s/overlays/job-pod-mode/rbac.yaml)'
            )
        self._log(events.POD_RESTART_ALLOWED, pod=self.pod_name, namespace=self.namespace)

    def status(self) -> TrainerStatus:
        return self.processes.status()

    def trainer_pids(self) -> list[int]:
        return self.processes.trainer_pids()

    def stop(self) -> None:
        self.processes.stop()

    def stop_trees(self, roots: list[int]) -> None:
        self.processes.stop_trees(roots)

    def restart(self) -> None:
        """Delete our own pod; its controller replaces it and the group restarts.

        The kubelet then stops every container of the pod, this sidecar included, with
        SIGTERM and the grace period asked for here (SIDECAR_KILL_GRACE).
        """
        self._log(
            events.POD_DELETING,
            pod=self.pod_name,
            namespace=self.namespace,
            grace_seconds=self.kill_grace,
        )
        try:
            self.gateway.delete_pod(self.pod_name, self.namespace, grace_seconds=self.kill_grace)
        except KubernetesError as error:
            raise RestartError(str(error)) from error
        self._log(events.POD_DELETED, pod=self.pod_name, namespace=self.namespace)
