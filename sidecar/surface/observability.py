"""Wires the trail around one watchdog: metrics, the HTTP surface, webhooks, incident bundles
and the live progress line.

``commands.run`` builds one :class:`Observability` from the settings before anything logs
(its processors must be in the logging chain from the first event), attaches it to the
watchdog once that exists, and closes it on the way out. Each part is optional and none
of them can stop a recovery: the HTTP surface and webhooks run on their own threads, the
incident hook is bounded in time and the watchdog catches its errors.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics

from sidecar import events
from sidecar.config import Settings
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.python_stacks import find_py_spy
from sidecar.surface.health import Heartbeat
from sidecar.surface.history import History, HistoryMarks, Sample
from sidecar.surface.http_server import SurfaceServer, start_http_surface
from sidecar.surface.incidents import IncidentRecorder, IncidentSources
from sidecar.surface.live_line import ProgressLine, wanted
from sidecar.surface.metrics import (
    CheckpointAge,
    EventCounters,
    GpuTap,
    PollTimer,
    SnapshotCollector,
)
from sidecar.surface.notifications import WebhookNotifier, WebhookTarget
from sidecar.surface.page.model import PageSources, StatusPage
from sidecar.surface.step_rate import StepRate
from sidecar.watchdog import Watchdog
from sidecar.wiring import recovery_rules_of


class Observability:
    def __init__(
        self,
        settings: Settings,
        *,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.settings = settings
        # The *_created series (a counter's creation time) only double the exposition here.
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        self.counters = EventCounters(self.registry)
        self.poll_timer = PollTimer(self.registry)
        self.rate = StepRate()
        self.history = History()
        self.watchdog: Watchdog | None = None
        self.server: SurfaceServer | None = None
        self.gpu: GpuTap | None = None
        self.notifier = (
            WebhookNotifier(
                WebhookTarget(
                    settings.webhook_url, settings.webhook_header_map, settings.webhook_secret
                ),
                run_name=self._run_name,
                page=settings.page_url
                or (
                    f"port {settings.http_port} of the sidecar (set SIDECAR_PAGE_URL for a link)"
                    if settings.http_port
                    else None
                ),
            )
            if settings.webhook_url
            else None
        )
        stderr = stderr or sys.stderr
        drawn = wanted(
            log_format=settings.log_format,
            restart_mode=settings.restart_mode,
            echo_trainer_output=settings.echo_trainer_output,
            stdout=stdout or sys.stdout,
            stderr=stderr,
        )
        self.progress = ProgressLine(stderr) if drawn else None

    def observers(self) -> list[structlog.typing.Processor]:
        """Processors for ``configure_logging``: they watch every event, in this order."""
        watching: list[structlog.typing.Processor] = [self.counters, HistoryMarks(self.history)]
        if self.notifier is not None:
            watching.append(self.notifier)
        if self.progress is not None:
            watching.append(self.progress)
        return watching

    def wrap_gpu(self, gpu: GpuMonitor) -> GpuTap:
        self.gpu = GpuTap(gpu)
        return self.gpu

    def incident_recorder(self, log: Any) -> IncidentRecorder:
        return IncidentRecorder(
            self._incident_sources,
            keep=self.settings.incidents_keep,
            gpu=self.gpu,
            log=log,
            py_spy=find_py_spy() if self.settings.python_stacks else None,
            no_py_spy="py-spy is not installed"
            if self.settings.python_stacks
            else "turned off (SIDECAR_PYTHON_STACKS=false)",
        )

    def attach(self, watchdog: Watchdog, log: Any) -> None:
        """Start serving and sending; raises OSError when the HTTP port cannot be bound."""
        self.watchdog = watchdog
        self.registry.register(
            SnapshotCollector(
                snapshot=watchdog.snapshot,
                paths=lambda: watchdog.paths,
                speed=lambda: self.rate.speed(time.monotonic()),
                mode=self.settings.restart_mode,
                max_restarts=self.settings.max_restarts,
                max_lost_work=self.settings.max_lost_work or None,  # 0: turned off
                gpu=self.gpu,
                gpu_max_age=max(30.0, 5 * self.settings.poll_interval),
                checkpoint_age=CheckpointAge(settle_seconds=self.settings.checkpoint_settle),
            )
        )
        if self.notifier is not None:
            self.notifier.start()
        if self.settings.http_port:
            heartbeat = Heartbeat(
                self.settings.heartbeat_file,
                poll_interval=self.settings.poll_interval,
                kill_grace=self.settings.kill_grace,
                log=log,
            )
            page = StatusPage(
                PageSources(
                    snapshot=watchdog.snapshot,
                    paths=lambda: watchdog.paths,
                    speed=lambda: self.rate.speed(time.monotonic()),
                    history=self.history.view,
                    mode=self.settings.restart_mode,
                    rules=recovery_rules_of(self.settings),
                    checkpoint_settle=self.settings.checkpoint_settle,
                )
            )
            self.server = start_http_surface(
                port=self.settings.http_port,
                registry=self.registry,
                health=heartbeat.health,
                ready=lambda: watchdog.ready,
                log=log,
                page=page,
                token=self.settings.http_token,
                page_hosts=_hosts_of(self.settings.page_url),
            )
            log.info(
                events.HTTP_LISTENING,
                port=self.server.port,
                endpoints=["/", "/status.json", "/healthz", "/readyz", "/metrics"],
                page=f"http://localhost:{self.server.port}/",
                token_required=bool(self.settings.http_token),
            )

    def on_poll(self) -> None:
        """After each poll, on the loop's thread: feed the rate, time the poll, draw the line."""
        watchdog = self.watchdog
        if watchdog is None:
            return
        view = watchdog.snapshot()
        now = time.monotonic()
        if view["phase"] == "idle" or view["last_step"] is None:
            self.rate.reset()  # no trainer, or a new attempt that has not stepped yet
        else:
            self.rate.observe(now, view["last_step"], view["total_steps"])
        self.poll_timer.observe(view["last_poll_seconds"])
        self._keep_history(watchdog, view)
        if self.progress is not None:
            self.progress.update(view["phase"], self.rate.speed(now))

    def _keep_history(self, watchdog: Watchdog, view: dict[str, Any]) -> None:
        """One sample for the page's chart (dropped when too close to the last one); none
        without the HTTP port, where no page can show it."""
        if watchdog.paths is None or not self.settings.http_port:
            return
        started = watchdog.ledger.run_started_at
        self.history.follow(watchdog.paths.state_dir, None if started is None else f"{started}")
        reading = self.gpu.last(max_age=60.0) if self.gpu is not None else None
        samples = reading.samples if reading is not None else ()
        powers = [s.power_watts for s in samples if s.power_watts is not None]
        self.history.append(
            Sample(
                at=time.time(),
                step=view["last_step"],
                total=view["total_steps"],
                gpu_percent=sum(s.utilization_percent for s in samples) / len(samples)
                if samples
                else None,
                power_watts=sum(powers) if powers else None,
            )
        )
        self.history.flush()

    def close(self) -> None:
        self.history.flush(force=True)
        if self.progress is not None:
            self.progress.clear()
        if self.server is not None:
            self.server.stop()
        if self.notifier is not None:
            self.notifier.close()

    # -- what the parts need from the watched run ------------------------------------------

    def _run_name(self) -> str | None:
        paths = self.watchdog.paths if self.watchdog else None
        return paths.output_name if paths else None

    def _incident_sources(self) -> IncidentSources | None:
        watchdog = self.watchdog
        if watchdog is None or watchdog.paths is None:
            return None
        restarter = watchdog.restarter
        paths = watchdog.paths
        return IncidentSources(
            state_dir=paths.state_dir,
            train_log=paths.train_log,
            pids=restarter.trainer_pids() if restarter is not None else [],
            ranks=paths.launch_ranks(),
            flight_recorder=paths.flight_recorder,
        )


def _hosts_of(url: str | None) -> tuple[str, ...]:
    """The host people reach the page by, when SIDECAR_PAGE_URL names one."""
    host = urlsplit(url).hostname if url else None
    return (host,) if host else ()
