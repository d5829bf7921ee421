"""The durable state as the daemon sees it: loaded at start, watched, and
recovered after a failed write.

The rule it keeps: what memory holds never runs ahead of a disk that stopped
following.  A start restores the persisted leases (extending those a crash may
have left with an acknowledged, unwritten renewal); a failed or overdue commit
stops every change (``failed``) until a reload from disk, exactly as after a
crash, commits again (``recover``).  The clock mark (SERVER_TIME_MODIFIED)
lives here too, since its reset is a state change like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from floatd.core.changes import Audit, Change, PruneAudit, SetExpiry, SetMeta, extend_after_crash
from floatd.core.seats import Lease, Waiter
from floatd.daemon.committer import LAZY_WINDOW, META_CLEAN, META_LAST_CUT
from floatd.daemon.shared import Shared
from floatd.errors import StoreError, Unavailable
from floatd.logs import get_logger

AUDIT_PRUNE_INTERVAL = 600.0
META_CLOCK_MARK = "clock_mark"
#: How often the database file is checked for having been deleted or replaced.
DATABASE_CHECK = 1.0
#: While the state cannot be written, how often a reload from disk is tried.
RECOVERY_RETRY = 1.0
#: ... and how often (in tries) the log says it is still failing.
RECOVERY_LOG_EVERY = 60

log = get_logger()


class StateKeeper:
    """Start-up load, failure, recovery and upkeep of the durable state."""

    def __init__(
        self,
        shared: Shared,
        *,
        answer_unavailable: Callable[[Waiter, int], None],
        after_recovery: Callable[[], None],
    ) -> None:
        self.shared = shared
        self._answer_unavailable = answer_unavailable
        self._after_recovery = after_recovery
        shared.committer.on_failure = self.failed
        # Set while the state cannot be written: the recovery task's cue.
        self._unavailable = trio.Event()
        #: When the state last stopped being writable (None: it is writable).
        self.unavailable_since: float | None = None

    async def reset_clock(self) -> dict[str, Any]:
        """``floatd clock reset``: forget the high-water mark of the wall clock,
        after an operator put right a clock that was set far ahead (the guard
        would otherwise refuse leasing until real time caught up).  Leases that
        the wrong clock dated far ahead end a full duration from now at most."""
        if not self.shared.service.writable:
            raise Unavailable("the state cannot be written right now; try again")
        now = self.shared.clock()
        guard = self.shared.service.clock_guard
        old = guard.mark
        guard.mark = now
        guard.start(now, trio.current_time())
        clamped = self.shared.service.clamp_expiries(now, LAZY_WINDOW)
        batch = self.shared.committer.submit(
            [Audit(now, "clock_reset", None), SetMeta(META_CLOCK_MARK, repr(now))]
        )
        self.shared.flush()  # the clamped expiries, into the same batch
        await batch.wait()
        log.warning("clock_mark_reset", old_mark=old, new_mark=now, leases_clamped=clamped)
        return {"old_mark": old, "new_mark": now, "leases_clamped": clamped}

    def load(self, now: float) -> None:
        """Blocking start-up work: the persisted leases and bookkeeping."""
        meta, leases = self._read_state()
        guard = self.shared.service.clock_guard
        guard.mark = max(float(meta.get(META_CLOCK_MARK, 0)), float(meta.get(META_LAST_CUT, 0)))
        if guard.tampered(now):
            log.warning(
                "clock_went_back",
                now=now,
                latest_seen=guard.mark,
                hint="leasing is refused (SERVER_TIME_MODIFIED) until the clock is right",
            )
        changes = self._restore(meta, leases, now)
        try:
            self.shared.store.apply(changes)
        except StoreError as exc:
            # A full or failing disk: serve what can be read, refuse what would
            # write (UNAVAILABLE), and come back by itself once the disk does.
            self.shared.committer.fail(exc)
            return
        self.shared.committer.last_cut = now

    def _read_state(self) -> tuple[dict[str, str], list[Lease]]:
        """(Blocking.)  The persisted bookkeeping and leases."""
        return self.shared.store.load_meta(), self.shared.store.load_leases()

    def _restore(self, meta: dict[str, str], leases: list[Lease], now: float) -> list[Change]:
        """Put the persisted leases into the pool, as after a crash when the last
        stop was not clean; returns the changes that make the disk agree."""
        extended: list[Lease] = []
        if META_LAST_CUT in meta and meta.get(META_CLEAN) != "1":
            extended = extend_after_crash(leases, float(meta[META_LAST_CUT]), LAZY_WINDOW)
            log.warning(
                "unclean_stop_recovered",
                last_commit=float(meta[META_LAST_CUT]),
                leases_extended=len(extended),
            )
        dead = self.shared.service.restore(leases, now)
        changes: list[Change] = [SetExpiry(le.id, le.expires_at) for le in extended]
        changes += self.shared.service.take_changes()
        log.info(
            "state_restored", leases=len(self.shared.service.ledger), expired_while_down=len(dead)
        )
        # From here until the final flush of a clean stop, a crash is unclean.
        return [*changes, SetMeta(META_CLEAN, "0"), SetMeta(META_LAST_CUT, repr(now))]

    # --- when the state cannot be written --------------------------------------

    def failed(self, error: StoreError) -> None:
        """A commit failed or is overdue: stop changing state until a reload from
        disk succeeds (:meth:`recover`).

        Memory may now hold changes the disk never got (a release, a grant), and
        the committer writes nothing more, so nothing that depends on them can
        reach the disk either.  Requests that would write are refused with
        UNAVAILABLE; queued acquires are answered so; reads go on."""
        service = self.shared.service
        if not service.writable:
            return
        service.writable = False
        self.unavailable_since = self.shared.clock()
        log.error(
            "state_unavailable",
            reason=error.message,
            database=str(self.shared.config.database_path),
            hint="writes refused (UNAVAILABLE) until the state can be written again",
        )
        for waiter, rid in service.abandon_waiters():
            self._answer_unavailable(waiter, rid)
        self._unavailable.set()

    async def watch_database(self) -> None:
        """Notice within a second a database deleted or replaced while running:
        writes would go on to a file nobody will ever read again."""
        while True:
            await trio.sleep(DATABASE_CHECK)
            try:
                await self.shared.run_sync(self.shared.store.check_identity)
            except StoreError as exc:
                self.shared.committer.fail(exc)

    async def recover(self) -> None:
        """While the state cannot be written, reload it from disk once a second,
        exactly as a restart after a crash would, until that reload commits."""
        while True:
            await self._unavailable.wait()
            tries = 0
            while not self.shared.service.writable:
                await trio.sleep(RECOVERY_RETRY)
                tries += 1
                try:
                    await self._reload_state()
                except StoreError as exc:
                    if tries % RECOVERY_LOG_EVERY == 0:
                        log.error("state_still_unavailable", reason=exc.message, tries=tries)
            self._unavailable = trio.Event()

    async def _reload_state(self) -> None:
        """Rebuild the pool from disk and commit that; the service is writable
        again once the commit succeeds (StoreError otherwise)."""
        await self.shared.run_sync(self.shared.store.check_identity)
        meta, leases = await self.shared.run_sync(self._read_state)
        now = self.shared.clock()
        self.shared.service.reset(now)
        changes = self._restore(meta, leases, now)
        await self.shared.committer.recover(changes)
        self.shared.service.writable = True
        since, self.unavailable_since = self.unavailable_since, None
        log.warning(
            "state_recovered",
            leases=len(self.shared.service.ledger),
            unavailable_for=None if since is None else round(now - since, 3),
        )
        self._after_recovery()

    async def prune_audit(self) -> None:
        """Retention: drop audit records past ``[audit] retention_days``."""
        while True:
            days = self.shared.config.audit_retention_days
            if days > 0:
                self.shared.committer.submit(
                    [PruneAudit(self.shared.clock() - days * 86400)], urgent=False
                )
            await trio.sleep(AUDIT_PRUNE_INTERVAL)
