"""The ``floatd`` command line.

Exit status: 0 success, 1 refused or failed, 2 usage or config error; a failure
is one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextvars
import csv
import functools
import json
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from floatd import __version__
from floatd.audit import AUDIT_EVENTS
from floatd.config import Config, load_config, read_machine_id
from floatd.entitlement import Entitlement
from floatd.errors import AuthorityError, ConfigError, FloatdError

F = TypeVar("F", bound=Callable[..., Any])


def plural(n: int, word: str) -> str:
    """``1 lease``, ``2 leases``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


#: Set while a command runs with --json: its refusals are JSON on stdout too,
#: so a script reading the output never has to parse an error line.
_json_errors: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)


def fail(prog: str, message: str, status: int = 1, code: str | None = None) -> NoReturn:
    if _json_errors.get():
        code = code or ("USAGE" if status == 2 else "FAILED")
        click.echo(json.dumps({"ok": False, "error": {"code": code, "message": message}}))
    else:
        click.echo(f"{prog}: {message}", err=True)
    sys.exit(status)


def _fail(message: str, status: int) -> NoReturn:
    fail("floatd", message, status)


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="Config file (default: $FLOATD_CONFIG, else /etc/floatd/floatd.toml).",
    )(fn)


def make_guard(prog: str, *, remote_authority: bool) -> Callable[[F], F]:
    """A decorator mapping floatd's errors onto one stderr line and the
    documented exit status (``prog`` names the command in the message).
    ``remote_authority``: an AuthorityError is the central authority's answer
    (floatd's side), not a refusal made by this program itself."""

    def guarded(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _json_errors.set(bool(kwargs.get("as_json")))
            try:
                return _run(*args, **kwargs)
            finally:
                _json_errors.reset(token)

        def _run(*args: Any, **kwargs: Any) -> Any:
            try:
                try:
                    return fn(*args, **kwargs)
                except BaseExceptionGroup as group:
                    # trio wraps task errors in groups; a lone known error is shown as itself.
                    leaves = _leaves(group)
                    if len(leaves) == 1 and isinstance(leaves[0], (FloatdError, OSError)):
                        raise leaves[0] from None
                    raise
            except ConfigError as exc:
                fail(prog, f"config error: {exc.message}", 2, exc.code)
            except AuthorityError as exc:
                if remote_authority and exc.status:
                    message = f"the authority refused ({exc.error_code}): {exc.message}"
                    fail(prog, message, 1, exc.error_code)
                fail(prog, exc.message, 1, exc.error_code)
            except FloatdError as exc:
                fail(prog, exc.message, 1, exc.code)
            except OSError as exc:
                fail(prog, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1, "OS")

        return wrapper  # type: ignore[return-value]

    return guarded


guarded = make_guard("floatd", remote_authority=True)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _load(config_path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(config_path, overrides=overrides)


def _server_id(config: Config) -> str:
    from floatd.entitlement import server_fingerprint

    return server_fingerprint(read_machine_id(config))


class HelpGroup(click.Group):
    """A command group whose listing shows each command's whole first sentence
    (click cuts it at about 45 characters), and whose sub-groups are alike."""

    group_class = type  # groups made with @group.group() are HelpGroups too

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=200)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


#: -h as well as --help, on every command (subcommands inherit it).
CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=HelpGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="floatd")
def main() -> None:
    """floatd: an on-premise floating license server."""
    os.umask(0o077)  # state, requests and keys are nobody else's business


@main.command()
@config_option
@click.option("--listen", multiple=True, help="host:port for the lease protocol (repeatable).")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Overrides [state] dir.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Overrides [log] level.",
)
@click.option(
    "--log-format", type=click.Choice(["json", "console"]), help="Overrides [log] format."
)
@guarded
def serve(
    config_path: Path | None,
    listen: tuple[str, ...],
    state_dir: Path | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run the daemon in the foreground (what systemd runs)."""
    overrides: dict[str, Any] = {}
    if listen:
        overrides["server.listen"] = list(listen)
    if state_dir:
        overrides["state.dir"] = str(state_dir)
    if log_level:
        overrides["log.level"] = log_level
    if log_format:
        overrides["log.format"] = log_format
    run_server(_load(config_path, overrides), lambda: _load(config_path, overrides))


def check_startable(config: Config) -> str:
    """What ``floatd serve`` needs beyond a well-formed config, checked the same
    way by ``floatd check-config``: readable TLS files, the machine id (returns
    the server's fingerprint), a state dir that can be made (private) and
    whose writer lock can be opened.  ConfigError naming the key otherwise."""
    from floatd.server import tls_context
    from floatd.store import make_private
    from floatd.writer import lock_path

    tls_context(config)
    tls_context(config, "status")
    server_id = _server_id(config)
    try:
        make_private(config.state_dir)
        with open(lock_path(config.database_path), "a+b"):
            pass
    except OSError as exc:
        raise ConfigError(
            "state.dir", f"cannot use {config.state_dir}: {exc.strerror or exc}"
        ) from None
    return server_id


def run_server(
    config: Config,
    loader: Callable[[], Config] | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    from floatd import logs
    from floatd.server import Server
    from floatd.systemd import Notifier
    from floatd.writer import ProcessLeaseStore

    logs.configure(config.log_level, config.log_format)
    server_id = check_startable(config)
    store = ProcessLeaseStore(config.database_path, lease_lines=logs.write_lines)
    notifier = Notifier()
    try:
        server = Server(config, store, server_id, config_loader=loader, notifier=notifier)
        trio.run(_serve, server, on_listening)
    finally:
        store.close()
        notifier.close()


async def _serve(server: Any, on_listening: Callable[[], None] | None = None) -> None:
    # Bind first: a port in use ends the start before the state is touched
    # (load_state marks it in use, so a failed start would look like a crash).
    await server.bind()
    server.load_state()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if on_listening is not None:
                on_listening()

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        server.reload_entitlement_now()
                    else:
                        server.stop()
                        return

            nursery.start_soon(watch)


@main.command("check-config")
@config_option
@guarded
def check_config(config_path: Path | None) -> None:
    """Validate the config; exit 0 if it is usable, 2 if not."""
    config = _load(config_path)
    check_startable(config)
    click.echo(f"ok: {config.source}")


@main.command()
@config_option
@guarded
def fingerprint(config_path: Path | None) -> None:
    """Print this server's fingerprint (what entitlements are bound to)."""
    click.echo(_server_id(_load(config_path)))


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
    from floatd import activation

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
    from floatd import online

    record, ent = trio.run(online.activate, config, _server_id(config), key, now)
    click.echo(
        f"activated online: activation {record.activation_id}, entitlement {ent.id} "
        f"for license {ent.license}: {_products_line(ent)}; refresh due by "
        f"{_iso(ent.refresh_by)}"
    )


@main.command()
@config_option
@guarded
def deactivate(config_path: Path | None) -> None:
    """Give the online activation back to the authority; this server stops leasing."""
    from floatd import online

    config = _load(config_path)
    record = trio.run(online.deactivate, config, _server_id(config))
    click.echo(f"deactivated: activation {record.activation_id} is free for another server")


def _iso(ts: float | None) -> str:
    from floatd.audit import iso

    return iso(ts) or "never"


def _products_line(ent: Any) -> str:
    return ", ".join(f"{p.code} ({p.seats if p.seats > 0 else 'unlimited'})" for p in ent.products)


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=Path("floatd-demo"),
    show_default=True,
    help="Where the demo keeps its key, config and state.",
)
@click.option(
    "--listen",
    default="127.0.0.1:7411",
    show_default=True,
    help="Where the demo's lease port listens (host:port).",
)
@click.option(
    "--status-listen",
    default="127.0.0.1:7412",
    show_default=True,
    help='The HTTP status endpoint ("" turns it off).',
)
@guarded
def demo(directory: Path, listen: str, status_listen: str) -> None:
    """Serve a DEMO product right away: throwaway vendor key, no network needed."""
    from floatd.demo import prepare

    config = prepare(directory, listen, time.time(), status_listen)
    host, port = config.listen[0]
    config_file = config.state_dir.parent / "floatd.toml"
    status = f"  curl http://{status_listen}/status\n" if config.status_listen is not None else ""
    python = sys.executable  # the Python floatd is installed in (a virtualenv, say)

    def banner() -> None:  # once it listens: the command it suggests works at once
        click.echo(
            f"floatd DEMO on {host}:{port}: products 'demo' (5 seats, per machine) and "
            f"'demo-instance' (3 seats, per process).\n"
            f"The key and entitlement in {config.state_dir.parent} are throwaway; this is "
            f"not a real license.\nTake a seat from another shell:\n"
            f"  {python} -m floatd.client.simple {host}:{port} demo\n"
            f"and look at it:\n"
            f"  {python} -m floatd leases --config {config_file}\n"
            f"{status}"
            f"Stop with Ctrl-C.",
            err=True,
        )

    run_server(config, lambda: load_config(config_file, env={}), banner)


# --- talking to the running daemon -------------------------------------------------


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Stable machine output.")(fn)


def _admin(config: Config) -> Any:
    from floatd.admin import AdminClient

    if config.admin_socket is None:
        raise ConfigError("admin.socket", "is empty, so the daemon has no admin socket")
    return AdminClient(config.admin_socket)


def _ask(config_path: Path | None, cmd: str, **args: Any) -> dict[str, Any]:
    """One request over the admin socket, its answer without the ``ok`` flag."""
    with _admin(_load(config_path)) as admin:
        doc: dict[str, Any] = admin.call(cmd, **args)
    doc.pop("ok", None)
    return doc


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned table; None shows as "-"."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s"


@main.command()
@config_option
@json_option
@guarded
def status(config_path: Path | None, as_json: bool) -> None:
    """Activation state and per-product seats in use."""
    from floatd.audit import iso

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
            _table(
                ["PRODUCT", "SEATS", "USED", "FREE", "WAITING", "STRATEGY", "LEASE", "ENDS"],
                [
                    [
                        p["code"],
                        p["seats"] if p["seats"] > 0 else "unlimited",
                        p["used"],
                        p["free"],
                        p["waiting"],
                        p["strategy"],
                        f"{p['lease_duration']}s",
                        iso(p["not_after"]),
                    ]
                    for p in products
                ],
            )
        )


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
        _table(
            [c.upper() for c in columns] + ["GRANTED", "EXPIRES"],
            [[row[c] for c in columns] + [row["granted"], row["expires"]] for row in rows],
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
    if result["entitlement_rejected"]:
        _fail(f"the entitlement file was rejected: {result['entitlement_rejected']}", 1)


# --- the audit trail ----------------------------------------------------------------


TABLE_LIMIT = 10_000


def _when(text: str | None, default: float, now: float, option: str) -> float:
    from floatd.audit import parse_when

    if text is None:
        return default
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@main.command()
@config_option
@click.option("--since", help="Start: a date, a date-time (UTC) or an age like 7d. [24h]")
@click.option("--until", help="End (exclusive); default now.")
@click.option("--product", help="Only this product.")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice(list(AUDIT_EVENTS)),
    help="Only these events (repeatable).",
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many records.")
@json_option
@guarded
def audit(
    config_path: Path | None,
    since: str | None,
    until: str | None,
    product: str | None,
    events: tuple[str, ...],
    limit: int | None,
    as_json: bool,
) -> None:
    """Audit records: every lease granted, renewed, released, expired, revoked or refused."""
    from floatd import audit as trail

    config = _load(config_path)
    now = time.time()
    start = _when(since, now - 86400, now, "--since")
    end = _when(until, now + 1, now, "--until")
    # A table must be held in memory to align it; JSON streams, so only the
    # table gets a default cap.
    cap = limit if limit is not None or as_json else TABLE_LIMIT
    db = trail.open_readonly(config.database_path)
    try:
        records = trail.read_audit(db, start, end, product, events or trail.AUDIT_EVENTS, cap)
        if as_json:
            click.echo("[")
            first = True
            for record in records:
                text = json.dumps(record.to_json(), sort_keys=True)
                click.echo(("  " if first else ", ") + text)
                first = False
            click.echo("]")
            return
        rows = [
            [
                trail.iso(r.ts),
                r.event,
                r.product,
                r.lease,
                r.fingerprint,
                r.user,
                r.hostname,
                r.peer,
                r.code if r.count == 1 else f"{r.code} (x{r.count})",
            ]
            for r in records
        ]
    finally:
        db.close()
    if not rows:
        click.echo("no audit records in that range")
        return
    headers = ["TIME", "EVENT", "PRODUCT", "LEASE", "FINGERPRINT", "USER", "HOSTNAME", "ADDRESS"]
    click.echo(_table([*headers, "CODE"], rows))
    if limit is None and len(rows) == TABLE_LIMIT:
        click.echo(
            f"(the first {TABLE_LIMIT} records; narrow --since/--until/--event, "
            "or use --limit or --json)",
            err=True,
        )


@main.command()
@config_option
@click.option("--since", required=True, help="Start: a date, a date-time (UTC) or an age.")
@click.option("--until", help="End (exclusive); default now.")
@click.option(
    "--by",
    type=click.Choice(["hour", "day"]),
    default="day",
    show_default=True,
    help="Report periods: hours or days (UTC).",
)
@click.option("--csv", "as_csv", is_flag=True, help="CSV output.")
@json_option
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE.png",
    help="Also draw seats in use over time against the cap (needs matplotlib).",
)
@guarded
def report(
    config_path: Path | None,
    since: str,
    until: str | None,
    by: str,
    as_csv: bool,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Usage per product and period: peak seats, seat-hours, distinct users and
    machines, refusals for want of a seat."""
    from floatd import audit as trail
    from floatd.report import CSV_COLUMNS, build_report, plot_report

    if as_csv and as_json:
        raise click.UsageError("give --csv or --json, not both")
    config = _load(config_path)
    now = time.time()
    start = _when(since, now, now, "--since")
    end = _when(until, now, now, "--until")
    if start >= now and until is None:
        raise click.BadParameter(
            "is in the future: there is nothing to report yet", param_hint="--since"
        )
    if end <= start:
        raise click.BadParameter("must come after --since", param_hint="--until")
    caps = _entitled_caps(config, now)
    db = trail.open_readonly(config.database_path)
    try:
        intervals = trail.lease_intervals(db, start, end, now)
        refusals = trail.seat_refusals(db, start, end)
    finally:
        db.close()
    result = build_report(intervals, refusals, start, end, by, products=caps)
    rows = [row.to_json(trail.iso) for row in result.rows]
    if as_json:
        _echo_json(
            {
                "since": trail.iso(start),
                "until": trail.iso(end),
                "by": by,
                "seats": caps,
                "rows": rows,
            }
        )
    elif as_csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(CSV_COLUMNS)
        for row in rows:
            out.writerow([row[c] for c in CSV_COLUMNS])
    else:
        click.echo(
            _table(
                ["PRODUCT", "PERIOD", "PEAK", "CAP", "SEAT-HOURS", "USERS", "MACHINES", "REFUSED"],
                [
                    [
                        r["product"],
                        r["period_start"],
                        r["peak_seats"],
                        caps.get(r["product"]),
                        f"{r['seat_hours']:.2f}",
                        r["distinct_users"],
                        r["distinct_machines"],
                        r["refusals_no_seat"],
                    ]
                    for r in rows
                ],
            )
            if rows
            else "no products and no activity in that range"
        )
    if plot is not None:
        try:
            plot_report(result, str(plot), caps)
        except ImportError:  # the report above stands; say how to get the picture
            _fail(
                f"no plot written: --plot needs matplotlib ({sys.executable} -m pip install"
                " 'floatd[plot]', or your distribution's python3-matplotlib)",
                1,
            )
        click.echo(f"wrote {plot}", err=True)


def _installed_entitlement(config: Config, now: float) -> Entitlement:
    """The installed entitlement, verified for this server; its time windows are
    not checked here (these commands also serve expired licenses).  Raises
    FileNotFoundError when none is installed, EntitlementError when it does not
    verify."""
    from floatd.activation import read_armored
    from floatd.entitlement import trusted_keys, verify_entitlement

    text = read_armored(config.entitlement_path)
    return verify_entitlement(
        text, trusted_keys(config.vendor_keys), _server_id(config), now, math.inf
    )


def _entitled_caps(config: Config, now: float) -> dict[str, int | None]:
    """Each entitled product's seat cap (None: unlimited), from the installed
    entitlement; empty if there is none that verifies."""
    from floatd.errors import EntitlementError

    try:
        ent = _installed_entitlement(config, now)
    except (OSError, EntitlementError, ConfigError):
        return {}
    return {p.code: (None if p.unlimited else p.seats) for p in ent.products}


# --- the connectivity probe ----------------------------------------------------------

#: Where ``floatd probe --password`` and ``floatd.client.simple --password``
#: take the license user's password from, before they prompt for it.
PASSWORD_ENV = "FLOATD_PASSWORD"
PROBE_REFUSED = 1
PROBE_UNREACHABLE = 3


@main.command()
@click.option(
    "--server", "servers", multiple=True, required=True, help="HOST:PORT; repeat to try several."
)
@click.option("--product", required=True, help="The product code to look up.")
@click.option("--lease", "take", is_flag=True, help="Also take a seat, and give it back at once.")
@click.option("--token", help="Client access token, if the server requires one.")
@click.option("--tls", is_flag=True, help="Use TLS, verifying against the system's CAs.")
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Use TLS with this CA file.",
)
@click.option("--user", help="License user (or OS user) to lease as: user-locked products.")
@click.option(
    "--password",
    "ask_password",
    is_flag=True,
    help=f"Send the license user's password: from ${PASSWORD_ENV}, else prompted.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each step.",
)
@json_option
def probe(
    servers: tuple[str, ...],
    product: str,
    take: bool,
    token: str | None,
    tls: bool,
    tls_ca: Path | None,
    user: str | None,
    ask_password: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Can this machine reach the license server and lease PRODUCT?

    Exit status: 0 ok, 1 refused (the server answered no), 3 unreachable, 2 usage.
    """
    from floatd.client.connection import parse_server

    try:
        addresses = [parse_server(s) for s in servers]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    if tls_ca is not None:
        from floatd.client.connection import tls_context

        try:
            tls_context(tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise click.BadParameter(f"cannot use {tls_ca}: {exc}", param_hint="--tls-ca") from None
    credentials: dict[str, Any] = {}
    if user is not None:
        credentials["user"] = user
    if ask_password:
        credentials["password"] = os.environ.get(PASSWORD_ENV) or click.prompt(
            "password", hide_input=True, err=True
        )
    report = trio.run(
        _probe, addresses, product, take, token, tls or bool(tls_ca), tls_ca, timeout, credentials
    )
    if as_json:
        _echo_json(report)
    else:
        for line in report["lines"]:
            click.echo(line)
    status = {"ok": 0, "refused": PROBE_REFUSED, "unreachable": PROBE_UNREACHABLE}
    sys.exit(status[report["result"]])


async def _probe(
    addresses: list[tuple[str, int]],
    product: str,
    take: bool,
    token: str | None,
    tls: bool,
    tls_ca: Path | None,
    timeout: float,
    credentials: dict[str, Any],
) -> dict[str, Any]:
    from floatd.client.connection import (
        INSTANCE_ID,
        Connection,
        ConnectionLost,
        Unreachable,
        refusal,
        tls_context,
        wire_code,
    )
    from floatd.client.fingerprint import machine_fingerprint

    report: dict[str, Any] = {"result": "unreachable", "lines": []}
    lines: list[str] = report["lines"]
    context = tls_context(tls_ca) if tls else None
    conn = None
    for host, port in addresses:
        try:
            started = time.monotonic()
            conn = await Connection.open(
                host,
                port,
                client=f"floatd-probe/{__version__}",
                token=token,
                tls=context,
                connect_timeout=timeout,
                request_timeout=timeout,
            )
        except Unreachable as exc:
            lines.append(f"unreachable: {exc.message}")
            report.setdefault("errors", []).append(
                {"server": f"{host}:{port}", "error": exc.message}
            )
            continue
        except FloatdError as exc:
            lines.append(f"refused at hello by {host}:{port}: {wire_code(exc)}: {exc.message}")
            report.update(result="refused", server=f"{host}:{port}", error=_err(exc))
            return report
        report["server"] = f"{host}:{port}"
        hello = conn.hello
        skew = float(hello.get("time", 0)) - time.time()
        report["hello"] = {k: hello.get(k) for k in ("version", "server", "server_id", "time")}
        report["round_trip_ms"] = round((time.monotonic() - started) * 1000, 1)
        lines.append(
            f"reached {host}:{port}: {hello.get('server')} (server id {hello.get('server_id')}),"
            f" protocol {hello.get('version')}, clock skew {skew:+.1f}s,"
            f" connect+hello {report['round_trip_ms']} ms"
        )
        break
    if conn is None:
        return report
    try:
        info = await conn.request("info", product=product)
        if not info.get("ok"):
            no = refusal(info.get("error"))
            lines.append(f"refused: {wire_code(no)}: {no.message}")
            report.update(result="refused", error=_err(no))
            return report
        info = {k: v for k, v in info.items() if k not in ("id", "ok")}
        report["product"] = info
        free = "unlimited" if info.get("free") is None else info.get("free")
        lines.append(
            f"product {info.get('code')} ({info.get('name')}): {info.get('used')} of "
            f"{info.get('seats') if (info.get('seats') or 0) > 0 else 'unlimited'} seats in use,"
            f" {free} free, {info.get('strategy')}, lease {info.get('lease_duration')}s"
        )
        if take:
            got = await conn.request(
                "acquire",
                product=product,
                fingerprint=machine_fingerprint(),
                instance=f"probe-{INSTANCE_ID}",
                hostname=socket.gethostname()[:256],
                **credentials,
            )
            if not got.get("ok"):
                no = refusal(got.get("error"))
                lines.append(f"refused: {wire_code(no)}: {no.message}")
                report.update(result="refused", error=_err(no))
                return report
            await conn.request("release", lease=got["lease"], token=got["token"])
            report["lease"] = {"taken": True, "released": True, "expires_in": got["expires_in"]}
            lines.append(f"took a seat (lease {got['lease']}) and gave it back")
        report["result"] = "ok"
        lines.append("ok")
    except ConnectionLost as exc:
        lines.append(f"unreachable: {exc.message}")
        report["result"] = "unreachable"
    finally:
        await conn.aclose()
    return report


def _err(exc: FloatdError) -> dict[str, Any]:
    from floatd.client.connection import wire_code

    return {"code": wire_code(exc), "message": exc.message, **exc.details}


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
    from floatd.audit import iso

    click.echo(
        f"clock mark reset from {iso(result['old_mark'])} to {iso(result['new_mark'])};"
        f" {plural(result['leases_clamped'], 'lease')} dated by the wrong clock now end sooner"
    )


# --- the state dir ----------------------------------------------------------------------


@main.group("state")
def state_group() -> None:
    """The state dir (what to do when floatd refuses to start on it)."""


@state_group.command("reset")
@config_option
@click.option("--yes", is_flag=True, help="Confirm: every lease the state held is forgotten.")
@guarded
def state_reset(config_path: Path | None, yes: bool) -> None:
    """Start over with an empty state database, when the old one is lost or
    damaged and there is no backup: its files are moved aside, not deleted.

    Clients holding leases from before must acquire again; until their old
    leases would have expired, more seats may be in use than floatd counts."""
    import fcntl

    from floatd.state_identity import StateIdentity
    from floatd.writer import lock_path

    if not yes:
        raise click.UsageError("this forgets every lease in the state: add --yes to go ahead")
    config = _load(config_path)
    database = config.database_path
    try:
        with open(lock_path(database), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            moved = StateIdentity(database).reset()
    except BlockingIOError:
        _fail("floatd is running on this state dir: stop it first", 1)
    for path in moved:
        click.echo(f"moved aside: {path}")
    click.echo(f"the state in {config.state_dir} starts empty at the next start")


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
    if "@" not in email or len(email) > 254 or any(c.isspace() for c in email):
        raise click.BadParameter(f"{email!r} is not an e-mail address", param_hint="EMAIL")
    return email


@users_group.command("assign")
@config_option
@click.argument("email")
@click.option(
    "--product", required=True, help="The user-authorized product (a code of the entitlement)."
)
@guarded
def users_assign(config_path: Path | None, email: str, product: str) -> None:
    """Let EMAIL take seats of a user-authorized product (within its max_users)."""
    from floatd.users import UserStore

    config = _load(config_path)
    terms = _user_product(config, product)
    email = _valid_email(email)
    store = UserStore(config.database_path)
    try:
        everyone = set(terms.users) | store.local_users(product)
        if email in everyone:
            click.echo(f"{email} is already a user of {product}")
            return
        if terms.max_users and len(everyone) + 1 > terms.max_users:
            _fail(
                f"{product} allows {terms.max_users} users and has {len(everyone)}; "
                "unassign one first",
                1,
            )
        store.assign(email, product)
    finally:
        store.close()
    hint = "" if _has_password(config, email) else "; set a password with `floatd users passwd`"
    click.echo(f"assigned {email} to {product}{hint}")


def _has_password(config: Config, email: str) -> bool:
    from floatd.users import UserStore

    store = UserStore(config.database_path)
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
    from floatd.admin import AdminClient
    from floatd.users import UserStore

    config = _load(config_path)
    terms = _user_product(config, product)
    store = UserStore(config.database_path)
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
    from floatd.users import UserStore, generate_password, hash_password

    config = _load(config_path)
    ent = _entitlement_or_fail(config)
    store = UserStore(config.database_path)
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
    from floatd.users import LicenseUser, UserStore

    config = _load(config_path)
    ent = _entitlement_or_fail(config)
    store = UserStore(config.database_path)
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
        _table(
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
