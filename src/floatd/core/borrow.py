"""Borrow certificates: a seat taken offline, provable with the vendor's key alone.

The chain of signatures: the vendor signs the entitlement, which names the
server's own key (``server_key``); the server signs the borrow with that key
and embeds the entitlement in the certificate.  So a laptop that trusts only
the vendor's public key can check, with no network, that this server was
licensed, that this borrow came from it, and that it is for this machine and
still running.

No I/O here, and time is passed in: the server's side builds and signs
(:func:`sign_borrow`), the client library's side verifies
(:func:`verify_borrow`) in the order of the contract, each failure its own
:class:`~floatd.errors.BorrowInvalid` subclass naming the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from floatd.core.entitlement import (
    Entitlement,
    _Fields,
    _unpack_map,
    check_product,
    format_public_key,
    key_id,
    open_envelope,
    parse_public_key,
    sign_envelope,
    verify_entitlement,
)
from floatd.core.policy import Policy
from floatd.core.seats import Lease
from floatd.errors import (
    BadRequest,
    BorrowClockBack,
    BorrowEnded,
    BorrowForged,
    BorrowMismatch,
    BorrowNotAllowed,
    BorrowUnreadable,
    BorrowUntrusted,
    BorrowWrongMachine,
    EntitlementError,
    UnknownProduct,
)

KIND_BORROW = "BORROW"
SIGNING_DOMAIN = b"floatd-borrow-v1\x00"


@dataclass(frozen=True)
class Borrow:
    """A verified borrow: what the application may use, and until when."""

    lease: str
    server: str
    entitlement: str
    product: str
    name: str
    features: Mapping[str, Any]
    metadata: Mapping[str, Any]
    fingerprint: str
    instance: str | None
    user: str | None
    issued_at: int
    not_after: int

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.not_after - now)


def borrow_payload(
    ent: Entitlement,
    product: str,
    lease: str,
    fingerprint: str,
    instance: str | None,
    user: str | None,
    issued_at: int,
    not_after: int,
) -> dict[str, Any]:
    """The payload the server signs for one borrowed lease."""
    terms = ent.product(product)
    assert terms is not None, "a borrow is of an entitled product"
    return {
        "v": 1,
        "lease": lease,
        "server": ent.server,
        "entitlement": ent.id,
        "product": product,
        "name": terms.name,
        "features": dict(terms.features),
        "metadata": dict(terms.metadata),
        "fingerprint": fingerprint,
        "instance": instance,
        "user": user,
        "issued_at": issued_at,
        "not_after": not_after,
    }


def sign_borrow(key: Ed25519PrivateKey, payload: Mapping[str, Any], entitlement: str) -> str:
    """The armored certificate: the payload signed with the server's key, and
    the armored entitlement the server serves under."""
    return sign_envelope(key, KIND_BORROW, SIGNING_DOMAIN, payload, entitlement=entitlement)


def verify_borrow(
    text: str,
    vendor_keys: Mapping[str, Ed25519PublicKey],
    fingerprint: str,
    now: float,
    seen: float | None = None,
    allowed_offset: float = 300.0,
) -> Borrow:
    """Check a certificate offline, in the contract's order (borrow.md):
    the entitlement, the server's signature, their binding, this machine, the
    time.  ``seen``: the latest time this machine has already seen for this
    certificate (a clock set back before it is caught)."""
    try:
        f, kid, body, sig = open_envelope(text, KIND_BORROW, "borrow certificate")
        ent_text = f.text("entitlement")
        p = _Fields(_unpack_map(body, "borrow payload"), "borrow payload")
        payload = {
            "lease": p.text("lease"),
            "server": p.text("server"),
            "entitlement": p.text("entitlement"),
            "product": p.text("product"),
            "name": p.text("name"),
            "features": p.get("features", (dict,)),
            "metadata": p.get("metadata", (dict,)),
            "fingerprint": p.text("fingerprint"),
            "instance": p.text("instance", None, nullable=True),
            "user": p.text("user", None, nullable=True),
            "issued_at": p.time("issued_at"),
            "not_after": p.time("not_after"),
        }
    except EntitlementError as exc:
        raise BorrowUnreadable(f"the borrow certificate cannot be read: {exc}") from None
    # 1. The entitlement inside, against the vendor keys this application trusts.
    # Its date is checked with the borrow's own, at step 5: a clock set back is
    # then named as such, not as an entitlement that does not verify.
    try:
        ent = verify_entitlement(ent_text, vendor_keys, None, now, math.inf)
    except EntitlementError as exc:
        raise BorrowUntrusted(f"the entitlement in the borrow does not verify: {exc}") from None
    # 2. The server key it names signed this borrow.
    if ent.server_key is None:
        raise BorrowForged("the entitlement names no server key: nothing could sign a borrow")
    server_key = parse_public_key(ent.server_key)
    if key_id(server_key) != kid:
        raise BorrowForged("the borrow was not signed by the server the entitlement names")
    try:
        server_key.verify(sig, SIGNING_DOMAIN + body)
    except InvalidSignature:
        raise BorrowForged("the borrow's signature does not verify: it was altered") from None
    # 3. It was issued under that entitlement, for one of its products.
    if payload["server"] != ent.server or payload["entitlement"] != ent.id:
        raise BorrowMismatch("the borrow names another server or entitlement than it carries")
    if ent.product(payload["product"]) is None:
        raise BorrowMismatch(f"the entitlement has no product {payload['product']!r}")
    # 4. This machine.
    if payload["fingerprint"] != fingerprint:
        raise BorrowWrongMachine("the borrow is for another machine")
    # 5. Its time, and a clock that was not set back to stretch it.
    if now < max(payload["issued_at"], ent.issued_at) - allowed_offset:
        raise BorrowClockBack("this machine's clock is before the borrow was issued")
    # The slack forgives NTP's small corrections; the stored time only moves
    # forward, so repeated small steps back cannot add up to a stretch.
    if seen is not None and now < seen - allowed_offset:
        raise BorrowClockBack("this machine's clock was set back since the borrow was last used")
    if now >= payload["not_after"]:
        raise BorrowEnded("the borrow has ended")
    return Borrow(**payload)


# --- the server's side: may this lease be borrowed, and until when ------------------


def borrow_rules(
    ent: Entitlement,
    key: Ed25519PrivateKey | None,
    policy: Policy | None,
    borrowed_seats: Callable[[str], int],
    duration: int,
    now: float,
) -> Callable[[Lease], float]:
    """The check the ledger runs on the authorized lease (borrow.md): refuses
    with BORROW_NOT_ALLOWED (``reason`` product, server_key or policy) or
    BAD_REQUEST for a duration out of range, else returns when the borrow
    ends: ``now + duration``, cut at the license's and the product's end."""

    def decide(lease: Lease) -> float:
        terms = ent.product(lease.product)
        if terms is None:
            raise UnknownProduct(f"unknown product {lease.product!r}")
        check_product(terms, now)
        if terms.borrow_max <= 0:
            raise BorrowNotAllowed(
                f"{lease.product!r} may not be borrowed under this license", reason="product"
            )
        if key is None or ent.server_key != format_public_key(key.public_key()):
            raise BorrowNotAllowed(
                "this server's entitlement names no key of this server, so it can sign no"
                " borrow: activate again (floatd activate) to get one that does",
                reason="server_key",
            )
        limit = terms.borrow_max
        rules = policy.for_product(lease.product) if policy is not None else None
        if rules is not None and rules.borrow_max is not None:
            limit = min(limit, rules.borrow_max)
        if duration > limit:
            raise BadRequest(
                f"field 'duration' must be 1..{limit} seconds for {lease.product!r}",
                field="duration",
            )
        if rules is not None and rules.borrow_lowwater and not lease.borrowed:
            cap = terms.seats if not terms.unlimited else None
            if (
                cap is not None
                and cap - (borrowed_seats(lease.product) + 1) < rules.borrow_lowwater
            ):
                raise BorrowNotAllowed(
                    f"the site's policy keeps the last {rules.borrow_lowwater} seats of"
                    f" {lease.product!r} from being borrowed",
                    reason="policy",
                )
        ends = [now + duration, *(t for t in (ent.not_after, terms.not_after) if t is not None)]
        return float(int(min(ends)))

    return decide
