"""What the site policy costs a decision: acquire + release on the pool, sans I/O.

    python3 bench/policy.py [--ops 50000] [--rounds 5]

The same pool code runs three ways in the same process, alternating, each
round with ``held`` leases already in the pool (1k, then 100k): no policy (the
baseline), the README's worked example (exclude, include, reserve, a max per
user), and a policy of 50 rules that all apply.  Figures are microseconds per
acquire+release pair; ratios are to the baseline of the same round (median
over rounds).  Targets: the README policy costs at most 3x the bare pool (a
pair is about 2 us of a request that cost the server about 57 us on c2c2d46, so 3x adds
under a tenth to a request; docs/performance.md), and the cost does not grow
with the leases held (ratio at 100k within 1.2x of the ratio at 1k).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from floatd.core.policy_file import load_policy  # noqa: E402
from floatd.core.pool import SeatPool  # noqa: E402
from floatd.core.seats import Claim, Lease, PoolProduct, hash_token  # noqa: E402

EXAMPLE = """
[groups]
cad_team = ["user:alice", "user:bob", "host:ws-cad-*", "ip:10.1.2.0/24"]
kiosks   = ["host:kiosk-*"]
[[rule]]
product = "cad"
exclude = ["group:kiosks"]
[[rule]]
product = "cad"
include = ["user:*"]
[[rule]]
product = "cad"
reserve = 2
for = ["group:cad_team"]
[[rule]]
product = "cad"
max = 1
for = ["user:*"]
per = "user"
"""
MANY = (
    "".join(
        f'[[rule]]\nproduct = "cad"\nexclude = ["host:lab-{n}-*", "ip:10.{n}.0.0/16"]\n'
        for n in range(48)
    )
    + '[[rule]]\nproduct = "*"\nmax = 1\nper = "user"\n'
    + '[[rule]]\nproduct = "cad"\nreserve = 2\nfor = ["user:vip-*"]\n'
)
TOKEN = hash_token("t")


def make_pool(policy: str | None, held: int) -> SeatPool:
    pool = SeatPool()
    pool.max_leases_per_seat = 10**9
    pool.set_products([PoolProduct("cad", held + 10_000, 3600)], 0.0)
    if policy is not None:
        pool.set_policy(load_policy(policy, "bench.toml"), 0.0)
    for n in range(held):
        pool.acquire(0.0, Claim("cad", f"held-{n:08d}", f"H{n}", TOKEN, user=f"held{n}"))
    return pool


def run(pool: SeatPool, ops: int) -> float:
    """Microseconds per acquire + release."""
    claims = [
        Claim("cad", f"machine-{n:08d}", f"L{n}", TOKEN, None, f"user{n}", "ws-1", peer="192.0.2.1")
        for n in range(ops)
    ]
    start = time.perf_counter()
    for c in claims:
        lease = pool.acquire(1.0, c)
        assert isinstance(lease, Lease)
        pool.release(1.0, lease.id, TOKEN)
    return (time.perf_counter() - start) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"none": None, "example": EXAMPLE, "50 rules": MANY}
    print(f"acquire+release pairs, {args.ops} per window, {args.rounds} rounds; us per pair")
    ratios: dict[tuple[str, int], float] = {}
    for held in (1_000, 100_000):
        pools = {name: make_pool(text, held) for name, text in cases.items()}
        figures: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, pool in pools.items():
                figures[name].append(run(pool, args.ops))
        for name in cases:
            per_round = [f / b for f, b in zip(figures[name], figures["none"], strict=True)]
            ratios[name, held] = statistics.median(per_round)
            print(
                f"  {held:>7} held  {name:<9} {statistics.median(figures[name]):6.2f} us"
                f"  ratio {ratios[name, held]:.2f}"
            )
    example = ratios["example", 1_000]
    growth = ratios["example", 100_000] / example
    print(
        f"example policy: {example:.2f}x the baseline (target <= 3): "
        f"{'met' if example <= 3 else 'NOT met'}"
    )
    print(
        f"example at 100k / at 1k: {growth:.2f} (target <= 1.2): "
        f"{'met' if growth <= 1.2 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
