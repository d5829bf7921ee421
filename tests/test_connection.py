"""The per-connection state machine: hello first, versions, tokens, closing errors."""

from __future__ import annotations

from floatd.core.codec import encode_frame
from floatd.core.connection import Refusal, ServerConnection
from floatd.core.messages import Hello, Ping

HELLO = {"op": "hello", "id": 1, "versions": [1], "client": "t/1"}


def events(conn: ServerConnection, *frames: dict[str, object] | bytes) -> list[object]:
    for frame in frames:
        conn.receive_data(frame if isinstance(frame, bytes) else encode_frame(frame))
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def code(ev: object) -> str:
    assert isinstance(ev, Refusal)
    return str(ev.response["error"]["code"])


def test_hello_then_requests() -> None:
    conn = ServerConnection()
    evs = events(conn, HELLO, {"op": "ping", "id": 2})
    assert isinstance(evs[0], Hello) and isinstance(evs[1], Ping)
    assert conn.greeted


def test_request_before_hello_closes() -> None:
    conn = ServerConnection()
    evs = events(conn, {"op": "ping", "id": 5}, HELLO)
    assert len(evs) == 1 and code(evs[0]) == "HELLO_REQUIRED"
    assert isinstance(evs[0], Refusal) and evs[0].close and evs[0].response["id"] == 5
    assert conn.closed


def test_unknown_op_before_hello_is_hello_required() -> None:
    evs = events(ServerConnection(), {"op": "frobnicate", "id": 5})
    assert code(evs[0]) == "HELLO_REQUIRED"


def test_no_common_version() -> None:
    conn = ServerConnection()
    evs = events(conn, {**HELLO, "versions": [2, 3]})
    assert code(evs[0]) == "UNSUPPORTED_VERSION" and conn.closed


def test_bad_hello_keeps_connection_open() -> None:
    conn = ServerConnection()
    evs = events(conn, {"op": "hello", "id": 1, "versions": "1", "client": "x"}, HELLO)
    assert code(evs[0]) == "BAD_REQUEST" and isinstance(evs[0], Refusal) and not evs[0].close
    assert isinstance(evs[1], Hello)


def test_tokens_required_when_configured() -> None:
    for token in (None, "wrong", ""):
        conn = ServerConnection(["s3cret", "other"])
        hello = dict(HELLO) if token is None else {**HELLO, "token": token}
        evs = events(conn, hello)
        assert code(evs[0]) == "FORBIDDEN" and conn.closed
    conn = ServerConnection(["s3cret", "other"])
    assert isinstance(events(conn, {**HELLO, "token": "other"})[0], Hello)


def test_bad_frame_has_nil_id_and_closes() -> None:
    conn = ServerConnection()
    evs = events(conn, HELLO, b"\x00\x00\x00\x00")
    assert isinstance(evs[0], Hello)
    assert code(evs[1]) == "BAD_FRAME"
    assert isinstance(evs[1], Refusal) and evs[1].response["id"] is None and evs[1].close
    assert conn.next_event() is None


def test_bad_request_after_hello_keeps_id_and_stays_open() -> None:
    conn = ServerConnection()
    evs = events(conn, HELLO, {"op": "acquire", "id": 9}, {"op": "ping", "id": 10})
    assert code(evs[1]) == "BAD_REQUEST" and isinstance(evs[1], Refusal)
    assert evs[1].response["id"] == 9 and not evs[1].close
    assert isinstance(evs[2], Ping)
