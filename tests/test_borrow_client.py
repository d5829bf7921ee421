"""The laptop's side of borrowing, against the real ``floatd serve``: the
library borrows and keeps the certificate, works with no server, catches a
clock set back, and returns early; the end user's command line does the same."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon
from test_integration import client, floatd_cli

from floatd.client import (
    FloatingLicense,
    Unreachable,
    borrowed,
    lease,
    machine_fingerprint,
    return_borrow,
)
from floatd.client.borrowing import borrow_dir, parse_duration
from floatd.client.connection import parse_server, server_name
from floatd.core.entitlement import format_public_key, sign_entitlement
from floatd.errors import BorrowClockBack, BorrowUnreadable
from floatd.store.activation import atomic_write
from floatd.store.server_key import load_or_create

DAY = 86400
LAPTOP = "laptop-fingerprint-0001"


@pytest.fixture
def site(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Daemon, list[str]]]:
    """A running server whose entitlement names its key, the vendor keys an
    application would ship with, and a borrow directory of the test's own."""
    monkeypatch.setenv("FLOATD_BORROW_DIR", str(tmp_path / "borrows"))
    cfg = write_config(tmp_path, vendor_key)
    state = tmp_path / "state"
    ent = sign_entitlement(
        vendor_key,
        payload(
            products=[product("cad", seats=2, borrow_max=7 * DAY)],
            server_key=format_public_key(load_or_create(state).public_key()),
            issued_at=int(time.time()) - 60,
        ),
    )
    atomic_write(state / "entitlement.txt", ent)
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        yield d, [format_public_key(vendor_key.public_key())]


def used(d: Daemon) -> int:
    with client(d) as c:
        return int(c.request("info", product="cad")["used"])


async def test_borrow_work_offline_and_return_early(site: tuple[Daemon, list[str]]) -> None:
    d, keys = site
    server = f"127.0.0.1:{d.port}"
    async with lease(server, "cad", fingerprint=LAPTOP) as held:
        certificate = await held.borrow(DAY)
        assert held.borrowed and DAY - 60 < held.expires_in <= DAY
    stored = borrow_dir() / "cad.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert json.loads(stored.read_text())["certificate"] == certificate
    assert used(d) == 1  # the end of the `async with` did not give the borrowed seat back

    d.kill9()  # the trip: no server at all
    got = borrowed("cad", keys, fingerprint=LAPTOP)
    assert got.product == "cad" and got.features == {"export": True}
    async with lease(server, "cad", fingerprint=LAPTOP, vendor_keys=keys) as offline:
        assert offline.borrowed and offline.features == {"export": True}
        assert offline.expires_in > DAY - 120
    with pytest.raises(Unreachable):  # without the vendor's keys nothing is trusted
        async with lease(server, "cad", fingerprint=LAPTOP, connect_timeout=1):
            pass
    with pytest.raises(BorrowClockBack):  # a clock turned back to stretch it
        borrowed("cad", keys, fingerprint=LAPTOP, now=time.time() - 3600)

    d.start(port=d.port)  # back from the trip: return it early
    assert used(d) == 1
    await return_borrow(None, "cad")
    assert used(d) == 0 and not stored.exists()
    with pytest.raises(BorrowUnreadable):
        borrowed("cad", keys, fingerprint=LAPTOP)


def test_the_sync_api_borrows_too(site: tuple[Daemon, list[str]]) -> None:
    d, keys = site
    with FloatingLicense(f"127.0.0.1:{d.port}", "cad", fingerprint=LAPTOP) as lic:
        lic.borrow(3600)
        assert lic.borrowed
    assert used(d) == 1
    assert borrowed("cad", keys, fingerprint=LAPTOP).seconds_left(time.time()) > 3500
    d.kill9()  # offline: the same class finds the stored borrow by itself
    offline = FloatingLicense(
        f"127.0.0.1:{d.port}", "cad", fingerprint=LAPTOP, vendor_keys=keys, connect_timeout=1
    )
    with offline as lic:
        assert lic.borrowed and lic.features == {"export": True} and lic.expires_in > 3500


def test_the_end_users_command_line(site: tuple[Daemon, list[str]]) -> None:
    d, keys = site

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return floatd_cli(*args, module="floatd.client")

    server = f"127.0.0.1:{d.port}"
    done = run("borrow", "--server", server, "--product", "cad", "--for", "2h")
    assert done.returncode == 0 and "borrowed cad until" in done.stdout, done.stderr
    listed = json.loads(run("borrowed", "--vendor-key", keys[0], "--json").stdout)
    assert listed[0]["valid"] and 7000 < listed[0]["seconds_left"] <= 7200
    assert "give --vendor-key" in run("borrowed").stdout
    other = format_public_key(Ed25519PrivateKey.generate().public_key())
    forged = run("borrowed", "--vendor-key", other)
    assert "NOT valid (entitlement)" in forged.stdout
    too_long = run("borrow", "--server", server, "--product", "cad", "--for", "30d")
    assert too_long.returncode == 1 and "BAD_REQUEST" in too_long.stderr
    assert too_long.stderr.count("\n") == 1  # one line, not a traceback
    assert run("borrow", "--server", server, "--product", "cad", "--for", "soon").returncode == 2
    assert used(d) == 1  # the refused borrow's seat was given back
    back = run("return", "--product", "cad")
    assert back.returncode == 0 and used(d) == 0
    assert run("return", "--product", "cad").returncode == 1  # nothing left to return
    assert machine_fingerprint()  # the command line borrowed for this very machine


def test_server_names_read_back() -> None:
    for host, port in (("licenses.lan", 7411), ("10.0.0.5", 7500), ("fd00::5", 7500)):
        assert parse_server(server_name(host, port)) == (host, port)


def test_durations() -> None:
    assert parse_duration("3d") == 3 * DAY and parse_duration("90m") == 5400
    assert parse_duration("3600") == 3600
    for bad in ("0", "-1h", "3 days", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
