"""``floatd policy``: check a site policy file before it is used, and ask the
running daemon what an acquire would get and which rule decides."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from floatd.cli.base import (
    _ask,
    _echo_json,
    _fail,
    _installed_entitlement,
    _load,
    config_option,
    guarded,
    json_option,
    main,
    plural,
)
from floatd.config import read_policy
from floatd.core.policy_file import overbooked, unknown_products
from floatd.errors import ConfigError, EntitlementError


@main.group("policy")
def policy_group() -> None:
    """The site policy: who may lease what, reserved seats, caps."""


@policy_group.command("check")
@config_option
@click.argument("file", required=False, type=click.Path(path_type=Path))
@guarded
def policy_check(config_path: Path | None, file: Path | None) -> None:
    """Validate a policy file (the configured one without FILE): exit 0 if it
    can be used, 2 with the line at fault if not.  A product the installed
    entitlement lacks is a warning."""
    config = None
    if file is None:
        config = _load(config_path)
        file = config.policy_file
        if file is None:
            raise ConfigError("policy.file", "no policy file is configured; name one to check")
    policy = read_policy(file)
    assert policy is not None
    try:
        config = config or _load(config_path)
        ent = _installed_entitlement(config, time.time())
        caps = {p.code: (None if p.unlimited else p.seats) for p in ent.products}
    except (OSError, EntitlementError, ConfigError):
        caps = {}  # no entitlement here to compare with: nothing to warn of
    for code in unknown_products(policy, set(caps)) if caps else []:
        click.echo(f"warning: {file}: the entitlement has no product {code!r}", err=True)
    for code in overbooked(policy, caps):
        click.echo(
            f"warning: {file}: the reserves of {code!r} keep all its {caps[code]} seats:"
            " nobody outside them can lease it",
            err=True,
        )
    groups, rules = len(policy.groups), len(policy.rules)
    click.echo(f"ok: {file} ({plural(groups, 'group')}, {plural(rules, 'rule')})")


@policy_group.command("explain")
@config_option
@click.option("--product", required=True, help="The product code.")
@click.option("--user", help="The acquire's user.")
@click.option("--host", help="The acquire's hostname.")
@click.option("--ip", help="The client's address.")
@click.option("--fingerprint", default="", help="The machine's fingerprint.")
@click.option("--instance", help="The process instance (per-instance products).")
@json_option
@guarded
def policy_explain(
    config_path: Path | None,
    product: str,
    user: str | None,
    host: str | None,
    ip: str | None,
    fingerprint: str,
    instance: str | None,
    as_json: bool,
) -> None:
    """What an acquire with these would get right now, and which rule decides
    (asks the running daemon; changes nothing)."""
    who: dict[str, Any] = {"product": product, "fingerprint": fingerprint or None}
    who.update(user=user, host=host, ip=ip, instance=instance)
    result = _ask(config_path, "explain", **{k: v for k, v in who.items() if v is not None})
    result.pop("ok", None)
    if as_json:
        _echo_json(result)
        return
    outcome = result.get("result")
    line = f"{product}: {'granted' if outcome == 'granted' else f'refused, {outcome}'}"
    why = result.get("why")
    click.echo(line + (f" ({why})" if why else ""))
    if result.get("seats") is not None:
        seats = result["seats"] or "unlimited"
        click.echo(f"seats: {seats}, used: {result.get('used')}")
    if result.get("reserved"):
        rules = ", ".join(str(n) for n in result.get("reserve_rules") or ())
        click.echo(f"seats kept for others: {result['reserved']} (reserve rules {rules})")
    elif result.get("rule") is not None and outcome == "granted":
        click.echo(f"from the seats reserve rule {result['rule']} keeps")
    if outcome == "UNKNOWN_PRODUCT":
        _fail(f"the entitlement has no product {product!r}", 1)
