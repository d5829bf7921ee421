"""Operations inside the trio server, on a MockClock: audit records, metrics,
the status endpoint (over memory streams), admin commands and reload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from conftest import BASE, product, sign, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from test_server import serving

from floatd.daemon.admin import AdminClient, AdminServer
from floatd.daemon.status_http import StatusServer
from floatd.errors import ConfigError
from floatd.http11 import REQUEST_TIMEOUT
from floatd.store.audit import iso


@pytest.fixture
def ent(vendor_key: Ed25519PrivateKey) -> str:
    return sign(
        vendor_key,
        not_after=int(BASE) + 30 * 86400,
        products=[product("app", seats=2), product("solo", seats=1)],
    )


# --- audit ------------------------------------------------------------------------------


async def test_every_lease_event_leaves_an_audit_record(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect(peer="10.0.0.5")
        a = await c.acquire("solo", fingerprint="machine-m1", user="alice", hostname="ws1")
        refused = await c.acquire("solo", fingerprint="machine-m2")
        assert refused["error"]["code"] == "NO_FREE_SEATS"
        # The grant's record was committed in the same batch as the lease itself.
        batch = next(b for b in h.store.batches if any(getattr(x, "lease", None) for x in b))
        assert {type(x).__name__ for x in batch} >= {"PutLease", "Audit"}
        assert (await c.request("renew", lease=a["lease"], token=a["token"]))["ok"]
        assert (await c.request("release", lease=a["lease"], token=a["token"]))["ok"]
        bad = await c.request("renew", lease=a["lease"], token=a["token"])
        assert bad["error"]["code"] == "LEASE_NOT_FOUND"
        b = await c.acquire("app", fingerprint="machine-m3")
        expected_end = BASE + trio.current_time() + 60
        await trio.sleep(61)  # b runs out
        d = await c.acquire("app", fingerprint="machine-m4")
        await h.server.revoke(d["lease"])
        await trio.sleep(2)  # lazy records (renewal, refusals) reach the store too
        trail = [(r.event, r.lease, r.code) for r in h.store.audit]
        assert trail == [
            ("granted", a["lease"], None),
            ("refused", None, "NO_FREE_SEATS"),
            ("renewed", a["lease"], None),
            ("released", a["lease"], None),
            ("refused", a["lease"], "LEASE_NOT_FOUND"),
            ("granted", b["lease"], None),
            ("expired", b["lease"], None),
            ("granted", d["lease"], None),
            ("revoked", d["lease"], None),
        ]
        first = h.store.audit[0]
        assert (first.product, first.fingerprint, first.user, first.hostname, first.peer) == (
            "solo",
            "machine-m1",
            "alice",
            "ws1",
            "10.0.0.5",
        )
        expiry = h.store.audit[6]
        assert expiry.ts == pytest.approx(expected_end)  # dated when the seat came free
        assert h.store.audit[1].fingerprint == "machine-m2"  # a refused acquire says who asked


async def test_audit_retention_prunes_old_records(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    # 0.01 days is 864 s; pruning runs every 600 s, so by 1250 s it has run
    # with a cut-off past the first record.
    async with serving(tmp_path, vendor_key, ent, audit__retention_days=0.01) as h:
        c = await h.connect()
        await c.acquire("app", fingerprint="machine-early")
        await trio.sleep(1250)
        c = await h.connect()  # the first one has idled out meanwhile
        await c.acquire("app", fingerprint="machine-late")
        await trio.sleep(2)
        assert [r.fingerprint for r in h.store.audit if r.event == "granted"] == ["machine-late"]


# --- metrics ------------------------------------------------------------------------------


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_after_a_scripted_sequence(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        x = await c.acquire("app", fingerprint="machine-m1")
        await c.acquire("app", fingerprint="machine-m1")  # same machine: same seat
        await c.acquire("app", fingerprint="machine-m2")
        assert (await c.acquire("app", fingerprint="machine-m3"))["error"][
            "code"
        ] == "NO_FREE_SEATS"
        s = await c.acquire("solo", fingerprint="machine-m1")
        await c.request("renew", lease=x["lease"], token=x["token"])
        await c.request("ping")
        other = await h.connect()
        await other.send("acquire", product="solo", fingerprint="machine-m9", wait=100)
        await trio.sleep(1)  # m9 is queued now
        m = _samples(h.server.status._metrics_reply().body)
        assert m["floatd_seats", (("product", "app"),)] == 2
        assert m["floatd_seats_used", (("product", "app"),)] == 2
        assert m["floatd_seats_free", (("product", "app"),)] == 0
        assert m["floatd_seats_used", (("product", "solo"),)] == 1
        assert m["floatd_wait_queue_length", (("product", "solo"),)] == 1
        assert m["floatd_leases", ()] == 4
        assert m["floatd_connections", ()] == 2
        assert m["floatd_license_expiry_timestamp_seconds", ()] == int(BASE) + 30 * 86400
        assert m["floatd_activation_state", (("state", "active"),)] == 1
        req = "floatd_requests_total"
        assert m[req, (("op", "acquire"), ("result", "ok"))] == 4
        assert m[req, (("op", "acquire"), ("result", "NO_FREE_SEATS"))] == 1
        assert m[req, (("op", "renew"), ("result", "ok"))] == 1
        assert m[req, (("op", "ping"), ("result", "ok"))] == 1
        assert m[req, (("op", "hello"), ("result", "ok"))] == 2
        assert m["floatd_request_duration_seconds_count", ()] == 9
        assert (
            m["floatd_acquire_refusals_total", (("code", "NO_FREE_SEATS"), ("product", "app"))] == 1
        )
        events = "floatd_lease_events_total"
        assert m[events, (("event", "granted"), ("product", "app"))] == 3
        # The seat comes free by expiry: the waiter gets it, and the counters say so.
        await trio.sleep(60)
        got = await other.recv()
        assert got["ok"], got
        assert (await c.request("renew", lease=s["lease"], token=s["token"]))["ok"] is False
        h.server.status._metrics = (-1.0, b"")  # drop the render cache
        m = _samples(h.server.status._metrics_reply().body)
        assert m[events, (("event", "expired"), ("product", "solo"))] == 1
        assert m[events, (("event", "granted"), ("product", "solo"))] == 2
        assert m["floatd_wait_queue_length", (("product", "solo"),)] == 0
        assert m["floatd_request_duration_seconds_count", ()] == 11


async def test_made_up_product_codes_add_no_metric_series(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        before = len(_samples(h.server.status._metrics_reply().body))
        for n in range(400):
            got = await c.acquire(f"made-up-{n}", fingerprint="machine-m1")
            assert got["error"]["code"] == "UNKNOWN_PRODUCT"
        h.server.status._metrics = (-1.0, b"")
        m = _samples(h.server.status._metrics_reply().body)
        assert not any("made-up" in str(labels) for _, labels in m)
        refused = (
            "floatd_acquire_refusals_total",
            (("code", "UNKNOWN_PRODUCT"), ("product", "(not entitled)")),
        )
        assert m[refused] == 400
        assert len(m) <= before + 4  # a fixed label, whatever the codes


# --- the status endpoint over memory streams ---------------------------------------------


async def _serve_one(status: StatusServer, stream: trio.abc.Stream) -> None:
    try:
        await status.handle_stream(stream)
    finally:
        await stream.aclose()


class Reply:
    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.body = status_code, headers, body


async def http(status: StatusServer, *requests: bytes) -> list[Reply]:
    """Send raw requests on one connection, then EOF; parse every response the
    server wrote before it closed."""
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, status, server_side)
        for raw in requests:
            await client.send_all(raw)
        await client.send_eof()
        data = b""
        with trio.fail_after(30):
            while chunk := await client.receive_some(65536):
                data += chunk
    out = []
    for raw in requests:
        if not data:
            break
        head, _, data = data.partition(b"\r\n\r\n")
        first, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        size = 0 if raw.startswith(b"HEAD ") else int(headers.get("content-length", 0))
        out.append(Reply(int(first.split()[1]), headers, data[:size]))
        data = data[size:]
    assert data == b"", data
    return out


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def test_status_endpoint_routes(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        await c.acquire("app")
        answers = await http(
            h.server.status,
            get("/healthz"),
            get("/status"),
            get("/metrics"),
            get("/status", "HEAD"),
            get("/nope"),
            get("/status", "POST", "Content-Length: 0\r\n"),
        )
        codes = [r.status_code for r in answers]
        assert codes == [200, 200, 200, 200, 404, 405]
        assert json.loads(answers[0].body) == {"status": "ok"}
        doc = json.loads(answers[1].body)
        assert doc["version"] and doc["uptime"] >= 0 and doc["connections"] == 1
        assert doc["activation"]["state"] == "active" and doc["activation"]["mode"] == "offline"
        assert doc["activation"]["not_after"] == int(BASE) + 30 * 86400
        app = next(p for p in doc["products"] if p["code"] == "app")
        assert {k: app[k] for k in ("seats", "used", "free", "strategy", "lease_duration")} == {
            "seats": 2,
            "used": 1,
            "free": 1,
            "strategy": "per-machine",
            "lease_duration": 60,
        }
        assert b"floatd_seats_used" in answers[2].body
        head = answers[3]
        assert head.body == b"" and int(head.headers["content-length"]) > 0
        assert answers[5].headers["allow"] == "GET, HEAD"


async def test_healthz_is_503_with_the_state_when_not_leasing(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    expired = sign(vendor_key, not_after=int(BASE) + 10)
    async with serving(tmp_path, vendor_key, None) as h:
        (resp,) = await http(h.server.status, get("/healthz"))
        assert resp.status_code == 503 and json.loads(resp.body) == {"status": "not_activated"}
        h.install(expired)
        await trio.sleep(2)
        (resp,) = await http(h.server.status, get("/healthz"))
        assert resp.status_code == 200
        await trio.sleep(10)
        (resp,) = await http(h.server.status, get("/healthz"))
        assert resp.status_code == 503 and json.loads(resp.body) == {"status": "expired"}


async def test_bad_http_is_answered_and_bounded(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        status = h.server.status
        huge = get("/status", extra="X-Big: " + "a" * 20000 + "\r\n")
        (resp,) = await http(status, huge)
        assert resp.status_code == 431
        (resp,) = await http(status, b"NOT HTTP AT ALL\r\n\r\n")
        assert resp.status_code == 400
        big_body = get("/status", "GET", "Content-Length: 100000\r\n") + b"x" * 100000
        (resp,) = await http(status, big_body)
        assert resp.status_code == 413
        # A slow sender: half a request, then nothing.  It gets 408 once the
        # request timeout has passed, and the connection is closed.
        client, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, status, server_side)
            await client.send_all(b"GET /status HTTP/1.1\r\nHost: t\r\n")
            start = trio.current_time()
            data = b""
            while chunk := await client.receive_some(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 408"), data
            assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT, abs=0.1)
        # Leasing went on untouched.
        c = await h.connect()
        assert (await c.acquire("app"))["ok"]


async def test_status_connections_beyond_the_cap_make_room_or_are_closed(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    cap = StatusServer.max_connections
    async with serving(tmp_path, vendor_key, ent, status__listen="127.0.0.1:0") as h:
        host, port = h.server.status_ports[0]
        # Idle connections (kept alive, or silent) fill the cap: a health check
        # still gets in, and the oldest idle one makes room for it.
        idle = [await trio.open_tcp_stream(host, port) for _ in range(cap)]
        await trio.sleep(0.5)
        assert h.server.status.connections == cap
        probe = await trio.open_tcp_stream(host, port)
        await probe.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(2):
            assert (await probe.receive_some(1000)).startswith(b"HTTP/1.1 200")
            assert await idle[0].receive_some(100) == b""  # the oldest made room
        # Connections in the middle of a request are not given up for a newcomer.
        busy = [await trio.open_tcp_stream(host, port) for _ in range(cap)]
        for s in busy:
            await s.send_all(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        await trio.sleep(0.5)
        extra = await trio.open_tcp_stream(host, port)
        with trio.fail_after(1):
            assert await extra.receive_some(100) == b""  # closed without a word
        c = await h.connect()
        assert (await c.acquire("app"))["ok"]  # the lease side does not care
        for s in [*idle, *busy, probe, extra]:
            await s.aclose()
        await trio.sleep(0.5)
        assert h.server.status.connections == 0


# --- admin --------------------------------------------------------------------------------


async def test_admin_status_leases_and_revoke(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        admin = AdminServer(h.server, tmp_path / "unused.sock")
        c = await h.connect(peer="10.1.1.1")
        stuck = await c.acquire("solo", fingerprint="machine-crashed", user="bob", hostname="ws9")
        other = await h.connect()
        assert (await other.acquire("solo", fingerprint="machine-m2"))["error"][
            "code"
        ] == "NO_FREE_SEATS"

        (status,) = await admin.answer({"cmd": "status"})
        assert status["ok"] and status["leases"] == 1
        (listing,) = await admin.answer({"cmd": "leases"})
        (row,) = listing["leases"]
        assert {
            k: row[k] for k in ("id", "product", "fingerprint", "user", "hostname", "address")
        } == {
            "id": stuck["lease"],
            "product": "solo",
            "fingerprint": "machine-crashed",
            "user": "bob",
            "hostname": "ws9",
            "address": "10.1.1.1",
        }
        assert row["granted"].endswith("Z") and row["expires"].endswith("Z")
        assert stuck["token"] not in json.dumps(listing)
        (none,) = await admin.answer({"cmd": "leases", "product": "app"})
        assert none["leases"] == [] and none["more"] is False

        (revoked,) = await admin.answer({"cmd": "revoke", "lease": stuck["lease"]})
        assert revoked["ok"] and revoked["lease"]["id"] == stuck["lease"]
        assert stuck["lease"] not in h.store.leases  # durable before the admin heard of it
        assert (await other.acquire("solo", fingerprint="machine-m2"))[
            "ok"
        ]  # the seat is free at once
        renew = await c.request("renew", lease=stuck["lease"], token=stuck["token"])
        assert renew["error"]["code"] == "LEASE_NOT_FOUND"

        (again,) = await admin.answer({"cmd": "revoke", "lease": stuck["lease"]})
        assert again["ok"] is False and again["error"]["code"] == "LEASE_NOT_FOUND"
        for bad in ({"cmd": "revoke"}, {"cmd": "leases", "product": 5}, {"cmd": "shutdown"}, {}):
            (answer,) = await admin.answer(bad)
            assert answer["ok"] is False and answer["error"]["message"]


async def test_a_long_lease_listing_comes_in_bounded_frames(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    many = sign(vendor_key, products=[product("app", seats=0)])
    async with serving(tmp_path, vendor_key, many) as h:
        c = await h.connect()
        for i in range(400):
            assert (await c.acquire("app", fingerprint=f"machine-{i:04d}", hostname="h" * 200))[
                "ok"
            ]
        frames = await AdminServer(h.server, tmp_path / "x.sock").answer({"cmd": "leases"})
        assert len(frames) > 1 and [f["more"] for f in frames] == [True] * (len(frames) - 1) + [
            False
        ]
        assert all(len(msgpack.packb(f)) < 65536 for f in frames)
        assert sum(len(f["leases"]) for f in frames) == 400


async def test_a_status_over_a_frame_comes_in_parts_through_the_real_socket(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """700 products make a status document of well over 64 KiB: it used to end
    the daemon from inside the admin handler."""
    many = sign(vendor_key, products=[product(f"product-{i:04d}", seats=3) for i in range(700)])
    async with serving(tmp_path, vendor_key, many) as h:
        path = tmp_path / "admin.sock"

        def ask() -> dict[str, Any]:
            with AdminClient(path) as client:
                return client.call("status")

        doc = await trio.to_thread.run_sync(ask)
        assert len(doc["products"]) == 700 and "more" not in doc
        assert doc["activation"]["state"] == "active"
        frames = await AdminServer(h.server, path).answer({"cmd": "status"})
        assert len(frames) > 1 and all(len(msgpack.packb(f)) < 65536 for f in frames)
        c = await h.connect()
        assert (await c.acquire("product-0001"))["ok"]  # still serving


async def test_a_failing_admin_command_answers_internal_and_the_daemon_lives(
    tmp_path: Path,
    vendor_key: Ed25519PrivateKey,
    ent: str,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:

        def broken(product: str | None = None) -> list[dict[str, Any]]:
            raise OverflowError("date value out of range")

        monkeypatch.setattr(h.server, "lease_rows", broken)
        (answer,) = await AdminServer(h.server, tmp_path / "x.sock").answer({"cmd": "leases"})
        assert answer["ok"] is False and answer["error"]["code"] == "INTERNAL"
        c = await h.connect()
        assert (await c.acquire("app"))["ok"]


def test_a_time_past_what_a_date_holds_still_renders() -> None:
    assert iso(2.0**40 * 1000) == "9999-12-31T23:59:59Z"
    assert iso(-(2.0**40) * 1000) == "0001-01-01T00:00:00Z"
    assert iso(BASE) == "2027-01-15T08:00:00Z"


# --- reload -------------------------------------------------------------------------------


async def test_reload_applies_what_it_can_and_names_what_needs_a_restart(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    ent = sign(vendor_key, products=[product("app", seats=2, lease_duration=0)])
    async with serving(tmp_path, vendor_key, ent, leases__default_duration=100) as h:
        c = await h.connect()
        held = await c.acquire("app")
        assert held["lease_duration"] == 100
        write_config(
            tmp_path,
            vendor_key,
            leases__default_duration=300,
            server__client_tokens=["s3cret"],
            server__listen=["127.0.0.1:1"],
            log__level="info",
        )
        result = await h.server.reload()
        assert set(result["applied"]) == {
            "leases.default_duration",
            "server.client_tokens",
            "log.level",
        }
        assert result["restart_needed"] == ["server.listen"]
        assert result["entitlement_rejected"] is None and result["activation"] == "active"
        assert h.server.config.listen == (("127.0.0.1", 0),)  # still what it listens on
        # The held lease is untouched; new ones and renewals use the new default.
        assert held["lease"] in h.store.leases
        renewed = await c.request("renew", lease=held["lease"], token=held["token"])
        assert renewed["expires_in"] == 300
        fresh = await h.connect(hello=False)
        refused = await fresh.hello()
        assert refused["error"]["code"] == "FORBIDDEN"  # the new token is required now
        assert (await (await h.connect(hello=False)).hello(token="s3cret"))["ok"]


async def test_a_bad_config_on_reload_changes_nothing(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        before = h.server.config
        (tmp_path / "floatd.toml").write_text("[leases]\ndefault_duration = -5\n")
        with pytest.raises(ConfigError) as err:
            await h.server.reload()
        assert err.value.key == "leases.default_duration"
        assert h.server.config is before
        frames = await AdminServer(h.server, tmp_path / "x.sock").answer({"cmd": "reload"})
        assert frames[0]["error"]["key"] == "leases.default_duration"


async def test_reload_reports_a_rejected_entitlement_and_keeps_the_old_one(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        old = h.server.service.entitlement
        h.install(sign(Ed25519PrivateKey.generate()))  # a key nobody trusts
        result = await h.server.reload()
        assert result["entitlement_rejected"] and h.server.service.entitlement is old


async def test_sighup_reloads_the_config_too(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        write_config(tmp_path, vendor_key, server__idle_timeout=7)
        h.server.reload_entitlement_now()
        await trio.sleep(0.5)
        assert h.server.config.idle_timeout == 7
