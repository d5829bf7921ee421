"""floatd-authority: license managers, the customer's people who assign users."""

from __future__ import annotations

import click

from floatd.authority.cli.base import Ctx, echo_json, guarded, json_option, main, pass_ctx
from floatd.authority.managers import ENROL_TTL, Managers
from floatd.cli.base import table


@main.group()
def managers() -> None:
    """License managers, who assign the users of their orders' licenses.

    Each order may name one; they work through the API (/v1/manager/...) or the
    portal (/portal/) on the authority's address."""


def _hand_over(email: str, token: str) -> None:
    click.echo(token)
    click.echo(
        f"enrolment token for {email} above, shown only now and good for "
        f"{int(ENROL_TTL // 86400)} days: they open /portal/enrol?token=<token> on the "
        "authority's address (or POST it to /v1/manager/enrol) to set their password",
        err=True,
    )


@managers.command("appoint")
@click.argument("order_id")
@click.argument("email")
@pass_ctx
@guarded
def managers_appoint(ctx: Ctx, order_id: str, email: str) -> None:
    """Name EMAIL the license manager of ORDER_ID (replacing any other); prints an
    enrolment token if the account has no password yet."""
    token = Managers(ctx.authority()).appoint(order_id, email)
    if token is None:
        click.echo(f"{email} manages order {order_id} (already enrolled: no token needed)")
        return
    _hand_over(email, token)


@managers.command("dismiss")
@click.argument("order_id")
@pass_ctx
@guarded
def managers_dismiss(ctx: Ctx, order_id: str) -> None:
    """ORDER_ID has no license manager any more."""
    Managers(ctx.authority()).dismiss(order_id)
    click.echo(f"order {order_id} has no license manager now")


@managers.command("reset")
@click.argument("email")
@pass_ctx
@guarded
def managers_reset(ctx: Ctx, email: str) -> None:
    """A new enrolment token for EMAIL (a forgotten password): the old password
    and every open session end now."""
    _hand_over(email, Managers(ctx.authority()).reset(email))


@managers.command("list")
@json_option
@pass_ctx
@guarded
def managers_list(ctx: Ctx, as_json: bool) -> None:
    """License managers, whether they have set a password, and their orders."""
    found = Managers(ctx.authority()).all()
    if as_json:
        echo_json([m.__dict__ for m in found])
        return
    if not found:
        click.echo("no license managers")
        return
    click.echo(
        table(
            ["E-MAIL", "ENROLLED", "ORDERS"],
            [[m.email, "yes" if m.enrolled else "no", ", ".join(m.orders) or "-"] for m in found],
        )
    )
