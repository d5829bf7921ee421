"""The client library and `floatd probe` against the real ``floatd serve``."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon
from test_integration import floatd_cli

import floatd.client as fc
from floatd.client.simple import SimpleClient
from floatd.core.entitlement import sign_entitlement
from floatd.errors import NoFreeSeats, UnknownProduct
from floatd.store.activation import atomic_write


@pytest.fixture
def server(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> Iterator[Daemon]:
    import time

    cfg = write_config(tmp_path, vendor_key)
    text = sign_entitlement(
        vendor_key,
        payload(
            issued_at=int(time.time()) - 60,
            products=[
                product("app", seats=2, lease_duration=4),
                product("inst", seats=2, lease_duration=30, strategy="per-instance"),
            ],
        ),
    )
    atomic_write(tmp_path / "state" / "entitlement.txt", text)
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        yield d


def used(d: Daemon, code: str = "app") -> int:
    with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
        c.hello()
        return int(c.request("info", product=code)["used"])


def addr(d: Daemon) -> str:
    return f"127.0.0.1:{d.port}"


async def test_a_server_restart_keeps_the_same_lease_and_seat(server: Daemon) -> None:
    with trio.fail_after(40):
        async with fc.lease(addr(server), "app", fingerprint="machine-restart") as held:
            assert held.lease_duration == 4 and held.features == {"export": True}
            first_id = held.id
            await trio.to_thread.run_sync(server.terminate)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(server.start, server.port)
            renewals = held.renewals
            while held.renewals < renewals + 2:  # renewed at least twice on the new process
                await trio.sleep(0.1)
            assert held.id == first_id and not held.lost.is_set()
            assert await trio.to_thread.run_sync(used, server) == 1  # counted once
        assert await trio.to_thread.run_sync(used, server) == 0  # released on exit


async def test_the_server_down_past_expiry_reports_the_loss(server: Daemon) -> None:
    seen: list[str] = []
    with trio.fail_after(30):
        async with fc.lease(
            addr(server), "app", on_lost=lambda lease: seen.append(str(lease.lost_code))
        ) as held:
            await trio.to_thread.run_sync(server.kill9)
            assert await held.wait_lost() == fc.UNREACHABLE
            assert seen == [fc.UNREACHABLE] and held.expires_in == 0


async def test_a_renewal_refused_as_unavailable_is_retried_not_lost(
    server: Daemon, tmp_path: Path
) -> None:
    """The daemon's writes fail for 2 s (its test switch); the lease lasts 4 s:
    renewals refused with UNAVAILABLE are retried, and the seat is kept."""
    fault = tmp_path / "write.fault"
    await trio.to_thread.run_sync(server.terminate)
    await trio.to_thread.run_sync(
        lambda: server.start(server.port, env={"FLOATD_TEST_WRITE_FAULT": str(fault)})
    )
    with trio.fail_after(30):
        async with fc.lease(addr(server), "app") as held:
            fault.touch()
            await trio.sleep(2.5)
            fault.unlink()
            renewals = held.renewals
            while held.renewals < renewals + 2:
                await trio.sleep(0.1)
            assert not held.lost.is_set()
    refused = [e for e in server.events() if e.get("code") == "UNAVAILABLE"]
    assert refused, "no renewal met the fault"


async def test_a_revoke_reports_the_loss(server: Daemon) -> None:
    with trio.fail_after(30):
        async with fc.lease(addr(server), "app") as held:
            done = await trio.to_thread.run_sync(
                lambda: floatd_cli("revoke", held.id, "--config", str(server.config))
            )
            assert done.returncode == 0, done.stderr
            assert await held.wait_lost() == "LEASE_NOT_FOUND"


async def test_cancellation_releases_the_seat(server: Daemon) -> None:
    with trio.move_on_after(1) as scope:
        async with fc.lease(addr(server), "app"):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert await trio.to_thread.run_sync(used, server) == 0


async def test_refusals_are_typed_and_servers_are_tried_in_order(server: Daemon) -> None:
    with pytest.raises(UnknownProduct):
        async with fc.lease(addr(server), "nope"):
            pass
    dead = "127.0.0.1:1"
    async with fc.lease([dead, addr(server)], "app") as held:
        assert held.server == ("127.0.0.1", server.port)
    with pytest.raises(fc.Unreachable):
        async with fc.lease(dead, "app", connect_timeout=1):
            pass


def test_the_sync_api_from_plain_threads(server: Daemon) -> None:
    results: dict[int, Any] = {}
    licenses: dict[int, fc.FloatingLicense] = {}

    def worker(n: int) -> None:
        lic = fc.FloatingLicense(
            addr(server), "inst", fingerprint="machine-shared", instance=f"p{n}"
        )
        try:
            results[n] = lic.acquire(timeout=20).lease_id
            licenses[n] = lic
        except NoFreeSeats as exc:
            results[n] = exc

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    held = [n for n, r in results.items() if isinstance(r, str)]
    refused = [n for n, r in results.items() if isinstance(r, NoFreeSeats)]
    assert len(held) == 2 and len(refused) == 1  # per instance: two seats, the third refused
    assert used(server, "inst") == 2
    lic = licenses[held[0]]
    assert lic.held and lic.expires_in > 20 and lic.product["code"] == "inst"
    lic.release()
    assert not lic.held and used(server, "inst") == 1
    with fc.FloatingLicense(addr(server), "inst", instance="p9") as again:
        assert again.held and used(server, "inst") == 2
    licenses[held[1]].release()
    assert used(server, "inst") == 0


def test_probe_exit_codes(server: Daemon) -> None:
    ok = floatd_cli("probe", "--server", addr(server), "--product", "app", "--lease")
    assert ok.returncode == 0 and "took a seat" in ok.stdout and ok.stdout.endswith("ok\n")
    refused = floatd_cli("probe", "--server", addr(server), "--product", "nope", "--json")
    assert refused.returncode == 1
    report = json.loads(refused.stdout)
    assert report["result"] == "refused" and report["error"]["code"] == "UNKNOWN_PRODUCT"
    down = floatd_cli("probe", "--server", "127.0.0.1:1", "--product", "app", "--timeout", "1")
    assert down.returncode == 3 and "unreachable" in down.stdout
    usage = floatd_cli("probe", "--server", "not a server", "--product", "app")
    assert usage.returncode == 2
    assert used(server) == 0  # the probe gave its seat back


def test_the_readme_examples_hold_a_seat(server: Daemon, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 2  # the async and the sync example
    for code in blocks:
        script = tmp_path / "example.py"
        script.write_text(code.replace("licenses.lan:7411", addr(server)).replace('"cad"', '"app"'))
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "'export': True" in done.stdout
    assert used(server) == 0


def test_server_addresses_and_refusal_mapping() -> None:
    from floatd.client.connection import refusal
    from floatd.errors import LeaseNotFound

    assert fc.parse_server("lic.lan") == ("lic.lan", 7411)
    assert fc.parse_server("10.0.0.5:7500") == ("10.0.0.5", 7500)
    assert fc.parse_server("[fd00::5]:7500") == ("fd00::5", 7500)
    assert fc.parse_server("fd00::5") == ("fd00::5", 7411)
    for bad in ("", "a b", "host:port", "host:0", "host:70000", "[::1]:x"):
        with pytest.raises(ValueError):
            fc.parse_server(bad)
    seats = refusal({"code": "NO_FREE_SEATS", "message": "full", "seats": 2, "used": 2})
    assert isinstance(seats, NoFreeSeats) and seats.details == {"seats": 2, "used": 2}
    assert isinstance(refusal({"code": "LEASE_NOT_FOUND", "message": "x"}), LeaseNotFound)
    novel = refusal({"code": "SOMETHING_NEW", "message": "from a later server"})
    assert isinstance(novel, fc.UnknownRefusal) and fc.wire_code(novel) == "SOMETHING_NEW"
    for odd in (None, "text", {"code": "CONFIG", "message": "not a wire code"}):
        assert isinstance(refusal(odd), fc.UnknownRefusal)  # never a success
    assert len(fc.machine_fingerprint()) == 32 and fc.INSTANCE_ID


def test_probe_with_an_unusable_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    done = floatd_cli("probe", "--server", "127.0.0.1:1", "--product", "app", "--tls-ca", str(bad))
    assert done.returncode == 2 and "--tls-ca" in done.stderr and "Traceback" not in done.stderr
    missing = floatd_cli(
        "probe", "--server", "127.0.0.1:1", "--product", "app", "--tls-ca", "/nope"
    )
    assert missing.returncode == 2


def test_probe_and_the_simple_client_lease_as_a_license_user(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path, vendor_key)
    text = sign_entitlement(
        vendor_key,
        payload(
            issued_at=int(time.time()) - 60,
            products=[product("named", seats=2, authorization="user", max_users=5)],
        ),
    )
    atomic_write(tmp_path / "state" / "entitlement.txt", text)
    user = "ann@example.com"
    assert (
        floatd_cli("users", "assign", user, "--product", "named", "--config", str(cfg)).returncode
        == 0
    )
    made = floatd_cli("users", "passwd", user, "--generate", "--config", str(cfg))
    password = made.stdout.strip()
    assert made.returncode == 0 and password

    def run(*args: str, secret: str | None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLOATD_CONFIG": ""}
        env.pop("FLOATD_PASSWORD", None)
        if secret is not None:
            env["FLOATD_PASSWORD"] = secret
        return subprocess.run(
            [sys.executable, "-m", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        probe = ("floatd", "probe", "--server", addr(d), "--product", "named", "--lease")
        assert run(*probe, "--user", user, "--password", secret=password).returncode == 0
        refused = run(*probe, "--user", user, "--password", secret="wrong")
        assert refused.returncode == 1 and "AUTH_FAILED" in refused.stdout
        simple = ("floatd.client.simple", addr(d), "named", "--once", "--user", user, "--password")
        held = run(*simple, secret=password)
        assert held.returncode == 0 and "leased a seat" in held.stdout, held.stderr
        assert run(*simple, secret="wrong").returncode == 1
        assert used(d, "named") == 0  # every seat given back
