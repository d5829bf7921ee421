"""Group commit: many requests, one transaction, one fsync.

Requests append their changes and wait on the batch they landed in.  One writer
task takes everything pending and applies it as one transaction; while that runs
the next batch fills up.  Under load a batch holds every request that arrived
during the previous commit, which is what lets durability cost little
throughput.  Changes are applied strictly in submission order, so the disk
always holds a prefix of the in-memory history, and that prefix never has more
seats than the cap.

``floatd serve`` commits through a store with an async ``apply_async`` (the
writer process of :mod:`floatd.store.writer`): the writer task sends each batch down a
pipe and waits for the answer, with no thread at all.  A store that only blocks
is called through ``run_sync`` (a worker thread by default; tests inject an
async stand-in so that MockClock stays in charge of time).

**A failed or overdue commit stops every later one.**  Once a batch fails (the
disk refuses the write, the writer process dies) or has not finished within
``COMMIT_TIMEOUT`` (the writer is stopped or the disk hangs: the writer process
is then killed), the committer is *failed*: every batch cut after that is failed
too, without being applied.  The batches after a failed one were computed from
an in-memory state the disk never got (a release that did not happen, say), and
writing them would make the disk hold a history that never was: a seat freed in
memory, taken again by someone else, and the old lease still on disk.  The
owner (the server) is told through ``on_failure``, stops changing state, and
comes back through :meth:`GroupCommitter.recover`: it reloads its state from the
disk as after a crash and commits that reload, which ends the failure.

Every commit also records when its batch was cut (``last_cut``), and an idle
writer commits that alone once a second.  Renewals may then be answered before
their commit while the writer is *fresh* (its last commit was cut within
``lazy_window`` seconds and nothing has failed since): a crash, or a failure,
can only lose renewals made before ``last_cut + lazy_window``, a bound recovery
relies on (:func:`floatd.store.sqlite.extend_after_crash`).  The final flush of a clean
stop writes ``clean = 1`` so that a clean restart extends nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from floatd.core.changes import Change, SetMeta
from floatd.errors import StoreError
from floatd.store.sqlite import LeaseStore

RunSync = Callable[..., Awaitable[Any]]


@runtime_checkable
class AsyncApply(Protocol):
    """A store that can commit without blocking the event loop, and can be
    stopped when a commit is overdue."""

    async def apply_async(self, changes: Sequence[Change]) -> None: ...

    def abort(self) -> None: ...


HEARTBEAT = 1.0
LAZY_WINDOW = 5.0
# A batch nobody waits for (lazy renewals, expiries) is held back this long to
# gather more: fewer commits, so the writer competes less with the event loop.
LAZY_FLUSH = 0.05
#: A commit that has not finished by then is given up (and the writer process
#: killed): no request waits longer than this for a stuck disk or writer.
COMMIT_TIMEOUT = 5.0
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
        self._abort: Callable[[], None] | None = None
        self._apply: Callable[[Sequence[Change]], Awaitable[Any]]
        if run_sync is None and isinstance(store, AsyncApply):
            self._apply, self._abort = store.apply_async, store.abort
        else:
            call = run_sync or trio.to_thread.run_sync
            self._apply = lambda changes: call(store.apply, changes)
        self._pending = Batch()
        self._closing = False
        self._wakeup = trio.Event()
        self.last_cut = clock()  # the caller has just made the store consistent
        #: Why commits stop, from the first failed or overdue one until a recovery.
        self.failure: StoreError | None = None
        #: Told (in the trio thread) when the committer becomes failed.
        self.on_failure: Callable[[StoreError], None] | None = None
        self.commits = 0
        self.failures = 0
        self.changes_committed = 0
        self.apply_seconds = 0.0

    def submit(self, changes: Sequence[Change], urgent: bool = True) -> Batch:
        """Queue changes for the next commit; await ``.wait()`` for durability.
        ``urgent`` says someone will wait, so the writer must not hold the batch back."""
        batch = self._pending
        first = not batch.changes
        batch.changes.extend(changes)
        due_sooner = first or (urgent and not batch.urgent)
        if urgent:
            batch.urgent = True
        # Only news that moves the next commit closer wakes the writer: a lazy
        # renewal joining a batch already pending would only cost it a turn.
        if due_sooner:
            self._wakeup.set()
        return batch

    def fresh(self, now: float | None = None) -> bool:
        """Whether a renewal may be answered before its commit (see module doc);
        ``now``: the caller's reading of the clock, if it has one."""
        if now is None:
            now = self._clock()
        return self.failure is None and now - self.last_cut <= LAZY_WINDOW

    def close(self) -> None:
        """Ask the writer to flush what is pending, mark the stop clean, and end."""
        self._closing = True
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer.  Returns once :meth:`close` was called and all is flushed."""
        task_status.started()
        while True:
            await self._until_due()
            batch, self._pending = self._pending, Batch()
            closing = self._closing
            cut = self._clock()
            batch.changes.append(SetMeta(META_LAST_CUT, repr(cut)))
            if closing:
                batch.changes.append(SetMeta(META_CLEAN, "1"))
            # Checked right before committing: recover() may have just ended it.
            error = self.failure
            if error is None:
                error = await self._commit(batch.changes, cut)
            self._finish(batch, error)
            if closing:
                return

    async def recover(self, changes: Sequence[Change]) -> None:
        """Commit the owner's reload of the state and end the failure; raises
        StoreError (and stays failed) if the disk still refuses.

        Only while failed: the writer task then applies nothing, so this commit
        never runs beside another."""
        assert self.failure is not None, "recover() is for a failed committer"
        cut = self._clock()
        error = await self._commit([*changes, SetMeta(META_LAST_CUT, repr(cut))], cut)
        if error is not None:
            raise error
        self.failure = None

    async def _until_due(self) -> None:
        """Until a batch is due: at once when someone waits, after LAZY_FLUSH for
        changes nobody waits for, after HEARTBEAT if idle."""
        started = trio.current_time()
        while not (self._closing or self._pending.urgent):
            limit = LAZY_FLUSH if self._pending.changes else HEARTBEAT
            left = started + limit - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(left):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _commit(self, changes: Sequence[Change], cut: float) -> StoreError | None:
        """Apply one batch within COMMIT_TIMEOUT; the error, if it failed.

        Shielded, since a half-applied batch helps nobody: only the scope's
        own deadline ends it.  One scope does both; opening and closing
        scopes showed in profiles of the event loop under load."""
        started = time.perf_counter()
        error = None
        try:
            deadline = trio.current_time() + COMMIT_TIMEOUT
            with trio.CancelScope(deadline=deadline, shield=True) as overdue:
                await self._apply(changes)
            if overdue.cancelled_caught:
                if self._abort is not None:
                    self._abort()  # the writer is killed: it cannot commit later
                error = StoreError(
                    f"the state writer did not finish a commit within {COMMIT_TIMEOUT:g} s"
                )
        except StoreError as exc:
            error = exc
        except Exception as exc:  # an unexpected backend failure must not kill the writer
            error = StoreError(f"state write failed: {exc!r}")
        self.commits += 1
        self.changes_committed += len(changes)
        self.apply_seconds += time.perf_counter() - started
        if error is None:
            self.last_cut = cut
        else:
            self.failures += 1
        return error

    def fail(self, error: StoreError) -> None:
        """Stop committing (see module doc) and tell the owner, once; also for
        failures found outside a commit (a database file swapped, a start
        whose first write failed)."""
        if self.failure is None:
            self.failure = error
            if self.on_failure is not None:
                self.on_failure(error)

    def _finish(self, batch: Batch, error: StoreError | None) -> None:
        if error is not None:
            self.fail(error)
        batch.error = error
        batch.done.set()
        for listener in batch.listeners:
            listener()
