"""Opening the daemon's sockets: TCP listeners with a clear error naming what
failed to bind, TLS contexts from the config, and glibc's ``malloc_trim``."""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable
from typing import cast

import trio

from floatd.config import Config
from floatd.errors import ConfigError, ListenError


async def listen(host: str, port: int, what: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenError(f"cannot listen on {where} for {what}: {exc.strerror or exc}") from None


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def address(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return str(name[0]), int(name[1])


def tls_context(config: Config, section: str = "server") -> ssl.SSLContext | None:
    """The TLS context of the lease port (``server``) or the status endpoint
    (``status``), or None; a bad cert or key is a config error."""
    cert, key = (
        (config.tls_cert, config.tls_key)
        if section == "server"
        else (config.status_tls_cert, config.status_tls_key)
    )
    if not cert:
        return None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{section}.{name}", f"cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{section}.tls_cert", f"cannot load certificate and key: {exc}"
        ) from None
    return context
