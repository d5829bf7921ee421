"""The daemon: the composition root of the trio shell around the sans-IO core.

:class:`Server` builds the parts and runs their tasks in nested nurseries, so a
stop unwinds them in order (listeners, connections, background tasks, the
committer's final flush):

* the lease port (:mod:`floatd.daemon.port`): connections, each a session
  (:mod:`floatd.daemon.session`), and the outbox that writes their answers;
* the group committer (:mod:`floatd.daemon.committer`), one batch in flight;
* the state keeper (:mod:`floatd.daemon.recovery`): load, failure, recovery;
* the licensing (:mod:`floatd.daemon.licensing`): the entitlement file and
  the online refresh;
* the expiry timer (here), the reaper of idle connections, the status endpoint
  and the admin socket, which see the server only through the narrow views of
  :mod:`floatd.daemon.views`.

What stays here is what ties those together: the clock (watched for steps),
``_flush`` (a service call's changes to the committer, its woken waiters to
their sessions), the timer, reload, and the admin operations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from floatd import logs
from floatd.config import SCHEMA, Config, read_policy
from floatd.core.changes import Change, SetMeta
from floatd.core.entitlement import format_public_key, trusted_keys
from floatd.core.messages import (
    Acquire,
)
from floatd.core.policy import Policy
from floatd.core.policy_file import unknown_products
from floatd.core.seats import Waiter
from floatd.core.service import LeaseService
from floatd.daemon.admin import AdminServer, bind_admin_socket
from floatd.daemon.cluster import ClusterNode
from floatd.daemon.committer import (
    Batch,
    GroupCommitter,
    RunSync,
)
from floatd.daemon.licensing import Licensing
from floatd.daemon.listeners import address, listen, tls_context
from floatd.daemon.metrics import RequestStats
from floatd.daemon.online import ActivationRecord
from floatd.daemon.operations import AdminOperations
from floatd.daemon.port import LeasePort
from floatd.daemon.reaper import Reaper
from floatd.daemon.recovery import META_CLOCK_MARK, StateKeeper
from floatd.daemon.session import _Slot, answer_unavailable
from floatd.daemon.shared import Shared
from floatd.daemon.status_http import StatusServer
from floatd.daemon.systemd import Notifier
from floatd.errors import (
    ConfigError,
)
from floatd.logs import event_logger, get_logger
from floatd.store import users
from floatd.store.pg_ledger import PgLedger
from floatd.store.server_key import load_or_create
from floatd.store.sqlite import LeaseStore

SHUTDOWN_GRACE = 3.0
ENTITLEMENT_POLL = 1.0
TIMER_MAX_SLEEP = 1.0  # also how soon a wall-clock jump is noticed
CLOCK_MARK_EVERY = 10.0
#: The watchdog is fed only while the writer has committed this recently: a
#: hung disk should get the daemon restarted, not look healthy.
WATCHDOG_COMMIT_AGE = 10.0
#: A jump of the wall clock against the monotonic one larger than this between
#: two readings is a step (an admin or NTP setting the clock), not a drift.
CLOCK_STEP = 1.0

#: Config attributes a reload cannot change; the rest apply at once.
RESTART_ONLY = frozenset(
    {"listen", "machine_id_file", "status_listen", "admin_socket", "state_dir"}
    | {"state_backend", "state_dsn", "state_dsn_file", "cluster_node"}
)

log = get_logger()


class Server(AdminOperations):
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
        cluster: tuple[PgLedger, str] | None = None,
    ) -> None:
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
            ledger=cluster[0] if cluster is not None else None,
        )
        #: On a cluster node (``[state] backend = "postgresql"``): its decider.
        self.node: ClusterNode | None = None
        self._apply_limits(config)
        self.store = store
        self._use_log(config.log_level)
        # Tests inject an async stand-in so MockClock controls every wait.
        self._run_sync: RunSync = run_sync or trio.to_thread.run_sync
        self.committer = GroupCommitter(store, self.clock, run_sync)
        self.shared = Shared(
            config, self.service, store, self.committer, self.clock, self._run_sync, self._flush
        )
        self.state = StateKeeper(
            self.shared, answer_unavailable=answer_unavailable, after_recovery=self._check_deadline
        )
        # Password checks (scrypt) run two at a time at most, off the event loop.
        self._auth_limiter = trio.CapacityLimiter(2)
        self.ports: list[tuple[str, int]] = []
        # Closes connections past their hello or idle deadline.
        self.reaper = Reaper()
        self._stop = trio.Event()
        self._rearm = trio.Event()
        self._armed_for = math.inf
        self._reload_request = trio.Event()
        self._force_reload = False
        self._conns: trio.Nursery | None = None
        self._listeners: list[trio.SocketListener] = []
        self._bound = False
        self._status_listeners: list[trio.SocketListener] = []
        self._admin_listener: trio.SocketListener | None = None
        self.status_ports: list[tuple[str, int]] = []
        self.status = StatusServer(self)
        self.tls = tls_context(config)
        self.licensing = Licensing(self.shared, server_id)
        # A policy file that cannot be used stops the start (exit 2 with its
        # line), as a bad config does: serving without it would let in whom
        # it keeps out.
        self._use_policy(read_policy(config.policy_file))
        self.licensing.end_user = self.end_user
        self.licensing.tls = self.tls is not None
        #: The lease port's connections: limits, sessions, the answer outbox.
        self.port = LeasePort(self)
        if cluster is not None:
            self.node = ClusterNode(self, *cluster)
        self.status.tls = tls_context(config, "status")

    @property
    def config(self) -> Config:
        """The config in force (shared with every part: see floatd.daemon.shared)."""
        return self.shared.config

    @config.setter
    def config(self, value: Config) -> None:
        self.shared.config = value

    def clock(self) -> float:
        """The wall clock (unix seconds), watched for steps.

        Within a run, leases follow the monotonic clock: when the wall clock is
        stepped (by hand, or by NTP after a long drift), every lease keeps the
        time it had left rather than its date, so a step forward expires nobody
        and a step back stretches nobody (see :meth:`_clock_stepped`).  Outside
        trio (start-up) there is nothing to compare with yet.

        A cluster node's clock is the database's (cluster.md: node clocks may
        differ), as its decider last read it, carried on by the monotonic
        clock: its status, info answers and clock guard agree with its leases."""
        wall = self._wall()
        try:
            mono = trio.current_time()
        except RuntimeError:
            return wall
        skew, last = wall - mono, self._skew
        self._skew = skew
        if last is not None and abs(skew - last) > CLOCK_STEP:
            self._clock_stepped(skew - last)
        if self.node is not None:
            return self.node.database_clock(wall)
        return wall

    def _clock_stepped(self, delta: float) -> None:
        self.clock_steps += 1
        moved = self.service.shift_time(delta)
        log.warning("clock_stepped", seconds=round(delta, 3), leases_kept=moved)

    def _use_policy(self, policy: Policy | None) -> dict[str, Any]:
        """Decide by ``policy`` from now on; what reload reports of it."""
        self.service.set_policy(policy, self.clock())
        return self._policy_report()

    def _policy_report(self) -> dict[str, Any]:
        """The policy in force, and (logged) the products it names that the
        entitlement lacks."""
        policy = self.service.policy
        if policy is None:
            return {"file": None}
        ent = self.service.entitlement
        unknown = unknown_products(policy, {p.code for p in ent.products}) if ent else []
        if unknown:
            log.warning("policy_unknown_products", file=policy.source, products=unknown)
        return {"file": policy.source, "rules": len(policy.rules), "unknown_products": unknown}

    def load_state(self) -> None:
        """Blocking start-up work: the entitlement, then the persisted leases."""
        now = self.clock()
        # The server's own key, made at the first start: entitlements name it,
        # and borrow certificates are signed with it.
        self.service.server_key = load_or_create(self.config.state_dir)
        self.licensing.server_key = format_public_key(self.service.server_key.public_key())
        self.licensing.load(now)
        self._policy_report()  # with the entitlement known: products it lacks
        record = ActivationRecord.read(self.config)
        self.licensing.online = record is not None and record.in_force
        self.state.load(now)
        if self.node is not None:
            # A cluster's clock mark is the database's (by its clock), read
            # at the node's first heartbeat, before it serves anything.
            self.service.clock_guard.mark = 0.0

    async def reset_clock(self) -> dict[str, Any]:
        if self.node is not None:
            return await self.node.reset_clock()
        return await self.state.reset_clock()

    def _use_log(self, level: str) -> None:
        """Log at ``level`` (after ``logs.configure``).  Lease event lines in JSON
        are then rendered by the state writer when it can (see floatd.store.writer)."""
        log = event_logger(level)
        self.service.set_log(log)
        self.service.store_logs_leases = (
            log.lease_lines_as_json and self.store.renders_lease_lines()
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

    # --- running ---------------------------------------------------------------

    async def bind(self) -> None:
        """Open the listeners; separate from :meth:`run` so a port in use is a
        plain OSError for the caller, not one buried in a nursery's group.  A
        cluster node opens its lease port only once it has a slot (run)."""
        self._bound = True
        if self.node is None:
            await self._bind_lease_port()
        if self.config.status_listen is not None:
            host, port = self.config.status_listen
            self._status_listeners = await listen(host, port, "the status endpoint (status.listen)")
            self.status_ports = [address(lst) for lst in self._status_listeners]
        if self.config.admin_socket is not None:
            self._admin_listener = bind_admin_socket(self.config.admin_socket)

    async def _bind_lease_port(self) -> None:
        for host, port in self.config.listen:
            self._listeners.extend(await listen(host, port, "the lease port (server.listen)"))
        self.ports = [address(lst) for lst in self._listeners]

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not self._bound:
            await self.bind()
        self.service.clock_guard.start(self.clock(), trio.current_time())
        async with trio.open_nursery() as core:
            await core.start(self.committer.run)
            if self.node is not None:
                await core.start(self.node.run)
            async with trio.open_nursery() as background:
                background.start_soon(self._timer)
                background.start_soon(self._watch_entitlement)
                background.start_soon(self._flush_logs)
                background.start_soon(self.reaper.run)
                background.start_soon(self.port.send_answers)
                background.start_soon(self.state.prune_audit)
                background.start_soon(self.state.recover)
                background.start_soon(self.state.watch_database)
                background.start_soon(self.port.trim_memory)
                background.start_soon(self.licensing.keep_fresh)
                for status_listener in self._status_listeners:
                    background.start_soon(self.status.serve, status_listener)
                if self._admin_listener is not None:
                    assert self.config.admin_socket is not None
                    admin = AdminServer(self, self.config.admin_socket)
                    background.start_soon(admin.serve, self._admin_listener)
                if self.notifier.watchdog_interval is not None:
                    background.start_soon(self._watchdog, self.notifier.watchdog_interval)
                if self.node is not None:
                    await self.node.serving.wait()  # a slot under the node limit
                    await self._bind_lease_port()
                listeners = self._listeners
                async with trio.open_nursery() as conns:
                    self._conns = conns
                    async with trio.open_nursery() as accepting:
                        # trio's accept loop: it waits out a full file table
                        # (EMFILE and the like) and raises anything else.
                        accepting.start_soon(
                            functools.partial(
                                trio.serve_listeners,
                                self.port.serve_stream,
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
                    self.port.stop_reading()
                    conns.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                background.cancel_scope.cancel()
            self.committer.close()
            if self.node is not None:
                self.node.stop()
        c = self.committer
        log.info(
            "stopped",
            leases=len(self.service.ledger),
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
        policy_report: dict[str, Any] | None = None
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
            tls = tls_context(new) if attrs & {"tls_cert", "tls_key"} else self.tls
            status_tls = (
                tls_context(new, "status")
                if attrs & {"status_tls_cert", "status_tls_key"}
                else self.status.tls
            )
            keys = trusted_keys(new.vendor_keys)
            policy = await self._run_sync(read_policy, new.policy_file)
            # Nothing above can fail any more: apply.
            self.config = dataclasses.replace(
                new, **{attr: getattr(old, attr) for attr in RESTART_ONLY}
            )
            tls_changed = (tls is None) != (self.tls is None)
            self.tls = tls
            self.status.tls = status_tls
            self.licensing.keys = keys
            self.licensing.tls = tls is not None
            if tls_changed:
                self.licensing.warn_cleartext_passwords()
            if attrs & {"log_level", "log_format"}:
                logs.configure(new.log_level, new.log_format)
                self._use_log(new.log_level)
            self.service.default_duration = new.default_duration
            self.service.clock_guard.offset = new.allowed_clock_offset
            self._apply_limits(new)
            if "default_duration" in attrs:
                self.service.install(self.service.entitlement, self.clock())
                self._flush()
            policy_report = self._use_policy(policy)
            self._flush()  # waiters the new rules admit: their grants are durable first
        rejected = await self.licensing.reload(force=True)
        now = self.clock()
        result = {
            "applied": applied,
            "restart_needed": restart,
            **({"policy": policy_report} if policy_report is not None else {}),
            "entitlement": getattr(self.service.entitlement, "id", None),
            "entitlement_rejected": rejected,
            "activation": self.service.activation_state(now),
        }
        log.info("reloaded", **result)
        return result

    async def check_password(self, req: Acquire) -> bool:
        ent = self.service.entitlement
        terms = ent.product(req.product) if ent is not None else None
        assert terms is not None and req.user is not None and req.password is not None
        return bool(
            await self._run_sync(
                users.authenticate,
                self.node.users if self.node is not None else users.users_source(self.config),
                req.user,
                req.password,
                req.product,
                frozenset(terms.users),
                limiter=self._auth_limiter,
            )
        )

    def _flush(self, urgent: bool = True) -> Batch | None:
        """Submit what the last service call changed and wake the waiters it served.
        ``urgent`` is False when nobody will wait for the commit (a lazy renewal)."""
        service = self.service
        changes = service.take_changes()
        woken = service.take_woken()
        if woken:
            batch = self._serve_woken(changes, woken)
        elif changes:
            batch = self.committer.submit(changes, urgent)
        else:
            return None  # the common read-only case: nothing to do
        if urgent:  # a grant may expire before the timer's next look; a renewal never does
            self._check_deadline()
        return batch

    def _serve_woken(self, changes: list[Change], woken: list[Waiter]) -> Batch | None:
        """Answer the waiters the last service call served or timed out, and
        submit their changes with the call's own (someone waits for them)."""
        service = self.service
        slots = []
        now = self.clock()
        for waiter in woken:
            slot = waiter.handle
            if isinstance(slot, _Slot) and slot.waiter is waiter:
                slot.answer = answer = service.waiter_response(waiter, now)
                slot.waiter = None
                slot.granted = answer.granted
                slots.append(slot)
        changes += service.take_changes()  # a timed-out wait's audit record
        batch = self.committer.submit(changes, True) if changes else None
        for slot in slots:
            if slot.granted is not None:  # a refusal acknowledges nothing: no wait
                slot.batch = batch
            owner, slot.owner = slot.owner, None  # told once; the batch calls back
            if owner is not None:
                owner.advance()
        return batch

    def _check_deadline(self) -> None:
        """Wake the timer if the pool now has something due before it planned to look."""
        if self.node is not None:
            return  # a cluster node's decider looks every tick
        deadline = self.service.next_deadline()
        if deadline is not None and deadline < self._armed_for:
            self._rearm.set()

    async def _timer(self) -> None:
        """Expire leases and time out waiters when the pool says something is due;
        also keep the clock guard's mark (persisted every CLOCK_MARK_EVERY s)."""
        persisted = -math.inf
        if self.node is not None:
            return  # the decider expires, by the database's clock
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
                await self.licensing.reload(False)
                continue
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload_failed", key=exc.key, reason=exc.problem)

    async def _watchdog(self, interval: float) -> None:
        """Fed while the state is written.  Not on a cluster node: a restart
        would not bring the database back, and the node recovers by itself
        when it comes (its decider probes it every second)."""
        while True:
            if self.node is not None or (
                self.service.writable
                and self.clock() - self.committer.last_cut <= WATCHDOG_COMMIT_AGE
            ):
                self.notifier.notify("WATCHDOG=1")
            else:
                log.warning("watchdog_withheld", reason="no commit completed recently")
            await trio.sleep(interval)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None) -> None:
        """Serve one client connection (the entry point of in-memory tests)."""
        await self.port.handle_stream(stream, peer)

    @property
    def connections(self) -> int:
        return self.port.connections
