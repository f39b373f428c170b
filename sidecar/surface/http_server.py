"""The sidecar's HTTP surface: /healthz, /readyz and /metrics for probes and Prometheus.

A small threaded ``http.server``: scrapes and probes are rare and cheap, and the standard
library keeps the image free of a web framework. Each request runs on its own daemon
thread and only reads (the loop's snapshot, the heartbeat file), so a slow client can never
hold up the loop. :func:`start_http_surface` returns the server so the caller stops it,
as prometheus_client's own exporters do.

Liveness and the ``training-sidecar healthcheck`` command share one rule
(:class:`sidecar.surface.health.Heartbeat`): the loop touches its heartbeat file on every
poll, and also while it waits out a backoff, so a stale file means the loop itself is stuck.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sidecar import events
from sidecar.surface.health import Health


def probe(port: int, path: str = "/healthz", timeout: float = 5.0) -> Health:
    """Ask a running sidecar's endpoint on this host; what ``healthcheck`` does when it can."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return Health(True, response.read().decode("utf-8", "replace").strip())
    except urllib.error.HTTPError as error:
        return Health(False, error.read().decode("utf-8", "replace").strip() or str(error))
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return Health(False, f"no answer from {url}: {reason}")


class SurfaceServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging client never blocks shutdown
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        registry: CollectorRegistry,
        health: Callable[[], Health],
        ready: Callable[[], bool],
        log: structlog.typing.FilteringBoundLogger,
    ):
        super().__init__(address, _Handler)
        self.registry = registry
        self.health = health
        self.ready = ready
        self.log = log
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http-surface", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port (in-flight requests end on their own)."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_http_surface(
    *,
    port: int,
    registry: CollectorRegistry,
    health: Callable[[], Health],
    ready: Callable[[], bool],
    log: structlog.typing.FilteringBoundLogger,
    host: str = "0.0.0.0",
) -> SurfaceServer:
    """Serve on ``host:port`` (port 0: any free port, for tests); raises OSError when the
    port is taken. Returns the running server; call ``stop()`` on it."""
    server = SurfaceServer((host, port), registry=registry, health=health, ready=ready, log=log)
    server.start()
    return server


class _Handler(BaseHTTPRequestHandler):
    server: SurfaceServer
    server_version = "training-sidecar"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            health = self.server.health()
            self._reply(200 if health.ok else 503, _text(health), send_body=send_body)
        elif path == "/readyz":
            ready = self.server.ready()
            body = "ready\n" if ready else "not ready: the first poll is not done yet\n"
            self._reply(200 if ready else 503, body.encode(), send_body=send_body)
        elif path == "/metrics":
            self._metrics(send_body=send_body)
        elif path == "/":
            self._reply(200, b"training-sidecar: /healthz /readyz /metrics\n", send_body=send_body)
        else:
            self._reply(404, b"not found: /healthz, /readyz or /metrics\n", send_body=send_body)

    def _metrics(self, *, send_body: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception as error:  # a broken collector must not take the endpoint down
            self.server.log.error(events.METRICS_SCRAPE_FAILED, error=repr(error))
            self._reply(500, f"metrics failed: {error!r}\n".encode(), send_body=send_body)
            return
        self._reply(200, body, content_type=content_type, send_body=send_body)

    def _reply(
        self,
        status: int,
        body: bytes,
        *,
        send_body: bool,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would drown the events people read; stay silent."""


def _text(health: Health) -> bytes:
    return f"{'ok' if health.ok else 'unhealthy'}: {health.message}\n".encode()
