"""Group commit: many requests, one transaction, one fsync.

Requests append their changes and wait on the batch they landed in.  The single
writer task takes everything pending, applies it in a worker thread (behind a
``CapacityLimiter(1)``, so the store sees one writer), and while that runs the
next batch fills up.  Under load a batch holds every request that arrived during
the previous commit, which is what lets durability cost little throughput.
Changes are applied strictly in submission order, so the disk always holds a
prefix of the in-memory history, and that prefix never has more seats than the cap.

Every commit also records when its batch was cut (``last_cut``), and an idle
writer commits that alone once a second.  Renewals may then be answered before
their commit while the writer is *fresh* (its last commit was cut within
``lazy_window`` seconds): a crash can only lose renewals made before
``last_cut + lazy_window``, a bound recovery can rely on
(:func:`floatd.store.extend_after_crash`).  The final flush of a clean stop
writes ``clean = 1`` so that a clean restart extends nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from floatd.errors import StoreError
from floatd.store import Change, LeaseStore, SetMeta

RunSync = Callable[..., Awaitable[Any]]

HEARTBEAT = 1.0
LAZY_WINDOW = 5.0
META_LAST_CUT = "last_cut"
META_CLEAN = "clean"


class Batch:
    """One future commit; every request whose changes are in it waits here."""

    __slots__ = ("changes", "done", "error")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.done = trio.Event()
        self.error: StoreError | None = None

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


class GroupCommitter:
    def __init__(
        self,
        store: LeaseStore,
        run_sync: RunSync = trio.to_thread.run_sync,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        # Injectable so MockClock tests can apply inline instead of in a thread.
        self._run_sync = run_sync
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._pending = Batch()
        self._wakeup = trio.Event()
        self._closing = False
        self.last_cut = clock()  # the caller has just made the store consistent
        self.commits = 0
        self.changes_committed = 0
        self.apply_seconds = 0.0

    def submit(self, changes: Sequence[Change]) -> Batch:
        """Queue changes for the next commit; await ``.wait()`` for durability."""
        batch = self._pending
        batch.changes.extend(changes)
        self._wakeup.set()
        return batch

    def fresh(self) -> bool:
        """Whether a renewal may be answered before its commit (see module doc)."""
        return self._clock() - self.last_cut <= LAZY_WINDOW

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop.  Returns once :meth:`close` was called and all is flushed."""
        task_status.started()
        while True:
            with trio.move_on_after(HEARTBEAT):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, Batch()
            closing = self._closing
            cut = self._clock()
            batch.changes.append(SetMeta(META_LAST_CUT, repr(cut)))
            if closing:
                batch.changes.append(SetMeta(META_CLEAN, "1"))
            await self._commit(batch, cut)
            if closing:
                return

    async def _commit(self, batch: Batch, cut: float) -> None:
        started = trio.current_time()
        try:
            with trio.CancelScope(shield=True):  # a half-applied batch helps nobody
                await self._run_sync(self._store.apply, batch.changes, limiter=self._limiter)
        except StoreError as exc:
            batch.error = exc
        except Exception as exc:  # an unexpected backend failure must not kill the writer
            batch.error = StoreError(f"state write failed: {exc!r}")
        else:
            self.last_cut = cut
        self.commits += 1
        self.changes_committed += len(batch.changes)
        self.apply_seconds += trio.current_time() - started
        batch.done.set()

    def close(self) -> None:
        """Ask the writer to flush what is pending, mark the stop clean, and end."""
        self._closing = True
        self._wakeup.set()
