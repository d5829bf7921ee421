"""License users of user-authorized products: passwords, assignment, leasing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from conftest import product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_server import serving

from floatd.cli import main
from floatd.store import users
from floatd.store.users import hash_password, verify_password


def test_passwords_are_salted_scrypt_and_checked_in_constant_time() -> None:
    a, b = hash_password("correct horse", n=2**10), hash_password("correct horse", n=2**10)
    assert a != b and a.startswith("scrypt$1024$8$1$")  # salted
    assert verify_password("correct horse", a) and not verify_password("wrong", a)
    for broken in (None, "", "scrypt$x", "md5$1$2$3$4$5", a.replace("scrypt", "bcrypt")):
        assert not verify_password("correct horse", broken)


def test_an_unknown_user_costs_one_scrypt_like_a_known_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "floatd.sqlite3"
    store = users.UserStore(db)
    store.assign("ann@example.com", "named")
    store.set_password("ann@example.com", hash_password("pw-of-ann", n=2**10))
    store.close()
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(users.hashlib, "scrypt", counting)
    cases = [
        ("ann@example.com", "pw-of-ann", True),
        ("ann@example.com", "wrong", False),
        ("nobody@example.com", "pw-of-ann", False),
        ("vendor@example.com", "anything", False),  # assigned by the authority, no password
    ]
    for email, password, expected in cases:
        calls.clear()
        authority = frozenset({"vendor@example.com"})
        assert users.authenticate(db, email, password, "named", authority) is expected
        assert len(calls) == 1, email
    calls.clear()
    assert not users.authenticate(db, "ann@example.com", "pw-of-ann", "other", frozenset())
    assert len(calls) == 1  # right password, product not assigned: still one check, still no


def cli(config: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, [*args, "--config", str(config)], input=input, env={"FLOATD_CONFIG": ""}
    )
    return result.exit_code, result.stdout, result.stderr


async def test_named_users_end_to_end(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    ent = sign(
        vendor_key,
        products=[
            product(
                "named", seats=5, authorization="user", users=["vendor@example.com"], max_users=2
            ),
            product("app"),
        ],
    )
    config = tmp_path / "floatd.toml"
    async with serving(tmp_path, vendor_key, ent) as h:

        async def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
            return await trio.to_thread.run_sync(lambda: cli(config, *args, input=input))

        assert (await run("users", "assign", "ann@example.com", "--product", "named"))[0] == 0
        code, _, err = await run("users", "assign", "bob@example.com", "--product", "named")
        assert code == 1 and "allows 2 users" in err  # the authority's user counts too
        code, _, err = await run("users", "assign", "ann@example.com", "--product", "app")
        assert code == 1 and "not user-authorized" in err
        code, password, _ = await run("users", "passwd", "ann@example.com", "--generate")
        password = password.strip()
        assert code == 0 and len(password) >= 16
        code, _, err = await run("users", "passwd", "eve@example.com", "--generate")
        assert code == 1 and "not a license user" in err
        code, _, _ = await run(
            "users", "passwd", "vendor@example.com", input="vendor-secret\nvendor-secret\n"
        )
        assert code == 0
        listing = json.loads((await run("users", "list", "--json"))[1])
        assert {r["email"]: (r["assigned"], r["password_set"]) for r in listing} == {
            "ann@example.com": ({"named": "local"}, True),
            "vendor@example.com": ({"named": "authority"}, True),
        }

        c = await h.connect(peer="10.0.0.5")
        ann = await c.acquire("named", user="ann@example.com", password=password)
        assert ann["ok"], ann
        vendor = await c.acquire(
            "named", fingerprint="machine-0002", user="vendor@example.com", password="vendor-secret"
        )
        assert vendor["ok"], vendor
        for who, pw in (("ann@example.com", "wrong"), ("nobody@example.com", password)):
            got = await c.acquire("named", fingerprint="machine-0003", user=who, password=pw)
            assert got["error"]["code"] == "AUTH_FAILED"
        assert (await c.acquire("named", user="ann@example.com"))["error"]["code"] == "AUTH_FAILED"

        code, out, _ = await run("users", "unassign", "ann@example.com", "--product", "named")
        assert code == 0 and "ended 1 lease" in out
        renew = await c.request("renew", lease=ann["lease"], token=ann["token"])
        assert renew["error"]["code"] == "LEASE_NOT_FOUND"
        assert (await c.request("renew", lease=vendor["lease"], token=vendor["token"]))["ok"]
        again = await c.acquire("named", user="ann@example.com", password=password)
        assert again["error"]["code"] == "AUTH_FAILED"
        code, _, err = await run("users", "unassign", "vendor@example.com", "--product", "named")
        assert code == 1 and "authority" in err
    # The passwords are nowhere in clear: not in the state dir, not in the logs.
    logged = capsys.readouterr()
    for secret in (password, "vendor-secret"):
        assert secret not in logged.out and secret not in logged.err
        for f in (tmp_path / "state").rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_a_tampered_hash_beyond_the_memory_bound_fails_cleanly() -> None:
    huge = "scrypt$1048576$32$1$" + "AAAAAAAAAAAAAAAAAAAAAA==" + "$" + "A" * 43 + "="
    assert not verify_password("anything", huge)  # no MemoryError, no ValueError


def test_generated_passwords_never_look_like_an_option() -> None:
    drawn = [users.generate_password() for _ in range(2000)]  # 1 in 64 would start with "-"
    assert not any(p.startswith("-") for p in drawn)
    assert all(len(p) == 20 for p in drawn) and len(set(drawn)) == 2000


def test_the_last_place_goes_to_one_of_two_admins_assigning_at_once(tmp_path: Path) -> None:
    """The places are counted and taken in one write transaction: eight
    assigns at once for one place left give one user, never more."""
    import threading

    db = tmp_path / "state" / "floatd.sqlite3"
    users.UserStore(db).close()  # the schema
    start = threading.Barrier(8)
    results: list[object] = []

    def assign(n: int) -> None:
        store = users.UserStore(db)
        try:
            start.wait(timeout=10)
            results.append(store.assign(f"u{n}@example.com", "named", frozenset({"v@x"}), 2))
        except users.UsersFull as exc:
            results.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=assign, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results.count(True) == 1 and len(results) == 8
    store = users.UserStore(db)
    try:
        assert len(store.local_users("named")) == 1
    finally:
        store.close()
