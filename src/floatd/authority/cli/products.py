"""floatd-authority: Products: add, list."""

from __future__ import annotations

import click

from floatd.authority.cli.base import Ctx, echo_json, guarded, json_option, main, pass_ctx
from floatd.authority.documents import product_doc
from floatd.authority.store import Product
from floatd.cli.base import table

# --- products -----------------------------------------------------------------------


@main.group()
def product() -> None:
    """Products the vendor sells."""


@product.command("add")
@click.argument("code")
@click.option("--name", required=True, help="The product's display name.")
@click.option(
    "--authorization",
    type=click.Choice(["key", "user"]),
    default="key",
    show_default=True,
    help="key: any permitted client may lease; user: license users with a password.",
)
@click.option(
    "--lease-duration",
    type=click.IntRange(min=0),
    default=900,
    show_default=True,
    help="The floating timeout, seconds (0: the server's default).",
)
@click.option(
    "--strategy",
    type=click.Choice(["per-machine", "per-instance"]),
    default="per-machine",
    help="Seats per machine, or per process instance.",
)
@click.option(
    "--trial-days",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Days a trial license of this product lasts (0: no trial length).",
)
@json_option
@pass_ctx
@guarded
def product_add(
    ctx: Ctx,
    code: str,
    name: str,
    authorization: str,
    lease_duration: int,
    strategy: str,
    trial_days: int,
    as_json: bool,
) -> None:
    """Add a product."""
    if not 1 <= len(code) <= 128:
        raise click.BadParameter("1..128 characters", param_hint="CODE")
    p = ctx.authority(create=True).add_product(
        Product(code, name, authorization, lease_duration, strategy, trial_days)
    )
    echo_json(product_doc(p)) if as_json else click.echo(f"added product {p.code}")


@product.command("list")
@json_option
@pass_ctx
@guarded
def product_list(ctx: Ctx, as_json: bool) -> None:
    """List products."""
    products = ctx.authority().store.products()
    if as_json:
        echo_json([product_doc(p) for p in products])
        return
    if not products:
        click.echo("no products")
        return
    click.echo(
        table(
            ["CODE", "NAME", "AUTHORIZATION", "LEASE", "STRATEGY", "TRIAL"],
            [
                [
                    p.code,
                    p.name,
                    p.authorization,
                    f"{p.lease_duration}s",
                    p.strategy,
                    f"{p.trial_days}d" if p.trial_days else None,
                ]
                for p in products
            ],
        )
    )
