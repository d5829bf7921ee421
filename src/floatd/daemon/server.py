"""The trio shell around the sans-IO core.

A connection's reader turns bytes into requests through
:class:`~floatd.core.connection.ServerConnection` and applies each one to the
:class:`~floatd.core.service.LeaseService` at once, in arrival order, so pipelined
requests see each other's effects.  What each owes the client is a *slot*,
answered strictly in order and only once the batch holding its changes is
durable: in-order answers, pipelining, and durable-before-acknowledged without
a lock.  A slot is answered by whoever makes it ready (the reader, the
completion of its batch, the wake-up of a queued acquire), never by a task
waiting for it, and the answers of one scheduler pass are written together by
the outbox (see :class:`_Connection` and :meth:`Server._send_answers`).

Around the connections run the expiry timer, the entitlement watcher, the log
flusher, the reaper of idle connections and the outbox; the group committer
runs beside them all (:mod:`floatd.daemon.committer`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import heapq
import math
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import trio

from floatd import __version__, logs
from floatd.client.frames import receive_frame
from floatd.config import SCHEMA, Config
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.core.entitlement import Entitlement, trusted_keys, verify_entitlement
from floatd.core.messages import (
    Acquire,
    failure,
    request_id,
)
from floatd.core.pool import Lease
from floatd.core.service import LeaseService, limit_key
from floatd.daemon import online
from floatd.daemon.admin import AdminServer, bind_admin_socket, lease_row
from floatd.daemon.committer import (
    LAZY_WINDOW,
    META_CLEAN,
    META_LAST_CUT,
    Batch,
    GroupCommitter,
    RunSync,
)
from floatd.daemon.metrics import RequestStats
from floatd.daemon.online import ActivationRecord, AuthorityUnavailable, RefreshSchedule
from floatd.daemon.session import _Connection, _Slot, _unavailable
from floatd.daemon.status_http import StatusServer
from floatd.daemon.systemd import Notifier
from floatd.daemon.transport import ReadinessHub, TcpStream
from floatd.errors import (
    AuthorityError,
    Busy,
    ConfigError,
    EntitlementError,
    FloatdError,
    ListenError,
    StoreError,
    Unavailable,
)
from floatd.logs import event_logger, get_logger
from floatd.store import users
from floatd.store.activation import atomic_write, check_history, installed_record, read_armored
from floatd.store.sqlite import (
    Audit,
    Change,
    LeaseStore,
    PruneAudit,
    SetExpiry,
    SetMeta,
    extend_after_crash,
)
from floatd.store.writer import ProcessLeaseStore

BUSY_WAIT = 2.0  # how long an over-limit connection may take to send its hello
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
        are then rendered by the state writer when it can (see floatd.store.writer)."""
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
        """Keep an online activation fresh; see :mod:`floatd.daemon.online` for the rules."""
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
