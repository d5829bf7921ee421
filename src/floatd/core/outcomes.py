"""The one place an outcome becomes its audit record, its log line and its counts.

Every lease event (granted, renewed, released, expired, revoked) and every
refusal the service decides passes through a :class:`Recorder`: the audit
record goes into the ledger's journal, so it is committed in the same batch as
the change it describes; the log line is written (or left to the store's
writer, which logs lease events once they are committed); the counters the
metrics read are bumped.  Answers on the wire are built by the service; what
an outcome leaves behind besides the answer is decided here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, Protocol

from floatd.core.changes import Audit
from floatd.core.ledger import Ledger
from floatd.core.limits import RefusalSampler, limit_key
from floatd.core.messages import Acquire, Release, Renew, Request
from floatd.core.seats import Claim, Lease

_tuple_new = tuple.__new__

#: The metrics label of requests for products the entitlement does not have.
OTHER_PRODUCT = "(not entitled)"


class LogFn(Protocol):
    def __call__(self, event: str, level: str = "info", **fields: Any) -> None: ...

    def lease(
        self,
        event: str,
        lease_id: str,
        product: str,
        fingerprint: str,
        instance: str | None,
        user: str | None,
        peer: str | None,
        /,
    ) -> None:
        """A lease event with the fields every one carries (the hot path)."""


class _NoLog:
    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        return None

    def lease(self, event: str, /, *fields: str | None) -> None:
        return None


class Recorder:
    def __init__(self, ledger: Ledger, log: LogFn | None = None) -> None:
        self.ledger = ledger
        self.log: LogFn = log or _NoLog()
        #: Lease events are logged by the store's writer once committed, from
        #: their audit records (floatd serve with JSON logs; see
        #: floatd.store.writer), not here.  The server keeps this in step with
        #: the log settings.
        self.store_logs_leases = False
        #: Refusals past a few a minute per (address, code, product) are
        #: counted and folded into one record (see fold_refusals).
        self.refusal_sampler = RefusalSampler()
        #: Lease events by (event, product), and acquire refusals by
        #: (product, code): cheap counters the metrics endpoint reads.
        #: (Plain dicts: a Counter's ``+=`` took twice as long, on every grant
        #: and renewal.)
        self.events: dict[tuple[str, str], int] = {}
        self.refusals: dict[tuple[str, str], int] = {}
        #: POLICY_DENIED refusals by (product, rule).
        self.policy_refusals: dict[tuple[str, str], int] = {}

    # --- lease events --------------------------------------------------------

    def lease_event(self, event: str, lease: Lease, ts: float) -> None:
        """Audit and log a lease event whose line holds the lease's fields alone."""
        by_store = self.store_logs_leases
        # record()'s two lines, inline: every grant and renewal passes here.
        self.ledger.journal.append(audit_record(event, lease, ts, by_store))
        key, events = (event, lease.product), self.events
        events[key] = events.get(key, 0) + 1
        if not by_store:
            self.log.lease(
                f"lease_{event}",
                lease.id,
                lease.product,
                lease.fingerprint,
                lease.instance,
                lease.user,
                lease.peer,
            )

    def record(self, event: str, lease: Lease, ts: float, log: bool = False) -> None:
        """Audit a lease event; ``log``: the store's writer logs its line."""
        self.ledger.journal.append(audit_record(event, lease, ts, log))
        _count(self.events, (event, lease.product))

    def expired_while_down(self, lease: Lease) -> None:
        self.record("expired", lease, lease.expires_at)
        self.log("lease_expired", while_down=True, **lease_fields(lease))

    def granted_after_wait(self, lease: Lease) -> None:
        self.record("granted", lease, lease.granted_at)
        self.log("lease_granted", waited=True, **lease_fields(lease))

    # --- refusals -------------------------------------------------------------

    def refused(
        self,
        req: Request,
        code: str,
        now: float,
        peer: str | None,
        entitled: Container[str],
        rule: str | None = None,
    ) -> None:
        """Log and audit a refused lease operation (info and ping refusals are
        not lease events); ``entitled``: the products the entitlement has;
        ``rule``: the kind of policy rule behind a POLICY_DENIED."""
        if isinstance(req, Acquire):
            record = Audit(
                now,
                "refused",
                req.product,
                fingerprint=req.fingerprint,
                instance=req.instance,
                user=req.user,
                hostname=req.hostname,
                peer=peer,
                code=code,
                rule=rule,
            )
        elif isinstance(req, (Renew, Release)):
            # Only the id is known: a refused renew or release never reveals
            # whose lease the id names (it may not be the caller's).
            record = Audit(now, "refused", None, lease=req.lease, peer=peer, code=code)
        else:
            return
        product = record.product
        known = product if product is not None and product in entitled else None
        # Counters are labelled with entitled products only: any LAN host can
        # name made-up products, and each label is a series in the monitoring.
        label = known or ("" if product is None else OTHER_PRODUCT)
        _count(self.events, ("refused", label))
        if product is not None:
            _count(self.refusals, (label, code))
        if rule is not None:
            _count(self.policy_refusals, (label, rule))
        if not self.refusal_sampler.note((limit_key(peer), code, known), now):
            return  # a flood: counted, and folded into one record (fold_refusals)
        self.ledger.journal.append(record)
        self.log(
            "lease_refused",
            op=type(req).__name__.lower(),
            code=code,
            lease=record.lease,
            product=product,
            fingerprint=record.fingerprint,
            user=record.user,
            peer=peer,
            **({"rule": rule} if rule is not None else {}),
        )

    def wait_refused(self, claim: Claim, code: str, now: float) -> None:
        """A queued acquire that got no seat in time (or lost its product)."""
        product = claim.product
        _count(self.events, ("refused", product))
        _count(self.refusals, (product, code))
        self.ledger.journal.append(
            Audit(
                now,
                "refused",
                product,
                fingerprint=claim.fingerprint,
                instance=claim.instance,
                user=claim.user,
                hostname=claim.hostname,
                peer=claim.peer,
                code=code,
            )
        )
        self.log(
            "lease_refused",
            op="acquire",
            code=code,
            product=product,
            fingerprint=claim.fingerprint,
            user=claim.user,
            peer=claim.peer,
            waited=True,
        )

    def fold_refusals(self, now: float) -> None:
        """One audit record and one log line per (address, code, product) and
        window for the refusals the sampler only counted."""
        for (address, code, product), count, since in self.refusal_sampler.take_due(now):
            record = Audit(since, "refused", product, peer=address, code=code, repeats=count)
            self.ledger.journal.append(record)
            self.log(
                "lease_refusals_folded",
                "warning",
                address=address,
                code=code,
                product=product,
                count=count,
                since=since,
            )


def _count(counts: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
    counts[key] = counts.get(key, 0) + 1


def audit_record(event: str, lease: Lease, ts: float, log: bool = False) -> Audit:
    # Every field given, through tuple.__new__: a NamedTuple's own __new__ is a
    # Python function, and this runs for every grant and renewal.
    return _tuple_new(
        Audit,
        (
            ts,
            event,
            lease.product,
            lease.id,
            lease.fingerprint,
            lease.instance,
            lease.user,
            lease.hostname,
            lease.peer,
            None,  # code
            lease.seat,
            lease.granted_at,
            log,
            None,  # repeats
            None,  # rule
        ),
    )


def lease_fields(lease: Lease) -> dict[str, Any]:
    return {
        "lease": lease.id,
        "product": lease.product,
        "fingerprint": lease.fingerprint,
        "instance": lease.instance,
        "user": lease.user,
        "peer": lease.peer,
    }
