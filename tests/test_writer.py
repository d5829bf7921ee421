"""The state writer process (floatd.store.writer) and the committer driving it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_store import lease

from floatd.core.changes import Audit, PutLease, SetExpiry, SetMeta
from floatd.core.outcomes import audit_record
from floatd.daemon.committer import LAZY_FLUSH, GroupCommitter
from floatd.errors import StoreError
from floatd.logs import lease_line
from floatd.store.sqlite import SQLiteLeaseStore
from floatd.store.writer import ProcessLeaseStore, receive_message, send_message

WAIT = 10.0  # seconds: the bound on every wait for a process here


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "floatd.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[ProcessLeaseStore]:
    writer = ProcessLeaseStore(db)
    yield writer
    writer.close()


def stored(db: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Lease expiries and meta as a fresh reader sees them."""
    reader = SQLiteLeaseStore(db)
    try:
        return {x.id: x.expires_at for x in reader.load_leases()}, reader.load_meta()
    finally:
        reader.close()


def child_of(store: ProcessLeaseStore) -> subprocess.Popen[bytes]:
    proc = store._proc
    assert proc is not None
    return proc


def wait_gone(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=WAIT)


def test_a_commit_is_in_the_database_when_apply_returns(tmp_path: Path) -> None:
    db = tmp_path / "state" / "floatd.sqlite3"  # the directory is created too
    store = ProcessLeaseStore(db)
    try:
        one = lease(expires_at=500.0)
        store.apply(
            [
                PutLease(one),
                Audit(1.0, "granted", "app", lease=one.id, seat=one.seat, granted_at=1.0),
                SetMeta("k", "v"),
            ]
        )
        store.apply([SetExpiry(one.id, 900.0)])
        # Another connection sees it before the store is closed: committed.
        leases, meta = stored(db)
        assert meta.pop("state_id")  # recorded at the first start (floatd.store.identity)
        assert (leases, meta) == ({one.id: 900.0}, {"k": "v"})
        assert store.load_leases()[0].seat == one.seat  # the reader side round-trips
    finally:
        store.close()


async def test_apply_async_commits_without_blocking_the_loop(
    db: Path, store: ProcessLeaseStore
) -> None:
    leases = [lease(expires_at=100.0 + i) for i in range(300)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for chunk in range(0, 300, 100):
                await store.apply_async([PutLease(x) for x in leases[chunk : chunk + 100]])
            nursery.cancel_scope.cancel()
    assert ticks > 3  # the loop kept running while batches were in the child
    assert stored(db)[0] == {x.id: x.expires_at for x in leases}


async def test_a_batch_larger_than_the_pipe_is_sent_in_parts(
    db: Path, store: ProcessLeaseStore
) -> None:
    """A pipe holds 64 KiB; a batch bigger than that (here about 310 KB:
    thousands of leases, as a burst of expiries can bring) goes through whole."""
    leases = [lease(expires_at=100.0 + i) for i in range(3000)]
    with trio.fail_after(WAIT):
        await store.apply_async([PutLease(x) for x in leases])
    assert stored(db)[0] == {x.id: x.expires_at for x in leases}


def test_the_child_ends_with_its_input_and_ignores_stop_signals(tmp_path: Path) -> None:
    """Ctrl-C or systemd's SIGTERM reach the whole group; the writer must live
    until the server has made its final commit, then end when the pipe closes."""
    store = ProcessLeaseStore(tmp_path / "floatd.sqlite3")
    proc = child_of(store)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        proc.send_signal(signum)
    store.apply([SetMeta("after", "signals")])  # answered: still alive
    assert proc.poll() is None
    store.close()
    assert wait_gone(proc) == 0
    assert stored(tmp_path / "floatd.sqlite3")[1]["after"] == "signals"


def test_a_killed_child_fails_its_batch_and_the_next_batch_restarts_it(
    db: Path, store: ProcessLeaseStore
) -> None:
    first = child_of(store)
    first.kill()
    wait_gone(first)
    # The store notices before writing and starts a new child.
    store.apply([SetMeta("k", "1")])
    second = child_of(store)
    assert second.pid != first.pid
    # A child that dies with the batch in flight fails that batch only.
    os.kill(second.pid, signal.SIGKILL)
    second.wait(timeout=WAIT)
    second.poll = lambda: None  # type: ignore[method-assign]  # as if it died mid-batch
    with pytest.raises(StoreError, match="state writer failed"):
        store.apply([SetMeta("k", "lost")])
    store.apply([SetMeta("k", "2")])
    assert stored(db)[1]["k"] == "2"


async def test_apply_async_restarts_a_dead_child(
    db: Path, store: ProcessLeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...from the server's own thread: the child's parent-death signal follows
    the thread that started it, and a worker thread retires when idle (the new
    writer would then be killed with it, an outage each time)."""
    spawned_in: list[int] = []
    popen = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> Any:
        spawned_in.append(threading.get_ident())
        return popen(*args, **kwargs)

    monkeypatch.setattr("floatd.store.writer.subprocess.Popen", recording)
    with trio.fail_after(WAIT):
        await store.apply_async([SetMeta("k", "1")])
        proc = child_of(store)
        proc.kill()
        await trio.to_thread.run_sync(proc.wait)
        await store.apply_async([SetMeta("k", "2")])
    assert child_of(store).pid != proc.pid
    assert stored(db)[1]["k"] == "2"
    assert spawned_in == [threading.main_thread().ident]


def test_a_bad_message_gets_an_error_and_the_child_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "floatd.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "floatd.store.writer", str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert receive_message(proc.stdout) == "ready"
        for bad in ("not a batch", [1, 2, 3], [[], [["short"]], [], [], [], None, []]):
            send_message(proc.stdin, bad)
            error, lines = receive_message(proc.stdout)
            assert isinstance(error, str) and error and lines == ""
        # A log index that names no record loses only its line, never the commit.
        send_message(proc.stdin, [[], [], [], [], [["k", "v"]], None, [5, "x"]])
        assert receive_message(proc.stdout) == [None, ""]
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0
        proc.stdout.close()
    assert stored(db)[1]["k"] == "v"


def test_a_second_writer_waits_until_the_first_has_exited(tmp_path: Path) -> None:
    """After a kill -9 the old writer may still be finishing a commit; the new
    server must not read the leases until it has."""
    db = tmp_path / "floatd.sqlite3"
    first = ProcessLeaseStore(db)
    got: list[ProcessLeaseStore] = []
    thread = threading.Thread(target=lambda: got.append(ProcessLeaseStore(db)))
    thread.start()
    try:
        thread.join(timeout=1.0)
        assert thread.is_alive() and not got  # blocked on the first writer's lock
        first.apply([SetMeta("by", "first")])
    finally:
        first.close()
    thread.join(timeout=WAIT)
    assert got, "the second writer never started"
    try:
        assert got[0].load_meta()["by"] == "first"
    finally:
        got[0].close()


def test_an_unusable_state_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        ProcessLeaseStore(blocker / "floatd.sqlite3")
    assert "\n" not in str(info.value) and str(blocker) in str(info.value)


async def test_the_committer_drives_the_child_from_a_task(
    db: Path, store: ProcessLeaseStore
) -> None:
    """Urgent batches are committed at once, lazy ones within LAZY_FLUSH, and
    the final flush marks the stop clean; no worker thread involved."""
    threads_before = threading.active_count()
    committer = GroupCommitter(store)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(committer.run)
            one = lease(expires_at=1000.0)
            await committer.submit([PutLease(one)]).wait()
            assert stored(db)[0] == {one.id: 1000.0}
            assert threading.active_count() <= threads_before
            lazy = committer.submit([SetExpiry(one.id, 2000.0)], urgent=False)
            started = time.monotonic()
            await lazy.wait()
            assert time.monotonic() - started >= LAZY_FLUSH * 0.5  # held back to gather
            assert stored(db)[0] == {one.id: 2000.0}
            committer.close()
    leases, meta = stored(db)
    assert meta["clean"] == "1" and leases == {one.id: 2000.0}
    assert committer.commits >= 3


async def test_the_child_logs_the_lease_events_it_committed(db: Path) -> None:
    """Only the records marked for it, once committed, dated by the record."""
    got: list[str] = []
    store = ProcessLeaseStore(db, lease_lines=got.append)
    a = lease(expires_at=200.0, duration=60.0)
    try:
        store.apply(
            [
                PutLease(a),
                audit_record("granted", a, 140.25, True),
                audit_record("renewed", a, 150.0, False),  # the service logged this one itself
                Audit(151.0, "refused", "app", code="NO_FREE_SEATS"),
            ]
        )
        await store.apply_async([SetExpiry(a.id, 300.0), audit_record("renewed", a, 160.5, True)])
        await store.apply_async([SetMeta("k", "v")])  # no lease event: no lines
    finally:
        store.close()

    def line(event: str, ts: float) -> str:
        return lease_line(event, a.id, a.product, a.fingerprint, a.instance, a.user, a.peer, ts)

    assert got == [line("lease_granted", 140.25), line("lease_renewed", 160.5)]
    first = json.loads(got[0])
    assert first["timestamp"] == "1970-01-01T00:02:20.250000Z"
    assert first["lease"] == a.id and first["event"] == "lease_granted"
