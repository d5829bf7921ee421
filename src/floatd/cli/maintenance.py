"""The state dir: starting over when the state is lost and there is no backup."""

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
