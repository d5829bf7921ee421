"""Activating this server: online, or offline with request and response files;
giving an online activation back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import trio

from floatd.cli.base import (
    _fail,
    _load,
    _server_id,
    config_option,
    guarded,
    main,
)
from floatd.errors import ConfigError


@main.command()
@config_option
@click.option("--license-key", help="The license key sold to you.")
@click.option(
    "--offline-request",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Write an activation request to carry to the vendor.",
)
@click.option(
    "--offline-response",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Install the entitlement the vendor signed for a request.",
)
@guarded
def activate(
    config_path: Path | None,
    license_key: str | None,
    offline_request: Path | None,
    offline_response: Path | None,
) -> None:
    """Activate this server, offline (request/response files) or online."""
    from floatd.store import activation

    if offline_request and offline_response:
        raise click.UsageError("give --offline-request or --offline-response, not both")
    config = _load(config_path)
    now = time.time()
    if offline_response:
        try:
            text = activation.read_armored(offline_response)
        except OSError as exc:
            _fail(f"cannot read {offline_response}: {exc.strerror}", 1)
        ent = activation.install_offline_response(config, _server_id(config), text, now)
        _supersede_online(config)
        click.echo(
            f"installed entitlement {ent.id} for license {ent.license}: {_products_line(ent)}"
        )
        return
    key = license_key or config.authority_license_key
    if offline_request:
        if not key:
            raise click.UsageError(
                "an offline request needs --license-key (or [authority] license_key)"
            )
        text = activation.create_offline_request(config, _server_id(config), key, now)
        activation.atomic_write(offline_request, text)
        click.echo(
            f"wrote {offline_request}: send it to your vendor, then run "
            f"`floatd activate --offline-response FILE` with their answer"
        )
        return
    if not key:
        raise click.UsageError(
            "give --license-key (or set [authority] license_key), or use the --offline-* options"
        )
    if not config.authority_url:
        raise ConfigError("authority.url", "is empty: set it to activate online")
    from floatd.daemon import online

    record, ent, replaced = trio.run(online.activate, config, _server_id(config), key, now)
    click.echo(
        f"activated online: activation {record.activation_id}, entitlement {ent.id} "
        f"for license {ent.license}: {_products_line(ent)}; refresh due by "
        f"{_iso(ent.refresh_by)}"
    )
    if replaced is not None:
        click.echo(
            f"replaced activation {replaced.activation_id} of license {replaced.license}, "
            "given back to the authority"
        )


@main.command()
@config_option
@guarded
def deactivate(config_path: Path | None) -> None:
    """Give the online activation back to the authority; this server stops leasing."""
    from floatd.daemon import online

    config = _load(config_path)
    record = trio.run(online.deactivate, config, _server_id(config))
    click.echo(f"deactivated: activation {record.activation_id} is free for another server")


def _supersede_online(config: Any) -> None:
    """An offline response installed over an online activation: that one must
    not be refreshed any more (its next refresh would put its own entitlement
    back over this one)."""
    import dataclasses

    from floatd.daemon.online import ActivationRecord

    record = ActivationRecord.read(config)
    if record is None or not record.in_force:
        return
    dataclasses.replace(record, superseded=True).write(config)
    click.echo(
        f"the online activation {record.activation_id} (license {record.license}) is no longer "
        "refreshed; `floatd deactivate` gives it back to the authority, once reachable",
        err=True,
    )


def _iso(ts: float | None) -> str:
    from floatd.store.audit import iso

    return iso(ts) or "never"


def _products_line(ent: Any) -> str:
    return ", ".join(f"{p.code} ({p.seats if p.seats > 0 else 'unlimited'})" for p in ent.products)
