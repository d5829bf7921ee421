"""What every floatd command shares: the group, errors as one line (or JSON)
and exit statuses, config loading, talking to the daemon, tables."""

from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from floatd import __version__
from floatd.config import Config, load_config, read_dsn, read_machine_id
from floatd.core.entitlement import Entitlement
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
    """What entitlements for this server name: its fingerprint, or on a cluster
    node the cluster's (whose server key, kept in the database, this node's
    state dir then holds: activation requests name it)."""
    from floatd.core.entitlement import server_fingerprint

    if config.state_backend == "postgresql":
        from floatd.store import cluster
        from floatd.store.pg_shared import share_server_key

        conn = cluster.connect(read_dsn(config))
        try:
            fingerprint = cluster.fingerprint(conn)
            with conn.transaction():
                share_server_key(conn, config.state_dir)
            return fingerprint
        finally:
            conn.close()
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


# --- talking to the running daemon -------------------------------------------------


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Stable machine output.")(fn)


def _admin(config: Config) -> Any:
    from floatd.daemon.admin import AdminClient

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


def table(headers: list[str], rows: list[list[Any]]) -> str:
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


def _installed_entitlement(config: Config, now: float) -> Entitlement:
    """The installed entitlement, verified for this server; its time windows are
    not checked here (these commands also serve expired licenses).  Raises
    FileNotFoundError when none is installed, EntitlementError when it does not
    verify."""
    from floatd.core.entitlement import trusted_keys, verify_entitlement
    from floatd.store.activation import read_armored
    from floatd.store.server_key import public_key_text

    text = read_armored(config.entitlement_path)
    keys = trusted_keys(config.vendor_keys)
    mine = public_key_text(config.state_dir)
    return verify_entitlement(text, keys, _server_id(config), now, math.inf, mine)


def _entitled_caps(config: Config, now: float) -> dict[str, int | None]:
    """Each entitled product's seat cap (None: unlimited), from the installed
    entitlement; empty if there is none that verifies."""
    from floatd.errors import EntitlementError

    try:
        ent = _installed_entitlement(config, now)
    except (OSError, EntitlementError, ConfigError):
        return {}
    return {p.code: (None if p.unlimited else p.seats) for p in ent.products}
