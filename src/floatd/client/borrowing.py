"""Borrowed seats on the laptop: stored certificates, checked offline, returned.

A borrow certificate (:mod:`floatd.core.borrow`) is kept in the user's cache
directory, one file a product, mode 0600, with what returning it early needs
(the lease id and token, the servers) and the latest time this machine has
seen while using it: a clock set back before that is caught, so a borrow
cannot be stretched by turning the clock back.

``borrowed(product, vendor_keys)`` is the check an application runs with no
network; ``return_borrow(servers, product)`` gives the seat back early.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from floatd.client.connection import Connection, parse_server, refusal
from floatd.client.fingerprint import machine_fingerprint
from floatd.core.borrow import Borrow, verify_borrow
from floatd.core.entitlement import trusted_keys
from floatd.errors import BorrowUnreadable, FloatdError

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def borrow_dir() -> Path:
    """Where certificates live: ``$FLOATD_BORROW_DIR``, else the user's cache."""
    explicit = os.environ.get("FLOATD_BORROW_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "floatd" / "borrows"


def _path(product: str) -> Path:
    return borrow_dir() / (_SAFE.sub("_", product) + ".json")


def parse_duration(text: str) -> int:
    """``3d``, ``12h``, ``90m``, ``3600`` (seconds) -> seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration such as 3d, 12h, 90m or 3600")
    return int(match[1]) * _UNITS[match[2]]


def save(product: str, certificate: str, lease: str, token: str, servers: Sequence[str]) -> Path:
    """Keep a certificate (and what returning it needs) for ``product``, 0600."""
    path = _path(product)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {
        "product": product,
        "certificate": certificate,
        "lease": lease,
        "token": token,
        "servers": list(servers),
        "seen": time.time(),
    }
    _write(path, doc)
    return path


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read(product: str) -> dict[str, Any]:
    try:
        doc = json.loads(_path(product).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BorrowUnreadable(f"no borrow of {product!r} is stored on this machine") from None
    except (OSError, ValueError) as exc:
        raise BorrowUnreadable(f"the stored borrow of {product!r} cannot be read: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("certificate"), str):
        raise BorrowUnreadable(f"the stored borrow of {product!r} is damaged")
    return doc


def borrowed(
    product: str,
    vendor_keys: Sequence[str],
    *,
    fingerprint: str | None = None,
    now: float | None = None,
) -> Borrow:
    """The stored borrow of ``product``, checked offline against the vendor's
    keys (``ed25519:...``); raises the BorrowInvalid naming the failed step.
    Each good check moves the stored "latest time seen" forward."""
    doc = _read(product)
    now = time.time() if now is None else now
    seen = doc.get("seen")
    got = verify_borrow(
        doc["certificate"],
        trusted_keys(vendor_keys),
        fingerprint or machine_fingerprint(),
        now,
        seen if isinstance(seen, (int, float)) else None,
    )
    if got.product != product:
        raise BorrowUnreadable(f"the file for {product!r} holds a borrow of {got.product!r}")
    if not isinstance(seen, (int, float)) or now > seen:
        doc["seen"] = now
        with contextlib.suppress(OSError):  # a read-only cache still checks
            _write(_path(product), doc)
    return got


def stored() -> list[dict[str, Any]]:
    """What is stored, unverified (products, leases, servers): for listings."""
    out = []
    for path in sorted(borrow_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and isinstance(doc.get("product"), str):
                out.append(doc)
    return out


def forget(product: str) -> None:
    _path(product).unlink(missing_ok=True)


async def return_borrow(
    servers: str | Sequence[str] | None,
    product: str,
    *,
    tls: Any = None,
    token: str | None = None,
) -> None:
    """Give the borrowed seat back early: release it at a server (the ones it
    came from unless ``servers`` says) and delete the certificate."""
    doc = _read(product)
    names = [servers] if isinstance(servers, str) else list(servers or doc.get("servers") or [])
    errors = []
    for name in names:
        host, port = parse_server(name)
        try:
            conn = await Connection.open(host, port, token=token, tls=tls)
        except FloatdError as exc:  # unreachable or busy: try the next, say why at the end
            errors.append(f"{name}: {exc}")
            continue
        try:
            answer = await conn.request("release", lease=doc["lease"], token=doc["token"])
        finally:
            await conn.aclose()
        if not answer.get("ok") and answer.get("error", {}).get("code") != "LEASE_NOT_FOUND":
            raise refusal(answer.get("error"))
        forget(product)  # returned, or already over at the server
        return
    raise ConnectionError("; ".join(errors) or "no server to return the borrow to")
