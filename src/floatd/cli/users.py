"""License users of user-authorized products, kept in the state database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from floatd.cli.base import (
    _echo_json,
    _fail,
    _installed_entitlement,
    _load,
    config_option,
    guarded,
    json_option,
    main,
    plural,
    table,
)
from floatd.config import Config
from floatd.core.entitlement import Entitlement
from floatd.errors import FloatdError

# --- license users ----------------------------------------------------------------------


@main.group("users")
def users_group() -> None:
    """License users of user-authorized products (work with or without the daemon)."""


def _entitlement_or_fail(config: Config) -> Entitlement:
    from floatd.errors import EntitlementError

    try:
        return _installed_entitlement(config, time.time())
    except FileNotFoundError:
        _fail("no entitlement is installed; activate first", 1)
    except EntitlementError as exc:
        _fail(f"the installed entitlement does not verify: {exc.message}", 1)


def _user_product(config: Config, code: str) -> Any:
    terms = _entitlement_or_fail(config).product(code)
    if terms is None:
        _fail(f"the entitlement has no product {code!r}", 1)
    if terms.authorization != "user":
        _fail(f"product {code!r} is not user-authorized: any permitted client may lease it", 1)
    return terms


def _valid_email(email: str) -> str:
    from floatd.core.entitlement import check_email

    try:
        return check_email(email)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="EMAIL") from None


@users_group.command("assign")
@config_option
@click.argument("email")
@click.option(
    "--product", required=True, help="The user-authorized product (a code of the entitlement)."
)
@guarded
def users_assign(config_path: Path | None, email: str, product: str) -> None:
    """Let EMAIL take seats of a user-authorized product (within its max_users)."""
    from floatd.store.users import open_users, users_source

    config = _load(config_path)
    terms = _user_product(config, product)
    email = _valid_email(email)
    store = open_users(users_source(config))
    try:
        if not store.assign(email, product, frozenset(terms.users), terms.max_users):
            click.echo(f"{email} is already a user of {product}")
            return
    finally:
        store.close()
    hint = "" if _has_password(config, email) else "; set a password with `floatd users passwd`"
    click.echo(f"assigned {email} to {product}{hint}")


def _has_password(config: Config, email: str) -> bool:
    from floatd.store.users import open_users, users_source

    store = open_users(users_source(config))
    try:
        return store.password_hash(email) is not None
    finally:
        store.close()


@users_group.command("unassign")
@config_option
@click.argument("email")
@click.option("--product", required=True, help="The product to take the user off.")
@guarded
def users_unassign(config_path: Path | None, email: str, product: str) -> None:
    """Remove a locally assigned user, and end their leases of the product."""
    from floatd.daemon.admin import AdminClient
    from floatd.store.users import open_users, users_source

    config = _load(config_path)
    terms = _user_product(config, product)
    store = open_users(users_source(config))
    try:
        removed = store.unassign(email, product)
    finally:
        store.close()
    if not removed:
        if email in terms.users:
            _fail(f"{email} was assigned by the vendor's authority; unassign them there", 1)
        _fail(f"{email} is not a user of {product}", 1)
    ended = 0
    if config.admin_socket is not None:
        try:
            with AdminClient(config.admin_socket, timeout=10) as admin:
                ended = len(admin.call("end_user", email=email, product=product)["ended"])
        except FloatdError as exc:
            if "not running" not in exc.message:
                _fail(f"unassigned, but could not end their leases: {exc.message}", 1)
    click.echo(f"unassigned {email} from {product}; ended {plural(ended, 'lease')}")


@users_group.command("passwd")
@config_option
@click.argument("email")
@click.option("--generate", is_flag=True, help="Make a random password and print it alone.")
@guarded
def users_passwd(config_path: Path | None, email: str, generate: bool) -> None:
    """Set a license user's password (stored only as a salted scrypt hash)."""
    from floatd.store.users import generate_password, hash_password, open_users, users_source

    config = _load(config_path)
    ent = _entitlement_or_fail(config)
    store = open_users(users_source(config))
    try:
        known = bool(store.products_of(email)) or any(
            email in p.users for p in ent.products if p.authorization == "user"
        )
        if not known:
            _fail(f"{email} is not a license user of any product; assign them first", 1)
        if generate:
            password = generate_password()
        else:
            password = click.prompt(
                f"password for {email}", hide_input=True, confirmation_prompt=True
            )
            if len(password) < 8:
                _fail("a password needs at least 8 characters", 1)
        store.set_password(email, hash_password(password))
    finally:
        store.close()
    if generate:
        click.echo(password)
    else:
        click.echo(f"password set for {email}", err=True)


@users_group.command("list")
@config_option
@click.option("--product", help="Only users of this product.")
@json_option
@guarded
def users_list(config_path: Path | None, product: str | None, as_json: bool) -> None:
    """License users: e-mail, products, assigned by the authority or here, password set."""
    from floatd.store.users import LicenseUser, open_users, users_source

    config = _load(config_path)
    ent = _entitlement_or_fail(config)
    store = open_users(users_source(config))
    try:
        people = store.all_users()
    finally:
        store.close()
    for p in ent.products:
        if p.authorization == "user":
            for email in p.users:
                people.setdefault(email, LicenseUser(email)).authority_products.add(p.code)
    rows: list[dict[str, Any]] = []
    for email in sorted(people):
        u = people[email]
        products = sorted(u.local_products | u.authority_products)
        if product is not None and product not in products:
            continue
        if not products and not u.password_set:
            continue
        rows.append(
            {
                "email": email,
                "products": products,
                "assigned": {
                    code: "authority" if code in u.authority_products else "local"
                    for code in products
                },
                "password_set": u.password_set,
            }
        )
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no license users")
        return
    click.echo(
        table(
            ["EMAIL", "PRODUCTS", "PASSWORD"],
            [
                [
                    r["email"],
                    ", ".join(f"{c} ({a})" for c, a in r["assigned"].items()),
                    "set" if r["password_set"] else "not set",
                ]
                for r in rows
            ],
        )
    )
