"""The records of the seat pool: products' terms as the pool sees them, claims,
leases, waiters, and the key two leases must share to share a seat.

Plain data (and one pure function), apart from the pool's logic
(:mod:`floatd.core.pool`) so that the store, the ledger and the service can
name a lease without pulling in the pool.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from floatd.core.records import no_meta, record
from floatd.errors import BadRequest

PER_MACHINE = "per-machine"
PER_INSTANCE = "per-instance"

SeatKey = tuple[str, ...]


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before), else
    hashlib's.  The digests are the same; hashlib's goes through OpenSSL's
    provider machinery, and under bench/throughput.py's load that made
    renewals about a tenth slower (docs/performance.md) though it times
    alike in a loop of its own."""
    for name in ("_sha2", "_sha256"):
        with suppress(ImportError):
            found: Callable[[bytes], Any] = importlib.import_module(name).sha256
            return found
    return hashlib.sha256


_sha256 = _builtin_sha256()


def hash_token(token: str) -> bytes:
    """Lease tokens are kept only as digests (SHA-256), so the state dir never
    holds one.  Every acquire, renewal and release hashes one."""
    digest: bytes = _sha256(token.encode()).digest()
    return digest


@dataclass(frozen=True, slots=True)
class PoolProduct:
    """What the pool needs to know of a product's terms."""

    code: str
    seats: int | None  # None: unlimited
    duration: float
    strategy: str = PER_MACHINE
    user_locked: bool = False


@record
class Claim:
    """An acquire request as the pool sees it, with the lease id and token chosen."""

    product: str
    fingerprint: str
    lease_id: str
    token_hash: bytes
    instance: str | None = None
    user: str | None = None
    hostname: str | None = None
    meta: Mapping[str, str] = field(default_factory=no_meta)
    peer: str | None = None


@dataclass(slots=True, eq=False)
class Lease:
    id: str
    token_hash: bytes
    product: str
    seat: SeatKey
    fingerprint: str
    instance: str | None
    user: str | None
    hostname: str | None
    meta: Mapping[str, str]
    peer: str | None
    granted_at: float
    expires_at: float
    duration: float
    #: Borrowed for offline use (floatd.core.borrow): it ends at ``expires_at``,
    #: a date a signed certificate carries, so nothing renews, moves or revokes it.
    borrowed: bool = False


@dataclass(slots=True, eq=False)
class Waiter:
    """A queued acquire.  ``done`` with ``lease`` None means it timed out."""

    claim: Claim
    deadline: float
    lease: Lease | None = None
    done: bool = False
    #: Free for the I/O shell to hang its wake-up primitive on.
    handle: object = None


def seat_key(
    terms: PoolProduct, fingerprint: str, instance: str | None, user: str | None
) -> SeatKey:
    """The key two leases must share to share a seat, per the product's strategy."""
    if terms.strategy == PER_INSTANCE:
        if instance is None:
            raise BadRequest(
                "this product is leased per instance: 'instance' is required", field="instance"
            )
        key: SeatKey = (fingerprint, instance)
    else:
        key = (fingerprint,)
    if terms.user_locked:
        if user is None:
            raise BadRequest("this product is user-locked: 'user' is required", field="user")
        key += (user,)
    return key
