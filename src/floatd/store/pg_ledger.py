"""The cluster's ledger: every seat decision is one PostgreSQL transaction.

Several floatd nodes share one database (cluster.md).  A node must never
decide from what it remembers, since another node may have granted or
released a seat a moment ago; so each decision runs inside a transaction that
first takes the *ledger lock* (one row, ``FOR UPDATE``: the equivalent of a
product-row lock that cannot be raced, and one that never deadlocks, because
there is only one) and then builds the working copy of the products it
touches from their rows.  The working copy is the single server's own
:class:`~floatd.core.ledger.LocalLedger`, so sharing per machine or instance,
user locks, the site policy, waiting and every refusal are decided by exactly
the code that decides them on one server; what it journals is written back as
SQL in the same transaction, and the answer is given only after the commit.

A node batches its concurrent requests into one transaction
(:meth:`PgLedger.transaction`), so a product's rows are read once per batch,
not once per request, and the lock is taken once per batch.

The wait queue is a table, in queue order (``seq``), so it is one queue for
the whole cluster: a seat freed on any node goes to its first waiter, whose
row is then marked done with the lease it got.  The node the waiter waits on
finds that at its next transaction (:meth:`PgLedger.collect`) and answers the
client; a node that goes away leaves rows that :meth:`PgLedger.forget_node`
clears, giving back any seat granted to a waiter who never heard of it.

Times are whatever the caller passes (the contract suite passes its own);
``floatd serve`` passes the database's clock, so node clocks may differ.
Blocking code (psycopg's synchronous API): the daemon calls it in a worker
thread, one call at a time per node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager, suppress

import psycopg

from floatd.core.changes import Audit, Change, DeleteLease, PutLease, SetExpiry
from floatd.core.ledger import BorrowCheck, LocalLedger, RenewCheck
from floatd.core.policy import Policy
from floatd.core.seats import Claim, Lease, PoolProduct, Waiter
from floatd.errors import FloatdError, LeaseNotFound, Unavailable
from floatd.store.pg_changes import KEEP, Follower, encode, entries_of, queue_entry
from floatd.store.pg_reads import LedgerReads
from floatd.store.pg_rows import (
    LEASE_COLUMNS,
    WAITER_COLUMNS,
    Conn,
    Transaction,
    failed,
    insert_waiter,
    lease_of,
    locked,
    put_lease,
    waiter_of,
    write_audit,
)


class PgLedger(LedgerReads):
    """The Ledger of floatd.core.ledger on a PostgreSQL database shared by nodes."""

    def __init__(self, conn: Conn, node: str) -> None:
        self._conn = conn
        self.node = node
        #: Audit records the service adds; written with the decision they describe.
        self.journal: list[Change] = []
        self.max_waiters = 1000
        self.max_leases_per_seat = 1024
        self._policy: Policy | None = None
        self._tx: Transaction | None = None
        # This node's copies of the products, kept current from the change log.
        self._follow = Follower()
        # Held through each transaction and read: a node decides in a worker
        # thread while an admin's rare command may come from the event loop.
        self._mutex = threading.RLock()
        # Waiters queued through this node, by their row; only this node can answer them.
        self._mine: dict[int, Waiter] = {}
        self._expired: list[Lease] = []
        self._woken: list[Waiter] = []

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    def use_connection(self, conn: Conn) -> Conn:
        """Decide on ``conn`` from now on (after the old one failed); the old one."""
        old, self._conn = self._conn, conn
        return old

    @locked
    def database_time(self) -> float:
        """The database's clock (unix seconds): the lease clock of a cluster."""
        try:
            row = self._conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        except psycopg.Error as exc:
            raise failed(exc) from None
        assert row is not None
        return float(row[0])

    # --- transactions ---------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything decided inside commits together (a node's batch), or not
        at all: Unavailable then, and nothing decided inside happened.  A
        refusal raised inside is a decision too: what was found on the way
        (expiries, say) is still committed, then the refusal goes on."""
        with self._mutex:
            if self._tx is not None:
                yield
                return
            refusal = yield from self._transact()
        if refusal is not None:
            raise refusal

    def _transact(self) -> Generator[None, None, FloatdError | None]:
        tx = self._tx = Transaction()
        refusal: FloatdError | None = None
        try:
            with self._conn.transaction():
                try:
                    yield
                except FloatdError as exc:
                    if isinstance(exc, Unavailable):
                        raise
                    refusal = exc
                self._finish(tx)
            self._kept(tx)
        except (psycopg.Error, Unavailable) as exc:
            self.journal = []  # the audit of what did not happen
            self._follow.drop()  # copies holding what did not happen
            if isinstance(exc, Unavailable):
                raise
            raise failed(exc) from None
        except BaseException:  # a bug: nothing decided inside happened either
            self.journal = []
            self._follow.drop()
            raise
        finally:
            self._tx = None
        return refusal

    def lock(self) -> Conn:
        """The ledger lock, for work beside the decisions in this transaction
        (the node registry); the connection to do it on."""
        self._lock()
        return self._conn

    def _lock(self) -> Transaction:
        """The ledger lock for this transaction, taken once; then what other
        nodes decided for this node's waiters."""
        tx = self._tx
        assert tx is not None, "decisions run inside transaction()"
        if not tx.locked:
            row = self._conn.execute(
                "SELECT version FROM floatd_ledger WHERE id = 1 FOR UPDATE"
            ).fetchone()
            assert row is not None
            tx.version = version = int(row[0])
            follow = self._follow
            if follow.version != version:
                rows: list[tuple[int, bytes]] = []
                if follow.version >= 0 and follow.copies:
                    rows = self._conn.execute(
                        "SELECT version, body FROM floatd_changelog"
                        " WHERE version > %s AND version <= %s ORDER BY version",
                        (follow.version, version),
                    ).fetchall()
                follow.follow(rows, version)
            tx.locked = True
            self._collect_done()
        return tx

    def _finish(self, tx: Transaction) -> None:
        audits = [c for c in self.journal if isinstance(c, Audit)]
        self.journal = []
        if audits:
            write_audit(self._conn, audits, self.node)
        if tx.wrote:
            assert tx.locked, "every change is made under the ledger lock"
            tx.version += 1
            self._conn.execute(
                "INSERT INTO floatd_changelog VALUES (%s, %s, %s)",
                (tx.version, self.node, encode(tx.log)),
            )
            self._conn.execute("UPDATE floatd_ledger SET version = %s WHERE id = 1", (tx.version,))
            if tx.version % 1000 == 0:
                self._conn.execute(
                    "DELETE FROM floatd_changelog WHERE version <= %s", (tx.version - KEEP,)
                )

    def _kept(self, tx: Transaction) -> None:
        """After a commit: the copies this transaction used are the database's
        state as of its version, to be brought up to date from the log next time."""
        if tx.locked:
            self._follow.copies.update(tx.copies)
            self._follow.version = tx.version

    # --- the working copy of a product ----------------------------------------

    def _copy(self, now: float, product: str) -> LocalLedger:
        """``product`` as the database holds it, as a LocalLedger that decides
        for this transaction; what ran out by ``now`` is expired in time order
        (so a seat that ran out before a waiter's deadline reaches the waiter)."""
        tx = self._lock()
        copy = tx.copies.get(product)
        if copy is not None:
            return copy
        copy = self._follow.copies.get(product) or self._load(now, product, tx)
        tx.copies[product] = copy
        copy.expire(now)
        self._write(copy)
        return copy

    def _load(self, now: float, product: str, tx: Transaction, settle: bool = True) -> LocalLedger:
        copy = LocalLedger()
        copy.max_waiters = self.max_waiters
        copy.max_leases_per_seat = self.max_leases_per_seat
        copy.set_policy(self._policy, now)
        terms = self._terms(product)
        copy.set_products([terms] if terms is not None else [], now)
        rows = self._conn.execute(
            f"SELECT {LEASE_COLUMNS} FROM floatd_leases WHERE product = %s", (product,)
        ).fetchall()
        copy.restore((lease_of(row) for row in rows), float("-inf"))
        waiting = self._conn.execute(
            f"SELECT {WAITER_COLUMNS} FROM floatd_waiters"
            " WHERE product = %s AND NOT done ORDER BY seq",
            (product,),
        ).fetchall()
        for row in waiting:
            seq = row[0]
            waiter = self._mine.get(seq) or waiter_of(row)
            if not settle:  # a copy to read from: it changes nothing
                if terms is not None:
                    copy.requeue(waiter)
                continue
            self._follow.place(waiter, seq)
            if terms is None:
                if settle:  # its product is gone: its wait is over
                    waiter.done = True
                    self._settle_waiter(tx, waiter)
            else:
                copy.requeue(waiter)
        return copy

    def _write(self, copy: LocalLedger) -> None:
        """Write what ``copy`` decided since the last call."""
        tx = self._tx
        assert tx is not None
        changes = copy.take_changes()
        tx.log += entries_of(changes)
        execute = self._conn.execute
        for change in changes:
            tx.wrote = True
            if isinstance(change, PutLease):
                put_lease(self._conn, change.lease, self.node)
            elif isinstance(change, DeleteLease):
                execute("DELETE FROM floatd_leases WHERE id = %s", (change.lease_id,))
            elif isinstance(change, SetExpiry):
                execute(
                    "UPDATE floatd_leases SET expires_at = %s WHERE id = %s",
                    (change.expires_at, change.lease_id),
                )
        self._expired.extend(copy.take_expired())
        for waiter in copy.take_woken():
            self._settle_waiter(tx, waiter)

    def _settle_waiter(self, tx: Transaction, waiter: Waiter) -> None:
        """A waiter was served or timed out: its own node hears of it now, any
        other node at its next transaction (its row, marked done)."""
        tx.wrote = True
        seq = self._follow.unplace(waiter)
        tx.log.append(["done", seq])
        if self._mine.pop(seq, None) is waiter:
            self._conn.execute("DELETE FROM floatd_waiters WHERE seq = %s", (seq,))
            self._woken.append(waiter)
            return
        granted = waiter.lease.id if waiter.lease is not None else None
        self._conn.execute(  # marked done, and its node told (at commit), in one statement
            "WITH done AS (UPDATE floatd_waiters SET done = true, granted = %s WHERE seq = %s"
            " RETURNING node) SELECT pg_notify('floatd_waiters', node) FROM done",
            (granted, seq),
        )

    def _collect_done(self) -> None:
        """This node's waiters that other nodes served or timed out."""
        if not self._mine:
            return
        rows = self._conn.execute(
            "DELETE FROM floatd_waiters WHERE node = %s AND done RETURNING seq, granted",
            (self.node,),
        ).fetchall()
        for seq, granted in rows:
            waiter = self._mine.pop(seq, None)
            if waiter is None:
                continue
            waiter.done = True
            if granted is not None:
                waiter.lease = self._read_lease(granted)
            self._woken.append(waiter)

    def check_waiters(self) -> None:
        """(In a transaction, now and then.)  This node's waiters whose rows
        are gone: another node took this one for gone (it stalled past the
        heartbeat's staleness) and cleared them.  Their clients hear now that
        no seat came, rather than at the end of their wait."""
        if not self._mine:
            return
        self._lock()
        rows = self._conn.execute(
            "SELECT seq FROM floatd_waiters WHERE node = %s", (self.node,)
        ).fetchall()
        present = {row[0] for row in rows}
        for seq in [seq for seq in self._mine if seq not in present]:
            waiter = self._mine.pop(seq)
            gone = self._follow.by_seq.get(seq)
            if gone is not None:
                self._follow.unplace(gone)
                copy = self._follow.copies.get(gone.claim.product)
                if copy is not None:
                    copy.follow_unqueue(gone)
            waiter.done = True
            self._woken.append(waiter)

    def collect(self) -> None:
        """Look for this node's waiters served elsewhere, outside a batch (a
        node's every transaction does this as it takes the lock)."""
        if self._mine:
            with self.transaction():
                self._lock()

    # --- decisions ---------------------------------------------------------

    def claim(self, now: float, claim: Claim, wait_until: float | None = None) -> Lease | Waiter:
        with self.transaction():
            copy = self._copy(now, claim.product)
            try:
                result = copy.claim(now, claim, wait_until)
            finally:
                self._write(copy)
            if isinstance(result, Waiter):
                self._queue(result)
            return result

    def _queue(self, waiter: Waiter) -> None:
        tx = self._lock()
        tx.wrote = True
        seq = insert_waiter(self._conn, waiter, self.node)
        self._mine[seq] = waiter
        self._follow.place(waiter, seq)
        tx.log.append(queue_entry(seq, waiter, self.node))

    def _holding(self, now: float, lease_id: str) -> LocalLedger:
        """The working copy of the product that holds ``lease_id``."""
        tx = self._lock()
        for copy in tx.copies.values():
            if copy.lease(lease_id) is not None:
                return copy
        row = self._conn.execute(
            "SELECT product FROM floatd_leases WHERE id = %s", (lease_id,)
        ).fetchone()
        if row is None:
            raise LeaseNotFound("no such lease")
        return self._copy(now, row[0])

    def renew(
        self, now: float, lease_id: str, token_hash: bytes, check: RenewCheck | None = None
    ) -> Lease:
        with self.transaction():
            copy = self._holding(now, lease_id)
            try:
                return copy.renew(now, lease_id, token_hash, check)
            finally:
                self._write(copy)

    def borrow(self, now: float, lease_id: str, token_hash: bytes, check: BorrowCheck) -> Lease:
        with self.transaction():
            copy = self._holding(now, lease_id)
            try:
                return copy.borrow(now, lease_id, token_hash, check)
            finally:
                self._write(copy)

    def release(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        with self.transaction():
            copy = self._holding(now, lease_id)
            try:
                return copy.release(now, lease_id, token_hash)
            finally:
                self._write(copy)

    def revoke(self, now: float, lease_id: str) -> Lease:
        with self.transaction():
            copy = self._holding(now, lease_id)
            try:
                return copy.revoke(now, lease_id)
            finally:
                self._write(copy)

    def withdraw(self, waiter: Waiter, now: float) -> None:
        with self.transaction():
            tx = self._lock()  # also learns whether another node served it meanwhile
            if waiter in self._woken:
                self._woken.remove(waiter)  # nobody is left to tell
            if not waiter.done:
                seq = next((s for s, w in self._mine.items() if w is waiter), None)
                if seq is not None:
                    del self._mine[seq]
                    self._conn.execute("DELETE FROM floatd_waiters WHERE seq = %s", (seq,))
                    self._unqueue(tx, seq)
                waiter.done = True
                return
            if waiter.lease is not None:
                with suppress(LeaseNotFound):  # ended meanwhile
                    self.revoke(now, waiter.lease.id)

    def _unqueue(self, tx: Transaction, seq: int) -> None:
        """A waiter's row is gone (withdrawn, or its node gone): out of the copies."""
        tx.wrote = True
        tx.log.append(["done", seq])
        waiter = self._follow.by_seq.get(seq)
        if waiter is not None:
            self._follow.unplace(waiter)
            code = waiter.claim.product
            copy = tx.copies.get(code) or self._follow.copies.get(code)
            if copy is not None:
                copy.follow_unqueue(waiter)

    def expire(self, now: float) -> None:
        with self.transaction():
            tx = self._lock()
            due = self._conn.execute(
                "SELECT product FROM floatd_leases WHERE expires_at <= %s"
                " UNION SELECT product FROM floatd_waiters WHERE NOT done AND deadline <= %s",
                (now, now),
            ).fetchall()
            for code in sorted({row[0] for row in due} | set(tx.copies)):
                copy = self._copy(now, code)
                copy.expire(now)
                self._write(copy)

    def set_products(self, products: Iterable[PoolProduct], now: float) -> None:
        new = list(products)
        with self.transaction():
            tx = self._lock()
            tx.copies.clear()
            self._follow.drop()
            tx.wrote = True
            tx.log.append(["reset"])  # every node reads its products again
            self._conn.execute("UPDATE floatd_products SET active = false")
            for p in new:
                self._conn.execute(
                    "INSERT INTO floatd_products VALUES (%s, %s, %s, %s, %s, true)"
                    " ON CONFLICT (code) DO UPDATE SET seats = excluded.seats,"
                    " duration = excluded.duration, strategy = excluded.strategy,"
                    " user_locked = excluded.user_locked, active = true",
                    (p.code, p.seats, p.duration, p.strategy, p.user_locked),
                )
            by_code = {p.code: p for p in new}
            self._serve_queues(now, lambda copy, code: copy.set_products([by_code[code]], now))

    def set_policy(self, policy: Policy | None, now: float) -> None:
        self._policy = policy
        with self.transaction():
            self._lock().copies.clear()
            self._follow.drop()  # copies charged under the old rules
            self._serve_queues(now, lambda copy, _code: copy.set_policy(policy, now))

    def _serve_queues(self, now: float, change: Callable[[LocalLedger, str], None]) -> None:
        """After new terms or rules: every queue gets what they now allow."""
        rows = self._conn.execute(
            "SELECT DISTINCT product FROM floatd_waiters WHERE NOT done"
        ).fetchall()
        for (code,) in sorted(rows):
            copy = self._copy(now, code)
            if copy.terms(code) is None:
                continue  # gone: its queue ended as it was loaded
            change(copy, code)
            self._write(copy)

    # --- what happened on the side ----------------------------------------

    def take_expired(self) -> list[Lease]:
        expired, self._expired = self._expired, []
        return sorted(expired, key=lambda lease: lease.expires_at)

    def take_woken(self) -> list[Waiter]:
        woken, self._woken = self._woken, []
        return woken

    def take_changes(self) -> list[Change]:
        """Nothing to hand over: decisions are durable when their call returns."""
        return []

    # --- reading (more in floatd.store.pg_reads) -----------------------------

    @locked
    def _peek(self, product: str, now: float) -> LocalLedger:
        """A working copy to read from, deciding nothing (no lock)."""
        copy = self._loaded(product)
        if copy is not None:
            return copy
        try:
            return self._load(now, product, Transaction(), settle=False)
        except psycopg.Error as exc:
            raise failed(exc) from None

    @locked
    def reservations(self, product: str) -> list[dict[str, object]]:
        copy = self._current(product) or self._peek(product, float("-inf"))
        return copy.reservations(product)

    @locked
    def explain(self, now: float, claim: Claim) -> dict[str, object]:
        copy = self._peek(claim.product, now)
        out = copy.explain(now, claim)
        if self._loaded(claim.product) is copy:
            self._write(copy)
        else:
            copy.take_changes()
        return out

    # --- the working copy ----------------------------------------------------

    def restore(self, leases: Iterable[Lease], now: float) -> list[Lease]:
        """The database is the state: ``leases`` is ignored, and what ran out
        while this node was away is expired (and returned)."""
        self.expire(now)
        dead, self._expired = self._expired, []
        return sorted(dead, key=lambda lease: lease.expires_at)

    def reset(self) -> None:
        """Forget this node's waiters (the database is read again anyway)."""
        self._mine.clear()
        self._woken.clear()
        self._expired.clear()
        self._follow.drop()
        self.journal = []

    def shift(self, delta: float) -> list[Lease]:
        """Nothing to move: expiry runs on the database's clock, not this node's."""
        return []

    def clamp(self, now: float, slack: float) -> list[Lease]:
        return []

    def drop_waiters(self) -> list[Waiter]:
        """This node's waiters, given up (the database cannot be used); their
        rows are cleared by :meth:`forget_node` once it can."""
        out = [w for w in self._mine.values() if not w.done]
        for waiter in out:
            waiter.done = True
        self._mine.clear()
        return out

    def forget_node(self, now: float, node: str) -> int:
        """Clear a node's rows in the queue (a node starting again, or one gone
        for good): its waiters leave the queue, and a seat granted to one of
        them who never heard of it is given back.  Returns the seats given back."""
        with self.transaction():
            tx = self._lock()
            rows = self._conn.execute(
                "DELETE FROM floatd_waiters WHERE node = %s RETURNING seq, granted",
                (node,),
            ).fetchall()
            for seq, _ in rows:
                self._unqueue(tx, seq)
            given = 0
            for _, granted in rows:
                if granted is not None:
                    try:
                        self.revoke(now, granted)
                        given += 1
                    except LeaseNotFound:
                        pass
            return given
