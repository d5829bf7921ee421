"""The ``floatd`` command line.

Exit status: 0 success, 1 refused or failed, 2 usage or config error; a failure
is one line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from floatd import __version__
from floatd.config import Config, load_config, read_machine_id
from floatd.errors import ConfigError, FloatdError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, status: int) -> NoReturn:
    click.echo(f"floatd: {message}", err=True)
    sys.exit(status)


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="Config file (default: $FLOATD_CONFIG, else /etc/floatd/floatd.toml).",
    )(fn)


def guarded(fn: F) -> F:
    """Map floatd's errors onto one stderr line and the documented exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
            _fail(f"config error: {exc.message}", 2)
        except FloatdError as exc:
            _fail(exc.message, 1)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)

    return wrapper  # type: ignore[return-value]


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


@click.group()
@click.version_option(__version__, prog_name="floatd")
def main() -> None:
    """floatd: an on-premise floating license server."""


@main.command()
@config_option
@click.option("--listen", multiple=True, help="host:port for the lease protocol (repeatable).")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Overrides [state] dir.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["json", "console"]))
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
    run_server(_load(config_path, overrides))


def run_server(config: Config) -> None:
    from floatd import logs
    from floatd.server import Server
    from floatd.store import SQLiteLeaseStore

    logs.configure(config.log_level, config.log_format)
    server_id = _server_id(config)
    store = SQLiteLeaseStore(config.database_path)
    try:
        server = Server(config, store, server_id)
        server.load_state()
        trio.run(_serve, server)
    finally:
        store.close()


async def _serve(server: Any) -> None:
    await server.bind()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)

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
            text = offline_response.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            _fail(f"cannot read {offline_response}: {exc.strerror}", 1)
        ent = activation.install_offline_response(config, _server_id(config), text, now)
        products = ", ".join(
            f"{p.code} ({p.seats if p.seats > 0 else 'unlimited'})" for p in ent.products
        )
        click.echo(f"installed entitlement {ent.id} for license {ent.license}: {products}")
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
    _fail("online activation is not available in this version; use --offline-request", 1)


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=Path("floatd-demo"),
    show_default=True,
    help="Where the demo keeps its key, config and state.",
)
@click.option("--listen", default="127.0.0.1:7411", show_default=True)
@guarded
def demo(directory: Path, listen: str) -> None:
    """Serve a DEMO product right away: throwaway vendor key, no network needed."""
    from floatd.demo import prepare

    config = prepare(directory, listen, time.time())
    host, port = config.listen[0]
    click.echo(
        f"floatd DEMO on {host}:{port}: products 'demo' (5 seats, per machine) and "
        f"'demo-instance' (3 seats, per process).\n"
        f"The key and entitlement in {config.state_dir.parent} are throwaway; this is "
        f"not a real license.\nTake a seat from another shell:\n"
        f"  python3 -m floatd.client.simple {host}:{port} demo\n"
        f"Stop with Ctrl-C.",
        err=True,
    )
    run_server(config)
