"""Clock tamper detection: the guard alone, then the server with an injected clock."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing
from conftest import BASE, SERVER_ID, MemoryStore, inline_run_sync, make_config, product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_ops import get, http
from test_server import Harness

from floatd.core.clockguard import ClockGuard
from floatd.daemon.admin import AdminServer
from floatd.daemon.server import Server
from floatd.store.activation import atomic_write


def test_the_guard_follows_the_clock_and_catches_it_going_back() -> None:
    g = ClockGuard(60, mark=1000.0)
    g.start(1000.0, 0.0)
    g.observe(1100.0, 100.0)
    assert g.mark == 1100.0 and not g.tampered(1100.0)
    assert not g.tampered(1041.0)  # within the allowed offset
    assert g.tampered(1039.0)
    # Set forward a year, then corrected: the monotonic clock never vouched for
    # the jump, so the mark stays near real time and nothing locks up.
    g.observe(1100.0 + 365 * 86400, 101.0)
    assert g.mark <= 1000.0 + 101.0 + 60
    assert not g.tampered(1102.0)
    # A mark from before a restart holds whatever the clock says now.
    again = ClockGuard(60, mark=5000.0)
    again.start(1000.0, 0.0)
    assert again.tampered(1000.0) and not again.tampered(4950.0)


async def test_the_server_refuses_while_the_clock_is_behind(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    skew = [0.0]  # what the "admin" did to the wall clock
    cfg = make_config(tmp_path, vendor_key)
    atomic_write(cfg.entitlement_path, sign(vendor_key, products=[product("app", seats=2)]))
    store = MemoryStore()
    server = Server(
        cfg,
        store,
        SERVER_ID,
        clock=lambda: BASE + trio.current_time() + skew[0],
        run_sync=inline_run_sync,
    )
    server.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        h = Harness(server, store, nursery)
        c = await h.connect()
        held = await c.acquire("app")
        assert held["ok"]
        await trio.sleep(20)
        skew[0] = -2 * 3600.0  # two hours back
        await trio.sleep(2)
        refused = await c.acquire("app", fingerprint="machine-0002")
        assert refused["error"]["code"] == "SERVER_TIME_MODIFIED"
        renew = await c.request("renew", lease=held["lease"], token=held["token"])
        assert renew["error"]["code"] == "SERVER_TIME_MODIFIED"
        (resp,) = await http(server.status, get("/healthz"))
        assert resp.status_code == 503 and json.loads(resp.body) == {"status": "time_modified"}
        assert server.status_document()["activation"]["state"] == "time_modified"
        skew[0] = 0.0  # put right
        await trio.sleep(1)
        assert (await c.request("renew", lease=held["lease"], token=held["token"]))["ok"]
        await trio.sleep(11)  # the mark has been persisted meanwhile
        assert float(store.meta["clock_mark"]) >= BASE + 30
        server.stop()
    # Restarted with the clock an hour behind what the state dir has seen.
    late = Server(cfg, store, SERVER_ID, clock=lambda: BASE - 3600.0, run_sync=inline_run_sync)
    late.load_state()
    assert late.service.activation_state(BASE - 3600.0) == "time_modified"


async def test_a_state_dir_copied_to_another_machine_serves_nothing(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """The copy holds the entitlement and the leases of the original; bound to
    the original's fingerprint, the entitlement is refused on the copy."""
    import shutil

    from conftest import WireClient

    cfg = make_config(tmp_path, vendor_key)
    atomic_write(cfg.entitlement_path, sign(vendor_key, products=[product("app", seats=2)]))
    store = MemoryStore()
    original = Server(
        cfg, store, SERVER_ID, clock=lambda: BASE + trio.current_time(), run_sync=inline_run_sync
    )
    original.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(original.run)
        c = await Harness(original, store, nursery).connect()
        held = await c.acquire("app")
        assert held["ok"]
        original.stop()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "state", copy / "state")
    copied = make_config(
        copy,
        vendor_key,
        server__machine_id_file=str(copy / "machine-id"),
        state__dir=str(copy / "state"),
    )
    (copy / "machine-id").write_text("another-machine-entirely\n")  # after make_config
    from floatd.config import read_machine_id
    from floatd.core.entitlement import server_fingerprint

    other_id = server_fingerprint(read_machine_id(copied))
    assert other_id != SERVER_ID
    clone = Server(
        copied, store, other_id, clock=lambda: BASE + trio.current_time(), run_sync=inline_run_sync
    )
    clone.load_state()
    assert clone.service.entitlement is None
    async with trio.open_nursery() as nursery:
        await nursery.start(clone.run)
        client: WireClient = await Harness(clone, store, nursery).connect()
        assert (await client.acquire("app"))["error"]["code"] == "NOT_ACTIVATED"
        renew = await client.request("renew", lease=held["lease"], token=held["token"])
        assert renew["error"]["code"] == "NOT_ACTIVATED"  # the copied lease is no use either
        clone.stop()


def _server(tmp_path: Path, store: MemoryStore, wall: list[float]) -> Server:
    """A server whose wall clock is BASE + MockClock time + ``wall[0]``."""
    cfg = make_config(tmp_path, vendor_key_of(tmp_path))
    return Server(
        cfg,
        store,
        SERVER_ID,
        clock=lambda: BASE + trio.current_time() + wall[0],
        run_sync=inline_run_sync,
    )


def vendor_key_of(tmp_path: Path) -> Ed25519PrivateKey:
    """One vendor key per test directory (the config and entitlement must agree)."""
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "vendor.pem"
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(loaded, Ed25519PrivateKey)
    return loaded


async def test_a_wall_clock_step_neither_expires_nor_stretches_leases(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    key = vendor_key_of(tmp_path)
    wall = [0.0]
    store = MemoryStore()
    server = _server(tmp_path, store, wall)
    atomic_write(
        server.config.entitlement_path,
        sign(key, products=[product("app", seats=2, lease_duration=120)]),
    )
    server.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        h = Harness(server, store, nursery)
        c = await h.connect()
        held = await c.acquire("app")  # ends 120 s from now, whatever the clock says
        await trio.sleep(60)
        wall[0] = 180.0  # stepped forward past the lease's date
        await trio.sleep(50)
        assert (await c.request("info", product="app"))["used"] == 1
        assert store.leases[held["lease"]].expires_at == BASE + 120 + 180  # persisted
        wall[0] = 0.0  # put right again: not a clock turned back, and nothing stretched
        await trio.sleep(5)
        renewed = await c.request("renew", lease=held["lease"], token=held["token"])
        assert renewed["ok"], renewed
        other = await c.acquire("app", fingerprint="machine-0002")
        wall[0] = -30.0
        await trio.sleep(121)  # a step back does not stretch a lease either
        c = await h.connect()  # (the old connection was idle too long)
        gone = await c.request("renew", lease=other["lease"], token=other["token"])
        assert gone["error"]["code"] == "LEASE_NOT_FOUND"
        assert server.clock_steps == 3
        server.stop()


async def test_a_clock_set_far_ahead_and_put_right_is_reset_by_the_admin(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    key = vendor_key_of(tmp_path)
    year = 365 * 86400.0
    wall = [year]  # started a year ahead
    store = MemoryStore()
    ahead = _server(tmp_path, store, wall)
    atomic_write(ahead.config.entitlement_path, sign(key, products=[product("app", seats=2)]))
    ahead.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(ahead.run)
        c = await Harness(ahead, store, nursery).connect()
        held = await c.acquire("app")
        await trio.sleep(15)  # the mark, a year ahead, is persisted
        ahead.stop()
    wall[0] = 0.0  # the operator puts the clock right and restarts
    fixed = _server(tmp_path, store, wall)
    fixed.load_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(fixed.run)
        c = await Harness(fixed, store, nursery).connect()
        refused = await c.acquire("app", fingerprint="machine-0002")
        assert refused["error"]["code"] == "SERVER_TIME_MODIFIED"
        (answer,) = await AdminServer(fixed, tmp_path / "x.sock").answer({"cmd": "clock_reset"})
        assert answer["ok"] and answer["leases_clamped"] == 1
        assert (await c.acquire("app", fingerprint="machine-0002"))["ok"]
        now = BASE + trio.current_time()
        # The lease the wrong clock dated a year ahead ends a duration from now.
        assert store.leases[held["lease"]].expires_at <= now + 60
        assert [a.event for a in store.audit].count("clock_reset") == 1
        fixed.stop()
    again = _server(tmp_path, store, wall)
    again.load_state()
    assert again.service.activation_state(BASE + trio.current_time()) == "active"
