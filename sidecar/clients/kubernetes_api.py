"""The few Kubernetes API calls of pod mode, behind one gateway with retries.

Pod mode needs exactly two calls: "may I delete my own pod?" (a
SelfSubjectAccessReview at start-up, so a missing RBAC rule is reported at once
rather than at the first stall hours later) and "delete my own pod". An API
server that is restarting, overloaded (429) or failing (5xx), or a connection
that drops, is retried with bounded, jittered exponential backoff; an answer that
waiting cannot change (401, 403, 404, 409, any other 4xx) is raised at once as a
`KubernetesError` whose message says what to change. Nothing else in the sidecar
sees the client's exception types.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import urllib3.exceptions

from sidecar import events
from sidecar.clients.retry import (
    SHUTTING_DOWN,
    RetriedCall,
    backoff_sleep,
    describe_error,
    log_retry,
)

T = TypeVar("T")

# A control-plane upgrade or an API server restart takes tens of seconds; a minute of
# retrying covers those without keeping a stalled trainer on the GPU much longer.
DEFAULT_RETRY_WINDOW = 60.0
# (connect, read) seconds for one request. A DELETE answers as soon as the deletion is
# recorded, long before the pod is gone, so a slow answer means a struggling server.
REQUEST_TIMEOUT = (5.0, 30.0)
# The RBAC rule pod mode needs, as a Role would spell it (k8s/overlays/job-pod-mode/rbac.yaml).
DELETE_POD_RULE = 'apiGroups: [""], resources: ["pods"], verbs: ["delete"]'


class KubernetesError(Exception):
    """A Kubernetes API call failed; the message names the call and what to change."""


class KubernetesPermissionDenied(KubernetesError):
    """401/403: the credentials or the RBAC rules are missing; retrying cannot help."""


class KubernetesNotFound(KubernetesError):
    """404: the pod (or the namespace) is not there."""


class KubernetesUnavailable(KubernetesError):
    """The API server stayed unreachable or failing for the whole retry window."""


def is_transient(error: BaseException) -> bool:
    """True when the same call may succeed later: 5xx, 429, timeouts, dropped connections."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        # status 0: the client raised it without an HTTP answer (no response at all).
        return error.status in (0, 429) or (error.status or 0) >= 500
    if isinstance(error, urllib3.exceptions.SSLError):
        return False  # a certificate problem does not go away by waiting
    return isinstance(error, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def load_client_configuration() -> Any:
    """The in-cluster configuration (the pod's ServiceAccount), else the kubeconfig.

    In a pod, the token, CA and namespace come from the mounted ServiceAccount volume
    and KUBERNETES_SERVICE_HOST/PORT; the client re-reads the token file as the kubelet
    rotates it. Outside a cluster (development, tests), ``$KUBECONFIG`` or
    ``~/.kube/config`` is used.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as in_cluster_problem:
        try:
            # The client reads $KUBECONFIG once, when it is imported; read it now instead.
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
                persist_config=False,
            )
        except (config.ConfigException, OSError) as kubeconfig_problem:
            raise KubernetesError(
                "no Kubernetes credentials: not in a pod with a ServiceAccount token mounted "
                f"({in_cluster_problem}) and no usable kubeconfig ({kubeconfig_problem}). In "
                "pod mode the sidecar container needs the token volume of "
                "k8s/overlays/job-pod-mode"
            ) from kubeconfig_problem
    # tenacity is the only retry layer: urllib3's own retries would multiply the attempts
    # and hide each failure from the log.
    configuration.retries = False
    return configuration


class KubernetesGateway:
    """The pod-mode calls, each retried on transient failures for ``retry_window`` seconds.

    Retries end early once ``stop_event`` is set (SIGTERM): the kubelet kills a sidecar that
    outlives the pod's grace period, so shutdown must not wait out an API server outage.
    """

    def __init__(
        self,
        configuration: Any | None = None,
        *,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        stop_event: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
        log: Any = None,
    ):
        self._configuration = configuration
        self.retry_window = retry_window
        self._stop_event = stop_event
        self._sleep = backoff_sleep(sleep, stop_event)
        self._log = log
        self._client: Any = None
        self._lock = threading.Lock()

    # -- calls -------------------------------------------------------------------------------

    def may_delete_pod(self, name: str, namespace: str) -> tuple[bool, str]:
        """Whether RBAC lets these credentials delete the pod, and the server's reason."""
        from kubernetes import client

        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb="delete", resource="pods", group="", namespace=namespace, name=name
                )
            )
        )
        answer = self._call(
            "access review",
            f"delete pod '{name}' in namespace '{namespace}'",
            lambda api: client.AuthorizationV1Api(api).create_self_subject_access_review(
                review, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        status = answer.status
        return bool(status and status.allowed), str((status and status.reason) or "")

    def delete_pod(self, name: str, namespace: str, *, grace_seconds: float) -> None:
        """Ask the API server to delete the pod; returns once the deletion is recorded.

        Replaying a delete whose answer was lost is harmless: a pod that is already
        terminating answers 200 again.
        """
        from kubernetes import client

        grace = max(0, math.ceil(grace_seconds))

        def delete(api: Any) -> None:
            response: Any = client.CoreV1Api(api).delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=grace,
                _request_timeout=REQUEST_TIMEOUT,
                # The answer (the pod, now terminating) is not needed: read it raw instead of
                # deserialising it, and hand the connection back.
                _preload_content=False,
            )
            response.read()
            response.release_conn()

        self._call("delete", f"pod '{name}' in namespace '{namespace}'", delete)

    # -- internals ---------------------------------------------------------------------------

    def _api(self) -> Any:
        from kubernetes import client

        with self._lock:
            if self._client is None:
                if self._configuration is None:
                    self._configuration = load_client_configuration()
                self._client = client.ApiClient(self._configuration)
            return self._client

    def _call(self, operation: str, subject: str, action: Callable[[Any], T]) -> T:
        from kubernetes.client.exceptions import ApiException

        call: RetriedCall[T] = RetriedCall(
            worth_retrying=is_transient,
            window=self.retry_window,
            stop_event=self._stop_event,
            sleep=self._sleep,
            before_sleep=log_retry(
                self._log, events.KUBERNETES_RETRY, operation=operation, subject=subject
            ),
        )
        try:
            return call(lambda: action(self._api()))
        except ApiException as error:
            if is_transient(error):
                raise self._unavailable(operation, subject, error, call) from error
            raise _from_api_exception(error, operation, subject) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if is_transient(error):
                raise self._unavailable(operation, subject, error, call) from error
            raise KubernetesError(
                f"Kubernetes {operation} of {subject} failed at {self._host()}: "
                f"{describe_error(error)}"
            ) from error

    def _unavailable(
        self, operation: str, subject: str, error: BaseException, call: RetriedCall[Any]
    ) -> KubernetesUnavailable:
        if call.shutting_down:
            return KubernetesUnavailable(
                f"gave up Kubernetes {operation} of {subject} after {call.attempts} attempt(s): "
                f"{SHUTTING_DOWN}; last error from {self._host()}: {describe_error(error)}"
            )
        return KubernetesUnavailable(
            f"Kubernetes API at {self._host()} kept failing {operation} of {subject}: "
            f"{call.attempts} attempt(s) within the {self.retry_window:g} s retry window; "
            f"last error: {describe_error(error)}"
        )

    def _host(self) -> str:
        return str(getattr(self._configuration, "host", None) or "the API server")


def _from_api_exception(error: Any, operation: str, subject: str) -> KubernetesError:
    status = error.status
    message = _server_message(error)
    if status == 401:
        return KubernetesPermissionDenied(
            f"the Kubernetes API did not accept the sidecar's credentials for {operation} of "
            f"{subject} (HTTP 401: {message}). Mount a ServiceAccount token into the sidecar "
            "container (the projected token volume of k8s/overlays/job-pod-mode); a token read "
            "from an old copy may have expired"
        )
    if status == 403:
        return KubernetesPermissionDenied(
            f"RBAC forbids {operation} of {subject} (HTTP 403: {message}). The sidecar's "
            f"ServiceAccount needs a Role in that namespace with the rule {{{DELETE_POD_RULE}}} "
            "and a RoleBinding to it (k8s/overlays/job-pod-mode/rbac.yaml), and the pod must run "
            "as that ServiceAccount (spec.serviceAccountName)"
        )
    if status == 404:
        return KubernetesNotFound(
            f"{subject} not found (Kubernetes {operation}, HTTP 404: {message}). "
            "SIDECAR_POD_NAME and SIDECAR_POD_NAMESPACE must come from the downward API "
            "(fieldRef metadata.name and metadata.namespace)"
        )
    return KubernetesError(f"Kubernetes {operation} of {subject} failed (HTTP {status}: {message})")


def _server_message(error: Any) -> str:
    """The ``message`` of the API server's Status object, else the HTTP reason."""
    import json

    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error.reason or "no reason given")
