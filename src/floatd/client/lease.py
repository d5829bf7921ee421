"""Hold a seat: ``async with floatd.client.lease(servers, product) as lease:``.

The lease is acquired on entry, renewed in the background at the server's
``renew_in``, and released on exit, also when the body is cancelled (the
release is shielded and bounded in time).  Leases are not tied to
connections, so when the connection breaks (a network blip, a server restart)
the holder reconnects, trying the servers in order with exponential backoff and
jitter, and renews the *same* lease: it never takes a second seat.  Only when
the lease cannot be renewed does the caller hear of it: ``lease.lost`` is set,
``lease.lost_code`` holds the reason (the server's code, such as
``LEASE_NOT_FOUND`` after a revoke, or ``UNREACHABLE`` when no server answered
before the lease ran out), and ``on_lost`` is called.

``await lease.borrow(seconds)`` turns the held seat into a borrowed one for a
trip (floatd.client.borrowing keeps its certificate); the seat is then not
given back when the ``async with`` ends.  With ``vendor_keys``, ``lease()``
uses a valid stored borrow when no server can be reached, and says so
(``lease.borrowed``).
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from floatd.client import borrowing
from floatd.client.connection import (
    INSTANCE_ID,
    Connection,
    ConnectionLost,
    Unreachable,
    parse_server,
    refusal,
    server_name,
    tls_context,
)
from floatd.client.fingerprint import machine_fingerprint
from floatd.errors import BorrowInvalid, FloatdError

RELEASE_TIMEOUT = 5.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: Renewal refusals worth retrying: the server is busy, not saying no.
RETRYABLE = frozenset({"RATE_LIMITED", "BUSY", "INTERNAL", "UNAVAILABLE"})
UNREACHABLE = "UNREACHABLE"


class Lease:
    """A held seat.  ``lost`` is set once it can no longer be renewed."""

    def __init__(self, answer: Mapping[str, Any], server: tuple[str, int]) -> None:
        self.id: str = answer["lease"]
        self.token: str = answer["token"]
        self.product: dict[str, Any] = dict(answer.get("product") or {})
        self.lease_duration: int = int(answer.get("lease_duration", 0))
        self.server = server
        self.lost = trio.Event()
        self.lost_code: str | None = None
        self.renewals = 0
        #: Borrowed for offline use: it needs no server until it ends.
        self.borrowed = False
        self._expires_monotonic = 0.0
        self._renew_at = 0.0
        self._holder: _Holder | None = None
        self._update(answer)

    def _update(self, answer: Mapping[str, Any]) -> None:
        now = time.monotonic()
        expires_in = float(answer.get("expires_in", 0.0))
        renew_in = float(answer.get("renew_in", expires_in / 2))
        self._expires_monotonic = now + expires_in
        self._renew_at = now + max(0.0, min(renew_in, expires_in / 2))

    @property
    def expires_in(self) -> float:
        """Seconds left before the lease expires unless renewed."""
        return max(0.0, self._expires_monotonic - time.monotonic())

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.product.get("metadata") or {})

    @property
    def features(self) -> dict[str, Any]:
        return dict(self.product.get("features") or {})

    async def borrow(self, seconds: int) -> str:
        """Borrow this seat for ``seconds`` (up to the product's borrow_max):
        stores the certificate and returns it; the seat is then kept past the
        ``async with``, until it ends or is returned (return_borrow)."""
        if self._holder is None:
            raise RuntimeError("this seat is already borrowed and held offline")
        return await self._holder.borrow(self, int(seconds))

    async def wait_lost(self) -> str:
        """Wait until the lease is lost; returns why."""
        await self.lost.wait()
        assert self.lost_code is not None
        return self.lost_code


class _Holder:
    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        request: dict[str, Any],
        *,
        token: str | None,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        request_timeout: float,
        on_lost: Callable[[Lease], Any] | None,
        on_renew: Callable[[Lease], Any] | None,
    ) -> None:
        if not servers:
            raise ValueError("no servers given")
        self.servers = list(servers)
        self.request = request
        self.options: dict[str, Any] = {
            "token": token,
            "tls": tls,
            "connect_timeout": connect_timeout,
            "request_timeout": request_timeout,
        }
        self.on_lost, self.on_renew = on_lost, on_renew
        self.conn: Connection | None = None
        self._failed: tuple[str, int] | None = None
        self.lease: Lease | None = None
        self._rng = random.Random()

    async def _connect_once(self) -> Connection:
        """The first server, in order, that answers hello.  If none does and one
        refused (FORBIDDEN, BUSY, ...), that refusal is what the caller hears."""
        errors = []
        refused: FloatdError | None = None
        for host, port in self._in_turn():
            try:
                return await Connection.open(host, port, **self.options)
            except Unreachable as exc:
                errors.append(exc.message)
            except FloatdError as exc:  # BUSY and the like: try the next one
                errors.append(f"{host}:{port}: {exc.code}: {exc.message}")
                refused = refused or exc
        if refused is not None:
            raise refused
        raise Unreachable("; ".join(errors))

    def _in_turn(self) -> list[tuple[str, int]]:
        """The servers in order, starting after the one that last failed us
        (said UNAVAILABLE, or dropped the connection): in a cluster, another
        node serves the same leases (cluster.md)."""
        servers, failed = self.servers, self._failed
        if failed is None or failed not in servers:
            return servers
        at = servers.index(failed) + 1
        return servers[at:] + servers[:at]

    async def _connect(self, until: float) -> Connection:
        """Keep trying (backoff with jitter) until the monotonic time ``until``."""
        delay = BACKOFF_START
        while True:
            try:
                return await self._connect_once()
            except (Unreachable, FloatdError) as exc:
                left = until - time.monotonic()
                if left <= 0:
                    if isinstance(exc, Unreachable):
                        raise
                    raise Unreachable(f"no server took us back: {exc.code}") from None
            await trio.sleep(min(left, delay * self._rng.uniform(0.5, 1.0)))
            delay = min(BACKOFF_MAX, delay * 2)

    async def _drop(self, failed: bool = False) -> None:
        """Close the connection; ``failed``: the next one goes to another server."""
        if self.conn is not None:
            if failed:
                self._failed = (self.conn.host, self.conn.port)
            await self.conn.aclose()
            self.conn = None

    async def acquire(self) -> Lease:
        wait = float(self.request.get("wait", 0.0))
        for turn in range(len(self.servers)):
            self.conn = conn = await self._connect_once()
            try:
                answer = await conn.request("acquire", extra_time=wait, **self.request)
            except ConnectionLost:
                await self._drop(failed=True)
                raise
            code = (answer.get("error") or {}).get("code")
            if code != "UNAVAILABLE" or turn == len(self.servers) - 1:
                break
            await self._drop(failed=True)  # a cluster node without its database
        if not answer.get("ok"):
            raise refusal(answer.get("error"))
        self.lease = Lease(answer, (conn.host, conn.port))
        self.lease._holder = self
        return self.lease

    async def borrow(self, lease: Lease, seconds: int) -> str:
        for _ in range(2):  # a connection that broke since is opened once more
            if self.conn is None:
                self.conn = await self._connect_once()
            try:
                answer = await self.conn.request(
                    "borrow", lease=lease.id, token=lease.token, duration=seconds
                )
                break
            except ConnectionLost:
                await self._drop()
        else:
            raise ConnectionLost("the connection broke twice while borrowing")
        if not answer.get("ok"):
            raise refusal(answer.get("error"))
        certificate = str(answer["certificate"])
        names = [server_name(host, port) for host, port in self.servers]
        borrowing.save(str(self.request["product"]), certificate, lease.id, lease.token, names)
        lease.borrowed = True
        left = float(answer.get("expires_in", 0.0))
        lease._update({"expires_in": left, "renew_in": left})
        return certificate

    def _lose(self, code: str) -> None:
        lease = self.lease
        assert lease is not None
        if lease.lost.is_set():
            return
        lease.lost_code = code
        lease.lost.set()
        if self.on_lost is not None:
            self.on_lost(lease)

    async def keep(self) -> None:
        """Renew until the lease is lost (or this task is cancelled)."""
        lease = self.lease
        assert lease is not None
        while not lease.lost.is_set():
            await trio.sleep(max(0.0, lease._renew_at - time.monotonic()))
            await self._renew(lease)

    async def _renew(self, lease: Lease) -> None:
        delay = BACKOFF_START
        while True:
            try:
                if self.conn is None:
                    self.conn = await self._connect(lease._expires_monotonic)
                    lease.server = (self.conn.host, self.conn.port)
                answer = await self.conn.request("renew", lease=lease.id, token=lease.token)
            except Unreachable:
                self._lose(UNREACHABLE)
                return
            except ConnectionLost:
                await self._drop(failed=True)
                continue
            if answer.get("ok"):
                lease._update(answer)
                lease.renewals += 1
                if self.on_renew is not None:
                    self.on_renew(lease)
                return
            code = str((answer.get("error") or {}).get("code", "INTERNAL"))
            left = lease._expires_monotonic - time.monotonic()
            if code not in RETRYABLE or left <= 0:
                self._lose(code if code not in RETRYABLE else UNREACHABLE)
                return
            if code == "UNAVAILABLE" and len(self.servers) > 1:
                await self._drop(failed=True)  # another node may serve it now
            await trio.sleep(min(left, delay * self._rng.uniform(0.5, 1.0)))
            delay = min(BACKOFF_MAX, delay * 2)

    async def release(self) -> None:
        lease = self.lease
        if lease is None or lease.lost.is_set() or lease.borrowed:
            await self._drop()
            return
        try:
            if self.conn is None:
                self.conn = await self._connect_once()
            await self.conn.request("release", lease=lease.id, token=lease.token)
        except (Unreachable, ConnectionLost):
            pass  # the lease runs out by itself on the server
        finally:
            await self._drop()


def _servers(servers: str | Sequence[str]) -> list[tuple[str, int]]:
    items = [servers] if isinstance(servers, str) else list(servers)
    out: list[tuple[str, int]] = []
    for item in items:
        out.extend(parse_server(part) for part in item.split(",") if part.strip())
    return out


@asynccontextmanager
async def lease(
    servers: str | Sequence[str],
    product: str,
    *,
    fingerprint: str | None = None,
    instance: str | None = None,
    user: str | None = None,
    password: str | None = None,
    hostname: str | None = None,
    meta: Mapping[str, str] | None = None,
    wait: float = 0.0,
    token: str | None = None,
    tls: bool | str | ssl.SSLContext = False,
    on_lost: Callable[[Lease], Any] | None = None,
    on_renew: Callable[[Lease], Any] | None = None,
    connect_timeout: float = 5.0,
    request_timeout: float = 10.0,
    vendor_keys: Sequence[str] | None = None,
) -> AsyncIterator[Lease]:
    """Hold a seat of ``product`` for the body of the ``async with``.

    ``servers``: "host:port", a comma-separated list, or a list, tried in order.
    ``tls``: False, True (system CAs), a CA file path, or an SSLContext; the
    server's certificate and hostname are verified.  Raises the refusal
    (``NoFreeSeats``, ``UnknownProduct``, ...) or ``Unreachable`` if no seat
    could be taken.  ``vendor_keys`` (``ed25519:...``, what the application
    trusts): when no server answers, a stored borrow that checks out offline is
    used instead (``lease.borrowed``).
    """
    context: ssl.SSLContext | None
    if isinstance(tls, ssl.SSLContext):
        context = tls
    elif tls:
        context = tls_context(None if tls is True else tls)
    else:
        context = None
    request: dict[str, Any] = {
        "product": product,
        "fingerprint": fingerprint or machine_fingerprint(),
        "instance": instance or INSTANCE_ID,
        "hostname": hostname or _hostname(),
    }
    for name, value in (("user", user), ("password", password)):
        if value is not None:
            request[name] = value
    if meta:
        request["meta"] = dict(meta)
    if wait:
        request["wait"] = wait
    holder = _Holder(
        _servers(servers),
        request,
        token=token,
        tls=context,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        on_lost=on_lost,
        on_renew=on_renew,
    )
    try:
        held = await holder.acquire()
    except Unreachable:
        await holder._drop()
        offline = _offline(product, vendor_keys, str(request["fingerprint"]))
        if offline is None:
            raise
        yield offline  # no server, and nothing to renew or release
        return
    except BaseException:
        await holder._drop()
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder.keep)
            try:
                yield held
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The renewal task never raises, so a group of one is the body's own
        # error: the caller sees it as raised, not wrapped by our nursery.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + RELEASE_TIMEOUT
            await holder.release()


def _offline(product: str, vendor_keys: Sequence[str] | None, fingerprint: str) -> Lease | None:
    """A held seat made of a valid stored borrow, or None."""
    if not vendor_keys:
        return None
    try:
        got = borrowing.borrowed(product, vendor_keys, fingerprint=fingerprint)
    except BorrowInvalid:
        return None
    info: dict[str, Any] = {"code": got.product, "name": got.name}
    info.update(features=dict(got.features), metadata=dict(got.metadata))
    left = got.seconds_left(time.time())
    held = Lease({"lease": got.lease, "token": "", "product": info, "expires_in": left}, ("", 0))
    held.borrowed = True
    return held


def _hostname() -> str:
    import socket

    return socket.gethostname()[:256]
