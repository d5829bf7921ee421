"""Faults injected into the real ``floatd serve``: a disk that refuses writes, a
writer process stopped or killed, and the server killed on top of them.

The disk fault is the store's test switch (``FLOATD_TEST_WRITE_FAULT`` names a
file; while it exists every write fails as an I/O error would).  After each
fault: no seat over the cap, every acknowledged lease renewable, and the server
serving again by itself.  Every wait is bounded.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon, children_of, gone, wait_for
from test_integration import floatd_cli

from floatd.client.simple import SimpleClient
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.core.entitlement import parse_activation_request, sign_entitlement
from floatd.core.secrets import new_lease_secrets
from floatd.store.activation import atomic_write

CAP = 2


@pytest.fixture
def setup(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> Iterator[tuple[Daemon, Path]]:
    cfg = write_config(tmp_path, vendor_key, status__listen="127.0.0.1:0")
    ent = sign_entitlement(
        vendor_key,
        payload(
            products=[product("app", seats=CAP, lease_duration=120)],
            issued_at=int(time.time()) - 60,
        ),
    )
    atomic_write(tmp_path / "state" / "entitlement.txt", ent)
    fault = tmp_path / "write.fault"
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.env = {"FLOATD_TEST_WRITE_FAULT": str(fault)}
        yield d, fault


def client(d: Daemon) -> SimpleClient:
    c = SimpleClient("127.0.0.1", d.port, timeout=15)
    assert c.hello()["ok"]
    return c


def health(d: Daemon) -> tuple[int, str]:
    status, body = d.http("/healthz")
    return status, json.loads(body)["status"]


def acquire(c: SimpleClient, fingerprint: str) -> dict[str, Any]:
    return c.request("acquire", product="app", fingerprint=fingerprint)


def writer_of(d: Daemon) -> int:
    assert d.proc is not None
    children = children_of(d.proc.pid)
    assert len(children) == 1, children
    return children[0]


def test_a_failing_disk_frees_nothing_and_the_server_comes_back(
    setup: tuple[Daemon, Path],
) -> None:
    d, fault = setup
    d.start(env=d.env)
    with client(d) as c:
        a, b = acquire(c, "machine-a"), acquire(c, "machine-b")
        assert a["ok"] and b["ok"]
        fault.touch()
        got = c.request("release", lease=a["lease"], token=a["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        assert acquire(c, "machine-c")["error"]["code"] == "UNAVAILABLE"
        assert health(d) == (503, "state_unavailable")
        shown = floatd_cli("status", "--config", str(d.config))
        assert shown.returncode == 0 and "state: UNAVAILABLE" in shown.stdout, shown.stdout
        errors = [e for e in d.events() if e.get("event") == "state_unavailable"]
        assert len(errors) == 1 and errors[0]["level"] == "error"
        fault.unlink()
        wait_for(lambda: health(d)[0] == 200, "the server to write again")
        assert acquire(c, "machine-c")["error"]["code"] == "NO_FREE_SEATS"
    d.kill9()
    d.start(d.port, env=d.env)
    with client(d) as c:
        for lease in (a, b):
            assert c.request("renew", lease=lease["lease"], token=lease["token"])["ok"]
        assert c.request("info", product="app")["used"] == CAP


def test_a_start_on_a_failing_disk_serves_and_waits(setup: tuple[Daemon, Path]) -> None:
    d, fault = setup
    d.start(env=d.env)
    with client(d) as c:
        held = acquire(c, "machine-a")
    assert d.terminate() == 0
    fault.touch()
    d.start(d.port, env=d.env)  # does not exit
    assert health(d) == (503, "state_unavailable")
    with client(d) as c:
        assert c.request("info", product="app")["used"] == 1
        got = c.request("renew", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        fault.unlink()
        wait_for(lambda: health(d)[0] == 200, "the server to write again")
        assert c.request("renew", lease=held["lease"], token=held["token"])["ok"]


def test_a_stopped_writer_costs_seconds_and_sigterm_still_stops(
    setup: tuple[Daemon, Path],
) -> None:
    d, _ = setup
    d.start(env=d.env)
    with client(d) as c:
        held = acquire(c, "machine-a")
        stopped = writer_of(d)
        os.kill(stopped, signal.SIGSTOP)
        try:
            asked = time.monotonic()
            got = acquire(c, "machine-b")
            took = time.monotonic() - asked
        finally:
            if not gone(stopped):
                os.kill(stopped, signal.SIGCONT)
        assert got["error"]["code"] == "UNAVAILABLE"
        assert took < 8, took
        wait_for(lambda: gone(stopped), "the stopped writer to be killed")
        wait_for(lambda: health(d)[0] == 200, "the server to write again")
        assert c.request("renew", lease=held["lease"], token=held["token"])["ok"]
        assert acquire(c, "machine-b")["ok"]
        os.kill(writer_of(d), signal.SIGSTOP)
    started = time.monotonic()
    assert d.terminate(timeout=20) == 0
    assert time.monotonic() - started < 12


def test_a_server_killed_beside_its_stopped_writer_restarts(setup: tuple[Daemon, Path]) -> None:
    d, _ = setup
    d.start(env=d.env)
    with client(d) as c:
        held = acquire(c, "machine-a")
    stopped = writer_of(d)
    os.kill(stopped, signal.SIGSTOP)
    d.kill9()
    wait_for(lambda: gone(stopped), "the orphaned writer to die with its server")
    d.start(d.port, env=d.env)
    with client(d) as c:
        assert c.request("renew", lease=held["lease"], token=held["token"])["ok"]


def test_writer_kills_and_server_kills_never_exceed_the_cap(setup: tuple[Daemon, Path]) -> None:
    """Rounds of: clients release and acquire while the writer is killed at a
    random moment, then the server is killed.  After each restart, no more
    seats than the cap, and every lease whose grant or renewal was answered ok
    and not released ok is still renewable."""
    d, fault = setup
    rng = random.Random(18)
    d.start(env=d.env)
    held: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    for round_no in range(6):
        assert time.monotonic() < deadline, "the crash loop ran out of time"
        with client(d) as c:
            wait_for(lambda: health(d)[0] == 200, "the server to write again")
            writer = writer_of(d)
            ops = rng.randrange(4, 12)
            kill_at = rng.randrange(ops)
            for i in range(ops):
                if i == kill_at:
                    os.kill(writer, signal.SIGKILL)
                if held and rng.random() < 0.5:
                    lease_id = rng.choice(sorted(held))
                    lease = held[lease_id]
                    got = c.request("release", lease=lease_id, token=lease["token"])
                    if got["ok"] or got["error"]["code"] == "UNAVAILABLE":
                        # A writer killed between its commit and its answer makes
                        # the outcome of an UNAVAILABLE release unknown.
                        del held[lease_id]
                else:
                    got = acquire(c, f"machine-{round_no}-{i}")
                    if got["ok"]:
                        held[got["lease"]] = got
            if round_no % 2:
                fault.touch()  # a disk fault on top, in every other round
        d.kill9()
        fault.unlink(missing_ok=True)
        d.start(d.port, env=d.env)
        with client(d) as c:
            used = c.request("info", product="app")["used"]
            assert used <= CAP, f"round {round_no}: {used} seats held of {CAP}"
            for lease_id, lease in held.items():
                got = c.request("renew", lease=lease_id, token=lease["token"])
                assert got["ok"], f"round {round_no}: acknowledged lease lost: {got}"
    # Killed writers end quietly: the log is JSON lines, never a traceback.
    assert "Traceback" not in d.log.read_text()


def _state_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.iterdir() if p.name.startswith("floatd.sqlite3"))


def test_a_flood_grows_the_state_and_the_log_by_a_bounded_amount(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """20,000 renewals of made-up leases and 20,000 acquires past the rate limit
    from one address, pipelined: the database and the log grow by kilobytes."""
    cfg = write_config(tmp_path, vendor_key, limits__acquires_per_second=20, log__level="info")
    ent = sign_entitlement(
        vendor_key, payload(products=[product("app", seats=0)], issued_at=int(time.time()) - 60)
    )
    atomic_write(tmp_path / "state" / "entitlement.txt", ent)
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            assert acquire(c, "machine-warm")["ok"]
        time.sleep(1.5)  # a commit or two: the database's size settles
        state, log = tmp_path / "state", tmp_path / "floatd.log"
        db_before, log_before = _state_bytes(state), log.stat().st_size
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
        decoder = FrameDecoder()
        with sock:
            sock.sendall(encode_frame({"op": "hello", "id": 0, "versions": [1], "client": "x"}))
            owed = 1  # hello's answer
            for _ in range(20):
                frames = []
                for n in range(1000):
                    lease, token = new_lease_secrets()
                    frames.append(
                        encode_frame({"op": "renew", "id": 1, "lease": lease, "token": token})
                    )
                    frames.append(
                        encode_frame(
                            {"op": "acquire", "id": 2, "product": "app", "fingerprint": f"m{n}"}
                        )
                    )
                sock.sendall(b"".join(frames))
                owed += len(frames)
                while owed:
                    data = sock.recv(1 << 20)
                    assert data, "the server hung up on the flood"
                    decoder.feed(data)
                    while decoder.next_frame() is not None:
                        owed -= 1
        time.sleep(1.5)
        db_growth = _state_bytes(state) - db_before
        log_growth = log.stat().st_size - log_before
        print(f"flood of 40,000 refusals: database +{db_growth} B, log +{log_growth} B")
        assert db_growth < 2_000_000, db_growth
        assert log_growth < 500_000, log_growth


def refused_start(d: Daemon) -> str:
    """Start the daemon expecting it to refuse: its one line of output."""
    with pytest.raises(RuntimeError, match="exited with 1") as failed:
        d.start(d.port, env=d.env)
    output = str(failed.value)
    assert "Traceback" not in output
    return output


def test_a_database_deleted_while_running_is_noticed_and_not_started_on(
    setup: tuple[Daemon, Path],
) -> None:
    d, _ = setup
    d.start(env=d.env)
    state = d.config.parent / "state"
    with client(d) as c:
        assert acquire(c, "machine-a")["ok"]
    for path in state.glob("floatd.sqlite3*"):
        path.unlink()
    wait_for(lambda: health(d) == (503, "state_unavailable"), "the loss to be noticed", 5)
    assert any("deleted" in e.get("reason", "") for e in d.events() if e.get("level") == "error")
    d.kill9()
    output = refused_start(d)
    assert "missing or empty" in output and "floatd state reset" in output
    reset = floatd_cli("state", "reset", "--config", str(d.config))
    assert reset.returncode == 2 and "--yes" in reset.stderr
    reset = floatd_cli("state", "reset", "--yes", "--config", str(d.config))
    assert reset.returncode == 0, reset.stderr
    d.start(d.port, env=d.env)
    with client(d) as c:
        assert c.request("info", product="app")["used"] == 0


@pytest.mark.parametrize("damage", ["truncated", "wal_lost", "garbage"])
def test_a_damaged_database_is_refused_with_one_line(
    setup: tuple[Daemon, Path], damage: str
) -> None:
    d, _ = setup
    d.start(env=d.env)
    database = d.config.parent / "state" / "floatd.sqlite3"
    with client(d) as c:
        for n in range(40):  # some pages to damage
            c.request("acquire", product="app", fingerprint=f"m-{n}", hostname="h" * 200)
    if damage == "wal_lost":
        d.kill9()  # no checkpoint: the recent commits live in the WAL alone
        for suffix in ("-wal", "-shm"):
            database.with_name(database.name + suffix).unlink(missing_ok=True)
    else:
        assert d.terminate() == 0  # a clean stop checkpoints: the pages are in the file
        if damage == "truncated":
            database.write_bytes(b"")
        else:
            with open(database, "r+b") as fh:
                fh.seek(database.stat().st_size // 2)
                fh.write(random.Random(5).randbytes(8192))
    output = refused_start(d)
    assert "floatd state reset" in output, output
    assert ("damaged" if damage == "garbage" else "missing or empty") in output


def test_a_clock_mark_far_ahead_is_reset_from_the_command_line(
    setup: tuple[Daemon, Path],
) -> None:
    """As after a start with the clock a year ahead, then put right: the state
    says it has seen a time a year from now."""
    d, _ = setup
    d.start(env=d.env)
    assert d.terminate() == 0
    database = d.config.parent / "state" / "floatd.sqlite3"
    ahead = repr(time.time() + 365 * 86400)
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("clock_mark", ahead), ("last_cut", ahead)],
        )
    d.start(d.port, env=d.env)
    with client(d) as c:
        assert acquire(c, "machine-a")["error"]["code"] == "SERVER_TIME_MODIFIED"
        assert health(d) == (503, "time_modified")
        unconfirmed = floatd_cli("clock", "reset", "--config", str(d.config))
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
        reset = floatd_cli("clock", "reset", "--yes", "--config", str(d.config))
        assert reset.returncode == 0, reset.stderr
        assert "clock mark reset" in reset.stdout
        assert acquire(c, "machine-a")["ok"]
    audit = floatd_cli(
        "audit", "--since", "1h", "--event", "clock_reset", "--config", str(d.config)
    )
    assert audit.returncode == 0 and "clock_reset" in audit.stdout, audit.stdout + audit.stderr
    d.kill9()
    d.start(d.port, env=d.env)  # and it stays reset across a restart
    assert health(d) == (200, "ok")


def test_an_old_offline_response_copied_back_is_refused(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    responses = []
    for seats, age in ((50, 600), (5, 60)):  # the vendor sold 50 seats, then 5
        req = tmp_path / f"req-{seats}.txt"
        made = floatd_cli(
            "activate", "--config", str(cfg), "--offline-request", str(req), "--license-key", "K"
        )
        assert made.returncode == 0, made.stderr
        nonce = parse_activation_request(req.read_text()).nonce
        resp = tmp_path / f"resp-{seats}.txt"
        resp.write_text(
            sign_entitlement(
                vendor_key,
                payload(
                    products=[product("app", seats=seats)],
                    nonce=nonce,
                    issued_at=int(time.time()) - age,
                ),
            )
        )
        responses.append(resp)
    for resp in responses:
        done = floatd_cli("activate", "--config", str(cfg), "--offline-response", str(resp))
        assert done.returncode == 0, done.stderr
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        with client(d) as c:
            assert c.request("info", product="app")["seats"] == 5
            installed = tmp_path / "state" / "entitlement.txt"
            atomic_write(installed, responses[0].read_text())  # the 50-seat one, copied back
            time.sleep(3)  # the daemon polls the file every second
            assert c.request("info", product="app")["seats"] == 5
        rejected = [e for e in d.events() if e.get("event") == "entitlement_rejected"]
        assert len(rejected) == 1 and "copied back" in rejected[0]["reason"]
        # The CLI's own replay is refused too (its nonce is used up).
        again = floatd_cli(
            "activate", "--config", str(cfg), "--offline-response", str(responses[0])
        )
        assert again.returncode == 1


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_buffers_of_closed_connections_are_given_back(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """600 connections each send most of a 64 KiB frame and hang up: what
    their buffers took is given back to the OS within seconds."""
    cfg = write_config(tmp_path, vendor_key, limits__connections_per_address=0)
    ent = sign_entitlement(
        vendor_key, payload(products=[product("app")], issued_at=int(time.time()) - 60)
    )
    atomic_write(tmp_path / "state" / "entitlement.txt", ent)
    partial = struct.pack(">I", 65536) + b"\x80" * 60_000
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        before = _rss_mib(pid)
        socks = []
        try:
            for _ in range(600):
                s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
                socks.append(s)
                s.sendall(partial)
            wait_for(lambda: _rss_mib(pid) > before + 40, "the buffers to fill", 10)
            time.sleep(1.0)  # the last of them
            held = _rss_mib(pid)
        finally:
            for s in socks:
                s.close()
        wait_for(
            lambda: _rss_mib(pid) < before + (held - before) / 4,
            f"memory back (start {before:.0f} MiB, held {held:.0f} MiB)",
            15,
        )
        with client(d) as c:
            assert acquire(c, "machine-a")["ok"]


def test_a_writer_that_must_wait_for_the_lock_says_so(setup: tuple[Daemon, Path]) -> None:
    """As when an earlier server's writer is still finishing a commit: the new
    server waits for the lock, logs what it waits for, and starts once it is free."""
    d, _ = setup
    d.start(env=d.env)
    assert d.terminate() == 0
    lock_file = d.config.parent / "state" / "floatd.sqlite3.writer.lock"
    with open(lock_file, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert d.proc is not None
        proc = subprocess.Popen(
            [sys.executable, "-m", "floatd", "serve", "--config", str(d.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FLOATD_CONFIG": ""},
        )
        watchdog = threading.Timer(20, proc.kill)  # bounds every readline below
        watchdog.start()
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            assert first["event"] == "state_writer_waiting", first
            fcntl.flock(lock, fcntl.LOCK_UN)
            line = ""
            deadline = time.monotonic() + 15
            while "listening" not in line and time.monotonic() < deadline:
                line = proc.stdout.readline().decode()
            assert "listening" in line
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait(10)


def test_a_wall_clock_stepped_under_the_real_process_expires_nobody(
    setup: tuple[Daemon, Path],
) -> None:
    """The clock set 180 s ahead (120 s leases), then put right: every lease
    keeps the time it had left, and nothing is refused as a clock turned back.
    (FLOATD_TEST_CLOCK_OFFSET names a file of seconds added to the wall clock.)"""
    d, _ = setup
    offset = d.config.parent / "clock.offset"
    offset.write_text("0")
    d.env = {**d.env, "FLOATD_TEST_CLOCK_OFFSET": str(offset)}
    d.start(env=d.env)
    with client(d) as c:
        held = acquire(c, "machine-a")
        assert held["ok"] and held["expires_in"] == 120
        offset.write_text("180")
        wait_for(lambda: any(e.get("event") == "clock_stepped" for e in d.events()), "the step")
        time.sleep(1.5)  # a timer pass or two on the stepped clock
        assert c.request("info", product="app")["used"] == 1
        renewed = c.request("renew", lease=held["lease"], token=held["token"])
        assert renewed["ok"] and renewed["expires_in"] == 120, renewed
        offset.write_text("0")  # put right
        wait_for(lambda: sum(e.get("event") == "clock_stepped" for e in d.events()) == 2, "the fix")
        assert c.request("renew", lease=held["lease"], token=held["token"])["ok"]
        assert acquire(c, "machine-b")["ok"]
        assert health(d) == (200, "ok")
