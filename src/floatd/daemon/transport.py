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
synchronous write the server's answer outbox needs (see :mod:`floatd.daemon.server`).
TLS connections and the in-memory streams of the tests keep using trio's own
streams; the connection code sees only ``trio.abc.Stream``.

On Linux the server also gives its streams a :class:`ReadinessHub`: one epoll
of its own, in which every lease connection stays registered (edge-triggered)
for its life, watched by one trio task.  ``trio.lowlevel.wait_readable`` arms
a one-shot registration in trio's epoll on every wait, one ``epoll_ctl`` and
trio's waiter bookkeeping per request; with the hub a wait is a dict entry and
the wake-up a ``reschedule``, and the hub's own wait covers every connection
that became readable at once.  A minimal ping server that waits this way
answered 1.85 times as many requests as one on trio's ``SocketStream``; in
floatd, whose stream already skipped trio's other extra steps, renewals and
pings gained about 7% (docs/performance.md).

A stream may also give the hub a read handler (:meth:`TcpStream.set_read_handler`):
called, in the hub's task, when data arrives while the stream's task waits, it
may read and serve the data itself and leave that task asleep.  Waking a task
for each request (the reschedule, the resumption through every ``await`` of
its read, the next wait) was the largest piece of the scheduler's share of a
request; the connection code falls back to its task whenever it must wait for
something (docs/performance.md, "Serving from the hub").
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from collections.abc import Callable

import trio

_EPOLL = getattr(select, "epoll", None)
# Edge-triggered: an event per arrival of data, so a connection that is busy
# with its last request costs the hub nothing until its client sends again.
_EVENTS = (
    getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLET", 0)
)
_MAX_EVENTS = 1024


class ReadinessHub:
    """Read readiness for many sockets from one private epoll (Linux only).

    A stream waits with :meth:`wait_readable`; :meth:`run`, a task of the
    server, wakes it.  Readiness that arrives while nobody waits is remembered
    (edge-triggered events are not repeated), and so is the chance that a read
    which filled its buffer left more behind (:meth:`mark_ready`).  A stream's
    handler (:meth:`set_handler`) gets the first look at news for a waiting task.
    """

    def __init__(self) -> None:
        assert _EPOLL is not None
        self._epoll = _EPOLL()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._handlers: dict[int, Callable[[], bool]] = {}
        self._ready: set[int] = set()
        self._closed = False

    @staticmethod
    def create() -> ReadinessHub | None:
        """A hub, or None where there is no epoll (streams then wait through trio)."""
        return ReadinessHub() if _EPOLL is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, fd: int) -> None:
        self._epoll.register(fd, _EVENTS)
        self._ready.add(fd)  # whatever arrived before the registration

    def remove(self, fd: int) -> None:
        """Forget ``fd`` (before it is closed) and wake its waiter, which then
        finds its stream closed."""
        self._ready.discard(fd)
        self._handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):  # already gone, or the hub closed
            self._epoll.unregister(fd)
        task = self._waiters.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task)

    def mark_ready(self, fd: int) -> None:
        self._ready.add(fd)

    def set_handler(self, fd: int, handler: Callable[[], bool]) -> None:
        """Call ``handler`` (in the hub's task) when ``fd`` becomes readable while a
        task waits on it.  It returns True if it has dealt with the news, and the
        task sleeps on; False wakes the task.  It must not raise: the hub's task
        serves every stream."""
        self._handlers[fd] = handler

    async def wait_readable(self, fd: int) -> None:
        """Return once ``fd`` may be readable; always a checkpoint."""
        if self._closed:  # a stream that outlives the hub waits through trio
            await trio.lowlevel.wait_readable(fd)
            return
        if fd in self._ready:
            await trio.lowlevel.checkpoint()
            # Only now: a cancelled checkpoint must not lose the readiness.
            self._ready.discard(fd)
            return
        if fd in self._waiters:
            raise trio.BusyResourceError("another task is receiving on this stream")
        task = trio.lowlevel.current_task()
        self._waiters[fd] = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._waiters.get(fd) is task:
                del self._waiters[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """Wake the waiters of whatever became readable, until cancelled.  The
        server closes its streams first; any left over then wait through trio."""
        epoll, waiters, ready, handlers = self._epoll, self._waiters, self._ready, self._handlers
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                for fd, _ in epoll.poll(0, _MAX_EVENTS):
                    task = waiters.get(fd)
                    if task is None:
                        ready.add(fd)
                        continue
                    handler = handlers.get(fd)
                    if handler is not None and handler():
                        continue
                    # A handler may have cancelled the task (and its wait) already.
                    if waiters.get(fd) is task:
                        del waiters[fd]
                        reschedule(task)
        finally:
            self._closed = True
            for task in waiters.values():  # they go on waiting through trio
                reschedule(task)
            waiters.clear()
            handlers.clear()
            trio.lowlevel.notify_closing(epoll)
            epoll.close()


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The trio stream error for a failed socket call, as trio's own streams raise:
    our own close is ClosedResourceError, anything else (reset, broken pipe)
    means the peer is gone."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("stream is closed")
    return trio.BrokenResourceError(str(exc))


class TcpStream(trio.abc.Stream):
    """Owns a connected, non-blocking stdlib socket (detached from trio's)."""

    __slots__ = ("_closed", "_fd", "_hub", "_sending", "_sock")

    def __init__(self, stream: trio.SocketStream, hub: ReadinessHub | None = None) -> None:
        trio_sock = stream.socket
        family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        self._sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
        self._sock.setblocking(False)
        self._closed = False
        self._sending = False
        self._fd = self._sock.fileno()
        if hub is not None:
            try:
                hub.add(self._fd)
            except (OSError, ValueError):  # epoll full (max_user_watches) or closed
                hub = None  # this stream waits through trio instead
        self._hub = hub

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or 65536
        while True:
            # Waiting first is the checkpoint every receive must be.
            await self.wait_readable()
            data = self.receive_nowait(size)
            if data is not None:
                return data

    async def wait_readable(self) -> None:
        """Until the socket may be readable (or its handler sent the task back)."""
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._hub is None:
            await trio.lowlevel.wait_readable(self._sock)
            return
        await self._hub.wait_readable(self._fd)
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")

    def receive_nowait(self, size: int) -> bytes | None:
        """One read of what is there: None if nothing is, b"" at the end."""
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        try:
            data = self._sock.recv(size)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc
        if self._hub is not None and len(data) == size:
            self._hub.mark_ready(self._fd)  # a full read may have left more behind
        return data

    def set_read_handler(self, handler: Callable[[], bool]) -> bool:
        """Let ``handler`` serve this stream's reads from the hub (see
        :meth:`ReadinessHub.set_handler`); False if there is no hub to do it."""
        if self._hub is None or self._hub.closed:
            return False
        self._hub.set_handler(self._fd, handler)
        return True

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
            if self._hub is not None:
                self._hub.remove(self._fd)
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
