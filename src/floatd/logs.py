"""structlog set-up: one event per line, JSON by default, to stdout."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        # The filtering logger drops below-level calls before any processing,
        # which keeps per-renew debug events nearly free on the hot path.
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger() -> Any:
    return structlog.get_logger("floatd")


def event_logger() -> Any:
    """A ``log(event, level="info", **fields)`` callable for the sans-IO core."""
    logger = get_logger()

    def log(event: str, level: str = "info", **fields: Any) -> None:
        getattr(logger, level)(event, **fields)

    return log
