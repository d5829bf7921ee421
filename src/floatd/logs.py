"""structlog set-up: one event per line, JSON by default, to stdout.

Lines are buffered and written in bulk (every 0.2 s by the server, at 64 KiB,
at exit, and at once for warnings and errors).  A write and flush per lease
event cost as much as the rest of an acquire; the durable record of what
happened is the state dir, not the log stream.
"""

from __future__ import annotations

import atexit
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FLUSH_INTERVAL = 0.2
_FLUSH_AT = 64 * 1024


class BufferedLineWriter:
    """A structlog logger that buffers rendered lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0

    def msg(self, message: str) -> None:
        self._lines.append(message)
        self._size += len(message)
        if self._size >= _FLUSH_AT:
            self.flush()

    debug = info = msg

    def urgent(self, message: str) -> None:
        self.msg(message)
        self.flush()

    warning = error = critical = exception = urgent

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): logging must never take the server down


_writer = BufferedLineWriter(sys.stdout)
atexit.register(lambda: _writer.flush())


_second: tuple[int, str] = (-1, "")


def _timestamp(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds, formatting the date part once a second
    (structlog's TimeStamper builds a datetime per event)."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    event_dict["timestamp"] = f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"
    return event_dict


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    global _writer
    _writer.flush()
    _writer = BufferedLineWriter(stream or sys.stdout)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            renderer,
        ],
        # The filtering logger drops below-level calls before any processing,
        # which keeps per-renew debug events nearly free on the hot path.
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _writer,
        # Not cached: ``floatd reload`` may change the level and format, and
        # the hot path holds its own bound logger (EventLog) anyway.
        cache_logger_on_first_use=False,
    )


def flush() -> None:
    _writer.flush()


def get_logger() -> Any:
    return structlog.get_logger("floatd")


class EventLog:
    """``log(event, level="info", **fields)`` for the sans-IO core, plus
    ``enabled(level)`` so callers can skip building fields nobody will see."""

    def __init__(self, level: str) -> None:
        # Resolve structlog's lazy proxy once, not on every event.
        self._logger = get_logger().bind()
        self._min = _LEVELS[level]

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] >= self._min

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        getattr(self._logger, level)(event, **fields)


def event_logger(level: str = "info") -> EventLog:
    return EventLog(level)
