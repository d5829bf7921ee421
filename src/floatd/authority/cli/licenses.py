"""floatd-authority: Licenses: issue, list, show, update, suspend, reinstate, revoke."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import click

from floatd.authority.cli.base import (
    Ctx,
    echo_json,
    guarded,
    json_option,
    main,
    pass_ctx,
)
from floatd.authority.documents import activation_doc, license_doc
from floatd.authority.store import Terms
from floatd.authority.terms import BadTerms, check_duration
from floatd.cli.base import table
from floatd.store.audit import iso, parse_when

# --- licenses -----------------------------------------------------------------------


def _when_option(text: str | None, option: str) -> int | None:
    """A license date: ISO, or a span from now (``30d``: thirty days ahead)."""
    if text is None:
        return None
    try:
        return int(parse_when(text, time.time(), ahead=True))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Terms the authority refuses are the command line's fault: exit 2,
    naming the option."""
    try:
        yield
    except BadTerms as exc:
        raise click.BadParameter(exc.message, param_hint=exc.option) from None


def _pairs(items: tuple[str, ...], option: str, typed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=option)
        out[name] = _typed(value) if typed else value
    return out


def _typed(value: str) -> bool | int | str:
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        return value


def _grace(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        from floatd.authority.terms import add_duration

        return add_duration(0, check_duration(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grace") from None


@main.group("license")
def license_group() -> None:
    """Licenses sold under orders."""


@license_group.command("issue")
@click.option("--order", "order_id", required=True, help="Order id (created if new).")
@click.option("--order-ref", help="The order's reference (e.g. a PO number).")
@click.option("--customer", help="The customer's name, shown to the site.")
@click.option("--product", "products", multiple=True, required=True, help="Repeatable.")
@click.option(
    "--seats", type=int, required=True, help="allowedFloatingClients; 0 or -1: unlimited."
)
@click.option("--lease-duration", type=click.IntRange(min=0), help="Default: the product's.")
@click.option(
    "--strategy",
    type=click.Choice(["per-machine", "per-instance"]),
    help="Overrides the product's leasing strategy.",
)
@click.option("--user-locked", is_flag=True, help="Seats are also keyed by the OS user.")
@click.option("--allowed-ip", "allowed_ips", multiple=True, help="CIDR; repeatable.")
@click.option(
    "--allowed-activations",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many servers may activate this license.",
)
@click.option("--interval", help="Subscription interval, ISO 8601 (P1M, P1Y).")
@click.option("--expires", help="Explicit expiry: a date, or a span from now (30d, 12h).")
@click.option("--effective", help="Effective date (no lease before it): a date, or 7d from now.")
@click.option(
    "--trial", is_flag=True, help="A trial license (ends after the product's trial days)."
)
@click.option("--grace", default="P7D", show_default=True, help="Seconds or ISO 8601 duration.")
@click.option(
    "--borrow-max",
    type=click.IntRange(min=0),
    default=0,
    help="Seconds a seat may be borrowed offline (0: no borrowing).",
)
@click.option(
    "--max-users",
    type=click.IntRange(min=0),
    default=0,
    help="License users that may be assigned in all (0: no cap).",
)
@click.option("--meta", multiple=True, help="NAME=VALUE custom license value; repeatable.")
@click.option("--feature", multiple=True, help="NAME=VALUE (true/false/int/str); repeatable.")
@json_option
@pass_ctx
@guarded
def license_issue(
    ctx: Ctx,
    order_id: str,
    order_ref: str | None,
    customer: str | None,
    products: tuple[str, ...],
    seats: int,
    lease_duration: int | None,
    strategy: str | None,
    user_locked: bool,
    allowed_ips: tuple[str, ...],
    allowed_activations: int,
    interval: str | None,
    expires: str | None,
    effective: str | None,
    trial: bool,
    grace: str,
    borrow_max: int,
    max_users: int,
    meta: tuple[str, ...],
    feature: tuple[str, ...],
    as_json: bool,
) -> None:
    """Issue a license and print its key (shown this once, stored only as a hash)."""
    terms = Terms(
        products=list(products),
        seats=seats,
        lease_duration=lease_duration,
        strategy=strategy,
        user_locked=user_locked,
        allowed_ips=list(allowed_ips),
        allowed_activations=allowed_activations,
        interval=interval,
        expires_at=_when_option(expires, "--expires"),
        effective_at=_when_option(effective, "--effective"),
        trial=trial,
        grace_seconds=_grace(grace),
        borrow_max=borrow_max,
        max_users=max_users,
        metadata=_pairs(meta, "--meta", typed=False),
        features=_pairs(feature, "--feature", typed=True),
    )
    authority = ctx.authority()
    with _usage_errors():
        lic, key = authority.issue_license(
            order_id, terms, time.time(), order_reference=order_ref, customer=customer
        )
    if as_json:
        echo_json({**license_doc(authority, lic), "license_key": key})
        return
    click.echo(key)
    click.echo(
        f"issued license {lic.id} under order {order_id}; the key above is shown only now",
        err=True,
    )


@license_group.command("list")
@click.option("--order", "order_id", help="Only licenses of this order.")
@json_option
@pass_ctx
@guarded
def license_list(ctx: Ctx, order_id: str | None, as_json: bool) -> None:
    """List licenses (never their keys)."""
    a = ctx.authority()
    rows = [license_doc(a, lic) for lic in a.store.licenses(order_id)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no licenses")
        return
    click.echo(
        table(
            ["ID", "ORDER", "STATE", "PRODUCTS", "SEATS", "ACTIVATIONS", "EXPIRES"],
            [
                [
                    r["id"],
                    r["order"],
                    r["state"],
                    ",".join(r["products"]),
                    r["seats"] if r["seats"] > 0 else "unlimited",
                    f"{r['activations']}/{r['allowed_activations']}",
                    r["expires"] or "never",
                ]
                for r in rows
            ],
        )
    )


@license_group.command("show")
@click.argument("license_id")
@json_option
@pass_ctx
@guarded
def license_show(ctx: Ctx, license_id: str, as_json: bool) -> None:
    """One license with its terms, users and activations."""
    a = ctx.authority()
    doc = license_doc(a, a.get_license(license_id))
    doc["activation_list"] = [activation_doc(a, x) for x in a.store.activations(license_id)]
    if as_json:
        echo_json(doc)
        return
    for name, value in doc.items():
        click.echo(f"{name}: {_shown(name, value)}")


def _shown(name: str, value: Any) -> str:
    """One value of `license show` as people read it: dates in ISO like the
    rest, lists and maps as plain text, not Python's reprs."""
    if value is None:
        return "-"
    if name.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
        return iso(value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and isinstance(value[0], dict):  # the activations
            return (
                "".join(
                    f"\n  {a['id']} {a['state']} {a['mode']} server {a['server']}"
                    f" ({a['hostname'] or '-'}), since {a['created_at']}"
                    for a in value
                )
                or "none"
            )
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "none"
    return str(value)


@license_group.command("update")
@click.argument("license_id")
@click.option("--seats", type=int, help="New seat count; 0 or -1: unlimited.")
@click.option(
    "--product", "products", multiple=True, help="Repeatable; given, replaces the products."
)
@click.option("--expires", help="New expiry: a date, a span from now (30d), or 'never'.")
@click.option("--effective", help="New effective date: a date, a span from now, or 'none'.")
@click.option("--interval", help="New subscription interval (P1M, P1Y), or 'none'.")
@click.option("--extend", is_flag=True, help="Add one subscription interval to the expiry.")
@click.option(
    "--allowed-activations",
    type=click.IntRange(min=1),
    help="New number of servers that may activate it.",
)
@click.option("--max-users", type=click.IntRange(min=0), help="New cap on license users (0: none).")
@click.option(
    "--lease-duration",
    type=click.IntRange(min=0),
    help="New lease duration in seconds (0: the server's default).",
)
@click.option(
    "--strategy",
    type=click.Choice(["per-machine", "per-instance", "product"]),
    help="New leasing strategy ('product': each product's own).",
)
@click.option("--user-locked/--not-user-locked", default=None, help="Key seats by OS user too.")
@click.option("--trial/--not-trial", default=None, help="Mark or unmark as a trial.")
@click.option(
    "--allowed-ip", "allowed_ips", multiple=True, help="CIDR; repeatable; replaces the list."
)
@click.option("--any-ip", is_flag=True, help="Drop the address restriction.")
@click.option("--grace", help="New grace period: seconds or ISO 8601 duration.")
@click.option("--borrow-max", type=click.IntRange(min=0), help="New borrowing limit (seconds).")
@click.option("--meta", multiple=True, help="NAME=VALUE; repeatable; replaces the values.")
@click.option("--feature", multiple=True, help="NAME=VALUE; repeatable; replaces the features.")
@click.option("--clear-meta", is_flag=True, help="Drop every custom license value.")
@click.option("--clear-features", is_flag=True, help="Drop every feature.")
@json_option
@pass_ctx
@guarded
def license_update(
    ctx: Ctx,
    license_id: str,
    seats: int | None,
    products: tuple[str, ...],
    expires: str | None,
    effective: str | None,
    interval: str | None,
    extend: bool,
    allowed_activations: int | None,
    max_users: int | None,
    lease_duration: int | None,
    strategy: str | None,
    user_locked: bool | None,
    trial: bool | None,
    allowed_ips: tuple[str, ...],
    any_ip: bool,
    grace: str | None,
    borrow_max: int | None,
    meta: tuple[str, ...],
    feature: tuple[str, ...],
    clear_meta: bool,
    clear_features: bool,
    as_json: bool,
) -> None:
    """Change a license's terms (every term issue sets); servers get them at
    their next refresh.  Options not given keep their value."""
    if any_ip and allowed_ips:
        raise click.UsageError("--any-ip and --allowed-ip contradict each other")
    changes: dict[str, Any] = {
        "seats": seats,
        "products": list(products) or None,
        "allowed_activations": allowed_activations,
        "max_users": max_users,
        "lease_duration": lease_duration,
        "user_locked": user_locked,
        "trial": trial,
        "allowed_ips": list(allowed_ips) or None,
        "grace_seconds": None if grace is None else _grace(grace),
        "borrow_max": borrow_max,
        "metadata": _pairs(meta, "--meta", typed=False) or None,
        "features": _pairs(feature, "--feature", typed=True) or None,
    }
    clear: list[str] = []
    for value, option, term in (
        (expires, "--expires", "expires_at"),
        (effective, "--effective", "effective_at"),
    ):
        if value in ("never", "none"):
            clear.append(term)
        else:
            changes[term] = _when_option(value, option)
    if interval in ("none", "never"):
        clear.append("interval")
    else:
        changes["interval"] = interval
    if strategy == "product":
        clear.append("strategy")
    else:
        changes["strategy"] = strategy
    if any_ip:
        changes["allowed_ips"] = []
    if clear_meta:
        changes["metadata"] = {}
    if clear_features:
        changes["features"] = {}
    a = ctx.authority()
    with _usage_errors():
        lic = a.update_license(license_id, time.time(), extend=extend, clear=clear, **changes)
    if as_json:
        echo_json(license_doc(a, lic))
    else:
        click.echo(
            f"updated {lic.id}: seats {lic.terms.seats}, expires {iso(a.expiry(lic)) or 'never'}"
        )


def _state_command(name: str, state: str, doc: str) -> None:
    @license_group.command(name, help=doc)
    @click.argument("license_id")
    @pass_ctx
    @guarded
    def command(ctx: Ctx, license_id: str) -> None:
        lic = ctx.authority().set_state(license_id, state)
        click.echo(f"license {lic.id} is {lic.state}")


_state_command("suspend", "suspended", "Suspend: refreshes get 410, servers stop leasing.")
_state_command("reinstate", "active", "Undo a suspension.")
_state_command("revoke", "revoked", "Revoke for good.")
