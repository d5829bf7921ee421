"""The server's own license: the entitlement file, and its online refresh.

The daemon reads the entitlement at start, notices a new file within a second
(or at once on SIGHUP), verifies it off the event loop, and installs it
without touching a lease; a file that fails verification changes nothing.  An
online activation is refreshed on the schedule of :mod:`floatd.daemon.online`.
This is the part of the daemon that knows about files and the authority; the
rules (signature, time windows, history) are the core's and the store's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from floatd.core.changes import SetMeta
from floatd.core.entitlement import Entitlement, trusted_keys, verify_entitlement
from floatd.daemon import online
from floatd.daemon.online import ActivationRecord, AuthorityUnavailable, RefreshSchedule
from floatd.daemon.shared import Shared
from floatd.errors import AuthorityError, EntitlementError, FloatdError, StoreError
from floatd.logs import get_logger
from floatd.store import users
from floatd.store.activation import atomic_write, check_history, installed_record, read_armored

log = get_logger()

Signature = tuple[int, int, int]


#: How long a new online entitlement waits for its activation record: the CLI
#: writes the record just after the file (steps of 50 ms, 2 s in all).
RECORD_WAIT_STEP = 0.05
RECORD_WAIT_STEPS = 40


class Licensing:
    """Keeps the service's entitlement in step with the file and the authority."""

    def __init__(self, shared: Shared, server_id: str) -> None:
        self.shared = shared
        self.keys = trusted_keys(shared.config.vendor_keys)
        #: This server's own public key (floatd.store.server_key): an
        #: entitlement naming another is refused.  Set at start (load_state).
        self.server_key: str | None = None
        #: Whether the lease port has TLS (passwords cross the LAN in clear if not).
        self.tls = False
        self.server_id = server_id
        self._ent_signature: Signature | None = None
        # The file refused last, and at how many looks in a row.
        self._rejected: tuple[Signature | None, int] = (None, 0)
        # What entitlement_installed last said (see install).
        self._logged_terms: object = ()
        #: An online activation is in force (see keep_fresh).
        self.online = False
        self._record_lock = trio.Lock()
        #: Why the last refresh failed (the authority's code and words), until
        #: one succeeds: shown by status, not only logged.
        self.refresh_problem: str | None = None
        #: Ends a license user's leases of a product (Server.end_user).
        self.end_user: Callable[[str, str], Awaitable[list[dict[str, Any]]]] | None = None

    def read(self, now: float) -> Entitlement | None:
        path = self.shared.config.entitlement_path
        try:
            text = read_armored(path)
        except FileNotFoundError:
            return None
        ent = verify_entitlement(
            text,
            self.keys,
            self.server_id,
            now,
            self.shared.config.allowed_clock_offset,
            self.server_key,
        )
        check_history(self.shared.store.load_meta(), ent)
        return ent

    def signature(self) -> Signature | None:
        try:
            st = self.shared.config.entitlement_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, now: float) -> None:
        """Start-up (blocking) form: read, verify and install the entitlement file."""
        self._ent_signature = self.signature()
        try:
            ent = self.read(now)
        except (EntitlementError, StoreError, OSError) as exc:
            self._reject(exc)
            return
        self.install(ent, now)

    async def reload(self, force: bool) -> str | None:
        """Running form: the file is stat'ed, read and verified in a worker
        thread.  Returns why a new file was rejected, if it was."""
        signature = await self.shared.run_sync(self.signature)
        if not force and signature == self._ent_signature:
            return None
        self._ent_signature = signature
        now = self.shared.clock()
        try:
            ent = await self.shared.run_sync(self.read, now)
        except (EntitlementError, StoreError, OSError) as exc:  # StoreError: its history
            self._reject(exc, at_once=force)
            return str(exc)
        self.install(ent, now)
        self.shared.flush()
        # `floatd activate` writes the activation record right after the file:
        # say at once whether this one is online.  An entitlement made for an
        # online activation (it has refresh_by) waits a moment for its record,
        # which may still be the old one (say, revoked) when the file is seen.
        record = await self._read_record()
        for _ in range(RECORD_WAIT_STEPS if ent.refresh_by is not None else 0):
            if record is not None and record.in_force and record.license == ent.license:
                break
            await trio.sleep(RECORD_WAIT_STEP)
            record = await self._read_record()
        return None

    async def _read_record(self) -> ActivationRecord | None:
        """Read the activation record and say from it whether we are online.
        One read at a time: a slow read of the old record (the refresh loop's)
        must not land after a read of the new one (a reload's)."""
        async with self._record_lock:
            record: ActivationRecord | None = await self.shared.run_sync(
                ActivationRecord.read, self.shared.config
            )
            self.online = record is not None and record.in_force
        return record

    def _reject(self, exc: Exception, at_once: bool = True) -> None:
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
            path=str(self.shared.config.entitlement_path),
            reason=str(exc),
            kept=getattr(self.shared.service.entitlement, "id", None),
        )

    def install(self, ent: Entitlement | None, now: float) -> None:
        self._rejected = (None, 0)
        self.shared.service.install(ent, now)
        if ent is not None and ent.text:  # the one installed last (see check_history)
            rows = installed_record(ent)
            self.shared.committer.submit([SetMeta(k, v) for k, v in rows], urgent=False)
        # Logged when what it says changed, not at every hourly refresh (which
        # brings a new entitlement id and refresh_by, and logs `refreshed`).
        terms = None if ent is None else (ent.license, ent.customer, ent.not_after, ent.products)
        if terms == self._logged_terms:
            return
        self._logged_terms = terms
        if ent is None:
            log.warning("not_activated", path=str(self.shared.config.entitlement_path))
            return
        log.info(
            "entitlement_installed",
            entitlement=ent.id,
            license=ent.license,
            products=[p.code for p in ent.products],
            customer=ent.customer,
            not_after=ent.not_after,
        )
        self.warn_cleartext_passwords()

    def warn_cleartext_passwords(self) -> None:
        """At start, and when the products or TLS change: passwords of license
        users would cross the LAN in clear."""
        ent = self.shared.service.entitlement
        named = [p.code for p in ent.products if p.authorization == "user"] if ent else []
        if named and not self.tls:
            log.warning(
                "passwords_without_tls",
                products=named,
                hint="set [server] tls_cert and tls_key: passwords travel in clear",
            )

    async def keep_fresh(self) -> None:
        """Keep an online activation fresh; see :mod:`floatd.daemon.online` for the rules."""
        schedule = RefreshSchedule(self.shared.config.authority_refresh_interval)
        delay = schedule.first()
        while True:
            await trio.sleep(delay)
            schedule.interval = self.shared.config.authority_refresh_interval  # reloadable
            record = await self._read_record()
            if record is None or not record.in_force or not self.shared.config.authority_url:
                delay = min(schedule.interval, 5.0)  # watch for a new activation
                continue
            delay = schedule.after(await self._refresh_once(record))

    async def _refresh_once(self, record: ActivationRecord) -> bool:
        ent = self.shared.service.entitlement
        refresh_by = ent.refresh_by if ent is not None else None
        local = await self.shared.run_sync(
            users.local_assignments, users.users_source(self.shared.config)
        )
        try:
            text, fresh = await online.refresh(
                self.shared.config, self.server_id, record, self.shared.clock(), local
            )
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
        await self.shared.run_sync(atomic_write, self.shared.config.entitlement_path, text)
        self._ent_signature = await self.shared.run_sync(self.signature)
        self.install(fresh, self.shared.clock())
        self.shared.flush()
        log.info("refreshed", entitlement=fresh.id, refresh_by=fresh.refresh_by)
        await self._end_unassigned(fresh)
        return True

    async def _end_unassigned(self, ent: Entitlement) -> None:
        """End the leases of license users who are no longer assigned: neither
        in the entitlement (the authority unassigned them) nor on this server
        (the site's own users stay the site's to end).  Checked at each
        refresh against the leases held, so one missed (the state could not
        be written) is ended at the next."""
        if self.end_user is None:
            return
        # Read again, not the list sent with the refresh: a user the site
        # assigned while the authority was answering may already hold a seat.
        local = await self.shared.run_sync(
            users.local_assignments, users.users_source(self.shared.config)
        )
        held = list(self.shared.service.ledger.leases())
        for terms in ent.products:
            if terms.authorization != "user":
                continue
            allowed = set(terms.users) | set(local.get(terms.code, ()))
            gone = {
                lease.user
                for lease in held
                if lease.product == terms.code and lease.user and lease.user not in allowed
            }
            for email in sorted(gone):
                try:
                    ended = await self.end_user(email, terms.code)
                except FloatdError as exc:  # UNAVAILABLE: tried again at the next refresh
                    log.warning("license_user_not_ended", user=email, reason=exc.message)
                    return
                log.warning(
                    "license_user_unassigned",
                    user=email,
                    product=terms.code,
                    leases_ended=len(ended),
                    by="authority",
                )

    async def _activation_revoked(self, record: ActivationRecord, exc: AuthorityError) -> None:
        """A 410: stop leasing now, and remember it across restarts."""
        log.error("activation_revoked", activation=record.activation_id, reason=exc.message)
        self.refresh_problem = f"{exc.error_code} (HTTP {exc.status}): {exc.message}"

        def forget() -> None:
            self.shared.config.entitlement_path.unlink(missing_ok=True)
            dataclasses.replace(record, revoked=True).write(self.shared.config)

        async with self._record_lock:  # see _read_record
            await self.shared.run_sync(forget)
            self.online = False
        self._ent_signature = None
        self.install(None, self.shared.clock())
        self.shared.flush()
