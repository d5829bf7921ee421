"""Per-address abuse limits (sans-IO, time passed in).

A token bucket per client address: ``rate`` tokens a second up to ``burst``.
Well-behaved clients acquire a handful of times an hour and never come near
it; a runaway loop or a password guesser does.  The table is bounded: when it
is full, the least recently used bucket is dropped (O(1); an address idle that
long has refilled anyway, unless a flood of distinct addresses is under way).
"""

from __future__ import annotations

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
        """Take ``cost`` tokens if there are enough; False (and take none) if not."""
        if not self.enabled:
            return True
        level = self._level(key, now)
        if level < cost:
            self._store(key, level, now)
            return False
        self._store(key, level - cost, now)
        return True

    def blocked(self, key: str, now: float) -> bool:
        """Whether the next ``allow`` would fail, without taking anything."""
        return self.enabled and key in self._buckets and self._level(key, now) < 1.0

    def _store(self, key: str, tokens: float, now: float) -> None:
        buckets = self._buckets
        buckets[key] = (tokens, now)
        buckets.move_to_end(key)
        if len(buckets) > self.max_keys:
            buckets.popitem(last=False)
