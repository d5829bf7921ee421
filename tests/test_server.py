"""The trio server over memory streams, on a MockClock (no sleeps, no sockets).

The group committer runs inline here (see ``inline_run_sync``) so that MockClock's
autojump only ever jumps over real idleness, never over a commit in flight.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing
from conftest import (
    BASE,
    SERVER_ID,
    MemoryStore,
    WireClient,
    inline_run_sync,
    make_config,
    product,
    sign,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.config import load_config
from floatd.core.codec import encode_frame
from floatd.daemon.server import Server
from floatd.daemon.session import FRAME_TIMEOUT
from floatd.store.activation import atomic_write

Connect = Callable[..., Awaitable[WireClient]]


class Harness:
    def __init__(self, server: Server, store: MemoryStore, nursery: trio.Nursery) -> None:
        self.server, self.store, self.nursery = server, store, nursery

    async def connect(self, peer: str = "127.0.0.1", hello: bool = True) -> WireClient:
        client, server_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_stream, server_side, peer)
        wc = WireClient(client)
        if hello:
            got = await wc.hello()
            assert got["ok"], got
        return wc

    def install(self, text: str) -> None:
        atomic_write(self.server.config.entitlement_path, text)


@asynccontextmanager
async def serving(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    entitlement: str | None = None,
    store: MemoryStore | None = None,
    run_sync: Any = inline_run_sync,
    **config: Any,
) -> AsyncIterator[Harness]:
    cfg = make_config(tmp_path, key, **config)
    if entitlement is not None:
        atomic_write(cfg.entitlement_path, entitlement)
    store = store or MemoryStore()
    config_file = tmp_path / "floatd.toml"
    server = Server(
        cfg,
        store,
        SERVER_ID,
        clock=lambda: BASE + trio.current_time(),
        run_sync=run_sync,
        config_loader=lambda: load_config(config_file, env={}),
    )
    server.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield Harness(server, store, nursery)
        server.stop()


@pytest.fixture
def ent(vendor_key: Ed25519PrivateKey) -> str:
    return sign(
        vendor_key,
        products=[
            product("app", seats=2),
            product("solo", seats=1),
            product("inst", seats=2, strategy="per-instance"),
            product("free", seats=0, lease_duration=0),
        ],
    )


async def test_hello_answer(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect(hello=False)
        got = await c.hello()
        assert got["ok"] and got["version"] == 1 and got["server_id"] == SERVER_ID
        assert got["server"].startswith("floatd/") and got["time"] == pytest.approx(BASE, abs=1)


async def test_acquire_answer_is_durable_before_it_is_sent(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        got = await c.acquire(hostname="ws1", meta={"k": "v"})
        assert got["ok"], got
        assert got["lease"] in h.store.leases  # committed before we heard of it
        assert got["expires_in"] == 60 and got["renew_in"] == 30 and got["lease_duration"] == 60
        assert got["product"] == {
            "code": "app",
            "name": "app product",
            "metadata": {"tier": "gold"},
            "features": {"export": True},
            "not_after": None,
        }
        assert len(got["token"]) >= 22  # >= 128 bits, url-safe base64
        stored = h.store.leases[got["lease"]]
        assert got["token"].encode() not in stored.token_hash  # only a digest is kept
        renewed = await c.request("renew", lease=got["lease"], token=got["token"])
        assert renewed["ok"] and renewed["expires_in"] == 60


async def test_pipelined_requests_answer_in_order(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect(hello=False)
        frames = [encode_frame({"op": "hello", "id": 100, "versions": [1], "client": "p"})]
        for i in range(101, 140):
            op = ["acquire", "info", "ping", "nope"][i % 4]
            frames.append(
                encode_frame({"op": op, "id": i, "product": "free", "fingerprint": f"machine-{i}"})
            )
        await c.send_raw(b"".join(frames))
        answers = [await c.recv() for _ in frames]
        assert [a["id"] for a in answers] == list(range(100, 140))
        assert {a["error"]["code"] for a in answers if not a["ok"]} == {"UNKNOWN_OP"}


async def test_pipelined_acquire_then_info_sees_the_seat(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        await c.send("acquire", product="app", fingerprint="machine-1")
        await c.send("info", product="app")
        assert (await c.recv())["ok"]
        info = await c.recv()
        assert info["used"] == 1 and info["free"] == 1 and info["seats"] == 2


async def test_seat_cap_under_many_concurrent_acquires(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    text = sign(vendor_key, products=[product("app", seats=5)])
    async with serving(tmp_path, vendor_key, text) as h:
        results: list[dict[str, Any]] = []

        async def one(i: int) -> None:
            c = await h.connect()
            results.append(await c.acquire(fingerprint=f"machine-{i:04d}"))

        async with trio.open_nursery() as n:
            for i in range(60):
                n.start_soon(one, i)
        granted = [r for r in results if r["ok"]]
        refused = [r for r in results if not r["ok"]]
        assert len(granted) == 5 and len(refused) == 55
        assert all(
            r["error"]["code"] == "NO_FREE_SEATS"
            and r["error"]["seats"] == 5
            and r["error"]["used"] == 5
            for r in refused
        )
        assert len(h.store.leases) == 5
        assert len(h.store.batches) < 60  # concurrent acquires shared commits


async def test_per_machine_and_per_instance_over_the_wire(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        a = await c.acquire("solo", "machine-1")
        b = await c.acquire("solo", "machine-1")
        assert a["ok"] and b["ok"] and a["lease"] != b["lease"]
        assert (await c.acquire("solo", "machine-2"))["error"]["code"] == "NO_FREE_SEATS"
        assert (await c.acquire("inst", "machine-1"))["error"]["code"] == "BAD_REQUEST"
        assert (await c.acquire("inst", "machine-1", instance="p1"))["ok"]
        assert (await c.acquire("inst", "machine-1", instance="p1"))["ok"]
        assert (await c.acquire("inst", "machine-1", instance="p2"))["ok"]
        info = await c.request("info", product="inst")
        assert info["used"] == 2 and info["free"] == 0 and info["strategy"] == "per-instance"


async def test_unlimited_and_default_duration(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, leases__default_duration=300) as h:
        c = await h.connect()
        for i in range(20):
            got = await c.acquire("free", f"machine-{i:03d}")
            assert got["ok"] and got["lease_duration"] == 300 and got["expires_in"] == 300
        info = await c.request("info", product="free")
        assert info["used"] == 20 and info["free"] is None and info["seats"] == 0


async def test_expiry_frees_the_seat_on_time(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        got = await c.acquire("solo", "machine-1")
        start = trio.current_time()
        await trio.sleep(59.5)
        assert (await c.request("info", product="solo"))["used"] == 1
        await trio.sleep(0.6)
        assert trio.current_time() - start >= 60
        assert (await c.request("info", product="solo"))["used"] == 0
        assert h.store.leases == {}  # the expiry reached the disk too
        again = await c.request("renew", lease=got["lease"], token=got["token"])
        assert again["error"]["code"] == "LEASE_NOT_FOUND"


async def test_renewals_keep_a_lease_alive(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        got = await c.acquire("solo", "machine-1")
        for _ in range(10):
            await trio.sleep(got["renew_in"])
            r = await c.request("renew", lease=got["lease"], token=got["token"])
            assert r["ok"]
        assert (await c.acquire("solo", "machine-2"))["error"]["code"] == "NO_FREE_SEATS"


async def test_renew_and_release_from_another_connection(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        first = await h.connect()
        got = await first.acquire("solo", "machine-1")
        await first.stream.aclose()
        second = await h.connect()
        assert (await second.request("renew", lease=got["lease"], token=got["token"]))["ok"]
        bad = await second.request("release", lease=got["lease"], token="wrong")
        assert bad["error"]["code"] == "LEASE_NOT_FOUND"
        assert (await second.request("release", lease=got["lease"], token=got["token"]))["ok"]
        assert (await second.request("info", product="solo"))["used"] == 0


async def test_wait_queue_order_and_timeout(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        holder = await h.connect()
        held = await holder.acquire("solo", "machine-0")
        order: list[str] = []
        outcome: dict[str, dict[str, Any]] = {}
        answered_at: dict[str, float] = {}

        async def waiter(name: str, delay: float, wait: float) -> None:
            await trio.sleep(delay)
            c = await h.connect()
            got = await c.acquire("solo", f"machine-{name}", wait=wait)
            order.append(name)
            answered_at[name] = trio.current_time()
            outcome[name] = got
            if got["ok"]:
                await trio.sleep(5)
                await c.request("release", lease=got["lease"], token=got["token"])

        async with trio.open_nursery() as n:
            n.start_soon(waiter, "first", 0.1, 100)
            n.start_soon(waiter, "second", 0.2, 100)
            n.start_soon(waiter, "impatient", 0.3, 2)
            await trio.sleep(10)
            t = trio.current_time()
            await holder.request("release", lease=held["lease"], token=held["token"])
        assert order == ["impatient", "first", "second"]
        assert outcome["impatient"]["error"]["code"] == "NO_FREE_SEATS"
        assert outcome["first"]["ok"] and outcome["second"]["ok"]
        assert answered_at["impatient"] == pytest.approx(2.3, abs=0.01)
        assert answered_at["first"] == pytest.approx(t, abs=0.01)
        assert answered_at["second"] == pytest.approx(t + 5, abs=0.01)


async def queued_for_solo(h: Harness) -> tuple[WireClient, dict[str, Any], WireClient]:
    """A connection holding the one seat of "solo", and another queued for it
    (``wait``): (holder, the holder's lease, the queued connection)."""
    holder = await h.connect()
    held = await holder.acquire("solo", "machine-0")
    queued = await h.connect()
    await queued.send("acquire", product="solo", fingerprint="machine-q", wait=100)
    await trio.sleep(1)
    assert h.server.service.ledger.waiting("solo") == 1
    return holder, held, queued


async def test_waiting_client_that_hangs_up_loses_its_place(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        holder, held, quitter = await queued_for_solo(h)
        await quitter.stream.aclose()
        await trio.sleep(1)
        assert h.server.service.ledger.waiting("solo") == 0
        await holder.request("release", lease=held["lease"], token=held["token"])
        assert (await holder.request("info", product="solo"))["used"] == 0


async def test_a_queued_acquire_holds_back_later_answers_but_not_reading(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        _, held, c = await queued_for_solo(h)
        await c.send("ping")
        # Read and applied while the acquire above still waits: it frees the seat
        # that acquire then gets, so its answer comes first, as it must.
        await c.send("release", lease=held["lease"], token=held["token"])
        answers = [await c.recv() for _ in range(3)]
        assert [a["id"] for a in answers] == [2, 3, 4]
        assert answers[0]["ok"] and answers[0]["lease"] in h.store.leases
        assert answers[1]["ok"] and answers[2]["ok"]


async def test_the_seat_of_an_answer_that_cannot_be_written_is_given_back(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        assert isinstance(c.stream, trio.StapledStream)
        await c.stream.receive_stream.aclose()  # still sending, never reading
        await c.send("acquire", product="solo", fingerprint="machine-1")
        await trio.sleep(1)
        other = await h.connect()
        assert (await other.request("info", product="solo"))["used"] == 0
        assert (await other.acquire("solo", "machine-2"))["ok"]
        assert len(h.store.leases) == 1  # the first grant was committed, then revoked


async def test_hello_timeout(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect(hello=False)
        start = trio.current_time()
        assert await c.closed()
        assert trio.current_time() - start == pytest.approx(10, abs=0.01)


async def test_idle_timeout_and_ping_keeps_alive(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, server__idle_timeout=30) as h:
        c = await h.connect()
        for _ in range(5):
            await trio.sleep(25)
            assert (await c.request("ping"))["ok"]
        start = trio.current_time()
        assert await c.closed()
        assert trio.current_time() - start == pytest.approx(30, abs=0.01)


async def test_queued_acquire_is_not_idle(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, server__idle_timeout=5) as h:
        holder = await h.connect()
        await holder.acquire("solo", "machine-0")
        c = await h.connect()
        got = await c.acquire("solo", "machine-1", wait=30)
        assert got["error"]["code"] == "NO_FREE_SEATS"  # answered, not dropped at 5 s


async def test_bad_frame_closes_only_that_connection(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        good = await h.connect()
        for garbage in (
            b"\x00\x00\x00\x00",
            b"\x00\x01\x00\x01",
            b"\x00\x00\x00\x01\xc1",
            b"\x00\x00\x00\x03\x93\x01\x02",
        ):
            bad = await h.connect()
            await bad.send_raw(garbage + b"\x00" * 8)
            got = await bad.recv()
            assert got == {"id": None, "ok": False, "error": got["error"]}
            assert got["error"]["code"] == "BAD_FRAME"
            assert await bad.closed()
        assert (await good.request("ping"))["ok"]


async def test_hello_required_closes(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect(hello=False)
        got = await c.acquire()
        assert got["error"]["code"] == "HELLO_REQUIRED" and got["id"] == 1
        assert await c.closed()


async def test_client_tokens(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, server__client_tokens=["t0ken"]) as h:
        c = await h.connect(hello=False)
        assert (await c.hello())["error"]["code"] == "FORBIDDEN"
        assert await c.closed()
        c = await h.connect(hello=False)
        assert (await c.hello(token="t0ken"))["ok"]


async def test_max_connections_answers_busy(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, server__max_connections=2) as h:
        a, b = await h.connect(), await h.connect()
        c = await h.connect(hello=False)
        got = await c.hello()
        assert got["error"]["code"] == "BUSY" and got["id"] == 1
        assert await c.closed()
        await a.stream.aclose()
        await trio.sleep(0.1)
        d = await h.connect()
        assert (await d.request("ping"))["ok"] and (await b.request("ping"))["ok"]


async def test_not_activated(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, None) as h:
        c = await h.connect()
        assert (await c.acquire())["error"]["code"] == "NOT_ACTIVATED"
        assert (await c.request("info", product="app"))["error"]["code"] == "NOT_ACTIVATED"
        assert (await c.request("renew", lease="x", token="y"))["error"]["code"] == "NOT_ACTIVATED"


async def test_license_passing_its_end_while_running(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    text = sign(
        vendor_key,
        not_after=int(BASE) + 100,
        products=[
            product("app"),
            product("sub", not_after=int(BASE) + 50),
            product("later", not_before=int(BASE) + 30),
        ],
    )
    async with serving(tmp_path, vendor_key, text) as h:
        c = await h.connect()
        assert (await c.acquire("later"))["error"]["code"] == "LICENSE_NOT_YET_VALID"
        got = await c.acquire("sub")
        assert got["ok"] and got["product"]["not_after"] == int(BASE) + 50
        await trio.sleep(30)
        assert (await c.acquire("later"))["ok"]
        await trio.sleep(20)
        renew = await c.request("renew", lease=got["lease"], token=got["token"])
        assert renew["error"]["code"] == "LICENSE_EXPIRED"
        assert (await c.acquire("app"))["ok"]
        await trio.sleep(50)
        assert (await c.acquire("app"))["error"]["code"] == "LICENSE_EXPIRED"
        assert (await c.acquire("nope"))["error"]["code"] == "LICENSE_EXPIRED"


async def test_unknown_product(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        assert (await c.acquire("nope"))["error"]["code"] == "UNKNOWN_PRODUCT"
        assert (await c.request("info", product="nope"))["error"]["code"] == "UNKNOWN_PRODUCT"


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("192.168.1.7", True),
        ("10.1.2.3", False),
        ("::ffff:192.168.3.4", True),
        ("fd00::1", True),
        ("fe80::1", False),
        (None, False),
    ],
)
async def test_allowed_ips(
    tmp_path: Path,
    vendor_key: Ed25519PrivateKey,
    peer: str | None,
    allowed: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    text = sign(vendor_key, products=[product(allowed_ips=["192.168.0.0/16", "fd00::/8"])])
    async with serving(tmp_path, vendor_key, text) as h:
        c = await h.connect(peer=peer)  # type: ignore[arg-type]
        got = await c.acquire()
        assert got["ok"] is allowed
        if not allowed:
            assert got["error"]["code"] == "IP_NOT_ALLOWED"


async def test_user_locked_and_user_authorized(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    text = sign(
        vendor_key,
        products=[
            product("locked", user_locked=True),
            product("named", authorization="user", users=["a@x.org"]),
        ],
    )
    async with serving(tmp_path, vendor_key, text) as h:
        c = await h.connect()
        assert (await c.acquire("locked"))["error"]["code"] == "BAD_REQUEST"
        assert (await c.acquire("locked", user="alice"))["ok"]
        assert (await c.acquire("locked", user="bob"))["ok"]
        assert (await c.request("info", product="locked"))["used"] == 2
        got = await c.acquire("named", user="a@x.org", password="pw")
        assert got["error"]["code"] == "AUTH_FAILED"


async def test_new_entitlement_applies_live_and_bad_one_is_ignored(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        held = [await c.acquire("app", f"machine-{i}") for i in range(2)]
        assert (await c.acquire("app", "machine-9"))["error"]["code"] == "NO_FREE_SEATS"
        h.install(sign(vendor_key, products=[product("app", seats=4)]))
        await trio.sleep(2)
        assert (await c.request("info", product="app"))["seats"] == 4
        assert (await c.acquire("app", "machine-9"))["ok"]
        # Lower the cap under what is held: nobody is cut off, new seats wait.
        h.install(sign(vendor_key, products=[product("app", seats=1)]))
        await trio.sleep(2)
        info = await c.request("info", product="app")
        assert info["seats"] == 1 and info["used"] == 3 and info["free"] == 0
        for got in held:
            assert (await c.request("renew", lease=got["lease"], token=got["token"]))["ok"]
        assert (await c.acquire("app", "machine-8"))["error"]["code"] == "NO_FREE_SEATS"
        # A forged file is rejected and the good entitlement stays.
        h.install(sign(Ed25519PrivateKey.generate(), products=[product("app", seats=99)]))
        await trio.sleep(2)
        assert (await c.request("info", product="app"))["seats"] == 1


async def test_restart_restores_leases(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    async with serving(tmp_path, vendor_key, ent, store=store) as h:
        c = await h.connect()
        kept = await c.acquire("app", "machine-1")
        short = await c.acquire("app", "machine-2")
        await trio.sleep(40)
        assert (await c.request("renew", lease=kept["lease"], token=kept["token"]))["ok"]
    await trio.sleep(30)  # down for 30 s: `short` expires meanwhile, `kept` does not
    async with serving(tmp_path, vendor_key, ent, store=store) as h:
        c = await h.connect()
        assert (await c.request("renew", lease=kept["lease"], token=kept["token"]))["ok"]
        gone = await c.request("renew", lease=short["lease"], token=short["token"])
        assert gone["error"]["code"] == "LEASE_NOT_FOUND"
        assert (await c.request("info", product="app"))["used"] == 1
        assert set(store.leases) == {kept["lease"]}


async def test_graceful_stop_answers_in_flight(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        await c.send("acquire", product="app", fingerprint="machine-1")
        h.server.stop()
        got = await c.recv()
        assert got["ok"] and got["lease"] in h.store.leases
        assert await c.closed()


class Gate:
    """A run_sync stand-in whose commits wait until the gate is open."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.open.set()

    def close(self) -> None:
        if self.open.is_set():
            self.open = trio.Event()

    async def __call__(self, fn: Any, *args: Any, limiter: Any = None) -> Any:
        await self.open.wait()
        return fn(*args)


async def test_renew_is_answered_before_its_commit(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    gate = Gate()
    async with serving(tmp_path, vendor_key, ent, run_sync=gate) as h:
        c = await h.connect()
        got = await c.acquire("solo", "machine-1")
        await trio.sleep(2)
        gate.close()
        await trio.sleep(1)  # a heartbeat commit is now stuck behind the gate
        renewed = await c.request("renew", lease=got["lease"], token=got["token"])
        assert renewed["ok"] and renewed["expires_in"] == 60
        assert h.store.leases[got["lease"]].expires_at == BASE + 60  # not on disk yet
        gate.open.set()
        await trio.sleep(0.5)
        assert h.store.leases[got["lease"]].expires_at == BASE + 3 + 60


async def test_crash_keeps_lazily_renewed_leases(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    async with serving(tmp_path, vendor_key, ent, store=store) as h:
        c = await h.connect()
        kept = await c.acquire("app", "machine-1")
        abandoned = await c.acquire("app", "machine-2")
        await trio.sleep(50)
        store.frozen = True  # the process "dies" now: nothing more reaches the disk
        assert (await c.request("renew", lease=kept["lease"], token=kept["token"]))["ok"]
    assert store.meta["clean"] == "0"  # the clean-stop marker never made it
    assert store.leases[kept["lease"]].expires_at == BASE + 60  # nor did the renewal
    store.frozen = False
    await trio.sleep(20)  # down until t=70: past the lease's expiry on disk (60)
    async with serving(tmp_path, vendor_key, ent, store=store) as h:
        c = await h.connect()
        # Acknowledged at t=50, so good until t=110: still renewable.
        assert (await c.request("renew", lease=kept["lease"], token=kept["token"]))["ok"]
        # The client that stopped renewing keeps its seat until the bound only:
        # last commit (t>=49) + 5 s window + 60 s duration.
        assert (await c.request("info", product="app"))["used"] == 2
        await trio.sleep(49 + 5 + 60 - 70 + 1)
        gone = await c.request("renew", lease=abandoned["lease"], token=abandoned["token"])
        assert gone["error"]["code"] == "LEASE_NOT_FOUND"


def test_named_user_product_without_tls_warns(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = make_config(tmp_path, vendor_key)
    atomic_write(
        cfg.entitlement_path,
        sign(vendor_key, products=[product("app"), product("named", authorization="user")]),
    )
    with structlog.testing.capture_logs() as logs:
        Server(cfg, MemoryStore(), SERVER_ID, clock=lambda: BASE).load_state()
    warnings = [e for e in logs if e["event"] == "passwords_without_tls"]
    assert len(warnings) == 1 and warnings[0]["products"] == ["named"]
    assert warnings[0]["log_level"] == "warning"


async def test_sighup_reload_is_immediate(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        await trio.sleep(0.5)  # mid-way between two polls of the file
        h.install(sign(vendor_key, products=[product("app", seats=7)]))
        h.server.reload_entitlement_now()
        await trio.sleep(0.01)
        assert (await c.request("info", product="app"))["seats"] == 7


PROTOCOL_CODES = {
    "BAD_FRAME",
    "BAD_REQUEST",
    "UNKNOWN_OP",
    "HELLO_REQUIRED",
    "UNSUPPORTED_VERSION",
    "UNKNOWN_PRODUCT",
    "NO_FREE_SEATS",
    "LEASE_NOT_FOUND",
}


def _garbage(rng: random.Random) -> bytes:
    """Random bytes, random maps in valid frames, and mutated valid requests."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    values: list[Any] = [None, True, -1, 2**63, 1.5, "", "x" * 300, [1, "a"], {"k": 1}, b"\x00"]
    if kind == 1:
        msg = {
            rng.choice(
                [
                    "op",
                    "id",
                    "product",
                    "wait",
                    "meta",
                    "versions",
                    "lease",
                    "token",
                    "fingerprint",
                    "client",
                ]
            ): rng.choice(values)
            for _ in range(6)
        }
        return encode_frame(msg)
    base: dict[str, Any] = rng.choice(
        [
            {"op": "hello", "id": 1, "versions": [1], "client": "f/1"},
            {"op": "acquire", "id": 2, "product": "app", "fingerprint": "machine-0001"},
            {"op": "renew", "id": 3, "lease": "x", "token": "y"},
            {"op": "info", "id": 4, "product": "app"},
        ]
    )
    base[rng.choice(list(base))] = rng.choice(values)
    frame = encode_frame(base)
    if kind == 3:  # damage the framing too
        cut = rng.randrange(len(frame))
        frame = frame[:cut] + rng.randbytes(rng.randrange(0, 8)) + frame[cut + 1 :]
    return frame


async def test_garbage_gets_only_protocol_errors_and_others_keep_being_served(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    rng = random.Random(20261122)
    async with serving(tmp_path, vendor_key, ent, server__idle_timeout=20) as h:
        for i in range(150):
            c = await h.connect(hello=rng.random() < 0.5)
            await c.send_raw(b"".join(_garbage(rng) for _ in range(rng.randrange(1, 4))))
            with trio.fail_after(25):  # MockClock time, past the 20 s idle timeout
                while True:
                    try:
                        got = await c.recv()
                    except EOFError:
                        break  # closed by the server: fine
                    except trio.TooSlowError:
                        raise
                    assert set(got) >= {"id", "ok"}, got
                    if not got["ok"]:
                        assert got["error"]["code"] in PROTOCOL_CODES, (i, got)
                    if got["id"] is None or not got["ok"]:
                        # The connection is either closed now or still answers a ping.
                        break
            if not await _closed_or_answers_ping(c):
                raise AssertionError(f"connection {i} neither closed nor usable")
            good = await h.connect()  # the server goes on serving everyone else
            assert (await good.request("ping"))["ok"]
            await good.stream.aclose()
        good = await h.connect()
        assert (await good.acquire())["ok"]


async def _closed_or_answers_ping(c: WireClient) -> bool:
    """A truncated frame legitimately waits for its missing bytes (and swallows
    the ping); then the idle timeout must end the connection."""
    try:
        await c.send("ping")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True
    with trio.move_on_after(25):
        while True:
            try:
                got = await c.recv()
            except (EOFError, trio.BrokenResourceError):
                return True
            if got.get("op") is None and got.get("ok") and "time" in got:
                return True
            if not got.get("ok") and got["error"]["code"] in PROTOCOL_CODES:
                continue  # an answer still owed to earlier garbage
            return got.get("ok", False) or got["error"]["code"] in PROTOCOL_CODES
    return False


async def test_half_a_frame_does_not_hold_a_connection(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent, server__idle_timeout=20) as h:
        c = await h.connect()
        await c.send_raw(encode_frame({"op": "ping", "id": 9})[:5])  # and then nothing
        start = trio.current_time()
        assert await c.closed()
        assert trio.current_time() - start == pytest.approx(20, abs=0.01)


async def test_a_frame_dripped_a_byte_at_a_time_is_cut_off(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        frame = encode_frame({"op": "ping", "id": 9, "pad": "x" * 100})
        start = trio.current_time()
        closed_at = None
        for byte in frame[:-1]:
            try:
                await c.send_raw(bytes([byte]))
            except trio.BrokenResourceError:
                closed_at = trio.current_time()
                break
            await trio.sleep(1)  # never idle for idle_timeout, never a whole frame
        assert closed_at is not None, "a dripped frame held the connection"
        assert closed_at - start == pytest.approx(FRAME_TIMEOUT, abs=2)
        # Whole frames sent slowly, one after another, are fine.
        slow = await h.connect()
        for _ in range(5):
            await trio.sleep(FRAME_TIMEOUT - 5)
            assert (await slow.request("ping"))["ok"]


async def test_wrong_token_never_reveals_a_lease(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    text = sign(vendor_key, products=[product("sub", not_after=int(BASE) + 20)])
    async with serving(tmp_path, vendor_key, text) as h:
        c = await h.connect()
        got = await c.acquire("sub")
        await trio.sleep(25)  # the product's own term is over; the lease (60 s) is not
        wrong = await c.request("renew", lease=got["lease"], token="not-the-token")
        assert wrong["error"]["code"] == "LEASE_NOT_FOUND"
        right = await c.request("renew", lease=got["lease"], token=got["token"])
        assert right["error"]["code"] == "LICENSE_EXPIRED"


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_a_connection_writes_through_one_task_for_its_life(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, ent: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Over a stream that only sends async (TLS, memory), answers that become
    ready elsewhere (a grant, once its batch is durable) are written by one
    writer task per connection, woken for each write; one task started per
    write cost more than the rest of a renewal."""
    spawns = _Spawns()
    async with serving(tmp_path, vendor_key, ent) as h:
        c = await h.connect()
        trio.lowlevel.add_instrument(spawns)
        try:
            for n in range(20):
                got = await c.acquire(product="free", fingerprint=f"machine-{n}")
                assert got["ok"], got
                renewed = await c.request("renew", lease=got["lease"], token=got["token"])
                assert renewed["ok"], renewed
        finally:
            trio.lowlevel.remove_instrument(spawns)
    writers = [name for name in spawns.names if "_writer" in name or "_drain" in name]
    assert len(writers) == 1, writers


async def test_a_trial_is_shown_as_such_to_admins(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """In the status document (floatd status, /status); the wire answers keep
    the contract's fields (protocol.md lists no trial flag in them)."""
    trial = sign(vendor_key, products=[product("app", trial=True), product("full")])
    async with serving(tmp_path, vendor_key, trial) as h:
        c = await h.connect()
        got = await c.acquire()
        assert got["ok"] and "trial" not in got["product"]
        products = {p["code"]: p["trial"] for p in h.server.status_document()["products"]}
        assert products == {"app": True, "full": False}
