"""A license's terms as the vendor writes them: license keys, ISO 8601
durations (subscriptions, trials, grace), and the checks that keep a
nonsensical license from being issued.  Pure functions, apart from the
authority's logic (floatd.authority.logic)."""

from __future__ import annotations

import calendar
import hashlib
import ipaddress
import re
import secrets
from datetime import UTC, datetime, timedelta

from floatd.authority.store import Terms
from floatd.errors import AuthorityError

KEY_PREFIX = "FLT-"
STATES = ("active", "suspended", "revoked")

_DURATION = re.compile(
    r"^P(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+)S)?)?$"
)


def new_license_key() -> str:
    """192 random bits, URL-safe; shown once, stored only as a hash."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def check_duration(text: str) -> str:
    match = _DURATION.match(text)
    if not match or not any(match.groupdict().values()):
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as P1M, P1Y or P30D")
    return text


def add_duration(ts: float, text: str) -> int:
    """``ts`` plus an ISO 8601 duration; months and years are calendar months
    (31 January + P1M is the last day of February)."""
    match = _DURATION.match(check_duration(text))
    assert match is not None
    g = {k: int(v) if v else 0 for k, v in match.groupdict().items()}
    when = datetime.fromtimestamp(ts, UTC)
    months = when.month - 1 + g["mo"] + 12 * g["y"]
    year, month = when.year + months // 12, months % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    when = when.replace(year=year, month=month, day=day)
    when += timedelta(weeks=g["w"], days=g["d"], hours=g["h"], minutes=g["mi"], seconds=g["s"])
    return int(when.timestamp())


STRATEGIES = ("per-machine", "per-instance")


class BadTerms(AuthorityError):
    """Terms no server could use (BAD_REQUEST), naming the CLI option of the
    term at fault so the vendor's CLI can answer it as a usage error."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(400, "BAD_REQUEST", message)
        self.option = option


def check_terms(terms: Terms, now: float) -> None:
    """Refuse terms no server could use, the same for issue and update (and for
    the management API): BAD_REQUEST naming the term.  Without this, a license
    updated to -5 seats was accepted and every refresh failed afterwards."""

    if not terms.products:
        raise BadTerms("--product", "a license needs at least one product")
    twice = sorted({code for code in terms.products if terms.products.count(code) > 1})
    if twice:
        raise BadTerms("--product", f"product {twice[0]!r} is named twice")
    if terms.seats < -1:
        raise BadTerms("--seats", "must be -1 or more (0 and -1: unlimited)")
    if terms.lease_duration is not None and terms.lease_duration < 0:
        raise BadTerms("--lease-duration", "must be 0 or more")
    if terms.strategy is not None and terms.strategy not in STRATEGIES:
        raise BadTerms("--strategy", f"must be one of {', '.join(STRATEGIES)}")
    if terms.allowed_activations < 1:
        raise BadTerms("--allowed-activations", "must be 1 or more")
    if terms.max_users < 0:
        raise BadTerms("--max-users", "must be 0 or more")
    if terms.borrow_max < 0:
        raise BadTerms("--borrow-max", "must be 0 or more")
    if terms.grace_seconds <= 0:
        raise BadTerms("--grace", "the grace period must be longer than 0")
    for cidr in terms.allowed_ips:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise BadTerms("--allowed-ip", f"{cidr!r} is not CIDR") from None
    if terms.interval is not None:
        try:
            if add_duration(now, terms.interval) <= now:
                raise BadTerms("--interval", f"the interval {terms.interval} is empty")
        except ValueError as exc:
            raise BadTerms("--interval", str(exc)) from None
    if (
        terms.effective_at is not None
        and terms.expires_at is not None
        and terms.effective_at >= terms.expires_at
    ):
        raise BadTerms("--effective", "the effective date must come before the expiry")
