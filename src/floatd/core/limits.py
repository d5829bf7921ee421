"""Per-address abuse limits (sans-IO, time passed in).

A token bucket per client address: ``rate`` tokens a second up to ``burst``.
Well-behaved clients acquire a handful of times an hour and never come near
it; a runaway loop or a password guesser does.  The table is bounded: when it
is full, the least recently used bucket is dropped (O(1); an address idle that
long has refilled anyway, unless a flood of distinct addresses is under way).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; False (and take none) if not.
        Written out in one function: every acquire passes here."""
        rate = self.rate
        if rate <= 0:
            return True
        buckets, burst = self._buckets, self.burst
        bucket = buckets.get(key)
        if bucket is None:
            level = burst
        else:
            tokens, at = bucket
            level = tokens + (now - at) * rate if now > at else tokens
            if level > burst:
                level = burst
        allowed = level >= cost
        buckets[key] = (level - cost if allowed else level, now)
        if bucket is None:
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return allowed

    def blocked(self, key: str, now: float) -> bool:
        """Whether the next ``allow`` would fail, without taking anything."""
        return self.enabled and key in self._buckets and self._level(key, now) < 1.0


RefusalKey = tuple[str, str, str | None]  # (address, code, entitled product or None)


class RefusalSampler:
    """Folds floods of refusals into counts, so that no flood can grow the audit
    trail or the log without bound.

    Per key (address, code, product) the first ``full`` refusals of each window
    are recorded one by one, as every refusal used to be; the rest of that
    window are only counted, and :meth:`take_due` hands out one summary per
    window that had any.  Keys live in insertion order, which is the order
    their windows began, so ending windows costs O(ended), never a scan; the
    table holds at most ``max_keys``, the oldest window closing early when full.
    """

    def __init__(self, full: int = 100, window: float = 60.0, max_keys: int = 4096) -> None:
        self.full = full
        self.window = window
        self.max_keys = max_keys
        # key -> [window start, refusals seen, refusals folded]
        self._windows: dict[RefusalKey, list[float]] = {}
        self._due: list[tuple[RefusalKey, int, float]] = []

    def note(self, key: RefusalKey, now: float) -> bool:
        """Count one refusal; True if it is to be recorded in full."""
        entry = self._windows.get(key)
        if entry is None or now - entry[0] >= self.window:
            if entry is not None:
                self._close(key, entry)
            if len(self._windows) >= self.max_keys:
                oldest = next(iter(self._windows))
                self._close(oldest, self._windows[oldest])
            self._windows[key] = [now, 1, 0]
            return True
        entry[1] += 1
        if entry[1] <= self.full:
            return True
        entry[2] += 1
        return False

    def take_due(self, now: float) -> list[tuple[RefusalKey, int, float]]:
        """(key, refusals folded, window start) of the windows ended by ``now``."""
        windows = self._windows
        while windows:
            key, entry = next(iter(windows.items()))
            if now - entry[0] < self.window:
                break
            self._close(key, entry)
        due, self._due = self._due, []
        return due

    def _close(self, key: RefusalKey, entry: list[float]) -> None:
        del self._windows[key]
        if entry[2]:
            self._due.append((key, int(entry[2]), entry[0]))


_limit_keys: dict[str | None, str] = {}


def limit_key(peer: str | None) -> str:
    """Whom a per-address limit counts: the IPv4 address, or the IPv6 /64 (one
    host can hold a whole /64, so counting single IPv6 addresses invites evasion).
    Cached: parsing an address costs more than the rest of the check."""
    key = _limit_keys.get(peer)
    if key is None:
        ip = peer_ip(peer)
        if isinstance(ip, ipaddress.IPv6Address):
            key = str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        else:
            key = str(ip) if ip is not None else (peer or "")
        if len(_limit_keys) >= 65536:
            _limit_keys.clear()
        _limit_keys[peer] = key
    return key


def peer_ip(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a v4 client on a dual-stack [::] listener
    return ip
