"""Commands that talk to the running daemon over its admin socket: status,
leases, revoke, reload, clock reset."""

from __future__ import annotations

from pathlib import Path

import click

from floatd.cli.base import (
    _admin,
    _age,
    _ask,
    _echo_json,
    _fail,
    _load,
    config_option,
    guarded,
    json_option,
    main,
    plural,
    table,
)


@main.command()
@config_option
@json_option
@guarded
def status(config_path: Path | None, as_json: bool) -> None:
    """Activation state and per-product seats in use."""
    from floatd.store.audit import iso

    doc = _ask(config_path, "status")
    if as_json:
        _echo_json(doc)
        return
    act = doc["activation"]
    click.echo(f"floatd {doc['version']}, up {_age(doc['uptime'])}, server {doc['server_id']}")
    line = f"activation: {act['state']} ({act['mode']})"
    if act["entitlement_id"]:
        line += f", entitlement {act['entitlement_id']}, license {act['license']}"
        line += f", ends {iso(act['not_after']) or 'never'}"
    click.echo(line)
    if act.get("refresh_problem"):
        click.echo(f"last refresh failed: {act['refresh_problem']}")
    state = doc.get("state") or {}
    if state.get("writable") is False:
        click.echo(
            f"state: UNAVAILABLE since {iso(state.get('unavailable_since'))}"
            f" ({state.get('reason')}); writes are refused until it recovers"
        )
    click.echo(f"connections: {doc['connections']}, leases: {doc['leases']}")
    products = doc["products"]
    if products:
        click.echo()
        click.echo(
            table(
                [
                    *("PRODUCT", "SEATS", "USED", "FREE", "WAITING", "STRATEGY", "LEASE"),
                    *("ENDS", "BORROWED"),
                ],
                [
                    [
                        f"{p['code']} (trial)" if p.get("trial") else p["code"],
                        p["seats"] if p["seats"] > 0 else "unlimited",
                        p["used"],
                        p["free"],
                        p["waiting"],
                        p["strategy"],
                        f"{p['lease_duration']}s",
                        iso(p["not_after"]),
                        p.get("borrowed", 0),
                    ]
                    for p in products
                ],
            )
        )
    for p in products:
        for r in p.get("reserved") or ():
            click.echo(
                f"{p['code']}: {r['seats']} reserved for {', '.join(r['for'])}"
                f" (rule {r['rule']}): {r['held']} held, {r['free']} kept free"
            )
    policy = doc.get("policy") or {}
    if policy.get("file"):
        click.echo(f"policy: {policy['file']} ({plural(policy['rules'], 'rule')})")


@main.command()
@config_option
@click.option("--product", help="Only this product's leases.")
@json_option
@guarded
def leases(config_path: Path | None, product: str | None, as_json: bool) -> None:
    """The leases held now (never their tokens)."""
    with _admin(_load(config_path)) as admin:
        rows = admin.leases(product)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no leases" + (f" of {product}" if product else ""))
        return
    columns = ["id", "product", "fingerprint", "instance", "user", "hostname", "address"]
    click.echo(
        table(
            [c.upper() for c in columns] + ["GRANTED", "EXPIRES", "BORROWED UNTIL"],
            [
                [row[c] for c in columns]
                + [row["granted"], row["expires"], row.get("borrowed_until") or ""]
                for row in rows
            ],
        )
    )


# A lease id may begin with "-" (ids issued before they were kept from doing
# so); it is still the argument, not an unknown option.
@main.command(context_settings={"ignore_unknown_options": True})
@config_option
@click.argument("lease")
@json_option
@guarded
def revoke(config_path: Path | None, lease: str, as_json: bool) -> None:
    """End one lease now; its seat is free at once, and its holder hears
    LEASE_NOT_FOUND on its next renew."""
    row = _ask(config_path, "revoke", lease=lease)["lease"]
    if as_json:
        _echo_json(row)
        return
    who = ", ".join(
        f"{k} {row[k]}" for k in ("fingerprint", "user", "hostname", "address") if row[k]
    )
    click.echo(f"revoked lease {row['id']} of {row['product']} ({who}); its seat is free")


@main.command()
@config_option
@json_option
@guarded
def reload(config_path: Path | None, as_json: bool) -> None:
    """Re-read the config and the entitlement without dropping a lease (as SIGHUP)."""
    result = _ask(config_path, "reload")
    if as_json:
        _echo_json(result)
    else:
        applied = ", ".join(result["applied"]) or "nothing changed"
        click.echo(f"reloaded: {applied}")
        if result["restart_needed"]:
            click.echo(
                "changed but needs a restart to apply: " + ", ".join(result["restart_needed"])
            )
        click.echo(f"entitlement: {result['entitlement'] or 'none'} ({result['activation']})")
        policy = result.get("policy") or {}
        if policy.get("file"):
            click.echo(f"policy: {policy['file']} ({plural(policy['rules'], 'rule')})")
            for code in policy.get("unknown_products") or ():
                click.echo(f"warning: the entitlement has no product {code!r}", err=True)
    if result["entitlement_rejected"]:
        _fail(f"the entitlement file was rejected: {result['entitlement_rejected']}", 1)


@main.group("clock")
def clock_group() -> None:
    """The server's clock guard (SERVER_TIME_MODIFIED)."""


@clock_group.command("reset")
@config_option
@click.option("--yes", is_flag=True, help="Confirm: the clock has been checked and is right.")
@json_option
@guarded
def clock_reset(config_path: Path | None, yes: bool, as_json: bool) -> None:
    """Forget the latest time the server has seen, once its clock is right again.

    floatd refuses leasing while the clock reads earlier than a time it has
    already seen (it may have been turned back to stretch a license).  After a
    clock that was set far ahead is put right, that refusal would last until
    real time caught up: check the clock (timedatectl), then run this.  The
    running daemon takes it at once; it is audited (clock_reset) and logged."""
    if not yes:
        raise click.UsageError("check the server's clock first, then add --yes")
    result = _ask(config_path, "clock_reset")
    if as_json:
        _echo_json(result)
        return
    from floatd.store.audit import iso

    click.echo(
        f"clock mark reset from {iso(result['old_mark'])} to {iso(result['new_mark'])};"
        f" {plural(result['leases_clamped'], 'lease')} dated by the wrong clock now end sooner"
    )
