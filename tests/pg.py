"""A real PostgreSQL for the tests, started by the tests themselves.

``initdb`` into a fresh directory, ``postgres`` on a free loopback port, trust
authentication for a superuser named ``floatd``; stopped (fast) at the end.
PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` account that Debian's package creates.  The binaries come from
``PATH`` or ``/usr/lib/postgresql/<version>/bin``, installed with apt (as
root) when missing.  A machine where that cannot happen fails the tests that
need a database, loudly: a skipped cluster test would be a check that
cannot fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon import free_port
from packages import apt_install

START_TIMEOUT = 60


def _binary(name: str) -> str:
    for attempt in range(2):
        found = shutil.which(name)
        if found:
            return found
        for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
            return candidate
        if attempt == 0:
            apt_install("postgresql")  # as the browser tests do with Chromium
    raise RuntimeError(f"PostgreSQL's {name} is missing even after installing postgresql")


def _as_owner(argv: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


class Postgres:
    """A throwaway PostgreSQL server: its DSN, and stop and start for the tests
    of a database that goes away under the nodes."""

    def __init__(self, root: Path, port: int, owner: str | None) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self.owner = owner
        self.url = f"postgresql://floatd@127.0.0.1:{port}/postgres"

    def init(self) -> None:
        subprocess.run(
            _as_owner(
                [
                    *(_binary("initdb"), "-D", str(self.data), "-U", "floatd"),
                    *("--auth=trust", "-E", "UTF8"),
                ],
                self.owner,
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=on"
        subprocess.run(
            _as_owner(
                [
                    *(_binary("pg_ctl"), "-D", str(self.data), "-o", options),
                    *("-l", str(self.root / "log"), "-w", "-t", str(START_TIMEOUT), "start"),
                ],
                self.owner,
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT + 10,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_owner([_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "stop"], self.owner),
            capture_output=True,
            timeout=START_TIMEOUT,
        )


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A running PostgreSQL of its own, stopped (fast) and removed at the end."""
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        pwd.getpwnam(owner)  # KeyError: the package's account is missing
    root = Path(tempfile.mkdtemp(prefix="floatd-pg-"))
    server = Postgres(root, free_port(), owner)
    try:
        if owner:
            shutil.chown(root, owner)
        server.init()
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres() -> Iterator[str]:
    """A running PostgreSQL; yields a DSN for its ``postgres`` database."""
    with postgres_server() as server:
        yield server.url


def fresh_database(dsn: str, name: str) -> str:
    """A new, empty database on the server at ``dsn`` (dropped first if there);
    its DSN."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return dsn.rsplit("/", 1)[0] + "/" + name


class TcpProxy:
    """A loopback TCP forwarder to ``port`` that the test can cut (every
    connection closed, new ones refused) and restore: one node losing its
    way to the database while the others keep theirs."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in its thread
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
