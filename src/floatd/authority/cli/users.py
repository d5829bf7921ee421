"""floatd-authority: License users at the authority: assign, unassign."""

from __future__ import annotations

import click

from floatd.authority.cli.base import Ctx, guarded, main, pass_ctx
from floatd.cli import plural

# --- users ----------------------------------------------------------------------------


@main.group()
def users() -> None:
    """License users of user-authorized products (placed in the entitlement)."""


@users.command("assign")
@click.argument("license_id")
@click.argument("email")
@pass_ctx
@guarded
def users_assign(ctx: Ctx, license_id: str, email: str) -> None:
    """Assign a user (within the license's max users)."""
    lic = ctx.authority().assign_user(license_id, email)
    click.echo(f"{email} assigned to {lic.id} ({plural(len(lic.users), 'user')})")


@users.command("unassign")
@click.argument("license_id")
@click.argument("email")
@pass_ctx
@guarded
def users_unassign(ctx: Ctx, license_id: str, email: str) -> None:
    """Remove an assigned user."""
    lic = ctx.authority().unassign_user(license_id, email)
    click.echo(f"{email} removed from {lic.id} ({plural(len(lic.users), 'user')})")
