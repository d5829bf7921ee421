"""Request validation: every field's type and bound, per the contract."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floatd.core import messages
from floatd.core.messages import (
    Acquire,
    Borrow,
    Hello,
    Info,
    Ping,
    Release,
    Renew,
    parse_request,
    request_id,
)
from floatd.errors import BadRequest, FloatdError, UnknownOp

GOOD_ACQUIRE = {"op": "acquire", "id": 1, "product": "app", "fingerprint": "abcdefgh"}


def test_parses_each_op() -> None:
    assert parse_request({"op": "hello", "id": 0, "versions": [1], "client": "x/1"}) == Hello(
        0, (1,), "x/1", None
    )
    assert isinstance(parse_request(GOOD_ACQUIRE), Acquire)
    assert parse_request({"op": "renew", "id": 2, "lease": "l", "token": "t"}) == Renew(2, "l", "t")
    assert parse_request({"op": "release", "id": 3, "lease": "l", "token": "t"}) == Release(
        3, "l", "t"
    )
    assert parse_request({"op": "info", "id": 4, "product": "p"}) == Info(4, "p")
    assert parse_request({"op": "ping", "id": 2**63 - 1}) == Ping(2**63 - 1)


def test_unknown_fields_are_ignored() -> None:
    req = parse_request({**GOOD_ACQUIRE, "future_field": [1, 2], "x": None})
    assert isinstance(req, Acquire) and req.product == "app"


def test_unknown_op() -> None:
    with pytest.raises(UnknownOp):
        parse_request({"op": "lend", "id": 1})


@pytest.mark.parametrize("duration", [None, 0, -5, 1.5, True, "60", 10 * 366 * 86400 + 1])
def test_a_borrow_needs_whole_seconds_in_range(duration: Any) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request({"op": "borrow", "id": 1, "lease": "l", "token": "t", "duration": duration})
    assert err.value.details == {"field": "duration"}
    got = parse_request({"op": "borrow", "id": 1, "lease": "l", "token": "t", "duration": 60})
    assert got == Borrow(1, "l", "t", 60)


@pytest.mark.parametrize("rid", [None, -1, 2**63, 1.0, True, "1"])
def test_bad_id(rid: Any) -> None:
    obj = {"op": "ping", "id": rid}
    assert request_id(obj) is None
    with pytest.raises(BadRequest):
        parse_request(obj)


@pytest.mark.parametrize(
    "change",
    [
        {"product": None},
        {"product": ""},
        {"product": 5},
        {"fingerprint": "short"},  # < 8 chars
        {"fingerprint": "x" * 129},
        {"instance": ""},
        {"instance": "x" * 129},
        {"user": "u" * 257},
        {"hostname": "h" * 257},
        {"meta": "not a map"},
        {"meta": {f"k{i}": "v" for i in range(17)}},
        {"meta": {"k" * 65: "v"}},
        {"meta": {"k": "v" * 1025}},
        {"meta": {"k": 1}},
        {"wait": -1},
        {"wait": 3600.5},
        {"wait": float("nan")},
        {"wait": float("inf")},
        {"wait": "5"},
        {"wait": True},
        {"password": 123},
    ],
)
def test_acquire_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        parse_request({**GOOD_ACQUIRE, **change})


def test_acquire_bounds_accepted() -> None:
    req = parse_request(
        {
            **GOOD_ACQUIRE,
            "fingerprint": "x" * 128,
            "instance": "i" * 128,
            "user": "u" * 256,
            "meta": {f"k{i}": "v" * 1024 for i in range(16)},
            "wait": 3600,
        }
    )
    assert isinstance(req, Acquire) and req.wait == 3600.0


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "hello", "id": 1, "client": "x"},  # versions missing
        {"op": "hello", "id": 1, "versions": [], "client": "x"},
        {"op": "hello", "id": 1, "versions": ["1"], "client": "x"},
        {"op": "hello", "id": 1, "versions": [1]},  # client missing
        {"op": "hello", "id": 1, "versions": [1], "client": "c" * 129},
        {"op": "renew", "id": 1, "lease": "l"},
        {"op": "release", "id": 1, "token": "t"},
        {"op": "info", "id": 1},
        {"id": 1},
        {"op": 5, "id": 1},
    ],
)
def test_other_bad_requests(obj: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        parse_request(obj)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "op",
                "id",
                "product",
                "fingerprint",
                "wait",
                "meta",
                "lease",
                "token",
                "versions",
                "client",
                "instance",
            ]
        ),
        st.none()
        | st.integers()
        | st.floats()
        | st.text(max_size=200)
        | st.booleans()
        | st.lists(st.integers(), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
    )
)
def test_arbitrary_maps_never_raise_anything_but_protocol_errors(obj: dict[str, Any]) -> None:
    try:
        parse_request(obj)
    except FloatdError as exc:
        assert exc.code in ("BAD_REQUEST", "UNKNOWN_OP")


def _outcome(parse: Any, *args: Any) -> object:
    """What a parser gives: its value, or the error it raises (by code, field and message)."""
    try:
        return parse(*args)
    except BadRequest as exc:
        return ("error", exc.code, exc.details.get("field"), str(exc))


_EDGES: list[Any] = ["", "x", "x" * 7, "x" * 8, "x" * 127, "x" * 128, "x" * 129]
_EDGES += ["x" * 256, "x" * 257, "x" * 1024, "x" * 1025, None, 0, 1.5, b"x", {"k": "v"}, {}]
_FIELD = st.one_of(st.sampled_from(_EDGES), st.text(max_size=9), st.integers(-2, 2))
_VALID = {"product": "app", "fingerprint": "abcdefgh", "lease": "l", "token": "t"}
_NAMES = ["product", "fingerprint", "instance", "user", "password", "hostname"]
_NAMES += ["meta", "wait", "lease", "token"]


def _same_answers(obj: dict[str, Any]) -> None:
    assert _outcome(messages._acquire, 7, obj) == _outcome(messages._acquire_checked, 7, obj)
    assert _outcome(messages._lease_ref, obj) == _outcome(messages._lease_ref_checked, obj)


def test_the_quick_parsers_answer_as_the_checked_ones_at_every_bound() -> None:
    """The one-test paths for well-formed acquires and lease references must
    accept and refuse exactly what the field-by-field checks do: each field
    at each edge, on a request whose other fields pass, present or absent."""
    for name in _NAMES:
        for value in _EDGES:
            _same_answers({**_VALID, name: value})
            _same_answers({name: value, **{k: v for k, v in _VALID.items() if k != name}})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_NAMES), _FIELD, max_size=4))
def test_the_quick_parsers_answer_as_the_checked_ones(changes: dict[str, Any]) -> None:
    """The same, for several fields changed at once from a passing request."""
    _same_answers({**_VALID, **changes})
