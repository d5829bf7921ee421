"""docs/protocol.md's byte-level vectors, checked against the real codec."""

from __future__ import annotations

import json
import re
from pathlib import Path

from floatd.client import machine_fingerprint as connection_fp
from floatd.client import simple
from floatd.client.fingerprint import fingerprint_of, machine_fingerprint
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.core.messages import parse_request
from floatd.errors import BadRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
PAIR = re.compile(r"```json\n(?P<json>.*?)\n```\s*```hex\n(?P<hex>.*?)\n```", re.S)
WIRE_CODES = {
    "BAD_FRAME", "BAD_REQUEST", "UNKNOWN_OP", "HELLO_REQUIRED", "UNSUPPORTED_VERSION",
    "FORBIDDEN", "IP_NOT_ALLOWED", "AUTH_FAILED", "UNKNOWN_PRODUCT", "NO_FREE_SEATS",
    "LEASE_NOT_FOUND", "NOT_ACTIVATED", "LICENSE_NOT_YET_VALID", "LICENSE_EXPIRED",
    "GRACE_PERIOD_OVER", "SERVER_TIME_MODIFIED", "RATE_LIMITED", "BUSY", "INTERNAL",
    "UNAVAILABLE", "POLICY_DENIED", "BORROW_NOT_ALLOWED",
}  # fmt: skip


def vectors() -> list[tuple[dict[str, object], bytes]]:
    text = DOC.read_text(encoding="utf-8")
    return [
        (json.loads(m["json"]), bytes.fromhex(m["hex"].replace("\n", " ")))
        for m in PAIR.finditer(text)
    ]


def test_every_vector_is_what_the_codec_writes_and_reads() -> None:
    found = vectors()
    assert len(found) == 14 + len(WIRE_CODES)  # seven ops, both ways, and every error
    for message, frame in found:
        assert encode_frame(message) == frame, message
        decoder = FrameDecoder()
        for i in range(len(frame)):  # byte by byte, as a careful reader must cope with
            decoder.feed(frame[i : i + 1])
            got = decoder.next_frame()
            assert (got is None) == (i < len(frame) - 1)
        assert got == message


def test_every_op_and_every_error_code_has_a_vector() -> None:
    found = vectors()
    ops = {m["op"] for m, _ in found if "op" in m}
    assert ops == {"hello", "acquire", "renew", "release", "borrow", "info", "ping"}
    codes = {m["error"]["code"] for m, _ in found if m.get("ok") is False}  # type: ignore[index]
    assert codes == WIRE_CODES


def test_the_fingerprint_recipe_matches_every_client(tmp_path: Path) -> None:
    """The guide's vector, and a host without /etc/machine-id: the library and
    the simple client must send one fingerprint, or a machine takes two seats."""
    text = DOC.read_text(encoding="utf-8")
    vector = re.search(
        r"`0123456789abcdef0123456789abcdef`.*?fingerprint is `([0-9a-f]{32})`", text, re.S
    )
    assert vector is not None
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    assert machine_fingerprint((str(machine_id),)) == vector[1]
    dbus = tmp_path / "dbus-machine-id"
    dbus.write_text("fedcba9876543210fedcba9876543210\n")
    missing = str(tmp_path / "no-such-file")
    assert machine_fingerprint((missing, str(dbus))) == fingerprint_of(
        "fedcba9876543210fedcba9876543210"
    )
    assert simple.machine_fingerprint is machine_fingerprint is connection_fp


BASE_REQUESTS: dict[str, dict[str, object]] = {
    "hello": {"versions": [1], "client": "x"},
    "acquire": {"product": "app", "fingerprint": "f" * 8},
    "renew": {"lease": "l", "token": "t"},
    "release": {"lease": "l", "token": "t"},
    "borrow": {"lease": "l", "token": "t", "duration": 60},
    "info": {"product": "p"},
    "ping": {},
}


def field_tables() -> dict[str, list[tuple[str, str, str, bool]]]:
    """op -> (field, type, bounds, required) rows of "Fields of each request"."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Fields of each request", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[tuple[str, str, str, bool]]] = {}
    ops: list[str] = []
    for line in section.splitlines():
        if line.startswith("**"):
            ops = re.findall(r"\*\*(\w+)\*\*", line)
            for op in ops:
                tables.setdefault(op, [])
        elif line.startswith("| ") and not line.startswith(("| field", "|---")):
            name, kind, bounds, required = (cell.strip() for cell in line.strip("|").split("|"))
            for op in ops:
                tables[op].append((name, kind, bounds, required == "yes"))
    return tables


def _parse(op: str, fields: dict[str, object]) -> str | None:
    """None if the request parses, else the field its BAD_REQUEST names."""
    try:
        parse_request({"op": op, "id": 1, **fields})
    except BadRequest as exc:
        return str(exc.details.get("field"))
    return None


def test_the_field_tables_are_what_the_server_checks() -> None:
    tables = field_tables()
    assert set(tables) == set(BASE_REQUESTS)
    for op, rows in tables.items():
        base = BASE_REQUESTS[op]
        assert _parse(op, base) is None, op
        documented = {name for name, *_ in rows}
        assert set(base) <= documented, op
        for name, kind, bounds, required in rows:
            without = {k: v for k, v in base.items() if k != name}
            assert (_parse(op, without) == name) is required, (op, name, "required")
            assert _parse(op, {**base, name: object()}) == name, (op, name, "type")
            chars = re.fullmatch(r"(\d+)\.\.(\d+) chars", bounds)
            if kind == "str":
                assert chars is not None, (op, name, bounds)
                lo, hi = int(chars[1]), int(chars[2])
                assert _parse(op, {**base, name: "x" * hi}) is None, (op, name, hi)
                assert _parse(op, {**base, name: "x" * (hi + 1)}) == name, (op, name, hi + 1)
                if lo > 0:
                    assert _parse(op, {**base, name: "x" * (lo - 1)}) == name, (op, name, lo)
    acquire = BASE_REQUESTS["acquire"]
    assert _parse("acquire", {**acquire, "wait": 3600}) is None
    assert _parse("acquire", {**acquire, "wait": 3600.5}) == "wait"
    assert _parse("acquire", {**acquire, "meta": {f"k{i}": "v" for i in range(17)}}) == "meta"
