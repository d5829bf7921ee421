"""floatd-authority: the trail of every change made on the vendor's side."""

from __future__ import annotations

from typing import Any

import click

from floatd.authority.cli.base import Ctx, echo_json, guarded, json_option, main, pass_ctx
from floatd.authority.documents import change_doc
from floatd.cli.base import table
from floatd.store.audit import iso


@main.command()
@click.option("--subject", help="Only changes of this: license:ID, product:CODE, activation:ID.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="The newest N."
)
@json_option
@pass_ctx
@guarded
def history(ctx: Ctx, subject: str | None, limit: int, as_json: bool) -> None:
    """Who changed what and when (products, licenses, users, activations), newest
    first, with the state before and after."""
    changes = ctx.authority().store.changes(subject, limit)
    if as_json:
        echo_json([change_doc(c) for c in changes])
        return
    if not changes:
        click.echo("no changes")
        return
    click.echo(
        table(
            ["AT", "ACTOR", "ACTION", "SUBJECT", "CHANGED"],
            [[iso(c.at), c.actor, c.action, c.subject, _diff(c.before, c.after)] for c in changes],
        )
    )


def _diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """What changed, in one line: the keys whose value differs (terms flattened)."""
    if before is None or after is None:
        return "created" if before is None else "removed"
    old, new = _flat(before), _flat(after)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!s} -> {new.get(k)!s}" for k in keys) or "-"


def _flat(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key == "terms":
            out.update(value)
        else:
            out[key] = value
    return out
