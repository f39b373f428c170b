"""The sidecar's HTTP surface: the status page at /, /status.json, /healthz and /readyz for
probes, and /metrics for Prometheus.

A small threaded ``http.server``: scrapes and probes are rare and cheap, and the standard
library keeps the image free of a web framework. Each request runs on its own daemon
thread and only reads (the loop's snapshot, the heartbeat file), so a slow client can never
hold up the loop. :func:`start_http_surface` returns the server so the caller stops it,
as prometheus_client's own exporters do.

Liveness and the ``training-sidecar healthcheck`` command share one rule
(:class:`sidecar.surface.health.Heartbeat`): the loop touches its heartbeat file on every
poll, and also while it waits out a backoff, so a stale file means the loop itself is stuck.

With a token (``SIDECAR_HTTP_TOKEN``) everything but the probes asks for it: as a bearer
token, or as the password of HTTP basic auth (any user name), so that a browser's own
login prompt works. The page and its two assets are the only files served: fixed names
from the package, never a path from the request, so there is nothing to list or traverse.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sidecar import events
from sidecar.surface.health import Health
from sidecar.surface.page.model import StatusPage
from sidecar.surface.page.render import render_live, render_page

# The page's own files, read once from the package: (content type, bytes).
_ASSETS = {
    f"/assets/{name}": kind
    for name, kind in (
        ("page.js", "text/javascript; charset=utf-8"),
        ("page.css", "text/css; charset=utf-8"),
    )
}
_OPEN_PATHS = ("/healthz", "/readyz")  # probes never need the token
# What a browser reads; Prometheus scrapes /metrics by service name (sidecar:9477).
_PAGE_PATHS = ("/", "/status.json", *_ASSETS)
# No inline script or style, nothing from elsewhere: a trainer's text that slipped through
# escaping still could not run.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


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
        page: StatusPage | None = None,
        token: str | None = None,
        page_hosts: tuple[str, ...] = (),
    ):
        super().__init__(address, _Handler)
        self.page_hosts = tuple(host.lower() for host in page_hosts)
        self.registry = registry
        self.health = health
        self.ready = ready
        self.log = log
        self.page = page
        self.token = token
        self.assets = {
            path: (kind, resources.files("sidecar.surface.page").joinpath(path[1:]).read_bytes())
            for path, kind in _ASSETS.items()
        }
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
    page: StatusPage | None = None,
    token: str | None = None,
    page_hosts: tuple[str, ...] = (),
) -> SurfaceServer:
    """Serve on ``host:port`` (port 0: any free port, for tests); raises OSError when the
    port is taken. Returns the running server; call ``stop()`` on it."""
    server = SurfaceServer(
        (host, port),
        registry=registry,
        health=health,
        ready=ready,
        log=log,
        page=page,
        token=token,
        page_hosts=page_hosts,
    )
    server.start()
    return server


class _Handler(BaseHTTPRequestHandler):
    server: SurfaceServer
    server_version = "training-sidecar"
    # A client that connects and says nothing (or trickles) is dropped, not kept forever.
    timeout = 30

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path not in _OPEN_PATHS and not self._authorised():
            self._reply(
                401,
                b"the sidecar's HTTP token is needed (SIDECAR_HTTP_TOKEN): as a bearer token, "
                b"or as the password of basic auth\n",
                send_body=send_body,
                extra={"WWW-Authenticate": 'Basic realm="training-sidecar", charset="UTF-8"'},
            )
            return
        if path in _PAGE_PATHS and not self._host_allowed():
            self._reply(
                403,
                b"this address is not one the status page answers without a token: open it as "
                b"http://localhost:PORT/ (a tunnel or a port published on 127.0.0.1), or set "
                b"SIDECAR_HTTP_TOKEN (or SIDECAR_PAGE_URL to name this host)\n",
                send_body=send_body,
            )
            return
        if path == "/healthz":
            health = self.server.health()
            self._reply(200 if health.ok else 503, _text(health), send_body=send_body)
        elif path == "/readyz":
            ready = self.server.ready()
            body = "ready\n" if ready else "not ready: the first poll is not done yet\n"
            self._reply(200 if ready else 503, body.encode(), send_body=send_body)
        elif path == "/metrics":
            self._metrics(send_body=send_body)
        elif path in ("/", "/status.json") and self.server.page is not None:
            self._page(path, parse_qs(url.query), send_body=send_body)
        elif path in self.server.assets:
            kind, content = self.server.assets[path]
            self._reply(200, content, content_type=kind, send_body=send_body, cache=True)
        elif path == "/":
            self._reply(200, b"training-sidecar: /healthz /readyz /metrics\n", send_body=send_body)
        else:
            self._reply(
                404,
                b"not found: /, /status.json, /healthz, /readyz or /metrics\n",
                send_body=send_body,
            )

    def _host_allowed(self) -> bool:
        """Without a token, the page answers only to names no other site can point a browser
        at: localhost, an IP address, or SIDECAR_PAGE_URL's host. Otherwise a web page the
        user visits could rebind its own name to 127.0.0.1 and read the page (DNS
        rebinding), log tails and stacks included."""
        if self.server.token:
            return True  # a rebinding page cannot know the token
        host = (self.headers.get("Host") or "").strip().lower()
        name = urlsplit(f"//{host}").hostname or ""
        if name in ("localhost", *self.server.page_hosts) or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        offered = self.headers.get("Authorization", "")
        scheme, _, value = offered.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), token.encode())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
        return False

    def _page(self, path: str, query: dict[str, list[str]], *, send_body: bool) -> None:
        assert self.server.page is not None
        try:
            model = self.server.page.model()
            if path == "/status.json":
                text = json.dumps(model.to_json_dict(), indent=1, default=str) + "\n"
                kind = "application/json"
            elif query.get("fragment") == ["live"]:
                text, kind = render_live(model), "text/html; charset=utf-8"
            else:
                text, kind = render_page(model), "text/html; charset=utf-8"
        except Exception as error:  # a page that cannot be drawn must not take the port down
            self.server.log.error(events.PAGE_FAILED, path=path, error=repr(error))
            self._reply(500, f"the page failed: {error!r}\n".encode(), send_body=send_body)
            return
        # A lone surrogate (a byte that was not UTF-8, kept as it was) becomes "?".
        body = text.encode("utf-8", "replace")
        self._reply(
            200,
            body,
            content_type=kind,
            send_body=send_body,
            extra={"X-Rendered-At": f"{model.rendered_at:.0f}"},
        )

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
        cache: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _PAGE_POLICY)
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would drown the events people read; stay silent."""


def _text(health: Health) -> bytes:
    return f"{'ok' if health.ok else 'unhealthy'}: {health.message}\n".encode()
