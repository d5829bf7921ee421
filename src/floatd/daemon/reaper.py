"""Closing connections past their hello or idle deadline, without a cancel
scope per read.

One heap of deadlines, one entry per connection, re-armed lazily: when an entry
comes due, the connection says whether it is really past due or gives its next
deadline (it was active meanwhile).  Reading a request then costs one
timestamp, where a cancel scope around every read cost more than the rest of a
renew.
"""

from __future__ import annotations

import heapq
from typing import Protocol

import trio

MAX_SLEEP = 1.0


class Watched(Protocol):
    #: The deadline of the connection's live heap entry; older entries are stale.
    next_check: float

    def check_deadline(self, now: float) -> float | None:
        """Close if past due; else the next deadline (None: no longer watched)."""
        ...


class Reaper:
    def __init__(self) -> None:
        self._deadlines: list[tuple[float, int, Watched]] = []
        self._seq = 0
        self._rearm = trio.Event()

    def watch(self, conn: Watched, deadline: float) -> None:
        conn.next_check = deadline  # entries of earlier calls are stale now
        self._seq += 1
        if not self._deadlines or deadline < self._deadlines[0][0]:
            self._rearm.set()
        heapq.heappush(self._deadlines, (deadline, self._seq, conn))

    async def run(self) -> None:
        """Close connections past their hello or idle deadline.

        A heap of deadlines, one entry per connection, re-armed when it comes due
        and the connection turns out to have been active meanwhile.  Reading a
        request then costs one timestamp, where a cancel scope around every read
        cost more than the rest of a renew.
        """
        while True:
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                due, _, conn = heapq.heappop(self._deadlines)
                if due != conn.next_check:
                    continue  # superseded by an earlier one (see the session's frame_due)
                later = conn.check_deadline(now)
                if later is not None:
                    self.watch(conn, later)
            delay = self._deadlines[0][0] - now if self._deadlines else MAX_SLEEP
            with trio.move_on_after(min(delay, MAX_SLEEP)):
                await self._rearm.wait()
            self._rearm = trio.Event()
