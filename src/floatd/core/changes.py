"""What a decision leaves to be made durable: the change records of the journal.

The ledger (:mod:`floatd.core.ledger`) and the service append these as they
decide; the store writes a batch of them as one transaction
(:mod:`floatd.store.sqlite`).  Plain data, no I/O: the records describe a
decision, and any store (SQLite today) can apply them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from floatd.core.seats import Lease


class PutLease(NamedTuple):
    lease: Lease


class SetExpiry(NamedTuple):
    lease_id: str
    expires_at: float


class DeleteLease(NamedTuple):
    lease_id: str


class SetMeta(NamedTuple):
    """Bookkeeping written with the leases: the commit time, the clean-stop marker."""

    key: str
    value: str


class Audit(NamedTuple):
    """One audit record, written in the same transaction as the change it
    describes, so the audit never claims what the leases table does not hold.

    ``ts`` is when the event took effect: an expiry is dated at the lease's
    ``expires_at`` even when the server only noticed it later (say, after
    being down), which is what a usage report needs.  ``granted_at`` rides on
    every record of a lease, so an interval can be rebuilt from its last
    record alone."""

    ts: float
    event: str  # granted, renewed, released, expired, revoked, refused
    product: str | None
    lease: str | None = None
    fingerprint: str | None = None
    instance: str | None = None
    user: str | None = None
    hostname: str | None = None
    peer: str | None = None
    code: str | None = None
    seat: tuple[str, ...] | None = None
    granted_at: float | None = None
    # Not stored: the writer logs this event's line once it is committed, in
    # place of the service (see floatd.store.writer).  Only for the events whose line
    # carries nothing but the record's own fields.
    log: bool = False
    #: How many refusals one record stands for (a flood folded into one record,
    #: see floatd.core.limits.RefusalSampler); None: just this one.
    repeats: int | None = None
    #: Which kind of policy rule refused (exclude, include, max), for POLICY_DENIED.
    rule: str | None = None


def audit_fields(a: Audit) -> tuple[object, ...]:
    """What a store keeps of an audit record, in its columns' order: ts, event,
    product, lease, fingerprint, instance, user, hostname, peer, code, seat,
    granted_at, repeats, rule (``seat`` as the tuple: each store encodes it)."""
    return (
        a.ts,
        a.event,
        a.product,
        a.lease,
        a.fingerprint,
        a.instance,
        a.user,
        a.hostname,
        a.peer,
        a.code,
        a.seat,
        a.granted_at,
        a.repeats,
        a.rule,
    )


class PruneAudit(NamedTuple):
    """Drop up to ``limit`` audit records older than ``before`` (retention)."""

    before: float
    limit: int = 50_000


Change = PutLease | SetExpiry | DeleteLease | SetMeta | Audit | PruneAudit
# Changes are NamedTuples rather than frozen dataclasses: every request makes one
# or two, and a frozen dataclass pays an object.__setattr__ per field (an audit
# record has twelve), which showed up as several microseconds per renewal.


@dataclass
class Coalesced:
    """A batch reduced to its net effect: each lease written once, at most."""

    puts: dict[str, Lease]
    expiries: dict[str, float]
    deletes: set[str]
    meta: dict[str, str]
    audit: list[Audit]
    prune: PruneAudit | None = None


def coalesce(changes: Iterable[Change]) -> Coalesced:
    """Net effect of changes applied in order.  A put writes the lease object as
    it is *now*, which may already hold a later renewal: the disk may run ahead of
    the batch, never behind it."""
    out = Coalesced({}, {}, set(), {}, [])
    for change in changes:
        if isinstance(change, Audit):
            out.audit.append(change)
        elif isinstance(change, SetExpiry):
            if change.lease_id not in out.puts:
                out.expiries[change.lease_id] = change.expires_at
        elif isinstance(change, PutLease):
            out.puts[change.lease.id] = change.lease
        elif isinstance(change, DeleteLease):
            out.puts.pop(change.lease_id, None)
            out.expiries.pop(change.lease_id, None)
            out.deletes.add(change.lease_id)
        elif isinstance(change, PruneAudit):
            out.prune = change
        else:
            out.meta[change.key] = change.value
    return out


def extend_after_crash(leases: Iterable[Lease], last_cut: float, window: float) -> list[Lease]:
    """Cover renewals that were acknowledged but not yet written when we crashed.

    A renewal is answered before its commit only while the last completed
    commit was cut at most ``window`` seconds earlier, so any renewal lost in a
    crash was made before ``last_cut + window`` and extends its lease to at most
    ``last_cut + window + duration``.  Every lease still alive at ``last_cut``
    may have had one; extending them to that bound keeps every acknowledged
    renewal good, at the price of holding a dead client's seat up to one lease
    duration longer after a crash.  Returns the leases it extended.
    """
    extended = []
    for lease in leases:
        if lease.expires_at > last_cut and not lease.borrowed:  # a borrow is never lazy
            bound = last_cut + window + lease.duration
            if bound > lease.expires_at:
                lease.expires_at = bound
                extended.append(lease)
    return extended
