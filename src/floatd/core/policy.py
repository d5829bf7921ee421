"""Site policy: which requesters may lease a product, and how many seats are
kept for some of them or capped for others (the admin's rules, on top of the
vendor's entitlement).

Plain synchronous code, like the pool it serves.  A :class:`Policy` is the
compiled file (:mod:`floatd.core.policy_file` reads it): groups are expanded
into flat :class:`Matcher` objects once, so a decision costs a few set lookups
per rule and never re-reads a group.  The decision itself happens inside the
pool (:mod:`floatd.core.pool`), at the moment a seat is taken, because two of
the steps depend on who holds what *right now*: a ``max`` counts the seats its
requesters hold, and a ``reserve`` counts the seats its members hold.  Deciding
there, in the same call that takes the seat, is what keeps both exact when
acquires race (and, on a cluster, inside the same transaction).

The book-keeping per product is a :class:`Book`: how many seats each reserve's
members hold out of it, and how many seats each ``max`` bucket holds.  Each
taken seat remembers what it was charged to (:class:`Charge`), so giving the
seat back undoes exactly that, in O(rules).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from floatd.core.limits import peer_ip
from floatd.errors import NoFreeSeats, PolicyDenied

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The identity kinds a pattern may name; ``group:`` refers to a named group.
KINDS = ("user", "host", "fingerprint", "ip", "group")
#: What a ``max`` may count each of on its own.
PER = ("user", "host", "ip")
#: The product of a rule that applies to every product.
ANY_PRODUCT = "*"


_tuple_new = tuple.__new__


class Requester(NamedTuple):
    """Who asks, as the policy sees it.  ``user`` and ``host`` are lower-cased
    (names compare case-insensitively); the fingerprint is kept as sent; the
    address as (IP version, integer), which is what range checks need."""

    user: str | None
    host: str | None
    fingerprint: str
    ip: tuple[int, int] | None

    @classmethod
    def of(
        cls, user: str | None, host: str | None, fingerprint: str, peer: str | None
    ) -> Requester:
        """``peer``: the client's address as the shell gives it (a string)."""
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python
        # function, and this runs on every acquire of a product with rules.
        return _tuple_new(
            cls,
            (
                None if user is None else user.lower(),
                None if host is None else host.lower(),
                fingerprint,
                _address(peer),
            ),
        )

    def per(self, kind: str | None) -> str:
        """The bucket a ``max`` with this ``per`` counts this requester in; a
        requester without that identity shares the bucket ``""``."""
        if kind == "user":
            return self.user or ""
        if kind == "host":
            return self.host or ""
        if kind == "ip" and self.ip is not None:
            version, value = self.ip
            return str(
                ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value)
            )
        return ""


#: Parsed client addresses: parsing one costs more than the rest of a policy
#: decision, and a LAN has few.  Bounded: emptied when full.
_ADDRESSES: dict[str | None, tuple[int, int] | None] = {}


def _address(peer: str | None) -> tuple[int, int] | None:
    try:
        return _ADDRESSES[peer]
    except KeyError:
        pass
    ip = peer_ip(peer)
    if len(_ADDRESSES) >= 65536:
        _ADDRESSES.clear()
    _ADDRESSES[peer] = found = None if ip is None else (ip.version, int(ip))
    return found


#: (Requester field, exact names, the wildcards as one pattern, a bare "*"):
#: see Matcher.
_Check = tuple[int, frozenset[str], "re.Pattern[str] | None", bool]


def _alternation(bodies: list[str], flags: int) -> re.Pattern[str] | None:
    """The wildcards' regular expressions as one, or None for none."""
    if not bodies:
        return None
    return re.compile("|".join(f"(?:{body})" for body in bodies), flags)


#: The named identities, in the order of Requester's fields.
_NAMED = ("user", "host", "fingerprint")


class Matcher:
    """A set of identity patterns, with groups already expanded.

    Built for the hot path: per kind, exact names are one set lookup and all
    wildcards one compiled alternation; address blocks are integer ranges.
    """

    __slots__ = ("_checks", "_ranges", "patterns", "sources")

    def __init__(self, patterns: Iterable[str], sources: tuple[str, ...]) -> None:
        self.patterns = tuple(patterns)
        #: The patterns as written in the rule (``group:cad_team``), for status
        #: and explain: never the group's members, which the wire must not show.
        self.sources = sources
        exact: dict[str, set[str]] = {kind: set() for kind in _NAMED}
        globs: dict[str, list[str]] = {kind: [] for kind in _NAMED}
        ranges: list[tuple[int, int, int]] = []
        for pattern in self.patterns:
            kind, _, name = pattern.partition(":")
            if kind == "ip":
                net: IpNetwork = ipaddress.ip_network(name)
                first = int(net.network_address)
                ranges.append((net.version, first, first + net.num_addresses - 1))
            elif "*" in name:
                globs[kind].append(".*".join(re.escape(part) for part in name.split("*")))
            else:
                exact[kind].add(name if kind == "fingerprint" else name.lower())
        #: One check per kind that has patterns, in the Requester's field order
        #: (user, host, fingerprint): (field, exact names, the wildcards as one
        #: pattern, whether a bare "*" takes anyone who has that identity).
        #: Kinds without patterns cost nothing: most rules name one kind.
        checks: list[_Check] = []
        for index, kind in enumerate(_NAMED):
            bodies, names = globs[kind], frozenset(exact[kind])
            if bodies or names:
                flags = re.DOTALL | (0 if kind == "fingerprint" else re.IGNORECASE)
                checks.append((index, names, _alternation(bodies, flags), ".*" in bodies))
        self._checks = tuple(checks)
        self._ranges = tuple(ranges)

    @classmethod
    def union(cls, matchers: Iterable[Matcher]) -> Matcher:
        """One matcher for "any of these" (an exclude check over many rules)."""
        matchers = list(matchers)
        return cls(
            [p for m in matchers for p in m.patterns], tuple(s for m in matchers for s in m.sources)
        )

    def matches(self, who: Requester) -> bool:
        for index, exact, glob, anyone in self._checks:
            name = who[index]
            if isinstance(name, str) and (
                anyone or name in exact or (glob is not None and glob.fullmatch(name) is not None)
            ):
                return True
        ip = who.ip
        if ip is not None and self._ranges:
            version, value = ip
            for v, first, last in self._ranges:
                if v == version and first <= value <= last:
                    return True
        return False


@dataclass(frozen=True, slots=True)
class Limit:
    """A ``reserve`` or a ``max``: ``count`` seats for the requesters ``who``
    matches; ``number`` is the rule's place in the file (1-based)."""

    number: int
    count: int
    who: Matcher
    per: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]`` table as written (checked), for one product or ``*``."""

    number: int
    line: int
    product: str
    exclude: Matcher | None = None
    include: Matcher | None = None
    reserve: Limit | None = None
    max: Limit | None = None
    borrow_lowwater: int | None = None
    borrow_max: int | None = None


@dataclass(frozen=True, slots=True)
class ProductRules:
    """Every rule that applies to one product (its own and the ``*`` ones), in
    file order, split by kind so a decision walks only what it needs."""

    excludes: tuple[Rule, ...] = ()
    includes: tuple[Rule, ...] = ()
    maxes: tuple[Limit, ...] = ()
    reserves: tuple[Limit, ...] = ()
    borrow_lowwater: int | None = None
    borrow_max: int | None = None
    #: Every exclude (and include) pattern in one matcher: one check, whatever
    #: the number of rules; the rule that matched is looked for only on a refusal.
    any_exclude: Matcher | None = None
    any_include: Matcher | None = None

    def admit(self, who: Requester, product: str) -> None:
        """Steps 1 and 2: an ``exclude`` that matches, or ``include`` rules that
        none match, refuse ``product`` with POLICY_DENIED."""
        if self.any_exclude is not None and self.any_exclude.matches(who):
            rule = next(r for r in self.excludes if r.exclude and r.exclude.matches(who))
            raise _denied("exclude", product, rule.number)
        if self.any_include is not None and not self.any_include.matches(who):
            raise _denied("include", product, self.includes[0].number)


def _denied(rule: str, product: str, number: int) -> PolicyDenied:
    # The message names the rule, never whom its groups hold.
    return PolicyDenied(
        f"the site's policy does not let this requester lease this product"
        f" (an {rule} rule, rule {number} of the policy file)"
        if rule != "max"
        else f"the site's policy caps the seats this requester may hold at once"
        f" (a max rule, rule {number} of the policy file)",
        rule=rule,
        product=product,
    )


@dataclass(frozen=True)
class Policy:
    """A checked policy file: its groups (for explain) and rules, in order."""

    rules: tuple[Rule, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def for_product(self, code: str) -> ProductRules | None:
        """The rules that apply to ``code``; None when none do (the pool then
        takes its fast path, as with no policy at all)."""
        rules = [r for r in self.rules if r.product in (code, ANY_PRODUCT)]
        if not rules:
            return None
        lowwater = [r.borrow_lowwater for r in rules if r.borrow_lowwater is not None]
        borrow = [r.borrow_max for r in rules if r.borrow_max is not None]
        excludes = tuple(r for r in rules if r.exclude is not None)
        includes = tuple(r for r in rules if r.include is not None)
        return ProductRules(
            excludes=excludes,
            includes=includes,
            any_exclude=Matcher.union(r.exclude for r in excludes if r.exclude)
            if excludes
            else None,
            any_include=Matcher.union(r.include for r in includes if r.include)
            if includes
            else None,
            maxes=tuple(r.max for r in rules if r.max is not None),
            reserves=tuple(r.reserve for r in rules if r.reserve is not None),
            borrow_lowwater=max(lowwater) if lowwater else None,
            borrow_max=min(borrow) if borrow else None,
        )

    def products(self) -> set[str]:
        """The product codes the rules name (not ``*``)."""
        return {r.product for r in self.rules if r.product != ANY_PRODUCT}


# --- the book of one product -------------------------------------------------------


class Charge(NamedTuple):
    """What one taken seat counts against: the reserve it came out of (an index
    into ``ProductRules.reserves``, or -1) and its ``max`` buckets."""

    reserve: int
    maxes: tuple[tuple[int, str], ...]


NO_CHARGE = Charge(-1, ())


@dataclass(slots=True)
class Book:
    """The seats each reserve's members hold out of it, and each ``max`` bucket's."""

    rules: ProductRules
    reserve_used: list[int] = field(default_factory=list)
    max_used: dict[tuple[int, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reserve_used = [0] * len(self.rules.reserves)

    def kept_for_others(self, who: Requester) -> tuple[int, int]:
        """(seats the reserves this requester does not match still keep, the
        first reserve it matches that has seats left, or -1)."""
        kept, mine = 0, -1
        for index, limit in enumerate(self.rules.reserves):
            left = limit.count - self.reserve_used[index]
            if left <= 0:
                continue
            if limit.who.matches(who):
                if mine < 0:
                    mine = index
            else:
                kept += left
        return kept, mine

    def keeping(self, who: Requester) -> list[int]:
        """The rule numbers of the reserves that keep seats from ``who`` now."""
        return [
            limit.number
            for index, limit in enumerate(self.rules.reserves)
            if limit.count > self.reserve_used[index] and not limit.who.matches(who)
        ]

    def decide(self, who: Requester, free: int | None, product: str) -> Charge:
        """Steps 3 and 4 for a new seat: POLICY_DENIED past a ``max``,
        NO_FREE_SEATS (with ``reserved``) for a seat kept for others, else what
        the seat will be charged to.  ``free``: the product's free seats (None
        for an unlimited product, which nothing can reserve)."""
        buckets = []
        max_used = self.max_used
        for index, limit in enumerate(self.rules.maxes):
            if limit.who.matches(who):
                per = limit.per
                bucket = (index, (who.user or "") if per == "user" else who.per(per))
                if max_used.get(bucket, 0) >= limit.count:
                    raise _denied("max", product, limit.number)
                buckets.append(bucket)
        mine = -1
        if free is not None:
            kept, mine = self.kept_for_others(who) if self.reserve_used else (0, -1)
            if free < 1:
                raise NoFreeSeats(f"all seats of {product!r} are in use")
            if free - kept < 1:
                raise NoFreeSeats(
                    f"the free seats of {product!r} are reserved for others by the site's policy",
                    reserved=kept,
                )
        if mine < 0 and not buckets:
            return NO_CHARGE
        return Charge(mine, tuple(buckets))

    def charge(self, charge: Charge) -> None:
        if charge.reserve >= 0:
            self.reserve_used[charge.reserve] += 1
        for bucket in charge.maxes:
            self.max_used[bucket] = self.max_used.get(bucket, 0) + 1

    def recharge(self, who: Requester) -> Charge:
        """The charge of a seat already held (a restart, a new policy): counted
        as it would have been, even where that is now over a cap, since a policy
        change never ends a lease."""
        buckets = tuple(
            (index, who.per(limit.per))
            for index, limit in enumerate(self.rules.maxes)
            if limit.who.matches(who)
        )
        _, mine = self.kept_for_others(who)
        charge = Charge(mine, buckets) if mine >= 0 or buckets else NO_CHARGE
        self.charge(charge)
        return charge

    def uncharge(self, charge: Charge) -> None:
        if charge.reserve >= 0:
            self.reserve_used[charge.reserve] -= 1
        for bucket in charge.maxes:
            left = self.max_used[bucket] - 1
            if left:
                self.max_used[bucket] = left
            else:
                del self.max_used[bucket]

    def reservations(self) -> list[dict[str, object]]:
        """Each reserve: its seats, how many its members hold out of it, and for
        whom (the patterns as written: group names, not members)."""
        return [
            {
                "rule": limit.number,
                "seats": limit.count,
                "held": self.reserve_used[index],
                "free": max(0, limit.count - self.reserve_used[index]),
                "for": list(limit.who.sources),
            }
            for index, limit in enumerate(self.rules.reserves)
        ]
