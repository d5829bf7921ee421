"""The state writer process: SQLite commits outside the server's GIL.

``floatd serve`` commits through :class:`ProcessLeaseStore`.  It reduces each
batch to plain rows (:func:`floatd.store.sqlite.prepare`, which must read the live
lease objects in the server) and sends them over a pipe to a child process
that owns the only writing SQLite connection and runs the transaction there.
The group committer drives it from a trio task that awaits the pipe, so the
server makes no blocking call for a commit and still has one writer.

Why a process: measured on a two-core machine, a thread running the same
SQLite writes cost the event loop about as much CPU as the writes themselves
(the thread takes the GIL back after every statement, and each hand-over
stalls the loop), so durable acquires ran about a quarter slower than with no
store at all.  With the writes in another process, the server's side of a
commit is one msgpack call and two pipe syscalls.  docs/performance.md has
the figures.

The child:
- takes an exclusive lock on ``<db>.writer.lock`` for its lifetime, so a new
  server's writer waits until a killed server's writer has finished the commit
  it was in (its leases are then read by the new server, never lost or added
  behind its back);
- ignores SIGINT, SIGTERM and SIGHUP: a stop signal sent to the whole group
  (Ctrl-C, systemd) must not kill it before the server's final flush; it exits
  when the server closes the pipe, or dies with it;
- answers every batch with ``[None, lines]`` (committed: durable, as
  ``synchronous=FULL`` makes it) or ``[error message, ""]``.

``lines`` are the log lines of the batch's lease events (grants, renewals,
releases, expiries, revokes), rendered by the child from their audit records
once they are committed: the server hands them to its log buffer and skips
rendering them itself, which took the largest single piece of a renewal off
the event loop.  The server still writes every line, so lines stay whole and
in one stream.  The service marks the records concerned (``Audit.log``); with
console logs, or lease events below the log level, it marks none.

If the child dies, the batch in flight fails like any store error (its
requests get ``INTERNAL`` and their seats back) and the next batch starts a
new child.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import site
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import msgpack
import trio

from floatd.core.changes import Change, SetMeta
from floatd.core.codec import pack
from floatd.core.seats import Lease
from floatd.errors import StoreError
from floatd.logs import get_logger, lease_line
from floatd.store.identity import META_STATE_ID, StateIdentity
from floatd.store.sqlite import SQLiteLeaseStore, WriteSet, prepare

log = get_logger()
_LENGTH = struct.Struct(">I")
READY = "ready"
# A batch is bounded by what the server can cut between two commits; this only
# guards the reader against a corrupt length.
MAX_MESSAGE = 1 << 30
WAITING = "waiting"
#: How long a child that was asked to end (its pipe closed) may take before it
#: is killed: a stopped child never reads the end of its input.
CLOSE_WAIT = 2.0


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("pipe closed")
    return data


def _frame(value: Any) -> bytes:
    body = pack(value)
    return _LENGTH.pack(len(body)) + body


def _body_size(header: bytes | bytearray) -> int:
    (size,) = _LENGTH.unpack_from(header)
    if size > MAX_MESSAGE:
        raise EOFError(f"message of {size} bytes")
    return int(size)


def send_message(stream: IO[bytes], value: Any) -> None:
    stream.write(_frame(value))
    stream.flush()


def receive_message(stream: IO[bytes]) -> Any:
    size = _body_size(_read_exact(stream, _LENGTH.size))
    return msgpack.unpackb(_read_exact(stream, size), use_list=True)


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".writer.lock")


class ProcessLeaseStore:
    """A :class:`floatd.store.sqlite.LeaseStore` whose commits run in a child process.

    ``apply`` blocks (the server uses it once, before its event loop starts);
    ``apply_async`` is what the group committer awaits while serving.  Reads
    (only at start) go through a connection of its own in this process, opened
    once the child is ready, so they see everything any earlier writer committed.
    """

    def __init__(self, database: Path, lease_lines: Callable[[str], None] | None = None) -> None:
        self._database = database
        # Where the lease event lines the child renders go; None: it renders none.
        self._lease_lines = lease_lines
        self._proc: subprocess.Popen[bytes] | None = None
        self._streams: tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream] | None = None
        self._buffer = bytearray()
        self._proc = self._spawn()
        self.identity = StateIdentity(database)
        try:
            self._local = SQLiteLeaseStore(database)
            self._local.check()
            self._claim()
        except BaseException:
            self._reap(kill=True)
            raise

    def _claim(self) -> None:
        """Refuse a database that is not the one this server wrote; on a first
        start, record its id (see floatd.store.identity)."""
        new = self.identity.claim(self._local.load_meta())
        if new is not None:
            try:
                self.apply([SetMeta(META_STATE_ID, new)])
            except StoreError:
                pass  # a disk that refuses writes: the next start records it
            else:
                self.identity.write_marker(new)
        self.identity.pin()

    def check_identity(self) -> None:
        self.identity.check()

    def _popen(self) -> subprocess.Popen[bytes]:
        """Start a child.  Only ever from the thread that runs the server (the
        main thread): the child's parent-death signal follows the *thread*
        that started it, and a worker thread retires when idle."""
        env = dict(os.environ)
        # The child must import this very package.  Installed, it finds it by
        # itself; from a source tree put on sys.path by other means (tests,
        # benchmarks), it is told where.  Never prepend site-packages itself:
        # that would put it ahead of the standard library.
        package_root = str(Path(__file__).resolve().parent.parent)
        if package_root not in {*site.getsitepackages(), site.getusersitepackages()}:
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "floatd.store.writer", str(self._database)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise StoreError(f"cannot start the state writer: {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        return proc

    def _spawn(self) -> subprocess.Popen[bytes]:
        """(Blocking.)  A child that is ready to commit."""
        proc = self._popen()
        assert proc.stdout is not None
        try:
            ready = receive_message(proc.stdout)
            if ready == WAITING:
                self._waiting()
                ready = receive_message(proc.stdout)
        except (EOFError, ValueError):
            ready = None
        try:
            self._check_ready(ready)
        except StoreError:
            proc.kill()
            proc.wait()
            raise
        return proc

    def _waiting(self) -> None:
        # An earlier writer (of a server killed a moment ago) still holds the
        # lock; the child waits for it, and the log says so.
        log.warning("state_writer_waiting", lock=str(lock_path(self._database)))

    def _check_ready(self, ready: Any) -> None:
        """The child's first word is READY, or why it could not start."""
        if ready != READY:
            raise StoreError(str(ready or f"the state writer for {self._database} exited"))

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._reap(kill=True)
            self._proc = self._spawn()
        return self._proc

    def load_leases(self) -> list[Lease]:
        return self._local.load_leases()

    def load_meta(self) -> dict[str, str]:
        return self._local.load_meta()

    def apply(self, changes: Sequence[Change]) -> None:
        proc = self._running()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            send_message(proc.stdin, list(prepare(changes)))
            answer = receive_message(proc.stdout)
        except (OSError, EOFError, ValueError) as exc:
            self._reap(kill=True)
            raise StoreError(f"the state writer failed: {exc}") from None
        self._committed(answer)

    async def apply_async(self, changes: Sequence[Change]) -> None:
        # Rows are built here, on the event loop: they read live lease objects.
        frame = _frame(list(prepare(changes)))
        if self._streams is None or self._proc is None or self._proc.poll() is not None:
            if self._proc is not None and self._proc.poll() is not None:
                self._reap(kill=True)  # it died: close our ends here, on the loop
            await self._restart()
        assert self._streams is not None
        out, into = self._streams
        try:
            await out.send_all(frame)
            answer = await self._receive(into)
        except (OSError, EOFError, ValueError, trio.BrokenResourceError) as exc:
            self._reap(kill=True)
            raise StoreError(f"the state writer failed: {exc}") from None
        self._committed(answer)

    def renders_lease_lines(self) -> bool:
        return self._lease_lines is not None

    def _committed(self, answer: Any) -> None:
        """Raise the child's error, or hand on the lines of a committed batch."""
        if not (isinstance(answer, list) and len(answer) == 2):
            self._reap(kill=True)
            raise StoreError(f"the state writer answered {answer!r:.100}")
        error, lines = answer
        if error is not None:
            raise StoreError(str(error))
        if lines and self._lease_lines is not None:
            self._lease_lines(str(lines))

    async def _restart(self) -> None:
        """A live child, and non-blocking streams on its pipes.  A new child is
        started here, in the server's thread (see :meth:`_popen`), and waited
        for without blocking the event loop."""
        proc = self._proc
        started = proc is None or proc.poll() is not None
        if started:
            self._reap(kill=True)
            proc = self._proc = self._popen()
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self._buffer.clear()
        self._streams = (
            trio.lowlevel.FdStream(os.dup(proc.stdin.fileno())),
            trio.lowlevel.FdStream(os.dup(proc.stdout.fileno())),
        )
        if not started:
            return
        try:
            ready = await self._receive(self._streams[1])
            if ready == WAITING:
                self._waiting()
                ready = await self._receive(self._streams[1])
        except (OSError, EOFError, ValueError, trio.BrokenResourceError):
            ready = None
        try:
            self._check_ready(ready)
        except StoreError:
            self._reap(kill=True)
            raise

    async def _receive(self, stream: trio.lowlevel.FdStream) -> Any:
        buffer = self._buffer
        while True:
            if len(buffer) >= _LENGTH.size:
                end = _LENGTH.size + _body_size(buffer)
                if len(buffer) >= end:
                    value = msgpack.unpackb(bytes(buffer[_LENGTH.size : end]))
                    del buffer[:end]
                    return value
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("the state writer exited")
            buffer += data

    def _reap(self, kill: bool = False) -> None:
        """Forget the child: close our ends of its pipes and wait for it to go
        (at once when ``kill``: a failed child is not worth waiting for)."""
        proc, self._proc = self._proc, None
        streams, self._streams = self._streams, None
        for fd_stream in streams or ():
            # Outside trio close() cannot notify; dropping the stream closes its fd.
            with contextlib.suppress(RuntimeError):
                fd_stream.close()
        del streams
        if proc is None:
            return
        if kill:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(timeout=CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def abort(self) -> None:
        """Kill the child now (a commit overdue): it can no longer commit a batch
        the server has already given up on.  The next batch starts a new one."""
        self._reap(kill=True)

    def close(self) -> None:
        """End the child (it exits at the end of its input) and close the reader."""
        self._reap()
        self._local.close()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the server dies (``PR_SET_PDEATHSIG``).

    A writer whose server was killed must not live on holding the lock: a new
    server would wait for it forever if it had been stopped (SIGSTOP).  Killing
    it mid-commit is safe, since SQLite rolls an unfinished transaction back."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def child_main(database: Path) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return 1  # the server died before the request took effect
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path(database), "a+b")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            send_message(stdout, WAITING)
            fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as exc:
        send_message(stdout, f"cannot lock {lock_path(database)}: {exc.strerror}")
        return 1
    try:
        store = SQLiteLeaseStore(database)
    except StoreError as exc:
        send_message(stdout, str(exc))
        return 1
    send_message(stdout, READY)
    while True:
        try:
            message = receive_message(stdin)
        except EOFError:
            break
        try:
            deletes, puts, expiries, audit, meta, prune, log = message
            store.write(
                WriteSet(
                    deletes,
                    [tuple(p) for p in puts],
                    [(i, e) for i, e in expiries],
                    [tuple(a) for a in audit],
                    [(k, v) for k, v in meta],
                    None if prune is None else (prune[0], prune[1]),
                    log,
                )
            )
        except StoreError as exc:
            send_message(stdout, [str(exc), ""])
        except Exception as exc:  # a bad message must not leave the server waiting
            send_message(stdout, [f"state write failed: {exc!r}", ""])
        else:
            send_message(stdout, [None, _lease_lines(audit, log)])
    store.close()
    return 0


def _lease_lines(audit: list[list[Any]], rows: list[int]) -> str:
    """The log lines of the committed lease events ``rows`` names, dated by their
    records; a row that cannot be rendered loses its line, never the commit."""
    lines = []
    for i in rows:
        try:
            # ts, event, product, lease, fingerprint, instance, user, hostname, peer, ...
            ts, event, product, lease_id, fingerprint, instance, user, _, peer = audit[i][:9]
            lines.append(
                lease_line(
                    f"lease_{event}", lease_id, product, fingerprint, instance, user, peer, ts
                )
            )
        except (IndexError, TypeError, ValueError, OverflowError, OSError):
            continue
    return "\n".join(lines)


def main() -> int:
    """The child's entry point: whatever ends it, one line on stderr, never a
    traceback (the server's log is JSON lines, and journald shows this beside)."""
    try:
        return child_main(Path(sys.argv[1]))
    except (BrokenPipeError, KeyboardInterrupt):
        return 1  # the server is gone: nobody to tell
    except Exception as exc:
        sys.stderr.write(
            json.dumps({"event": "state_writer_failed", "level": "error", "reason": repr(exc)})
            + "\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
