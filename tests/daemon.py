"""Run the real ``floatd serve`` as a child process, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port free right now (for servers that must keep their port
    across a restart)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    """Poll (real time, every 50 ms) until ``predicate()`` holds, at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.addresses: list[str] = []
        self.status: list[str] = []
        self._log_offset = 0
        #: Extra environment for the daemon (tests pass it to every start).
        self.env: dict[str, str] = {}

    def start(
        self,
        port: int = 0,
        also: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        until: str = "listening",
    ) -> int:
        """Start and wait (bounded) for the ``listening`` event; returns the port.
        ``also`` adds listeners (host:port), reported in ``self.addresses``;
        the status endpoint's addresses land in ``self.status``."""
        listen = [f"127.0.0.1:{port}", *also]
        with open(self.log, "ab") as out:
            self._log_offset = out.tell()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "floatd",
                    "serve",
                    "--config",
                    str(self.config),
                    *(arg for addr in listen for arg in ("--listen", addr)),
                    "--log-format",
                    "json",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FLOATD_CONFIG": "", **(env or {})},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == until != "listening":
                    return 0  # up, and not listening (a cluster node over the limit)
                if event.get("event") == "listening":
                    self.addresses = list(event["addresses"])
                    self.status = list(event.get("status", []))
                    self.port = int(self.addresses[0].rsplit(":", 1)[1])
                    return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"floatd exited with {self.proc.returncode}: {self.output()}")
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"floatd did not start in {START_TIMEOUT}s: {self.output()}")

    def http(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        """One request to the daemon's status endpoint: (status, body)."""
        import http.client

        host, port = self.status[0].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def output(self) -> str:
        return self.log.read_bytes()[self._log_offset :].decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill9()


class AuthorityProcess:
    """``floatd-authority serve`` as a child process on a fixed loopback port,
    so it can be stopped and started again at the same URL."""

    def __init__(
        self, db: Path, key: Path, port: int, log: Path, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.db, self.key, self.port, self.log = db, key, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            offset = out.tell()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "floatd.authority",
                    "--db",
                    str(self.db),
                    "serve",
                    "--key",
                    str(self.key),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    *(
                        ("--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1]))
                        if self.tls
                        else ()
                    ),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if b"authority_listening" in self.log.read_bytes()[offset:]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"authority exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError("authority did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> AuthorityProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
