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
@click.option(
    "--read-only", is_flag=True, help="The key may only read (GET); changes get 403 FORBIDDEN."
)
@pass_ctx
@guarded
def api_keys_create(ctx: Ctx, name: str, read_only: bool) -> None:
    """Make a key and print it (shown this once, stored only as a hash)."""
    key = ctx.authority().create_api_key(name, "read" if read_only else "all")
    click.echo(key)
    kind = "read-only API key" if read_only else "API key"
    click.echo(f"{kind} {name!r} made; the key above is shown only now", err=True)


@api_keys.command("list")
@json_option
@pass_ctx
@guarded
def api_keys_list(ctx: Ctx, as_json: bool) -> None:
    """The keys' names (never the keys)."""
    rows = ctx.authority().store.api_keys()
    if as_json:
        echo_json(
            [{"name": n, "created_at": iso(c), "revoked": r, "rights": g} for n, c, r, g in rows]
        )
        return
    if not rows:
        click.echo("no API keys")
        return
    click.echo(
        table(
            ["NAME", "RIGHTS", "CREATED", "STATE"],
            [[n, g, iso(c), "revoked" if r else "active"] for n, c, r, g in rows],
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
