"""One client connection of the lease port, served: the reader, the queue of
answers owed (slots), writing them back, and giving back what cannot be
delivered.

A connection's reader turns bytes into requests through
:class:`~floatd.core.connection.ServerConnection` and applies each one to the
service at once, in arrival order, so pipelined requests see each other's
effects.  What each owes the client is a *slot*, answered strictly in order
and only once the batch holding its changes is durable.  The server
(:mod:`floatd.daemon.server`) owns everything connections share: the service, the
group committer, the outbox task, the reaper of idle connections.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from floatd.core.codec import MAX_FRAME, encode_frame
from floatd.core.connection import Refusal, ServerConnection
from floatd.core.messages import (
    Acquire,
    Answer,
    Borrow,
    Hello,
    Info,
    Ping,
    Release,
    Renew,
    failure,
    refusal,
)
from floatd.core.messages import answer as make_answer
from floatd.core.seats import Waiter
from floatd.daemon.committer import Batch
from floatd.daemon.transport import TcpStream
from floatd.errors import InternalError, Unavailable

if TYPE_CHECKING:
    from floatd.daemon.server import Server

HELLO_TIMEOUT = 10.0
#: A frame must arrive whole within this from its first byte: a client that
#: drips a frame a byte at a time is closed although it is never idle.
FRAME_TIMEOUT = 30.0
MAX_PIPELINE = 64


@dataclass(eq=False, slots=True)
class _Slot:
    """One answer owed to the client, in request order.  It may be sent once it
    has a response, is not waiting for a seat, and its batch (if any) is durable."""

    answer: Answer | None = None
    batch: Batch | None = None
    waiter: Waiter | None = None  # queued for a seat (``wait``) until woken
    owner: _Connection | None = None  # set while waiting: whom to tell
    close: bool = False
    granted: str | None = None  # lease id to give back if the answer cannot be sent
    op: str = "invalid"
    started: float = 0.0  # perf_counter when the request was read


class _Step(enum.Enum):
    """What a connection's reader does next (:meth:`_Connection._apply_buffered`)."""

    READ = "read"  # everything received is applied: read more
    MORE = "more"  # answers made room for requests still buffered
    FULL = "full"  # MAX_PIPELINE answers owed, or a drain running: wait
    PASSWORD = "password"  # an acquire waits for its password check
    CLOSE = "close"  # stop reading (a closing refusal, or the server stops)
    HUNG_UP = "hung_up"  # the client is gone


# The steps as module names: reading an enum member off its class takes 75 ns
# on CPython 3.11, eight times a global's, and a request took a dozen of them.
_READ, _MORE, _FULL, _PASSWORD, _CLOSE, _HUNG_UP = _Step


def _joined(chunks: list[bytes]) -> bytes:
    """One write's bytes; the common single answer is not copied."""
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_UNAVAILABLE = Unavailable(
    "the server cannot write its state right now; nothing was changed, try again"
)


def _unavailable(rid: int | None) -> Answer:
    return refusal(rid, _UNAVAILABLE)


_OPS: dict[type, str] = {
    Hello: "hello",
    Acquire: "acquire",
    Renew: "renew",
    Release: "release",
    Borrow: "borrow",
    Info: "info",
    Ping: "ping",
}


class _Connection:
    """One client connection, served by one task.

    The reader parses every request already buffered and applies each at once,
    in arrival order, so pipelined requests see each other's effects.  What it
    owes the client goes into ``_pending``, a queue of slots in request order.
    The head of that queue is answered as soon as it may be (:meth:`advance`):
    at once for a read-only request or a lazy renewal, when its batch is durable
    for a grant, when a seat comes free for a queued acquire.  Whoever makes the
    head ready calls :meth:`advance` (the reader, the group committer's batch
    completion, the wake-up of a waiter), so no task waits for an answer and the
    reader never stops reading for one.

    Ready answers are queued as one write: on plain TCP for the lease port's
    outbox (:meth:`LeasePort.send_answers`), on other streams for the reader
    itself or the connection's writer task.  They belong to the connection
    until the kernel has taken them (``_out``).  The outbox writes them without
    blocking; what the kernel does not take at once (a client that stops
    reading) is written by the writer task.  The reader reads nothing more while a drain runs
    or ``MAX_PIPELINE`` answers are owed, so a client that never reads cannot
    make the server hold its answers in memory.
    """

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str | None) -> None:
        self.server = server
        self.stream = stream
        # floatd's own TCP stream, or None (TLS, the tests' memory streams).
        self._tcp = stream if isinstance(stream, TcpStream) else None
        self.peer = peer
        self.proto = ServerConnection(server.config.client_tokens)
        self.receiving = False  # blocked reading
        self.done = False
        now = trio.current_time()
        self.hello_deadline = now + HELLO_TIMEOUT
        self.last_active = now
        self.next_check = math.inf  # the reaper's live entry for this connection
        self._frame_started: float | None = None  # a partial frame is buffered
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_reading = False
        self._pending: deque[_Slot] = deque()
        self._listening: Batch | None = None  # the batch that will call advance()
        # Answers queued and not yet taken by the kernel, and the leases granted
        # in them (given back if they cannot be sent).
        self._out: list[bytes] = []
        self._out_granted: list[str] = []
        self._sending = False  # in the outbox, or a drain task is writing
        self._draining = False
        # The connection's writer task (started at its first use) and its cue.
        self._writer_running = False
        self._writer_wake: trio.Event | None = None
        # The reader's task, and whether it owes answers it queued itself: on
        # a stream that only sends async it writes them before it next reads,
        # with no other task woken (see _queue).
        self._task: trio.lowlevel.Task | None = None
        self._own_answers = False
        self._lost = False  # a write failed: the client is gone
        self._progress: trio.Event | None = None  # the reader waits for room
        self._closing = False  # a refusal that ends the connection was read
        # An acquire whose password the reader must check (off the event loop)
        # before it is applied, and when it was read.
        self._held: tuple[Acquire, float] | None = None

    def check_deadline(self, now: float) -> float | None:
        """Close the connection if its deadline passed; else when to look again."""
        if self.done:
            return None
        started = self._frame_started
        if started is not None and self.receiving and now >= started + FRAME_TIMEOUT:
            self._cancel()  # waiting for the rest of a frame that does not come
            return None
        later = self._idle_deadline(now)
        if later is not None and started is not None:
            later = min(later, max(started + FRAME_TIMEOUT, now + 1.0))
        return later

    def _frame_progress(self) -> None:
        """After the buffered requests are applied: time the partial frame left
        in the buffer, if any, and have the reaper look when it is due."""
        if not self.proto.partial():
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = started = trio.current_time()
            if started + FRAME_TIMEOUT < self.next_check:
                self.server.reaper.watch(self, started + FRAME_TIMEOUT)

    def _idle_deadline(self, now: float) -> float | None:
        if not self.proto.greeted:
            if now < self.hello_deadline:
                return self.hello_deadline
            self._cancel()
            return None
        deadline = self.last_active + self.server.config.idle_timeout
        if now < deadline:
            return deadline
        if self._idle():
            self._cancel()
            return None
        return now + self.server.config.idle_timeout  # busy, not idle: look again later

    def _idle(self) -> bool:
        """Blocked reading and owing the client nothing."""
        return self.receiving and not self._pending and not self._sending

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more, but answer what was already received."""
        self._stop_reading = True
        if self._idle():
            self._cancel()  # nothing owed: just go

    async def run(self) -> None:
        self._task = trio.lowlevel.current_task()
        async with trio.open_nursery() as nursery:  # for the writer task
            self._scope = nursery.cancel_scope
            self._nursery = nursery
            try:
                if not await self._reader():
                    # Answer what was received before the close or the stop.
                    while (self._pending or self._sending) and not self._lost:
                        await self._wait_progress()
            finally:
                # Whatever is still owed will never be delivered: leave no
                # waiter queued and no seat held on its behalf.
                pending, self._pending = self._pending, deque()
                for slot in pending:
                    self._abandon(slot)
                nursery.cancel_scope.cancel()  # a drain task writing to nobody

    async def _reader(self) -> bool:
        """Read and apply requests; True when the client hung up."""
        stream = self.stream
        tcp = self._tcp
        while True:
            step = self._apply_buffered()
            if self._own_answers:
                self._own_answers = False
                if step is _READ and not self._draining and self._out:
                    self._draining = True
                    await self._drain()  # before it reads again: one task, no wake-up
                    continue
                self.flush_answers()  # anything else: the writer task writes them
            if step is not _READ:  # the common case, a read, asked first
                if step is _MORE:
                    continue
                if step is _CLOSE:
                    return False
                if step is _HUNG_UP:
                    return True
                if step is _FULL:
                    await self._wait_progress()  # the client is not reading: neither do we
                    continue
                assert step is _PASSWORD
                await self._apply_held()
                continue
            self.receiving = True
            try:
                data: bytes | bytearray
                if tcp is not None:
                    # A client owed an answer is waiting for it, not sending.
                    receive = tcp.receive_owed if self._pending else tcp.receive_some
                    data = await receive(MAX_FRAME + 4)
                else:
                    data = await stream.receive_some(MAX_FRAME + 4)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
            finally:
                self.receiving = False
            if not data:
                return True
            if self._stop_reading:
                return False
            self.last_active = trio.current_time()
            self.proto.receive_data(bytes(data))

    def _apply_buffered(self) -> _Step:
        """Apply the requests already received, in order, as far as that needs no
        waiting, and say what the reader must do next."""
        proto = self.proto
        pending = self._pending
        started = time.perf_counter()
        added = drained = False
        while len(pending) < MAX_PIPELINE and not self._closing and self._held is None:
            event = proto.next_event()
            if event is None:
                drained = True
                self._frame_progress()
                break
            if (
                isinstance(event, Acquire)
                and event.password is not None  # most acquires: no clock read, no lookup
                and self.server.service.needs_password_check(event, self.server.clock(), self.peer)
            ):
                # Only this connection waits (its answers stay in order).
                self._held = (event, started)
                break
            slot = self._dispatch(event, started)
            pending.append(slot)
            added = True
            if slot.close:
                self._closing = True
        if added:
            self.advance()
        if self._closing:
            return _CLOSE
        if self._lost:
            return _HUNG_UP
        if self._held is not None:
            return _PASSWORD
        if not drained and self._out and not self._draining:
            # A long pipeline: write as we go, not once per read, so that a
            # client that does not read is noticed within MAX_PIPELINE answers.
            self.flush_answers()
        if len(pending) >= MAX_PIPELINE or self._draining:
            return _FULL
        if not drained:
            return _MORE  # more requests are buffered already
        if self._stop_reading:
            return _CLOSE
        return _READ

    async def _apply_held(self) -> None:
        """Check the held acquire's password, off the event loop, and apply it."""
        assert self._held is not None
        event, started = self._held
        authenticated = await self.server.check_password(event)
        self._held = None
        slot = self._dispatch(event, started, authenticated)
        self._pending.append(slot)
        if slot.close:
            self._closing = True
        self.advance()

    def _dispatch(
        self, event: Hello | Refusal | Any, started: float, authenticated: bool = False
    ) -> _Slot:
        # Slots are built positionally (answer, batch, waiter, owner, close,
        # granted, op, started): every request builds one, and keywords are
        # matched by name at each call.
        server = self.server
        if type(event) is Refusal:
            answer = Answer(event.response, event.code)
            return _Slot(answer, None, None, None, event.close, None, "invalid", started)
        now = server.clock()
        if type(event) is Hello:
            answer = server.service.hello_response(event, now)
            return _Slot(answer, None, None, None, False, None, "hello", started)
        op = _OPS.get(type(event), "invalid")
        node = server.node
        if node is not None:  # a cluster node: the database decides, in a batch
            if type(event) is Ping:
                answer = make_answer(event.id, time=now)
                return _Slot(answer, None, None, None, False, None, op, started)
            if type(event) is Info:  # from the node's last look: no database needed
                info = server.service.info_from(event, now, node.overview)
                return _Slot(info, None, None, None, False, None, op, started)
            slot = _Slot(None, None, None, self, False, None, op, started)
            node.submit(event, self.peer, authenticated, slot)
            return slot
        result = server.service.handle(event, now, self.peer, authenticated)
        if type(result) is Answer:
            # A renewal may be written lazily (see floatd.daemon.committer for
            # why that is safe); a refusal acknowledges nothing, so its audit
            # record need not hold up the answer either.
            if (type(event) is Renew and server.committer.fresh(now)) or result.code is not None:
                server._flush(urgent=False)
                batch = None
            else:
                batch = server._flush()
            return _Slot(result, batch, None, None, False, result.granted, op, started)
        server._flush()
        assert isinstance(result, Waiter)
        slot = _Slot(None, None, result, self, False, None, op, started)
        result.handle = slot
        server._check_deadline()
        return slot

    def advance(self) -> None:
        """Queue, as one write, the answers now ready at the head of ``_pending``.

        Synchronous, and called by whoever may have made the head ready.  Seats
        are given back only after the answers are queued: giving back may wake a
        waiter of this very connection, whose answer must come after these.
        """
        pending = self._pending
        if not pending:
            return
        head = pending[0]
        batch = head.batch
        if batch is not None and not batch.done.is_set():
            # A grant not durable yet (every acquire's first call): the batch
            # calls back; the loop below would say the same after more setup.
            if self._listening is not batch:
                self._listening = batch
                batch.listeners.append(self.advance)
            return
        frames: list[bytes] = []
        granted: list[str] = []
        give_back: list[str] = []
        # Answers to a client that is gone are not counted (nobody heard them).
        observe = None if self._lost else self.server.stats.observe
        done = time.perf_counter()
        while pending:
            slot = pending[0]
            answer = slot.answer
            if answer is None or slot.waiter is not None:
                break  # still queued for a seat
            batch = slot.batch
            if batch is not None:
                if not batch.done.is_set():  # not durable yet: the batch calls back
                    if self._listening is not batch:
                        self._listening = batch
                        batch.listeners.append(self.advance)
                    break
                if batch.error is not None:
                    # Never durable, so nothing to give back: the pool is
                    # rebuilt from disk before anything is written again.
                    slot.granted = None
                    answer = _unavailable(answer.wire.get("id"))
            pending.popleft()
            try:
                frames.append(encode_frame(answer.wire))
            except ValueError:
                error = InternalError("response too large").to_wire()
                frames.append(encode_frame(failure(answer.wire.get("id"), error)))
                if slot.granted is not None:  # nobody got its token: no seat for it
                    give_back.append(slot.granted)
                    slot.granted = None
            if slot.granted is not None:
                granted.append(slot.granted)
            if observe is not None:
                observe(slot.op, answer.code or "ok", done - slot.started)
        if frames:
            self._queue(_joined(frames), granted)
            self._wake_reader()
        for lease_id in give_back:
            self._give_back(lease_id)

    def _queue(self, data: bytes, granted: list[str]) -> bool:
        """Hand answers to the outbox; False (and the seats given back) if the
        client is gone."""
        if self._lost:
            for lease_id in granted:
                self._give_back(lease_id)
            return False
        self._out.append(data)
        self._out_granted += granted
        if not self._sending:
            self._sending = True
            if self._tcp is not None:
                self.server.port.queue_answers(self)  # written with the pass's others
            elif trio.lowlevel.current_task() is self._task:
                self._own_answers = True  # the reader writes them (see _reader)
            else:
                self.flush_answers()  # the writer task's turn, without the outbox's
        return True

    def flush_answers(self) -> None:
        """The outbox's turn: write what is queued, or hand to the connection's
        writer task what the kernel will not take now (and everything, for
        streams that only send async: TLS, the tests' memory streams)."""
        if self._draining or not self._out:
            return  # a drain task writes them, or the reader already did
        if self.done or self._nursery is None:
            self._lose()  # the connection ended with these still queued
            return
        stream = self._tcp
        if stream is not None:
            data = _joined(self._out)
            try:
                sent = stream.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lose()
                return
            if sent == len(data):
                self._out.clear()
                self._out_granted.clear()
                self._sent_all()
                return
            self._out = [data[sent:]]
        self._draining = True
        if self._writer_wake is not None:
            self._writer_wake.set()
        elif not self._writer_running:
            self._writer_running = True
            self._nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        """Write what flush_answers hands over, for the connection's life: one
        task woken per write, where starting a task per write cost more than
        the rest of a renewal over TLS."""
        try:
            while not self._lost:
                await self._drain()
                if self._lost:
                    return
                self._writer_wake = wake = trio.Event()
                await wake.wait()
                self._writer_wake = None
        finally:
            self._writer_running = False
            self._writer_wake = None

    async def _drain(self) -> None:
        """Write queued answers, waiting for the client to read as needed."""
        in_flight: list[str] = []
        try:
            while self._out:
                data = _joined(self._out)
                self._out = []
                in_flight, self._out_granted = self._out_granted, []
                await self.stream.send_all(data)
                in_flight = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._draining = False
            if in_flight or self._out:
                self._out_granted = in_flight + self._out_granted
                self._lose()
            else:
                self._sent_all()

    def _sent_all(self) -> None:
        self._sending = False
        self._wake_reader()
        if self._stop_reading and self._idle():
            self._cancel()  # shutdown was only waiting for these answers

    def _lose(self) -> None:
        """The client cannot be written to: drop its queued answers and give back
        the seats granted in them."""
        self._lost = True
        granted, self._out_granted = self._out_granted, []
        self._out.clear()
        self._sent_all()
        for lease_id in granted:
            self._give_back(lease_id)

    def _wake_reader(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    async def _wait_progress(self) -> None:
        """Until an answer is queued or written (the caller checks what it needs)."""
        self._progress = event = trio.Event()
        await event.wait()

    def _give_back(self, lease_id: str) -> None:
        server = self.server
        if server.node is not None:
            server.node.give_back(lease_id)
            return
        # While the state cannot be written the pool is rebuilt from disk, and
        # a grant that did reach it then expires as any unrenewed lease does.
        if server.service.writable and server.service.ledger.lease(lease_id) is not None:
            server.service.revoke(lease_id, server.clock())
            server._flush()

    def _abandon(self, slot: _Slot) -> None:
        """An answer that will never be delivered: leave no waiter queued and no
        seat held on its behalf."""
        node = self.server.node
        if slot.waiter is not None:
            slot.owner = None
            if node is not None:
                node.cancel_wait(slot.waiter)
                return
            self.server.service.cancel_wait(slot.waiter, self.server.clock())
            self.server._flush()
        elif slot.answer is None:
            slot.owner = None  # still being decided: the decider gives it back
        elif slot.granted is not None:
            self._give_back(slot.granted)


def answer_unavailable(waiter: Waiter, rid: int) -> None:
    """A queued acquire that can no longer be granted (the state cannot be
    written): its slot is answered UNAVAILABLE, in its turn."""
    slot = waiter.handle
    if isinstance(slot, _Slot) and slot.waiter is waiter:
        slot.answer = _unavailable(rid)
        slot.waiter = None
        owner, slot.owner = slot.owner, None
        if owner is not None:
            owner.advance()
