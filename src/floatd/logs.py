"""structlog set-up: one event per line, JSON by default, to stdout.

Lines are buffered and written in bulk (every 0.2 s by the server, at 64 KiB,
at exit, and at once for warnings and errors).  A write and flush per lease
event cost as much as the rest of an acquire; the durable record of what
happened is the state dir, not the log stream.

Lease events (one per grant, renewal, release, expiry, revoke and refusal) go
through :class:`EventLog`, which in JSON mode renders the very line structlog's
processor chain would (same keys, same order, same encoder; a test holds the
two together) without walking that chain: structlog's bound-logger dispatch
and processors cost about 18 us an event, three times the JSON encoding
itself, which made logging the largest single cost of an acquire.
"""

from __future__ import annotations

import atexit
import json
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
_json_lines = False  # configure() chose JSON: EventLog may render lines itself


def _now_iso() -> str:
    return iso_timestamp(time.time())


def iso_timestamp(ts: float) -> str:
    """ISO 8601 UTC with microseconds, formatting the date part once a second
    (structlog's TimeStamper builds a datetime per event)."""
    global _second
    whole = int(ts)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((ts - whole) * 1e6):06d}Z"


def _timestamp(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["timestamp"] = _now_iso()
    return event_dict


def _fallback(obj: object) -> Any:
    """What structlog's JSONRenderer does with a value JSON cannot hold."""
    method = getattr(obj, "__structlog__", None)
    return method() if method is not None else repr(obj)


# What json.dumps(value, default=_fallback) does (structlog's call), but with
# the C encoder that json.dumps builds on each call built once: that build was
# half the cost of encoding a lease event.  No circular-reference check: log
# fields are flat or decoded msgpack, which cannot refer to itself.
_dumps = json.JSONEncoder(default=_fallback).encode
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_chunks = (
    None
    if _make_encoder is None
    else _make_encoder(
        None, _fallback, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
)


def _encode(value: Any) -> str:
    if _chunks is None:  # a Python without the C accelerator
        return _dumps(value)
    return "".join(_chunks(value, 0))


class _Forward(logging.Handler):
    """Libraries' stdlib log records (trio's accept loop waiting out a full
    file table, say) as lines like floatd's own: one JSON log, never a bare
    line from Python's last-resort handler in the middle of it."""

    def emit(self, record: logging.LogRecord) -> None:
        names = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}
        method = getattr(get_logger(), names.get(record.levelno, "error"))
        method("library_log", logger=record.name, message=record.getMessage())


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    global _writer, _json_lines
    root = logging.getLogger()  # its level stays WARNING unless someone lowered it
    if not any(isinstance(handler, _Forward) for handler in root.handlers):
        root.addHandler(_Forward())
    _writer.flush()
    _json_lines = fmt == "json"
    _writer = BufferedLineWriter(stream or sys.stdout)
    renderer: Any = (
        structlog.processors.JSONRenderer(default=_fallback)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            renderer,
        ],
        # The filtering logger drops below-level calls before any processing.
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
    """``log(event, level="info", **fields)`` for the sans-IO core."""

    def __init__(self, level: str) -> None:
        # Resolve structlog's lazy proxy once, not on every event.
        self._logger = get_logger().bind()
        self._min = _LEVELS[level]
        # Fixed here: a reload that changes the format makes a new EventLog.
        self._direct = _json_lines

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        if not self._direct:
            getattr(self._logger, level)(event, **fields)
            return
        rank = _LEVELS[level]
        if rank < self._min:
            return
        # The keys in structlog's order: the fields, then event, level, timestamp.
        fields["event"] = event
        fields["level"] = level
        fields["timestamp"] = _now_iso()
        line = _encode(fields)
        if rank >= logging.WARNING:
            _writer.urgent(line)
        else:
            _writer.msg(line)

    @property
    def lease_lines_as_json(self) -> bool:
        """Whether :meth:`lease` writes JSON lines, which :func:`lease_line` can
        also render elsewhere (the state writer does, see :mod:`floatd.store.writer`)."""
        return self._direct and self._min <= logging.INFO

    def lease(
        self,
        event: str,
        lease_id: str,
        product: str,
        fingerprint: str,
        instance: str | None,
        user: str | None,
        peer: str | None,
    ) -> None:
        """A lease event at ``info`` with the fields every one of them carries."""
        if self.lease_lines_as_json:
            _writer.msg(
                lease_line(event, lease_id, product, fingerprint, instance, user, peer, time.time())
            )
            return
        self(
            event,
            lease=lease_id,
            product=product,
            fingerprint=fingerprint,
            instance=instance,
            user=user,
            peer=peer,
        )


def lease_line(
    event: str,
    lease_id: Any,
    product: Any,
    fingerprint: Any,
    instance: Any,
    user: Any,
    peer: Any,
    ts: float,
) -> str:
    """The JSON line of a lease event at ``info``, dated ``ts``.

    The same line ``EventLog.__call__`` renders for those fields (a test holds
    them together), written out directly: the field dict, the keyword arguments
    and the general encoder were about two thirds of a renewal's log line.
    """
    try:
        return (
            f'{{"lease": {_quote(lease_id)}, "product": {_quote(product)}, '
            f'"fingerprint": {_quote(fingerprint)}, "instance": {_str_or_null(instance)}, '
            f'"user": {_str_or_null(user)}, "peer": {_str_or_null(peer)}, '
            f'"event": {_quote(event)}, "level": "info", "timestamp": "{iso_timestamp(ts)}"}}'
        )
    except TypeError:  # a field that is not a string: the general encoder renders it
        return _encode(
            {
                "lease": lease_id,
                "product": product,
                "fingerprint": fingerprint,
                "instance": instance,
                "user": user,
                "peer": peer,
                "event": event,
                "level": "info",
                "timestamp": iso_timestamp(ts),
            }
        )


def write_lines(text: str) -> None:
    """Lines rendered elsewhere (the state writer's lease events), into the
    same buffer as every other line: one writer keeps lines whole."""
    if text:
        _writer.msg(text)


def _str_or_null(value: Any) -> str:
    if value is None:
        return "null"
    return _quote(value)  # TypeError for anything but a str: the caller falls back


_quote = json.encoder.encode_basestring_ascii


def event_logger(level: str = "info") -> EventLog:
    return EventLog(level)
