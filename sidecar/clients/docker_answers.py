"""The Engine's answers (``GET /containers/{id}/json``, exec inspect) as the sidecar reads them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Docker reports "never" as the zero time of Go, not as null.
_ZERO_TIME_PREFIX = "0001-01-01T00:00:00"


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    status: str  # created|running|restarting|exited|paused|dead|removing
    running: bool
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    restart_count: int
    pid: int | None
    labels: dict[str, str]
    image: str


@dataclass(frozen=True)
class ExecInfo:
    running: bool
    exit_code: int | None
    pid: int | None


def _timestamp_or_none(value: str | None) -> str | None:
    if not value or value.startswith(_ZERO_TIME_PREFIX):
        return None
    return value


def parse_docker_time(value: str) -> datetime:
    """Docker's RFC 3339 timestamps (nanoseconds, ``Z``) as aware datetimes, for ordering."""
    return datetime.fromisoformat(value)


def container_info(raw: dict[str, Any]) -> ContainerInfo:
    """Our view of ``GET /containers/{id}/json``."""
    state = raw.get("State") or {}
    config = raw.get("Config") or {}
    status = str(state.get("Status", "unknown"))
    # Docker keeps ExitCode 0 while a container runs; only a finished one has a real status.
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    return ContainerInfo(
        id=raw["Id"],
        name=str(raw.get("Name", "")).lstrip("/"),
        status=status,
        running=bool(state.get("Running")),
        exit_code=exit_code,
        started_at=_timestamp_or_none(state.get("StartedAt")),
        finished_at=_timestamp_or_none(state.get("FinishedAt")),
        restart_count=int(raw.get("RestartCount") or 0),
        pid=state.get("Pid") or None,
        labels=dict(config.get("Labels") or {}),
        image=str(config.get("Image") or raw.get("Image") or ""),
    )


def exec_info(raw: dict[str, Any]) -> ExecInfo:
    """Our view of ``GET /exec/{id}/json``; a running exec has no exit code yet."""
    running = bool(raw.get("Running"))
    return ExecInfo(
        running=running,
        exit_code=None if running else raw.get("ExitCode"),
        pid=raw.get("Pid") or None,
    )


def labels(raw: dict[str, Any]) -> dict[str, str]:
    """The labels of an inspected container."""
    return dict((raw.get("Config") or {}).get("Labels") or {})


def preference(raw: dict[str, Any]) -> tuple[bool, datetime]:
    """Running beats stopped; among equals the most recently created wins."""
    return bool((raw.get("State") or {}).get("Running")), parse_docker_time(raw["Created"])
