"""floatd-authority: keys of the management API (``/v1/admin/...``)."""

from __future__ import annotations

import click

from floatd.authority.cli.base import Ctx, echo_json, guarded, json_option, main, pass_ctx
from floatd.cli.base import table
from floatd.store.audit import iso


@main.group("api-keys")
def api_keys() -> None:
    """Keys of the management API; what a key changes is recorded under its name."""


@api_keys.command("create")
@click.argument("name")
@pass_ctx
@guarded
def api_keys_create(ctx: Ctx, name: str) -> None:
    """Make a key and print it (shown this once, stored only as a hash)."""
    key = ctx.authority().create_api_key(name)
    click.echo(key)
    click.echo(f"API key {name!r} made; the key above is shown only now", err=True)


@api_keys.command("list")
@json_option
@pass_ctx
@guarded
def api_keys_list(ctx: Ctx, as_json: bool) -> None:
    """The keys' names (never the keys)."""
    rows = ctx.authority().store.api_keys()
    if as_json:
        echo_json([{"name": n, "created_at": iso(c), "revoked": r} for n, c, r in rows])
        return
    if not rows:
        click.echo("no API keys")
        return
    click.echo(
        table(
            ["NAME", "CREATED", "STATE"],
            [[n, iso(c), "revoked" if r else "active"] for n, c, r in rows],
        )
    )


@api_keys.command("revoke")
@click.argument("name")
@pass_ctx
@guarded
def api_keys_revoke(ctx: Ctx, name: str) -> None:
    """Revoke a key: its next request gets 401."""
    ctx.authority().revoke_api_key(name)
    click.echo(f"API key {name!r} revoked")
