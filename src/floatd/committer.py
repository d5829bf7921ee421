"""Group commit: many requests, one transaction, one fsync.

Requests append their changes and wait on the batch they landed in.  One writer
takes everything pending and applies it as one transaction; while that runs the
next batch fills up.  Under load a batch holds every request that arrived during
the previous commit, which is what lets durability cost little throughput.
Changes are applied strictly in submission order, so the disk always holds a
prefix of the in-memory history, and that prefix never has more seats than the cap.

``floatd serve`` commits through a store with an async ``apply_async`` (the
writer process of :mod:`floatd.writer`): the writer is then a trio task that
sends each batch down a pipe and waits for the answer, with no thread at all.
A thread that hands batches to another process would only add GIL hand-overs
to each commit, and those are what the writer process exists to avoid.

With a store that blocks (:class:`floatd.store.SQLiteLeaseStore`, a future
PostgreSQL backend), the writer is a loop running in a worker thread (one
``trio.to_thread.run_sync`` call behind a ``CapacityLimiter(1)``, for the life
of the server).  Taking the
next batch right where the last commit ended, inside the thread, matters: with
one thread call per commit, each cycle also waited two turns of a busy event
loop (to hear the commit had ended, then to start the next), which tripled the
commit cycle under load.  Completion is reported back with ``run_sync_soon``.
Tests inject an async ``run_sync`` instead and get the same batches applied by
a trio task, so MockClock stays in charge of time.

Every commit also records when its batch was cut (``last_cut``), and an idle
writer commits that alone once a second.  Renewals may then be answered before
their commit while the writer is *fresh* (its last commit was cut within
``lazy_window`` seconds): a crash can only lose renewals made before
``last_cut + lazy_window``, a bound recovery can rely on
(:func:`floatd.store.extend_after_crash`).  The final flush of a clean stop
writes ``clean = 1`` so that a clean restart extends nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from floatd.errors import StoreError
from floatd.store import Change, LeaseStore, SetMeta

RunSync = Callable[..., Awaitable[Any]]


@runtime_checkable
class AsyncApply(Protocol):
    """A store that can commit without blocking the event loop."""

    async def apply_async(self, changes: Sequence[Change]) -> None: ...


HEARTBEAT = 1.0
LAZY_WINDOW = 5.0
# A batch nobody waits for (lazy renewals, expiries) is held back this long to
# gather more: fewer commits, so the writer thread competes less for the GIL.
LAZY_FLUSH = 0.05
META_LAST_CUT = "last_cut"
META_CLEAN = "clean"


class Batch:
    """One future commit; every request whose changes are in it waits here."""

    __slots__ = ("changes", "done", "error", "listeners", "urgent")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.urgent = False  # somebody waits for this batch
        self.done = trio.Event()
        self.error: StoreError | None = None
        # Called once the batch is durable (or failed), in the trio thread: the
        # server answers the requests it holds without waking a task for each.
        self.listeners: list[Callable[[], None]] = []

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


class GroupCommitter:
    def __init__(
        self,
        store: LeaseStore,
        clock: Callable[[], float] = time.time,
        run_sync: RunSync | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._run_sync = run_sync  # None: the writer loop runs in a worker thread
        # ... unless the store commits asynchronously (the writer process).
        self._async = store if run_sync is None and isinstance(store, AsyncApply) else None
        self._limiter = trio.CapacityLimiter(1)
        self._lock = threading.Condition()
        self._pending = Batch()
        self._closing = False
        self._abandoned = False
        self._wakeup = trio.Event()  # inline mode only
        self.last_cut = clock()  # the caller has just made the store consistent
        self.commits = 0
        self.changes_committed = 0
        self.apply_seconds = 0.0

    def submit(self, changes: Sequence[Change], urgent: bool = True) -> Batch:
        """Queue changes for the next commit; await ``.wait()`` for durability.
        ``urgent`` says someone will wait, so the writer must not hold the batch back."""
        with self._lock:
            batch = self._pending
            first = not batch.changes
            batch.changes.extend(changes)
            due_sooner = first or (urgent and not batch.urgent)
            if urgent:
                batch.urgent = True
            if due_sooner:
                self._lock.notify()
        # Only news that moves the next commit closer wakes the writer: a lazy
        # renewal joining a batch already pending would only cost it a turn.
        if due_sooner and (self._run_sync is not None or self._async is not None):
            self._wakeup.set()
        return batch

    def fresh(self) -> bool:
        """Whether a renewal may be answered before its commit (see module doc)."""
        return self._clock() - self.last_cut <= LAZY_WINDOW

    def close(self) -> None:
        """Ask the writer to flush what is pending, mark the stop clean, and end."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer.  Returns once :meth:`close` was called and all is flushed."""
        task_status.started()
        if self._run_sync is not None:
            await self._run_inline(self._run_sync)
            return
        if self._async is not None:
            await self._run_async(self._async)
            return
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(
                self._thread_loop, token, limiter=self._limiter, abandon_on_cancel=True
            )
        finally:
            with self._lock:  # cancelled (not closed): let an abandoned thread end
                self._abandoned = True
                self._lock.notify()

    # --- shared by both modes ----------------------------------------------------

    def _take(self, block: bool) -> tuple[Batch, bool, float] | None:
        """Cut the next batch (waiting up to a heartbeat when ``block``)."""
        with self._lock:
            if block:
                self._wait_for_work()
            if self._abandoned:
                return None
            batch, self._pending = self._pending, Batch()
            closing = self._closing
        cut = self._clock()
        batch.changes.append(SetMeta(META_LAST_CUT, repr(cut)))
        if closing:
            batch.changes.append(SetMeta(META_CLEAN, "1"))
        return batch, closing, cut

    def _wait_for_work(self) -> None:
        """Block (lock held) until a batch is due: at once when someone waits,
        after LAZY_FLUSH for changes nobody waits for, after HEARTBEAT if idle."""
        started = time.monotonic()
        while not (self._closing or self._abandoned or self._pending.urgent):
            limit = LAZY_FLUSH if self._pending.changes else HEARTBEAT
            left = started + limit - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)

    def _apply(self, batch: Batch, cut: float) -> StoreError | None:
        started = time.perf_counter()
        error = None
        try:
            self._store.apply(batch.changes)
        except StoreError as exc:
            error = exc
        except Exception as exc:  # an unexpected backend failure must not kill the writer
            error = StoreError(f"state write failed: {exc!r}")
        return self._applied(batch, cut, started, error)

    async def _apply_async(self, store: AsyncApply, batch: Batch, cut: float) -> StoreError | None:
        started = time.perf_counter()
        error = None
        try:
            await store.apply_async(batch.changes)
        except StoreError as exc:
            error = exc
        except Exception as exc:  # an unexpected backend failure must not kill the writer
            error = StoreError(f"state write failed: {exc!r}")
        return self._applied(batch, cut, started, error)

    def _applied(
        self, batch: Batch, cut: float, started: float, error: StoreError | None
    ) -> StoreError | None:
        if error is None:
            self.last_cut = cut
        self.commits += 1
        self.changes_committed += len(batch.changes)
        self.apply_seconds += time.perf_counter() - started
        return error

    @staticmethod
    def _finish(batch: Batch, error: StoreError | None) -> None:
        batch.error = error
        batch.done.set()
        for listener in batch.listeners:
            listener()

    # --- the two modes -------------------------------------------------------------

    def _thread_loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            taken = self._take(block=True)
            if taken is None:
                return
            batch, closing, cut = taken
            error = self._apply(batch, cut)
            try:
                token.run_sync_soon(self._finish, batch, error)
            except trio.RunFinishedError:
                return
            if closing:
                return

    async def _run_async(self, store: AsyncApply) -> None:
        while True:
            await self._until_due()
            taken = self._take(block=False)
            if taken is None:
                return
            batch, closing, cut = taken
            with trio.CancelScope(shield=True):  # a half-sent batch helps nobody
                error = await self._apply_async(store, batch, cut)
            self._finish(batch, error)
            if closing:
                return

    async def _until_due(self) -> None:
        """The async twin of :meth:`_wait_for_work`, on trio's clock."""
        started = trio.current_time()
        while not (self._closing or self._pending.urgent):
            limit = LAZY_FLUSH if self._pending.changes else HEARTBEAT
            left = started + limit - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(left):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _run_inline(self, run_sync: RunSync) -> None:
        while True:
            with trio.move_on_after(HEARTBEAT):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            taken = self._take(block=False)
            if taken is None:
                return
            batch, closing, cut = taken
            with trio.CancelScope(shield=True):  # a half-applied batch helps nobody
                error = await run_sync(self._apply, batch, cut)
            self._finish(batch, error)
            if closing:
                return
