"""What the admin socket, the status endpoint and the metrics may see of the
daemon: narrow, typed views instead of the server itself.

Each of those modules is handed the running :class:`~floatd.daemon.server.Server`
but typed as one of these protocols, so mypy holds them to what is listed here:
reads of counters and documents, and the handful of admin operations.  None
of them can reach a connection, the committer's queue or a listener.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from floatd.core.service import LeaseService
from floatd.daemon.metrics import RequestStats

if TYPE_CHECKING:
    from floatd.daemon.cluster import ClusterNode


class CommitFigures(Protocol):
    """The committer's running totals."""

    @property
    def commits(self) -> int: ...

    @property
    def changes_committed(self) -> int: ...

    @property
    def apply_seconds(self) -> float: ...

    @property
    def last_cut(self) -> float: ...


class StatusView(Protocol):
    """Read-only: what /healthz, /status and /metrics report."""

    @property
    def service(self) -> LeaseService: ...

    @property
    def started_at(self) -> float: ...

    @property
    def connections(self) -> int: ...

    @property
    def stats(self) -> RequestStats: ...

    @property
    def committer(self) -> CommitFigures: ...

    def clock(self) -> float: ...

    def status_document(self) -> dict[str, Any]: ...

    def products_overview(self) -> list[dict[str, Any]]: ...

    def lease_count(self) -> int: ...

    @property
    def node(self) -> ClusterNode | None: ...


class AdminOps(Protocol):
    """What `floatd status | leases | revoke | reload | clock reset | users
    unassign` do through the admin socket."""

    def status_document(self) -> dict[str, Any]: ...

    async def lease_rows(self, product: str | None = None) -> list[dict[str, Any]]: ...

    async def revoke(self, lease_id: str) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def reset_clock(self) -> dict[str, Any]: ...

    async def end_user(self, email: str, product: str) -> list[dict[str, Any]]: ...

    async def explain(self, **who: Any) -> dict[str, Any]: ...
