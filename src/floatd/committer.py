"""Group commit: many requests, one transaction, one fsync.

Requests append their changes and wait on the batch they landed in.  The single
writer task takes everything pending, applies it in a worker thread (behind a
``CapacityLimiter(1)``, so the store sees one writer), and while that runs the
next batch fills up.  Under load a batch holds every request that arrived during
the previous commit, which is what lets durability cost little throughput.
Changes are applied strictly in submission order, so the disk always holds a
prefix of the in-memory history, and that prefix never has more seats than the cap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from floatd.errors import StoreError
from floatd.store import Change, LeaseStore


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


RunSync = Callable[..., Awaitable[Any]]


class GroupCommitter:
    def __init__(self, store: LeaseStore, run_sync: RunSync = trio.to_thread.run_sync) -> None:
        self._store = store
        # Injectable so MockClock tests can apply inline instead of in a thread.
        self._run_sync = run_sync
        self._limiter = trio.CapacityLimiter(1)
        self._pending = Batch()
        self._wakeup = trio.Event()
        self._closing = False
        self.commits = 0
        self.changes_committed = 0
        self.apply_seconds = 0.0

    def submit(self, changes: Sequence[Change]) -> Batch:
        """Queue changes for the next commit; await ``.wait()`` for durability."""
        batch = self._pending
        batch.changes.extend(changes)
        self._wakeup.set()
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop.  Returns once :meth:`close` was called and all is flushed."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, Batch()
            if batch.changes:
                await self._commit(batch)
            else:
                batch.done.set()
            if self._closing and not self._pending.changes:
                self._pending.done.set()
                return

    async def _commit(self, batch: Batch) -> None:
        started = trio.current_time()
        try:
            with trio.CancelScope(shield=True):  # a half-applied batch helps nobody
                await self._run_sync(self._store.apply, batch.changes, limiter=self._limiter)
        except StoreError as exc:
            batch.error = exc
        except Exception as exc:  # an unexpected backend failure must not kill the writer
            batch.error = StoreError(f"state write failed: {exc!r}")
        self.commits += 1
        self.changes_committed += len(batch.changes)
        self.apply_seconds += trio.current_time() - started
        batch.done.set()

    def close(self) -> None:
        """Ask the writer to flush what is pending and stop."""
        self._closing = True
        self._wakeup.set()
