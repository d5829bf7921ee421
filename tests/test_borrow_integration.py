"""Borrowing on the real ``floatd serve``: the chain from the vendor's key to a
laptop checking its borrow with no server running, a borrowed seat counted
across kill -9, revoke refused, an early return, and what the admin sees."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon
from test_integration import client, floatd_cli

from floatd.core.borrow import verify_borrow
from floatd.core.entitlement import format_public_key, sign_entitlement, trusted_keys
from floatd.store.activation import atomic_write
from floatd.store.server_key import load_or_create

DAY = 86400
LAPTOP = "laptop-fingerprint-0001"
POLICY = '[[rule]]\nproduct = "cad"\nborrow_lowwater = 1\nborrow_max = 172800\n'


def test_borrow_travel_and_return_on_the_real_daemon(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    cfg = write_config(tmp_path, vendor_key, status__listen="127.0.0.1:0", policy__file=str(policy))
    state = tmp_path / "state"
    # The server's key exists before its first start when it wrote a request;
    # the vendor signs it into the entitlement (here by hand).
    server_key = format_public_key(load_or_create(state).public_key())
    ent = sign_entitlement(
        vendor_key,
        payload(
            products=[product("cad", seats=3, borrow_max=7 * DAY)],
            server_key=server_key,
            issued_at=int(time.time()) - 60,
        ),
    )
    atomic_write(state / "entitlement.txt", ent)
    vendor_keys = trusted_keys([format_public_key(vendor_key.public_key())])

    def cli(*args: str) -> object:
        return floatd_cli(*args, "--config", str(cfg))

    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            held = c.request("acquire", product="cad", fingerprint=LAPTOP, user="ann")
            ref = {"lease": held["lease"], "token": held["token"]}
            too_long = c.request("borrow", duration=3 * DAY, **ref)
            assert too_long["error"]["code"] == "BAD_REQUEST"  # the policy's 2 days
            stranger = c.request("borrow", lease=held["lease"], token="x" * 43, duration=DAY)
            assert stranger["error"]["code"] == "LEASE_NOT_FOUND"
            got = c.request("borrow", duration=DAY, **ref)
            assert got["ok"] and 0 < got["expires_in"] <= DAY, got
            certificate = got["certificate"]
            renewed = c.request("renew", **ref)
            assert renewed["ok"] and renewed["expires_in"] > DAY - 60  # unchanged, time left
            second = c.request("acquire", product="cad", fingerprint="other-laptop-0002")
            ref2 = {"lease": second["lease"], "token": second["token"]}
            assert c.request("borrow", duration=3600, **ref2)["ok"]
            third = c.request("acquire", product="cad", fingerprint="desk-machine-0003")
            kept = c.request("borrow", lease=third["lease"], token=third["token"], duration=3600)
            assert kept["error"] == {
                "code": "BORROW_NOT_ALLOWED",
                "message": kept["error"]["message"],
                "reason": "policy",
            }

        revoke = cli("revoke", held["lease"])
        assert revoke.returncode == 1 and "borrowed until" in revoke.stderr  # type: ignore[attr-defined]
        rows = json.loads(cli("leases", "--json").stdout)  # type: ignore[attr-defined]
        assert sum(1 for r in rows if r["borrowed_until"]) == 2
        assert "BORROWED UNTIL" in cli("leases").stdout  # type: ignore[attr-defined]
        status = json.loads(cli("status", "--json").stdout)  # type: ignore[attr-defined]
        assert status["products"][0]["borrowed"] == 2
        code, body = d.http("/metrics")
        assert code == 200 and b'floatd_seats_borrowed{product="cad"} 2.0' in body
        d.kill9()

    # The laptop, with no server running: the vendor's key is all it needs.
    checked = verify_borrow(certificate, vendor_keys, LAPTOP, time.time())
    assert checked.product == "cad" and checked.seconds_left(time.time()) > DAY - 120

    with Daemon(cfg, tmp_path / "floatd2.log") as d:
        d.start()
        status = json.loads(cli("status", "--json").stdout)  # type: ignore[attr-defined]
        assert status["products"][0]["borrowed"] == 2  # counted across kill -9
        with client(d) as c:
            renewed = c.request("renew", **ref)
            assert renewed["ok"] and renewed["expires_in"] > DAY - 120
            # The early return frees the seat at once.
            used = c.request("info", product="cad")["used"]
            assert c.request("release", **ref2)["ok"]
            assert c.request("info", product="cad")["used"] == used - 1
        records = json.loads(cli("audit", "--json", "--since", "1h").stdout)  # type: ignore[attr-defined]
        events = [r["event"] for r in records]
        assert events.count("borrowed") == 2 and events.count("returned") == 1
        report = json.loads(cli("report", "--since", "1h", "--by", "hour", "--json").stdout)  # type: ignore[attr-defined]
        # The returned borrow and the one still out count as seat time like any lease.
        assert max(r["peak_seats"] for r in report["rows"] if r["product"] == "cad") >= 2
