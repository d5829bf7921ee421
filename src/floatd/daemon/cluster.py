"""A cluster node's decider: the requests of this node, decided in batches, each
batch one transaction of the cluster's ledger (floatd.store.pg_ledger).

On a single server the service decides on the event loop and the group
committer makes the result durable.  On a cluster node a decision needs the
database (another node may have taken the last seat a moment ago), and
psycopg's blocking API runs in a worker thread (its async API is asyncio
only), so the roles turn around: sessions hand the requests that touch seats
to :meth:`ClusterNode.submit` and get their answer later, like a queued
acquire does; one task takes everything submitted meanwhile and runs it as one
transaction in one worker thread, then answers.  Only that thread touches the
service while it runs; the event loop goes on reading, writing and answering
pings.  A batch is answered only after its commit: there is no lazily written
renewal in a cluster.

When the database cannot be used, the batch's requests are answered
UNAVAILABLE, this node's queued acquires too, and every later request is
refused at once (``writable`` False: /healthz says ``state_unavailable``)
until a probe every second finds the database again; then this node's rows
in the queue are cleared (a seat granted to a waiter who was never told goes
back) and it serves again.  Nothing is lost that was acknowledged: the
database has it.

The database's clock is the lease clock: each batch reads it once, so node
clocks may differ.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import trio

from floatd import __version__
from floatd.core.changes import Audit
from floatd.core.entitlement import Entitlement, verify_entitlement
from floatd.core.messages import Answer, Request
from floatd.core.seats import Waiter
from floatd.daemon.recovery import AUDIT_PRUNE_INTERVAL
from floatd.daemon.session import _Slot, _unavailable, answer_unavailable
from floatd.errors import AdminError, EntitlementError, LeaseNotFound, StoreError, Unavailable
from floatd.logs import get_logger
from floatd.store import pg_nodes
from floatd.store.pg_ledger import PgLedger
from floatd.store.pg_rows import failed
from floatd.store.pg_shared import EntitlementSync
from floatd.store.pg_users import users_pool

if TYPE_CHECKING:
    from floatd.daemon.server import Server

_T = TypeVar("_T")
#: How often an idle node looks for expiries, for its waiters served on
#: other nodes (when no notification came), and refreshes its status view.
TICK = 1.0
#: While the database cannot be used, how often it is tried again.
PROBE = 1.0
#: Statements that take longer fail (and with them the batch): a hung
#: database costs answers, not a hung node.
STATEMENT_TIMEOUT_MS = 5000

log = get_logger()


def connect_node(dsn: str) -> psycopg.Connection[Any]:
    """The node's connection for decisions: autocommit outside the ledger's own
    transactions, keepalives that notice a dead peer, and bounded statements.
    The bound is a plain SET rather than a startup option, which PgBouncer
    refuses unless told to ignore it."""
    conn = psycopg.connect(
        dsn,
        autocommit=True,
        connect_timeout=5,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
    )
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    return conn


@dataclass(eq=False, slots=True)
class _Item:
    request: Request
    peer: str | None
    authenticated: bool
    slot: _Slot
    result: Answer | Waiter | None = None


@dataclass
class _Outcome:
    """What a batch leaves for the event loop to deliver."""

    woken: list[tuple[Waiter, Answer]] = field(default_factory=list)
    overview: list[dict[str, Any]] | None = None
    leases: int | None = None
    nodes: list[dict[str, Any]] | None = None


class ClusterNode:
    def __init__(self, server: Server, ledger: PgLedger, dsn: str) -> None:
        self.server = server
        self.ledger = ledger
        self._dsn = dsn
        self._pending: list[_Item] = []
        self._give_back: list[str] = []
        self._cancel: list[Waiter] = []
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one worker-thread job at a time touches the service
        self._stopping = False
        #: The database's clock as last read, and the monotonic time of reading.
        self._db_base: tuple[float, float] | None = None
        #: The cluster-wide view the status endpoint and metrics show, as of
        #: the last refresh (reading it must not wait for the database).
        self.overview: list[dict[str, Any]] = []
        self.leases = 0
        self._refreshed = -1e9
        self.batches = 0
        #: Set once this node has a slot under the entitlement's ``nodes``
        #: limit: the lease port opens then (floatd.store.pg_nodes).
        self.serving = trio.Event()
        self._has_slot = False
        self._beaten = -1e9
        self._said_limit = False
        self._pruned = -1e9  # audit retention: at the first heartbeat, then every 10 min
        self._entitlement = EntitlementSync(server.config, self._verify)
        #: Connections for the license users' password checks (off the event
        #: loop, two at a time: Server.check_password's limiter).
        self.users = users_pool(dsn)
        #: The registry as of the last heartbeat, for status and ``floatd nodes``.
        self.nodes: list[dict[str, Any]] = []

    # --- from the event loop --------------------------------------------------

    def submit(self, request: Request, peer: str | None, authenticated: bool, slot: _Slot) -> None:
        self._pending.append(_Item(request, peer, authenticated, slot))
        self._wake.set()

    def stop(self) -> None:
        """End the decider once what was submitted is answered (a clean stop:
        the connections are done by then)."""
        self._stopping = True
        self._wake.set()

    def give_back(self, lease_id: str) -> None:
        """A grant whose answer could not be delivered: its seat goes back."""
        self._give_back.append(lease_id)
        self._wake.set()

    def cancel_wait(self, waiter: Waiter) -> None:
        self._cancel.append(waiter)
        self._wake.set()

    def database_clock(self, fallback: float) -> float:
        """The database's clock now, from its last reading and the monotonic
        clock since (``fallback`` before the first reading)."""
        base = self._db_base
        if base is None:
            return fallback
        read, at = base
        return read + (time.monotonic() - at)

    async def reset_clock(self) -> dict[str, Any]:
        """``floatd clock reset`` on a cluster: the database's mark goes back to
        its clock now (after a database clock that was set far ahead was put
        right); nothing needs clamping, since leases expire by that clock."""
        guard = self.server.service.clock_guard

        def reset() -> dict[str, Any]:
            with self.ledger.transaction():
                conn = self.ledger.lock()
                old = guard.mark
                now = self.ledger.database_time()
                guard.mark = pg_nodes.clock_mark(conn, now, reset=True)
                self.ledger.journal.append(Audit(now, "clock_reset", None))
            log.warning("clock_mark_reset", old_mark=old, new_mark=now, node=self.ledger.node)
            return {"old_mark": old, "new_mark": now, "leases_clamped": 0}

        return await self.call(reset)

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (which may use the service and the ledger) in the worker
        thread, between batches: the admin's operations."""
        async with self._lock:
            return await trio.to_thread.run_sync(fn)

    # --- the decider ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self._wake.set()  # the first view of the cluster at once
        self.users.open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                await self._decide()
                nursery.cancel_scope.cancel()
        finally:
            self.users.close(timeout=1.0)

    async def _listen(self) -> None:
        """Wake the decider when another node served one of this node's
        waiters (LISTEN/NOTIFY).  Only a wake-up: notifications are lost while
        this connection is down, and a pooler in transaction mode drops them,
        so the decider also looks every TICK."""
        while True:
            with contextlib.suppress(psycopg.Error, OSError):
                await trio.to_thread.run_sync(self._wait_notes, abandon_on_cancel=True)
            await trio.sleep(PROBE)

    def _wait_notes(self) -> None:
        """(Its own worker thread and connection.)"""
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute("LISTEN floatd_waiters")
            while not self._stopping:
                for note in conn.notifies(timeout=1.0):
                    if note.payload == self.ledger.node:
                        trio.from_thread.run_sync(self._poke)

    def _poke(self) -> None:
        self._wake.set()

    async def _decide(self) -> None:
        while True:
            with trio.move_on_after(TICK if self.server.service.writable else PROBE):
                await self._wake.wait()
            self._wake = trio.Event()
            items, self._pending = self._pending, []
            leftovers = bool(self._cancel or self._give_back) and self.server.service.writable
            if self._stopping and not items and not leftovers:
                return  # a clean stop: what the connections left was done first
            if not self.server.service.writable:
                await self._probe()
                if not self.server.service.writable:
                    self._deliver_unavailable(items)
                    continue
            clock = time.monotonic()
            refresh = clock - self._refreshed >= TICK
            beat = clock - self._beaten >= pg_nodes.HEARTBEAT
            try:
                async with self._lock:
                    outcome = await trio.to_thread.run_sync(self._batch, items, refresh, beat)
            except Unavailable as exc:
                self._failed(str(exc), items)
                continue
            except Exception as exc:  # a bug must cost this batch, not the node
                log.exception("cluster_batch_failed", node=self.ledger.node)
                self._failed(f"internal error: {exc!r}", items)
                continue
            self.batches += 1
            if outcome.overview is not None:
                self.overview, self._refreshed = outcome.overview, time.monotonic()
            if outcome.leases is not None:
                self.leases = outcome.leases
            if outcome.nodes is not None:
                self.nodes, self._beaten = outcome.nodes, clock
                self._slot_news()
            self._deliver(items, outcome)

    def _slot_news(self) -> None:
        ent = self.server.service.entitlement
        if self._has_slot and not self.serving.is_set():
            log.info("node_serving", node=self.ledger.node)
            self.serving.set()
        elif not self._has_slot and not self._said_limit and ent is not None:
            self._said_limit = True  # without an entitlement: the limit of none
            log.warning(
                "node_limit",
                node=self.ledger.node,
                nodes=ent.nodes,
                hint="this node serves once a serving node stops (its slot frees)",
            )

    def _batch(self, items: list[_Item], refresh: bool, beat: bool = False) -> _Outcome:
        """(Worker thread.)  One transaction: the requests, what came due, what
        other nodes decided for this node's waiters; then the answers."""
        service = self.server.service
        ledger = self.ledger
        outcome = _Outcome()
        try:
            now = ledger.database_time()
        except Unavailable:
            # A connection the database dropped (it restarted, say): nothing
            # was decided on it yet, so a new one may take this batch.
            self._reconnect(forget=False)
            now = ledger.database_time()
        self._db_base = (now, time.monotonic())
        give_back, self._give_back = self._give_back, []
        cancel, self._cancel = self._cancel, []
        try:
            with ledger.transaction():
                for waiter in cancel:
                    service.cancel_wait(waiter, now)
                for lease_id in give_back:
                    with contextlib.suppress(LeaseNotFound, AdminError):  # gone, or borrowed
                        service.revoke(lease_id, now)
                self._decide_items(items, now, beat, outcome)
        except Unavailable:
            self._give_back[:0] = give_back  # still to be given back, once it can
            raise
        if refresh:
            outcome.overview = service.products_overview()
            outcome.leases = len(ledger)
        return outcome

    def _decide_items(self, items: list[_Item], now: float, beat: bool, outcome: _Outcome) -> None:
        """(Worker thread, in the batch's transaction.)"""
        service = self.server.service
        for item in items:
            item.result = service.handle(item.request, now, item.peer, item.authenticated)
        if beat:
            outcome.nodes = self._heartbeat(now)
        service.advance(now)  # also hands over what the heartbeat found
        for waiter in service.take_woken():
            if waiter.handle is not None:
                outcome.woken.append((waiter, service.waiter_response(waiter, now)))

    def _verify(self, text: str) -> Entitlement:
        """The database's entitlement, checked for this cluster as the watcher
        will check it (its time windows aside: those are the service's)."""
        licensing = self.server.licensing
        return verify_entitlement(
            text, licensing.keys, self.server.server_id, 0.0, math.inf, licensing.server_key
        )

    def _heartbeat(self, now: float) -> list[dict[str, Any]]:
        """(Worker thread, in the batch's transaction.)  This node's row and
        slot; the waiters of nodes gone leave the queue."""
        ledger, server = self.ledger, self.server
        conn = ledger.lock()
        ent = server.service.entitlement
        me = pg_nodes.NodeRow(
            name=ledger.node,
            addresses=[f"{h}:{p}" for h, p in server.ports]
            or [f"{h}:{p}" for h, p in server.config.listen],
            version=__version__,
            started_at=server.started_at,
            heartbeat=now,
            connections=server.connections,
            serving=self._has_slot,
        )
        self._has_slot = pg_nodes.beat(conn, me, ent.nodes if ent is not None else 1)
        server.service.clock_guard.mark = pg_nodes.clock_mark(conn, now)
        days = server.config.audit_retention_days
        if days > 0 and time.monotonic() - self._pruned >= AUDIT_PRUNE_INTERVAL:
            self._pruned = time.monotonic()
            pruned = pg_nodes.prune_audit(conn, now - days * 86400)
            if pruned:
                log.info("audit_pruned", records=pruned, node=ledger.node)
        try:
            moved = self._entitlement.sync(conn)
        except (EntitlementError, StoreError) as exc:
            log.error("cluster_entitlement_rejected", node=ledger.node, reason=str(exc))
        else:
            if moved is not None:
                log.info("cluster_entitlement", node=ledger.node, copy=moved)
        ledger.check_waiters()
        for name in pg_nodes.gone(conn, now):
            if name != ledger.node:
                given = ledger.forget_node(now, name)
                log.warning("node_gone", node=name, seats_given_back=given)
        return [row.as_dict(now) for row in pg_nodes.nodes(conn)]

    def _deliver(self, items: list[_Item], outcome: _Outcome) -> None:
        for item in items:
            slot, result = item.slot, item.result
            if isinstance(result, Waiter):
                slot.waiter = result
                result.handle = slot
                if slot.owner is None:  # the client left while it was decided
                    self.cancel_wait(result)
                continue
            assert result is not None
            self._answer(slot, result)
        for waiter, answer in outcome.woken:
            held = waiter.handle
            if isinstance(held, _Slot) and held.waiter is waiter:
                held.waiter = None
                self._answer(held, answer)

    def _answer(self, slot: _Slot, answer: Answer) -> None:
        slot.answer = answer
        slot.granted = answer.granted
        owner, slot.owner = slot.owner, None
        if owner is not None:
            owner.advance()
        elif answer.granted is not None:
            self.give_back(answer.granted)

    def _deliver_unavailable(self, items: list[_Item]) -> None:
        for item in items:
            rid = getattr(item.request, "id", None)
            self._answer(item.slot, _unavailable(rid))

    def _failed(self, reason: str, items: list[_Item]) -> None:
        """The database failed under this batch: nothing in it happened."""
        service = self.server.service
        if service.writable:
            service.writable = False
            self.server.state.unavailable_since = self.server.clock()
            log.error("state_unavailable", reason=reason, node=self.ledger.node)
        self._deliver_unavailable(items)
        for waiter, rid in service.abandon_waiters():
            answer_unavailable(waiter, rid)
        self.ledger.reset()
        # Grants not delivered are still to be given back once the database is
        # back; the waiters to cancel were all just answered and dropped.
        self._cancel.clear()

    async def _probe(self) -> None:
        """Try the database again; serve again once it answers."""
        try:
            async with self._lock:
                await trio.to_thread.run_sync(self._reconnect)
        except Unavailable:
            return
        service = self.server.service
        service.writable = True
        since = self.server.state.unavailable_since
        self.server.state.unavailable_since = None
        log.warning("state_available", node=self.ledger.node, unavailable_since=since)

    def _reconnect(self, forget: bool = True) -> None:
        """(Worker thread.)  A new connection; with ``forget``, this node's old
        rows in the queue cleared (its waiters were answered UNAVAILABLE)."""
        try:
            conn = connect_node(self._dsn)
        except psycopg.Error as exc:
            raise failed(exc) from None
        self.ledger.use_connection(conn).close()
        if forget:
            self.ledger.forget_node(self.ledger.database_time(), self.ledger.node)
