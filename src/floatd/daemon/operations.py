"""What the admin asks of a running daemon (``floatd status | leases | revoke |
users unassign | policy explain``), as methods of the server.

On a cluster node each of them runs in the decider's worker thread, between
its batches (floatd.daemon.cluster), since only that thread may use the
ledger while the node serves; the status and metrics read the node's view as
of its last refresh instead, so a scrape never waits for the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from floatd import __version__
from floatd.daemon.admin import lease_row

if TYPE_CHECKING:
    from floatd.core.service import LeaseService
    from floatd.daemon.cluster import ClusterNode
    from floatd.daemon.committer import Batch, GroupCommitter
    from floatd.daemon.licensing import Licensing
    from floatd.daemon.recovery import StateKeeper


class AdminOperations:
    """Mixed into floatd.daemon.server.Server, which provides what is declared here."""

    service: LeaseService
    node: ClusterNode | None
    committer: GroupCommitter
    licensing: Licensing
    state: StateKeeper
    server_id: str
    started_at: float
    ports: list[tuple[str, int]]

    def clock(self) -> float:
        raise NotImplementedError

    def _flush(self, urgent: bool = True) -> Batch | None:
        raise NotImplementedError

    @property
    def connections(self) -> int:
        raise NotImplementedError

    async def revoke(self, lease_id: str) -> dict[str, Any]:
        """The admin's ``floatd revoke``: end a lease now and free its seat.
        Answered once the deletion is durable, like a release."""
        node = self.node
        if node is not None:
            ledger = node.ledger
            ended = await node.call(lambda: self.service.revoke(lease_id, ledger.database_time()))
            return lease_row(ended)
        lease = self.service.revoke(lease_id, self.clock())
        batch = self._flush()
        if batch is not None:
            await batch.wait()
        return lease_row(lease)

    async def end_user(self, email: str, product: str) -> list[dict[str, Any]]:
        """``floatd users unassign``: end that user's leases of the product.
        Borrowed ones run to their end: their certificates are valid offline."""
        node = self.node
        if node is not None:
            ledger = node.ledger
            return await node.call(lambda: self._end_user(email, product, ledger.database_time()))
        rows = self._end_user(email, product, self.clock())
        batch = self._flush()
        if batch is not None:
            await batch.wait()
        return rows

    def _end_user(self, email: str, product: str, now: float) -> list[dict[str, Any]]:
        ended = [
            lease
            for lease in list(self.service.ledger.leases())
            if lease.product == product and lease.user == email and not lease.borrowed
        ]
        for lease in ended:
            self.service.revoke(lease.id, now)
        return [lease_row(lease) for lease in ended]

    async def lease_rows(self, product: str | None = None) -> list[dict[str, Any]]:
        if self.node is not None:
            return await self.node.call(lambda: self._lease_rows(product))
        return self._lease_rows(product)

    def _lease_rows(self, product: str | None) -> list[dict[str, Any]]:
        leases = [
            lease
            for lease in self.service.ledger.leases()
            if product is None or lease.product == product
        ]
        leases.sort(key=lambda le: (le.product, le.granted_at))
        return [lease_row(lease) for lease in leases]

    def status_document(self) -> dict[str, Any]:
        """``GET /status`` and ``floatd status``."""
        now = self.clock()
        ent = self.service.entitlement
        failure = self.committer.failure
        return {
            "version": __version__,
            "server_id": self.server_id,
            "uptime": round(now - self.started_at, 3),
            "started_at": self.started_at,
            "activation": {
                "state": self.service.activation_state(now),
                "mode": "online" if self.licensing.online else "offline",
                "refresh_problem": self.licensing.refresh_problem,
                "entitlement_id": ent.id if ent else None,
                "license": ent.license if ent else None,
                "customer": ent.customer if ent else None,
                "not_before": ent.not_before if ent else None,
                "not_after": ent.not_after if ent else None,
                "refresh_by": ent.refresh_by if ent else None,
            },
            "products": self.products_overview(),
            "state": {
                "writable": self.service.writable,
                "unavailable_since": self.state.unavailable_since,
                "reason": None if failure is None else failure.message,
            },
            "connections": self.connections,
            "leases": self.lease_count(),
            "policy": self._policy_summary(),
            "listen": [f"{h}:{p}" for h, p in self.ports],
            **self._cluster_section(),
        }

    def _cluster_section(self) -> dict[str, Any]:
        """On a cluster node, ``cluster``: the fingerprint, this node, the registry."""
        node = self.node
        if node is None:
            return {}
        return {
            "cluster": {
                "fingerprint": self.server_id,
                "node": node.ledger.node,
                "serving": node.serving.is_set(),
                "nodes": node.nodes,
            }
        }

    def products_overview(self) -> list[dict[str, Any]]:
        """Seats per product (a cluster node's view as of its last refresh: a
        status page must not wait for the database)."""
        node = self.node
        return node.overview if node is not None else self.service.products_overview()

    def lease_count(self) -> int:
        node = self.node
        return node.leases if node is not None else len(self.service.ledger)

    def _policy_summary(self) -> dict[str, Any]:
        policy = self.service.policy
        if policy is None:
            return {"file": None}
        return {"file": policy.source, "rules": len(policy.rules), "groups": sorted(policy.groups)}

    async def explain(self, **who: Any) -> dict[str, Any]:
        """``floatd policy explain``: what an acquire would get now, and why."""
        node = self.node
        if node is not None:
            ledger = node.ledger
            return await node.call(lambda: self.service.explain(ledger.database_time(), **who))
        result = self.service.explain(self.clock(), **who)
        self._flush()  # expiries met on the way
        return result
