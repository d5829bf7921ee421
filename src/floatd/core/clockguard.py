"""Clock tamper detection (sans-IO).

A customer who turns the server's clock back could stretch an expiring
license, so floatd keeps a high-water mark of the wall clock, persisted with
its state, and refuses leasing (``SERVER_TIME_MODIFIED``) while the clock
reads more than ``allowed_clock_offset`` before it.  Once the clock is right
again, leasing resumes by itself.

The mark only advances as far as the monotonic clock vouches for: a clock
wrongly set *forward* and then corrected must not lock the server out until
that future date.  At start the mark is what was persisted (and the last
commit's time), since the monotonic clock says nothing across a restart.
"""

from __future__ import annotations


class ClockGuard:
    def __init__(self, offset: float, mark: float = 0.0) -> None:
        self.offset = offset
        self.mark = mark
        self._base: tuple[float, float] | None = None  # (wall, monotonic) at start

    def start(self, wall: float, mono: float) -> None:
        """Anchor the monotonic clock: from here on it bounds how fast the mark moves."""
        self._base = (max(wall, self.mark), mono)

    def observe(self, wall: float, mono: float) -> None:
        if self._base is None:
            self.start(wall, mono)
            return
        base_wall, base_mono = self._base
        vouched = base_wall + (mono - base_mono) + self.offset
        self.mark = max(self.mark, min(wall, vouched))

    def tampered(self, wall: float) -> bool:
        return wall < self.mark - self.offset
