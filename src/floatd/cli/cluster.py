"""``floatd cluster``: the shared PostgreSQL database of several nodes.

For now it sets the database up (``cluster init``) and tells the cluster
fingerprint (also ``floatd fingerprint`` on a node whose backend is
PostgreSQL), which is what the vendor binds a cluster's entitlement to.
Serving from the database is not built yet (``floatd serve`` refuses the
``postgresql`` backend with exit 2).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from floatd.cli.base import _load, config_option, guarded, main
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
