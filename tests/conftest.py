"""Shared builders: vendor keys, entitlements, configs, and a wire client."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.config import Config, load_config
from floatd.core.changes import Audit, Change, DeleteLease, PruneAudit, PutLease, SetExpiry, SetMeta
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.core.entitlement import (
    format_public_key,
    product_payload,
    server_fingerprint,
    sign_entitlement,
)
from floatd.core.seats import Lease
from floatd.daemon.server import Server
from floatd.store.activation import atomic_write

BASE = 1_800_000_000.0  # a fixed "now" for sans-IO tests
MACHINE_ID = "0123456789abcdef0123456789abcdef"
SERVER_ID = server_fingerprint(MACHINE_ID)


def product(code: str = "app", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "lease_duration": 60,
        "metadata": {"tier": "gold"},
        "features": {"export": True},
        **overrides,
    }
    return product_payload(
        code, fields.pop("name", f"{code} product"), fields.pop("seats", 2), **fields
    )


def payload(products: Sequence[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "v": 1,
        "id": "ent-" + secrets.token_hex(4),
        "license": "lic-1",
        "customer": "ACME",
        "server": SERVER_ID,
        "issued_at": int(BASE) - 3600,
        "not_before": None,
        "not_after": None,
        "refresh_by": None,
        "nonce": None,
        "products": list(products) if products is not None else [product()],
    }
    p.update(overrides)
    return p


@pytest.fixture
def vendor_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def sign(key: Ed25519PrivateKey, **overrides: Any) -> str:
    return sign_entitlement(key, payload(**overrides))


def write_config(tmp_path: Path, key: Ed25519PrivateKey, **extra: Any) -> Path:
    """A config file for a test server rooted in tmp_path."""
    (tmp_path / "machine-id").write_text(MACHINE_ID + "\n")
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": ["127.0.0.1:0"], "machine_id_file": str(tmp_path / "machine-id")},
        "status": {"listen": ""},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "state": {"dir": str(tmp_path / "state")},
        "entitlement": {"vendor_keys": [format_public_key(key.public_key())]},
        "log": {"format": "json", "level": "debug"},
        # Tests fire hundreds of acquires from one address in no time; the
        # limits have tests of their own that switch them back on.
        "limits": {"acquires_per_second": 0},
    }
    for dotted, value in extra.items():
        section, _, name = dotted.partition("__")
        sections.setdefault(section, {})[name] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {_toml(value)}")
    path = tmp_path / "floatd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_config(tmp_path: Path, key: Ed25519PrivateKey, **extra: Any) -> Config:
    return load_config(write_config(tmp_path, key, **extra), env={})


class MemoryStore:
    """The LeaseStore interface in memory, recording every committed batch."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.meta: dict[str, str] = {}
        self.audit: list[Audit] = []
        self.batches: list[list[Change]] = []
        self.fail = False
        # How many of the next batches fail (then writes succeed again).
        self.fail_next = 0
        # Frozen: writes are silently lost, as if the process had died just now.
        self.frozen = False
        # The database file was deleted or swapped under the running server.
        self.replaced = False
        # Reads fail (a damaged or vanished database).
        self.unreadable = False

    def renders_lease_lines(self) -> bool:
        return False

    def load_leases(self) -> list[Lease]:
        return [dataclasses.replace(lease) for lease in self.leases.values()]

    def load_meta(self) -> dict[str, str]:
        if self.unreadable:
            from floatd.errors import StoreError

            raise StoreError("cannot read the state database (simulated)")
        return dict(self.meta)

    def apply(self, changes: Sequence[Change]) -> None:
        from floatd.errors import StoreError

        if self.fail or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            raise StoreError("disk full (simulated)")
        if self.frozen:
            return
        self.batches.append(list(changes))
        for change in changes:
            if isinstance(change, PutLease):
                self.leases[change.lease.id] = dataclasses.replace(change.lease)
            elif isinstance(change, SetExpiry):
                self.leases[change.lease_id].expires_at = change.expires_at
            elif isinstance(change, DeleteLease):
                self.leases.pop(change.lease_id, None)
            elif isinstance(change, SetMeta):
                self.meta[change.key] = change.value
            elif isinstance(change, Audit):
                self.audit.append(change)
            elif isinstance(change, PruneAudit):
                self.audit = [a for a in self.audit if a.ts >= change.before]

    def check_identity(self) -> None:
        from floatd.errors import StoreError

        if self.replaced:
            raise StoreError("the state database was replaced (simulated)")

    def close(self) -> None:
        pass


async def inline_run_sync(fn: Any, *args: Any, limiter: Any = None) -> Any:
    """Stand-in for trio.to_thread.run_sync that keeps MockClock deterministic."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class WireClient:
    """Speaks frames over any trio stream (memory or TCP)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.next_id = 0

    async def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        await self.stream.send_all(encode_frame({"op": op, "id": self.next_id, **fields}))
        return self.next_id

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any]:
        while (frame := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(70000)
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.feed(data)
        return frame

    async def closed(self) -> bool:
        """True once the server has closed its side (reads EOF)."""
        try:
            return await self.stream.receive_some(70000) == b""
        except trio.BrokenResourceError:
            return True

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        await self.send(op, **fields)
        return await self.recv()

    async def hello(self, **fields: Any) -> dict[str, Any]:
        return await self.request("hello", versions=[1], client="test/1", **fields)

    async def acquire(
        self, product: str = "app", fingerprint: str = "machine-0001", **fields: Any
    ) -> dict[str, Any]:
        return await self.request("acquire", product=product, fingerprint=fingerprint, **fields)


@asynccontextmanager
async def running(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, entitlement: str | None = None, **config: Any
) -> AsyncIterator[Server]:
    """A server in this process on real loopback sockets, stopped on exit;
    everything inside is bounded to 20 s."""
    cfg = make_config(tmp_path, vendor_key, **config)
    atomic_write(cfg.entitlement_path, entitlement or sign(vendor_key))
    server = Server(
        cfg,
        MemoryStore(),
        SERVER_ID,
        clock=lambda: BASE + trio.current_time(),
        run_sync=inline_run_sync,
    )
    server.load_state()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            yield server
            server.stop()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll (real time) until ``predicate`` holds: at most 5 s."""
    for _ in range(500):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def books(tmp_path: Path) -> Any:
    """A running reference authority (``test_online.Vendor``) that also sells the
    user-authorized product "sim": the license managers' tests work on it."""
    from test_online import Vendor  # a test module that itself imports this one

    vendor = Vendor(tmp_path)
    vendor.run("product", "add", "sim", "--name", "Sim", "--authorization", "user")
    vendor.process.start()
    try:
        yield vendor
    finally:
        vendor.process.stop()


@pytest.fixture(scope="session")
def pg_dsn() -> Any:
    """One throwaway PostgreSQL for the whole run (tests/pg.py); each test
    that needs a database makes its own in it (tests/pg.py: fresh_database)."""
    from pg import postgres

    with postgres() as url:
        yield url
