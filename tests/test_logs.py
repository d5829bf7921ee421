"""The lease-event log lines: the direct JSON path must say exactly what
structlog's processor chain says, since monitoring parses both alike."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from conftest import BASE, SERVER_ID, product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd import logs
from floatd.core.changes import Audit
from floatd.core.entitlement import format_public_key, trusted_keys, verify_entitlement
from floatd.core.messages import Acquire, Answer, Renew
from floatd.core.service import LeaseService


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    logs.configure("info", "json")  # back to stdout for the rest of the session


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


def lines(stream: io.StringIO) -> list[str]:
    logs.flush()
    return stream.getvalue().splitlines()


def test_direct_lines_match_structlog(out: io.StringIO) -> None:
    logs.configure("info", "json", out)
    fields = {
        "lease": "L1",
        "product": "app",
        "fingerprint": "fp-é",
        "instance": None,
        "user": 'a"b',
        "peer": "::1",
        "seat": ("fp", "i"),
        "odd": Odd(),
        "waited": True,
        "n": 3,
        "expires_at": 1800000000.25,
        "meta": {"k": ["v", 1, None]},
    }
    logs.event_logger("info")("lease_granted", **dict(fields))
    logs.get_logger().info("lease_granted", **dict(fields))
    text = lines(out)
    # Byte for byte, but for the time of day.
    assert [re.sub(r'"timestamp": "[^"]*"', "T", line) for line in text[:1]] == [
        re.sub(r'"timestamp": "[^"]*"', "T", line) for line in text[1:]
    ]
    direct, chained = (json.loads(line) for line in text)
    assert list(direct) == list(chained)  # same keys in the same order
    assert direct.pop("timestamp").endswith("Z")
    chained.pop("timestamp")
    assert direct == chained
    assert direct["odd"] == "<odd>" and direct["seat"] == ["fp", "i"]
    assert direct["event"] == "lease_granted" and direct["level"] == "info"


def test_levels_filter_and_warnings_flush_at_once(out: io.StringIO) -> None:
    logs.configure("info", "json", out)
    log = logs.event_logger("info")
    log("quiet", level="debug", lease="L1")
    log("loud", level="warning", lease="L2")
    # Written without a flush: warnings and errors are not held back.
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]
    log("normal", lease="L3")
    assert [json.loads(line)["event"] for line in lines(out)] == ["loud", "normal"]


def test_console_format_goes_through_structlog(out: io.StringIO) -> None:
    logs.configure("info", "console", out)
    logs.event_logger("info")("lease_released", lease="L9", product="app")
    (line,) = lines(out)
    assert "lease_released" in line and "lease=L9" in line
    assert not line.startswith("{")


@pytest.mark.parametrize(
    "values",
    [
        ("L1", "app", "fp-0001", "i1", "ann@example.com", "127.0.0.1"),
        ("L2", "app", 'fp "quoted" \\ é ✓ \x01', None, None, None),
        ("L3", "app", "fp-0003", None, "ünïcode", "::1"),
        ("L4", "app", "fp-0004", 42, None, None),  # not a string: the general path
    ],
)
def test_the_lease_event_line_is_the_general_line(
    out: io.StringIO, values: tuple[object, ...]
) -> None:
    logs.configure("info", "json", out)
    log = logs.event_logger("info")
    names = ("lease", "product", "fingerprint", "instance", "user", "peer")
    log.lease("lease_renewed", *values)  # type: ignore[arg-type]
    log("lease_renewed", **dict(zip(names, values, strict=True)))
    raw = lines(out)
    fast, general = (re.sub(r'"timestamp": "[^"]*"', "T", line) for line in raw)
    assert fast == general
    assert json.loads(raw[0])["fingerprint"] == values[2]


def test_lease_events_follow_the_level(out: io.StringIO) -> None:
    logs.configure("warning", "json", out)
    logs.event_logger("warning").lease("lease_renewed", "L1", "app", "fp", None, None, None)
    logs.configure("info", "console", out)
    logs.event_logger("info").lease("lease_renewed", "L2", "app", "fp", None, None, None)
    (line,) = lines(out)
    assert "lease_renewed" in line and "lease=L2" in line and not line.startswith("{")


def test_the_service_leaves_lease_lines_to_the_store_when_told(out: io.StringIO) -> None:
    """floatd serve's writer renders the lines of the records marked ``log``;
    the service must then write none of them itself, and mark nothing else."""
    logs.configure("info", "json", out)
    key = Ed25519PrivateKey.generate()
    keys = trusted_keys([format_public_key(key.public_key())])
    svc = LeaseService(SERVER_ID, 900, log=logs.event_logger("info"))
    ent = verify_entitlement(sign(key, products=[product("app")]), keys, SERVER_ID, BASE, 60)
    svc.install(ent, BASE)

    def audit() -> list[tuple[str, bool]]:
        return [(c.event, c.log) for c in svc.take_changes() if isinstance(c, Audit)]

    result = svc.handle(Acquire(1, "app", "fp-1"), BASE, "127.0.0.1")
    assert isinstance(result, Answer) and result.code is None
    got = result.wire
    assert audit() == [("granted", False)]
    svc.store_logs_leases = True
    renew = Renew(2, got["lease"], got["token"])
    renewed = svc.handle(renew, BASE + 1, "127.0.0.1")
    assert isinstance(renewed, Answer) and renewed.wire["ok"]
    assert audit() == [("renewed", True)]
    refused = svc.handle(Renew(3, got["lease"], "wrong"), BASE + 2, "127.0.0.1")
    assert isinstance(refused, Answer) and refused.code == "LEASE_NOT_FOUND"
    assert not refused.wire["ok"]
    assert audit() == [("refused", False)]  # its line has fields of its own: logged here
    assert [json.loads(x)["event"] for x in lines(out)] == ["lease_granted", "lease_refused"]


def test_libraries_stdlib_log_records_are_json_lines_too(out: io.StringIO) -> None:
    """trio's accept loop logs through the stdlib when the file table is full."""
    logs.configure("info", "json", out)
    logging.getLogger("trio.serve_listeners").error("accept returned %s", "EMFILE")
    (line,) = [json.loads(text) for text in lines(out)]
    assert line["event"] == "library_log" and line["level"] == "error"
    assert line["logger"] == "trio.serve_listeners" and line["message"] == "accept returned EMFILE"
