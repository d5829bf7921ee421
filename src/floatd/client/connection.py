"""One client connection to one floatd server, on trio: connect, hello, and
one request at a time.

Refusals come back as the matching :class:`~floatd.errors.FloatdError`
subclass (``NoFreeSeats``, ``LeaseNotFound``, ...), so callers catch what they
care about; a code this version does not know becomes :class:`UnknownRefusal`,
never a success.  A broken or silent connection is :class:`ConnectionLost`; a
server that cannot be reached at all is :class:`Unreachable`.
"""

from __future__ import annotations

import os
import secrets
import ssl
from typing import Any

import trio

from floatd import __version__
from floatd import errors as _errors
from floatd.client.frames import receive_frame
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.errors import FloatdError


class Unreachable(FloatdError):
    """No server could be reached (client side only; never on the wire)."""

    code = "UNREACHABLE"


class ConnectionLost(FloatdError):
    """The connection broke or timed out mid-request (client side only)."""

    code = "CONNECTION_LOST"


class UnknownRefusal(FloatdError):
    """A refusal whose code this client does not know: still a refusal."""

    code = "UNKNOWN"

    def __init__(self, wire_code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.wire_code = wire_code


def _wire_classes() -> dict[str, type[FloatdError]]:
    out: dict[str, type[FloatdError]] = {}
    for value in vars(_errors).values():
        if isinstance(value, type) and issubclass(value, FloatdError) and value is not FloatdError:
            out.setdefault(value.code, value)
    return out


_BY_CODE = _wire_classes()


def wire_code(exc: FloatdError) -> str:
    return exc.wire_code if isinstance(exc, UnknownRefusal) else exc.code


def refusal(error: Any) -> FloatdError:
    """The exception for a failure response's ``error`` map."""
    if not isinstance(error, dict):
        return UnknownRefusal("INTERNAL", "malformed error from the server")
    code = str(error.get("code", "INTERNAL"))
    message = str(error.get("message", code))
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(code)
    if (
        cls is None
        or cls in (Unreachable, ConnectionLost, UnknownRefusal)
        or code
        in (
            "CONFIG",
            "ENTITLEMENT",
            "ADMIN",
            "AUTHORITY",
        )
    ):
        return UnknownRefusal(code, message, **details)
    try:
        return cls(message, **details)
    except TypeError:
        return UnknownRefusal(code, message, **details)


#: The default instance id: one per process, stable for its life.
INSTANCE_ID = f"{os.getpid()}-{secrets.token_hex(4)}"


def server_name(host: str, port: int) -> str:
    """``host:port`` as :func:`parse_server` reads it back (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_server(text: str, default_port: int = 7411) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    bad_host = not host or not all(c.isalnum() or c in ".-_:%" for c in host)
    if bad_host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError(f"{text!r} is not host[:port]")
    return host, int(port) if port else default_port


def tls_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """Verify the server certificate and its hostname, against ``ca_file`` (or
    the system's CAs when None)."""
    context = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Connection:
    def __init__(
        self, stream: trio.abc.Stream, host: str, port: int, request_timeout: float
    ) -> None:
        self.stream = stream
        self.host, self.port = host, port
        self.request_timeout = request_timeout
        self.hello: dict[str, Any] = {}
        self._decoder = FrameDecoder()
        self._next_id = 0
        self._lock = trio.Lock()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        client: str = f"floatd-client/{__version__}",
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> Connection:
        """Connect and say hello; Unreachable if the server cannot be reached,
        the refusal if it answers hello with one (BUSY, FORBIDDEN, ...)."""
        try:
            with trio.fail_after(connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise Unreachable(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from None
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname=host)
        conn = cls(stream, host, port, request_timeout)
        fields: dict[str, Any] = {"versions": [1], "client": client[:128]}
        if token is not None:
            fields["token"] = token
        try:
            answer = await conn.request("hello", **fields)
        except ConnectionLost as exc:
            await conn.aclose()
            raise Unreachable(f"{host}:{port}: {exc.message}") from None
        if not answer.get("ok"):
            await conn.aclose()
            raise refusal(answer.get("error"))
        conn.hello = answer
        return conn

    async def request(self, op: str, *, extra_time: float = 0.0, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer (success or failure map)."""
        async with self._lock:
            self._next_id += 1
            rid = self._next_id
            try:
                with trio.fail_after(self.request_timeout + extra_time):
                    await self.stream.send_all(encode_frame({"op": op, "id": rid, **fields}))
                    frame = await receive_frame(self.stream, self._decoder)
                    if frame is None:
                        raise ConnectionLost(f"{self.host}:{self.port} closed the connection")
            except trio.TooSlowError:
                raise ConnectionLost(f"{self.host}:{self.port} did not answer in time") from None
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                ssl.SSLError,
                OSError,
            ) as exc:
                raise ConnectionLost(f"{self.host}:{self.port}: {exc!r}") from None
            except FloatdError as exc:  # BadFrame from the decoder
                if isinstance(exc, ConnectionLost):
                    raise
                raise ConnectionLost(
                    f"{self.host}:{self.port} sent garbage: {exc.message}"
                ) from None
        if frame.get("id") not in (rid, None) or "ok" not in frame:
            raise ConnectionLost(f"{self.host}:{self.port} answered out of order")
        return frame

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
