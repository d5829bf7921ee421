"""Borrow certificates checked offline, each failure in the contract's order
(borrow.md), with explicit times and keys; no server, no network."""

from __future__ import annotations

import msgpack
import pytest
from conftest import BASE, SERVER_ID, payload, product
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from floatd.core.borrow import (
    KIND_BORROW,
    SIGNING_DOMAIN,
    borrow_payload,
    sign_borrow,
    verify_borrow,
)
from floatd.core.changes import Audit, PutLease, SetMeta
from floatd.core.entitlement import (
    armor,
    dearmor,
    format_public_key,
    key_id,
    parse_payload,
    sign_entitlement,
    trusted_keys,
    verify_entitlement,
)
from floatd.core.messages import Acquire, Answer, Borrow, Release, Renew
from floatd.core.policy_file import load_policy
from floatd.core.service import LeaseService
from floatd.errors import (
    AdminError,
    BorrowClockBack,
    BorrowEnded,
    BorrowForged,
    BorrowInvalid,
    BorrowMismatch,
    BorrowUnreadable,
    BorrowUntrusted,
    BorrowWrongMachine,
)

LAPTOP = "laptop-fingerprint-0001"
DAY = 86400


class Chain:
    """A vendor key, a server key, an entitlement naming it, a borrow under it."""

    def __init__(self, **borrow: object) -> None:
        self.vendor = Ed25519PrivateKey.generate()
        self.server = Ed25519PrivateKey.generate()
        fields = {"server_key": format_public_key(self.server.public_key())}
        fields.update({k: v for k, v in borrow.items() if k == "server_key"})
        self.ent_text = sign_entitlement(
            self.vendor,
            payload(products=[product("cad", borrow_max=7 * DAY)], **fields),
        )
        self.ent = parse_payload(_inner(self.ent_text), key_id(self.vendor.public_key()))
        self.payload = borrow_payload(
            self.ent, "cad", "lease-1", LAPTOP, None, "ann", int(BASE), int(BASE) + 3 * DAY
        )
        self.payload.update({k: v for k, v in borrow.items() if k != "server_key"})
        self.text = sign_borrow(self.server, self.payload, self.ent_text)

    @property
    def keys(self) -> dict[str, object]:
        return {key_id(self.vendor.public_key()): self.vendor.public_key()}

    def verify(self, text: str | None = None, **kw: object) -> object:
        args: dict[str, object] = {"fingerprint": LAPTOP, "now": BASE + DAY}
        args.update(kw)
        return verify_borrow(text or self.text, self.keys, **args)  # type: ignore[arg-type]


def _inner(armored: str) -> dict[str, object]:
    envelope = msgpack.unpackb(dearmor(armored, "ENTITLEMENT"))
    return dict(msgpack.unpackb(envelope["payload"]))


def _reenvelope(text: str, **changes: object) -> str:
    envelope = msgpack.unpackb(dearmor(text, KIND_BORROW))
    envelope.update(changes)
    return armor(KIND_BORROW, msgpack.packb(envelope, use_bin_type=True))


def test_a_good_borrow_verifies_with_the_vendor_key_alone() -> None:
    chain = Chain()
    got = chain.verify()
    assert got.product == "cad" and got.user == "ann" and got.server == SERVER_ID  # type: ignore[attr-defined]
    assert got.seconds_left(BASE + DAY) == 2 * DAY  # type: ignore[attr-defined]
    assert got.features == {"export": True}  # type: ignore[attr-defined]


def test_a_truncated_certificate_is_unreadable() -> None:
    chain = Chain()
    cut = chain.text[: len(chain.text) // 2] + "\n-----END FLOATD BORROW-----\n"
    with pytest.raises(BorrowUnreadable):
        chain.verify(cut)
    with pytest.raises(BorrowUnreadable):
        chain.verify("hello")


def test_an_entitlement_from_another_vendor_is_untrusted() -> None:
    chain = Chain()
    stranger = Ed25519PrivateKey.generate()
    resigned = sign_entitlement(stranger, _inner(chain.ent_text))
    with pytest.raises(BorrowUntrusted) as err:
        chain.verify(_reenvelope(chain.text, entitlement=resigned))
    assert err.value.step == "entitlement"


def test_a_stretched_end_is_forged() -> None:
    chain = Chain()
    envelope = msgpack.unpackb(dearmor(chain.text, KIND_BORROW))
    inner = msgpack.unpackb(envelope["payload"])
    inner["not_after"] += 30 * DAY
    stretched = _reenvelope(chain.text, payload=msgpack.packb(inner, use_bin_type=True))
    with pytest.raises(BorrowForged) as err:
        chain.verify(stretched)
    assert err.value.step == "signature"


def test_a_borrow_signed_by_another_server_key_is_forged() -> None:
    chain = Chain()
    other = Ed25519PrivateKey.generate()
    with pytest.raises(BorrowForged):
        chain.verify(sign_borrow(other, chain.payload, chain.ent_text))
    # ...even one re-signed with the right kid but the wrong key.
    body = msgpack.packb(chain.payload, use_bin_type=True)
    fake = _reenvelope(chain.text, payload=body, sig=other.sign(SIGNING_DOMAIN + body))
    with pytest.raises(BorrowForged):
        chain.verify(fake)


def test_an_entitlement_without_a_server_key_signs_no_borrow() -> None:
    chain = Chain(server_key=None)
    with pytest.raises(BorrowForged, match="names no server key"):
        chain.verify()


def test_a_borrow_from_another_server_or_entitlement_does_not_match() -> None:
    with pytest.raises(BorrowMismatch) as err:
        Chain(server="another-server-fingerprint").verify()
    assert err.value.step == "binding"
    with pytest.raises(BorrowMismatch):
        Chain(entitlement="ent-other").verify()
    with pytest.raises(BorrowMismatch, match="no product"):
        Chain(product="sim").verify()


def test_a_borrow_moved_to_another_machine_is_refused() -> None:
    with pytest.raises(BorrowWrongMachine) as err:
        Chain().verify(fingerprint="desktop-fingerprint-9")
    assert err.value.step == "machine"


def test_a_borrow_past_its_end_or_under_a_clock_set_back() -> None:
    chain = Chain()
    with pytest.raises(BorrowEnded) as err:
        chain.verify(now=BASE + 3 * DAY)
    assert err.value.step == "time"
    chain.verify(now=BASE + 3 * DAY - 1)
    with pytest.raises(BorrowClockBack):
        chain.verify(now=BASE + DAY, seen=BASE + 2 * DAY)  # set back after use
    chain.verify(now=BASE + DAY - 60, seen=BASE + DAY)  # NTP's small correction is no attack
    with pytest.raises(BorrowClockBack):
        chain.verify(now=BASE - 400)  # before it was issued (300 s of slack)
    # Every refusal is one family, so an application can catch them all.
    assert issubclass(BorrowClockBack, BorrowInvalid) and issubclass(BorrowEnded, BorrowInvalid)


# --- the server's side, on the service with explicit times -------------------------


class Site:
    """A service holding an entitlement that names its own key (or not)."""

    def __init__(self, *, keyed: bool = True, policy: str = "", **terms: object) -> None:
        self.vendor = Ed25519PrivateKey.generate()
        self.server = Ed25519PrivateKey.generate()
        fields: dict[str, object] = {"seats": 3, "borrow_max": 7 * DAY}
        fields.update(terms)
        text = sign_entitlement(
            self.vendor,
            payload(
                products=[product("cad", **fields)],
                server_key=format_public_key(self.server.public_key()) if keyed else None,
            ),
        )
        keys = trusted_keys([format_public_key(self.vendor.public_key())])
        self.service = LeaseService(SERVER_ID, 900)
        self.service.server_key = self.server
        self.service.install(verify_entitlement(text, keys, SERVER_ID, BASE, 60), BASE)
        if policy:
            self.service.set_policy(load_policy(policy, "policy.toml"), BASE)
        self.keys = keys
        self._n = 0

    def call(self, req: object, now: float = BASE) -> dict[str, object]:
        result = self.service.handle(req, now, "192.0.2.7")  # type: ignore[arg-type]
        assert isinstance(result, Answer)
        return result.wire

    def lease(self, fp: str = LAPTOP) -> dict[str, object]:
        self._n += 1
        got = self.call(Acquire(self._n, "cad", fp, user="ann"))
        assert got["ok"], got
        return got

    def borrow(self, got: dict[str, object], seconds: int, now: float = BASE) -> dict[str, object]:
        return self.call(Borrow(9, str(got["lease"]), str(got["token"]), seconds), now)


def test_a_borrow_is_signed_durable_and_checks_offline() -> None:
    site = Site()
    held = site.lease()
    site.service.take_changes()
    got = site.borrow(held, 2 * DAY)
    assert got["ok"] and got["expires_at"] == BASE + 2 * DAY and got["expires_in"] == 2 * DAY
    changes = site.service.take_changes()
    puts = [c for c in changes if isinstance(c, PutLease)]
    assert puts and puts[0].lease.borrowed  # written before anyone hears of it
    assert any(isinstance(c, Audit) and c.event == "borrowed" for c in changes)
    checked = verify_borrow(str(got["certificate"]), site.keys, LAPTOP, BASE + DAY)
    assert checked.lease == held["lease"] and checked.user == "ann"
    # A renewal changes nothing and says how long is left.
    renewed = site.call(Renew(3, str(held["lease"]), str(held["token"])), BASE + DAY)
    assert renewed["ok"] and renewed["expires_in"] == DAY
    assert not [c for c in site.service.take_changes() if not isinstance(c, SetMeta)]
    # Borrowing again issues a new certificate with the new end.
    again = site.borrow(held, DAY, BASE + DAY)
    assert again["expires_at"] == BASE + 2 * DAY and again["certificate"] != got["certificate"]
    # For less, the certificate says less, but the seat stays held as long as
    # the earlier certificate is valid offline.
    shorter = site.borrow(held, 3600, BASE + DAY)
    assert shorter["expires_at"] == BASE + DAY + 3600
    assert verify_borrow(str(shorter["certificate"]), site.keys, LAPTOP, BASE + DAY).not_after == (
        BASE + DAY + 3600
    )
    lease = site.service.ledger.lease(str(held["lease"]))
    assert lease is not None and lease.expires_at == BASE + 2 * DAY
    # The seat is not the admin's to free; the borrower returns it early.
    with pytest.raises(AdminError, match="borrowed until"):
        site.service.revoke(str(held["lease"]), BASE + DAY)
    back = site.call(Release(4, str(held["lease"]), str(held["token"])), BASE + DAY)
    assert back["ok"] and site.service.ledger.used("cad") == 0
    assert any(isinstance(c, Audit) and c.event == "returned" for c in site.service.take_changes())


def test_the_end_is_cut_at_the_license_and_the_product() -> None:
    site = Site(not_after=int(BASE) + DAY)
    got = site.borrow(site.lease(), 5 * DAY)
    assert got["expires_at"] == BASE + DAY


@pytest.mark.parametrize(
    ("site_args", "seconds", "code", "detail"),
    [
        ({"borrow_max": 0}, 60, "BORROW_NOT_ALLOWED", {"reason": "product"}),
        ({"keyed": False}, 60, "BORROW_NOT_ALLOWED", {"reason": "server_key"}),
        ({}, 7 * DAY + 1, "BAD_REQUEST", {"field": "duration"}),
        ({"policy": '[[rule]]\nproduct = "cad"\nborrow_max = 3600\n'}, 3601, "BAD_REQUEST", {}),
    ],
)
def test_a_borrow_refused_changes_nothing(
    site_args: dict[str, object], seconds: int, code: str, detail: dict[str, object]
) -> None:
    site = Site(**site_args)  # type: ignore[arg-type]
    held = site.lease()
    site.service.take_changes()
    got = site.borrow(held, seconds)
    assert got["error"]["code"] == code  # type: ignore[index]
    assert detail.items() <= got["error"].items()  # type: ignore[union-attr]
    lease = site.service.ledger.lease(str(held["lease"]))
    assert lease is not None and not lease.borrowed and lease.expires_at == BASE + 60
    assert not [c for c in site.service.take_changes() if not isinstance(c, Audit)]


def test_borrow_lowwater_keeps_the_last_seats_from_being_borrowed() -> None:
    site = Site(policy='[[rule]]\nproduct = "cad"\nborrow_lowwater = 1\n')
    first, second, third = (site.lease(f"machine-{n}-0000") for n in range(3))
    assert site.borrow(first, DAY)["ok"] and site.borrow(second, DAY)["ok"]
    refused = site.borrow(third, DAY)
    assert refused["error"] == {  # type: ignore[comparison-overlap]
        "code": "BORROW_NOT_ALLOWED",
        "message": refused["error"]["message"],  # type: ignore[index]
        "reason": "policy",
    }
    assert site.borrow(first, 2 * DAY)["ok"]  # a borrowed seat may be borrowed again
    assert site.service.ledger.borrowed("cad") == 2


def test_a_wrong_token_borrows_nothing() -> None:
    site = Site()
    held = site.lease()
    got = site.borrow({"lease": held["lease"], "token": "not-the-token"}, DAY)
    assert got["error"]["code"] == "LEASE_NOT_FOUND"  # type: ignore[index]
    lease = site.service.ledger.lease(str(held["lease"]))
    assert lease is not None and not lease.borrowed


# --- hostile certificates: a refusal with its step, never another exception ---------


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_mangled_certificate_is_refused_with_a_step(data: st.DataObject) -> None:
    chain = _CHAIN
    raw = bytearray(dearmor(chain.text, KIND_BORROW))
    how = data.draw(st.sampled_from(["flip", "cut", "splice", "envelope"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= data.draw(st.integers(1, 255))
        text = armor(KIND_BORROW, bytes(raw))
    elif how == "cut":
        text = armor(KIND_BORROW, bytes(raw[: data.draw(st.integers(0, len(raw) - 1))]))
    elif how == "splice":
        text = armor(KIND_BORROW, data.draw(st.binary(max_size=300)))
    else:
        envelope = msgpack.unpackb(bytes(raw))
        key = data.draw(st.sampled_from(sorted(envelope)))
        envelope[key] = data.draw(
            st.none()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=50)
            | st.binary(max_size=50)
        )
        text = armor(KIND_BORROW, msgpack.packb(envelope, use_bin_type=True))
    try:
        chain.verify(text)
    except BorrowInvalid as exc:
        assert exc.step and str(exc)
    else:  # only a change that left the signed parts alone can still verify
        assert text == chain.text or how in ("flip", "envelope")


_CHAIN = Chain()
