"""The lease port's connections: who may connect, one session each, and the
outbox that writes their answers.

Connection limits (in all and per address) are checked before a session
starts; a connection over them hears BUSY and is closed.  Each accepted
connection is one :class:`~floatd.daemon.session._Connection` task.  The
outbox collects the connections whose answers became ready during one
scheduler pass and writes them back to back from one task (see
:meth:`LeasePort.send_answers` for why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from floatd.client.frames import receive_frame
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.core.limits import limit_key
from floatd.core.messages import failure, request_id
from floatd.daemon.listeners import malloc_trim
from floatd.daemon.session import _Connection
from floatd.daemon.transport import TcpStream
from floatd.errors import Busy, FloatdError

if TYPE_CHECKING:
    from floatd.daemon.server import Server

BUSY_WAIT = 2.0  # how long an over-limit connection may take to send its hello
#: Freed heap is given back to the OS once this many connections have closed
#: (checked every TRIM_EVERY seconds): see LeasePort.trim_memory.
TRIM_AFTER_CLOSED = 256
TRIM_EVERY = 5.0


class LeasePort:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.connections = 0
        self._closed_since_trim = 0
        self._per_address: dict[str, int] = {}
        self.readers: set[_Connection] = set()
        # Connections with answers queued since the outbox task last ran.
        self.outbox: list[_Connection] = []
        self._outbox_ready = trio.Event()
        self.stopping = False

    def stop_reading(self) -> None:
        """Shutdown: refuse new connections, and let each read nothing more."""
        self.stopping = True
        for conn in list(self.readers):
            conn.stop_reading()

    def queue_answers(self, conn: _Connection) -> None:
        self.outbox.append(conn)
        if len(self.outbox) == 1:
            self._outbox_ready.set()

    async def send_answers(self) -> None:
        """The outbox: write the answers queued during one scheduler pass together.

        A connection that has its answers ready queues them and goes back to
        reading; this task, which runs once the tasks already runnable have had
        their turn, writes them all back to back.  On loopback most of a
        ``send()`` is the kernel waking the receiving side, and that is cheap
        when the receiver is already awake for the previous answer: a steady
        trickle of renewals, each sent as it was ready, woke the client once per
        answer and spent twice the CPU in ``send()`` (docs/performance.md).
        """
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            ready, self.outbox = self.outbox, []
            for conn in ready:
                conn.flush_answers()

    async def trim_memory(self) -> None:
        """Give the heap that closed connections freed back to the OS.

        Partial frames are held in buffers of up to 64 KiB, which glibc takes
        from its heap and keeps when they are freed: 3,000 connections that
        each sent most of a frame and hung up left the server 360 MiB larger
        for good.  ``malloc_trim`` returns it; it runs in a worker thread (the
        foreign call lets go of the GIL), at most every few seconds, and only
        after many connections have closed."""
        trim = malloc_trim()
        if trim is None:
            return
        while True:
            await trio.sleep(TRIM_EVERY)
            if self._closed_since_trim >= TRIM_AFTER_CLOSED:
                self._closed_since_trim = 0
                await self.server.shared.run_sync(trim, 0)

    async def serve_stream(self, stream: trio.SocketStream) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if self.server.tls is not None:
            # The handshake runs on first use, inside the connection, so a client
            # that never completes it is closed by the hello timeout like any other.
            await self.handle_stream(
                trio.SSLStream(stream, self.server.tls, server_side=True), peer
            )
        else:
            await self.handle_stream(TcpStream(stream), peer)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None) -> None:
        """Serve one client connection (also the entry point for in-memory tests)."""
        source = limit_key(peer)
        cap = self.server.config.connections_per_address
        if (
            self.connections >= self.server.config.max_connections
            or self.stopping
            or (cap and self._per_address.get(source, 0) >= cap)
        ):
            await self._refuse_busy(stream)
            return
        self.connections += 1
        self._per_address[source] = self._per_address.get(source, 0) + 1
        conn = _Connection(self.server, stream, peer)
        self.readers.add(conn)
        self.server.reaper.watch(conn, conn.hello_deadline)
        try:
            await conn.run()
        finally:
            conn.done = True
            conn.proto.release()  # the reaper's heap may hold conn for a while yet
            self.readers.discard(conn)
            self.connections -= 1
            self._closed_since_trim += 1
            left = self._per_address[source] - 1
            if left:
                self._per_address[source] = left
            else:
                del self._per_address[source]
            await trio.aclose_forcefully(stream)

    async def _refuse_busy(self, stream: trio.abc.Stream) -> None:
        rid = None
        with trio.move_on_after(BUSY_WAIT):
            try:
                frame = await receive_frame(stream, FrameDecoder())
                rid = None if frame is None else request_id(frame)
            except (FloatdError, trio.BrokenResourceError):
                pass
        try:
            with trio.move_on_after(BUSY_WAIT):
                await stream.send_all(
                    encode_frame(failure(rid, Busy("too many connections").to_wire()))
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(stream)
