"""The audit trail and usage reports, read from the state database."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import click

from floatd.cli.base import (
    _echo_json,
    _entitled_caps,
    _fail,
    _load,
    config_option,
    guarded,
    json_option,
    main,
    table,
)
from floatd.config import Config, read_dsn
from floatd.store.audit import AUDIT_EVENTS, Trail

# --- the audit trail ----------------------------------------------------------------


TABLE_LIMIT = 10_000


def _when(text: str | None, default: float, now: float, option: str) -> float:
    from floatd.store.audit import parse_when

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
    from floatd.store import audit as trail

    config = _load(config_path)
    now = time.time()
    start = _when(since, now - 86400, now, "--since")
    end = _when(until, now + 1, now, "--until")
    # A table must be held in memory to align it; JSON streams, so only the
    # table gets a default cap.
    cap = limit if limit is not None or as_json else TABLE_LIMIT
    db = _open_trail(config)
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
                _code(r.code, r.count, r.rule),
            ]
            for r in records
        ]
    finally:
        db.db.close()
    if not rows:
        click.echo("no audit records in that range")
        return
    headers = ["TIME", "EVENT", "PRODUCT", "LEASE", "FINGERPRINT", "USER", "HOSTNAME", "ADDRESS"]
    click.echo(table([*headers, "CODE"], rows))
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
    from floatd.core.report import CSV_COLUMNS, build_report, plot_report
    from floatd.store import audit as trail

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
    db = _open_trail(config)
    try:
        intervals = trail.lease_intervals(db, start, end, now)
        refusals = trail.seat_refusals(db, start, end)
    finally:
        db.db.close()
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
            table(
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


def _open_trail(config: Config) -> Trail:
    """The audit trail this config's server writes: its SQLite state, or on a
    cluster node the cluster's database (the whole cluster's trail)."""
    from floatd.store import audit as trail

    if config.state_backend == "postgresql":
        from floatd.store import cluster

        return trail.cluster_trail(cluster.connect(read_dsn(config)))
    return trail.Trail(trail.open_readonly(config.database_path))


def _code(code: str | None, count: int, rule: str | None) -> str | None:
    """The CODE column: the refusal's code, how many a folded flood held, and
    the policy rule behind a POLICY_DENIED."""
    if code is None:
        return None
    return code + (f" (x{count})" if count != 1 else "") + (f" ({rule})" if rule else "")
