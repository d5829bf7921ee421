"""floatd probe: can this machine reach a license server and lease?"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from floatd import __version__
from floatd.cli.base import (
    _echo_json,
    json_option,
    main,
)
from floatd.errors import FloatdError

if TYPE_CHECKING:
    from floatd.client.connection import Connection

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
        Connection,
        ConnectionLost,
        Unreachable,
        tls_context,
        wire_code,
    )

    report: dict[str, Any] = {"result": "unreachable", "lines": []}
    lines: list[str] = report["lines"]
    context = tls_context(tls_ca) if tls else None
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
        try:
            await _check(conn, product, take, credentials, report)
        except ConnectionLost as exc:
            lines.append(f"unreachable: {exc.message}")
            report["result"] = "unreachable"
        finally:
            await conn.aclose()
        # A cluster node that lost its database, or a server that went away
        # mid-probe: another server of the list may still serve (cluster.md).
        if report["result"] == "unreachable" or report.get("error", {}).get("code") == (
            "UNAVAILABLE"
        ):
            report["result"] = "unreachable"
            report.pop("error", None)
            continue
        return report
    return report


async def _check(
    conn: Connection,
    product: str,
    take: bool,
    credentials: dict[str, Any],
    report: dict[str, Any],
) -> None:
    """Ask a reached server about ``product`` (and take a seat, with ``take``)."""
    from floatd.client.connection import INSTANCE_ID, refusal, wire_code
    from floatd.client.fingerprint import machine_fingerprint

    lines: list[str] = report["lines"]
    info = await conn.request("info", product=product)
    if not info.get("ok"):
        no = refusal(info.get("error"))
        lines.append(f"refused: {wire_code(no)}: {no.message}")
        report.update(result="refused", error=_err(no))
        return
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
            return
        await conn.request("release", lease=got["lease"], token=got["token"])
        report["lease"] = {"taken": True, "released": True, "expires_in": got["expires_in"]}
        lines.append(f"took a seat (lease {got['lease']}) and gave it back")
    report["result"] = "ok"
    lines.append("ok")


def _err(exc: FloatdError) -> dict[str, Any]:
    from floatd.client.connection import wire_code

    return {"code": wire_code(exc), "message": exc.message, **exc.details}
