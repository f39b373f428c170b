"""Structured logging: JSON lines for machines, a readable console form for people.

Event names (``stall_detected``, ``trainer_restarted``, ...) are a contract that
users alert on; every line carries ``event``, ``level`` and an ISO 8601 UTC
``timestamp``.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(
    log_format: str | None, level: str = "INFO", stream: TextIO | None = None
) -> None:
    stream = stream or sys.stdout
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("sidecar").bind(**context)  # type: ignore[no-any-return]
