"""The state dir: starting over when the state is lost and there is no backup,
and moving a single server's state into a cluster database."""

from __future__ import annotations

from pathlib import Path

import click

from floatd.cli.base import (
    _fail,
    _load,
    config_option,
    guarded,
    main,
)
from floatd.errors import ConfigError

# --- the state dir ----------------------------------------------------------------------


@main.group("state")
def state_group() -> None:
    """The state dir (what to do when floatd refuses to start on it)."""


@state_group.command("reset")
@config_option
@click.option("--yes", is_flag=True, help="Confirm: every lease the state held is forgotten.")
@guarded
def state_reset(config_path: Path | None, yes: bool) -> None:
    """Start over with an empty state database, when the old one is lost or
    damaged and there is no backup: its files are moved aside, not deleted.

    Clients holding leases from before must acquire again; until their old
    leases would have expired, more seats may be in use than floatd counts."""
    import fcntl

    from floatd.store.identity import StateIdentity
    from floatd.store.writer import lock_path

    if not yes:
        raise click.UsageError("this forgets every lease in the state: add --yes to go ahead")
    config = _load(config_path)
    database = config.database_path
    try:
        with open(lock_path(database), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            moved = StateIdentity(database).reset()
    except BlockingIOError:
        _fail("floatd is running on this state dir: stop it first", 1)
    for path in moved:
        click.echo(f"moved aside: {path}")
    click.echo(f"the state in {config.state_dir} starts empty at the next start")


@state_group.command("migrate")
@config_option
@click.option(
    "--to-postgresql",
    "dsn",
    required=True,
    metavar="DSN",
    help="The new cluster database (a libpq connection string or URI).",
)
@guarded
def state_migrate(config_path: Path | None, dsn: str) -> None:
    """Move this single server to a cluster: copy its leases, its audit trail,
    its license users and its server key into a new cluster database, with
    floatd stopped.

    Held leases go on being renewed, with the same ids and tokens, through any
    node.  The cluster has its own fingerprint, so it needs an entitlement
    issued for it (online activation gets one by itself); then set
    [state] backend = "postgresql" and the dsn in each node's config."""
    import fcntl

    from floatd.store import cluster
    from floatd.store.migrate import copy_state
    from floatd.store.writer import lock_path

    config = _load(config_path)
    if config.state_backend == "postgresql":
        raise ConfigError("state.backend", 'is already "postgresql": nothing to migrate')
    try:
        with open(lock_path(config.database_path), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            conn = cluster.connect(dsn)
            try:
                leases, records = copy_state(config, conn)
                fingerprint = cluster.fingerprint(conn)
            finally:
                conn.close()
    except BlockingIOError:
        _fail("floatd is running on this state dir: stop it first", 1)
    click.echo(f"copied {leases} leases and {records} audit records into the cluster database")
    click.echo(
        f"cluster fingerprint {fingerprint}: get an entitlement for it, then set"
        ' [state] backend = "postgresql" and dsn on every node'
    )
