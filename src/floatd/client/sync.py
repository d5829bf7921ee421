"""The same lease for code that is not async: a background thread runs trio.

    with FloatingLicense("licenses.lan:7411", "cad") as lic:
        print(lic.features)

``acquire()`` blocks until the seat is held (or raises the refusal),
``release()`` gives it back; renewals, reconnects and loss reporting are those
of :func:`floatd.client.lease`.  Callbacks run on the background thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import trio

from floatd.client.lease import Lease, lease


class FloatingLicense:
    def __init__(
        self,
        servers: str | Sequence[str],
        product: str,
        *,
        on_lost: Callable[[FloatingLicense], Any] | None = None,
        on_renew: Callable[[FloatingLicense], Any] | None = None,
        **options: Any,
    ) -> None:
        self.servers, self.product_code, self.options = servers, product, options
        self.on_lost, self.on_renew = on_lost, on_renew
        self._lease: Lease | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._abandoned = False  # acquire() gave up waiting: give the seat back at once

    # --- what the application reads -------------------------------------------------

    @property
    def held(self) -> bool:
        return self._lease is not None and not self._lease.lost.is_set() and not self._done.is_set()

    @property
    def lease_id(self) -> str | None:
        return self._lease.id if self._lease else None

    @property
    def product(self) -> dict[str, Any]:
        return dict(self._lease.product) if self._lease else {}

    @property
    def metadata(self) -> dict[str, Any]:
        return self._lease.metadata if self._lease else {}

    @property
    def features(self) -> dict[str, Any]:
        return self._lease.features if self._lease else {}

    @property
    def expires_in(self) -> float:
        return self._lease.expires_in if self._lease else 0.0

    @property
    def borrowed(self) -> bool:
        """Borrowed for offline use (by :meth:`borrow`, or found stored)."""
        return self._lease is not None and self._lease.borrowed

    def borrow(self, seconds: int) -> str:
        """Borrow the held seat for ``seconds``; returns the certificate (also
        stored, see floatd.client.borrowing).  The seat then outlives release()."""
        lease, token = self._lease, self._token
        if lease is None or token is None:
            raise RuntimeError("acquire() first")
        return str(trio.from_thread.run(lease.borrow, seconds, trio_token=token))

    @property
    def lost(self) -> bool:
        return self._lease is not None and self._lease.lost.is_set()

    @property
    def lost_code(self) -> str | None:
        return self._lease.lost_code if self._lease else None

    # --- acquire and release ------------------------------------------------------------

    def acquire(self, timeout: float | None = 60.0) -> FloatingLicense:
        if self._thread is not None:
            raise RuntimeError("already acquired")
        self._thread = threading.Thread(target=self._main, name="floatd-lease", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self._abandoned = True
            self._request_stop()
            raise TimeoutError("no answer from the license server in time")
        if self._error is not None:
            self._thread.join(10)
            self._thread = None
            error, self._error = self._error, None
            raise error
        return self

    def release(self, timeout: float = 10.0) -> None:
        """Give the seat back (waits up to ``timeout`` for the server)."""
        if self._thread is None:
            return
        self._request_stop()
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FloatingLicense:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- the background thread ------------------------------------------------------------

    def _request_stop(self) -> None:
        token, stop = self._token, self._stop
        if token is None or stop is None:
            return
        # run_sync_soon works from any thread, even one running its own trio loop.
        with contextlib.suppress(trio.RunFinishedError):  # the thread already ended
            token.run_sync_soon(stop.set)

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to acquire(), never lost silently
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._done.set()
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        lost_cb, renew_cb = self.on_lost, self.on_renew
        on_lost = (lambda _lease: lost_cb(self)) if lost_cb is not None else None
        on_renew = (lambda _lease: renew_cb(self)) if renew_cb is not None else None
        async with lease(
            self.servers, self.product_code, on_lost=on_lost, on_renew=on_renew, **self.options
        ) as held:
            self._lease = held
            self._ready.set()
            if not self._abandoned:
                await self._stop.wait()
