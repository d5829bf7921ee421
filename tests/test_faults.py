"""Failed and overdue writes inside the server (memory streams, MockClock).

The promise under test: memory never holds a seat state the disk does not.  A
failed or overdue commit makes the server refuse every write (UNAVAILABLE)
until a reload from disk, done as after a crash, commits; so a release that did
not reach the disk frees nothing, nobody takes a seat the disk still gives to
someone else, and a renewal acknowledged before its write is still honoured.
The real process under the same faults: tests/test_fault_integration.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing
from conftest import BASE, MemoryStore, WireClient, product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_server import Gate, Harness, serving

from floatd.core.changes import Change, SetMeta
from floatd.daemon.committer import COMMIT_TIMEOUT, GroupCommitter
from floatd.daemon.recovery import RECOVERY_RETRY


def _ent(key: Ed25519PrivateKey) -> str:
    return sign(key, products=[product("app", seats=2), product("solo", seats=1)])


async def _recovered(h: Harness) -> None:
    """Until the server writes again (bounded: 30 s of MockClock)."""
    with trio.fail_after(30):
        while not h.server.service.writable:
            await trio.sleep(RECOVERY_RETRY / 2)


async def test_a_release_whose_write_fails_frees_nothing(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        a, b = await h.connect(), await h.connect()
        held = await a.acquire("solo", "machine-a")
        h.store.fail = True
        got = await a.request("release", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        # Nobody takes the seat the disk still gives to machine-a.
        assert (await b.acquire("solo", "machine-b"))["error"]["code"] == "UNAVAILABLE"
        assert not h.server.status_document()["state"]["writable"]
        # Within a retry the pool is reloaded from disk (still readable): reads
        # show the disk's truth, and a second release changes nothing either.
        await trio.sleep(RECOVERY_RETRY * 1.5)
        assert (await b.request("info", product="solo"))["used"] == 1
        got = await a.request("release", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        assert (await b.request("info", product="solo"))["used"] == 1
        h.store.fail = False
        await _recovered(h)
        assert (await b.acquire("solo", "machine-b"))["error"]["code"] == "NO_FREE_SEATS"
        assert (await a.request("renew", lease=held["lease"], token=held["token"]))["ok"]
        assert set(h.store.leases) == {held["lease"]}


async def test_a_seat_freed_by_a_failed_release_never_reaches_the_disk_twice(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """The release's batch fails while the next batch, in which another client
    took the seat it freed in memory, waits: that batch must not be written."""
    gate = Gate()
    async with serving(tmp_path, vendor_key, _ent(vendor_key), run_sync=gate) as h:
        a, b = await h.connect(), await h.connect()
        held = await a.acquire("solo", "machine-a")
        gate.close()
        await a.send("release", lease=held["lease"], token=held["token"])
        await trio.sleep(0.01)  # the release's batch is in flight, stuck at the gate
        await b.send("acquire", product="solo", fingerprint="machine-b")
        await trio.sleep(0.01)  # b's grant waits in the next batch
        h.store.fail_next = 1
        gate.open.set()
        assert (await a.recv())["error"]["code"] == "UNAVAILABLE"
        assert (await b.recv())["error"]["code"] == "UNAVAILABLE"
        await _recovered(h)
        assert set(h.store.leases) == {held["lease"]}
        assert (await b.request("info", product="solo"))["used"] == 1
        assert (await a.request("renew", lease=held["lease"], token=held["token"]))["ok"]


async def test_a_lazily_acknowledged_renewal_survives_a_failed_write(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    async with serving(tmp_path, vendor_key, _ent(vendor_key), store=store) as h:
        c = await h.connect()
        held = await c.acquire("app", "machine-1")
        await trio.sleep(50)
        renewed = await c.request("renew", lease=held["lease"], token=held["token"])
        assert renewed["ok"]  # answered before its write, which now fails
        promised = BASE + trio.current_time() + renewed["expires_in"]
        store.fail = True
        await trio.sleep(5)  # writes fail for 5 s; later heartbeats must not commit
        got = await c.request("renew", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        store.fail = False
        await _recovered(h)
        assert store.leases[held["lease"]].expires_at >= promised
        # And a crash right now (nothing more reaches the disk) keeps it too.
        store.frozen = True
    store.frozen = False
    await trio.sleep(promised - BASE - trio.current_time() - 1)
    async with serving(tmp_path, vendor_key, _ent(vendor_key), store=store) as h:
        c = await h.connect()
        assert (await c.request("renew", lease=held["lease"], token=held["token"]))["ok"]


async def test_a_stalled_writer_costs_seconds_not_seats(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    gate = Gate()
    async with serving(tmp_path, vendor_key, _ent(vendor_key), run_sync=gate) as h:
        c = await h.connect()
        held = await c.acquire("app", "machine-1")
        gate.close()
        asked = trio.current_time()
        got = await c.acquire("app", "machine-2")
        # Answered when the commit is given up, not when the writer wakes.
        assert got["error"]["code"] == "UNAVAILABLE"
        assert trio.current_time() - asked <= COMMIT_TIMEOUT + 1
        assert not h.server.service.writable
        await trio.sleep(20)
        got = await c.request("renew", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"  # at once, no waiting
        gate.open.set()
        await _recovered(h)
        assert (await c.request("renew", lease=held["lease"], token=held["token"]))["ok"]
        assert (await c.acquire("app", "machine-2"))["ok"]
        assert len(h.store.leases) == 2


async def test_queued_acquires_are_answered_unavailable(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        holder = await h.connect()
        held = await holder.acquire("solo", "machine-0")
        queued = await h.connect()
        await queued.send("acquire", product="solo", fingerprint="machine-q", wait=100)
        await trio.sleep(1)
        h.store.fail = True
        await trio.sleep(2)  # a heartbeat fails
        with trio.fail_after(1):
            assert (await queued.recv())["error"]["code"] == "UNAVAILABLE"
        h.store.fail = False
        await _recovered(h)
        assert h.server.service.ledger.waiting("solo") == 0
        assert (await holder.request("release", lease=held["lease"], token=held["token"]))["ok"]
        assert (await queued.acquire("solo", "machine-q"))["ok"]


async def test_a_start_on_a_disk_that_refuses_writes_serves_reads(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    async with serving(tmp_path, vendor_key, _ent(vendor_key), store=store) as h:
        c = await h.connect()
        held = await c.acquire("app", "machine-1")
    store.fail = True
    async with serving(tmp_path, vendor_key, _ent(vendor_key), store=store) as h:
        c = await h.connect()
        info = await c.request("info", product="app")
        assert info["used"] == 1
        got = await c.request("renew", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        store.fail = False
        await _recovered(h)
        assert (await c.request("renew", lease=held["lease"], token=held["token"]))["ok"]


async def test_an_admin_revoke_is_refused_while_unavailable(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        c: WireClient = await h.connect()
        held = await c.acquire("solo", "machine-1")
        h.store.fail = True
        await trio.sleep(2)
        try:
            await h.server.revoke(held["lease"])
        except Exception as exc:
            assert getattr(exc, "code", None) == "UNAVAILABLE"
        else:
            raise AssertionError("revoke succeeded while the state could not be written")
        h.store.fail = False
        await _recovered(h)
        assert set(h.store.leases) == {held["lease"]}


async def test_a_database_replaced_while_running_stops_writes(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        c = await h.connect()
        held = await c.acquire("app", "machine-1")
        h.store.replaced = True
        await trio.sleep(1.5)  # noticed within a second or so
        assert not h.server.service.writable
        got = await c.request("renew", lease=held["lease"], token=held["token"])
        assert got["error"]["code"] == "UNAVAILABLE"
        await trio.sleep(10)
        assert not h.server.service.writable  # no recovery onto a file nobody reads
        h.store.replaced = False
        await _recovered(h)
        assert (await c.request("renew", lease=held["lease"], token=held["token"]))["ok"]


async def test_an_answer_too_large_for_a_frame_takes_no_seat(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """Entitlements that could make one are refused (their bounds); should an
    answer still not fit, the seat granted in it is given back."""
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        ent = h.server.service.entitlement
        assert ent is not None
        huge = dataclasses.replace(ent.products[1], metadata={"k": "v" * 70_000})
        now = BASE + trio.current_time()
        h.server.service.install(dataclasses.replace(ent, products=(huge,)), now)
        c = await h.connect()
        got = await c.acquire("solo", "machine-1")
        assert got["error"]["code"] == "INTERNAL"
        await trio.sleep(0.5)
        assert h.server.service.ledger.used("solo") == 0


async def test_an_unreadable_history_refuses_a_new_entitlement_and_the_server_lives(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, vendor_key, _ent(vendor_key)) as h:
        c = await h.connect()
        h.store.unreadable = True
        h.install(sign(vendor_key, products=[product("app", seats=7)]))
        await trio.sleep(3)
        assert (await c.request("info", product="app"))["seats"] == 2  # the old one stays
        h.store.unreadable = False
        await trio.sleep(2)  # a refused file is looked at again at every poll
        assert (await c.request("info", product="app"))["seats"] == 7


async def test_a_commit_under_way_is_finished_when_its_task_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server that stops mid-commit must not leave a batch half applied
    (the store cannot roll a transaction back that it never finished): the
    commit runs to its end, and only then does the committer stop."""
    store = MemoryStore()

    async def slow(apply: Callable[..., object], changes: list[Change]) -> None:
        await trio.sleep(1)  # the writer, busy; cancelling here loses the batch
        apply(changes)

    committer = GroupCommitter(store, clock=lambda: BASE + trio.current_time(), run_sync=slow)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        batch = committer.submit([SetMeta("note", "kept")])
        await trio.sleep(0.5)  # the commit is under way
        nursery.cancel_scope.cancel()
    assert store.meta["note"] == "kept"
    assert batch.done.is_set() and batch.error is None
