"""The site policy: reading the file, and the decision inside the pool, with
explicit times and explicit requesters."""

from __future__ import annotations

import contextlib
import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floatd.core.policy import Matcher, Policy, Requester
from floatd.core.policy_file import load_policy, unknown_products
from floatd.core.pool import SeatPool
from floatd.core.seats import Claim, Lease, PoolProduct, Waiter, hash_token
from floatd.errors import NoFreeSeats, PolicyDenied, PolicyError

T0 = 1000.0
_ids = itertools.count()

SPEC_EXAMPLE = """\
[groups]                          # named sets of identities
cad_team = ["user:alice", "user:bob", "host:ws-cad-*", "ip:10.1.2.0/24"]
kiosks   = ["host:kiosk-*"]

[[rule]]
product = "cad"                   # a product code, or "*" for every product
exclude = ["group:kiosks"]        # these may never lease it

[[rule]]
product = "sim"
include = ["group:cad_team"]      # only these may lease it

[[rule]]
product = "cad"
reserve = 2                       # the last 2 free seats are kept for these
for = ["group:cad_team"]

[[rule]]
product = "cad"
max = 1                           # these hold at most 1 seat at once...
for = ["user:*"]
per = "user"

[[rule]]
product = "cad"
borrow_lowwater = 2
borrow_max = 86400
"""


def claim(
    product: str = "cad",
    fp: str | None = None,
    user: str | None = None,
    host: str | None = None,
    ip: str | None = "192.0.2.9",
    instance: str | None = None,
) -> Claim:
    n = next(_ids)
    return Claim(
        product,
        fp or f"machine-{n}",
        f"L{n}",
        hash_token(f"tok{n}"),
        instance,
        user,
        host,
        peer=ip,
    )


def pool_with(policy_text: str, *products: PoolProduct) -> SeatPool:
    pool = SeatPool()
    pool.set_products(products, T0)
    pool.set_policy(load_policy(policy_text, "policy.toml"), T0)
    return pool


def grant(pool: SeatPool, c: Claim, now: float = T0) -> Lease:
    got = pool.acquire(now, c)
    assert isinstance(got, Lease), got
    return got


def token_of(lease: Lease) -> bytes:
    return hash_token("tok" + lease.id[1:])


CAD = PoolProduct("cad", seats=5, duration=60)
SIM = PoolProduct("sim", seats=5, duration=60)


# --- the file ----------------------------------------------------------------------


def test_the_spec_example_reads_and_names_its_products() -> None:
    policy = load_policy(SPEC_EXAMPLE, "p.toml")
    assert len(policy.rules) == 5 and set(policy.groups) == {"cad_team", "kiosks"}
    assert unknown_products(policy, {"cad"}) == ["sim"]
    rules = policy.for_product("cad")
    assert rules is not None and rules.borrow_lowwater == 2 and rules.borrow_max == 86400
    assert policy.for_product("other") is None


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        (
            '[groups]\na = ["user:x"]\n[[rule]]\nproduct = "p"\nexclud = ["user:x"]\n',
            "p.toml:5",
            "rule 1.exclud: unknown key",
        ),
        (
            '[[rule]]\nproduct = "p"\nexclude = ["group:nobody"]\n',
            "p.toml:3",
            "unknown group 'nobody'",
        ),
        ('[groups]\na = ["group:b"]\nb = ["group:a"]\n', "p.toml:2", "includes itself"),
        ('[groups]\na = ["group:a"]\n', "p.toml:2", "includes itself (a -> a)"),
        ('[groups]\nnet = ["ip:10.1.2.0/33"]\n', "p.toml:2", "not a CIDR"),
        ('[groups]\nnet = ["ip:10.1.2.3/24"]\n', "p.toml:2", "has host bits set"),
        ('[groups]\nh = ["host:ws-[0-9]"]\n', "p.toml:2", "only * is a wildcard"),
        ('[groups]\nh = ["machine:x"]\n', "p.toml:2", "is not an identity"),
        ('\n[[rule]]\nproduct = "p"\nmax = -1\n', "p.toml:4", "rule 1.max: must be from 0"),
        (
            '[[rule]]\nproduct = "p"\nreserve = 5000000\nfor = ["user:a"]\n',
            "p.toml:3",
            "must be from 1 to 1000000",
        ),
        ('[[rule]]\nproduct = "p"\nmax = true\n', "p.toml:3", "must be a whole number"),
        ('[[rule]]\nproduct = "p"\nborrow_max = 0\n', "p.toml:3", "rule 1.borrow_max"),
        (
            '[[rule]]\nproduct = "p"\nper = "user"\nexclude = ["user:a"]\n',
            "p.toml:3",
            "only a max takes `per`",
        ),
        ('[[rule]]\nproduct = "p"\nmax = 1\nper = "team"\n', "p.toml:4", "must be one of"),
        ('[[rule]]\nproduct = "p"\nreserve = 1\n', "p.toml:3", "needs `for`"),
        ('[[rule]]\nproduct = "p"\n', "p.toml:1", "says nothing"),
        ('[[rule]]\nexclude = ["user:a"]\n', "p.toml:1", "rule 1.product"),
        ("[rules]\n", "p.toml:1", "rules: unknown key"),
        ('[[rule]]\nproduct = "p"\nexclude = "user:a"\n', "p.toml:3", "non-empty list"),
        ("[[rule]\n", "p.toml", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_key(text: str, where: str, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(text, "p.toml")
    message = str(err.value)
    assert message.startswith(where + ":"), message
    assert says in message
    assert "\n" not in message


# --- steps 1 and 2: exclude and include --------------------------------------------


def test_exclude_refuses_with_its_rule_and_never_the_members() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD, SIM)
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim(host="KIOSK-7"))  # names compare case-insensitively
    assert err.value.details == {"rule": "exclude", "product": "cad"}
    assert "kiosk" not in err.value.message.lower()
    grant(pool, claim(host="ws-cad-1"))


def test_include_admits_only_its_members_by_user_host_or_address() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD, SIM)
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim("sim", user="carol"))
    assert err.value.details == {"rule": "include", "product": "sim"}
    grant(pool, claim("sim", user="Alice"))
    grant(pool, claim("sim", host="ws-cad-9"))
    grant(pool, claim("sim", ip="10.1.2.200"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim("sim", ip="10.1.3.1"))


def test_ipv6_blocks_and_fingerprints_match_case_sensitively() -> None:
    text = """
[[rule]]
product = "*"
exclude = ["ip:2001:db8::/32", "fingerprint:BAD-*"]
"""
    pool = pool_with(text, CAD)
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(ip="2001:db8::5"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(fp="BAD-1"))
    grant(pool, claim(fp="bad-1"))
    grant(pool, claim(ip="::ffff:192.0.2.1"))


def test_exclude_comes_before_include_and_max() -> None:
    text = """
[groups]
t = ["user:alice"]
[[rule]]
product = "cad"
include = ["group:t"]
[[rule]]
product = "cad"
exclude = ["host:bad"]
[[rule]]
product = "cad"
max = 0
for = ["user:alice"]
"""
    pool = pool_with(text, CAD)
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim(user="alice", host="bad"))
    assert err.value.details["rule"] == "exclude"
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim(user="bob"))
    assert err.value.details["rule"] == "include"
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim(user="alice"))
    assert err.value.details["rule"] == "max"


# --- step 3: max --------------------------------------------------------------------


def test_max_per_user_counts_each_user_on_their_own() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    a = grant(pool, claim(user="alice"))
    grant(pool, claim(user="bob"))
    with pytest.raises(PolicyDenied) as err:
        pool.acquire(T0, claim(user="ALICE"), wait_until=T0 + 30)  # no waiting on a max
    assert err.value.details == {"rule": "max", "product": "cad"}
    pool.release(T0, a.id, token_of(a))
    grant(pool, claim(user="alice"))


def test_max_without_per_counts_everyone_it_matches_together() -> None:
    text = '[[rule]]\nproduct = "cad"\nmax = 2\nfor = ["host:lab-*"]\n'
    pool = pool_with(text, CAD)
    grant(pool, claim(host="lab-1"))
    grant(pool, claim(host="lab-2"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(host="lab-3"))
    grant(pool, claim(host="office-1"))


def test_max_per_host_and_per_ip() -> None:
    text = """
[[rule]]
product = "cad"
max = 1
per = "host"
[[rule]]
product = "sim"
max = 2
per = "ip"
"""
    pool = pool_with(text, CAD, SIM)
    grant(pool, claim(host="h1"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(host="H1"))
    grant(pool, claim(host="h2"))
    grant(pool, claim("sim", ip="10.0.0.1"))
    grant(pool, claim("sim", ip="10.0.0.1"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim("sim", ip="10.0.0.1"))
    grant(pool, claim("sim", ip="10.0.0.2"))


def test_a_reacquire_onto_a_held_seat_passes_max_and_reserve() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    grant(pool, claim(user="alice", fp="ws-1"))
    # Per machine: the same fingerprint shares the seat, so the cap does not bite.
    second = grant(pool, claim(user="alice", fp="ws-1"))
    assert pool.used("cad") == 1 and second.seat == ("ws-1",)
    # alice holds one of the 2 reserved seats: 1 stays kept for the team.
    grant(pool, claim(user="u0", fp="ws-u0"))
    for n in range(1, 3):
        grant(pool, claim(user=f"u{n}"))
    with pytest.raises(NoFreeSeats) as err:
        pool.acquire(T0, claim(user="carol"))
    assert err.value.details["reserved"] == 1
    grant(pool, claim(user="carol", fp="ws-u0"))  # onto u0's seat: no new seat
    assert pool.used("cad") == 4
    # ...but exclude still applies to a re-acquire.
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(host="kiosk-1", fp="ws-1"))


# --- step 4: reserve ----------------------------------------------------------------


def test_reserved_seats_are_refused_to_others_with_the_count_kept() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    for n in range(3):
        grant(pool, claim(user=f"other{n}"))
    with pytest.raises(NoFreeSeats) as err:
        pool.acquire(T0, claim(user="carol"))
    assert err.value.details == {"reserved": 2, "seats": 5, "used": 3}
    grant(pool, claim(user="alice"))
    grant(pool, claim(host="ws-cad-3"))
    with pytest.raises(NoFreeSeats) as err:
        pool.acquire(T0, claim(user="bob"))
    assert "reserved" not in err.value.details  # simply full now


def test_members_use_their_reserve_first_so_it_can_be_used_up() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    grant(pool, claim(user="alice"))
    grant(pool, claim(user="bob"))
    assert pool.reservations("cad") == [
        {"rule": 3, "seats": 2, "held": 2, "free": 0, "for": ["group:cad_team"]}
    ]
    for n in range(3):  # the reserve is held by its members: the rest is anyone's
        grant(pool, claim(user=f"other{n}"))


def test_several_reserves_keep_their_seats_from_each_other() -> None:
    text = """
[groups]
a = ["user:a*"]
b = ["user:b*"]
[[rule]]
product = "cad"
reserve = 2
for = ["group:a"]
[[rule]]
product = "cad"
reserve = 1
for = ["group:b"]
"""
    pool = pool_with(text, CAD)
    grant(pool, claim(user="x1"))
    grant(pool, claim(user="x2"))
    with pytest.raises(NoFreeSeats) as err:
        pool.acquire(T0, claim(user="x3"))
    assert err.value.details["reserved"] == 3
    with pytest.raises(NoFreeSeats) as err:  # a b-member cannot take a's seats
        grant(pool, claim(user="b1"))
        pool.acquire(T0, claim(user="b2"))
    assert err.value.details["reserved"] == 2
    grant(pool, claim(user="a1"))
    grant(pool, claim(user="a2"))
    assert pool.used("cad") == 5


def test_unlimited_products_reserve_nothing_but_still_cap() -> None:
    text = (
        '[[rule]]\nproduct = "*"\nreserve = 3\nfor = ["user:a"]\n'
        '[[rule]]\nproduct = "*"\nmax = 1\nper = "user"\n'
    )
    pool = pool_with(text, PoolProduct("free", seats=None, duration=60))
    for n in range(10):
        grant(pool, claim("free", user=f"u{n}"))
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim("free", user="u1"))


# --- waiting ------------------------------------------------------------------------


def test_a_waiter_kept_out_of_reserved_seats_does_not_hold_up_a_member() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    held = [grant(pool, claim(user=f"other{n}")) for n in range(3)]
    waiter = pool.acquire(T0, claim(user="carol"), wait_until=T0 + 30)
    assert isinstance(waiter, Waiter)
    grant(pool, claim(user="alice"))  # a member is not behind carol for a reserved seat
    # 1 seat free, and the reserve still keeps 1 for the team: carol waits on.
    pool.check_invariants()
    assert not waiter.done and pool.waiting("cad") == 1
    pool.release(T0 + 1, held[0].id, token_of(held[0]))
    assert waiter.done and waiter.lease is not None
    pool.check_invariants()


def test_waiting_queues_only_on_no_free_seats() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    with pytest.raises(PolicyDenied):
        pool.acquire(T0, claim(host="kiosk-1"), wait_until=T0 + 30)
    assert pool.waiting("cad") == 0


# --- a new policy -------------------------------------------------------------------


def test_a_new_policy_ends_no_lease_and_counts_what_is_held() -> None:
    pool = pool_with("", CAD)
    held = [grant(pool, claim(user="alice")) for _ in range(2)]
    pool.set_policy(load_policy(SPEC_EXAMPLE, "p.toml"), T0 + 1)
    assert all(pool.lease(le.id) is le for le in held)  # over the new max, and kept
    with pytest.raises(PolicyDenied):
        pool.acquire(T0 + 1, claim(user="alice"))
    assert pool.reservations("cad")[0]["held"] == 2
    pool.set_policy(None, T0 + 2)
    grant(pool, claim(user="alice"), T0 + 2)
    assert pool.reservations("cad") == []


def test_a_new_policy_serves_the_waiters_it_admits() -> None:
    text = '[[rule]]\nproduct = "cad"\nreserve = 4\nfor = ["user:vip"]\n'
    pool = pool_with(text, CAD)
    grant(pool, claim(user="x"))
    waiter = pool.acquire(T0, claim(user="y"), wait_until=T0 + 30)
    assert isinstance(waiter, Waiter)
    pool.set_policy(Policy(), T0 + 1)
    assert waiter.done and waiter.lease is not None


def test_explain_says_what_would_happen_and_changes_nothing() -> None:
    pool = pool_with(SPEC_EXAMPLE, CAD)
    assert pool.explain(T0, claim(user="alice"))["result"] == "granted"
    assert pool.explain(T0, claim(host="kiosk-2"))["result"] == "POLICY_DENIED"
    for n in range(3):
        grant(pool, claim(user=f"o{n}"))
    said = pool.explain(T0, claim(user="carol"))
    assert said["result"] == "NO_FREE_SEATS" and said["reserved"] == 2
    assert said["reserve_rules"] == [3]
    said = pool.explain(T0, claim(user="bob"))
    assert said == {"seats": 5, "used": 3, "result": "granted", "why": "reserved seat", "rule": 3}
    assert pool.used("cad") == 3
    assert pool.explain(T0, claim("nope"))["result"] == "UNKNOWN_PRODUCT"


# --- the invariant: no sequence takes a reserve or a max past its number -----------

USERS = ["alice", "bob", "carol", "dave", "erin", "kiosk"]
PROPERTY_POLICY = """
[groups]
team = ["user:alice", "user:bob"]
[[rule]]
product = "cad"
reserve = 2
for = ["group:team"]
[[rule]]
product = "cad"
reserve = 1
for = ["user:carol", "user:alice"]
[[rule]]
product = "cad"
max = 2
for = ["user:*"]
per = "user"
[[rule]]
product = "cad"
max = 3
for = ["user:dave", "user:erin"]
"""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "acquire", "release", "wait", "tick"]),
            st.sampled_from(USERS),
            st.integers(0, 3),  # which machine: shared seats per machine
            st.integers(0, 50),
        ),
        max_size=60,
    ),
    seats=st.integers(1, 6),
)
def test_no_sequence_takes_a_reserve_or_a_max_past_its_number(
    steps: list[tuple[str, str, int, int]], seats: int
) -> None:
    pool = pool_with(PROPERTY_POLICY, PoolProduct("cad", seats=seats, duration=40))
    now = T0
    held: list[Lease] = []
    for op, user, machine, pick in steps:
        if op == "tick":
            now += pick
            pool.advance(now)
        elif op == "release" and held:
            lease = held.pop(pick % len(held))
            if pool.lease(lease.id) is lease:
                pool.release(now, lease.id, token_of(lease))
        elif op in ("acquire", "wait"):
            c = claim(user=user, fp=f"{user}-m{machine}")
            try:
                got = pool.acquire(now, c, now + 10 if op == "wait" else None)
            except (NoFreeSeats, PolicyDenied):
                continue
            if isinstance(got, Lease):
                held.append(got)
        held += [w.lease for w in pool.take_woken() if w.lease is not None]
        pool.take_expired()
        pool.check_invariants()
        # Who created each seat holds it, as the policy counts.
        owners: dict[tuple[str, ...], str] = {}
        for lease in sorted(pool.leases(), key=lambda le: le.granted_at):
            owners.setdefault(lease.seat, lease.user or "")
        per_user: dict[str, int] = {}
        for owner in owners.values():
            per_user[owner] = per_user.get(owner, 0) + 1
        assert all(n <= 2 for n in per_user.values()), per_user
        assert per_user.get("dave", 0) + per_user.get("erin", 0) <= 3
        assert len(owners) <= seats
        # Seats held by those a reserve is not for never eat into it.
        team = {"alice", "bob"}
        others_of_team = sum(1 for o in owners.values() if o not in team)
        assert others_of_team <= max(0, seats - 2) or others_of_team == 0
        others_of_carol = sum(1 for o in owners.values() if o not in ("carol", "alice"))
        assert others_of_carol <= max(0, seats - 1) or others_of_carol == 0


# --- hostile files: any structure is one PolicyError or a policy, never a traceback ----

_WORDS = ["product", "exclude", "include", "reserve", "for", "max", "per", "borrow_max"]
_WORDS += ["borrow_lowwater", "groups", "rule", "user", "x", "*", "cad"]
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [
            *("user:a", "host:k-*", "ip:10.0.0.0/8", "ip:::1", "group:g", "group:h", "user:"),
            *("ip:x", "fingerprint:F*", "user", "host:[a]", "*", "cad", "ip:10.0.0.1/8", ""),
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*_WORDS, "g", "h"]), inner, max_size=4)
    ),
    max_leaves=12,
)


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"


_IDENTITIES = st.lists(
    st.sampled_from(
        [
            *("user:a", "user:B*", "host:k-*", "ip:10.0.0.0/8", "ip:::1", "group:g", "group:h"),
            *("fingerprint:F*", "user:", "ip:x", "host:[a]", "ip:10.0.0.1/8", "group:zz"),
        ]
    ),
    max_size=3,
)
_NUMBERS = st.integers(-2, 5) | st.sampled_from([10**7, True, 1.5, "2"])
_GOOD_IDS = st.lists(
    st.sampled_from(
        ["user:a", "user:B*", "host:k-*", "ip:10.0.0.0/8", "group:g", "fingerprint:F*"]
    ),
    min_size=1,
    max_size=3,
)
_PRODUCT = st.sampled_from(["cad", "*", "cad", 3])
_RULE = st.one_of(
    st.fixed_dictionaries({"product": _PRODUCT, "exclude": _GOOD_IDS}),
    st.fixed_dictionaries({"product": _PRODUCT, "include": _GOOD_IDS}),
    st.fixed_dictionaries(
        {"product": _PRODUCT, "reserve": st.integers(1, 3), "for": _GOOD_IDS},
    ),
    st.fixed_dictionaries(
        {"product": _PRODUCT, "max": st.integers(0, 2)},
        optional={"for": _GOOD_IDS, "per": st.sampled_from(["user", "host", "ip", "team"])},
    ),
    # Anything else a rule may hold, mostly wrong.
    st.fixed_dictionaries(
        {"product": _PRODUCT},
        optional={
            "exclude": _IDENTITIES | _VALUES,
            "reserve": _NUMBERS,
            "for": _IDENTITIES,
            "max": _NUMBERS,
            "per": st.sampled_from(["user", "team"]),
            "borrow_lowwater": _NUMBERS,
            "borrow_max": _NUMBERS | st.just(86400),
        },
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    groups=st.dictionaries(
        st.sampled_from(["g", "h", "g", "h", "bad name", "x"]), _IDENTITIES, max_size=3
    ),
    rules=st.lists(
        st.one_of(_RULE, _RULE, _RULE, st.dictionaries(st.sampled_from(_WORDS), _VALUES)),
        max_size=4,
    ),
    extra=st.sampled_from(["", "", "", "", "[other]\n", "rule = 3\n"]),
)
def test_any_file_is_a_policy_or_one_policy_error(
    groups: dict[str, object], rules: list[dict[str, object]], extra: str
) -> None:
    lines = [extra]
    if groups:
        lines.append("[groups]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in groups.items()]
    for rule in rules:
        lines.append("[[rule]]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in rule.items()]
    text = "\n".join(lines) + "\n"
    try:
        policy = load_policy(text, "fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml") and "\n" not in str(exc)
        return
    pool = pool_with("", CAD)
    pool.set_policy(policy, T0)
    for user in ("a", "b"):
        with contextlib.suppress(NoFreeSeats, PolicyDenied):
            pool.acquire(T0, claim(user=user, host="k-1", ip="10.0.0.5"))
    pool.check_invariants()


def _by_regex(pattern: str, name: str) -> bool:
    """What a wildcard pattern meant before any quick path: the whole name
    against the glob, case-insensitively except for fingerprints."""
    kind, _, glob = pattern.partition(":")
    body = ".*".join(re.escape(part) for part in glob.split("*"))
    flags = re.DOTALL | (0 if kind == "fingerprint" else re.IGNORECASE)
    value = name if kind == "fingerprint" else name.lower()
    return re.fullmatch(body, value, flags) is not None


_LETTERS = "aKks\u212aS\u017f\u0130i-1\u00e9"  # Kelvin sign, long s, dotted I
_GLOB_TEXT = st.text(alphabet=_LETTERS + "*", max_size=5)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["user", "host", "fingerprint"]),
    st.lists(_GLOB_TEXT.filter(lambda g: "*" in g), min_size=1, max_size=3),
    st.text(alphabet=_LETTERS, max_size=6),
)
def test_wildcards_match_as_their_patterns_do(kind: str, globs: list[str], name: str) -> None:
    """Prefix wildcards are a startswith test for ASCII names (Matcher): it
    must match exactly what the case-insensitive pattern matches, Kelvin signs,
    long s and dotted capitals included."""
    patterns = [f"{kind}:{glob}" for glob in globs]
    who = Requester.of(
        name if kind == "user" else None,
        name if kind == "host" else None,
        name if kind == "fingerprint" else "fp-none-0000",
        None,
    )
    expected = any(_by_regex(p, name) for p in patterns)
    assert Matcher(patterns, tuple(patterns)).matches(who) is expected


def test_wildcards_match_as_their_patterns_do_for_the_awkward_letters() -> None:
    """The same, every pattern against every name of a small awkward set."""
    globs = ["K*", "k*", "\u212a*", "S*", "\u017f*", "\u0130*", "i*", "a-*", "*a", "a*1", "*"]
    globs += ["\u00e9*", "ks*"]
    names = ["k", "K", "\u212a", "kx", "s", "S", "\u017f", "\u0130", "i", "i\u0307", "a-1"]
    names += ["\u00e9", "\u00c9", "", "KS", "k\u017f"]
    for kind in ("user", "host", "fingerprint"):
        for glob in globs:
            pattern = f"{kind}:{glob}"
            matcher = Matcher([pattern], (pattern,))
            for name in names:
                who = Requester.of(
                    name if kind == "user" else None,
                    name if kind == "host" else None,
                    name if kind == "fingerprint" else "fp-none-0000",
                    None,
                )
                assert matcher.matches(who) is _by_regex(pattern, name), (pattern, name)
