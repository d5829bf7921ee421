"""Reading a policy file: TOML text in, a checked :class:`~floatd.core.policy.Policy`
out, or one :class:`~floatd.errors.PolicyError` naming the file, the line and
the key at fault.

No I/O here: the caller reads the file and passes its text and name.  Every
mistake an admin is likely to make is caught before the policy is used (an
unknown key, an unknown group, a group that includes itself, a bad CIDR or
glob, a number out of range), because a policy mistake otherwise shows only
when users are refused.  ``tomllib`` keeps no positions, so :class:`_Lines`
finds the line of a key by scanning the text the way TOML lays tables out.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from typing import Any, NoReturn

from floatd.core.policy import ANY_PRODUCT, KINDS, PER, Limit, Matcher, Policy, Rule
from floatd.errors import PolicyError

#: Seats and counts beyond this are typing mistakes, not policies.
MAX_COUNT = 1_000_000
#: Ten years: the longest borrow a rule may allow.
MAX_BORROW_SECONDS = 10 * 365 * 86400
MAX_NAME = 256
MAX_PATTERNS = 10_000
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RULE_KEYS = frozenset(
    {"product", "exclude", "include", "reserve", "for", "max", "per"}
    | {"borrow_lowwater", "borrow_max"}
)
_KEY_LINE = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")


class _Lines:
    """Where each key of the ``[groups]`` table and of each ``[[rule]]`` sits."""

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[str, int, str], int] = {}
        self.tables: dict[tuple[str, int], int] = {}
        table, index, rules = "", 0, 0
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("[["):
                rules += 1
                table, index = stripped.strip("[] \t").split("#")[0].strip(), rules
                self.tables.setdefault((table, index), number)
            elif stripped.startswith("["):
                table, index = stripped.strip("[] \t").split("#")[0].strip(), 0
                self.tables.setdefault((table, index), number)
            else:
                match = _KEY_LINE.match(line)
                if match:
                    key = next(g for g in match.groups() if g is not None)
                    self.keys.setdefault((table, index, key), number)

    def of(self, table: str, index: int, key: str | None) -> int:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[table, index, key]
        return self.tables.get((table, index), 0)


class _Reader:
    def __init__(self, text: str, name: str) -> None:
        self.name = name
        self.lines = _Lines(text)

    def error(self, table: str, index: int, key: str | None, label: str, problem: str) -> NoReturn:
        line = self.lines.of(table, index, key)
        raise PolicyError(f"{self.name}:{line}" if line else self.name, label, problem)


def load_policy(text: str, name: str) -> Policy:
    """The checked policy of ``text`` (read from ``name``); PolicyError if any
    part of it cannot be used."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(name, "", f"not valid TOML: {exc}") from None
    reader = _Reader(text, name)
    for key in raw:
        if key not in ("groups", "rule"):
            reader.error(key, 0, None, key, "unknown key (a policy has [groups] and [[rule]])")
    groups = _groups(reader, raw.get("groups", {}))
    rules_raw = raw.get("rule", [])
    if not isinstance(rules_raw, list):
        reader.error("rule", 0, None, "rule", "must be a list of [[rule]] tables")
    rules = tuple(_rule(reader, groups, i, r) for i, r in enumerate(rules_raw, start=1))
    return Policy(rules=rules, groups=groups, source=name)


def unknown_products(policy: Policy, entitled: set[str]) -> list[str]:
    """Products the rules name that the entitlement lacks: worth a warning (a
    typo, or a product not bought yet), not an error."""
    return sorted(policy.products() - entitled)


def overbooked(policy: Policy, caps: dict[str, int | None]) -> list[str]:
    """Products whose reserves keep every seat: nobody outside them can ever
    lease it.  A warning: it may be meant, but it is more often a typo."""
    out = []
    for code, cap in sorted(caps.items()):
        rules = policy.for_product(code)
        if rules is not None and cap is not None:
            kept = sum(limit.count for limit in rules.reserves)
            if kept >= cap:
                out.append(code)
    return out


# --- groups ------------------------------------------------------------------------


def _groups(reader: _Reader, raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        reader.error("groups", 0, None, "groups", "must be a table of group = [identities]")
    for name, members in raw.items():
        label = f"groups.{name}"
        if not _GROUP_NAME.fullmatch(name):
            reader.error("groups", 0, name, label, "a group name is letters, digits, _ . -")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            reader.error("groups", 0, name, label, "must be a list of identity strings")
        for member in members:
            problem = _pattern_problem(member, raw)
            if problem:
                reader.error("groups", 0, name, label, problem)
    expanded: dict[str, tuple[str, ...]] = {}

    def expand(name: str, trail: tuple[str, ...]) -> tuple[str, ...]:
        if name in trail:
            cycle = " -> ".join((*trail[trail.index(name) :], name))
            reader.error("groups", 0, name, f"groups.{name}", f"includes itself ({cycle})")
        if name not in expanded:
            out: list[str] = []
            for member in raw[name]:
                if member.startswith("group:"):
                    out.extend(expand(member[6:], (*trail, name)))
                else:
                    out.append(member)
            if len(out) > MAX_PATTERNS:
                reader.error("groups", 0, name, f"groups.{name}", "expands to too many patterns")
            expanded[name] = tuple(out)
        return expanded[name]

    for name in raw:
        expand(name, ())
    return expanded


def _pattern_problem(pattern: str, groups: Any) -> str | None:
    """Why ``pattern`` is not a usable identity, or None."""
    kind, colon, name = pattern.partition(":")
    if not colon or kind not in KINDS:
        return f"{pattern!r} is not an identity ({', '.join(k + ':NAME' for k in KINDS)})"
    if not name or len(name) > MAX_NAME:
        return f"{pattern!r}: the name must be 1 to {MAX_NAME} characters"
    if kind == "group":
        if name not in groups:
            return f"unknown group {name!r}"
        return None
    if kind == "ip":
        try:
            ipaddress.ip_network(name)
        except ValueError as exc:
            return f"{pattern!r} is not a CIDR block or address ({exc})"
        return None
    if any(c in name for c in "?[]"):
        return f"{pattern!r}: only * is a wildcard in a name"
    return None


# --- rules -------------------------------------------------------------------------


def _rule(reader: _Reader, groups: dict[str, tuple[str, ...]], number: int, raw: Any) -> Rule:
    def fail(key: str | None, problem: str) -> NoReturn:
        reader.error("rule", number, key, f"rule {number}" + (f".{key}" if key else ""), problem)

    if not isinstance(raw, dict):
        fail(None, "must be a table")
    for key in raw:
        if key not in _RULE_KEYS:
            fail(key, f"unknown key (one of {', '.join(sorted(_RULE_KEYS))})")
    product = raw.get("product")
    if not isinstance(product, str) or not product:
        fail("product", 'a product code (or "*" for every product) is required')
    acts = [k for k in ("exclude", "include", "reserve", "max") if k in raw]
    borrows = [k for k in ("borrow_lowwater", "borrow_max") if k in raw]
    if not acts and not borrows:
        fail(None, "says nothing: give exclude, include, reserve, max or a borrow limit")
    if len([k for k in ("reserve", "max") if k in raw]) > 1:
        fail("max", "reserve and max each need their own rule (each has its own `for`)")
    if "for" in raw and not ("reserve" in raw or "max" in raw):
        fail("for", "only a reserve or a max takes `for`")
    if "per" in raw and "max" not in raw:
        fail("per", "only a max takes `per`")
    if "reserve" in raw and "for" not in raw:
        fail("reserve", "needs `for`: whom the seats are kept for")

    def matcher(key: str) -> Matcher | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            fail(key, 'must be a non-empty list of identities ("user:alice", "group:cad")')
        patterns: list[str] = []
        for pattern in value:
            problem = _pattern_problem(pattern, groups)
            if problem:
                fail(key, problem)
            if pattern.startswith("group:"):
                patterns.extend(groups[pattern[6:]])
            else:
                patterns.append(pattern)
        return Matcher(patterns, tuple(value))

    def count(key: str, minimum: int, maximum: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"must be a whole number, not {type(value).__name__}")
        if not minimum <= value <= maximum:
            fail(key, f"must be from {minimum} to {maximum}, not {value}")
        return int(value)

    per = raw.get("per")
    if per is not None and per not in PER:
        fail("per", f"must be one of {', '.join(PER)}, not {per!r}")
    # A max without `for` counts everyone: every request has a fingerprint.
    who = matcher("for") or Matcher(["fingerprint:*"], ("*",))
    reserve = count("reserve", 1, MAX_COUNT)
    cap = count("max", 0, MAX_COUNT)
    return Rule(
        number=number,
        line=reader.lines.of("rule", number, None),
        product=str(product),
        exclude=matcher("exclude"),
        include=matcher("include"),
        reserve=None if reserve is None else Limit(number, reserve, who),
        max=None if cap is None else Limit(number, cap, who, per),
        borrow_lowwater=count("borrow_lowwater", 0, MAX_COUNT),
        borrow_max=count("borrow_max", 1, MAX_BORROW_SECONDS),
    )


__all__ = ["ANY_PRODUCT", "load_policy", "unknown_products"]
