"""floatd-authority: Activations (list, revoke) and offline signing of activation requests."""

from __future__ import annotations

import time
from pathlib import Path

import click

from floatd.authority.cli.base import (
    Ctx,
    echo_json,
    guarded,
    json_option,
    key_option,
    load_key,
    main,
    pass_ctx,
)
from floatd.authority.documents import activation_doc
from floatd.cli.base import table
from floatd.store.activation import read_armored

# --- activations ------------------------------------------------------------------------


@main.group()
def activations() -> None:
    """Which servers hold which license."""


ACTIVATION_COLUMNS = ("id", "license", "server", "hostname", "mode", "state", "refreshed_at")


@activations.command("list")
@click.option("--license", "license_id", help="Only activations of this license.")
@json_option
@pass_ctx
@guarded
def activations_list(ctx: Ctx, license_id: str | None, as_json: bool) -> None:
    """List activations (FROM: the addresses of their recent refreshes)."""
    a = ctx.authority()
    rows = [activation_doc(a, x) for x in a.store.activations(license_id)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no activations")
        return
    click.echo(
        table(
            ["ID", "LICENSE", "SERVER", "HOSTNAME", "MODE", "STATE", "REFRESHED", "FROM"],
            [[*(r[k] for k in ACTIVATION_COLUMNS), _seen_from(r["addresses"])] for r in rows],
        )
    )


def _seen_from(addresses: list[str]) -> str | None:
    if len(addresses) > 1:
        return f"{', '.join(addresses)} (several servers: a clone?)"
    return addresses[0] if addresses else None


@activations.command("revoke")
@click.argument("activation_id")
@pass_ctx
@guarded
def activations_revoke(ctx: Ctx, activation_id: str) -> None:
    """Revoke an activation: its next refresh gets 410 and the server stops leasing."""
    ctx.authority().revoke_activation(activation_id)
    click.echo(f"activation {activation_id} revoked")


# --- offline ------------------------------------------------------------------------------


@main.group()
def offline() -> None:
    """Air-gapped sites: sign activation request files."""


@offline.command("sign")
@click.argument("request", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the signed entitlement.",
)
@key_option
@pass_ctx
@guarded
def offline_sign(ctx: Ctx, request: Path, out: Path, key_path: Path) -> None:
    """Sign an entitlement answering REQUEST (from `floatd activate --offline-request`)."""
    text = read_armored(request)
    activation_id, entitlement = ctx.authority(load_key(key_path)).sign_offline(text, time.time())
    out.write_text(entitlement, encoding="utf-8")
    click.echo(f"wrote {out} (activation {activation_id}); carry it to the server", err=True)
