"""Structured logging: JSON lines for machines, a readable console form for people.

Event names (``stall_detected``, ``trainer_restarted``, ...) are a contract that
users alert on; every line carries ``event``, ``level`` and an ISO 8601 UTC
``timestamp``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import structlog


def configure_logging(
    log_format: str | None,
    level: str = "INFO",
    stream: TextIO | None = None,
    observers: Sequence[structlog.typing.Processor] = (),
) -> None:
    """``observers`` are processors that watch the event stream (metrics, notifications).

    They see every event from INFO up whatever ``level`` is shown: a webhook or a counter
    must not go quiet because someone asked for fewer log lines. Only display is filtered
    by ``level`` then, after them.
    """
    stream = stream or sys.stdout
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shown = logging.getLevelName(level)
    passed = min(shown, logging.INFO) if observers else shown
    display_filter: list[structlog.typing.Processor] = [_DropBelow(shown)] if passed < shown else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *observers,
            *display_filter,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(passed),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class _DropBelow:
    """Drops events below the display level after the observers have seen them."""

    def __init__(self, level: int):
        self.level = level

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        number = logging.getLevelName(str(event_dict.get("level", method_name)).upper())
        if isinstance(number, int) and number < self.level:
            raise structlog.DropEvent
        return event_dict


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("sidecar").bind(**context)  # type: ignore[no-any-return]
