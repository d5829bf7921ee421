"""The seat pool's invariants, asserted by the tests after every step they
take (property tests especially): kept apart from the pool, which never
calls them itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from floatd.core.pool import requester
from floatd.core.seats import SeatKey, seat_key
from floatd.errors import NoFreeSeats, PolicyDenied

if TYPE_CHECKING:
    from floatd.core.policy import Book
    from floatd.core.pool import SeatPool, _ProductState


def check_pool(pool: SeatPool) -> None:
    """Seat counts match the leases held, every lease is in the expiry heap,
    queues count their live waiters, and nobody waits beside a seat it may take."""
    held: dict[tuple[str, SeatKey], int] = {}
    for lease in pool._leases.values():
        held[lease.product, lease.seat] = held.get((lease.product, lease.seat), 0) + 1
    counted: dict[tuple[str, SeatKey], int] = {}
    for code, state in pool._products.items():
        for key, holders in state.seats.items():
            assert holders > 0, f"empty seat {key} in {code}"
            counted[code, key] = holders
        assert state.waiting == sum(1 for w in state.queue if not w.done)
        if state.book is not None:
            _check_book(code, state, state.book)
        elif state.terms is not None and state.waiting:
            assert not state.has_free_seat(), f"{code}: a waiter waits beside a free seat"
    assert counted == held, "seat counts differ from the leases held"
    live = {lease_id for _, lease_id in pool._expiry}
    assert set(pool._leases) <= live, "lease missing from the expiry heap"


def _check_book(code: str, state: _ProductState, book: Book) -> None:
    """The policy's counts are the sum of its seats' charges, and no waiter
    waits for a seat the policy would let it take now."""
    assert set(state.charges) <= set(state.seats), f"{code}: a charge without its seat"
    reserve_used = [0] * len(book.rules.reserves)
    max_used: dict[tuple[int, str], int] = {}
    for charge in state.charges.values():
        if charge.reserve >= 0:
            reserve_used[charge.reserve] += 1
        for bucket in charge.maxes:
            max_used[bucket] = max_used.get(bucket, 0) + 1
    assert reserve_used == book.reserve_used, f"{code}: reserve counts drifted"
    assert max_used == book.max_used, f"{code}: max counts drifted"
    assert state.terms is not None
    for waiter in state.queue:
        if waiter.done:
            continue
        c = waiter.claim
        if seat_key(state.terms, c.fingerprint, c.instance, c.user) in state.seats:
            raise AssertionError(f"{code}: a waiter waits beside the seat it shares")
        free = state.free()
        if free is None or free >= 1:
            try:
                book.decide(requester(c), free, code)
            except (NoFreeSeats, PolicyDenied):
                continue
            raise AssertionError(f"{code}: a waiter waits beside a seat it may take")
