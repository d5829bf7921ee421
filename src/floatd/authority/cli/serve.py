"""floatd-authority: Serving the authority's HTTP API."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path
from typing import Any

import click
import trio

from floatd.authority.cli.base import Ctx, die, guarded, key_option, load_key, main, pass_ctx
from floatd.config import parse_hostport

# --- serve --------------------------------------------------------------------------------


@main.command()
@click.option(
    "--listen", default="127.0.0.1:7500", show_default=True, help="host:port to serve the API on."
)
@key_option
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
            die(f"cannot load the TLS certificate: {exc}")
    logs.configure("info", "json")
    api = AuthorityApi(ctx.authority(load_key(key_path)), tls=tls)
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
