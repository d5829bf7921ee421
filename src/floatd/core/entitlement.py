"""Signed entitlements, activation requests and vendor keys (no I/O).

The vendor signs; floatd only verifies, against the public keys its config
trusts.  Verification is all-or-nothing: an entitlement that fails any rule is
rejected with one message and nothing is installed, so a bad file can never
replace a good one.  Time is passed in, which is also what lets the request-time
checks (``check_license``) be unit-tested at exact boundaries.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from floatd.errors import (
    EntitlementError,
    GracePeriodOver,
    LicenseExpired,
    LicenseNotYetValid,
    NotActivated,
)

SIGNING_DOMAIN = b"floatd-entitlement-v1\x00"
KIND_ENTITLEMENT = "ENTITLEMENT"
KIND_REQUEST = "ACTIVATION REQUEST"
MAX_ARMORED = 1024 * 1024
# What a signed entitlement may say, so that every answer built from it fits the
# protocol's 64 KiB frame and every time in it renders as a date (docs/behaviour.md).
MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_SEATS = 10_000_000
MAX_DURATION = 10 * 366 * 86400  # lease_duration and borrow_max: ten years
MAX_USERS = 1_000_000
MAX_NAME = 256
#: metadata and features of one product, msgpack-packed together.
MAX_PRODUCT_VALUES = 32 * 1024
STRATEGIES = ("per-machine", "per-instance")
AUTHORIZATIONS = ("key", "user")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- keys ------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def format_public_key(public: Ed25519PublicKey) -> str:
    return "ed25519:" + base64.b64encode(_raw(public)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64>``; raises ValueError with a short reason."""
    prefix, _, b64 = text.strip().partition(":")
    if prefix != "ed25519" or not b64:
        raise ValueError("expected 'ed25519:<base64>'")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise ValueError("key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def trusted_keys(texts: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for text in texts:
        public = parse_public_key(text)
        keys[key_id(public)] = public
    return keys


def private_key_pem(key: Ed25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key(pem: bytes, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def server_fingerprint(machine_id: str) -> str:
    return hashlib.sha256(("floatd-server-v1:" + machine_id.strip()).encode()).hexdigest()[:32]


# --- armor -------------------------------------------------------------------------


def armor(kind: str, body: bytes) -> str:
    b64 = base64.b64encode(body).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        "\n".join([f"-----BEGIN FLOATD {kind}-----", *lines, f"-----END FLOATD {kind}-----"]) + "\n"
    )


def dearmor(text: str, kind: str) -> bytes:
    if len(text) > MAX_ARMORED:
        raise EntitlementError(f"file is larger than {MAX_ARMORED} bytes")
    begin, end = f"-----BEGIN FLOATD {kind}-----", f"-----END FLOATD {kind}-----"
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise EntitlementError(f"no FLOATD {kind} armor found")
    b64 = re.sub(r"\s+", "", text[start + len(begin) : stop])
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise EntitlementError("armored body is not valid base64") from None


def _unpack_map(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        raise EntitlementError(f"{what} is not valid msgpack") from None
    if not isinstance(obj, dict):
        raise EntitlementError(f"{what} is not a msgpack map")
    return obj


# --- typed field readers ---------------------------------------------------------


class _Fields:
    """Reads typed keys out of an untrusted map, naming the key on failure."""

    def __init__(self, obj: Mapping[str, Any], where: str) -> None:
        self.obj, self.where = obj, where

    def _fail(self, key: str, problem: str) -> EntitlementError:
        return EntitlementError(f"{self.where}: '{key}' {problem}")

    def get(
        self, key: str, types: tuple[type, ...], default: Any = ..., *, nullable: bool = False
    ) -> Any:
        if key not in self.obj:
            if default is ...:
                raise self._fail(key, "is missing")
            return default
        value = self.obj[key]
        if value is None and nullable:
            return None
        # bool is an int in Python but never one on the wire.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self._fail(key, f"has the wrong type ({type(value).__name__})")
        return value

    def text(self, key: str, default: Any = ..., *, nullable: bool = False) -> Any:
        return self.get(key, (str,), default, nullable=nullable)

    def integer(
        self,
        key: str,
        default: Any = ...,
        *,
        nullable: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self.get(key, (int,), default, nullable=nullable)
        if value is not None and minimum is not None and value < minimum:
            raise self._fail(key, f"must be >= {minimum}")
        if value is not None and maximum is not None and value > maximum:
            raise self._fail(key, f"must be <= {maximum}")
        return value

    def time(self, key: str, default: Any = ..., *, nullable: bool = False) -> Any:
        """Unix seconds that a date can show (year 1970 to 9999)."""
        return self.integer(key, default, nullable=nullable, minimum=0, maximum=MAX_TIME)

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self.get(key, (bool,), default))

    def str_list(self, key: str) -> list[str]:
        value = self.get(key, (list,), [])
        if any(not isinstance(v, str) for v in value):
            raise self._fail(key, "must be a list of strings")
        return list(value)

    def str_map(self, key: str) -> dict[str, str]:
        value = self.get(key, (dict,), {})
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in value.items()):
            raise self._fail(key, "must map strings to strings")
        return dict(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}")
        return str(value)


# --- entitlement -------------------------------------------------------------------


@dataclass(frozen=True)
class ProductTerms:
    code: str
    name: str
    seats: int
    lease_duration: int
    strategy: str
    user_locked: bool = False
    authorization: str = "key"
    users: tuple[str, ...] = ()
    max_users: int = 0
    allowed_ips: tuple[IpNetwork, ...] = ()
    not_before: int | None = None
    not_after: int | None = None
    trial: bool = False
    borrow_max: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    features: Mapping[str, bool | int | str] = field(default_factory=dict)

    @property
    def unlimited(self) -> bool:
        return self.seats <= 0


@dataclass(frozen=True)
class Entitlement:
    id: str
    license: str
    customer: str | None
    server: str
    issued_at: int
    not_before: int | None
    not_after: int | None
    refresh_by: int | None
    nonce: str | None
    products: tuple[ProductTerms, ...]
    kid: str
    #: The public key of the one server that may use this entitlement (and
    #: sign borrows under it: floatd.core.borrow); None: any server with the
    #: fingerprint, and no borrowing.
    server_key: str | None = None
    #: How many nodes of a cluster may serve at once (cluster.md).
    nodes: int = 1
    #: The armored text as installed, kept so it can be written back unchanged.
    text: str = field(default="", compare=False, repr=False)

    @functools.cached_property
    def _by_code(self) -> dict[str, ProductTerms]:
        return {p.code: p for p in self.products}

    def product(self, code: str) -> ProductTerms | None:
        return self._by_code.get(code)

    @functools.cached_property
    def dated(self) -> bool:
        """Whether any product has a validity window of its own: if none has,
        a renewal need not look its product up to check one."""
        return any(p.not_before is not None or p.not_after is not None for p in self.products)


def _product(obj: Any, index: int) -> ProductTerms:
    if not isinstance(obj, dict):
        raise EntitlementError(f"products[{index}] is not a map")
    f = _Fields(obj, f"products[{index}]")
    code = f.text("code")
    if not 1 <= len(code) <= 128:
        raise EntitlementError(f"products[{index}]: 'code' must be 1..128 characters")
    ips = []
    for cidr in f.str_list("allowed_ips"):
        try:
            ips.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise EntitlementError(
                f"products[{index}]: bad CIDR {cidr!r} in 'allowed_ips'"
            ) from None
    features = f.get("features", (dict,), {})
    for k, v in features.items():
        if not isinstance(k, str) or not isinstance(v, (bool, int, str)):
            raise EntitlementError(
                f"products[{index}]: 'features' must map str to bool, int or str"
            )
    metadata = f.str_map("metadata")
    if len(msgpack.packb([metadata, features])) > MAX_PRODUCT_VALUES:
        raise EntitlementError(
            f"products[{index}]: 'metadata' and 'features' take more than"
            f" {MAX_PRODUCT_VALUES} bytes together"
        )
    name = f.text("name")
    if len(name) > MAX_NAME:
        raise EntitlementError(f"products[{index}]: 'name' is longer than {MAX_NAME} characters")
    return ProductTerms(
        code=code,
        name=name,
        seats=f.integer("seats", minimum=-1, maximum=MAX_SEATS),
        lease_duration=f.integer("lease_duration", minimum=0, maximum=MAX_DURATION),
        strategy=f.choice("strategy", STRATEGIES),
        user_locked=f.flag("user_locked"),
        authorization=f.choice("authorization", AUTHORIZATIONS, "key"),
        users=tuple(f.str_list("users")),
        max_users=f.integer("max_users", 0, minimum=0, maximum=MAX_USERS),
        allowed_ips=tuple(ips),
        not_before=f.time("not_before", None, nullable=True),
        not_after=f.time("not_after", None, nullable=True),
        trial=f.flag("trial"),
        borrow_max=f.integer("borrow_max", 0, minimum=0, maximum=MAX_DURATION),
        metadata=metadata,
        features=dict(features),
    )


def parse_payload(payload: Mapping[str, Any], kid: str = "", text: str = "") -> Entitlement:
    f = _Fields(payload, "entitlement")
    if f.integer("v") != 1:
        raise EntitlementError("entitlement: unsupported version 'v'")
    raw_products = f.get("products", (list,))
    if not raw_products:
        raise EntitlementError("entitlement: 'products' is empty")
    products = tuple(_product(p, i) for i, p in enumerate(raw_products))
    codes = [p.code for p in products]
    if len(set(codes)) != len(codes):
        raise EntitlementError("entitlement: duplicate product code")
    return Entitlement(
        id=f.text("id"),
        license=f.text("license"),
        customer=f.text("customer", None, nullable=True),
        server=f.text("server"),
        issued_at=f.time("issued_at"),
        not_before=f.time("not_before", None, nullable=True),
        not_after=f.time("not_after", None, nullable=True),
        refresh_by=f.time("refresh_by", None, nullable=True),
        nonce=f.text("nonce", None, nullable=True),
        products=products,
        kid=kid,
        server_key=_key_text(f.text("server_key", None, nullable=True)),
        nodes=f.integer("nodes", 1, minimum=1, maximum=1000),
        text=text,
    )


def _key_text(text: str | None) -> str | None:
    """A server key as the entitlement carries it, checked to be one."""
    if text is not None:
        try:
            parse_public_key(text)
        except (ValueError, TypeError) as exc:
            raise EntitlementError(
                f"entitlement: 'server_key' is not a public key ({exc})"
            ) from None
    return text


def check_email(email: str) -> str:
    """A license user's e-mail as both sides accept it: the authority when it
    assigns one, floatd when a site does (a name one side took and the other
    refused would be a user nobody can manage).  Returns it; ValueError if not."""
    local, at, domain = email.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or len(email) > 254
        or any(c.isspace() or not c.isprintable() for c in email)
    ):
        raise ValueError(f"{email!r} is not an e-mail address")
    return email


def product_payload(code: str, name: str, seats: int, **fields: Any) -> dict[str, Any]:
    """A complete product map for a payload: every key of the contract, defaults
    filled in, so what the vendor side writes never depends on reader defaults."""
    product: dict[str, Any] = {
        "code": code,
        "name": name,
        "seats": seats,
        "lease_duration": 0,
        "strategy": "per-machine",
        "user_locked": False,
        "authorization": "key",
        "users": [],
        "max_users": 0,
        "allowed_ips": [],
        "not_before": None,
        "not_after": None,
        "trial": False,
        "borrow_max": 0,
        "metadata": {},
        "features": {},
    }
    product.update(fields)
    return product


def sign_entitlement(key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> str:
    """The vendor's side: sign a payload map and armor it."""
    return sign_envelope(key, KIND_ENTITLEMENT, SIGNING_DOMAIN, payload)


def sign_envelope(
    key: Ed25519PrivateKey,
    kind: str,
    domain: bytes,
    payload: Mapping[str, Any],
    **extra: Any,
) -> str:
    """The signed envelope entitlements and borrow certificates share: the
    msgpack payload, its Ed25519 signature over ``domain + payload`` and the
    key's id, with ``extra`` fields beside them (unsigned), armored as ``kind``."""
    body = msgpack.packb(dict(payload), use_bin_type=True)
    envelope = {
        "alg": "ed25519",
        "kid": key_id(key.public_key()),
        "payload": body,
        "sig": key.sign(domain + body),
        **extra,
    }
    return armor(kind, msgpack.packb(envelope, use_bin_type=True))


def open_envelope(text: str, kind: str, what: str) -> tuple[_Fields, str, bytes, bytes]:
    """Read (not verify) an envelope of :func:`sign_envelope`: its fields, the
    signing key's id, the payload and the signature; EntitlementError naming
    ``what`` if it is malformed."""
    f = _Fields(_unpack_map(dearmor(text, kind), what), what)
    if f.text("alg") != "ed25519":
        raise EntitlementError(f"{what}: 'alg' is not ed25519")
    return f, f.text("kid"), f.get("payload", (bytes,)), f.get("sig", (bytes,))


def verify_entitlement(
    text: str,
    keys: Mapping[str, Ed25519PublicKey],
    server: str | None,
    now: float,
    allowed_clock_offset: float,
    server_key: str | None = None,
) -> Entitlement:
    """Verify an armored entitlement for this server (fingerprint ``server``,
    public key ``server_key``); raises EntitlementError.  ``server`` None: not
    checked (a laptop checking the entitlement inside a borrow certificate)."""
    _, kid, payload, sig = open_envelope(text, KIND_ENTITLEMENT, "entitlement envelope")
    public = keys.get(kid)
    if public is None:
        raise EntitlementError(f"signed with key {kid[:16]!r}, which is not a trusted vendor key")
    try:
        public.verify(sig, SIGNING_DOMAIN + payload)
    except InvalidSignature:
        raise EntitlementError(
            "signature does not verify: the file was altered or forged"
        ) from None
    ent = parse_payload(_unpack_map(payload, "payload"), kid, text)
    if server is not None and ent.server != server:
        raise EntitlementError(
            f"bound to server {ent.server!r}, but this server's fingerprint is {server!r}"
        )
    if ent.server_key is not None and server_key is not None and ent.server_key != server_key:
        raise EntitlementError(
            "bound to another server's key: it was issued for a server with this"
            " fingerprint but another state directory (its key is in server.key)"
        )
    if ent.issued_at > now + allowed_clock_offset:
        raise EntitlementError("issued in the future: check this server's clock")
    return ent


def check_license(ent: Entitlement | None, now: float, product: ProductTerms | None = None) -> None:
    """Raise the server-wide refusal that applies at ``now``, if any."""
    if ent is None:
        raise NotActivated("this server has no valid entitlement")
    _check_window(ent.not_before, ent.not_after, now, "license")
    if ent.refresh_by is not None and now >= ent.refresh_by:
        raise GracePeriodOver("the activation was not refreshed in time")
    if product is not None:
        check_product(product, now)


def check_product(product: ProductTerms, now: float) -> None:
    """The product-level window alone (after :func:`check_license` passed).
    Every acquire and renewal passes here: the refusal's wording is only
    built for a refusal."""
    not_before, not_after = product.not_before, product.not_after
    if (not_before is not None and now < not_before) or (
        not_after is not None and now >= not_after
    ):
        _check_window(not_before, not_after, now, f"product {product.code!r}")


def _check_window(not_before: int | None, not_after: int | None, now: float, what: str) -> None:
    if not_before is not None and now < not_before:
        raise LicenseNotYetValid(f"the {what} is not valid yet", not_before=not_before)
    if not_after is not None and now >= not_after:
        raise LicenseExpired(f"the {what} has expired", not_after=not_after)


# --- activation requests -------------------------------------------------------------


@dataclass(frozen=True)
class ActivationRequest:
    license_key: str
    server: str
    hostname: str
    nonce: str
    created_at: int
    floatd: str
    #: The server's public key (floatd.core.borrow); None from older servers.
    server_key: str | None = None

    def to_armored(self) -> str:
        body: dict[str, Any] = {
            "v": 1,
            "license_key": self.license_key,
            "server": self.server,
            "hostname": self.hostname,
            "nonce": self.nonce,
            "created_at": self.created_at,
            "floatd": self.floatd,
        }
        if self.server_key is not None:
            body["server_key"] = self.server_key
        return armor(KIND_REQUEST, msgpack.packb(body, use_bin_type=True))


def parse_activation_request(text: str) -> ActivationRequest:
    obj = _unpack_map(dearmor(text, KIND_REQUEST), "activation request")
    f = _Fields(obj, "activation request")
    if f.integer("v") != 1:
        raise EntitlementError("activation request: unsupported version 'v'")
    return ActivationRequest(
        license_key=f.text("license_key"),
        server=f.text("server"),
        hostname=f.text("hostname"),
        nonce=f.text("nonce"),
        created_at=f.integer("created_at"),
        floatd=f.text("floatd"),
        server_key=_key_text(f.text("server_key", None, nullable=True)),
    )
