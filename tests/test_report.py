"""Usage reports over a scripted week (pure: no database, explicit times)."""

from __future__ import annotations

import calendar

import pytest

from floatd.core.report import Interval, build_report, period_bounds
from floatd.store.audit import parse_when

H = 3600.0
DAY = 86400.0
MONDAY = float(calendar.timegm((2026, 11, 2, 0, 0, 0)))  # a Monday, 00:00 UTC


def at(day: int, hour: float) -> float:
    return MONDAY + day * DAY + hour * H


def cad(machine: str, user: str, start: float, end: float) -> Interval:
    """A per-machine product: the seat is the machine."""
    return Interval("cad", (machine,), start, end, user, machine)


WEEK = [
    # Day 0: two processes on machine A share one seat; B joins for two hours.
    cad("A", "alice", at(0, 9), at(0, 12)),
    cad("A", "alice", at(0, 10), at(0, 17)),
    cad("B", "bob", at(0, 13), at(0, 15)),
    # Day 2 into day 3: across midnight.
    cad("A", "alice", at(2, 22), at(3, 2)),
    # Day 3: three machines at once, the whole cap.
    cad("B", "bob", at(3, 10), at(3, 11)),
    cad("C", "carol", at(3, 10), at(3, 11)),
    cad("D", "dave", at(3, 10), at(3, 11)),
    # Day 4 on: still held when the report ends.
    cad("E", "erin", at(4, 6), at(9, 0)),
    # Per instance: two processes of one machine are two seats.
    Interval("sim", ("A", "p1"), at(1, 8), at(1, 10), "alice", "A"),
    Interval("sim", ("A", "p2"), at(1, 9), at(1, 10), "alice", "A"),
]
# (time, product, how many): the second stands for two refusals folded into one record.
REFUSALS = [(at(3, 10.5), "cad", 1), (at(3, 10.75), "cad", 2), (at(8, 0), "cad", 1)]


def test_a_scripted_week_by_day() -> None:
    report = build_report(WEEK, REFUSALS, MONDAY, at(7, 0), "day", products=["cad", "sim"])
    rows = {(r.product, round((r.start - MONDAY) / DAY)): r for r in report.rows}
    assert len(report.rows) == 14  # 7 days x 2 products
    expected_cad = {
        # day: (peak, seat-hours, users, machines, refusals)
        0: (2, 10.0, 2, 2, 0),
        1: (0, 0.0, 0, 0, 0),
        2: (1, 2.0, 1, 1, 0),
        3: (3, 5.0, 4, 4, 3),
        4: (1, 18.0, 1, 1, 0),
        5: (1, 24.0, 1, 1, 0),
        6: (1, 24.0, 1, 1, 0),
    }
    for day, (peak, hours, users, machines, refused) in expected_cad.items():
        r = rows["cad", day]
        got = (r.peak, r.seat_hours, len(r.users), len(r.machines), r.refusals)
        assert got == (peak, pytest.approx(hours), users, machines, refused), day
    sim = rows["sim", 1]
    assert (sim.peak, sim.seat_hours, len(sim.users), len(sim.machines)) == (2, 3.0, 1, 1)
    assert all(rows["sim", d].peak == 0 for d in (0, 2, 3, 4, 5, 6))


def test_the_same_week_by_hour_adds_up_to_the_days() -> None:
    by_day = build_report(WEEK, REFUSALS, MONDAY, at(7, 0), "day")
    by_hour = build_report(WEEK, REFUSALS, MONDAY, at(7, 0), "hour")
    assert len([r for r in by_hour.rows if r.product == "cad"]) == 7 * 24
    for day_row in (r for r in by_day.rows if r.product == "cad"):
        hours = [
            r for r in by_hour.rows if r.product == "cad" and day_row.start <= r.start < day_row.end
        ]
        assert sum(h.seat_seconds for h in hours) == pytest.approx(day_row.seat_seconds)
        assert max(h.peak for h in hours) == day_row.peak
        assert sum(h.refusals for h in hours) == day_row.refusals
    ten = next(r for r in by_hour.rows if r.product == "cad" and r.start == at(3, 10))
    assert (ten.peak, ten.seat_hours, ten.refusals) == (3, 3.0, 3)


def test_a_seat_handed_over_at_the_same_instant_is_not_counted_twice() -> None:
    week = [cad("A", "a", at(0, 1), at(0, 2)), cad("B", "b", at(0, 2), at(0, 3))]
    report = build_report(week, [], MONDAY, at(1, 0), "day")
    assert report.rows[0].peak == 1
    assert report.rows[0].seat_hours == pytest.approx(2.0)


def test_intervals_are_clipped_to_the_range_and_the_series_steps() -> None:
    # Held from before the report until after it: the whole range, at 1 seat.
    report = build_report([cad("A", "a", at(-3, 0), at(9, 0))], [], at(0, 6), at(0, 18), "hour")
    assert [r.peak for r in report.rows] == [1] * 12
    assert sum(r.seat_hours for r in report.rows) == pytest.approx(12.0)
    assert report.series["cad"] == [(at(0, 6), 1), (at(0, 18), 1)]
    week = build_report(WEEK, [], MONDAY, at(1, 0), "day")
    assert week.series["cad"] == [
        (MONDAY, 0),
        (at(0, 9), 1),
        (at(0, 13), 2),
        (at(0, 15), 1),
        (at(0, 17), 0),
        (at(1, 0), 0),
    ]


def test_period_bounds_align_to_utc_hours_and_days() -> None:
    assert period_bounds(at(0, 10.5), at(0, 13), "hour") == [
        at(0, 10.5),
        at(0, 11),
        at(0, 12),
        at(0, 13),
    ]
    assert period_bounds(at(0, 12), at(2, 6), "day") == [at(0, 12), at(1, 0), at(2, 0), at(2, 6)]
    with pytest.raises(ValueError):
        period_bounds(0, 1, "week")
    with pytest.raises(ValueError):
        build_report([], [], 10.0, 10.0)


def test_parse_when() -> None:
    now = at(5, 12)
    assert parse_when("2026-11-02", now) == MONDAY
    assert parse_when("2026-11-02T09:30", now) == at(0, 9.5)
    assert parse_when("2026-11-02T10:30+01:00", now) == at(0, 9.5)
    assert parse_when("2026-11-02T09:30:00Z", now) == at(0, 9.5)
    assert parse_when("7d", now) == now - 7 * DAY
    assert parse_when("36h", now) == now - 36 * H
    assert parse_when("15m", now) == now - 900
    for bad in ("yesterday", "7x", "", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_when(bad, now)
