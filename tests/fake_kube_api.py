"""A small Kubernetes API server over real HTTP, speaking the endpoints pod mode uses.

- ``DELETE /api/v1/namespaces/{namespace}/pods/{name}``: 200 with the pod (now carrying a
  deletionTimestamp), or 404 with a Status when there is no such pod;
- ``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews``: the review with
  ``status.allowed`` from the server's RBAC stand-in.

Answers can be scripted per endpoint (``fail_next``) to play a server that refuses (401,
403, as the real one words them) or struggles (429, 5xx); every request is recorded with
its method, path, query, bearer token and body. Requests without the expected token get
401, as a real server would answer them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-service-account-token"
ACCOUNT = "system:serviceaccount:training:training-sidecar"
_POD_PATH = "/api/v1/namespaces/{namespace}/pods/{name}"
_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"

_REASONS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    body: Any


@dataclass
class FakeKubeApi:
    """The server's state; `url` is its address once started."""

    pods: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name)
    may_delete_pods: bool = True
    requests: list[Request] = field(default_factory=list)
    # Per endpoint ("delete", "review"): statuses to answer with before behaving normally.
    scripted: dict[str, list[int]] = field(default_factory=dict)
    on_delete: Callable[[str, str], None] | None = None
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, endpoint: str, *statuses: int) -> None:
        with self._lock:
            self.scripted.setdefault(endpoint, []).extend(statuses)

    def deletes(self) -> list[Request]:
        return [request for request in self.requests if request.method == "DELETE"]

    def start(self) -> FakeKubeApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                api._handle(self, "DELETE")

            def do_POST(self) -> None:
                api._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the requests are recorded instead."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def write_kubeconfig(self, path: Path, namespace: str = "training") -> Path:
        """A kubeconfig pointing the official client at this server with the token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "sidecar", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "sidecar", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # -- handling ----------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        authorization = handler.headers.get("Authorization") or ""
        token = (
            authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        )
        request = Request(
            method=method,
            path=parts.path,
            query=parse_qs(parts.query),
            token=token,
            body=json.loads(raw) if raw else None,
        )
        with self._lock:
            self.requests.append(request)
        status, body = self._answer(request)
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        segments = request.path.strip("/").split("/")
        is_pod = (
            request.method == "DELETE"
            and len(segments) == 6
            and segments[:3] == ["api", "v1", "namespaces"]
            and segments[4] == "pods"
        )
        is_review = request.method == "POST" and request.path == _REVIEWS
        if not (is_pod or is_review):
            return 404, _status(
                404, f"the server could not find the requested resource {request.path}"
            )
        endpoint = "delete" if is_pod else "review"
        scripted = self._next_scripted(endpoint)
        namespace, name = (segments[3], segments[5]) if is_pod else ("", "")
        if scripted is not None:
            return scripted, _status(scripted, _message(scripted, namespace, name))
        if request.token != TOKEN:
            return 401, _status(401, "Unauthorized")
        if is_review:
            return 201, self._review(request.body)
        if not self.may_delete_pods:
            return 403, _status(403, _message(403, namespace, name))
        with self._lock:
            exists = (namespace, name) in self.pods
        if not exists:
            return 404, _status(404, f'pods "{name}" not found')
        if self.on_delete is not None:
            self.on_delete(namespace, name)
        return 200, _pod(namespace, name)

    def _next_scripted(self, endpoint: str) -> int | None:
        with self._lock:
            pending = self.scripted.get(endpoint)
            return pending.pop(0) if pending else None

    def _review(self, body: dict[str, Any]) -> dict[str, Any]:
        attributes = body["spec"]["resourceAttributes"]
        allowed = (
            self.may_delete_pods
            and attributes.get("verb") == "delete"
            and attributes.get("resource") == "pods"
            and not attributes.get("group")
        )
        return {
            **body,
            "status": {
                "allowed": allowed,
                "reason": "" if allowed else "no RBAC policy matched",
            },
        }


def _message(status: int, namespace: str, name: str) -> str:
    if status == 403:
        return (
            f'pods "{name}" is forbidden: User "{ACCOUNT}" cannot delete resource "pods" in '
            f'API group "" in the namespace "{namespace}"'
        )
    if status == 401:
        return "Unauthorized"
    if status == 429:
        return "Too many requests, please try again later."
    return f"{_REASONS.get(status, 'error')} (scripted {status})"


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "code": code,
    }


def _pod(namespace: str, name: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "deletionTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
