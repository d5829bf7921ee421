"""Running the daemon: serve (the composition root), check-config, fingerprint,
the demo."""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

if TYPE_CHECKING:
    from floatd.store.pg_ledger import PgLedger

from floatd.cli.base import (
    _load,
    _server_id,
    config_option,
    guarded,
    main,
)
from floatd.config import Config, load_config, read_dsn, read_policy
from floatd.errors import ConfigError, StoreError


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
    from floatd.daemon.listeners import tls_context
    from floatd.store.sqlite import make_private
    from floatd.store.writer import lock_path

    tls_context(config)
    tls_context(config, "status")
    read_policy(config.policy_file)
    # A cluster node's id is the cluster's, read when it joins (run_server).
    server_id = _server_id(config) if config.state_backend == "sqlite" else ""
    try:
        make_private(config.state_dir)
        with open(lock_path(config.database_path), "a+b"):
            pass
    except OSError as exc:
        raise ConfigError(
            "state.dir", f"cannot use {config.state_dir}: {exc.strerror or exc}"
        ) from None
    return server_id


def _wall_clock() -> Callable[[], float]:
    """The server's wall clock: ``time.time``.  For fault tests of the real
    process only, ``FLOATD_TEST_CLOCK_OFFSET`` names a file whose number of
    seconds is added to it (looked at most once a second), as if an admin had
    set the clock; unset, nothing is looked at."""
    path = os.environ.get("FLOATD_TEST_CLOCK_OFFSET")
    if not path:
        return time.time
    seen = [-math.inf, 0.0]  # when the file was read (monotonic), its offset

    def stepped() -> float:
        now = time.monotonic()
        if now - seen[0] >= 1.0:
            seen[0] = now
            try:
                seen[1] = float(Path(path).read_text() or 0)
            except (OSError, ValueError):
                seen[1] = 0.0
        return time.time() + seen[1]

    return stepped


def run_server(
    config: Config,
    loader: Callable[[], Config] | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    from floatd import logs
    from floatd.daemon.server import Server
    from floatd.daemon.systemd import Notifier
    from floatd.store.writer import ProcessLeaseStore

    logs.configure(config.log_level, config.log_format)
    server_id = check_startable(config)
    cluster = None
    if config.state_backend == "postgresql":
        cluster = _join_cluster(config)
        server_id = cluster[2]
    store = ProcessLeaseStore(config.database_path, lease_lines=logs.write_lines)
    notifier = Notifier()
    try:
        server = Server(
            config,
            store,
            server_id,
            clock=_wall_clock(),
            config_loader=loader,
            notifier=notifier,
            cluster=cluster[:2] if cluster is not None else None,
        )
        trio.run(_serve, server, on_listening)
    finally:
        store.close()
        notifier.close()
        if cluster is not None:
            cluster[0].close()


def _join_cluster(config: Config) -> tuple[PgLedger, str, str]:
    """A cluster node's ledger on the database (its schema migrated, this
    node's rows from an earlier run cleared), the DSN, the cluster fingerprint.
    StoreError (exit 1) when the database cannot be reached."""
    import socket

    import psycopg

    from floatd.daemon.cluster import connect_node
    from floatd.store import cluster
    from floatd.store.pg_ledger import PgLedger
    from floatd.store.pg_shared import share_server_key

    dsn = read_dsn(config)
    try:
        conn = connect_node(dsn)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot reach the cluster database: {reason}") from None
    cluster.init(conn)
    share_server_key(conn, config.state_dir)
    ledger = PgLedger(conn, config.cluster_node or socket.gethostname())
    ledger.forget_node(ledger.database_time(), ledger.node)
    return ledger, dsn, cluster.fingerprint(conn)


#: The cyclic collector's thresholds while serving (Python's default: 700, 10, 10).
#: Every request allocates a few short-lived containers (the parsed request, its
#: answer, the journal's change records, trio's wake-ups) that reference counting
#: frees; at the default the collector ran a young-generation pass every few
#: dozen requests and an older one every few hundred.  Under
#: ``bench/throughput.py``'s load (docs/performance.md) acquires ran about 9%
#: and renewals about 5% faster with these.  Cycles are still collected, only
#: in larger steps.
GC_THRESHOLDS = (10_000, 50, 50)


def tune_gc() -> None:
    """Move what start-up built (the loaded leases, config, modules) out of the
    collector's sight, and collect the young generations less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve(server: Any, on_listening: Callable[[], None] | None = None) -> None:
    # Bind first: a port in use ends the start before the state is touched
    # (load_state marks it in use, so a failed start would look like a crash).
    await server.bind()
    server.load_state()
    tune_gc()
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
    """Print this server's fingerprint (what entitlements are bound to); on a
    cluster node, the cluster's."""
    config = _load(config_path)
    if config.state_backend == "postgresql":
        from floatd.cli.cluster import cluster_fingerprint

        click.echo(cluster_fingerprint(config))
        return
    click.echo(_server_id(config))


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
