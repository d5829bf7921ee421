"""Typed requests and their validation against the protocol contract.

A decoded frame is an untrusted dict.  ``parse_request`` turns it into one of the
frozen request types below or raises the error the contract names
(``BAD_REQUEST`` or ``UNKNOWN_OP``).  Unknown fields are ignored for forward
compatibility.  Every string is bounded here, so nothing downstream has to
re-check sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

from floatd.core.records import NO_META, no_meta, record
from floatd.errors import BadRequest, FloatdError, UnknownOp

MAX_ID = 2**63
MAX_WAIT = 3600.0
# Bounds the contract leaves open; generous for real clients, tight for abuse.
MAX_PRODUCT = 128
MAX_SECRET = 1024
FINGERPRINT_MIN = 8
FINGERPRINT_MAX = 128
INSTANCE_MAX = 128
NAME_MAX = 256  # user and host names
MAX_VERSIONS = 64
MAX_META_KEYS = 16
MAX_META_KEY = 64
MAX_META_VALUE = 1024


@record
class Hello:
    id: int
    versions: tuple[int, ...]
    client: str
    token: str | None = None


@record
class Acquire:
    id: int
    product: str
    fingerprint: str
    instance: str | None = None
    user: str | None = None
    password: str | None = None
    hostname: str | None = None
    meta: Mapping[str, str] = field(default_factory=no_meta)
    wait: float = 0.0


@record
class Renew:
    id: int
    lease: str
    token: str


@record
class Release:
    id: int
    lease: str
    token: str


@record
class Borrow:
    id: int
    lease: str
    token: str
    duration: int


@record
class Info:
    id: int
    product: str


@record
class Ping:
    id: int


Request = Hello | Acquire | Renew | Release | Borrow | Info | Ping
#: The longest borrow any request may ask for (the product's borrow_max is
#: checked by the service): ten years, as an entitlement's borrow_max.
MAX_BORROW = 10 * 366 * 86400


def request_id(obj: dict[str, Any]) -> int | None:
    """The request's id if it is valid, else None (errors then carry ``id: nil``)."""
    rid = obj.get("id")
    if type(rid) is int and 0 <= rid < MAX_ID:
        return rid
    return None


def _str(obj: dict[str, Any], name: str, lo: int, hi: int, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadRequest(f"missing field {name!r}", field=name)
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} must be a string", field=name)
    if not lo <= len(value) <= hi:
        raise BadRequest(f"field {name!r} must be {lo}..{hi} characters", field=name)
    return value


def _req_str(obj: dict[str, Any], name: str, lo: int, hi: int) -> str:
    value = _str(obj, name, lo, hi, required=True)
    assert value is not None
    return value


def _wait(obj: dict[str, Any]) -> float:
    value = obj.get("wait")
    if value is None:
        return 0.0
    if type(value) not in (int, float) or not math.isfinite(value):
        raise BadRequest("field 'wait' must be a number of seconds", field="wait")
    if not 0 <= value <= MAX_WAIT:
        raise BadRequest(f"field 'wait' must be 0..{MAX_WAIT:g}", field="wait")
    return float(value)


def _meta(obj: dict[str, Any]) -> Mapping[str, str]:
    value = obj.get("meta")
    if value is None or value == {}:
        return NO_META
    if not isinstance(value, dict):
        raise BadRequest("field 'meta' must be a map", field="meta")
    if len(value) > MAX_META_KEYS:
        raise BadRequest(f"field 'meta' has more than {MAX_META_KEYS} keys", field="meta")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise BadRequest("field 'meta' must map strings to strings", field="meta")
        if len(k) > MAX_META_KEY or len(v) > MAX_META_VALUE:
            raise BadRequest("field 'meta' has an oversized key or value", field="meta")
    return dict(value)


def _hello(rid: int, obj: dict[str, Any]) -> Hello:
    versions = obj.get("versions")
    if (
        not isinstance(versions, list)
        or not 1 <= len(versions) <= MAX_VERSIONS
        or any(type(v) is not int for v in versions)
    ):
        raise BadRequest("field 'versions' must be a non-empty list of ints", field="versions")
    return Hello(
        id=rid,
        versions=tuple(versions),
        client=_req_str(obj, "client", 0, 128),
        token=_str(obj, "token", 0, MAX_SECRET, required=False),
    )


def _acquire(rid: int, obj: dict[str, Any]) -> Acquire:
    """An acquire as most come: strings in bounds, no meta, no wait, checked in
    one expression; anything else goes to :func:`_acquire_checked`, whose
    errors name the field at fault (tests/test_messages.py holds the two
    to the same answers)."""
    get = obj.get
    product, fingerprint, instance = get("product"), get("fingerprint"), get("instance")
    user, password, hostname = get("user"), get("password"), get("hostname")
    if (
        type(product) is str
        and 1 <= len(product) <= MAX_PRODUCT
        and type(fingerprint) is str
        and FINGERPRINT_MIN <= len(fingerprint) <= FINGERPRINT_MAX
        and (instance is None or (type(instance) is str and 1 <= len(instance) <= INSTANCE_MAX))
        and (user is None or (type(user) is str and len(user) <= NAME_MAX))
        and (password is None or (type(password) is str and len(password) <= MAX_SECRET))
        and (hostname is None or (type(hostname) is str and len(hostname) <= NAME_MAX))
        and get("meta") is None
        and get("wait") is None
    ):
        return Acquire(rid, product, fingerprint, instance, user, password, hostname)
    return _acquire_checked(rid, obj)


def _acquire_checked(rid: int, obj: dict[str, Any]) -> Acquire:
    return Acquire(
        id=rid,
        product=_req_str(obj, "product", 1, MAX_PRODUCT),
        fingerprint=_req_str(obj, "fingerprint", FINGERPRINT_MIN, FINGERPRINT_MAX),
        instance=_str(obj, "instance", 1, INSTANCE_MAX, required=False),
        user=_str(obj, "user", 0, NAME_MAX, required=False),
        password=_str(obj, "password", 0, MAX_SECRET, required=False),
        hostname=_str(obj, "hostname", 0, NAME_MAX, required=False),
        meta=_meta(obj),
        wait=_wait(obj),
    )


def _lease_ref(obj: dict[str, Any]) -> tuple[str, str]:
    """A renewal's or release's lease and token; the well-formed case (every
    renewal) in one test, as :func:`_acquire` does."""
    lease, token = obj.get("lease"), obj.get("token")
    if (
        type(lease) is str
        and type(token) is str
        and 1 <= len(lease) <= MAX_SECRET
        and 1 <= len(token) <= MAX_SECRET
    ):
        return lease, token
    return _lease_ref_checked(obj)


def _lease_ref_checked(obj: dict[str, Any]) -> tuple[str, str]:
    return _req_str(obj, "lease", 1, MAX_SECRET), _req_str(obj, "token", 1, MAX_SECRET)


def _renew(rid: int, obj: dict[str, Any]) -> Renew:
    return Renew(rid, *_lease_ref(obj))


def _release(rid: int, obj: dict[str, Any]) -> Release:
    return Release(rid, *_lease_ref(obj))


def _borrow(rid: int, obj: dict[str, Any]) -> Borrow:
    duration = obj.get("duration")
    if type(duration) is not int or not 1 <= duration <= MAX_BORROW:
        raise BadRequest(
            f"field 'duration' must be whole seconds, 1..{MAX_BORROW}", field="duration"
        )
    return Borrow(rid, *_lease_ref(obj), duration)


def _info(rid: int, obj: dict[str, Any]) -> Info:
    return Info(id=rid, product=_req_str(obj, "product", 1, MAX_PRODUCT))


def _ping(rid: int, obj: dict[str, Any]) -> Ping:
    return Ping(id=rid)


_PARSERS: dict[str, Callable[[int, dict[str, Any]], Request]] = {
    "hello": _hello,
    "acquire": _acquire,
    "renew": _renew,
    "release": _release,
    "borrow": _borrow,
    "info": _info,
    "ping": _ping,
}


def parse_request(obj: dict[str, Any]) -> Request:
    """Validate a decoded frame; raises BadRequest or UnknownOp."""
    rid = request_id(obj)
    if rid is None:
        raise BadRequest("field 'id' must be an int in 0..2**63-1", field="id")
    op = obj.get("op")
    if not isinstance(op, str):
        raise BadRequest("field 'op' must be a string", field="op")
    parser = _PARSERS.get(op)
    if parser is None:
        raise UnknownOp(f"unknown op {op[:64]!r}")
    return parser(rid, obj)


def ok(rid: int, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, **fields}


def failure(rid: int | None, error: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": error}


@record
class Answer:
    """The service's answer to one request: the map that goes on the wire, and
    what the shell needs to know of it without looking inside (the refusal's
    code, the lease a grant created, to give back if the answer cannot be sent)."""

    wire: dict[str, Any]
    code: str | None = None
    granted: str | None = None


def answer(rid: int, **fields: Any) -> Answer:
    return Answer({"id": rid, "ok": True, **fields})


def refusal(rid: int | None, error: FloatdError) -> Answer:
    return Answer(failure(rid, error.to_wire()), error.code)
