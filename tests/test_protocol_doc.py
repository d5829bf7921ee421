"""docs/protocol.md's byte-level vectors, checked against the real codec."""

from __future__ import annotations

import json
import re
from pathlib import Path

from floatd.client import machine_fingerprint as connection_fp
from floatd.client import simple
from floatd.client.fingerprint import fingerprint_of, machine_fingerprint
from floatd.protocol.codec import FrameDecoder, encode_frame

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
PAIR = re.compile(r"```json\n(?P<json>.*?)\n```\s*```hex\n(?P<hex>.*?)\n```", re.S)
WIRE_CODES = {
    "BAD_FRAME", "BAD_REQUEST", "UNKNOWN_OP", "HELLO_REQUIRED", "UNSUPPORTED_VERSION",
    "FORBIDDEN", "IP_NOT_ALLOWED", "AUTH_FAILED", "UNKNOWN_PRODUCT", "NO_FREE_SEATS",
    "LEASE_NOT_FOUND", "NOT_ACTIVATED", "LICENSE_NOT_YET_VALID", "LICENSE_EXPIRED",
    "GRACE_PERIOD_OVER", "SERVER_TIME_MODIFIED", "RATE_LIMITED", "BUSY", "INTERNAL",
    "UNAVAILABLE",
}  # fmt: skip


def vectors() -> list[tuple[dict[str, object], bytes]]:
    text = DOC.read_text(encoding="utf-8")
    return [
        (json.loads(m["json"]), bytes.fromhex(m["hex"].replace("\n", " ")))
        for m in PAIR.finditer(text)
    ]


def test_every_vector_is_what_the_codec_writes_and_reads() -> None:
    found = vectors()
    assert len(found) == 12 + len(WIRE_CODES)  # six ops, both ways, and every error
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
    assert ops == {"hello", "acquire", "renew", "release", "info", "ping"}
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
