"""A lean trio stream over a plain TCP socket, for the lease port.

It is a ``trio.abc.Stream`` like ``trio.SocketStream`` and keeps the same
contract (``tests/test_transport.py`` runs trio's own
``check_two_way_stream`` on it): every call is a checkpoint, a second task
receiving or sending at once gets ``BusyResourceError``, a closed stream
raises ``ClosedResourceError`` and a peer gone ``BrokenResourceError``.  It
differs in two places, both for a request/answer exchange:

* Receiving comes in two kinds, chosen by the connection (which knows whether
  it still owes the client an answer).  ``receive_some``, as trio's own
  stream does, lets the tasks already runnable go first and then tries
  ``recv()``: under load the client has usually sent its next request by then,
  and the read costs no readiness wait (trio's epoll registers the socket
  again for every wait, one syscall each).
  ``receive_owed`` waits for readiness first: a client still waiting for its
  answer (an acquire not yet committed) has not sent anything, and a read
  tried first would fail with EAGAIN and raise.  Measured with
  ``bench/throughput.py``'s load (64 connections, 2 cores): renewals went
  from about 29,700 to 32,000 a second with the read tried first, while
  acquires were no faster that way, so an owed client is waited for.
* ``send_nowait`` writes what the kernel takes at once, without a task
  switch.  The daemon's outbox (:mod:`floatd.daemon.session`) writes the
  answers of one scheduler pass back to back with it; what the kernel does
  not take is written by ``send_all`` from a task.

Waiting goes through trio (``wait_readable`` / ``wait_writable``); there is no
event loop of floatd's own.  TLS connections and the tests' in-memory streams
use trio's streams; the connection code sees only ``trio.abc.Stream``.
"""

from __future__ import annotations

import errno
import operator
import socket

import trio

#: What one receive takes when the caller does not say.
DEFAULT_RECEIVE = 65536


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The trio stream error for a failed socket call, as trio's own streams raise:
    our own close is ClosedResourceError, anything else (reset, broken pipe)
    means the peer is gone."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("stream is closed")
    return trio.BrokenResourceError(str(exc))


class TcpStream(trio.abc.Stream):
    """Owns a connected, non-blocking stdlib socket (detached from trio's)."""

    __slots__ = ("_closed", "_receiving", "_sending", "_sock")

    def __init__(self, stream: trio.SocketStream) -> None:
        trio_sock = stream.socket
        family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        self._sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
        self._sock.setblocking(False)
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Let the tasks already runnable go first, then try to read before asking
        trio to wait: a peer that was answered may well have spoken already."""
        return await self._receive(max_bytes, wait_first=False)

    async def receive_owed(self, max_bytes: int | None = None) -> bytes:
        """``receive_some`` for a peer that is still owed an answer, and so is
        most likely waiting for it rather than sending: wait for readiness
        first, sparing the read that would fail (and its exception)."""
        return await self._receive(max_bytes, wait_first=True)

    async def _receive(self, max_bytes: int | None, wait_first: bool) -> bytes:
        if max_bytes is None:
            size = DEFAULT_RECEIVE
        else:
            size = operator.index(max_bytes)
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            if not wait_first:
                await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed")
                if wait_first:
                    await trio.lowlevel.wait_readable(self._sock)  # also the checkpoint
                    if self._closed:
                        raise trio.ClosedResourceError("stream is closed")
                try:
                    return self._sock.recv(size)
                except BlockingIOError:
                    wait_first = True  # nothing yet: wait for it
                except OSError as exc:
                    raise _stream_error(exc) from exc
        finally:
            self._receiving = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes at once and return how much that was (0 when
        its buffer is full).  Not a checkpoint: the outbox's synchronous write."""
        self._check_can_send()
        return self._send_some(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_can_send()
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            with memoryview(data) as view:
                while view:
                    sent = self._send_some(view)
                    if not sent:
                        await trio.lowlevel.wait_writable(self._sock)
                        if self._closed:
                            raise trio.ClosedResourceError("stream is closed")
                        continue
                    view = view[sent:]
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_can_send()
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self._sock)
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
        finally:
            self._sending = False

    def _check_can_send(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")

    def _send_some(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wake any task still waiting on the socket before the fd goes away.
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
