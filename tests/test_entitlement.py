"""Entitlement verification: every rejection rule, and the request-time windows."""

from __future__ import annotations

import base64
import hashlib
import tracemalloc
from pathlib import Path

import msgpack
import pytest
from conftest import BASE, SERVER_ID, payload, product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.core.codec import encode_frame
from floatd.core.entitlement import (
    MAX_PRODUCT_VALUES,
    ActivationRequest,
    Entitlement,
    armor,
    check_license,
    dearmor,
    format_public_key,
    key_id,
    load_private_key,
    parse_activation_request,
    parse_public_key,
    private_key_pem,
    server_fingerprint,
    sign_entitlement,
    trusted_keys,
    verify_entitlement,
)
from floatd.core.seats import Claim, Lease, hash_token
from floatd.core.service import LeaseService
from floatd.errors import (
    EntitlementError,
    GracePeriodOver,
    LicenseExpired,
    LicenseNotYetValid,
    NotActivated,
)
from floatd.store.activation import check_history, installed_record, read_armored


def verify(text: str, key: Ed25519PrivateKey, server: str = SERVER_ID, now: float = BASE):
    keys = trusted_keys([format_public_key(key.public_key())])
    return verify_entitlement(text, keys, server, now, 60)


def test_fingerprint_matches_the_contract() -> None:
    expected = hashlib.sha256(b"floatd-server-v1:abc").hexdigest()[:32]
    assert server_fingerprint("abc\n") == expected and len(expected) == 32


def test_key_text_and_kid() -> None:
    key = Ed25519PrivateKey.generate()
    text = format_public_key(key.public_key())
    raw = base64.b64decode(text.removeprefix("ed25519:"))
    assert key_id(parse_public_key(text)) == hashlib.sha256(raw).hexdigest()[:16]
    for bad in (
        "ed25519:",
        "rsa:AAAA",
        "ed25519:!!!",
        "ed25519:" + base64.b64encode(b"x").decode(),
    ):
        with pytest.raises(ValueError):
            parse_public_key(bad)


def test_private_key_pem_round_trip_with_passphrase() -> None:
    key = Ed25519PrivateKey.generate()
    pem = private_key_pem(key, b"pw")
    assert b"ENCRYPTED" in pem
    assert key_id(load_private_key(pem, b"pw").public_key()) == key_id(key.public_key())


def test_valid_entitlement(vendor_key: Ed25519PrivateKey) -> None:
    ent = verify(sign(vendor_key, products=[product("a"), product("b", seats=-1)]), vendor_key)
    assert [p.code for p in ent.products] == ["a", "b"]
    assert ent.product("b") is not None and ent.product("b").unlimited  # type: ignore[union-attr]
    assert ent.kid == key_id(vendor_key.public_key())


def test_armor_tolerates_whitespace_and_surrounding_text(vendor_key: Ed25519PrivateKey) -> None:
    text = sign(vendor_key)
    lines = text.splitlines()
    messy = (
        "Dear customer, here it is:\n\n"
        + lines[0]
        + "\n"
        + "\n  ".join(" ".join(lines[1:-1]).split())
        + "\r\n"
        + lines[-1]
        + "\nRegards"
    )
    assert verify(messy, vendor_key).license == "lic-1"


def test_tampered_payload_is_rejected(vendor_key: Ed25519PrivateKey) -> None:
    envelope = msgpack.unpackb(dearmor(sign(vendor_key), "ENTITLEMENT"))
    inner = msgpack.unpackb(envelope["payload"])
    inner["products"][0]["seats"] = 1000
    envelope["payload"] = msgpack.packb(inner)
    with pytest.raises(EntitlementError, match="signature"):
        verify(armor("ENTITLEMENT", msgpack.packb(envelope)), vendor_key)


def test_foreign_key_is_rejected(vendor_key: Ed25519PrivateKey) -> None:
    with pytest.raises(EntitlementError, match="not a trusted"):
        verify(sign(Ed25519PrivateKey.generate()), vendor_key)


def test_kid_of_trusted_key_with_foreign_signature(vendor_key: Ed25519PrivateKey) -> None:
    """A forger who copies our kid still fails the signature check."""
    text = sign(Ed25519PrivateKey.generate())
    envelope = msgpack.unpackb(dearmor(text, "ENTITLEMENT"))
    envelope["kid"] = key_id(vendor_key.public_key())
    with pytest.raises(EntitlementError, match="signature"):
        verify(armor("ENTITLEMENT", msgpack.packb(envelope)), vendor_key)


def test_signature_is_domain_separated(vendor_key: Ed25519PrivateKey) -> None:
    body = msgpack.packb(payload(), use_bin_type=True)
    envelope = {
        "alg": "ed25519",
        "kid": key_id(vendor_key.public_key()),
        "payload": body,
        "sig": vendor_key.sign(body),
    }  # signed without the domain prefix
    with pytest.raises(EntitlementError, match="signature"):
        verify(armor("ENTITLEMENT", msgpack.packb(envelope, use_bin_type=True)), vendor_key)


def test_an_entitlement_for_another_server_key_is_refused(vendor_key: Ed25519PrivateKey) -> None:
    mine, other = (format_public_key(Ed25519PrivateKey.generate().public_key()) for _ in "ab")
    text = sign(vendor_key, server_key=mine)
    keys = {key_id(vendor_key.public_key()): vendor_key.public_key()}
    assert verify_entitlement(text, keys, SERVER_ID, BASE, 60, mine).server_key == mine
    with pytest.raises(EntitlementError, match="another server's key"):
        verify_entitlement(text, keys, SERVER_ID, BASE, 60, other)
    # Without a key in it: valid for this fingerprint (only borrowing needs one).
    assert verify_entitlement(sign(vendor_key), keys, SERVER_ID, BASE, 60, other).server_key is None
    with pytest.raises(EntitlementError, match="'server_key' is not a public key"):
        verify(sign(vendor_key, server_key="ed25519:AAAA"), vendor_key)


def test_wrong_server_is_rejected(vendor_key: Ed25519PrivateKey) -> None:
    with pytest.raises(EntitlementError, match="bound to server"):
        verify(sign(vendor_key), vendor_key, server=server_fingerprint("another-machine"))


def test_issued_in_the_future_is_rejected(vendor_key: Ed25519PrivateKey) -> None:
    verify(sign(vendor_key, issued_at=int(BASE) + 60), vendor_key)  # within the offset
    with pytest.raises(EntitlementError, match="future"):
        verify(sign(vendor_key, issued_at=int(BASE) + 61), vendor_key)


def test_key_rotation_accepts_either_key() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = trusted_keys([format_public_key(old.public_key()), format_public_key(new.public_key())])
    for k in (old, new):
        assert verify_entitlement(sign(k), keys, SERVER_ID, BASE, 60).license == "lic-1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v": 2}, "version"),
        ({"server": None}, "'server'"),
        ({"issued_at": "yesterday"}, "'issued_at'"),
        ({"products": []}, "empty"),
        ({"products": [product(strategy="per-user")]}, "'strategy'"),
        ({"products": [product(authorization="sso")]}, "'authorization'"),
        ({"products": [product(seats="2")]}, "'seats'"),
        ({"products": [product(seats=True)]}, "'seats'"),
        ({"products": [product(seats=-2)]}, "'seats'"),
        ({"products": [product(allowed_ips=["10.0.0.0/33"])]}, "CIDR"),
        ({"products": [product(features={"x": 1.5})]}, "features"),
        ({"products": [product(metadata={"k": 1})]}, "metadata"),
        ({"products": [product("a"), product("a")]}, "duplicate"),
        ({"products": ["not a map"]}, "not a map"),
        ({"not_after": 1.5}, "'not_after'"),
        # Bounds: every answer fits a frame, every time renders as a date.
        ({"products": [product(seats=10_000_001)]}, "'seats' must be <= 10000000"),
        ({"products": [product(lease_duration=2**40)]}, "'lease_duration' must be <="),
        ({"products": [product(borrow_max=2**40)]}, "'borrow_max' must be <="),
        ({"products": [product(max_users=2**40)]}, "'max_users' must be <="),
        ({"products": [product(not_after=2**60)]}, "'not_after' must be <="),
        ({"products": [product(not_before=-1)]}, "'not_before' must be >= 0"),
        ({"not_after": 253_402_300_800}, "'not_after' must be <="),
        ({"refresh_by": 2**63}, "'refresh_by' must be <="),
        ({"products": [product(name="n" * 257)]}, "'name' is longer"),
        ({"products": [product(metadata={"k": "v" * 70_000})]}, "more than 32768 bytes"),
        ({"products": [product(features={"f": "v" * 40_000})]}, "more than 32768 bytes"),
    ],
)
def test_malformed_payloads_are_rejected(
    vendor_key: Ed25519PrivateKey, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(EntitlementError, match=message):
        verify(sign(vendor_key, **changes), vendor_key)


def test_missing_required_key(vendor_key: Ed25519PrivateKey) -> None:
    p = payload()
    del p["license"]
    with pytest.raises(EntitlementError, match="'license' is missing"):
        verify(sign_entitlement(vendor_key, p), vendor_key)
    p = payload()
    del p["products"][0]["strategy"]
    with pytest.raises(EntitlementError, match="'strategy' is missing"):
        verify(sign_entitlement(vendor_key, p), vendor_key)


def test_unknown_payload_keys_are_ignored(vendor_key: Ed25519PrivateKey) -> None:
    ent = verify(sign(vendor_key, future={"x": 1}, products=[product(later=True)]), vendor_key)
    assert ent.products[0].code == "app"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no armor at all",
        "-----BEGIN FLOATD ENTITLEMENT-----\n!!!\n-----END FLOATD ENTITLEMENT-----",
        "-----BEGIN FLOATD ENTITLEMENT-----\nAAAA",  # no end line
        armor("ENTITLEMENT", b"\xc1\xc1"),
        armor("ENTITLEMENT", msgpack.packb([1, 2])),
        armor("ENTITLEMENT", msgpack.packb({"alg": "rsa", "kid": "x", "payload": b"", "sig": b""})),
        armor("ENTITLEMENT", msgpack.packb({"alg": "ed25519", "kid": 5})),
        armor("ACTIVATION REQUEST", b"wrong kind"),
        "x" * (1024 * 1024 + 1),
    ],
)
def test_malformed_files_are_rejected(vendor_key: Ed25519PrivateKey, text: str) -> None:
    with pytest.raises(EntitlementError):
        verify(text, vendor_key)


def test_check_license_windows(vendor_key: Ed25519PrivateKey) -> None:
    with pytest.raises(NotActivated):
        check_license(None, BASE)
    ent = verify(
        sign(
            vendor_key,
            not_before=int(BASE) + 10,
            not_after=int(BASE) + 100,
            products=[product(not_before=int(BASE) + 20, not_after=int(BASE) + 50)],
        ),
        vendor_key,
    )
    terms = ent.products[0]
    with pytest.raises(LicenseNotYetValid):
        check_license(ent, BASE + 9.9)
    check_license(ent, BASE + 10)
    with pytest.raises(LicenseNotYetValid):
        check_license(ent, BASE + 15, terms)
    check_license(ent, BASE + 20, terms)
    with pytest.raises(LicenseExpired):
        check_license(ent, BASE + 50, terms)
    check_license(ent, BASE + 99)
    with pytest.raises(LicenseExpired):
        check_license(ent, BASE + 100)


def test_grace_period(vendor_key: Ed25519PrivateKey) -> None:
    ent = verify(sign(vendor_key, refresh_by=int(BASE) + 5), vendor_key)
    check_license(ent, BASE + 4)
    with pytest.raises(GracePeriodOver):
        check_license(ent, BASE + 5)


def test_activation_request_round_trip() -> None:
    req = ActivationRequest("KEY-1", SERVER_ID, "host", "n" * 32, int(BASE), "0.1.0")
    assert parse_activation_request(req.to_armored()) == req
    with pytest.raises(EntitlementError):
        parse_activation_request(armor("ACTIVATION REQUEST", msgpack.packb({"v": 1})))


def test_the_largest_allowed_product_still_answers_in_one_frame(
    vendor_key: Ed25519PrivateKey,
) -> None:
    """The bounds are what keep an acquire's answer (and info's) under 64 KiB."""
    metadata = {f"k{i:03d}": "v" * 1000 for i in range(32)}
    while len(msgpack.packb([metadata, {}])) > MAX_PRODUCT_VALUES:
        metadata.popitem()
    terms = product("c" * 128, name="n" * 256, metadata=metadata, features={})
    ent = verify(sign(vendor_key, products=[terms]), vendor_key)
    service = LeaseService(SERVER_ID, 900)
    service.install(ent, BASE)
    info = service.product_summary(ent.products[0])
    assert len(encode_frame({"id": 2**62, "ok": True, **info})) <= 65536 + 4
    lease = service.ledger.claim(BASE, Claim("c" * 128, "f" * 128, "l" * 22, hash_token("t")))
    assert isinstance(lease, Lease)
    answer = service.grant_response(2**62, lease, "t" * 43, BASE)
    assert answer.granted == lease.id
    assert len(encode_frame(answer.wire)) <= 65536 + 4


def test_a_huge_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with open(path, "wb") as fh:
        fh.truncate(100 * 1024 * 1024)  # sparse: 100 MB that costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(EntitlementError, match="larger than"):
            read_armored(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_the_history_refuses_old_files_copied_back(vendor_key: Ed25519PrivateKey) -> None:
    def ent(**changes: object) -> Entitlement:
        return verify(sign(vendor_key, **changes), vendor_key)

    installed = ent(issued_at=int(BASE) - 600)
    meta = dict(installed_record(installed))
    check_history(meta, installed)  # the file installed last
    check_history({}, ent(nonce="n-1"))  # nothing recorded yet: a state from before
    check_history(meta, ent(issued_at=int(BASE) - 60))  # newer: an online refresh
    check_history(meta, ent(issued_at=int(BASE) - 600))  # as new: allowed
    with pytest.raises(EntitlementError, match="copied back"):
        check_history(meta, ent(issued_at=int(BASE) - 6000))
    with pytest.raises(EntitlementError, match="offline response"):
        check_history(meta, ent(nonce="n-2", issued_at=int(BASE)))
