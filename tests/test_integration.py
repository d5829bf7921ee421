"""The real ``floatd serve`` process on loopback: restarts, kill -9, signals, bad config.

These are the only tests that wait on a real clock; every wait is bounded.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon, children_of, gone, wait_for

from floatd.client.simple import ProtocolError, SimpleClient
from floatd.core.entitlement import sign_entitlement
from floatd.store.activation import atomic_write

CAP = 8


def entitlement(key: Ed25519PrivateKey, **product_fields: Any) -> str:
    fields = {"seats": CAP, "lease_duration": 120, **product_fields}
    return sign_entitlement(
        key, payload(products=[product("app", **fields)], issued_at=int(time.time()) - 60)
    )


@pytest.fixture
def daemon(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> Any:
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key))
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        yield d


def floatd_cli(*args: str, module: str = "floatd") -> subprocess.CompletedProcess[str]:
    """Run the real CLI (bounded in time), ignoring any $FLOATD_CONFIG of the
    caller; ``module``: floatd.client for the end user's borrowing commands."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "FLOATD_CONFIG": ""},
    )


def client(d: Daemon) -> SimpleClient:
    c = SimpleClient("127.0.0.1", d.port, timeout=10)
    assert c.hello()["ok"]
    return c


def test_acquire_renew_release_over_tcp(daemon: Daemon) -> None:
    with client(daemon) as c:
        got = c.request("acquire", product="app", fingerprint="machine-0001")
        assert got["ok"] and got["expires_in"] == 120
        assert c.request("renew", lease=got["lease"], token=got["token"])["ok"]
        assert c.request("info", product="app")["used"] == 1
        assert c.request("release", lease=got["lease"], token=got["token"])["ok"]
        assert c.request("info", product="app")["used"] == 0


def test_garbage_on_one_socket_leaves_others_served(daemon: Daemon) -> None:
    with client(daemon) as good:
        rng = random.Random(7)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as raw:
                raw.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
                raw.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := raw.recv(4096):  # ends when the server closes
                    data += chunk
        assert good.request("ping")["ok"]
    assert "Traceback" not in daemon.output()


def test_sigterm_is_graceful_and_leases_survive_a_restart(daemon: Daemon) -> None:
    with client(daemon) as c:
        got = c.request("acquire", product="app", fingerprint="machine-0001")
    start = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - start < 5
    assert any(e.get("event") == "stopped" for e in daemon.events())
    daemon.start(daemon.port)
    with client(daemon) as c:
        assert c.request("renew", lease=got["lease"], token=got["token"])["ok"]
        assert c.request("info", product="app")["used"] == 1


def test_kill9_under_load_loses_no_acknowledged_lease(daemon: Daemon) -> None:
    """A crash loop: acquires, renewals and releases from several threads,
    kill -9 at a random moment, restart; six times.  Every acquire that was
    answered must be renewable after each restart, and the seats in use never
    exceed the cap."""
    acked: dict[str, str] = {}
    lock = threading.Lock()
    for round_no in range(6):
        stop = threading.Event()

        def hammer(worker: int, round_no: int = round_no, stop: threading.Event = stop) -> None:
            n = 0
            try:
                with client(daemon) as c:
                    while not stop.is_set() and n < 2000:
                        n += 1
                        got = c.request(
                            "acquire",
                            product="app",
                            fingerprint=f"machine-{round_no}-{worker}-{n % 5}",
                        )
                        if got.get("ok"):
                            with lock:
                                acked[got["lease"]] = got["token"]
                            if n % 4 == 1:  # a mixed load: renewals answered lazily too
                                c.request("renew", lease=got["lease"], token=got["token"])
                            if n % 3 == 0:
                                # Once a release is sent the lease's fate is unknown
                                # (the kill may land after its commit), so stop
                                # counting it as held before sending.
                                with lock:
                                    acked.pop(got["lease"], None)
                                c.request("release", lease=got["lease"], token=got["token"])
            except (OSError, ProtocolError):
                return  # the server died under us, as intended

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3 + random.random() * 0.4)
        daemon.kill9()
        stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        daemon.start(daemon.port)
        with client(daemon) as c:
            info = c.request("info", product="app")
            assert info["used"] <= CAP
            for lease, token in list(acked.items()):
                got = c.request("renew", lease=lease, token=token)
                assert got["ok"], f"acknowledged lease {lease} lost after kill -9: {got}"
            # Release some so the next round has seats to fight over.
            for lease, token in list(acked.items())[: len(acked) // 2]:
                assert c.request("release", lease=lease, token=token)["ok"]
                acked.pop(lease)
    assert acked, "the load never got a lease acknowledged"


def test_leases_that_expired_while_down_are_freed(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """After a clean stop the disk is exact, so what expired while down is freed.
    (After a crash, leases alive at the last commit get a bounded extension: see
    test_server.py::test_crash_keeps_lazily_renewed_leases.)"""
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(
        tmp_path / "state" / "entitlement.txt", entitlement(vendor_key, seats=1, lease_duration=1)
    )
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            got = c.request("acquire", product="app", fingerprint="machine-0001")
            assert got["ok"]
        assert d.terminate() == 0
        time.sleep(1.2)
        d.start(d.port)
        with client(d) as c:
            assert c.request("info", product="app")["used"] == 0
            renewed = c.request("renew", lease=got["lease"], token=got["token"])
            assert renewed["error"]["code"] == "LEASE_NOT_FOUND"
            assert c.request("acquire", product="app", fingerprint="machine-0002")["ok"]
        restored = [e for e in d.events() if e.get("event") == "state_restored"]
        assert restored and restored[0]["expired_while_down"] == 1
        assert not any(e.get("event") == "unclean_stop_recovered" for e in d.events())


def test_offline_activation_reaches_a_running_daemon(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            assert (
                c.request("acquire", product="app", fingerprint="machine-0001")["error"]["code"]
                == "NOT_ACTIVATED"
            )
            req = tmp_path / "req.txt"
            assert (
                floatd_cli(
                    "activate",
                    "--config",
                    str(cfg),
                    "--offline-request",
                    str(req),
                    "--license-key",
                    "K-1",
                ).returncode
                == 0
            )
            from floatd.core.entitlement import parse_activation_request

            nonce = parse_activation_request(req.read_text()).nonce
            resp = tmp_path / "resp.txt"
            resp.write_text(
                sign_entitlement(
                    vendor_key,
                    payload(
                        products=[product("app", seats=3)],
                        nonce=nonce,
                        issued_at=int(time.time()) - 60,
                    ),
                )
            )
            assert (
                floatd_cli(
                    "activate", "--config", str(cfg), "--offline-response", str(resp)
                ).returncode
                == 0
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = c.request("acquire", product="app", fingerprint="machine-0001")
                if got["ok"]:
                    break
                time.sleep(0.1)
            assert got["ok"], got
            assert c.request("info", product="app")["seats"] == 3


def test_config_error_exits_2_with_one_line(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key, server__idle_timeout="soon")
    proc = floatd_cli("serve", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "server.idle_timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key))
    with Daemon(cfg, tmp_path / "floatd.log") as d:  # a clean run first
        d.start()
        assert d.terminate() == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = floatd_cli("serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}")
        demo = floatd_cli("demo", "--dir", str(tmp_path / "demo"), "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"127.0.0.1:{port} for the lease port" in proc.stderr, proc.stderr
    # The failed start touched no state: the last stop stays clean (no crash
    # recovery), and the demo never told anyone to take a seat.
    with sqlite3.connect(tmp_path / "state" / "floatd.sqlite3") as db:
        assert dict(db.execute("SELECT key, value FROM meta")).get("clean") == "1"
    assert demo.returncode == 1 and "Take a seat" not in demo.stderr, demo.stderr


def test_kill9_right_after_a_renewal_keeps_the_lease(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """Renewals are answered before their commit; a kill -9 just after one was
    acknowledged must still leave the lease renewable until that renewal's expiry,
    even when the restart comes after the expiry the disk held before it.

    Against a process kill the commit usually wins the race (its WAL write lands
    well before the fsync), and where it does not, crash recovery extends the
    lease; the deterministic test of that recovery is test_server.py::
    test_crash_keeps_lazily_renewed_leases.  This one checks the promise end to
    end, and fails when neither holds."""
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(
        tmp_path / "state" / "entitlement.txt", entitlement(vendor_key, seats=1, lease_duration=6)
    )
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        for attempt in range(2):
            c = client(d)
            got = c.request("acquire", product="app", fingerprint="machine-0001")
            assert got["ok"], got
            for _ in range(2):
                time.sleep(1)
                assert c.request("renew", lease=got["lease"], token=got["token"])["ok"]
            d.kill9()  # at once, before even closing the connection
            acknowledged = time.monotonic()
            c.close()
            d.start(d.port)
            # The disk may hold only the previous renewal (expiring 5 s after the
            # last one); the acknowledged one runs until `acknowledged + 6`.
            time.sleep(max(0.0, acknowledged + 5.3 - time.monotonic()))
            assert time.monotonic() < acknowledged + 6, "restart too slow to test anything"
            with client(d) as c:
                renewed = c.request("renew", lease=got["lease"], token=got["token"])
                assert renewed["ok"], f"attempt {attempt}: acknowledged renewal lost: {renewed}"
                assert c.request("info", product="app")["used"] == 1
                assert c.request("release", lease=got["lease"], token=got["token"])["ok"]
        assert any(e.get("event") == "unclean_stop_recovered" for e in d.events())


def test_ipv6_listener_and_ip_rules(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(
        tmp_path / "state" / "entitlement.txt", entitlement(vendor_key, allowed_ips=["::1/128"])
    )
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start(also=("[::1]:0",))
        v6_port = int(d.addresses[1].rsplit(":", 1)[1])
        with SimpleClient("::1", v6_port) as c:
            assert c.hello()["ok"]
            assert c.request("acquire", product="app", fingerprint="machine-0006")["ok"]
        with client(d) as c:  # over IPv4: outside the allowed range
            got = c.request("acquire", product="app", fingerprint="machine-0004")
            assert got["error"]["code"] == "IP_NOT_ALLOWED"


def test_sighup_installs_a_new_entitlement_at_once(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    path = tmp_path / "state" / "entitlement.txt"
    atomic_write(path, entitlement(vendor_key))
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            held = c.request("acquire", product="app", fingerprint="machine-0001")
            atomic_write(path, entitlement(vendor_key, seats=CAP + 5))
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            # Well inside the 1 s poll (the deterministic test is in test_server.py).
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                if c.request("info", product="app")["seats"] == CAP + 5:
                    break
                time.sleep(0.02)
            assert c.request("info", product="app")["seats"] == CAP + 5
            assert c.request("renew", lease=held["lease"], token=held["token"])["ok"]


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_the_state_writer_process_ends_with_the_server(daemon: Daemon, how: str) -> None:
    """``floatd serve`` commits through one writer child; however the server
    ends, the child must not linger (holding the database's writer lock)."""
    assert daemon.proc is not None
    with client(daemon) as c:
        assert c.request("acquire", product="app", fingerprint="machine-0001")["ok"]
    children = children_of(daemon.proc.pid)
    assert len(children) == 1
    if how == "kill9":
        daemon.kill9()
    else:
        assert daemon.terminate() == 0
    wait_for(lambda: gone(children[0]), "the writer to end", timeout=10)
    daemon.start(daemon.port)  # the next server gets the writer lock
    with client(daemon) as c:
        assert c.request("info", product="app")["used"] == 1


def test_the_state_is_private_whatever_the_umask(daemon: Daemon, tmp_path: Path) -> None:
    """The test made the state dir and the entitlement under umask 022; the
    daemon makes them private, and what it creates itself is private too."""
    state = tmp_path / "state"
    with client(daemon) as c:
        assert c.request("acquire", product="app", fingerprint="machine-0001")["ok"]
    assert state.stat().st_mode & 0o777 == 0o700
    files = [p for p in state.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"entitlement.txt", "floatd.sqlite3"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path.name
