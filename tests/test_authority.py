"""The reference authority's logic, sans-IO: license models mapped onto
entitlement payloads, keys, limits, durations."""

from __future__ import annotations

import calendar
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.authority.cli import main as authority_main
from floatd.authority.logic import Authority
from floatd.authority.store import AuthorityStore, Product, Terms
from floatd.authority.terms import BadTerms, add_duration, key_hash
from floatd.core.entitlement import (
    ActivationRequest,
    format_public_key,
    trusted_keys,
    verify_entitlement,
)
from floatd.errors import AuthorityError

NOW = float(calendar.timegm((2026, 1, 31, 12, 0, 0)))
SERVER = "0123456789abcdef0123456789abcdef"


def vendor_cli(db: Path) -> Callable[..., tuple[int, str, str]]:
    """The vendor's CLI on ``db``: ``run(*args)`` gives (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(authority_main, ["--db", str(db), *args])
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def authority(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> Authority:
    a = Authority(AuthorityStore(tmp_path / "a.db"), vendor_key)
    a.add_product(Product("cad", "CAD Pro", lease_duration=120))
    a.add_product(Product("sim", "Sim", authorization="user", strategy="per-instance"))
    a.add_product(Product("try", "Trial thing", trial_days=14))
    return a


def payload_of(
    a: Authority, key: Ed25519PrivateKey, text: str, server: str = SERVER
) -> dict[str, Any]:
    keys = trusted_keys([format_public_key(key.public_key())])
    ent = verify_entitlement(text, keys, server, NOW, 60)
    assert ent.server == server
    return {"ent": ent, "product": ent.products[0]}


def test_add_duration_uses_calendar_months() -> None:
    assert add_duration(NOW, "P1M") == calendar.timegm((2026, 2, 28, 12, 0, 0))
    assert add_duration(NOW, "P1Y") == calendar.timegm((2027, 1, 31, 12, 0, 0))
    assert add_duration(NOW, "P1DT2H") == NOW + 86400 + 7200
    for bad in ("1M", "P", "PT", "P1X", "month"):
        with pytest.raises(ValueError):
            add_duration(NOW, bad)


def test_perpetual_multi_seat_with_ip_allow_list(
    authority: Authority, vendor_key: Ed25519PrivateKey
) -> None:
    lic, key = authority.issue_license(
        "o-1",
        Terms(products=["cad"], seats=5, allowed_ips=["10.0.0.0/8"]),
        NOW,
        customer="ACME",
    )
    _, text = authority.activate(key, SERVER, "h", "0.1", NOW)
    got = payload_of(authority, vendor_key, text)
    ent, product = got["ent"], got["product"]
    assert ent.not_after is None and ent.customer == "ACME" and ent.license == lic.id
    assert ent.refresh_by == NOW + 7 * 86400 and ent.nonce is None  # online: grace, no nonce
    assert (product.seats, product.lease_duration, product.strategy) == (5, 120, "per-machine")
    assert [str(n) for n in product.allowed_ips] == ["10.0.0.0/8"]


def test_subscription_expiry_comes_from_its_interval_and_extends(
    authority: Authority, vendor_key: Ed25519PrivateKey
) -> None:
    lic, key = authority.issue_license("o-2", Terms(products=["cad"], seats=1, interval="P1M"), NOW)
    activation, text = authority.activate(key, SERVER, None, None, NOW)
    assert payload_of(authority, vendor_key, text)["ent"].not_after == add_duration(NOW, "P1M")
    authority.update_license(lic.id, NOW, extend=True, seats=3)
    text = authority.refresh(activation, SERVER, NOW + 60)
    ent = payload_of(authority, vendor_key, text)["ent"]
    assert ent.not_after == add_duration(add_duration(NOW, "P1M"), "P1M")
    assert ent.products[0].seats == 3


def test_unlimited_user_locked_effective_and_trial(
    authority: Authority, vendor_key: Ed25519PrivateKey
) -> None:
    effective = int(NOW) + 86400
    _, key = authority.issue_license(
        "o-3",
        Terms(products=["try"], seats=-1, user_locked=True, trial=True, effective_at=effective),
        NOW,
    )
    _, text = authority.activate(key, SERVER, None, None, NOW)
    got = payload_of(authority, vendor_key, text)
    ent, product = got["ent"], got["product"]
    assert product.unlimited and product.user_locked and product.trial
    assert ent.not_before == effective
    assert ent.not_after == effective + 14 * 86400  # the product's trial length


def test_named_users_within_max_users(authority: Authority, vendor_key: Ed25519PrivateKey) -> None:
    lic, key = authority.issue_license("o-4", Terms(products=["sim"], seats=2, max_users=2), NOW)
    authority.assign_user(lic.id, "ann@example.com")
    authority.assign_user(lic.id, "bob@example.com")
    with pytest.raises(AuthorityError) as err:
        authority.assign_user(lic.id, "cy@example.com")
    assert err.value.status == 409
    _, text = authority.activate(key, SERVER, None, None, NOW)
    product = payload_of(authority, vendor_key, text)["product"]
    assert product.authorization == "user" and product.max_users == 2
    assert product.users == ("ann@example.com", "bob@example.com")
    assert product.strategy == "per-instance"


def test_keys_are_stored_only_as_hashes(authority: Authority, tmp_path: Path) -> None:
    _, key = authority.issue_license("o-5", Terms(products=["cad"], seats=1), NOW)
    assert len(key) >= 4 + 32 and key.startswith("FLT-")  # >= 192 bits of randomness
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.db*"))  # the WAL too
    assert key.encode() not in raw and key_hash(key) in raw
    with pytest.raises(AuthorityError) as err:
        authority.activate(key[:-1] + ("A" if key[-1] != "A" else "B"), SERVER, None, None, NOW)
    assert (err.value.status, err.value.error_code) == (403, "LICENSE_NOT_FOUND")


def test_activation_limit_states_and_refresh_answers(authority: Authority) -> None:
    lic, key = authority.issue_license("o-6", Terms(products=["cad"], seats=1), NOW)
    first, _ = authority.activate(key, SERVER, None, None, NOW)
    again, _ = authority.activate(key, SERVER, None, None, NOW)
    assert again == first  # the same server does not use a second place
    with pytest.raises(AuthorityError) as err:
        authority.activate(key, "f" * 32, None, None, NOW)
    assert (err.value.status, err.value.error_code) == (409, "ACTIVATION_LIMIT_REACHED")
    with pytest.raises(AuthorityError) as err:
        authority.refresh(first, "f" * 32, NOW)  # someone else's activation
    assert err.value.status == 404
    authority.deactivate(first, SERVER)
    second, _ = authority.activate(key, "f" * 32, None, None, NOW)
    with pytest.raises(AuthorityError) as err:
        authority.refresh(first, SERVER, NOW)  # given back: not refreshable
    assert err.value.status == 410
    authority.set_state(lic.id, "suspended")
    with pytest.raises(AuthorityError) as err:
        authority.refresh(second, "f" * 32, NOW)
    assert (err.value.status, err.value.error_code) == (410, "ACTIVATION_REVOKED")
    with pytest.raises(AuthorityError) as err:
        authority.activate(key, "e" * 32, None, None, NOW)
    assert (err.value.status, err.value.error_code) == (403, "LICENSE_SUSPENDED")
    authority.set_state(lic.id, "active")
    assert authority.refresh(second, "f" * 32, NOW)
    _, ekey = authority.issue_license(
        "o-7", Terms(products=["cad"], seats=1, expires_at=int(NOW) - 1), NOW
    )
    with pytest.raises(AuthorityError) as err:
        authority.activate(ekey, SERVER, None, None, NOW)
    assert (err.value.status, err.value.error_code) == (403, "LICENSE_EXPIRED")


def test_offline_signing_binds_the_request_nonce(
    authority: Authority, vendor_key: Ed25519PrivateKey
) -> None:
    _, key = authority.issue_license("o-8", Terms(products=["cad"], seats=4), NOW)
    request = ActivationRequest(key, SERVER, "air-gapped", "n" * 32, int(NOW), "0.1.0")
    _, text = authority.sign_offline(request.to_armored(), NOW)
    ent = payload_of(authority, vendor_key, text)["ent"]
    assert ent.nonce == "n" * 32 and ent.refresh_by is None
    with pytest.raises(AuthorityError) as err:
        authority.sign_offline("garbage", NOW)
    assert err.value.status == 400


def test_vendor_cli_refusals_are_one_line(tmp_path: Path) -> None:
    run = vendor_cli(tmp_path / "a.db")

    key = str(tmp_path / "k.pem")
    assert run("keys", "generate", "--out", key)[0] == 0
    code, _, err = run("keys", "generate", "--out", key)
    assert code == 1 and "not overwriting" in err
    assert run("product", "add", "cad", "--name", "C")[0] == 0
    code, _, err = run("product", "add", "cad", "--name", "C")
    assert code == 1 and err.count("\n") == 1 and "exists" in err
    code, _, err = run("license", "issue", "--order", "o", "--product", "nope", "--seats", "1")
    assert code == 1 and "no product" in err
    code, _, err = run(
        "license",
        "issue",
        "--order",
        "o",
        "--product",
        "cad",
        "--seats",
        "1",
        "--interval",
        "monthly",
    )
    assert code == 2 and "--interval" in err
    code, _, err = run("license", "show", "lic-missing")
    assert code == 1 and err.count("\n") == 1
    code, _, err = run("license", "suspend", "lic-missing")
    assert code == 1
    for group in ("keys", "product", "license", "users", "activations", "offline", "serve"):
        assert run(group, "--help")[0] == 0


def test_an_encrypted_signing_key_needs_its_passphrase(tmp_path: Path) -> None:
    from floatd.authority.cli import PASSPHRASE_ENV

    db = ["--db", str(tmp_path / "a.db")]
    key = str(tmp_path / "k.pem")
    env = {PASSPHRASE_ENV: "correct horse"}
    made = CliRunner().invoke(
        authority_main, [*db, "keys", "generate", "--out", key, "--passphrase"], env=env
    )
    assert made.exit_code == 0 and made.stdout.startswith("ed25519:")
    assert b"ENCRYPTED" in Path(key).read_bytes()
    shown = CliRunner().invoke(authority_main, [*db, "keys", "public", "--key", key], env=env)
    assert shown.stdout == made.stdout
    locked = CliRunner().invoke(
        authority_main, [*db, "keys", "public", "--key", key], env={PASSPHRASE_ENV: ""}
    )
    assert locked.exit_code == 1 and PASSPHRASE_ENV in locked.stderr


def test_refresh_schedule_jitters_and_backs_off() -> None:
    import random

    from floatd.daemon.online import RefreshSchedule

    s = RefreshSchedule(3600, random.Random(1))
    assert 6 <= s.first() <= 18  # soon after start, a fraction of a minute
    for _ in range(50):
        assert 3240 <= s.after(True) <= 3960  # +-10%
    delays = [s.after(False) for _ in range(10)]
    ceilings = [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert 3240 <= s.after(True) <= 3960 and s.failures == 0  # a success resets it
    quick = RefreshSchedule(1, random.Random(2))
    assert all(0.5 <= quick.after(False) <= 1 for _ in range(20))  # never beyond the interval


def test_terms_no_server_could_use_are_refused_on_issue_and_update(
    authority: Authority,
) -> None:
    """Before, `license update --seats -5` was accepted and every refresh failed
    afterwards; a product named twice made a license that could never be
    installed; an empty interval, a zero grace, an effective date after the
    expiry were all taken."""
    bad_terms = [
        ("--seats", Terms(products=["cad"], seats=-5)),
        ("--product", Terms(products=["cad", "cad"], seats=1)),
        ("--product", Terms(products=[], seats=1)),
        ("--interval", Terms(products=["cad"], seats=1, interval="P0D")),
        ("--grace", Terms(products=["cad"], seats=1, grace_seconds=0)),
        ("--allowed-ip", Terms(products=["cad"], seats=1, allowed_ips=["10.0.0.0/33"])),
        (
            "--effective",
            Terms(
                products=["cad"], seats=1, effective_at=int(NOW) + 7 * 86400, expires_at=int(NOW)
            ),
        ),
    ]
    for option, terms in bad_terms:
        with pytest.raises(BadTerms) as refused:
            authority.issue_license("o-bad", terms, NOW)
        assert refused.value.option == option and refused.value.error_code == "BAD_REQUEST"
    assert authority.store.licenses(None) == []
    lic, _ = authority.issue_license("o-1", Terms(products=["cad"], seats=3), NOW)
    for change in ({"seats": -5}, {"allowed_activations": 0}, {"lease_duration": -1}):
        with pytest.raises(BadTerms):
            authority.update_license(lic.id, NOW, **change)
    assert authority.get_license(lic.id).terms.seats == 3  # nothing was written


def test_an_order_keeps_its_customer_and_reference(authority: Authority) -> None:
    first, _ = authority.issue_license(
        "o-7", Terms(products=["cad"], seats=1), NOW, order_reference="PO-1", customer="Acme"
    )
    with pytest.raises(AuthorityError) as refused:
        authority.issue_license(
            "o-7", Terms(products=["cad"], seats=1), NOW, customer="Someone Else"
        )
    assert refused.value.status == 409 and refused.value.error_code == "ORDER_CONFLICT"
    second, _ = authority.issue_license("o-7", Terms(products=["cad"], seats=2), NOW)
    again, _ = authority.issue_license(
        "o-7", Terms(products=["cad"], seats=2), NOW, order_reference="PO-1", customer="Acme"
    )
    for lic in (first, second, again):
        got = authority.get_license(lic.id)
        assert (got.customer, got.order_reference) == ("Acme", "PO-1")


def test_vendor_cli_dates_from_now_point_ahead_and_bad_terms_are_usage_errors(
    tmp_path: Path,
) -> None:
    import json
    import time

    run = vendor_cli(tmp_path / "a.db")

    assert run("product", "add", "cad", "--name", "C")[0] == 0
    issue = ("license", "issue", "--order", "o", "--product", "cad", "--seats", "2", "--json")
    code, out, err = run(*issue, "--expires", "30d", "--effective", "1d")
    assert code == 0, err
    doc = json.loads(out)
    expires = doc["expires_at"]
    assert abs(expires - (time.time() + 30 * 86400)) < 120  # ahead, not thirty days ago
    assert doc["effective_at"] > time.time()
    code, _, err = run(*issue, "--expires", "3d", "--effective", "7d")
    assert code == 2 and "--effective" in err
    code, _, err = run(*issue, "--grace", "0")
    assert code == 2 and "--grace" in err
    code, _, err = run("license", "update", doc["id"], "--seats", "-5")
    assert code == 2 and "--seats" in err
    code, out, _ = run("license", "show", doc["id"], "--json")
    assert json.loads(out)["seats"] == 2


def test_a_revoked_license_gives_its_activation_places_back(authority: Authority) -> None:
    lic, key = authority.issue_license(
        "o-1", Terms(products=["cad"], seats=1, allowed_activations=2), NOW
    )
    authority.activate(key, SERVER, "a", "floatd/1", NOW)
    authority.activate(key, "f" * 32, "b", "floatd/1", NOW)
    authority.set_state(lic.id, "suspended")  # kept: they come back with the license
    assert len(authority.store.activations(lic.id, active_only=True)) == 2
    authority.set_state(lic.id, "revoked")
    assert authority.store.activations(lic.id, active_only=True) == []
    assert {a.state for a in authority.store.activations(lic.id)} == {"revoked"}


def test_trials_end_per_product_and_a_trial_that_would_never_end_is_refused(
    authority: Authority, vendor_key: Ed25519PrivateKey
) -> None:
    """'try' has 14 trial days, 'cad' none: a trial of cad alone would never end;
    with two trial lengths each product ends at its own, not both at the longer."""
    authority.add_product(Product("long", "Long trial", trial_days=30))
    with pytest.raises(BadTerms) as refused:
        authority.issue_license("o-t", Terms(products=["cad"], seats=1, trial=True), NOW)
    assert refused.value.option == "--trial" and "never" in refused.value.message
    lic, _ = authority.issue_license(
        "o-t", Terms(products=["try", "long"], seats=1, trial=True), NOW
    )
    assert authority.expiry(lic) == int(NOW) + 30 * 86400
    text = authority.entitlement(lic, SERVER, NOW, online=True)
    keys = trusted_keys([format_public_key(vendor_key.public_key())])
    ent = verify_entitlement(text, keys, SERVER, NOW, 60)
    ends = {p.code: (p.not_after, p.trial) for p in ent.products}
    assert ends == {
        "try": (int(NOW) + 14 * 86400, True),
        "long": (int(NOW) + 30 * 86400, True),
    }
    # An explicit expiry rules, trial length or not.
    ok, _ = authority.issue_license(
        "o-t", Terms(products=["cad"], seats=1, trial=True, expires_at=int(NOW) + 86400), NOW
    )
    assert authority.expiry(ok) == int(NOW) + 86400


def test_users_are_assigned_only_where_they_can_lease_and_as_floatd_names_them(
    authority: Authority,
) -> None:
    keyed, _ = authority.issue_license("o-u", Terms(products=["cad"], seats=1), NOW)
    with pytest.raises(AuthorityError) as refused:
        authority.assign_user(keyed.id, "ann@example.com")
    assert refused.value.error_code == "NOT_USER_AUTHORIZED"
    named, _ = authority.issue_license("o-u", Terms(products=["sim"], seats=1), NOW)
    for bad in (
        "ann",
        "@example.com",
        "ann@",
        "ann smith@example.com",
        "a\x00@b",
        "a" * 251 + "@b.c",
    ):
        with pytest.raises(AuthorityError) as refused:
            authority.assign_user(named.id, bad)
        assert refused.value.error_code == "BAD_REQUEST", bad
    assert authority.assign_user(named.id, "ann@example.com").users == ["ann@example.com"]


def test_the_vendor_cli_never_starts_empty_books_unnoticed(tmp_path: Path) -> None:
    import os

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(authority_main, list(args), env={"FLOATD_AUTHORITY_DB": None})
        return result.exit_code, result.stdout, result.stderr

    books = tmp_path / "books.sqlite3"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = run("license", "list")  # the default ./floatd-authority.sqlite3
        assert code == 1 and "no authority database" in err and err.count("\n") == 1
        assert not (tmp_path / "floatd-authority.sqlite3").exists()
    finally:
        os.chdir(cwd)
    code, _, err = run("product", "add", "cad", "--name", "C", "--db", str(books))
    assert code == 0 and "created a new authority database" in err  # --db after the command
    assert books.stat().st_mode & 0o777 == 0o600
    code, out, _ = run("product", "list", "--json", f"--db={books}")
    assert code == 0 and [p["code"] for p in json.loads(out)] == ["cad"]
    code, _, err = run(
        "--db", str(tmp_path / "no" / "such" / "dir.db"), "product", "add", "x", "--name", "X"
    )
    assert code == 1 and "no directory" in err
    assert not (tmp_path / "no").exists()


def test_vendor_cli_listings_have_headers_and_show_reads_as_text(tmp_path: Path) -> None:
    run = vendor_cli(tmp_path / "a.db")

    assert run("product", "add", "cad", "--name", "CAD Pro", "--trial-days", "14")[0] == 0
    assert run("product", "list")[1].splitlines()[0].split()[:2] == ["CODE", "NAME"]
    code, out, _ = run(
        "license",
        "issue",
        "--order",
        "o",
        "--product",
        "cad",
        "--seats",
        "3",
        "--json",
        "--expires",
        "2030-01-01",
        "--meta",
        "tier=gold",
    )
    lic = json.loads(out)["id"]
    listing = run("license", "list")[1].splitlines()
    assert listing[0].split()[:3] == ["ID", "ORDER", "STATE"] and lic in listing[1]
    assert run("activations", "list")[1].strip() == "no activations"
    shown = run("license", "show", lic)[1]
    assert "expires_at: 2030-01-01T00:00:00Z" in shown and "created_at: 20" in shown
    assert "products: cad" in shown and "metadata: tier=gold" in shown
    assert "[" not in shown and "{" not in shown  # no Python reprs
    assert run("license", "revoke", lic)[0] == 0
    code, _, err = run("license", "suspend", lic)
    assert code == 1 and "is revoked: it cannot be suspended" in err


def test_license_update_changes_every_term_issue_sets(tmp_path: Path) -> None:
    run = vendor_cli(tmp_path / "a.db")

    for code in ("cad", "sim"):
        assert run("product", "add", code, "--name", code.upper())[0] == 0
    _, out, _ = run(
        "license",
        "issue",
        "--order",
        "o",
        "--product",
        "cad",
        "--seats",
        "2",
        "--json",
        "--expires",
        "2030-01-01",
        "--allowed-ip",
        "10.0.0.0/8",
        "--meta",
        "tier=gold",
    )
    lic = json.loads(out)["id"]
    code, out, err = run(
        "license",
        "update",
        lic,
        "--json",
        "--product",
        "cad",
        "--product",
        "sim",
        "--strategy",
        "per-instance",
        "--user-locked",
        "--allowed-ip",
        "192.168.0.0/16",
        "--effective",
        "2029-01-01",
        "--grace",
        "P1D",
        "--borrow-max",
        "3600",
        "--meta",
        "tier=silver",
        "--feature",
        "export=true",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["products"] == ["cad", "sim"] and doc["strategy"] == "per-instance"
    assert doc["user_locked"] is True and doc["allowed_ips"] == ["192.168.0.0/16"]
    assert doc["grace_seconds"] == 86400 and doc["borrow_max"] == 3600
    assert doc["metadata"] == {"tier": "silver"} and doc["features"] == {"export": True}
    code, out, err = run(
        "license",
        "update",
        lic,
        "--json",
        "--expires",
        "never",
        "--effective",
        "none",
        "--strategy",
        "product",
        "--not-user-locked",
        "--any-ip",
        "--clear-meta",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["expires"] is None and doc["expires_at"] is None and doc["effective_at"] is None
    assert doc["strategy"] is None and doc["user_locked"] is False and doc["allowed_ips"] == []
    assert doc["metadata"] == {} and doc["features"] == {"export": True}
    code, _, err = run("license", "update", lic, "--product", "nope")
    assert code == 1 and "no product" in err
    code, _, err = run("license", "update", lic, "--trial")  # cad has no trial length
    assert code == 2 and "--trial" in err
    assert json.loads(run("license", "show", lic, "--json")[1])["trial"] is False


def test_a_cloned_server_shows_as_two_addresses_on_one_activation(
    authority: Authority, tmp_path: Path
) -> None:
    """A byte-for-byte clone keeps the machine id, so its refreshes name the
    same server; the vendor tells the two apart by where refreshes come from."""
    _, key = authority.issue_license("o-c", Terms(products=["cad"], seats=1), NOW)
    activation_id, _ = authority.activate(key, SERVER, "host", "floatd/1", NOW)
    for n in range(30):  # the newest are kept, not all
        authority.refresh(activation_id, SERVER, NOW + n, "10.0.0.5", "floatd/1")
    authority.refresh(activation_id, SERVER, NOW + 31, "10.0.0.9", "floatd/1")
    kept = authority.store.refreshes(activation_id)
    assert len(kept) == 20 and kept[0][1:] == ("10.0.0.9", "floatd/1")
    out = vendor_cli(tmp_path / "a.db")("activations", "list")[1]
    assert "10.0.0.9, 10.0.0.5 (several servers: a clone?)" in out


def test_site_users_are_shown_and_counted_against_max_users(authority: Authority) -> None:
    lic, key = authority.issue_license("o-m", Terms(products=["sim"], seats=1, max_users=3), NOW)
    activation_id, _ = authority.activate(key, SERVER, "h", "floatd/1", NOW)
    authority.assign_user(lic.id, "ann@example.com")
    authority.refresh(
        activation_id,
        SERVER,
        NOW + 1,
        "10.0.0.5",
        "floatd/1",
        {"sim": ["bob@example.com", "cy@example.com"]},
    )
    assert authority.store.local_users(lic.id) == {"sim": ["bob@example.com", "cy@example.com"]}
    with pytest.raises(AuthorityError) as refused:  # 1 here + 2 at the site = 3 of 3
        authority.assign_user(lic.id, "dee@example.com")
    assert refused.value.error_code == "MAX_USERS_REACHED"
    assert "2 assigned by the site" in refused.value.message
    authority.refresh(activation_id, SERVER, NOW + 2, "10.0.0.5", "floatd/1", {"sim": []})
    assert authority.assign_user(lic.id, "dee@example.com").users == [
        "ann@example.com",
        "dee@example.com",
    ]
    authority.refresh(activation_id, SERVER, NOW + 3)  # an older server: reports nothing
    assert authority.store.local_users(lic.id) == {}


def test_every_vendor_change_is_in_the_trail_with_who_and_before_after(tmp_path: Path) -> None:
    run = vendor_cli(tmp_path / "a.db")

    assert run("product", "add", "sim", "--name", "Sim", "--authorization", "user")[0] == 0
    _, out, _ = run(
        "license", "issue", "--order", "o", "--product", "sim", "--seats", "2", "--json"
    )
    lic = json.loads(out)["id"]
    assert run("license", "update", lic, "--seats", "5")[0] == 0
    assert run("users", "assign", lic, "ann@example.com")[0] == 0
    assert run("users", "unassign", lic, "ann@example.com")[0] == 0
    assert run("license", "suspend", lic)[0] == 0
    assert run("license", "update", lic, "--seats", "-5")[0] == 2  # refused: not in the trail
    _, out, _ = run("history", "--json")
    trail = json.loads(out)
    assert [c["action"] for c in trail] == [
        "license.suspended",
        "user.unassign",
        "user.assign",
        "license.update",
        "license.issue",
        "product.add",
    ]
    assert all(c["actor"].startswith("cli:") and c["at"].endswith("Z") for c in trail)
    update = trail[3]
    assert update["before"]["terms"]["seats"] == 2 and update["after"]["terms"]["seats"] == 5
    _, text, _ = run("history", "--subject", f"license:{lic}")
    assert text.splitlines()[0].split()[:3] == ["AT", "ACTOR", "ACTION"]
    assert "seats: 2 -> 5" in text and "state: active -> suspended" in text
    assert "product.add" not in text
