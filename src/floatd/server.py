"""The trio shell around the sans-IO core.

A connection's reader turns bytes into requests through
:class:`~floatd.protocol.connection.ServerConnection` and applies each one to the
:class:`~floatd.service.LeaseService` at once, in arrival order, so pipelined
requests see each other's effects.  What each owes the client is a *slot*,
answered strictly in order and only once the batch holding its changes is
durable: in-order answers, pipelining, and durable-before-acknowledged without
a lock.  A slot is answered by whoever makes it ready (the reader, the
completion of its batch, the wake-up of a queued acquire), never by a task
waiting for it, and the answers of one scheduler pass are written together by
the outbox (see :class:`_Connection` and :meth:`Server._send_answers`).

Around the connections run the expiry timer, the entitlement watcher, the log
flusher, the reaper of idle connections and the outbox; the group committer
runs beside them all (:mod:`floatd.committer`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import functools
import heapq
import math
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import trio

from floatd import __version__, logs, online, users
from floatd.activation import atomic_write, check_history, installed_record, read_armored
from floatd.admin import AdminServer, bind_admin_socket, lease_row
from floatd.committer import (
    LAZY_WINDOW,
    META_CLEAN,
    META_LAST_CUT,
    Batch,
    GroupCommitter,
    RunSync,
)
from floatd.config import SCHEMA, Config
from floatd.entitlement import Entitlement, trusted_keys, verify_entitlement
from floatd.errors import (
    AuthorityError,
    Busy,
    ConfigError,
    EntitlementError,
    FloatdError,
    InternalError,
    ListenError,
    StoreError,
    Unavailable,
)
from floatd.frames import receive_frame
from floatd.logs import event_logger, get_logger
from floatd.metrics import RequestStats
from floatd.online import ActivationRecord, AuthorityUnavailable, RefreshSchedule
from floatd.pool import Lease, Waiter
from floatd.protocol.codec import MAX_FRAME, FrameDecoder, encode_frame
from floatd.protocol.connection import Refusal, ServerConnection
from floatd.protocol.messages import (
    Acquire,
    Hello,
    Info,
    Ping,
    Release,
    Renew,
    failure,
    request_id,
)
from floatd.service import LeaseService, limit_key
from floatd.status_http import StatusServer
from floatd.store import (
    Audit,
    Change,
    LeaseStore,
    PruneAudit,
    SetExpiry,
    SetMeta,
    extend_after_crash,
)
from floatd.systemd import Notifier
from floatd.transport import ReadinessHub, TcpStream
from floatd.writer import ProcessLeaseStore

HELLO_TIMEOUT = 10.0
#: A frame must arrive whole within this from its first byte: a client that
#: drips a frame a byte at a time is closed although it is never idle.
FRAME_TIMEOUT = 30.0
BUSY_WAIT = 2.0  # how long an over-limit connection may take to send its hello
MAX_PIPELINE = 64
SHUTDOWN_GRACE = 3.0
ENTITLEMENT_POLL = 1.0
TIMER_MAX_SLEEP = 1.0  # also how soon a wall-clock jump is noticed
AUDIT_PRUNE_INTERVAL = 600.0
CLOCK_MARK_EVERY = 10.0
META_CLOCK_MARK = "clock_mark"
#: The watchdog is fed only while the writer has committed this recently: a
#: hung disk should get the daemon restarted, not look healthy.
WATCHDOG_COMMIT_AGE = 10.0
#: A jump of the wall clock against the monotonic one larger than this between
#: two readings is a step (an admin or NTP setting the clock), not a drift.
CLOCK_STEP = 1.0
#: Freed heap is given back to the OS once this many connections have closed
#: (checked every TRIM_EVERY seconds): see Server._trim_memory.
TRIM_AFTER_CLOSED = 256
TRIM_EVERY = 5.0
#: How often the database file is checked for having been deleted or replaced.
DATABASE_CHECK = 1.0
#: While the state cannot be written, how often a reload from disk is tried.
RECOVERY_RETRY = 1.0
#: ... and how often (in tries) the log says it is still failing.
RECOVERY_LOG_EVERY = 60

#: Config attributes a reload cannot change; the rest apply at once.
RESTART_ONLY = frozenset(
    {"listen", "machine_id_file", "status_listen", "admin_socket", "state_dir"}
)

log = get_logger()


@dataclass(eq=False, slots=True)
class _Slot:
    """One answer owed to the client, in request order.  It may be sent once it
    has a response, is not waiting for a seat, and its batch (if any) is durable."""

    response: dict[str, Any] | None = None
    batch: Batch | None = None
    waiter: Waiter | None = None  # queued for a seat (``wait``) until woken
    owner: _Connection | None = None  # set while waiting: whom to tell
    close: bool = False
    granted: str | None = None  # lease id to give back if the answer cannot be sent
    op: str = "invalid"
    started: float = 0.0  # perf_counter when the request was read


class _Step(enum.Enum):
    """What a connection's reader does next (:meth:`_Connection._apply_buffered`)."""

    READ = "read"  # everything received is applied: read more
    MORE = "more"  # answers made room for requests still buffered
    FULL = "full"  # MAX_PIPELINE answers owed, or a drain running: wait
    PASSWORD = "password"  # an acquire waits for its password check
    CLOSE = "close"  # stop reading (a closing refusal, or the server stops)
    HUNG_UP = "hung_up"  # the client is gone


def _joined(chunks: list[bytes]) -> bytes:
    """One write's bytes; the common single answer is not copied."""
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_UNAVAILABLE = Unavailable(
    "the server cannot write its state right now; nothing was changed, try again"
).to_wire()


def _unavailable(rid: int | None) -> dict[str, Any]:
    return failure(rid, _UNAVAILABLE)


_OPS: dict[type, str] = {
    Hello: "hello",
    Acquire: "acquire",
    Renew: "renew",
    Release: "release",
    Info: "info",
    Ping: "ping",
}


class Server:
    def __init__(
        self,
        config: Config,
        store: LeaseStore,
        server_id: str,
        *,
        clock: Callable[[], float] = time.time,
        run_sync: RunSync | None = None,
        config_loader: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._wall = clock
        self._skew: float | None = None  # wall minus monotonic at the last reading
        self.clock_steps = 0
        self.started_at = clock()
        self.stats = RequestStats()
        # How ``floatd reload`` and SIGHUP re-read the config (file, env, CLI
        # options as at start); None: only the entitlement is re-read.
        self._config_loader = config_loader
        self.notifier = notifier or Notifier({})
        self.server_id = server_id
        self.service = LeaseService(
            server_id,
            config.default_duration,
            allowed_clock_offset=config.allowed_clock_offset,
        )
        self._apply_limits(config)
        self.store = store
        self._use_log(config.log_level)
        # Tests inject an async stand-in so MockClock controls every wait.
        self._run_sync: RunSync = run_sync or trio.to_thread.run_sync
        self.committer = GroupCommitter(store, self.clock, run_sync)
        self.committer.on_failure = self._state_failed
        # Set while the state cannot be written: the recovery task's cue.
        self._unavailable = trio.Event()
        self._unavailable_since: float | None = None
        # Password checks (scrypt) run two at a time at most, off the event loop.
        self._auth_limiter = trio.CapacityLimiter(2)
        self.connections = 0
        self._closed_since_trim = 0
        self._per_address: dict[str, int] = {}
        self.ports: list[tuple[str, int]] = []
        self._keys = trusted_keys(config.vendor_keys)
        self._readers: set[_Connection] = set()
        # Idle and hello deadlines of connections, checked lazily (see _reap).
        self._deadlines: list[tuple[float, int, _Connection]] = []
        self._deadline_seq = 0
        self._reap_rearm = trio.Event()
        # Connections with answers queued since the outbox task last ran.
        self._outbox: list[_Connection] = []
        self._outbox_ready = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self._rearm = trio.Event()
        self._armed_for = math.inf
        self._ent_signature: tuple[int, int, int] | None = None
        # The file refused last, and at how many looks in a row.
        self._rejected: tuple[tuple[int, int, int] | None, int] = (None, 0)
        # What entitlement_installed last said (see _install_entitlement).
        self._logged_terms: object = ()
        self._reload_request = trio.Event()
        self._force_reload = False
        self._conns: trio.Nursery | None = None
        self._hub: ReadinessHub | None = None
        self._listeners: list[trio.SocketListener] = []
        self._status_listeners: list[trio.SocketListener] = []
        self._admin_listener: trio.SocketListener | None = None
        self.status_ports: list[tuple[str, int]] = []
        self.status = StatusServer(self)
        self.online = False  # an online activation is in force (see _refresh_online)
        # Why the last refresh failed (the authority's code and words), until
        # one succeeds: shown by status, not only logged.
        self.refresh_problem: str | None = None
        self._tls = tls_context(config)
        self.status.tls = tls_context(config, "status")

    def clock(self) -> float:
        """The wall clock (unix seconds), watched for steps.

        Within a run, leases follow the monotonic clock: when the wall clock is
        stepped (by hand, or by NTP after a long drift), every lease keeps the
        time it had left rather than its date, so a step forward expires nobody
        and a step back stretches nobody (see :meth:`_clock_stepped`).  Outside
        trio (start-up) there is nothing to compare with yet."""
        wall = self._wall()
        try:
            mono = trio.current_time()
        except RuntimeError:
            return wall
        skew, last = wall - mono, self._skew
        self._skew = skew
        if last is not None and abs(skew - last) > CLOCK_STEP:
            self._clock_stepped(skew - last)
        return wall

    def _clock_stepped(self, delta: float) -> None:
        self.clock_steps += 1
        moved = self.service.shift_time(delta)
        log.warning("clock_stepped", seconds=round(delta, 3), leases_kept=moved)

    async def reset_clock(self) -> dict[str, Any]:
        """``floatd clock reset``: forget the high-water mark of the wall clock,
        after an operator put right a clock that was set far ahead (the guard
        would otherwise refuse leasing until real time caught up).  Leases that
        the wrong clock dated far ahead end a full duration from now at most."""
        if not self.service.writable:
            raise Unavailable("the state cannot be written right now; try again")
        now = self.clock()
        guard = self.service.clock_guard
        old = guard.mark
        guard.mark = now
        guard.start(now, trio.current_time())
        clamped = self.service.clamp_expiries(now, LAZY_WINDOW)
        batch = self.committer.submit(
            [Audit(now, "clock_reset", None), SetMeta(META_CLOCK_MARK, repr(now))]
        )
        self._flush()  # the clamped expiries, into the same batch
        await batch.wait()
        log.warning("clock_mark_reset", old_mark=old, new_mark=now, leases_clamped=clamped)
        return {"old_mark": old, "new_mark": now, "leases_clamped": clamped}

    def _use_log(self, level: str) -> None:
        """Log at ``level`` (after ``logs.configure``).  Lease event lines in JSON
        are then rendered by the state writer when it can (see floatd.writer)."""
        log = event_logger(level)
        self.service.set_log(log)
        store = self.store
        self.service.store_logs_leases = (
            log.lease_lines_as_json
            and isinstance(store, ProcessLeaseStore)
            and store.renders_lease_lines()
        )

    def _apply_limits(self, config: Config) -> None:
        self.service.set_limits(
            config.acquires_per_second,
            config.acquire_burst,
            config.auth_failures_per_minute,
            config.max_waiters,
            config.leases_per_seat,
            config.lease_misses_per_minute,
        )

    # --- start-up ------------------------------------------------------------

    def load_state(self) -> None:
        """Blocking start-up work: entitlement and persisted leases."""
        now = self.clock()
        self._reload_entitlement(now)
        record = ActivationRecord.read(self.config)
        self.online = record is not None and not record.revoked
        meta, leases = self._read_state()
        guard = self.service.clock_guard
        guard.mark = max(float(meta.get(META_CLOCK_MARK, 0)), float(meta.get(META_LAST_CUT, 0)))
        if guard.tampered(now):
            log.warning(
                "clock_went_back",
                now=now,
                latest_seen=guard.mark,
                hint="leasing is refused (SERVER_TIME_MODIFIED) until the clock is right",
            )
        changes = self._restore(meta, leases, now)
        try:
            self.store.apply(changes)
        except StoreError as exc:
            # A full or failing disk: serve what can be read, refuse what would
            # write (UNAVAILABLE), and come back by itself once the disk does.
            self.committer.fail(exc)
            return
        self.committer.last_cut = now

    def _read_state(self) -> tuple[dict[str, str], list[Lease]]:
        """(Blocking.)  The persisted bookkeeping and leases."""
        return self.store.load_meta(), self.store.load_leases()

    def _restore(self, meta: dict[str, str], leases: list[Lease], now: float) -> list[Change]:
        """Put the persisted leases into the pool, as after a crash when the last
        stop was not clean; returns the changes that make the disk agree."""
        extended: list[Lease] = []
        if META_LAST_CUT in meta and meta.get(META_CLEAN) != "1":
            extended = extend_after_crash(leases, float(meta[META_LAST_CUT]), LAZY_WINDOW)
            log.warning(
                "unclean_stop_recovered",
                last_commit=float(meta[META_LAST_CUT]),
                leases_extended=len(extended),
            )
        dead = self.service.restore(leases, now)
        changes: list[Change] = [SetExpiry(le.id, le.expires_at) for le in extended]
        changes += self.service.take_changes()
        log.info("state_restored", leases=len(self.service.pool), expired_while_down=len(dead))
        # From here until the final flush of a clean stop, a crash is unclean.
        return [*changes, SetMeta(META_CLEAN, "0"), SetMeta(META_LAST_CUT, repr(now))]

    # --- when the state cannot be written --------------------------------------

    def _state_failed(self, error: StoreError) -> None:
        """A commit failed or is overdue: stop changing state until a reload from
        disk succeeds (:meth:`_recover`).

        Memory may now hold changes the disk never got (a release, a grant), and
        the committer writes nothing more, so nothing that depends on them can
        reach the disk either.  Requests that would write are refused with
        UNAVAILABLE; queued acquires are answered so; reads go on."""
        service = self.service
        if not service.writable:
            return
        service.writable = False
        self._unavailable_since = self.clock()
        log.error(
            "state_unavailable",
            reason=error.message,
            database=str(self.config.database_path),
            hint="writes refused (UNAVAILABLE) until the state can be written again",
        )
        for waiter, rid in service.abandon_waiters():
            slot = waiter.handle
            if isinstance(slot, _Slot) and slot.waiter is waiter:
                slot.response = _unavailable(rid)
                slot.waiter = None
                owner, slot.owner = slot.owner, None
                if owner is not None:
                    owner.advance()
        self._unavailable.set()

    async def _watch_database(self) -> None:
        """Notice within a second a database deleted or replaced while running:
        writes would go on to a file nobody will ever read again."""
        while True:
            await trio.sleep(DATABASE_CHECK)
            try:
                await self._run_sync(self.store.check_identity)
            except StoreError as exc:
                self.committer.fail(exc)

    async def _recover(self) -> None:
        """While the state cannot be written, reload it from disk once a second,
        exactly as a restart after a crash would, until that reload commits."""
        while True:
            await self._unavailable.wait()
            tries = 0
            while not self.service.writable:
                await trio.sleep(RECOVERY_RETRY)
                tries += 1
                try:
                    await self._reload_state()
                except StoreError as exc:
                    if tries % RECOVERY_LOG_EVERY == 0:
                        log.error("state_still_unavailable", reason=exc.message, tries=tries)
            self._unavailable = trio.Event()

    async def _reload_state(self) -> None:
        """Rebuild the pool from disk and commit that; the service is writable
        again once the commit succeeds (StoreError otherwise)."""
        await self._run_sync(self.store.check_identity)
        meta, leases = await self._run_sync(self._read_state)
        now = self.clock()
        self.service.reset(now)
        changes = self._restore(meta, leases, now)
        await self.committer.recover(changes)
        self.service.writable = True
        since, self._unavailable_since = self._unavailable_since, None
        log.warning(
            "state_recovered",
            leases=len(self.service.pool),
            unavailable_for=None if since is None else round(now - since, 3),
        )
        self._check_deadline()

    def _read_entitlement(self, now: float) -> Entitlement | None:
        path = self.config.entitlement_path
        try:
            text = read_armored(path)
        except FileNotFoundError:
            return None
        ent = verify_entitlement(
            text, self._keys, self.server_id, now, self.config.allowed_clock_offset
        )
        check_history(self.store.load_meta(), ent)
        return ent

    def _entitlement_signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.config.entitlement_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload_entitlement(self, now: float) -> None:
        """Start-up (blocking) form: read, verify and install the entitlement file."""
        self._ent_signature = self._entitlement_signature()
        try:
            ent = self._read_entitlement(now)
        except (EntitlementError, StoreError, OSError) as exc:
            self._reject_entitlement(exc)
            return
        self._install_entitlement(ent, now)

    async def _reload_entitlement_async(self, force: bool) -> str | None:
        """Running form: the file is stat'ed, read and verified in a worker
        thread.  Returns why a new file was rejected, if it was."""
        signature = await self._run_sync(self._entitlement_signature)
        if not force and signature == self._ent_signature:
            return None
        self._ent_signature = signature
        now = self.clock()
        try:
            ent = await self._run_sync(self._read_entitlement, now)
        except (EntitlementError, StoreError, OSError) as exc:  # StoreError: its history
            self._reject_entitlement(exc, at_once=force)
            return str(exc)
        self._install_entitlement(ent, now)
        self._flush()
        # `floatd activate` writes the activation record with the file: say at
        # once whether this one is online or offline.
        record = await self._run_sync(ActivationRecord.read, self.config)
        self.online = record is not None and not record.revoked
        return None

    def _reject_entitlement(self, exc: Exception, at_once: bool = True) -> None:
        """A file that fails verification changes nothing: the old one stays.

        It is read again at every poll, and logged once, at its second look
        unless ``at_once``: the CLI writes a file and then commits its record
        (check_history), so a fresh install can be refused for a moment."""
        signature, self._ent_signature = self._ent_signature, None
        looks = self._rejected[1] + 1 if self._rejected[0] == signature else 1
        self._rejected = (signature, looks)
        if looks != (1 if at_once else 2):
            return
        log.error(
            "entitlement_rejected",
            path=str(self.config.entitlement_path),
            reason=str(exc),
            kept=getattr(self.service.entitlement, "id", None),
        )

    def _install_entitlement(self, ent: Entitlement | None, now: float) -> None:
        self._rejected = (None, 0)
        self.service.install(ent, now)
        if ent is not None and ent.text:  # the one installed last (see check_history)
            rows = installed_record(ent)
            self.committer.submit([SetMeta(k, v) for k, v in rows], urgent=False)
        # Logged when what it says changed, not at every hourly refresh (which
        # brings a new entitlement id and refresh_by, and logs `refreshed`).
        terms = None if ent is None else (ent.license, ent.customer, ent.not_after, ent.products)
        if terms == self._logged_terms:
            return
        self._logged_terms = terms
        if ent is None:
            log.warning("not_activated", path=str(self.config.entitlement_path))
            return
        log.info(
            "entitlement_installed",
            entitlement=ent.id,
            license=ent.license,
            products=[p.code for p in ent.products],
            customer=ent.customer,
            not_after=ent.not_after,
        )
        self._warn_cleartext_passwords()

    def _warn_cleartext_passwords(self) -> None:
        """At start, and when the products or TLS change: passwords of license
        users would cross the LAN in clear."""
        ent = self.service.entitlement
        named = [p.code for p in ent.products if p.authorization == "user"] if ent else []
        if named and self._tls is None:
            log.warning(
                "passwords_without_tls",
                products=named,
                hint="set [server] tls_cert and tls_key: passwords travel in clear",
            )

    # --- running ---------------------------------------------------------------

    async def bind(self) -> None:
        """Open the listeners; separate from :meth:`run` so a port in use is a
        plain OSError for the caller, not one buried in a nursery's group."""
        for host, port in self.config.listen:
            self._listeners.extend(await _listen(host, port, "the lease port (server.listen)"))
        self.ports = [_address(lst) for lst in self._listeners]
        if self.config.status_listen is not None:
            host, port = self.config.status_listen
            self._status_listeners = await _listen(
                host, port, "the status endpoint (status.listen)"
            )
            self.status_ports = [_address(lst) for lst in self._status_listeners]
        if self.config.admin_socket is not None:
            self._admin_listener = bind_admin_socket(self.config.admin_socket)

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not self._listeners:
            await self.bind()
        listeners = self._listeners
        self.service.clock_guard.start(self.clock(), trio.current_time())
        async with trio.open_nursery() as core:
            await core.start(self.committer.run)
            async with trio.open_nursery() as background:
                # Lives longer than every connection: they are all served inside.
                self._hub = ReadinessHub.create()
                if self._hub is not None:
                    background.start_soon(self._hub.run)
                background.start_soon(self._timer)
                background.start_soon(self._watch_entitlement)
                background.start_soon(self._flush_logs)
                background.start_soon(self._reap)
                background.start_soon(self._send_answers)
                background.start_soon(self._prune_audit)
                background.start_soon(self._recover)
                background.start_soon(self._watch_database)
                background.start_soon(self._trim_memory)
                background.start_soon(self._refresh_online)
                for status_listener in self._status_listeners:
                    background.start_soon(self.status.serve, status_listener)
                if self._admin_listener is not None:
                    assert self.config.admin_socket is not None
                    admin = AdminServer(self, self.config.admin_socket)
                    background.start_soon(admin.serve, self._admin_listener)
                if self.notifier.watchdog_interval is not None:
                    background.start_soon(self._watchdog, self.notifier.watchdog_interval)
                async with trio.open_nursery() as conns:
                    self._conns = conns
                    async with trio.open_nursery() as accepting:
                        # trio's accept loop: it waits out a full file table
                        # (EMFILE and the like) and raises anything else.
                        accepting.start_soon(
                            functools.partial(
                                trio.serve_listeners,
                                self._serve_stream,
                                listeners,
                                handler_nursery=conns,
                            )
                        )
                        addresses = [f"{h}:{p}" for h, p in self.ports]
                        log.info(
                            "listening",
                            addresses=addresses,
                            status=[f"{h}:{p}" for h, p in self.status_ports],
                            admin=str(self.config.admin_socket or ""),
                            server_id=self.server_id,
                        )
                        task_status.started(self.ports)
                        self.notifier.notify("READY=1", f"STATUS=serving on {', '.join(addresses)}")
                        await self._stop.wait()
                        self.notifier.notify("STOPPING=1", "STATUS=stopping")
                        accepting.cancel_scope.cancel()
                    for listener in listeners:
                        await listener.aclose()
                    self._stopping = True
                    for conn in list(self._readers):
                        conn.stop_reading()
                    conns.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                background.cancel_scope.cancel()
            self.committer.close()
        c = self.committer
        log.info(
            "stopped",
            leases=len(self.service.pool),
            commits=c.commits,
            changes_committed=c.changes_committed,
            commit_seconds=round(c.apply_seconds, 3),
        )
        logs.flush()

    def stop(self) -> None:
        """Begin a graceful shutdown: stop accepting, answer what is in flight, flush."""
        self._stop.set()

    def reload_entitlement_now(self) -> None:
        """SIGHUP: re-read the config and the entitlement file now, changed or not."""
        self._force_reload = True
        self._reload_request.set()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config and the entitlement; leases are kept.

        What can change live does at once; what needs a restart (listeners,
        paths) is reported and keeps its old value, so ``floatd status`` always
        shows what the daemon really uses.  An invalid config changes nothing
        and raises its ConfigError.
        """
        applied: list[str] = []
        restart: list[str] = []
        if self._config_loader is not None:
            new = await self._run_sync(self._config_loader)
            old = self.config
            changed = [
                (f"{section}.{key}", attr)
                for section, table in SCHEMA.items()
                for key, (attr, _) in table.items()
                if getattr(old, attr) != getattr(new, attr)
            ]
            restart = [dotted for dotted, attr in changed if attr in RESTART_ONLY]
            applied = [dotted for dotted, attr in changed if attr not in RESTART_ONLY]
            attrs = {attr for _, attr in changed}
            tls = tls_context(new) if attrs & {"tls_cert", "tls_key"} else self._tls
            status_tls = (
                tls_context(new, "status")
                if attrs & {"status_tls_cert", "status_tls_key"}
                else self.status.tls
            )
            keys = trusted_keys(new.vendor_keys)
            # Nothing above can fail any more: apply.
            self.config = dataclasses.replace(
                new, **{attr: getattr(old, attr) for attr in RESTART_ONLY}
            )
            tls_changed = (tls is None) != (self._tls is None)
            self._tls = tls
            self.status.tls = status_tls
            if tls_changed:
                self._warn_cleartext_passwords()
            self._keys = keys
            if attrs & {"log_level", "log_format"}:
                logs.configure(new.log_level, new.log_format)
                self._use_log(new.log_level)
            self.service.default_duration = new.default_duration
            self.service.clock_guard.offset = new.allowed_clock_offset
            self._apply_limits(new)
            if "default_duration" in attrs:
                self.service.install(self.service.entitlement, self.clock())
                self._flush()
        rejected = await self._reload_entitlement_async(force=True)
        now = self.clock()
        result = {
            "applied": applied,
            "restart_needed": restart,
            "entitlement": getattr(self.service.entitlement, "id", None),
            "entitlement_rejected": rejected,
            "activation": self.service.activation_state(now),
        }
        log.info("reloaded", **result)
        return result

    async def revoke(self, lease_id: str) -> dict[str, Any]:
        """The admin's ``floatd revoke``: end a lease now and free its seat.
        Answered once the deletion is durable, like a release."""
        lease = self.service.revoke(lease_id, self.clock())
        batch = self._flush()
        if batch is not None:
            await batch.wait()
        return lease_row(lease)

    async def check_password(self, req: Acquire) -> bool:
        ent = self.service.entitlement
        terms = ent.product(req.product) if ent is not None else None
        assert terms is not None and req.user is not None and req.password is not None
        return bool(
            await self._run_sync(
                users.authenticate,
                self.config.database_path,
                req.user,
                req.password,
                req.product,
                frozenset(terms.users),
                limiter=self._auth_limiter,
            )
        )

    async def end_user(self, email: str, product: str) -> list[dict[str, Any]]:
        """``floatd users unassign``: end that user's leases of the product."""
        ended = [
            lease
            for lease in list(self.service.pool.leases())
            if lease.product == product and lease.user == email
        ]
        for lease in ended:
            self.service.revoke(lease.id, self.clock())
        batch = self._flush()
        if batch is not None:
            await batch.wait()
        return [lease_row(lease) for lease in ended]

    def lease_rows(self, product: str | None = None) -> list[dict[str, Any]]:
        leases = [
            lease
            for lease in self.service.pool.leases()
            if product is None or lease.product == product
        ]
        leases.sort(key=lambda le: (le.product, le.granted_at))
        return [lease_row(lease) for lease in leases]

    def status_document(self) -> dict[str, Any]:
        """``GET /status`` and ``floatd status``."""
        now = self.clock()
        ent = self.service.entitlement
        failure = self.committer.failure
        return {
            "version": __version__,
            "server_id": self.server_id,
            "uptime": round(now - self.started_at, 3),
            "started_at": self.started_at,
            "activation": {
                "state": self.service.activation_state(now),
                "mode": "online" if self.online else "offline",
                "refresh_problem": self.refresh_problem,
                "entitlement_id": ent.id if ent else None,
                "license": ent.license if ent else None,
                "customer": ent.customer if ent else None,
                "not_before": ent.not_before if ent else None,
                "not_after": ent.not_after if ent else None,
                "refresh_by": ent.refresh_by if ent else None,
            },
            "products": self.service.products_overview(),
            "state": {
                "writable": self.service.writable,
                "unavailable_since": self._unavailable_since,
                "reason": None if failure is None else failure.message,
            },
            "connections": self.connections,
            "leases": len(self.service.pool),
            "listen": [f"{h}:{p}" for h, p in self.ports],
        }

    def _flush(self, urgent: bool = True) -> Batch | None:
        """Submit what the last service call changed and wake the waiters it served.
        ``urgent`` is False when nobody will wait for the commit (a lazy renewal)."""
        service = self.service
        changes = service.take_changes()
        woken = service.take_woken()
        if not changes and not woken:
            return None  # the common read-only case: nothing to do
        slots = []
        if woken:
            now = self.clock()
            for waiter in woken:
                slot = waiter.handle
                if isinstance(slot, _Slot) and slot.waiter is waiter:
                    slot.response = service.waiter_response(waiter, now)
                    slot.waiter = None
                    if waiter.lease is not None:
                        slot.granted = waiter.lease.id
                    slots.append(slot)
            changes += service.take_changes()  # a timed-out wait's audit record
        batch = self.committer.submit(changes, urgent or bool(woken)) if changes else None
        for slot in slots:
            if slot.granted is not None:  # a refusal acknowledges nothing: no wait
                slot.batch = batch
            owner, slot.owner = slot.owner, None  # told once; the batch calls back
            if owner is not None:
                owner.advance()
        if urgent:  # a grant may expire before the timer's next look; a renewal never does
            self._check_deadline()
        return batch

    def _check_deadline(self) -> None:
        """Wake the timer if the pool now has something due before it planned to look."""
        deadline = self.service.next_deadline()
        if deadline is not None and deadline < self._armed_for:
            self._rearm.set()

    async def _timer(self) -> None:
        """Expire leases and time out waiters when the pool says something is due;
        also keep the clock guard's mark (persisted every CLOCK_MARK_EVERY s)."""
        persisted = -math.inf
        while True:
            guard = self.service.clock_guard
            guard.observe(self.clock(), trio.current_time())
            if trio.current_time() - persisted >= CLOCK_MARK_EVERY:
                persisted = trio.current_time()
                self.committer.submit([SetMeta(META_CLOCK_MARK, repr(guard.mark))], urgent=False)
            deadline = self.service.next_deadline()
            self._armed_for = math.inf if deadline is None else deadline
            delay = TIMER_MAX_SLEEP
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self.clock()))
            with trio.move_on_after(delay):
                await self._rearm.wait()
            self._rearm = trio.Event()
            if self.service.writable:  # else the pool is rebuilt from disk anyway
                self.service.advance(self.clock())
                self._flush()

    def _watch(self, conn: _Connection, deadline: float) -> None:
        conn.next_check = deadline  # entries of earlier calls are stale now
        self._deadline_seq += 1
        if not self._deadlines or deadline < self._deadlines[0][0]:
            self._reap_rearm.set()
        heapq.heappush(self._deadlines, (deadline, self._deadline_seq, conn))

    async def _reap(self) -> None:
        """Close connections past their hello or idle deadline.

        A heap of deadlines, one entry per connection, re-armed when it comes due
        and the connection turns out to have been active meanwhile.  Reading a
        request then costs one timestamp, where a cancel scope around every read
        cost more than the rest of a renew.
        """
        while True:
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                due, _, conn = heapq.heappop(self._deadlines)
                if due != conn.next_check:
                    continue  # superseded by an earlier one (see _Connection.frame_due)
                later = conn.check_deadline(now)
                if later is not None:
                    self._watch(conn, later)
            delay = self._deadlines[0][0] - now if self._deadlines else TIMER_MAX_SLEEP
            with trio.move_on_after(min(delay, TIMER_MAX_SLEEP)):
                await self._reap_rearm.wait()
            self._reap_rearm = trio.Event()

    def _queue_answers(self, conn: _Connection) -> None:
        self._outbox.append(conn)
        if len(self._outbox) == 1:
            self._outbox_ready.set()

    async def _send_answers(self) -> None:
        """The outbox: write the answers queued during one scheduler pass together.

        A connection that has its answers ready queues them and goes back to
        reading; this task, which runs once the tasks already runnable have had
        their turn, writes them all back to back.  On loopback most of a
        ``send()`` is the kernel waking the receiving side, and that is cheap
        when the receiver is already awake for the previous answer: a steady
        trickle of renewals, each sent as it was ready, woke the client once per
        answer and spent twice the CPU in ``send()`` (docs/performance.md).
        """
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            ready, self._outbox = self._outbox, []
            for conn in ready:
                conn.flush_answers()

    async def _trim_memory(self) -> None:
        """Give the heap that closed connections freed back to the OS.

        Partial frames are held in buffers of up to 64 KiB, which glibc takes
        from its heap and keeps when they are freed: 3,000 connections that
        each sent most of a frame and hung up left the server 360 MiB larger
        for good.  ``malloc_trim`` returns it; it runs in a worker thread (the
        foreign call lets go of the GIL), at most every few seconds, and only
        after many connections have closed."""
        trim = _malloc_trim()
        if trim is None:
            return
        while True:
            await trio.sleep(TRIM_EVERY)
            if self._closed_since_trim >= TRIM_AFTER_CLOSED:
                self._closed_since_trim = 0
                await self._run_sync(trim, 0)

    async def _flush_logs(self) -> None:
        while True:
            await trio.sleep(logs.FLUSH_INTERVAL)
            logs.flush()

    async def _watch_entitlement(self) -> None:
        """Pick up an entitlement installed by the CLI, without a restart; on
        SIGHUP, reload the config as well."""
        while True:
            with trio.move_on_after(ENTITLEMENT_POLL):
                await self._reload_request.wait()
            self._reload_request = trio.Event()
            force, self._force_reload = self._force_reload, False
            if not force:
                await self._reload_entitlement_async(False)
                continue
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload_failed", key=exc.key, reason=exc.problem)

    async def _refresh_online(self) -> None:
        """Keep an online activation fresh; see :mod:`floatd.online` for the rules."""
        schedule = RefreshSchedule(self.config.authority_refresh_interval)
        delay = schedule.first()
        while True:
            await trio.sleep(delay)
            schedule.interval = self.config.authority_refresh_interval  # reloadable
            record = await self._run_sync(ActivationRecord.read, self.config)
            self.online = record is not None and not record.revoked
            if record is None or record.revoked or not self.config.authority_url:
                delay = min(schedule.interval, 5.0)  # watch for a new activation
                continue
            delay = schedule.after(await self._refresh_once(record))

    async def _refresh_once(self, record: ActivationRecord) -> bool:
        ent = self.service.entitlement
        refresh_by = ent.refresh_by if ent is not None else None
        try:
            text, fresh = await online.refresh(self.config, self.server_id, record, self.clock())
        except AuthorityError as exc:
            if exc.status == 410:
                await self._activation_revoked(record, exc)
                return True
            log.warning(
                "refresh_failed",
                status=exc.status,
                code=exc.error_code,
                reason=exc.message,
                refresh_by=refresh_by,
            )
            self.refresh_problem = f"{exc.error_code} (HTTP {exc.status}): {exc.message}"
            return False
        except AuthorityUnavailable as exc:
            log.warning("refresh_failed", reason=exc.message, refresh_by=refresh_by)
            self.refresh_problem = exc.message
            return False
        self.refresh_problem = None
        await self._run_sync(atomic_write, self.config.entitlement_path, text)
        self._ent_signature = await self._run_sync(self._entitlement_signature)
        self._install_entitlement(fresh, self.clock())
        self._flush()
        log.info("refreshed", entitlement=fresh.id, refresh_by=fresh.refresh_by)
        return True

    async def _activation_revoked(self, record: ActivationRecord, exc: AuthorityError) -> None:
        """A 410: stop leasing now, and remember it across restarts."""
        log.error("activation_revoked", activation=record.activation_id, reason=exc.message)
        self.refresh_problem = f"{exc.error_code} (HTTP {exc.status}): {exc.message}"

        def forget() -> None:
            self.config.entitlement_path.unlink(missing_ok=True)
            dataclasses.replace(record, revoked=True).write(self.config)

        await self._run_sync(forget)
        self.online = False
        self._ent_signature = None
        self._install_entitlement(None, self.clock())
        self._flush()

    async def _prune_audit(self) -> None:
        """Retention: drop audit records past ``[audit] retention_days``."""
        while True:
            days = self.config.audit_retention_days
            if days > 0:
                self.committer.submit([PruneAudit(self.clock() - days * 86400)], urgent=False)
            await trio.sleep(AUDIT_PRUNE_INTERVAL)

    async def _watchdog(self, interval: float) -> None:
        while True:
            if (
                self.service.writable
                and self.clock() - self.committer.last_cut <= WATCHDOG_COMMIT_AGE
            ):
                self.notifier.notify("WATCHDOG=1")
            else:
                log.warning("watchdog_withheld", reason="no commit completed recently")
            await trio.sleep(interval)

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if self._tls is not None:
            # The handshake runs on first use, inside the connection, so a client
            # that never completes it is closed by the hello timeout like any other.
            await self.handle_stream(trio.SSLStream(stream, self._tls, server_side=True), peer)
        else:
            await self.handle_stream(TcpStream(stream, self._hub), peer)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None) -> None:
        """Serve one client connection (also the entry point for in-memory tests)."""
        source = limit_key(peer)
        cap = self.config.connections_per_address
        if (
            self.connections >= self.config.max_connections
            or self._stopping
            or (cap and self._per_address.get(source, 0) >= cap)
        ):
            await self._refuse_busy(stream)
            return
        self.connections += 1
        self._per_address[source] = self._per_address.get(source, 0) + 1
        conn = _Connection(self, stream, peer)
        self._readers.add(conn)
        self._watch(conn, conn.hello_deadline)
        try:
            await conn.run()
        finally:
            conn.done = True
            conn.proto.release()  # the reaper's heap may hold conn for a while yet
            self._readers.discard(conn)
            self.connections -= 1
            self._closed_since_trim += 1
            left = self._per_address[source] - 1
            if left:
                self._per_address[source] = left
            else:
                del self._per_address[source]
            await trio.aclose_forcefully(stream)

    async def _refuse_busy(self, stream: trio.abc.Stream) -> None:
        rid = None
        with trio.move_on_after(BUSY_WAIT):
            try:
                frame = await receive_frame(stream, FrameDecoder())
                rid = None if frame is None else request_id(frame)
            except (FloatdError, trio.BrokenResourceError):
                pass
        try:
            with trio.move_on_after(BUSY_WAIT):
                await stream.send_all(
                    encode_frame(failure(rid, Busy("too many connections").to_wire()))
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(stream)


async def _listen(host: str, port: int, what: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenError(f"cannot listen on {where} for {what}: {exc.strerror or exc}") from None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return str(name[0]), int(name[1])


def tls_context(config: Config, section: str = "server") -> ssl.SSLContext | None:
    """The TLS context of the lease port (``server``) or the status endpoint
    (``status``), or None; a bad cert or key is a config error."""
    cert, key = (
        (config.tls_cert, config.tls_key)
        if section == "server"
        else (config.status_tls_cert, config.status_tls_key)
    )
    if not cert:
        return None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{section}.{name}", f"cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{section}.tls_cert", f"cannot load certificate and key: {exc}"
        ) from None
    return context


class _Connection:
    """One client connection, served by one task (and, on plain TCP, by the
    hub's handler while that task sleeps: :meth:`_on_readable`).

    The reader parses every request already buffered and applies each at once,
    in arrival order, so pipelined requests see each other's effects.  What it
    owes the client goes into ``_pending``, a queue of slots in request order.
    The head of that queue is answered as soon as it may be (:meth:`advance`):
    at once for a read-only request or a lazy renewal, when its batch is durable
    for a grant, when a seat comes free for a queued acquire.  Whoever makes the
    head ready calls :meth:`advance` (the reader, the group committer's batch
    completion, the wake-up of a waiter), so no task waits for an answer and the
    reader never stops reading for one.

    Ready answers are queued as one write for the server's outbox
    (:meth:`Server._send_answers`).  They belong to the connection until the
    kernel has taken them (``_out``).  The outbox writes them without blocking;
    what the kernel does not take at once (a client that stops reading) is
    written by a drain task.  The reader reads nothing more while a drain runs
    or ``MAX_PIPELINE`` answers are owed, so a client that never reads cannot
    make the server hold its answers in memory.
    """

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str | None) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.proto = ServerConnection(server.config.client_tokens)
        self.receiving = False  # blocked reading
        self.done = False
        now = trio.current_time()
        self.hello_deadline = now + HELLO_TIMEOUT
        self.last_active = now
        self.next_check = math.inf  # the reaper's live entry for this connection
        self._frame_started: float | None = None  # a partial frame is buffered
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_reading = False
        self._pending: deque[_Slot] = deque()
        self._listening: Batch | None = None  # the batch that will call advance()
        # Answers queued and not yet taken by the kernel, and the leases granted
        # in them (given back if they cannot be sent).
        self._out: list[bytes] = []
        self._out_granted: list[str] = []
        self._sending = False  # in the outbox, or a drain task is writing
        self._draining = False
        self._lost = False  # a write failed: the client is gone
        self._progress: trio.Event | None = None  # the reader waits for room
        self._closing = False  # a refusal that ends the connection was read
        # An acquire whose password the reader must check (off the event loop)
        # before it is applied, and when it was read.
        self._held: tuple[Acquire, float] | None = None
        self._failure: Exception | None = None  # raised in the hub's handler

    def check_deadline(self, now: float) -> float | None:
        """Close the connection if its deadline passed; else when to look again."""
        if self.done:
            return None
        started = self._frame_started
        if started is not None and self.receiving and now >= started + FRAME_TIMEOUT:
            self._cancel()  # waiting for the rest of a frame that does not come
            return None
        later = self._idle_deadline(now)
        if later is not None and started is not None:
            later = min(later, max(started + FRAME_TIMEOUT, now + 1.0))
        return later

    def _frame_progress(self) -> None:
        """After the buffered requests are applied: time the partial frame left
        in the buffer, if any, and have the reaper look when it is due."""
        if not self.proto.partial():
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = started = trio.current_time()
            if started + FRAME_TIMEOUT < self.next_check:
                self.server._watch(self, started + FRAME_TIMEOUT)

    def _idle_deadline(self, now: float) -> float | None:
        if not self.proto.greeted:
            if now < self.hello_deadline:
                return self.hello_deadline
            self._cancel()
            return None
        deadline = self.last_active + self.server.config.idle_timeout
        if now < deadline:
            return deadline
        if self._idle():
            self._cancel()
            return None
        return now + self.server.config.idle_timeout  # busy, not idle: look again later

    def _idle(self) -> bool:
        """Blocked reading and owing the client nothing."""
        return self.receiving and not self._pending and not self._sending

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more, but answer what was already received."""
        self._stop_reading = True
        if self._idle():
            self._cancel()  # nothing owed: just go

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:  # for drain tasks
            self._scope = nursery.cancel_scope
            self._nursery = nursery
            try:
                if not await self._reader():
                    # Answer what was received before the close or the stop.
                    while (self._pending or self._sending) and not self._lost:
                        await self._wait_progress()
            finally:
                # Whatever is still owed will never be delivered: leave no
                # waiter queued and no seat held on its behalf.
                pending, self._pending = self._pending, deque()
                for slot in pending:
                    self._abandon(slot)
                nursery.cancel_scope.cancel()  # a drain task writing to nobody

    async def _reader(self) -> bool:
        """Read and apply requests; True when the client hung up.

        On a plain TCP connection the hub's handler (:meth:`_on_readable`) does
        the reading and applying while that needs no waiting, and this task
        sleeps; it wakes for what only a task can do (check a password, wait for
        room, end the connection)."""
        stream = self.stream
        # The stream, when the hub's handler serves it: this task then waits and
        # reads in two steps, since the handler may have read the data already.
        hub_served = (
            stream
            if isinstance(stream, TcpStream) and stream.set_read_handler(self._on_readable)
            else None
        )
        while True:
            step = self._apply_buffered()
            if step is _Step.MORE:
                continue
            if step is _Step.CLOSE:
                return False
            if step is _Step.HUNG_UP:
                return True
            if step is _Step.FULL:
                await self._wait_progress()  # the client is not reading: neither do we
                continue
            if step is _Step.PASSWORD:
                await self._apply_held()
                continue
            self.receiving = True
            data: bytes | bytearray | None
            try:
                if hub_served is not None:
                    await hub_served.wait_readable()
                    data = hub_served.receive_nowait(MAX_FRAME + 4)
                else:
                    data = await stream.receive_some(MAX_FRAME + 4)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
            finally:
                self.receiving = False
            if self._failure is not None:
                raise self._failure
            if data is None:
                continue  # nothing new, or the handler read it and needs this task
            if not data:
                return True
            if self._stop_reading:
                return False
            self.last_active = trio.current_time()
            self.proto.receive_data(bytes(data))

    def _on_readable(self) -> bool:
        """The hub's handler: read and apply what arrived, in the hub's task.
        True if that is all done and the reader may sleep on."""
        stream = self.stream
        assert isinstance(stream, TcpStream)
        if self._stop_reading:
            return False  # the reader reads what came, and drops it
        try:
            data = stream.receive_nowait(MAX_FRAME + 4)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the reader's own read then finds the end (it stays there)
        if data is None:
            return True  # nothing there after all
        if not data:
            return False  # the end of the stream: the reader reads it again
        self.last_active = trio.current_time()
        try:
            self.proto.receive_data(data)
            step = self._apply_buffered()
            while step is _Step.MORE:
                step = self._apply_buffered()
        except Exception as exc:  # the reader raises it, as if it had failed itself
            self._failure = exc
            return False
        # After a full read more may be waiting, and the hub will not say so again.
        return step is _Step.READ and len(data) < MAX_FRAME + 4

    def _apply_buffered(self) -> _Step:
        """Apply the requests already received, in order, as far as that needs no
        waiting, and say what the reader must do next."""
        proto = self.proto
        pending = self._pending
        started = time.perf_counter()
        added = drained = False
        while len(pending) < MAX_PIPELINE and not self._closing and self._held is None:
            event = proto.next_event()
            if event is None:
                drained = True
                self._frame_progress()
                break
            if isinstance(event, Acquire) and self.server.service.needs_password_check(
                event, self.server.clock(), self.peer
            ):
                # Only this connection waits (its answers stay in order).
                self._held = (event, started)
                break
            slot = self._dispatch(event, started)
            pending.append(slot)
            added = True
            if slot.close:
                self._closing = True
        if added:
            self.advance()
        if self._closing:
            return _Step.CLOSE
        if self._lost:
            return _Step.HUNG_UP
        if self._held is not None:
            return _Step.PASSWORD
        if not drained and self._out and not self._draining:
            # A long pipeline: write as we go, not once per read, so that a
            # client that does not read is noticed within MAX_PIPELINE answers.
            self.flush_answers()
        if len(pending) >= MAX_PIPELINE or self._draining:
            return _Step.FULL
        if not drained:
            return _Step.MORE  # more requests are buffered already
        if self._stop_reading:
            return _Step.CLOSE
        return _Step.READ

    async def _apply_held(self) -> None:
        """Check the held acquire's password, off the event loop, and apply it."""
        assert self._held is not None
        event, started = self._held
        authenticated = await self.server.check_password(event)
        self._held = None
        slot = self._dispatch(event, started, authenticated)
        self._pending.append(slot)
        if slot.close:
            self._closing = True
        self.advance()

    def _dispatch(
        self, event: Hello | Refusal | Any, started: float, authenticated: bool = False
    ) -> _Slot:
        server = self.server
        if isinstance(event, Refusal):
            return _Slot(response=event.response, close=event.close, started=started)
        now = server.clock()
        if isinstance(event, Hello):
            return _Slot(
                response=server.service.hello_response(event, now), op="hello", started=started
            )
        result = server.service.handle(event, now, self.peer, authenticated)
        # A renewal may be written lazily (see floatd.committer for why that is
        # safe); a refusal acknowledges nothing, so its audit record need not
        # hold up the answer either.
        lazy = (isinstance(event, Renew) and server.committer.fresh()) or (
            type(result) is dict and not result["ok"]
        )
        batch = server._flush(urgent=not lazy)
        if lazy:
            batch = None
        op = _OPS.get(type(event), "invalid")
        if isinstance(result, Waiter):
            slot = _Slot(waiter=result, owner=self, op=op, started=started)
            result.handle = slot
            server._check_deadline()
            return slot
        granted = result.get("lease") if isinstance(event, Acquire) and result.get("ok") else None
        return _Slot(response=result, batch=batch, granted=granted, op=op, started=started)

    def advance(self) -> None:
        """Queue, as one write, the answers now ready at the head of ``_pending``.

        Synchronous, and called by whoever may have made the head ready.  Seats
        are given back only after the answers are queued: giving back may wake a
        waiter of this very connection, whose answer must come after these.
        """
        pending = self._pending
        frames: list[bytes] = []
        granted: list[str] = []
        give_back: list[str] = []
        answered: list[tuple[_Slot, str]] = []
        while pending:
            slot = pending[0]
            response = slot.response
            if response is None or slot.waiter is not None:
                break  # still queued for a seat
            batch = slot.batch
            if batch is not None:
                if not batch.done.is_set():  # not durable yet: the batch calls back
                    if self._listening is not batch:
                        self._listening = batch
                        batch.listeners.append(self.advance)
                    break
                if batch.error is not None:
                    # Never durable, so nothing to give back: the pool is
                    # rebuilt from disk before anything is written again.
                    slot.granted = None
                    response = _unavailable(response.get("id"))
            pending.popleft()
            try:
                frames.append(encode_frame(response))
            except ValueError:
                error = InternalError("response too large").to_wire()
                frames.append(encode_frame(failure(response.get("id"), error)))
                if slot.granted is not None:  # nobody got its token: no seat for it
                    give_back.append(slot.granted)
                    slot.granted = None
            if slot.granted is not None:
                granted.append(slot.granted)
            answered.append((slot, "ok" if response["ok"] else response["error"]["code"]))
        if frames:
            if self._queue(_joined(frames), granted):
                done = time.perf_counter()
                observe = self.server.stats.observe
                for slot, result in answered:
                    observe(slot.op, result, done - slot.started)
            self._wake_reader()
        for lease_id in give_back:
            self._give_back(lease_id)

    def _queue(self, data: bytes, granted: list[str]) -> bool:
        """Hand answers to the outbox; False (and the seats given back) if the
        client is gone."""
        if self._lost:
            for lease_id in granted:
                self._give_back(lease_id)
            return False
        self._out.append(data)
        self._out_granted += granted
        if not self._sending:
            self._sending = True
            self.server._queue_answers(self)
        return True

    def flush_answers(self) -> None:
        """The outbox's turn: write what is queued, or start a drain task for what
        the kernel will not take now (and for streams that only send async)."""
        if self._draining or not self._out:
            return  # a drain task writes them, or the reader already did
        if self.done or self._nursery is None:
            self._lose()  # the connection ended with these still queued
            return
        stream = self.stream
        if isinstance(stream, TcpStream):
            data = _joined(self._out)
            try:
                sent = stream.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lose()
                return
            if sent == len(data):
                self._out.clear()
                self._out_granted.clear()
                self._sent_all()
                return
            self._out = [data[sent:]]
        self._draining = True
        self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        """Write queued answers, waiting for the client to read as needed."""
        in_flight: list[str] = []
        try:
            while self._out:
                data = _joined(self._out)
                self._out = []
                in_flight, self._out_granted = self._out_granted, []
                await self.stream.send_all(data)
                in_flight = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._draining = False
            if in_flight or self._out:
                self._out_granted = in_flight + self._out_granted
                self._lose()
            else:
                self._sent_all()

    def _sent_all(self) -> None:
        self._sending = False
        self._wake_reader()
        if self._stop_reading and self._idle():
            self._cancel()  # shutdown was only waiting for these answers

    def _lose(self) -> None:
        """The client cannot be written to: drop its queued answers and give back
        the seats granted in them."""
        self._lost = True
        granted, self._out_granted = self._out_granted, []
        self._out.clear()
        self._sent_all()
        for lease_id in granted:
            self._give_back(lease_id)

    def _wake_reader(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    async def _wait_progress(self) -> None:
        """Until an answer is queued or written (the caller checks what it needs)."""
        self._progress = event = trio.Event()
        await event.wait()

    def _give_back(self, lease_id: str) -> None:
        server = self.server
        # While the state cannot be written the pool is rebuilt from disk, and
        # a grant that did reach it then expires as any unrenewed lease does.
        if server.service.writable and server.service.pool.lease(lease_id) is not None:
            server.service.revoke(lease_id, server.clock())
            server._flush()

    def _abandon(self, slot: _Slot) -> None:
        """An answer that will never be delivered: leave no waiter queued and no
        seat held on its behalf."""
        if slot.waiter is not None:
            slot.owner = None
            self.server.service.cancel_wait(slot.waiter, self.server.clock())
            self.server._flush()
        elif slot.granted is not None:
            self._give_back(slot.granted)
