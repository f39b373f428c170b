"""The HTTP surface: /healthz, /readyz, /metrics, and the healthcheck command that asks it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from sidecar_process import free_port

from sidecar.config import Settings
from sidecar.surface.health import Health, Heartbeat, heartbeat_allowance
from sidecar.surface.http_server import SurfaceServer, start_http_surface


class Switches:
    """What the server reports, changed by the test while it runs."""

    def __init__(self) -> None:
        self.health = Health(True, "last heartbeat 0.5 s ago")
        self.ready = False


@pytest.fixture
def switches() -> Switches:
    return Switches()


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("demo_things", "Things counted.", registry=registry).inc(3)
    return registry


@pytest.fixture
def server(switches: Switches, registry: CollectorRegistry) -> Iterator[SurfaceServer]:
    surface = start_http_surface(
        port=0,
        registry=registry,
        health=lambda: switches.health,
        ready=lambda: switches.ready,
        log=structlog.get_logger(),
    )
    yield surface
    surface.stop()


def get(server: SurfaceServer, path: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_healthz_reports_the_loop_heartbeat(server, switches):
    """/healthz is 200 while the heartbeat is fresh and 503 with the reason when it is not."""
    assert get(server, "/healthz")[::2] == (200, "ok: last heartbeat 0.5 s ago\n")
    switches.health = Health(False, "last heartbeat 400 s ago (allowed 96 s)")
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert body == "unhealthy: last heartbeat 400 s ago (allowed 96 s)\n"


def test_readyz_waits_for_the_first_poll(server, switches):
    """/readyz is 503 until the loop finished its first poll, then 200."""
    assert get(server, "/readyz")[0] == 503
    switches.ready = True
    assert get(server, "/readyz")[::2] == (200, "ready\n")


def test_metrics_are_served_in_prometheus_text_format(server):
    """/metrics carries the registry's metrics with the exposition content type."""
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert families["demo_things"].samples[0].value == 3


def test_openmetrics_is_served_when_asked_for(server):
    """A scraper asking for OpenMetrics gets it (prometheus_client's content negotiation)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")


def test_unknown_paths_and_head_requests(server):
    """Other paths are 404; HEAD answers like GET without a body."""
    assert get(server, "/nope")[0] == 404
    assert get(server, "/healthz", method="HEAD")[::2] == (200, "")


def test_a_broken_collector_gives_500_and_the_server_keeps_serving(switches):
    """A collector that raises answers 500 for that scrape; health stays available."""

    class Broken:
        def collect(self):
            raise RuntimeError("collector exploded")

        def describe(self):
            return []

    registry = CollectorRegistry()
    registry.register(Broken())  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        surface = start_http_surface(
            port=0,
            registry=registry,
            health=lambda: switches.health,
            ready=lambda: True,
            log=structlog.get_logger(),
        )
        try:
            status, _, body = get(surface, "/metrics")
            assert status == 500 and "collector exploded" in body
            assert get(surface, "/healthz")[0] == 200
        finally:
            surface.stop()
    assert [entry["event"] for entry in logs] == ["metrics_scrape_failed"]


def test_the_server_listens_on_all_interfaces_and_stop_frees_the_port(registry, switches):
    """Bound to 0.0.0.0 (probes come from the kubelet, scrapes from Prometheus); stop() releases."""
    port = free_port()
    surface = start_http_surface(
        port=port,
        registry=registry,
        health=lambda: switches.health,
        ready=lambda: True,
        log=structlog.get_logger(),
    )
    assert surface.server_address[0] == "0.0.0.0"
    assert get(surface, "/readyz")[0] == 200
    surface.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def test_a_taken_port_is_an_oserror(registry, switches, server):
    """A second server on the same port fails at once (the sidecar exits 2 saying so)."""
    with pytest.raises(OSError):
        start_http_surface(
            port=server.port,
            registry=registry,
            health=lambda: switches.health,
            ready=lambda: True,
            log=structlog.get_logger(),
        )


def test_heartbeat_health_uses_the_healthcheck_allowance(tmp_path: Path):
    """Missing and stale heartbeats are unhealthy; the allowance covers a kill grace."""
    settings = Settings(heartbeat_file=tmp_path / "beat", poll_interval=2, kill_grace=30)
    assert heartbeat_allowance(settings.poll_interval, settings.kill_grace) == 96
    heartbeat = Heartbeat(
        settings.heartbeat_file,
        poll_interval=settings.poll_interval,
        kill_grace=settings.kill_grace,
    )
    missing = heartbeat.health()
    assert not missing.ok and "no heartbeat" in missing.message
    (tmp_path / "beat").touch()
    mtime = (tmp_path / "beat").stat().st_mtime
    assert heartbeat.health(now=mtime + 95).ok
    stale = heartbeat.health(now=mtime + 97)
    assert not stale.ok and "allowed 96 s" in stale.message


def healthcheck(port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "healthcheck"],
        env={
            **os.environ,
            "SIDECAR_HTTP_PORT": str(port),
            # A fresh heartbeat file: the command must ask the endpoint, not read this.
            "SIDECAR_HEARTBEAT_FILE": str(tmp_path / "fresh-beat"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_command_asks_the_endpoint(server, switches, tmp_path):
    """With a port set, `training-sidecar healthcheck` follows /healthz, not the file."""
    (tmp_path / "fresh-beat").touch()
    healthy = healthcheck(server.port, tmp_path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout == "healthy: last heartbeat 0.5 s ago\n"
    switches.health = Health(False, "last heartbeat 400 s ago (allowed 96 s)")
    unhealthy = healthcheck(server.port, tmp_path)
    assert unhealthy.returncode == 1
    assert unhealthy.stdout == "unhealthy: last heartbeat 400 s ago (allowed 96 s)\n"


def test_healthcheck_command_fails_when_nothing_listens(tmp_path):
    """No endpoint on the port: unhealthy, whatever the heartbeat file says."""
    (tmp_path / "fresh-beat").touch()
    result = healthcheck(free_port(), tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy: no answer from http://127.0.0.1:")


def test_a_taken_port_stops_the_sidecar_before_it_launches_anything(fluxgym, server):
    """Exit 2 naming SIDECAR_HTTP_PORT; no trainer was started."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env={
            **fluxgym.env(),
            "SIDECAR_TRAIN_SCRIPT": str(fluxgym.train_script),
            "SIDECAR_HTTP_PORT": str(server.port),
            "SIDECAR_LOG_FORMAT": "json",
            "SIDECAR_HEARTBEAT_FILE": str(fluxgym.root / "beat"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SIDECAR_HTTP_PORT" in result.stdout and "configuration_invalid" in result.stdout
    assert "trainer_started" not in result.stdout
