"""Online activation end to end: the real floatd against the real
floatd-authority over HTTP on loopback, driven through both CLIs."""

from __future__ import annotations

import calendar
import http.client
import http.server
import json
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import AuthorityProcess, Daemon, free_port
from test_integration import floatd_cli

from floatd import __version__
from floatd.authority.cli import main as authority_main
from floatd.client.simple import SimpleClient
from floatd.core.borrow import verify_borrow
from floatd.core.entitlement import (
    KIND_ENTITLEMENT,
    dearmor,
    format_public_key,
    load_private_key,
    parse_activation_request,
    sign_entitlement,
    trusted_keys,
)
from floatd.store.server_key import public_key_text

WAIT = 15.0  # bound on every "until" below


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Vendor:
    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "authority.sqlite3"
        self.key_path = tmp_path / "vendor.pem"
        self.public = self.run("keys", "generate", "--out", str(self.key_path)).splitlines()[0]
        self.key = load_private_key(self.key_path.read_bytes())
        self.run("product", "add", "cad", "--name", "CAD Pro", "--lease-duration", "60")
        self.process = AuthorityProcess(
            self.db, self.key_path, free_port(), tmp_path / "authority.log"
        )

    def run(self, *args: str, code: int = 0) -> str:
        result = CliRunner().invoke(authority_main, ["--db", str(self.db), *args])
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result.stdout

    def issue(self, *args: str) -> tuple[str, str]:
        """(license id, license key)"""
        doc = json.loads(self.run("license", "issue", "--order", "o-1", "--json", *args))
        return doc["id"], doc["license_key"]


@pytest.fixture
def vendor(tmp_path: Path) -> Iterator[Vendor]:
    v = Vendor(tmp_path)
    v.process.start()
    try:
        yield v
    finally:
        v.process.stop()


def site(tmp_path: Path, vendor: Vendor, name: str = "site", **extra: Any) -> Path:
    """A floatd config for one customer server, trusting the vendor's key."""
    root = tmp_path / name
    root.mkdir()
    config = write_config(
        root,
        vendor.key,
        authority__url=vendor.process.url,
        authority__refresh_interval=1,
        authority__timeout=2,
        **extra,
    )
    if name != "site":  # another machine: another fingerprint
        (root / "machine-id").write_text(f"{name:0>32}\n")
    return config


def acquire(d: Daemon, fingerprint: str = "machine-0001") -> dict[str, Any]:
    with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
        assert c.hello()["ok"]
        return c.request("acquire", product="cad", fingerprint=fingerprint)


def acquire_as(c: SimpleClient, user: str, password: str) -> dict[str, Any]:
    """A license user's acquire of the user-authorized product "sim"."""
    return c.request(
        "acquire", product="sim", fingerprint="machine-0001", user=user, password=password
    )


def healthz(d: Daemon) -> tuple[int, Any]:
    status, body = d.http("/healthz")
    return status, json.loads(body)


def names(d: Daemon) -> list[str]:
    """The daemon's log events so far, by name."""
    return [str(e.get("event")) for e in d.events()]


def info(d: Daemon) -> dict[str, Any]:
    with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
        assert c.hello()["ok"]
        return c.request("info", product="cad")


def test_activate_lease_and_follow_the_license_through_refreshes(
    tmp_path: Path, vendor: Vendor
) -> None:
    license_id, key = vendor.issue("--product", "cad", "--seats", "2", "--interval", "P1Y")
    config = site(tmp_path, vendor)
    done = floatd_cli("activate", "--license-key", key, "--config", str(config))
    assert done.returncode == 0 and "activated online" in done.stdout, done.stderr
    state = tmp_path / "site" / "state"
    installed = _payload((state / "entitlement.txt").read_text())
    assert installed["server_key"] == public_key_text(state)  # the authority signed it in
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        assert acquire(d)["ok"]
        status = json.loads(floatd_cli("status", "--json", "--config", str(config)).stdout)
        assert status["activation"]["mode"] == "online" and status["activation"]["refresh_by"]
        # Refreshes that change nothing log `refreshed`, not a new installation.
        until(lambda: names(d).count("refreshed") >= 2, "two refreshes")
        assert names(d).count("entitlement_installed") == 1
        # More seats at the authority: the next refresh brings them.
        vendor.run("license", "update", license_id, "--seats", "5")
        until(lambda: info(d).get("seats") == 5, "the new seat count")
        refreshed = _payload((state / "entitlement.txt").read_text())
        assert refreshed["server_key"] == public_key_text(state)  # refreshes carry it too
        # Suspended: the next refresh is answered 410 and leasing stops at once.
        vendor.run("license", "suspend", license_id)
        until(
            lambda: acquire(d).get("error", {}).get("code") == "NOT_ACTIVATED",
            "NOT_ACTIVATED after a suspension",
        )
        shown = floatd_cli("status", "--config", str(config)).stdout
        assert "last refresh failed:" in shown and "410" in shown, shown  # why, not only logged
        # Reinstated and activated again: leasing resumes without a restart.
        vendor.run("license", "reinstate", license_id)
        again = floatd_cli("activate", "--license-key", key, "--config", str(config))
        assert again.returncode == 0, again.stderr
        until(lambda: acquire(d).get("ok"), "leasing after re-activation")
        status = json.loads(floatd_cli("status", "--json", "--config", str(config)).stdout)
        assert status["activation"]["mode"] == "online"  # at once, with the new entitlement
    activations = json.loads(vendor.run("activations", "list", "--json"))
    assert len(activations) == 1 and activations[0]["refreshed_at"]
    assert activations[0]["addresses"] == ["127.0.0.1"]  # where the refreshes came from
    with sqlite3.connect(vendor.db) as db:
        versions = {v for (v,) in db.execute("SELECT floatd FROM refreshes")}
    assert versions == {__version__}


def test_grace_period_without_the_authority_then_recovery(tmp_path: Path, vendor: Vendor) -> None:
    _, key = vendor.issue("--product", "cad", "--seats", "2", "--grace", "4")
    config = site(tmp_path, vendor, status__listen="127.0.0.1:0")
    assert floatd_cli("activate", "--license-key", key, "--config", str(config)).returncode == 0
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        first = acquire(d, "machine-0001")
        assert first["ok"]
        vendor.process.stop()
        assert acquire(d, "machine-0002")["ok"]  # within the grace: business as usual
        until(
            lambda: acquire(d, "machine-0003").get("error", {}).get("code") == "GRACE_PERIOD_OVER",
            "GRACE_PERIOD_OVER once refresh_by has passed",
        )
        with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
            c.hello()
            renew = c.request("renew", lease=first["lease"], token=first["token"])
            assert renew["error"]["code"] == "GRACE_PERIOD_OVER"
        assert healthz(d) == (503, {"status": "grace_period_over"})
        vendor.process.start()
        # machine-0001 already holds a seat, so this asks for no new one.
        until(lambda: acquire(d, "machine-0001").get("ok"), "recovery once the authority is back")
        assert healthz(d) == (200, {"status": "ok"})
        failures = [e for e in d.events() if e.get("event") == "refresh_failed"]
        assert failures and all("refresh_by" in e for e in failures)


def test_activation_limit_and_deactivate(tmp_path: Path, vendor: Vendor) -> None:
    _, key = vendor.issue("--product", "cad", "--seats", "1")
    one, two = site(tmp_path, vendor, "one"), site(tmp_path, vendor, "two")
    assert floatd_cli("activate", "--license-key", key, "--config", str(one)).returncode == 0
    refused = floatd_cli("activate", "--license-key", key, "--config", str(two))
    assert refused.returncode == 1 and "ACTIVATION_LIMIT_REACHED" in refused.stderr
    assert refused.stderr.count("\n") == 1
    gone = floatd_cli("deactivate", "--config", str(one))
    assert gone.returncode == 0, gone.stderr
    assert not (tmp_path / "one" / "state" / "entitlement.txt").exists()
    assert floatd_cli("activate", "--license-key", key, "--config", str(two)).returncode == 0
    wrong = floatd_cli("activate", "--license-key", "FLT-nope", "--config", str(one))
    assert wrong.returncode == 1 and "LICENSE_NOT_FOUND" in wrong.stderr


def test_deactivate_after_a_suspension_frees_the_place_at_the_authority(
    tmp_path: Path, vendor: Vendor
) -> None:
    """A suspended license's refresh is refused (410) and the server stops
    leasing; `floatd deactivate` then must still tell the authority, or the
    reinstated license finds its one place taken by a server that let go."""
    license_id, key = vendor.issue("--product", "cad", "--seats", "1")
    one, two = site(tmp_path, vendor, "one"), site(tmp_path, vendor, "two")
    assert floatd_cli("activate", "--license-key", key, "--config", str(one)).returncode == 0
    vendor.run("license", "suspend", license_id)
    with Daemon(one, tmp_path / "one.log") as d:
        d.start()
        until(lambda: "activation_revoked" in names(d), "the refused refresh")
    gone = floatd_cli("deactivate", "--config", str(one))
    assert gone.returncode == 0, gone.stderr
    vendor.run("license", "reinstate", license_id)
    done = floatd_cli("activate", "--license-key", key, "--config", str(two))
    assert done.returncode == 0, done.stderr
    states = {a["state"] for a in json.loads(vendor.run("activations", "list", "--json"))}
    assert states == {"released", "active"}


def _payload(armored: str) -> dict[str, Any]:
    """The signed payload of an armored entitlement (not verified: for looking)."""
    envelope = msgpack.unpackb(dearmor(armored, KIND_ENTITLEMENT))
    return dict(msgpack.unpackb(envelope["payload"]))


def offline_request(tmp_path: Path, vendor: Vendor, key: str) -> tuple[Path, Path]:
    """(config, request file): a site that wrote an offline activation request."""
    config = site(tmp_path, vendor)
    request = tmp_path / "request.txt"
    made = floatd_cli(
        "activate", "--offline-request", str(request), "--license-key", key, "--config", str(config)
    )
    assert made.returncode == 0, made.stderr
    return config, request


def test_offline_round_trip_through_both_clis(tmp_path: Path, vendor: Vendor) -> None:
    _, key = vendor.issue("--product", "cad", "--seats", "3")
    config, request = offline_request(tmp_path, vendor, key)
    response = tmp_path / "entitlement.txt"
    vendor.run(
        "offline", "sign", str(request), "--out", str(response), "--key", str(vendor.key_path)
    )
    args = ("activate", "--offline-response", str(response), "--config", str(config))
    installed = floatd_cli(*args)
    assert installed.returncode == 0 and "cad (3)" in installed.stdout, installed.stderr
    assert floatd_cli(*args).returncode == 1  # a response is good once
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        assert acquire(d)["ok"]
    # The request carried the server's own key, and the vendor signed it in.
    state = tmp_path / "site" / "state"
    assert stat.S_IMODE((state / "server.key").stat().st_mode) == 0o600
    mine = public_key_text(state)
    assert parse_activation_request(request.read_text()).server_key == mine
    assert _payload(response.read_text())["server_key"] == mine
    # The same entitlement under another state dir (another key) is refused.
    (state / "server.key").rename(state / "server.key.bak")
    other = floatd_cli("activate", "--offline-response", str(response), "--config", str(config))
    assert other.returncode == 1 and "another server's key" in other.stderr


def test_the_chain_from_the_vendor_key_to_a_borrow_checked_offline(
    tmp_path: Path, vendor: Vendor
) -> None:
    """Issue with borrowing, activate air-gapped, borrow, stop the server: the
    laptop checks the borrow with the vendor's public key and nothing else."""
    _, key = vendor.issue("--product", "cad", "--seats", "2", "--borrow-max", "86400")
    config, request = offline_request(tmp_path, vendor, key)
    response = tmp_path / "entitlement.txt"
    vendor.run(
        "offline", "sign", str(request), "--out", str(response), "--key", str(vendor.key_path)
    )
    args = ("activate", "--offline-response", str(response), "--config", str(config))
    assert floatd_cli(*args).returncode == 0
    laptop = "laptop-fingerprint-0001"
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
            assert c.hello()["ok"]
            held = c.request("acquire", product="cad", fingerprint=laptop)
            got = c.request("borrow", lease=held["lease"], token=held["token"], duration=3600)
            assert got["ok"], got
            too_long = c.request("borrow", lease=held["lease"], token=held["token"], duration=86401)
            assert too_long["error"]["code"] == "BAD_REQUEST"
        d.kill9()
    vendor_public = trusted_keys([format_public_key(vendor.key.public_key())])
    checked = verify_borrow(got["certificate"], vendor_public, laptop, time.time())
    assert checked.product == "cad" and 3500 < checked.seconds_left(time.time()) <= 3600


def test_an_air_gapped_site_activated_through_the_management_api(
    tmp_path: Path, vendor: Vendor
) -> None:
    """The vendor signs the site's request file through the API, not the CLI, and
    the trail keeps it as the vendor's act."""
    license_id, key = vendor.issue("--product", "cad", "--seats", "2")
    config, request = offline_request(tmp_path, vendor, key)
    response = tmp_path / "entitlement.txt"
    api_key = vendor.run("api-keys", "create", "ops").strip()
    body = {"request": request.read_text()}
    status, doc = admin(vendor, "POST", "/v1/admin/offline-activations", api_key, body)
    assert status == 201, doc
    response.write_text(doc["entitlement"])
    site_key = public_key_text(tmp_path / "site" / "state")
    assert _payload(doc["entitlement"])["server_key"] == site_key  # the API signs it in too
    installed = floatd_cli("activate", "--offline-response", str(response), "--config", str(config))
    assert installed.returncode == 0 and "cad (2)" in installed.stdout, installed.stderr
    status, bad = admin(
        vendor, "POST", "/v1/admin/offline-activations", api_key, {"request": "not a request"}
    )
    assert (status, bad["error"]["code"]) == (400, "BAD_REQUEST")
    trail = admin(vendor, "GET", f"/v1/admin/changes?subject=license:{license_id}", api_key)[1]
    assert (trail[0]["actor"], trail[0]["action"]) == (
        "api:ops",
        "activation.offline",
    )  # newest first
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        assert acquire(d)["ok"]


def test_an_offline_response_over_an_online_activation_stays(
    tmp_path: Path, vendor: Vendor
) -> None:
    """The online activation's next refresh used to put its own entitlement
    back over the offline one just installed (its nonce and an activation spent)."""
    _, online_key = vendor.issue("--product", "cad", "--seats", "1")
    _, offline_key = vendor.issue("--product", "cad", "--seats", "4")
    config = site(tmp_path, vendor)
    assert (
        floatd_cli("activate", "--license-key", online_key, "--config", str(config)).returncode == 0
    )
    request, response = tmp_path / "request.txt", tmp_path / "response.txt"
    made = floatd_cli(
        "activate",
        "--offline-request",
        str(request),
        "--license-key",
        offline_key,
        "--config",
        str(config),
    )
    assert made.returncode == 0, made.stderr
    vendor.run(
        "offline", "sign", str(request), "--out", str(response), "--key", str(vendor.key_path)
    )
    installed = floatd_cli("activate", "--offline-response", str(response), "--config", str(config))
    assert installed.returncode == 0 and "no longer refreshed" in installed.stderr, installed.stderr
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()
        time.sleep(3)  # the refresh interval is 1 s: a refresh would have run by now
        assert info(d)["seats"] == 4
        assert "refreshed" not in names(d)
        status = json.loads(floatd_cli("status", "--json", "--config", str(config)).stdout)
        assert status["activation"]["mode"] == "offline"
    gone = floatd_cli("deactivate", "--config", str(config))
    assert gone.returncode == 0, gone.stderr
    assert (tmp_path / "site" / "state" / "entitlement.txt").exists()  # the offline one stays
    states = {
        a["mode"]: a["state"] for a in json.loads(vendor.run("activations", "list", "--json"))
    }
    assert states == {"online": "released", "offline": "active"}


def test_license_users_across_the_two_sides(tmp_path: Path, vendor: Vendor) -> None:
    """The site's own users are reported at each refresh and counted with the
    authority's against max_users; a user the authority unassigns loses their
    lease at the server's next refresh."""
    vendor.run("product", "add", "sim", "--name", "Sim", "--authorization", "user")
    license_id, key = vendor.issue("--product", "sim", "--seats", "5", "--max-users", "2")
    vendor.run("users", "assign", license_id, "ann@example.com")
    config = site(tmp_path, vendor)
    assert floatd_cli("activate", "--license-key", key, "--config", str(config)).returncode == 0
    local = floatd_cli(
        "users", "assign", "bob@example.com", "--product", "sim", "--config", str(config)
    )
    assert local.returncode == 0, local.stderr
    password = floatd_cli(
        "users", "passwd", "ann@example.com", "--generate", "--config", str(config)
    )
    assert password.returncode == 0, password.stderr
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()

        def shown() -> Any:
            return json.loads(vendor.run("license", "show", license_id, "--json"))["local_users"]

        until(lambda: shown() == {"sim": ["bob@example.com"]}, "the site's users at the authority")
        refused = CliRunner().invoke(
            authority_main,
            ["--db", str(vendor.db), "users", "assign", license_id, "cy@example.com"],
        )
        assert refused.exit_code == 1
        assert "1 assigned by the site" in refused.stderr
        with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
            assert c.hello()["ok"]
            got = acquire_as(c, "ann@example.com", password.stdout.strip())
            assert got["ok"], got
            vendor.run("users", "unassign", license_id, "ann@example.com")
            until(lambda: "license_user_unassigned" in names(d), "the unassignment at a refresh")
            renewed = c.request("renew", lease=got["lease"], token=got["token"])
            assert renewed["error"]["code"] == "LEASE_NOT_FOUND"


def test_an_unassignment_that_cannot_be_written_waits_for_the_next_refresh(
    tmp_path: Path, vendor: Vendor
) -> None:
    """Ending the leases of a user the authority unassigned is a state change:
    while the state cannot be written it is refused (the daemon goes on), and
    the next refresh after recovery ends them."""
    vendor.run("product", "add", "sim", "--name", "Sim", "--authorization", "user")
    license_id, key = vendor.issue("--product", "sim", "--seats", "5")
    vendor.run("users", "assign", license_id, "ann@example.com")
    config = site(tmp_path, vendor)
    assert floatd_cli("activate", "--license-key", key, "--config", str(config)).returncode == 0
    pw = floatd_cli("users", "passwd", "ann@example.com", "--generate", "--config", str(config))
    assert pw.returncode == 0, pw.stderr
    fault = tmp_path / "disk-fault"
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start(env={"FLOATD_TEST_WRITE_FAULT": str(fault)})
        with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
            assert c.hello()["ok"]
            got = acquire_as(c, "ann@example.com", pw.stdout.strip())
            assert got["ok"], got
            fault.touch()
            until(lambda: "state_unavailable" in names(d), "the failed write")
            vendor.run("users", "unassign", license_id, "ann@example.com")
            until(lambda: "license_user_not_ended" in names(d), "the refused ending")
            fault.unlink()
            until(lambda: "license_user_unassigned" in names(d), "the ending after recovery")
            renewed = c.request("renew", lease=got["lease"], token=got["token"])
            assert renewed["error"]["code"] == "LEASE_NOT_FOUND"
        assert d.proc is not None and d.proc.poll() is None  # it never stopped


def api(
    vendor: Vendor, method: str, path: str, body: bytes | None = None, key: str | None = None
) -> tuple[int, Any]:
    """One request to the authority; ``key``: an API key, sent as Bearer."""
    conn = http.client.HTTPConnection("127.0.0.1", vendor.process.port, timeout=10)
    try:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def test_the_api_answers_bad_requests_with_its_error_bodies(vendor: Vendor) -> None:
    _, key = vendor.issue("--product", "cad", "--seats", "1")
    assert api(vendor, "GET", "/v1/health") == (200, {"status": "ok"})
    cases = [
        ("POST", "/v1/activations", b"{not json", 400, "BAD_REQUEST"),
        ("POST", "/v1/activations", b"[1, 2]", 400, "BAD_REQUEST"),
        (
            "POST",
            "/v1/activations",
            json.dumps({"license_key": 5, "server": "x"}).encode(),
            400,
            "BAD_REQUEST",
        ),
        ("POST", "/v1/activations", json.dumps({"license_key": key}).encode(), 400, "BAD_REQUEST"),
        ("POST", "/v1/activations", b"{" + b" " * 200_000 + b"}", 413, "BODY_TOO_LARGE"),
        ("GET", "/v1/activations", None, 405, "METHOD_NOT_ALLOWED"),
        ("PUT", "/v1/health", b"{}", 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/v1/activations/act-1/refresh", None, 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/nowhere", None, 404, "NOT_FOUND"),
        (
            "POST",
            "/v1/activations/act-nope/refresh",
            b'{"server": "x"}',
            404,
            "ACTIVATION_NOT_FOUND",
        ),
        ("DELETE", "/v1/activations/act-nope", b'{"server": "x"}', 404, "ACTIVATION_NOT_FOUND"),
        (
            "POST",
            "/v1/activations",
            b'{"license_key": "FLT-x", "server": "s"}',
            403,
            "LICENSE_NOT_FOUND",
        ),
    ]
    for method, path, body, status, code in cases:
        got_status, got = api(vendor, method, path, body)
        assert got_status == status and set(got) == {"error"}, (path, got_status, got)
        assert got["error"]["code"] == code and isinstance(got["error"]["message"], str)
    # Unknown fields are ignored: the request still works.
    body = {"license_key": key, "server": "a" * 32, "hostname": "h", "floatd": "x", "extra": [1]}
    status, got = api(vendor, "POST", "/v1/activations", json.dumps(body).encode())
    assert (
        status == 201 and got["activation_id"] and "BEGIN FLOATD ENTITLEMENT" in got["entitlement"]
    )
    status, _ = api(
        vendor,
        "DELETE",
        f"/v1/activations/{got['activation_id']}",
        b'{"server": "' + b"a" * 32 + b'"}',
    )
    assert status == 204
    assert api(vendor, "GET", "/v1/health")[0] == 200  # still serving after all that


# --- a misbehaving authority --------------------------------------------------------------


class _Fake(http.server.BaseHTTPRequestHandler):
    """Activation works; every refresh gets the next kind of bad answer."""

    key: Ed25519PrivateKey
    server_id: str
    refreshes: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/activations":
            text = sign_entitlement(self.key, self.entitlement())
            self._send(201, json.dumps({"activation_id": "act-1", "entitlement": text}).encode())
            return
        kind = ["500", "garbage", "foreign", "slow"][len(self.refreshes) % 4]
        self.refreshes.append(kind)
        if kind == "500":
            self._send(500, b"oops")
        elif kind == "garbage":
            self._send(200, b"<html>not json")
        elif kind == "foreign":
            text = sign_entitlement(Ed25519PrivateKey.generate(), self.entitlement())
            self._send(200, json.dumps({"entitlement": text}).encode())
        else:
            time.sleep(3)  # beyond [authority] timeout
            self._send(200, b"{}")

    def entitlement(self) -> dict[str, Any]:
        return payload(
            id="ent-good",
            server=self.server_id,
            issued_at=int(time.time()) - 60,
            refresh_by=int(time.time()) + 3600,
            products=[product("cad", seats=2)],
        )


def test_a_misbehaving_authority_never_replaces_a_good_entitlement(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    from conftest import SERVER_ID

    refreshes: list[str] = []
    handler = type(
        "Fake", (_Fake,), {"key": vendor_key, "server_id": SERVER_ID, "refreshes": refreshes}
    )
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        config = write_config(
            tmp_path,
            vendor_key,
            authority__url=url,
            authority__refresh_interval=1,
            authority__timeout=1,
        )
        assert (
            floatd_cli("activate", "--license-key", "FLT-k", "--config", str(config)).returncode
            == 0
        )
        with Daemon(config, tmp_path / "floatd.log") as d:
            d.start()
            until(lambda: len(refreshes) >= 5, "five bad refreshes")
            assert set(refreshes) == {"500", "garbage", "foreign", "slow"}
            assert acquire(d)["ok"]
            status = json.loads(floatd_cli("status", "--json", "--config", str(config)).stdout)
            assert status["activation"]["entitlement_id"] == "ent-good"
            assert status["activation"]["state"] == "active"
            assert (tmp_path / "state" / "entitlement.txt").read_text().startswith("-----BEGIN")
            assert not [
                e
                for e in d.events()
                if e.get("event") == "entitlement_installed" and e.get("entitlement") != "ent-good"
            ]
    finally:
        fake.shutdown()
        fake.server_close()


def test_https_authority_with_a_private_ca(tmp_path: Path) -> None:
    from test_tls import make_cert

    vendor = Vendor(tmp_path)
    cert, key = make_cert(tmp_path, "authority")
    vendor.process = AuthorityProcess(
        vendor.db, vendor.key_path, free_port(), tmp_path / "authority.log", tls=(cert, key)
    )
    _, license_key = vendor.issue("--product", "cad", "--seats", "1")
    vendor.process.start()
    try:
        untrusted = site(tmp_path, vendor, "plain")
        refused = floatd_cli("activate", "--license-key", license_key, "--config", str(untrusted))
        assert refused.returncode == 1 and "cannot reach the authority" in refused.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr  # says why
        assert refused.stderr.count("\n") == 1
        trusting = site(tmp_path, vendor, "trusting", authority__ca_bundle=str(cert))
        done = floatd_cli("activate", "--license-key", license_key, "--config", str(trusting))
        assert done.returncode == 0, done.stderr
    finally:
        vendor.process.stop()


# --- every license model, through both CLIs (offline, so no daemon is needed) --------------

MODELS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "perpetual": (["--seats", "1"], {"not_after": None, "seats": 1}),
    "subscription": (["--seats", "2", "--interval", "P1M"], {"seats": 2, "not_after": "set"}),
    "explicit expiry": (
        ["--seats", "2", "--expires", "2030-01-01"],
        {"not_after": calendar.timegm((2030, 1, 1, 0, 0, 0))},
    ),
    "multi seat with IPs": (
        ["--seats", "25", "--allowed-ip", "10.1.0.0/16", "--allowed-ip", "fd00::/8"],
        {"seats": 25, "allowed_ips": ["10.1.0.0/16", "fd00::/8"]},
    ),
    "unlimited": (["--seats", "-1"], {"seats": -1}),
    "user-locked": (["--seats", "3", "--user-locked"], {"user_locked": True}),
    "effective date": (
        ["--seats", "1", "--effective", "2030-06-01"],
        {"not_before": calendar.timegm((2030, 6, 1, 0, 0, 0))},
    ),
    "trial": (["--seats", "1", "--trial"], {"trial": True, "not_after": "set"}),
    "named users": (
        ["--seats", "2", "--max-users", "5"],
        {"authorization": "user", "users": ["ann@example.com"], "max_users": 5},
    ),
    "per-instance, borrow, metadata": (
        [
            "--seats",
            "4",
            "--strategy",
            "per-instance",
            "--borrow-max",
            "3600",
            "--meta",
            "edition=pro",
            "--feature",
            "export=true",
            "--feature",
            "threads=8",
        ],
        {
            "strategy": "per-instance",
            "borrow_max": 3600,
            "metadata": {"edition": "pro"},
            "features": {"export": True, "threads": 8},
        },
    ),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_license_models_through_both_clis(tmp_path: Path, model: str) -> None:
    import msgpack

    from floatd.cli import main as floatd_main
    from floatd.core.entitlement import KIND_ENTITLEMENT, dearmor

    vendor = Vendor(tmp_path)
    vendor.run("product", "add", "trialware", "--name", "T", "--trial-days", "30")
    vendor.run("product", "add", "named", "--name", "N", "--authorization", "user")
    args, expected = MODELS[model]
    code = {"trial": "trialware", "named users": "named"}.get(model, "cad")
    license_id, key = vendor.issue("--product", code, *args)
    if model == "named users":
        vendor.run("users", "assign", license_id, "ann@example.com")
    config = site(tmp_path, vendor)
    request, response = tmp_path / "req.txt", tmp_path / "ent.txt"

    def floatd(*a: str) -> str:
        result = CliRunner().invoke(
            floatd_main, [*a, "--config", str(config)], env={"FLOATD_CONFIG": ""}
        )
        assert result.exit_code == 0, result.stderr
        return result.stdout

    floatd("activate", "--offline-request", str(request), "--license-key", key)
    vendor.run(
        "offline", "sign", str(request), "--out", str(response), "--key", str(vendor.key_path)
    )
    floatd("activate", "--offline-response", str(response))
    installed = (tmp_path / "site" / "state" / "entitlement.txt").read_text()
    envelope = msgpack.unpackb(dearmor(installed, KIND_ENTITLEMENT))
    ent = msgpack.unpackb(envelope["payload"])
    prod = ent["products"][0]
    for name, value in expected.items():
        got = ent[name] if name in ("not_after", "not_before") else prod[name]
        if value == "set":
            assert isinstance(got, int) and got > time.time(), (name, got)
        else:
            assert got == value, (name, got)


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy for plain HTTP that remembers what went through it."""

    seen: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        from urllib.parse import urlsplit

        self.seen.append(f"{self.command} {self.path}")
        target = urlsplit(self.path)  # absolute-form, as a client speaks to a proxy
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        try:
            conn.request(
                self.command, target.path, body=body, headers={"content-type": "application/json"}
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_DELETE = _forward


def test_the_authority_through_an_http_proxy(tmp_path: Path, vendor: Vendor) -> None:
    seen: list[str] = []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("P", (_Proxy,), {"seen": seen}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        _, key = vendor.issue("--product", "cad", "--seats", "1")
        config = site(
            tmp_path, vendor, authority__proxy=f"http://127.0.0.1:{proxy.server_address[1]}"
        )
        done = floatd_cli("activate", "--license-key", key, "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert seen == [f"POST {vendor.process.url}/v1/activations"]
        assert floatd_cli("deactivate", "--config", str(config)).returncode == 0
        assert len(seen) == 2 and seen[1].startswith("DELETE ")
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_an_activation_the_server_cannot_use_is_given_back(tmp_path: Path, vendor: Vendor) -> None:
    """A failed check on the server (here: it does not trust the vendor's key)
    used to leave the activation counted at the authority."""
    _, key = vendor.issue("--product", "cad", "--seats", "1")
    other = Vendor.__new__(Vendor)  # only a key: a site trusting someone else
    other.key = Ed25519PrivateKey.generate()
    other.process = vendor.process
    config = site(tmp_path, other, "wrong")
    refused = floatd_cli("activate", "--license-key", key, "--config", str(config))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert not (tmp_path / "wrong" / "state" / "entitlement.txt").exists()
    states = [a["state"] for a in json.loads(vendor.run("activations", "list", "--json"))]
    assert states == ["released"]
    right = site(tmp_path, vendor, "right")
    done = floatd_cli("activate", "--license-key", key, "--config", str(right))
    assert done.returncode == 0, done.stderr  # the one place was free


def test_activating_another_license_gives_the_first_back(tmp_path: Path, vendor: Vendor) -> None:
    first_id, first = vendor.issue("--product", "cad", "--seats", "1")
    _, second = vendor.issue("--product", "cad", "--seats", "2")
    config = site(tmp_path, vendor)
    assert floatd_cli("activate", "--license-key", first, "--config", str(config)).returncode == 0
    done = floatd_cli("activate", "--license-key", second, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"of license {first_id}, given back" in done.stdout
    held = {
        a["license"]: a["state"] for a in json.loads(vendor.run("activations", "list", "--json"))
    }
    assert held[first_id] == "released" and sorted(held.values()) == ["active", "released"]


def admin(
    vendor: Vendor, method: str, path: str, key: str | None, doc: Any = None
) -> tuple[int, Any]:
    return api(vendor, method, path, None if doc is None else json.dumps(doc).encode(), key)


def test_the_management_api_over_http(vendor: Vendor) -> None:
    from floatd.authority.admin_api import ROUTES

    assert admin(vendor, "GET", "/v1/admin/products", None)[0] == 401
    assert admin(vendor, "GET", "/v1/admin/products", "FLA-made-up")[0] == 401
    key = vendor.run("api-keys", "create", "ops").strip()
    status, doc = admin(
        vendor,
        "POST",
        "/v1/admin/products",
        key,
        {"code": "sim", "name": "Sim", "authorization": "user"},
    )
    assert status == 201 and doc["code"] == "sim"
    codes = [p["code"] for p in admin(vendor, "GET", "/v1/admin/products", key)[1]]
    assert codes == ["cad", "sim"]
    status, doc = admin(
        vendor,
        "POST",
        "/v1/admin/licenses",
        key,
        {"order": "o-api", "products": ["sim"], "seats": 2, "max_users": 1},
    )
    assert status == 201 and doc["license_key"].startswith("FLT-"), doc
    lic = doc["id"]
    assert admin(vendor, "POST", "/v1/admin/licenses", key, {"order": "o", "seats": 1})[0] == 400
    bad = admin(
        vendor,
        "POST",
        "/v1/admin/licenses",
        key,
        {"order": "o", "products": ["sim"], "seats": 1, "seeats": 2},
    )
    assert bad[0] == 400 and "seeats" in bad[1]["error"]["message"]
    status, doc = admin(vendor, "PATCH", f"/v1/admin/licenses/{lic}", key, {"seats": 9})
    assert status == 200 and doc["seats"] == 9
    assert admin(vendor, "PATCH", f"/v1/admin/licenses/{lic}", key, {"seats": -5})[0] == 400
    path = f"/v1/admin/licenses/{lic}/users/ann%40example.com"
    status, doc = admin(vendor, "PUT", path, key)
    assert status == 200 and doc["users"] == ["ann@example.com"]
    full = admin(vendor, "PUT", f"/v1/admin/licenses/{lic}/users/bob%40example.com", key)
    assert full[0] == 409 and full[1]["error"]["code"] == "MAX_USERS_REACHED"
    assert admin(vendor, "DELETE", path, key)[1]["users"] == []
    status, doc = admin(vendor, "POST", f"/v1/admin/licenses/{lic}/suspend", key)
    assert status == 200 and doc["state"] == "suspended"
    assert admin(vendor, "GET", f"/v1/admin/licenses/{lic}", key)[1]["state"] == "suspended"
    assert admin(vendor, "GET", "/v1/admin/licenses?order=o-api", key)[1][0]["id"] == lic
    trail = admin(vendor, "GET", f"/v1/admin/changes?subject=license:{lic}", key)[1]
    assert [c["action"] for c in trail] == [
        "license.suspended",
        "user.unassign",
        "user.assign",
        "license.update",
        "license.issue",
    ]
    assert {c["actor"] for c in trail} == {"api:ops"}
    _, cad_key = vendor.issue("--product", "cad", "--seats", "1")
    body = {"license_key": cad_key, "server": "f" * 32, "hostname": "h", "floatd": "test"}
    status, done = api(vendor, "POST", "/v1/activations", json.dumps(body).encode())
    assert status == 201
    held = admin(vendor, "GET", "/v1/admin/activations", key)[1]
    assert [a["id"] for a in held] == [done["activation_id"]] and held[0]["state"] == "active"
    status, doc = admin(
        vendor, "POST", f"/v1/admin/activations/{done['activation_id']}/revoke", key
    )
    assert status == 200 and doc["state"] == "revoked"
    assert admin(vendor, "DELETE", "/v1/admin/products", key)[0] == 405
    assert admin(vendor, "GET", "/v1/admin/nothing", key)[0] == 404
    status, spec = admin(vendor, "GET", "/v1/openapi.json", None)
    assert status == 200 and spec["openapi"] == "3.1.0"
    for route in ROUTES:
        assert route.method.lower() in spec["paths"][route.path], route
    vendor.run("api-keys", "revoke", "ops")
    assert admin(vendor, "GET", "/v1/admin/products", key)[0] == 401
