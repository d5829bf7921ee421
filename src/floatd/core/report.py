"""Usage reports: peak seats, seat-hours, distinct users and machines, refusals.

Pure computation over seat tenancies (:class:`Interval`), so it is tested with
made-up weeks and no database.  Seats, not leases, are counted: on a
per-machine product three processes of one machine hold one seat, and the
report says 1, as the pool does.

One sweep over the start and end points, in time order, gives the number of
seats in use as a step function; its maximum over each period is the peak and
its integral is the seat-hours.  At equal times ends go first, so a seat handed
from one holder to the next at the same instant is not counted twice.
"""

from __future__ import annotations

import calendar
import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PERIODS = ("hour", "day")


@dataclass(frozen=True, slots=True)
class Interval:
    """One lease's tenancy of a seat, ``[start, end)`` in unix seconds."""

    product: str
    seat: tuple[str, ...]
    start: float
    end: float
    user: str | None = None
    fingerprint: str | None = None


@dataclass(slots=True)
class PeriodUsage:
    product: str
    start: float
    end: float
    peak: int = 0
    seat_seconds: float = 0.0
    users: set[str] = field(default_factory=set)
    machines: set[str] = field(default_factory=set)
    refusals: int = 0

    @property
    def seat_hours(self) -> float:
        return self.seat_seconds / 3600

    def to_json(self, iso: Any) -> dict[str, Any]:
        return {
            "product": self.product,
            "period_start": iso(self.start),
            "period_end": iso(self.end),
            "peak_seats": self.peak,
            "seat_hours": round(self.seat_hours, 3),
            "distinct_users": len(self.users),
            "distinct_machines": len(self.machines),
            "refusals_no_seat": self.refusals,
        }


@dataclass(slots=True)
class Report:
    since: float
    until: float
    by: str
    rows: list[PeriodUsage]
    #: Per product, the step function of seats in use: ``(time, seats)`` points.
    series: dict[str, list[tuple[float, int]]]


def period_bounds(since: float, until: float, by: str) -> list[float]:
    """Period edges from ``since`` to ``until``, on whole UTC hours or days
    (the first and last periods may be partial)."""
    if by not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}")
    step = 3600 if by == "hour" else 86400
    edges = [since]
    t = time.gmtime(since)
    if by == "hour":
        aligned = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0))
    else:
        aligned = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    edge = float(aligned + step)
    while edge < until:
        edges.append(edge)
        edge += step
    edges.append(until)
    return edges


def build_report(
    intervals: Iterable[Interval],
    refusals: Iterable[tuple[float, str, int]],
    since: float,
    until: float,
    by: str = "day",
    products: Iterable[str] = (),
) -> Report:
    """The usage report for ``[since, until)``.  ``products`` lists products to
    show even when nothing happened to them (say, all those entitled)."""
    if until <= since:
        raise ValueError("the report's end must come after its start")
    edges = period_bounds(since, until, by)
    by_product: dict[str, list[Interval]] = {code: [] for code in products}
    for iv in intervals:
        start, end = max(iv.start, since), min(iv.end, until)
        if end > start or (end == start and since <= start < until):
            by_product.setdefault(iv.product, []).append(
                Interval(iv.product, iv.seat, start, end, iv.user, iv.fingerprint)
            )
    refused: dict[str, list[tuple[float, int]]] = {}
    for ts, code, count in refusals:
        if since <= ts < until:
            refused.setdefault(code, []).append((ts, count))
            by_product.setdefault(code, [])

    rows: list[PeriodUsage] = []
    series: dict[str, list[tuple[float, int]]] = {}
    for code in sorted(by_product):
        periods = [PeriodUsage(code, a, b) for a, b in itertools.pairwise(edges)]
        series[code] = _sweep(by_product[code], periods, since, until)
        for iv in by_product[code]:
            for p in periods[_period_index(edges, iv.start) :]:
                if p.start > iv.end or (p.start == iv.end and iv.end > iv.start):
                    break
                if iv.user:
                    p.users.add(iv.user)
                if iv.fingerprint:
                    p.machines.add(iv.fingerprint)
        for ts, count in refused.get(code, ()):
            periods[_period_index(edges, ts)].refusals += count
        rows.extend(periods)
    return Report(since, until, by, rows, series)


def _period_index(edges: list[float], ts: float) -> int:
    lo, hi = 0, len(edges) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edges[mid] <= ts:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _sweep(
    intervals: list[Interval], periods: list[PeriodUsage], since: float, until: float
) -> list[tuple[float, int]]:
    """Fill in peaks and seat-seconds; return the in-use step function."""
    points: list[tuple[float, int, tuple[str, ...]]] = []
    for iv in intervals:
        if iv.end <= iv.start:
            continue  # held for no time: no seat-seconds, and it would upset the counts
        points.append((iv.start, 1, iv.seat))
        points.append((iv.end, -1, iv.seat))
    points.sort(key=lambda p: (p[0], p[1]))  # ends (-1) before starts at equal times
    holders: Counter[tuple[str, ...]] = Counter()
    in_use = 0
    last = since
    index = 0
    series = [(since, 0)]

    def accrue(upto: float) -> None:
        nonlocal last, index
        while index < len(periods) and periods[index].end <= upto:
            p = periods[index]
            p.seat_seconds += in_use * (p.end - last)
            p.peak = max(p.peak, in_use)
            last = p.end
            index += 1
            if index < len(periods):
                periods[index].peak = max(periods[index].peak, in_use)
        if index < len(periods) and upto > last:
            periods[index].seat_seconds += in_use * (upto - last)
            last = upto

    for at, delta, seat in points:
        if at >= until:
            break  # tenancies cut off by the report's end, not real releases
        accrue(at)
        before = holders[seat]
        holders[seat] = before + delta
        if delta > 0 and before == 0:
            in_use += 1
        elif delta < 0 and before == 1:
            in_use -= 1
            del holders[seat]
        if index < len(periods):
            periods[index].peak = max(periods[index].peak, in_use)
        if series[-1][1] == in_use:
            continue  # another holder of a held seat: no step
        if series[-1][0] == at:
            series[-1] = (at, in_use)
        else:
            series.append((at, in_use))
    accrue(until)
    if series[-1][0] != until:
        series.append((until, in_use))
    return series


CSV_COLUMNS = (
    "product",
    "period_start",
    "period_end",
    "peak_seats",
    "seat_hours",
    "distinct_users",
    "distinct_machines",
    "refusals_no_seat",
)


def plot_report(report: Report, path: str, caps: dict[str, int | None]) -> None:
    """Seats in use over time against the cap, one panel per product.
    matplotlib is an optional extra (``pip install 'floatd[plot]'``)."""
    from datetime import UTC, datetime

    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    codes = sorted(report.series) or ["(no activity)"]
    fig, axes = plt.subplots(len(codes), 1, figsize=(10, 2.6 * len(codes)), squeeze=False)
    for ax, code in zip(axes[:, 0], codes, strict=True):
        points = report.series.get(code, [(report.since, 0), (report.until, 0)])
        xs = [datetime.fromtimestamp(t, UTC) for t, _ in points]
        ys = [n for _, n in points]
        ax.step(xs, ys, where="post", label="seats in use")
        cap = caps.get(code)
        if cap is not None and cap > 0:
            ax.axhline(cap, color="red", linestyle="--", label=f"cap ({cap})")
        ax.set_title(code)
        ax.set_ylabel("seats")
        top = max([*ys, cap if cap is not None and cap > 0 else 0, 1])
        ax.set_ylim(0, top * 1.25 + 0.5)  # room above the cap for the legend
        ax.xaxis.set_major_formatter(DateFormatter("%m-%d %H:%M"))  # type: ignore[no-untyped-call]
        ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
