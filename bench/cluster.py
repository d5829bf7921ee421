"""Three floatd nodes on one PostgreSQL, next to the single SQLite server.

    python3 bench/cluster.py [--seconds 2] [--rounds 3] [--connections 64] [--leases 1000]

Starts its own throwaway PostgreSQL (tests/pg.py), three ``floatd serve``
nodes on one database and one single server (SQLite), all on loopback, and
measures them in the same run with the same load generator as
bench/throughput.py: ``--connections`` connections spread evenly over the
nodes, one request in flight each (closed loop), durable acquires (every one
committed before its answer) and renewals (in a cluster also committed before
their answer).  Windows alternate between the cluster and the single server.
Targets (issue 21, a 2-core machine): cluster acquire >= 1,000/s, renew >=
2,000/s.

Then the failover: ``--leases`` leases held through the client library,
spread over the nodes (each client lists all three, starting at a different
one), on a product of exactly that many seats with 6 s leases; one node is
killed with kill -9; reported: the time from the kill until every lease that
was on that node has renewed through another (target <= 5 s), leases lost
(target 0), and seats held over the cap (target 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import psycopg  # noqa: E402
import throughput as tp  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from pg import fresh_database, postgres_server  # noqa: E402

from floatd.core.entitlement import format_public_key, product_payload, sign_entitlement  # noqa: E402
from floatd.store import cluster  # noqa: E402

TARGETS = {"acquire": 1000.0, "renew": 2000.0}
FAILOVER_TARGET = 5.0
NODES = 3


def node_config(home: Path, key: Ed25519PrivateKey, dsn: str, name: str) -> Path:
    (home / "state").mkdir(parents=True)
    path = home / "floatd.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n[status]\nlisten = ""\n'
        f'[state]\ndir = "{home / "state"}"\nbackend = "postgresql"\ndsn = "{dsn}"\n'
        f'[cluster]\nnode = "{name}"\n'
        f'[entitlement]\nvendor_keys = ["{format_public_key(key.public_key())}"]\n'
        f'[admin]\nsocket = "{home / "admin.sock"}"\n'
        "[limits]\nacquires_per_second = 1000000\nacquire_burst = 1000000\n"
        "connections_per_address = 100000\n"
    )
    return path


def entitlement(key: Ed25519PrivateKey, fingerprint: str, seats: int, duration: int) -> str:
    payload = {
        "v": 1,
        "id": f"bench-{seats}",
        "license": "bench",
        "customer": None,
        "server": fingerprint,
        "issued_at": int(time.time()) - 60,
        "not_before": None,
        "not_after": None,
        "refresh_by": None,
        "nonce": None,
        "nodes": NODES,
        "products": [
            product_payload(
                "bench", "bench", seats, lease_duration=duration, strategy="per-instance"
            )
        ],
    }
    return sign_entitlement(key, payload)


class Nodes:
    def __init__(self, tmp: Path, dsn: str, seats: int, duration: int) -> None:
        self.key = Ed25519PrivateKey.generate()
        with psycopg.connect(dsn, autocommit=True) as conn:
            cluster.init(conn)
            fingerprint = cluster.fingerprint(conn)
        text = entitlement(self.key, fingerprint, seats, duration)
        self.dsn = dsn
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for n in range(1, NODES + 1):
            home = tmp / f"node{n}"
            config = node_config(home, self.key, dsn, f"node{n}")
            (home / "state" / "entitlement.txt").write_text(text)
            proc, port = tp.launch(config, home / "floatd.log", timeout=60)
            self.procs.append(proc)
            self.ports.append(port)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def spread(ports: list[int], count: int, renewing: bool) -> list[tp.Conn]:
    """``count`` connections, round-robin over ``ports``."""
    conns: list[tp.Conn] = []
    for i in range(count):
        group = (tp.renew_connections if renewing else tp.connect)(ports[i % len(ports)], 1)
        group[0].n = i * 10_000_000
        conns.extend(group)
    return conns


def throughput(
    single: int, nodes: list[int], count: int, seconds: float, rounds: int
) -> dict[str, dict[str, list[float]]]:
    frames = {"acquire": tp.acquire_frame, "renew": lambda c: c.next_frame}
    conns = {
        "single": {op: spread([single], count, op == "renew") for op in frames},
        "cluster": {op: spread(nodes, count, op == "renew") for op in frames},
    }
    out: dict[str, dict[str, list[float]]] = {s: {op: [] for op in frames} for s in conns}
    for _ in range(rounds):
        for op, make in frames.items():
            for setup, by_op in conns.items():
                rate, failures = tp.run_load(by_op[op], make, seconds)
                if failures:
                    print(f"warning: {setup} {op}: {failures} refusals", file=sys.stderr)
                out[setup][op].append(rate)
    for by_op in conns.values():
        for group in by_op.values():
            for c in group:
                c.sock.close()
    return out


async def failover(nodes: Nodes, leases: int) -> dict[str, Any]:
    from floatd.client import lease

    servers = [f"127.0.0.1:{port}" for port in nodes.ports]
    held: list[Any] = []
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def hold(n: int, ready: trio.Event) -> None:
            order = servers[n % NODES :] + servers[: n % NODES]
            async with lease(order, "bench", instance=f"failover-{n}") as got:
                held.append(got)
                ready.set()
                await done.wait()

        for n in range(leases):
            ready = trio.Event()
            nursery.start_soon(hold, n, ready)
            await ready.wait()
        victim = nodes.ports[0]
        moving = [h for h in held if h.server[1] == victim]
        before = {id(h): h.renewals for h in moving}
        nodes.procs[0].kill()
        killed = time.monotonic()
        took = None
        with trio.move_on_after(30):
            while True:
                if all(h.server[1] != victim and h.renewals > before[id(h)] for h in moving):
                    took = time.monotonic() - killed
                    break
                await trio.sleep(0.05)
        lost = sum(1 for h in held if h.lost.is_set())
        with psycopg.connect(nodes.dsn) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT (instance, fingerprint)) FROM floatd_leases"
                " WHERE product = 'bench'"
            ).fetchone()
        seats = int(row[0]) if row else 0
        done.set()
    return {
        "leases": leases,
        "moved": len(moving),
        "seconds": None if took is None else round(took, 2),
        "lost": lost,
        "over_cap": max(0, seats - leases),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--leases", type=int, default=1000, help="held through the failover")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per held lease
    with tempfile.TemporaryDirectory() as tmpdir, postgres_server() as pg:
        tmp = Path(tmpdir)
        single_proc, single_port = tp.start_floatd(tmp)
        nodes = Nodes(tmp, fresh_database(pg.url, "bench"), 0, 3600)
        try:
            rates = throughput(
                single_port, nodes.ports, args.connections, args.seconds, args.rounds
            )
        finally:
            nodes.stop()
            single_proc.terminate()
            single_proc.wait(10)
        (tmp / "fail").mkdir()
        spare = Nodes(tmp / "fail", fresh_database(pg.url, "failover"), args.leases, 6)
        try:
            moved = trio.run(failover, spare, args.leases)
        finally:
            spare.stop()
    rows = []
    for op, target in TARGETS.items():
        single = statistics.median(rates["single"][op])
        ours = statistics.median(rates["cluster"][op])
        rows.append(
            {
                "op": op,
                "single_per_s": round(single),
                "cluster_per_s": round(ours),
                "ratio": round(ours / single, 3),
                "target_per_s": target,
                "met": ours >= target,
                "cluster_runs": [round(r) for r in rates["cluster"][op]],
                "single_runs": [round(r) for r in rates["single"][op]],
            }
        )
    if args.json:
        print(json.dumps({"throughput": rows, "failover": moved}, indent=2))
        return
    print(
        f"{NODES} nodes on one PostgreSQL vs one SQLite server; {args.connections} connections"
        f" spread over the nodes; {args.rounds} rounds of {args.seconds:g} s windows;"
        f" {os.cpu_count()} cores; medians"
    )
    print(f"{'op':<9}{'single/s':>10}{'cluster/s':>11}{'ratio':>8}{'target/s':>10}  met")
    for r in rows:
        print(
            f"{r['op']:<9}{r['single_per_s']:>10}{r['cluster_per_s']:>11}{r['ratio']:>8.3f}"
            f"{r['target_per_s']:>10.0f}  {'yes' if r['met'] else 'NO'}"
        )
        print(f"  runs: cluster {r['cluster_runs']}, single {r['single_runs']}")
    took = moved["seconds"]
    print(
        f"failover: {moved['leases']} leases held, {moved['moved']} on the node killed (kill -9);"
        f" all renewed through another node after {took} s (target <= {FAILOVER_TARGET:g} s,"
        f" {'met' if took is not None and took <= FAILOVER_TARGET else 'NOT met'});"
        f" lost {moved['lost']}, seats over the cap {moved['over_cap']}"
    )


if __name__ == "__main__":
    main()
