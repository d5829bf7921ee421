"""``floatd cluster init`` and ``floatd nodes``: the shared PostgreSQL
database of several nodes.

``cluster init`` sets the database up and tells the cluster fingerprint (also
``floatd fingerprint`` on a node whose backend is PostgreSQL), which is what
the vendor binds a cluster's entitlement to.  ``nodes`` reads the registry
straight from the database, so it works with every daemon down too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from floatd.cli.base import _load, config_option, guarded, main, table
from floatd.config import Config, read_dsn
from floatd.errors import ConfigError


@main.group("cluster")
def cluster_group() -> None:
    """Several nodes sharing one PostgreSQL database."""


def cluster_fingerprint(config: Config, *, create: bool = False) -> str:
    """The cluster fingerprint; with ``create``, set the database up first."""
    from floatd.store import cluster

    if config.state_backend != "postgresql":
        raise ConfigError("state.backend", 'is not "postgresql": this server is no cluster')
    conn = cluster.connect(read_dsn(config))
    with contextlib.closing(conn):
        if create:
            cluster.init(conn)
        return cluster.fingerprint(conn)


@cluster_group.command("init")
@config_option
@guarded
def cluster_init(config_path: Path | None) -> None:
    """Create (or migrate) the cluster's schema and, once, its id; prints the
    cluster fingerprint, which the vendor binds the entitlement to."""
    fingerprint = cluster_fingerprint(_load(config_path), create=True)
    click.echo(f"cluster ready; fingerprint {fingerprint}")


@main.command("nodes")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def nodes_command(config_path: Path | None, as_json: bool) -> None:
    """The cluster's nodes: addresses, version, last heartbeat, connections,
    and whether each serves (a fresh heartbeat and a slot under the limit)."""
    from floatd.store import cluster, pg_nodes

    config = _load(config_path)
    if config.state_backend != "postgresql":
        raise ConfigError("state.backend", 'is not "postgresql": this server is no cluster')
    conn = cluster.connect(read_dsn(config))
    with contextlib.closing(conn):
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        now = float(str(row[0])) if row is not None else 0.0
        rows = [node.as_dict(now) for node in pg_nodes.nodes(conn)]
    if as_json:
        click.echo(json.dumps({"nodes": rows}, indent=2))
        return
    headers = ["NODE", "ADDRESSES", "VERSION", "HEARTBEAT", "CONNECTIONS", "SERVING"]
    click.echo(
        table(
            headers,
            [
                [
                    r["name"],
                    ",".join(r["addresses"]),
                    r["version"],
                    f"{r['heartbeat_age']:.1f}s ago",
                    r["connections"],
                    "yes" if r["serving"] else "no",
                ]
                for r in rows
            ],
        )
    )
