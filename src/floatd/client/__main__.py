"""``python -m floatd.client``: an end user borrows a seat for a trip, lists
what is borrowed, and returns it early.

    python -m floatd.client borrow --server licenses.lan:7411 --product cad --for 3d
    python -m floatd.client borrowed [--json]
    python -m floatd.client return --product cad [--server licenses.lan:7411]

Exit status: 0 done, 1 refused or failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
import trio

from floatd.client import borrowing
from floatd.client.lease import lease
from floatd.errors import FloatdError


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Borrow a floating seat for offline use, and give it back."""


@main.command()
@click.option("--server", "servers", multiple=True, required=True, help="host:port (repeatable).")
@click.option("--product", required=True, help="The product code.")
@click.option("for_", "--for", required=True, help="How long: 3d, 12h, 90m or seconds.")
@click.option("--user", help="The license user, for products that need one.")
@click.option("--password", help="The license user's password.")
def borrow(
    servers: tuple[str, ...], product: str, for_: str, user: str | None, password: str | None
) -> None:
    """Borrow a seat of PRODUCT for the given time; it is kept on this machine."""
    try:
        seconds = borrowing.parse_duration(for_)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None

    async def run() -> float:
        async with lease(list(servers), product, user=user, password=password) as held:
            await held.borrow(seconds)
            return time.time() + held.expires_in

    try:
        until = trio.run(run)
    except FloatdError as exc:
        _fail(f"not borrowed: {exc.code}: {exc.message}")
    click.echo(f"borrowed {product} until {_iso(until)}; kept in {borrowing.borrow_dir()}")


@main.command()
@click.option("--vendor-key", "vendor_keys", multiple=True, help="ed25519:... (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def borrowed(vendor_keys: tuple[str, ...], as_json: bool) -> None:
    """What is borrowed on this machine; checked offline with --vendor-key."""
    rows: list[dict[str, Any]] = []
    for doc in borrowing.stored():
        row: dict[str, Any] = {"product": doc["product"], "lease": doc.get("lease")}
        if vendor_keys:
            try:
                got = borrowing.borrowed(doc["product"], vendor_keys)
            except FloatdError as exc:
                row.update(valid=False, problem=exc.message, step=getattr(exc, "step", None))
            else:
                row.update(
                    valid=True, until=got.not_after, seconds_left=got.seconds_left(time.time())
                )
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo("nothing borrowed on this machine")
    for row in rows:
        if "valid" not in row:
            click.echo(f"{row['product']}: stored (give --vendor-key to check it)")
        elif row["valid"]:
            click.echo(f"{row['product']}: borrowed until {_iso(row['until'])}")
        else:
            click.echo(f"{row['product']}: NOT valid ({row['step']}): {row['problem']}")


@main.command("return")
@click.option("--server", "servers", multiple=True, help="host:port; default: where it came from.")
@click.option("--product", required=True, help="The product code.")
def return_(servers: tuple[str, ...], product: str) -> None:
    """Give a borrowed seat back early: it is free at the server at once."""
    try:
        trio.run(borrowing.return_borrow, list(servers) or None, product)
    except (FloatdError, OSError) as exc:
        _fail(f"not returned: {exc}")
    click.echo(f"returned {product}")


if __name__ == "__main__":
    main()
