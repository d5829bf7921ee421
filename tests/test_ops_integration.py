"""What an admin does with the real ``floatd serve``: the CLI over the admin
socket, the status endpoint over real HTTP, and systemd's notify protocol."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon, free_port
from test_integration import client, entitlement, floatd_cli

from floatd.cli import main
from floatd.client.simple import SimpleClient
from floatd.store.activation import atomic_write

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "floatd.service"


@pytest.fixture
def ops(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> Any:
    cfg = write_config(tmp_path, vendor_key, status__listen="127.0.0.1:0")
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key, seats=2))
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        yield d


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return floatd_cli(*args, "--config", str(d.config))


def test_an_admin_sees_and_frees_a_stuck_seat(ops: Daemon, tmp_path: Path) -> None:
    with client(ops) as c, client(ops) as other:
        stuck = c.request("acquire", product="app", fingerprint="machine-stuck", user="bob")
        c.request(
            "acquire",
            product="app",
            fingerprint="machine-0002",
            hostname="ws2",
            password="hunter2-secret",
        )
        full = other.request("acquire", product="app", fingerprint="machine-0003")
        assert full["error"]["code"] == "NO_FREE_SEATS"

        socket_mode = stat.S_IMODE((tmp_path / "admin.sock").stat().st_mode)
        assert socket_mode == 0o660

        status = cli(ops, "status")
        assert status.returncode == 0, status.stderr
        assert "activation: active" in status.stdout
        assert any(
            line.split()[:4] == ["app", "2", "2", "0"] for line in status.stdout.splitlines()
        )
        doc = json.loads(cli(ops, "status", "--json").stdout)
        assert doc["products"][0]["used"] == 2 and doc["activation"]["state"] == "active"

        table = cli(ops, "leases")
        assert table.returncode == 0 and "machine-stuck" in table.stdout and "ws2" in table.stdout
        assert stuck["token"] not in table.stdout
        rows = json.loads(cli(ops, "leases", "--json", "--product", "app").stdout)
        assert {r["fingerprint"] for r in rows} == {"machine-stuck", "machine-0002"}
        assert all("token" not in r for r in rows)

        revoked = cli(ops, "revoke", stuck["lease"])
        assert revoked.returncode == 0 and stuck["lease"] in revoked.stdout
        assert other.request("acquire", product="app", fingerprint="machine-0003")["ok"]
        renew = c.request("renew", lease=stuck["lease"], token=stuck["token"])
        assert renew["error"]["code"] == "LEASE_NOT_FOUND"
        again = cli(ops, "revoke", stuck["lease"])
        assert again.returncode == 1 and again.stderr.count("\n") == 1

    # The same commands through click's runner, in-process, against the real daemon.
    result = CliRunner().invoke(main, ["leases", "--json", "--config", str(ops.config)])
    assert result.exit_code == 0 and json.loads(result.stdout) == [
        {k: v for k, v in row.items()} for row in json.loads(cli(ops, "leases", "--json").stdout)
    ]
    # No token and no password ever reaches the log.
    assert stuck["token"] not in ops.output() and "hunter2-secret" not in ops.output()

    # Everything above is in the audit, in order, and in the usage report.
    records = json.loads(cli(ops, "audit", "--json", "--since", "1h").stdout)
    events = [(r["event"], r["fingerprint"], r["code"]) for r in records]
    assert events[:3] == [
        ("granted", "machine-stuck", None),
        ("granted", "machine-0002", None),
        ("refused", "machine-0003", "NO_FREE_SEATS"),
    ]
    assert ("revoked", "machine-stuck", None) in events
    assert all("token" not in json.dumps(r) for r in records)
    report = json.loads(cli(ops, "report", "--since", "1h", "--by", "hour", "--json").stdout)
    app = [r for r in report["rows"] if r["product"] == "app"]
    assert max(r["peak_seats"] for r in app) == 2 and report["seats"] == {"app": 2}
    assert sum(r["refusals_no_seat"] for r in app) == 1
    assert sum(r["distinct_machines"] for r in app) >= 3


def test_reload_over_the_admin_socket(ops: Daemon, vendor_key: Ed25519PrivateKey) -> None:
    text = ops.config.read_text()
    ops.config.write_text(text.replace('level = "debug"', 'level = "info"'))
    done = cli(ops, "reload")
    assert done.returncode == 0 and "log.level" in done.stdout
    ops.config.write_text(text + "\n[leases]\ndefault_duration = 0\n")
    bad = cli(ops, "reload")
    assert bad.returncode == 2 and "leases.default_duration" in bad.stderr
    assert bad.stderr.count("\n") == 1
    # SIGHUP does the same; the daemon logs what it did.
    ops.config.write_text(text)
    assert ops.proc is not None
    ops.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(e.get("event") == "reloaded" for e in ops.events()) >= 2:
            break
        time.sleep(0.05)
    reloads = [e for e in ops.events() if e.get("event") == "reloaded"]
    assert len(reloads) == 2 and reloads[-1]["applied"] == ["log.level"]


def test_admin_commands_without_a_daemon_say_so(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    # A lease id with a leading dash is an id, not an option.
    dashed = ["revoke", "-3X37vYyQKVG22YiQBnaKw"]
    for args in (["status"], ["leases"], ["revoke", "x"], dashed, ["reload"]):
        done = floatd_cli(*args, "--config", str(cfg))
        assert done.returncode == 1 and "not running" in done.stderr, args
        assert done.stderr.count("\n") == 1


def test_status_endpoint_over_real_http(ops: Daemon) -> None:
    with client(ops) as c:
        c.request("acquire", product="app", fingerprint="machine-0001")
        code, body = ops.http("/healthz")
        assert code == 200 and json.loads(body) == {"status": "ok"}
        code, body = ops.http("/status")
        assert code == 200 and json.loads(body)["products"][0]["used"] == 1
        code, body = ops.http("/metrics")
        assert code == 200 and b'floatd_seats_used{product="app"} 1.0' in body
        assert ops.http("/status", "HEAD") == (200, b"")
        assert ops.http("/metrics", "DELETE")[0] == 405
        assert ops.http("/", "GET")[0] == 404


def _flood(address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Hostile HTTP clients: huge headers, slow senders, garbage, wrong methods."""
    host, port = address.rsplit(":", 1)
    kinds = [
        b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHo",  # and then nothing: a slow sender
        b"\x00\xff\x13garbage\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    i = 0
    held: list[socket.socket] = []
    while not stop.is_set() and i < 5000:
        kind = kinds[i % len(kinds)]
        i += 1
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(kind)
            if kind.endswith(b"Ho"):
                held.append(s)  # keep it open, sending nothing more
                if len(held) > 40:
                    held.pop(0).close()
                continue
            s.recv(256)
            s.close()
            counts["done"] = counts.get("done", 0) + 1
        except OSError:
            counts["refused"] = counts.get("refused", 0) + 1
    for s in held:
        s.close()


def test_a_flood_on_the_status_port_leaves_leasing_untouched(ops: Daemon) -> None:
    stop = threading.Event()
    counts: dict[str, int] = {}
    threads = [
        threading.Thread(target=_flood, args=(ops.status[0], stop, counts)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        with client(ops) as c:
            for i in range(100):
                got = c.request("acquire", product="app", fingerprint=f"machine-{i:04d}")
                assert got["ok"], got
                assert c.request("release", lease=got["lease"], token=got["token"])["ok"]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert counts.get("done", 0) > 0  # the flood did reach the status port
    # and the status port answers again once it is over.  The server may not
    # yet have seen the flood's last held connections close, and while it counts
    # 32 it resets new ones (its cap), so give it a moment, bounded.
    deadline = time.monotonic() + 10
    while True:
        try:
            status = ops.http("/healthz")[0]
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "the status port stayed full"
            time.sleep(0.1)
    assert status == 200


def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key))
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(10)
    with listener, Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while sum(m == "WATCHDOG=1" for m in messages) < 3 and time.monotonic() < deadline:
            messages.append(listener.recv(4096).decode())
        assert messages[0].splitlines()[0] == "READY=1"
        assert sum(m == "WATCHDOG=1" for m in messages) >= 3
        assert d.terminate() == 0
        rest = []
        listener.settimeout(0.5)
        for _ in range(100):
            try:
                rest.append(listener.recv(4096).decode())
            except TimeoutError:
                break
        assert any(m.splitlines()[0] == "STOPPING=1" for m in rest)


def test_the_unit_file(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    for key, value in {
        "Type": "notify",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "floatd",
        "RuntimeDirectory": "floatd",
        "ConfigurationDirectory": "floatd",
        "CapabilityBoundingSet": "",
        "User": "floatd",
    }.items():
        assert settings.get(key) == value, key
    assert "WatchdogSec" in settings and "ExecReload" in settings
    # It runs the virtualenv README's service section installs, and points at
    # the README that section installs.
    readme = (UNIT.parent.parent / "README.md").read_text()
    executable = settings["ExecStart"].split()[0]
    venv = executable.removesuffix("/bin/floatd")
    assert f"python3 -m venv --without-pip {venv}" in readme
    assert f"--python {venv}/bin/python install ." in readme
    doc = settings["Documentation"].removeprefix("file://")
    assert f"README.md {doc}" in readme
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]
    assert int(settings["LimitNOFILE"]) > 10000  # above the default max_connections
    if shutil.which("systemd-analyze"):
        # Verified as installed, with the virtualenv's floatd standing in.
        stub = tmp_path / "floatd"
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
        unit = tmp_path / UNIT.name
        unit.write_text(text.replace(executable, str(stub)))
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        problems = [
            line
            for line in done.stderr.splitlines()
            if str(UNIT.name) in line or "floatd" in line.lower()
        ]
        assert done.returncode == 0 and not problems, done.stderr
    assert os.access(UNIT, os.R_OK)


def test_the_demo_serves_a_seat_and_its_status_at_once(tmp_path: Path) -> None:
    """README's first command: `floatd demo` needs no vendor and no network."""
    port, status_port = free_port(), free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "floatd",
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--listen",
                f"127.0.0.1:{port}",
                "--status-listen",
                f"127.0.0.1:{status_port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FLOATD_CONFIG": ""},
        )
    try:
        deadline = time.monotonic() + 20
        while b"listening" not in log.read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        with SimpleClient("127.0.0.1", port, timeout=10) as c:
            assert c.hello()["ok"]
            got = c.request("acquire", product="demo", fingerprint="machine-demo-1")
            assert got["ok"] and "DEMO" in got["product"]["name"]
        conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        # README's borrowing line works against the demo too.
        borrowed = subprocess.run(
            [
                *(sys.executable, "-m", "floatd.client", "borrow"),
                *("--server", f"127.0.0.1:{port}", "--product", "demo", "--for", "1d"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "FLOATD_BORROW_DIR": str(tmp_path / "borrows")},
        )
        assert borrowed.returncode == 0 and "borrowed demo until" in borrowed.stdout, (
            borrowed.stderr
        )
        leases = floatd_cli("leases", "--json", "--config", str(tmp_path / "demo" / "floatd.toml"))
        rows = json.loads(leases.stdout)
        assert "machine-demo-1" in [r["fingerprint"] for r in rows]
        assert sum(1 for r in rows if r["borrowed_until"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_every_lease_event_is_logged_at_the_default_level(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key, log__level="info")
    atomic_write(
        tmp_path / "state" / "entitlement.txt",
        entitlement(vendor_key, seats=1, lease_duration=1),
    )
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            first = c.request("acquire", product="app", fingerprint="machine-1", user="ann")
            assert first["ok"], first
            assert c.request("renew", lease=first["lease"], token=first["token"])["ok"]
            refused = c.request("acquire", product="app", fingerprint="machine-2", user="bob")
            assert refused["error"]["code"] == "NO_FREE_SEATS"
            assert c.request("release", lease=first["lease"], token=first["token"])["ok"]
            second = c.request("acquire", product="app", fingerprint="machine-3")
            assert cli(d, "revoke", second["lease"]).returncode == 0
            third = c.request("acquire", product="app", fingerprint="machine-4")
        # The 1 s lease runs out; the log is flushed within a fraction of a second.
        wanted = {
            "lease_granted",
            "lease_renewed",
            "lease_released",
            "lease_revoked",
            "lease_refused",
            "lease_expired",
        }
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = [e for e in d.events() if e.get("event") in wanted]
            if {e["event"] for e in events} == wanted:
                break
            time.sleep(0.1)
        assert {e["event"] for e in events} == wanted
        for e in events:
            assert e["level"] == "info"
            assert {"lease", "product", "fingerprint", "user", "peer"} <= e.keys(), e
            assert e["peer"] == "127.0.0.1"
        by_event = {e["event"]: e for e in events}
        assert by_event["lease_renewed"]["lease"] == first["lease"]
        assert by_event["lease_renewed"]["user"] == "ann"
        assert by_event["lease_refused"]["code"] == "NO_FREE_SEATS"
        assert by_event["lease_refused"]["user"] == "bob"
        assert by_event["lease_expired"]["lease"] == third["lease"]


def test_lease_lines_follow_a_reloaded_log_level(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """Under floatd serve the state writer renders the lease lines; a reload
    that filters info out must stop it too, and one that lets it in restart it."""
    cfg = write_config(tmp_path, vendor_key, log__level="info")
    text = cfg.read_text()
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key, seats=2))

    def lease_events(d: Daemon, want: int) -> list[str]:
        deadline = time.monotonic() + 10
        while True:  # bounded: the deadline
            events = [e["event"] for e in d.events() if e.get("event", "").startswith("lease_")]
            if len(events) >= want or time.monotonic() > deadline:
                return events
            time.sleep(0.05)

    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            got = c.request("acquire", product="app", fingerprint="machine-1")
            assert lease_events(d, 1) == ["lease_granted"]
            cfg.write_text(text.replace('level = "info"', 'level = "warning"'))
            assert cli(d, "reload").returncode == 0
            assert c.request("renew", lease=got["lease"], token=got["token"])["ok"]
            assert c.request("acquire", product="app", fingerprint="machine-2")["ok"]
            cfg.write_text(text)
            assert cli(d, "reload").returncode == 0
            assert c.request("release", lease=got["lease"], token=got["token"])["ok"]
            # The renewal and the second grant, made at warning, left no line.
            assert lease_events(d, 2) == ["lease_granted", "lease_released"]
