"""``floatd-authority``: the vendor's tool.  Keys, products, licenses, users,
activations, offline signing, and serving the HTTP API.

Every command takes ``--db`` (default ``$FLOATD_AUTHORITY_DB``, else
``./floatd-authority.sqlite3``); listings take ``--json``.  Exit status as
floatd's: 0 success, 1 refused or failed (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd import __version__
from floatd.authority.logic import Authority, check_duration
from floatd.authority.store import Activation, AuthorityStore, License, Product, Terms
from floatd.cli import CONTEXT, HelpGroup, fail, make_guard, plural
from floatd.config import parse_hostport
from floatd.core.entitlement import format_public_key, load_private_key, private_key_pem
from floatd.store.activation import read_armored
from floatd.store.audit import iso, parse_when

F = TypeVar("F", bound=Callable[..., Any])
PASSPHRASE_ENV = "FLOATD_AUTHORITY_KEY_PASSPHRASE"


def _fail(message: str, status: int = 1) -> NoReturn:
    fail("floatd-authority", message, status)


guarded = make_guard("floatd-authority", remote_authority=False)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


class Ctx:
    def __init__(self, db: Path) -> None:
        self.db = db
        self._store: AuthorityStore | None = None

    def authority(self, key: Ed25519PrivateKey | None = None) -> Authority:
        if self._store is None:
            self._store = AuthorityStore(self.db)
        return Authority(self._store, key)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=HelpGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="floatd-authority")
@click.option(
    "--db",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="FLOATD_AUTHORITY_DB",
    default=Path("floatd-authority.sqlite3"),
    show_default=True,
    help="The authority's database ($FLOATD_AUTHORITY_DB).",
)
@click.pass_context
def main(ctx: click.Context, db: Path) -> None:
    """floatd-authority: the reference central authority (the vendor's side)."""
    os.umask(0o077)  # the vendor's books and keys are nobody else's business
    ctx.obj = Ctx(db)


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read key {path}: {exc.strerror}")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        return load_private_key(pem, passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        _fail(f"cannot load key {path}: {exc} (encrypted keys read ${PASSPHRASE_ENV})")


# --- keys ---------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """The vendor's Ed25519 signing key."""


@keys.command("generate")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the new private key (PEM).",
)
@click.option(
    "--passphrase", is_flag=True, help=f"Encrypt the key (prompted, or ${PASSPHRASE_ENV})."
)
@guarded
def keys_generate(out: Path, passphrase: bool) -> None:
    """Create a signing key (PKCS#8 PEM) and print its public key for floatd's config."""
    if out.exists():
        _fail(f"{out} exists; not overwriting a signing key")
    secret = None
    if passphrase:
        secret = os.environ.get(PASSPHRASE_ENV) or click.prompt(
            "passphrase", hide_input=True, confirmation_prompt=True
        )
    key = Ed25519PrivateKey.generate()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key, secret.encode() if secret else None))
    click.echo(format_public_key(key.public_key()))
    click.echo(f"wrote {out}; put the line above in floatd's [entitlement] vendor_keys", err=True)


@keys.command("public")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The signing key (PEM).",
)
@guarded
def keys_public(key_path: Path) -> None:
    """Print the public key of a signing key."""
    click.echo(format_public_key(_load_key(key_path).public_key()))


# --- products -----------------------------------------------------------------------


@main.group()
def product() -> None:
    """Products the vendor sells."""


def _product_json(p: Product) -> dict[str, Any]:
    return dict(p.__dict__)


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
    p = ctx.authority().add_product(
        Product(code, name, authorization, lease_duration, strategy, trial_days)
    )
    _echo_json(_product_json(p)) if as_json else click.echo(f"added product {p.code}")


@product.command("list")
@json_option
@pass_ctx
@guarded
def product_list(ctx: Ctx, as_json: bool) -> None:
    """List products."""
    products = ctx.authority().store.products()
    if as_json:
        _echo_json([_product_json(p) for p in products])
        return
    for p in products:
        click.echo(
            f"{p.code}\t{p.name}\t{p.authorization}\t{p.lease_duration}s\t{p.strategy}"
            f"\ttrial {p.trial_days}d"
        )


# --- licenses -----------------------------------------------------------------------


def _when_option(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return int(parse_when(text, time.time()))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


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
        from floatd.authority.logic import add_duration

        return add_duration(0, check_duration(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grace") from None


def _license_json(a: Authority, lic: License) -> dict[str, Any]:
    terms = dict(lic.terms.__dict__)
    return {
        "id": lic.id,
        "order": lic.order_id,
        "order_reference": lic.order_reference,
        "customer": lic.customer,
        "state": lic.state,
        "created_at": iso(lic.created_at),
        "expires": iso(a.expiry(lic)),
        "users": lic.users,
        "activations": len(a.store.activations(lic.id, active_only=True)),
        **terms,
    }


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
@click.option("--expires", help="Explicit expiry date.")
@click.option("--effective", help="Effective date: no lease before it.")
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
    import ipaddress

    if seats < -1:
        raise click.BadParameter("must be -1 or more", param_hint="--seats")
    for cidr in allowed_ips:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise click.BadParameter(f"{cidr!r} is not CIDR", param_hint="--allowed-ip") from None
    if interval is not None:
        try:
            check_duration(interval)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--interval") from None
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
    lic, key = authority.issue_license(
        order_id, terms, time.time(), order_reference=order_ref, customer=customer
    )
    if as_json:
        _echo_json({**_license_json(authority, lic), "license_key": key})
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
    rows = [_license_json(a, lic) for lic in a.store.licenses(order_id)]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['id']}\t{r['order']}\t{r['state']}\t{','.join(r['products'])}\t"
            f"seats {r['seats']}\tactivations {r['activations']}/{r['allowed_activations']}"
            f"\texpires {r['expires'] or 'never'}"
        )


@license_group.command("show")
@click.argument("license_id")
@json_option
@pass_ctx
@guarded
def license_show(ctx: Ctx, license_id: str, as_json: bool) -> None:
    """One license with its terms, users and activations."""
    a = ctx.authority()
    doc = _license_json(a, a.get_license(license_id))
    doc["activation_list"] = [_activation_json(x) for x in a.store.activations(license_id)]
    if as_json:
        _echo_json(doc)
        return
    for name, value in doc.items():
        click.echo(f"{name}: {value}")


@license_group.command("update")
@click.argument("license_id")
@click.option("--seats", type=int, help="New seat count; 0 or -1: unlimited.")
@click.option("--expires", help="New explicit expiry date.")
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
@json_option
@pass_ctx
@guarded
def license_update(
    ctx: Ctx,
    license_id: str,
    seats: int | None,
    expires: str | None,
    extend: bool,
    allowed_activations: int | None,
    max_users: int | None,
    lease_duration: int | None,
    as_json: bool,
) -> None:
    """Change a license's terms; servers get them at their next refresh."""
    a = ctx.authority()
    lic = a.update_license(
        license_id,
        time.time(),
        extend=extend,
        seats=seats,
        expires_at=_when_option(expires, "--expires"),
        allowed_activations=allowed_activations,
        max_users=max_users,
        lease_duration=lease_duration,
    )
    if as_json:
        _echo_json(_license_json(a, lic))
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


# --- activations ------------------------------------------------------------------------


def _activation_json(a: Activation) -> dict[str, Any]:
    return {
        "id": a.id,
        "license": a.license_id,
        "server": a.server,
        "hostname": a.hostname,
        "floatd": a.floatd,
        "mode": a.mode,
        "state": a.state,
        "created_at": iso(a.created_at),
        "refreshed_at": iso(a.refreshed_at),
    }


@main.group()
def activations() -> None:
    """Which servers hold which license."""


@activations.command("list")
@click.option("--license", "license_id", help="Only activations of this license.")
@json_option
@pass_ctx
@guarded
def activations_list(ctx: Ctx, license_id: str | None, as_json: bool) -> None:
    """List activations."""
    rows = [_activation_json(x) for x in ctx.authority().store.activations(license_id)]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['id']}\t{r['license']}\t{r['server']}\t{r['hostname']}\t{r['mode']}"
            f"\t{r['state']}\trefreshed {r['refreshed_at']}"
        )


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
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The signing key (PEM).",
)
@pass_ctx
@guarded
def offline_sign(ctx: Ctx, request: Path, out: Path, key_path: Path) -> None:
    """Sign an entitlement answering REQUEST (from `floatd activate --offline-request`)."""
    text = read_armored(request)
    activation_id, entitlement = ctx.authority(_load_key(key_path)).sign_offline(text, time.time())
    out.write_text(entitlement, encoding="utf-8")
    click.echo(f"wrote {out} (activation {activation_id}); carry it to the server", err=True)


# --- serve --------------------------------------------------------------------------------


@main.command()
@click.option(
    "--listen", default="127.0.0.1:7500", show_default=True, help="host:port to serve the API on."
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The signing key (PEM).",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    help="PEM certificate: serve HTTPS (with --tls-key).",
)
@click.option("--tls-key", type=click.Path(path_type=Path), help="PEM private key of --tls-cert.")
@pass_ctx
@guarded
def serve(
    ctx: Ctx, listen: str, key_path: Path, tls_cert: Path | None, tls_key: Path | None
) -> None:
    """Serve the HTTP API (HTTPS with --tls-cert and --tls-key)."""
    from floatd import logs
    from floatd.authority.api import AuthorityApi

    host, port = parse_hostport(listen, "--listen")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    tls = None
    if tls_cert and tls_key:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            _fail(f"cannot load the TLS certificate: {exc}")
    logs.configure("info", "json")
    api = AuthorityApi(ctx.authority(_load_key(key_path)), tls=tls)
    trio.run(_serve, api, host, port)


async def _serve(api: Any, host: str, port: int) -> None:
    from floatd import logs

    listeners = await trio.open_tcp_listeners(port, host=host)
    addresses = [
        f"{lst.socket.getsockname()[0]}:{lst.socket.getsockname()[1]}" for lst in listeners
    ]
    logs.get_logger().info("authority_listening", addresses=addresses, tls=api.tls is not None)
    logs.flush()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(api.serve, listener)
            nursery.start_soon(_flush_logs)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    logs.get_logger().info("authority_stopped")
    logs.flush()


async def _flush_logs() -> None:
    from floatd import logs

    while True:
        await trio.sleep(logs.FLUSH_INTERVAL)
        logs.flush()
