"""Prometheus metrics.

The hot path only bumps plain counters (:class:`RequestStats` here, and the
event counters of :class:`~floatd.core.service.LeaseService`); prometheus_client's
own metric objects take a lock per update, which at tens of thousands of
requests a second is a cost worth avoiding.  A custom collector turns the
counters into metric families when Prometheus scrapes, and prometheus_client
does the text exposition.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from floatd import __version__

if TYPE_CHECKING:
    from floatd.daemon.views import StatusView

#: Request duration buckets (seconds), from a cached answer to a slow commit.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class RequestStats:
    """Requests by (op, result) and one latency histogram over all of them."""

    __slots__ = ("buckets", "requests", "sum")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, op: str, result: str, seconds: float) -> None:
        """Once per answer: a plain dict (a Counter's ``+=`` took twice as
        long), and the count is the histogram's total, read at scrape time."""
        key = (op, result)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class FloatdCollector(Collector):
    def __init__(self, server: StatusView) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        service = server.service
        now = server.clock()

        info = GaugeMetricFamily("floatd_info", "floatd build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        start = GaugeMetricFamily(
            "floatd_start_time_seconds", "When the daemon started (unix time)"
        )
        start.add_metric([], server.started_at)
        yield start

        state = service.activation_state(now)
        activation = GaugeMetricFamily(
            "floatd_activation_state",
            "1 for the current activation state, so alerts can match on the label",
            labels=["state"],
        )
        activation.add_metric([state], 1)
        yield activation

        seats = GaugeMetricFamily(
            "floatd_seats", "Seats entitled (0 or -1: unlimited)", labels=["product"]
        )
        used = GaugeMetricFamily("floatd_seats_used", "Seats in use", labels=["product"])
        free = GaugeMetricFamily(
            "floatd_seats_free", "Seats free (absent for unlimited products)", labels=["product"]
        )
        waiting = GaugeMetricFamily(
            "floatd_wait_queue_length", "Acquires queued for a seat", labels=["product"]
        )
        borrowed = GaugeMetricFamily(
            "floatd_seats_borrowed", "Seats borrowed for offline use", labels=["product"]
        )
        expiry = GaugeMetricFamily(
            "floatd_product_expiry_timestamp_seconds",
            "When the product's entitlement ends (unix time), if it does",
            labels=["product"],
        )
        for p in self.server.products_overview():
            seats.add_metric([p["code"]], p["seats"])
            used.add_metric([p["code"]], p["used"])
            if p["free"] is not None:
                free.add_metric([p["code"]], p["free"])
            waiting.add_metric([p["code"]], p["waiting"])
            borrowed.add_metric([p["code"]], p["borrowed"])
            if p["not_after"] is not None:
                expiry.add_metric([p["code"]], p["not_after"])
        yield from (seats, used, free, waiting, borrowed, expiry)

        leases = GaugeMetricFamily("floatd_leases", "Leases held (all products)")
        leases.add_metric([], server.lease_count())
        yield leases

        ent = service.entitlement
        license_expiry = GaugeMetricFamily(
            "floatd_license_expiry_timestamp_seconds",
            "When the license ends (unix time); absent if it never does",
        )
        if ent is not None and ent.not_after is not None:
            license_expiry.add_metric([], ent.not_after)
        yield license_expiry

        connections = GaugeMetricFamily("floatd_connections", "Open lease-protocol connections")
        connections.add_metric([], server.connections)
        yield connections

        node = server.node
        if node is not None:
            serving = GaugeMetricFamily(
                "floatd_cluster_nodes", "Cluster nodes serving (fresh heartbeat, with a slot)"
            )
            serving.add_metric([], sum(1 for row in node.nodes if row["serving"]))
            yield serving

        stats = server.stats
        requests = CounterMetricFamily(
            "floatd_requests", "Lease-protocol requests by op and result", labels=["op", "result"]
        )
        for (op, result), n in sorted(stats.requests.items()):
            requests.add_metric([op, result], n)
        yield requests
        duration = HistogramMetricFamily(
            "floatd_request_duration_seconds",
            "From reading a request to writing its answer, commit included",
        )
        duration.add_metric([], stats.cumulative(), sum_value=stats.sum)
        yield duration

        events = CounterMetricFamily(
            "floatd_lease_events",
            "Lease events (granted, renewed, released, expired, revoked, refused)",
            labels=["product", "event"],
        )
        for (event, product), n in sorted(service.events.items()):
            events.add_metric([product, event], n)
        yield events
        refusals = CounterMetricFamily(
            "floatd_acquire_refusals",
            "Refused acquires by product and error code",
            labels=["product", "code"],
        )
        for (product, code), n in sorted(service.refusals.items()):
            refusals.add_metric([product, code], n)
        yield refusals
        policy = CounterMetricFamily(
            "floatd_policy_refusals",
            "Acquires the site policy refused (POLICY_DENIED) by product and rule",
            labels=["product", "rule"],
        )
        for (product, rule), n in sorted(service.policy_refusals.items()):
            policy.add_metric([product, rule], n)
        yield policy

        committer = server.committer
        commits = CounterMetricFamily("floatd_commits", "State database transactions")
        commits.add_metric([], committer.commits)
        yield commits
        commit_seconds = CounterMetricFamily(
            "floatd_commit_seconds", "Time spent writing the state database"
        )
        commit_seconds.add_metric([], committer.apply_seconds)
        yield commit_seconds
        age = GaugeMetricFamily(
            "floatd_last_commit_age_seconds",
            "Seconds since the last completed commit began (about 1 when idle and healthy)",
        )
        age.add_metric([], max(0.0, now - committer.last_cut))
        yield age


def registry_for(server: StatusView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FloatdCollector(server))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
