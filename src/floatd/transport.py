"""A lean stream over a plain TCP socket, for the lease protocol's hot path.

``trio.SocketStream`` is built for every use: each ``receive_some`` first tries
the socket (which, in a request/answer exchange, has nothing yet: a wasted
syscall and a raised ``BlockingIOError``) before it waits for readiness, and
each successful ``send_all`` yields to the scheduler once more afterwards.
Under a closed request/answer loop those two cost about a fifth of the CPU a
request takes (measured with py-spy; see docs/performance.md).

:class:`TcpStream` takes the socket over and does only what a lease
connection needs: a receive waits for readiness first and then reads once,
and a send writes at once and waits only when the kernel's buffer is full.
Every receive still passes through the scheduler, so a client that pipelines
without pause cannot starve the others.  :meth:`TcpStream.send_nowait` is the
synchronous write the server's answer outbox needs (see :mod:`floatd.server`).
TLS connections and the in-memory streams of the tests keep using trio's own
streams; the connection code sees only ``trio.abc.Stream``.
"""

from __future__ import annotations

import errno
import socket

import trio


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The trio stream error for a failed socket call, as trio's own streams raise:
    our own close is ClosedResourceError, anything else (reset, broken pipe)
    means the peer is gone."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("stream is closed")
    return trio.BrokenResourceError(str(exc))


class TcpStream(trio.abc.Stream):
    """Owns a connected, non-blocking stdlib socket (detached from trio's)."""

    __slots__ = ("_closed", "_sending", "_sock")

    def __init__(self, stream: trio.SocketStream) -> None:
        trio_sock = stream.socket
        family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        self._sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
        self._sock.setblocking(False)
        self._closed = False
        self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        size = max_bytes or 65536
        while True:
            # Waiting first is the checkpoint every receive must be.
            await trio.lowlevel.wait_readable(self._sock)
            try:
                return self._sock.recv(size)
            except BlockingIOError:
                continue  # spurious wake-up
            except OSError as exc:
                raise _stream_error(exc) from exc

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes at once and return how much that was (0 when
        its buffer is full).  The server's answer outbox uses this to write the
        answers of one scheduler pass back to back, with no task switch per answer."""
        self._check_can_send()
        return self._send_some(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_can_send()
        self._sending = True
        try:
            view = memoryview(data)
            while view:
                sent = self._send_some(view)
                if not sent:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                view = view[sent:]
        finally:
            self._sending = False

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")

    def _send_some(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wake any task still waiting on the socket before the fd goes away.
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
