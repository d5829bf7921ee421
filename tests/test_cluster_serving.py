"""Several `floatd serve` nodes on one real PostgreSQL (cluster.md): a lease
granted on one node is renewed and released on another, the cap holds across
nodes under concurrent acquires, a node killed with kill -9 loses nothing
acknowledged, and a database that goes away costs availability, not seats."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon, free_port, wait_for
from pg import TcpProxy, fresh_database, postgres_server
from test_fault_integration import client
from test_integration import floatd_cli

from floatd.client import lease
from floatd.client.simple import ProtocolError, SimpleClient
from floatd.core.entitlement import sign_entitlement
from floatd.store import cluster
from floatd.store.activation import atomic_write

CAP = 5


class Cluster:
    """Nodes n1..nN on one database, each a real `floatd serve`."""

    def __init__(
        self,
        tmp_path: Path,
        key: Ed25519PrivateKey,
        url: str,
        count: int,
        nodes: int | None = None,
        duration: int = 60,
        dsns: list[str] | None = None,
        extra: list[dict[str, Any]] | None = None,
    ) -> None:
        self.url = url
        with psycopg.connect(url, autocommit=True) as conn:
            cluster.init(conn)
            self.fingerprint = cluster.fingerprint(conn)
        ent = sign_entitlement(
            key,
            payload(
                products=[product("app", seats=CAP, lease_duration=duration), *(extra or [])],
                server=self.fingerprint,
                nodes=nodes if nodes is not None else count,
                issued_at=int(time.time()) - 60,
            ),
        )
        self.nodes: list[Daemon] = []
        for n in range(1, count + 1):
            home = tmp_path / f"n{n}"
            home.mkdir()
            config = write_config(
                home,
                key,
                state__backend="postgresql",
                state__dsn=dsns[n - 1] if dsns else url,
                cluster__node=f"n{n}",
                status__listen=f"127.0.0.1:{free_port()}",
            )
            atomic_write(home / "state" / "entitlement.txt", ent)
            self.nodes.append(Daemon(config, home / "floatd.log"))

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def close(self) -> None:
        for node in self.nodes:
            node.kill9()


@pytest.fixture
def three(tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "serving"), 3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


def status(node: Daemon) -> dict[str, Any]:
    code, body = node.http("/status")
    assert code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def waiting(node: Daemon) -> int:
    products = status(node)["products"]
    return int(products[0]["waiting"]) if products else 0


def test_a_lease_from_one_node_is_renewed_and_released_on_another(three: Cluster) -> None:
    a, b, c = (client(node) for node in three.nodes)
    got = a.request("acquire", product="app", fingerprint="machine-1")
    assert got["ok"], got
    renewed = b.request("renew", lease=got["lease"], token=got["token"])
    assert renewed["ok"] and renewed["expires_in"] > 50, renewed
    assert c.request("release", lease=got["lease"], token=got["token"])["ok"]
    again = a.request("renew", lease=got["lease"], token=got["token"])
    assert again["error"]["code"] == "LEASE_NOT_FOUND"
    # The audit trail and the report are the cluster's, from any node's config.
    trail = floatd_cli("audit", "--config", str(three.nodes[2].config), "--json")
    assert trail.returncode == 0, trail.stderr
    events = [r["event"] for r in json.loads(trail.stdout) if r["lease"] == got["lease"]]
    assert events == ["granted", "renewed", "released", "refused"]
    report = floatd_cli("report", "--config", str(three.nodes[1].config), "--since", "1h", "--json")
    assert report.returncode == 0, report.stderr
    assert sum(r["peak_seats"] for r in json.loads(report.stdout)["rows"]) == 1


def test_the_cap_holds_across_nodes_under_concurrent_acquires(three: Cluster) -> None:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def hammer(node: Daemon, worker: int) -> None:
        with SimpleClient("127.0.0.1", node.port, timeout=15) as c:
            c.hello()
            for k in range(6):
                answer = c.request("acquire", product="app", fingerprint=f"machine-w{worker}-{k}")
                with lock:
                    results.append(answer)

    threads = [threading.Thread(target=hammer, args=(three.nodes[w % 3], w)) for w in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    granted = [r for r in results if r["ok"]]
    refused = {r["error"]["code"] for r in results if not r["ok"]}
    assert len(results) == 72 and len(granted) == CAP and refused == {"NO_FREE_SEATS"}
    with psycopg.connect(three.url) as conn:
        row = conn.execute("SELECT count(DISTINCT seat) FROM floatd_leases").fetchone()
    assert row == (CAP,)
    # Every node's status says the same, within its refresh.
    wait_for(
        lambda: all([p["used"] for p in status(node)["products"]] == [CAP] for node in three.nodes),
        "every node's status to show the cluster's seats",
    )


def test_a_node_killed_loses_no_acknowledged_lease(three: Cluster) -> None:
    first = client(three.nodes[0])
    held = [
        first.request("acquire", product="app", fingerprint=f"machine-k{n}") for n in range(CAP)
    ]
    assert all(h["ok"] for h in held)
    three.nodes[0].kill9()
    other = client(three.nodes[1])
    for h in held:
        assert other.request("renew", lease=h["lease"], token=h["token"])["ok"]
    refused = other.request("acquire", product="app", fingerprint="machine-late")
    assert refused["error"]["code"] == "NO_FREE_SEATS"


def test_a_database_that_goes_away_costs_availability_not_seats(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    with postgres_server() as server:
        nodes = Cluster(tmp_path, vendor_key, server.url, 2)
        try:
            nodes.start()
            a, b = (client(node) for node in nodes.nodes)
            held = a.request("acquire", product="app", fingerprint="machine-1")
            assert held["ok"]
            config = str(nodes.nodes[0].config)
            before = floatd_cli("fingerprint", "--config", config).stdout
            wait_for(
                lambda: [p["used"] for p in status(nodes.nodes[1])["products"]] == [1],
                "the second node to have seen the lease",
            )
            server.stop("immediate")
            down = b.request("renew", lease=held["lease"], token=held["token"])
            assert down["error"]["code"] == "UNAVAILABLE"
            assert b.request("ping")["ok"]  # the node itself still answers,
            info = b.request("info", product="app")  # info from what it last knew
            assert info["ok"] and info["used"] == 1, info
            wait_for(
                lambda: nodes.nodes[1].http("/healthz")[0] == 503, "healthz to say unavailable"
            )
            _, body = nodes.nodes[1].http("/healthz")
            assert json.loads(body)["status"] == "state_unavailable"
            server.start()
            wait_for(
                lambda: b.request("renew", lease=held["lease"], token=held["token"])["ok"],
                "the node to serve again",
                timeout=20,
            )
            wait_for(lambda: nodes.nodes[0].http("/healthz")[0] == 200, "the first node too")
            again = a.request("acquire", product="app", fingerprint="machine-2")
            assert again["ok"], again
            assert floatd_cli("fingerprint", "--config", config).stdout == before != ""
        finally:
            nodes.close()


def test_a_seat_freed_on_one_node_goes_to_the_first_waiter_wherever_it_waits(
    three: Cluster,
) -> None:
    holder = client(three.nodes[0])
    held = [
        holder.request("acquire", product="app", fingerprint=f"machine-h{n}") for n in range(CAP)
    ]
    assert all(h["ok"] for h in held)
    answers: dict[str, dict[str, Any]] = {}

    def wait_on(node: Daemon, name: str) -> None:
        with SimpleClient("127.0.0.1", node.port, timeout=40) as c:
            c.hello()
            answers[name] = c.request("acquire", product="app", fingerprint=name, wait=30)

    first = threading.Thread(target=wait_on, args=(three.nodes[1], "machine-first"))
    first.start()
    wait_for(lambda: waiting(three.nodes[2]) == 1, "the first to queue")
    second = threading.Thread(target=wait_on, args=(three.nodes[2], "machine-second"))
    second.start()
    wait_for(lambda: waiting(three.nodes[0]) == 2, "the second to queue")
    assert holder.request("release", lease=held[0]["lease"], token=held[0]["token"])["ok"]
    first.join(timeout=20)
    assert answers["machine-first"]["ok"] and "machine-second" not in answers
    assert holder.request("release", lease=held[1]["lease"], token=held[1]["token"])["ok"]
    second.join(timeout=20)
    assert answers["machine-second"]["ok"]


def test_the_node_limit_keeps_a_node_waiting_until_a_slot_frees(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "limit"), 3, nodes=2)
    try:
        first, second, third = nodes.nodes
        first.start()
        second.start()
        assert third.start(until="node_limit") == 0
        third.status = [third.config.read_text().split('status]\nlisten = "')[1].split('"')[0]]
        code, body = third.http("/healthz")
        assert code == 503 and json.loads(body)["status"] == "node_limit"
        assert next(e for e in third.events() if e.get("event") == "node_limit")["nodes"] == 2
        listed = status(first)["cluster"]
        assert listed["node"] == "n1" and listed["fingerprint"] == nodes.fingerprint
        wait_for(
            lambda: (
                [(n["name"], n["serving"]) for n in status(first)["cluster"]["nodes"]]
                == [("n1", True), ("n2", True), ("n3", False)]
            ),
            "the registry to list every node (refreshed at each heartbeat)",
        )
        assert b"\nfloatd_cluster_nodes 2.0\n" in first.http("/metrics")[1]
        listing = floatd_cli("nodes", "--config", str(first.config), "--json")
        assert listing.returncode == 0, listing.stderr
        assert [n["name"] for n in json.loads(listing.stdout)["nodes"]] == ["n1", "n2", "n3"]
        shown = floatd_cli("nodes", "--config", str(third.config)).stdout.splitlines()
        assert shown[0].split()[0] == "NODE" and shown[3].split()[-1] == "no"
        second.kill9()  # its slot frees once its heartbeat is stale
        wait_for(
            lambda: any(e.get("event") == "listening" for e in third.events()),
            "the third node to take the freed slot",
            timeout=30,
        )
        port = int(
            next(e for e in third.events() if e.get("event") == "listening")["addresses"][0].rsplit(
                ":", 1
            )[1]
        )
        with SimpleClient("127.0.0.1", port, timeout=15) as c:
            c.hello()
            assert c.request("acquire", product="app", fingerprint="machine-3")["ok"]
        assert third.http("/healthz")[0] == 200
    finally:
        nodes.close()


def test_an_entitlement_installed_on_one_node_reaches_every_node(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "shared"), 2)
    try:
        nodes.start()
        first, second = nodes.nodes
        keys = {(Path(n.config).parent / "state" / "server.key").read_bytes() for n in nodes.nodes}
        assert len(keys) == 1  # one server key for the cluster (borrow.md)
        bigger = sign_entitlement(
            vendor_key,
            payload(
                products=[product("app", seats=CAP + 2, lease_duration=60)],
                server=nodes.fingerprint,
                nodes=2,
                issued_at=int(time.time()) - 30,
            ),
        )
        atomic_write(Path(first.config).parent / "state" / "entitlement.txt", bigger)
        wait_for(
            lambda: [p["seats"] for p in status(second)["products"]] == [CAP + 2],
            "the other node to serve with the new entitlement",
        )
    finally:
        nodes.close()


def test_clients_renew_through_another_node_when_theirs_is_killed(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "failover"), 2, duration=4)
    try:
        nodes.start()
        first, second = nodes.nodes
        servers = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]

        async def main() -> None:
            async with AsyncExitStack() as stack:
                held = [
                    await stack.enter_async_context(
                        lease(servers, "app", fingerprint=f"machine-f{n % CAP}")
                    )
                    for n in range(20)
                ]
                assert {h.server[1] for h in held} == {first.port}
                first.kill9()
                with trio.fail_after(15):
                    while not all(h.server[1] == second.port and h.renewals for h in held):
                        await trio.sleep(0.1)
                assert not any(h.lost.is_set() for h in held)

        trio.run(main)
    finally:
        nodes.close()


def test_a_node_that_loses_the_database_sends_its_clients_to_another(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    url = fresh_database(pg_dsn, "partition")
    proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
    through = url.replace(f":{proxy.target}/", f":{proxy.port}/")
    nodes = Cluster(tmp_path, vendor_key, url, 2, duration=4, dsns=[through, url])
    try:
        nodes.start()
        first, second = nodes.nodes
        servers = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]

        async def main() -> None:
            async with lease(servers, "app") as held:
                assert held.server[1] == first.port
                proxy.cut()  # the first node loses its database; the second keeps it
                with trio.fail_after(15):
                    while held.server[1] != second.port or not held.renewals:
                        await trio.sleep(0.1)
                assert not held.lost.is_set()

        trio.run(main)
        assert first.http("/healthz")[0] == 503
        probe = floatd_cli(
            *("probe", "--server", servers[0], "--server", servers[1]),
            *("--product", "app", "--lease", "--json"),
        )
        assert probe.returncode == 0, probe.stdout
        assert json.loads(probe.stdout)["server"] == servers[1]
    finally:
        nodes.close()
        proxy.cut()


def test_a_node_stops_cleanly_on_sigterm(three: Cluster) -> None:
    """SIGTERM: exit 0, and the node's queued acquire leaves the queue at once
    (not when its heartbeat has gone stale)."""
    c = client(three.nodes[0])
    for n in range(CAP):
        assert c.request("acquire", product="app", fingerprint=f"machine-stop{n}")["ok"]

    def wait_on() -> None:
        with (
            contextlib.suppress(OSError, ProtocolError),
            SimpleClient("127.0.0.1", three.nodes[0].port, timeout=20) as w,
        ):
            w.hello()
            w.request("acquire", product="app", fingerprint="machine-waits", wait=30)

    waiter = threading.Thread(target=wait_on)
    waiter.start()
    with psycopg.connect(three.url, autocommit=True) as conn:
        queued = "SELECT count(*) FROM floatd_waiters"
        wait_for(lambda: conn.execute(queued).fetchone() == (1,), "the acquire to queue")
        assert three.nodes[0].terminate(timeout=15) == 0
        assert conn.execute(queued).fetchone() == (0,)
    waiter.join(timeout=20)
    assert any(e.get("event") == "stopped" for e in three.nodes[0].events())


def test_a_waiter_on_another_node_hears_of_its_seat_at_once(three: Cluster) -> None:
    """The seat's release on one node wakes the waiter's node (NOTIFY) rather
    than waiting for its next look (once a second): over nine rounds the
    median time from the release's answer to the grant is well under that."""
    holder = client(three.nodes[0])
    held = [
        holder.request("acquire", product="app", fingerprint=f"machine-n{n}") for n in range(CAP)
    ]
    assert all(h["ok"] for h in held)
    took = []
    for n in range(9):
        answer: dict[str, Any] = {}
        got_at: list[float] = []

        def wait_on(
            name: str = f"machine-w{n}",
            answer: dict[str, Any] = answer,
            got_at: list[float] = got_at,
        ) -> None:
            with SimpleClient("127.0.0.1", three.nodes[1].port, timeout=20) as c:
                c.hello()
                answer.update(c.request("acquire", product="app", fingerprint=name, wait=15))
                got_at.append(time.monotonic())

        waiter = threading.Thread(target=wait_on)
        waiter.start()
        with psycopg.connect(three.url) as conn:
            wait_for(
                lambda conn=conn: (
                    conn.execute("SELECT count(*) FROM floatd_waiters").fetchone() == (1,)
                ),
                "the acquire to queue",
            )
        gone = held.pop()
        assert holder.request("release", lease=gone["lease"], token=gone["token"])["ok"]
        released = time.monotonic()
        waiter.join(timeout=20)
        assert answer["ok"], answer
        took.append(got_at[0] - released)
        held.append({"lease": answer["lease"], "token": answer["token"]})
        renewed = client(three.nodes[1])
        assert renewed.request("renew", lease=answer["lease"], token=answer["token"])["ok"]
    assert sorted(took)[4] < 0.2, took


def test_a_single_server_moves_to_a_cluster_with_its_leases(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    single_home = tmp_path / "single"
    single_home.mkdir()
    config = write_config(single_home, vendor_key)
    atomic_write(
        single_home / "state" / "entitlement.txt",
        sign_entitlement(
            vendor_key,
            payload(
                products=[
                    product("app", seats=CAP, lease_duration=600),
                    product("cad", authorization="user"),
                ],
                issued_at=int(time.time()) - 60,
            ),
        ),
    )
    ann = floatd_cli(
        "users", "assign", "ann@example.com", "--product", "cad", "--config", str(config)
    )
    assert ann.returncode == 0, ann.stderr
    single = Daemon(config, single_home / "floatd.log")
    try:
        single.start()
        held = client(single).request("acquire", product="app", fingerprint="machine-old")
        assert held["ok"]
        running = floatd_cli("state", "migrate", "--config", str(config), "--to-postgresql", pg_dsn)
        assert running.returncode == 1 and "stop it first" in running.stderr
    finally:
        assert single.terminate() == 0
    url = fresh_database(pg_dsn, "moved")
    moved = floatd_cli("state", "migrate", "--config", str(config), "--to-postgresql", url)
    assert moved.returncode == 0, moved.stderr
    assert "copied 1 leases" in moved.stdout
    again = floatd_cli("state", "migrate", "--config", str(config), "--to-postgresql", url)
    assert again.returncode == 1 and "new one" in again.stderr  # never over a used one
    nodes = Cluster(tmp_path, vendor_key, url, 1)
    try:
        nodes.start()
        node = client(nodes.nodes[0])
        renewed = node.request("renew", lease=held["lease"], token=held["token"])
        assert renewed["ok"], renewed
        key = (single_home / "state" / "server.key").read_bytes()
        assert (tmp_path / "n1" / "state" / "server.key").read_bytes() == key
        trail = floatd_cli("audit", "--config", str(nodes.nodes[0].config), "--json")
        events = [r["event"] for r in json.loads(trail.stdout) if r["lease"] == held["lease"]]
        assert events == ["granted", "renewed"]
        users = floatd_cli("users", "list", "--json", "--config", str(nodes.nodes[0].config))
        assert "ann@example.com" in users.stdout, users.stderr
    finally:
        nodes.close()


def test_a_node_killed_under_load_loses_no_acknowledged_lease(three: Cluster) -> None:
    """Clients acquire through all three nodes while one is killed: every
    acquire that was answered ok renews through the nodes left, and the cap
    was never passed.  (The workers on one node are one machine: their leases
    share a seat, so every acquire is granted.)"""
    acked: list[tuple[int, dict[str, Any]]] = []
    refused: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(node: int) -> None:
        try:
            with SimpleClient("127.0.0.1", three.nodes[node].port, timeout=5) as c:
                c.hello()
                while not stop.is_set():
                    got = c.request("acquire", product="app", fingerprint=f"machine-{node}")
                    with lock:
                        if got["ok"]:
                            acked.append((node, got))
                        else:
                            refused.append(got)
                    time.sleep(0.01)
        except (OSError, ProtocolError):
            return  # its node is gone; what it was answered is in acked

    threads = [threading.Thread(target=hammer, args=(w % 3,)) for w in range(9)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    three.nodes[0].kill9()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert refused == []
    assert sum(1 for node, _ in acked if node == 0) > 10  # the killed node had granted some
    survivor = client(three.nodes[1])
    for _, got in acked:
        renewed = survivor.request("renew", lease=got["lease"], token=got["token"])
        assert renewed["ok"], (got, renewed)
    with psycopg.connect(three.url) as conn:
        row = conn.execute("SELECT count(DISTINCT seat) FROM floatd_leases").fetchone()
    assert row is not None and row[0] <= CAP


def test_the_clock_mark_is_the_clusters(three: Cluster) -> None:
    """The database's clock is watched as a single server watches its own: a
    mark far ahead of it (as a database clock set ahead and put right leaves)
    stops leasing on every node until `floatd clock reset` on any one."""
    with psycopg.connect(three.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE floatd_meta SET value = (extract(epoch FROM now()) + 86400)::text"
            " WHERE key = 'clock_mark'"
        )
    last = client(three.nodes[2])
    wait_for(
        lambda: (
            last.request("acquire", product="app", fingerprint="machine-c1")
            .get("error", {})
            .get("code")
            == "SERVER_TIME_MODIFIED"
        ),
        "the node to read the mark",
    )
    reset = floatd_cli("clock", "reset", "--yes", "--config", str(three.nodes[0].config))
    assert reset.returncode == 0, reset.stderr
    wait_for(  # every node reads the mark at its next heartbeat
        lambda: last.request("acquire", product="app", fingerprint="machine-c2")["ok"],
        "leasing to resume on the other nodes",
    )


def test_license_users_are_the_clusters(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    """A user assigned, and given a password, on one node leases through the
    other; an unassign there ends it everywhere."""
    cad = product("cad", seats=2, authorization="user", max_users=3)
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "users"), 2, extra=[cad])
    try:
        nodes.start()
        first, second = (str(n.config) for n in nodes.nodes)
        ann = "ann@example.com"
        assigned = floatd_cli("users", "assign", ann, "--product", "cad", "--config", first)
        assert assigned.returncode == 0, assigned.stderr
        made = floatd_cli("users", "passwd", ann, "--generate", "--config", first)
        assert made.returncode == 0, made.stderr
        password = made.stdout.strip()
        listed = floatd_cli("users", "list", "--config", second, "--json")
        assert "ann@example.com" in listed.stdout, listed.stdout
        c = client(nodes.nodes[1])
        got = c.request(
            "acquire",
            product="cad",
            fingerprint="machine-ann",
            user="ann@example.com",
            password=password,
        )
        assert got["ok"], got
        wrong = c.request(
            "acquire", product="cad", fingerprint="machine-x", user="ann@example.com", password="no"
        )
        assert wrong["error"]["code"] == "AUTH_FAILED"
        off = floatd_cli("users", "unassign", ann, "--product", "cad", "--config", second)
        assert off.returncode == 0, off.stderr
        ended = client(nodes.nodes[0]).request("renew", lease=got["lease"], token=got["token"])
        assert ended["error"]["code"] == "LEASE_NOT_FOUND"
    finally:
        nodes.close()


def test_an_offline_activation_started_on_one_node_ends_on_another(
    three: Cluster, tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    from floatd.core.entitlement import parse_activation_request

    request = tmp_path / "request.txt"
    first, second, third = (str(n.config) for n in three.nodes)
    made = floatd_cli(
        "activate", "--config", first, "--offline-request", str(request), "--license-key", "K-1"
    )
    assert made.returncode == 0, made.stderr
    asked = parse_activation_request(request.read_text())
    assert asked.server == three.fingerprint  # the cluster's, and its key
    key = (tmp_path / "n1" / "state" / "server.key").read_bytes()
    assert (tmp_path / "n3" / "state" / "server.key").read_bytes() == key
    response = tmp_path / "response.txt"
    response.write_text(
        sign_entitlement(
            vendor_key,
            payload(
                products=[product("app", seats=CAP + 3)],
                server=three.fingerprint,
                server_key=asked.server_key,
                nodes=3,
                nonce=asked.nonce,
                issued_at=int(time.time()) - 30,
            ),
        )
    )
    done = floatd_cli("activate", "--config", second, "--offline-response", str(response))
    assert done.returncode == 0, done.stderr
    again = floatd_cli("activate", "--config", third, "--offline-response", str(response))
    assert again.returncode != 0 and "no pending request" in again.stderr  # used once
    wait_for(
        lambda: [p["seats"] for p in status(three.nodes[2])["products"]] == [CAP + 3],
        "every node to serve with it",
    )


def test_the_clusters_audit_trail_is_kept_for_its_retention(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "retention"), 1)
    with psycopg.connect(nodes.url, autocommit=True) as conn:
        for age_days in (400, 1):  # [audit] retention_days is 90 by default
            conn.execute(
                "INSERT INTO floatd_audit (ts, event, product, node)"
                " VALUES (extract(epoch FROM now()) - %s, 'granted', 'app', 'old')",
                (age_days * 86400,),
            )
        try:
            nodes.start()
            count = "SELECT count(*) FROM floatd_audit WHERE node = 'old'"
            wait_for(lambda: conn.execute(count).fetchone() == (1,), "the old record to go")
        finally:
            nodes.close()


def test_a_waiter_cleared_by_the_others_hears_at_once(three: Cluster) -> None:
    """If the other nodes cleared a node's queued acquire (they took the node
    for gone: it stalled past the heartbeat's staleness), its client hears
    that no seat came at the node's next heartbeat, not at the end of its wait."""
    holder = client(three.nodes[0])
    for n in range(CAP):
        assert holder.request("acquire", product="app", fingerprint=f"machine-s{n}")["ok"]
    answer: dict[str, Any] = {}

    def wait_on() -> None:
        with SimpleClient("127.0.0.1", three.nodes[1].port, timeout=40) as c:
            c.hello()
            answer.update(c.request("acquire", product="app", fingerprint="machine-w", wait=30))

    waiter = threading.Thread(target=wait_on)
    waiter.start()
    with psycopg.connect(three.url, autocommit=True) as conn:
        queued = "SELECT count(*) FROM floatd_waiters"
        wait_for(lambda: conn.execute(queued).fetchone() == (1,), "the acquire to queue")
        conn.execute("DELETE FROM floatd_waiters")  # what forget_node does
    cleared = time.monotonic()
    waiter.join(timeout=35)
    assert answer["error"]["code"] == "NO_FREE_SEATS"
    assert time.monotonic() - cleared < 10


def test_a_nodes_stepped_clock_changes_nothing(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, pg_dsn: str
) -> None:
    """A node's wall clock set a day back, then a day ahead: leases run by the
    database's clock, so they keep their time, and nothing is refused as a
    clock turned back."""
    nodes = Cluster(tmp_path, vendor_key, fresh_database(pg_dsn, "stepped"), 1)
    node = nodes.nodes[0]
    offset = tmp_path / "clock.offset"
    offset.write_text("0")
    try:
        node.start(env={"FLOATD_TEST_CLOCK_OFFSET": str(offset)})
        c = client(node)
        held = c.request("acquire", product="app", fingerprint="machine-a")
        assert held["ok"] and held["expires_in"] == pytest.approx(60, abs=1)
        for steps, step in enumerate(("-86400", "86400"), start=1):
            offset.write_text(step)
            wait_for(
                lambda steps=steps: (
                    sum(e.get("event") == "clock_stepped" for e in node.events()) == steps
                ),
                "the step",
            )
            renewed = c.request("renew", lease=held["lease"], token=held["token"])
            assert renewed["ok"] and renewed["expires_in"] == pytest.approx(60, abs=1), renewed
            got = c.request("acquire", product="app", fingerprint=f"machine{step}")
            assert got["ok"], got
            assert c.request("info", product="app")["ok"]  # answered by the node itself
            assert node.http("/healthz")[0] == 200
    finally:
        nodes.close()
