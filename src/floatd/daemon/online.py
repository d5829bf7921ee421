"""Online activation: floatd's side of the central authority's HTTP API.

``activate`` and ``deactivate`` run from the CLI; ``refresh`` runs in the
daemon every ``[authority] refresh_interval``.  The rule that matters most: a
bad answer never replaces a good entitlement.  Timeouts, 5xx, garbage JSON and
badly signed entitlements are all just failed refreshes; the daemon goes on
serving with what it has until that entitlement's ``refresh_by`` passes, and
only a 410 (activation or license revoked or suspended) stops leasing at once.

The activation id lives in ``<state>/activation.json`` beside the entitlement.
HTTP is httpx (on trio, through anyio), with TLS verification always on, an
optional CA bundle and proxy, and a timeout on every call.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from floatd import __version__
from floatd.config import Config
from floatd.core.entitlement import Entitlement
from floatd.errors import AuthorityError, EntitlementError, FloatdError
from floatd.store.activation import atomic_write, install_entitlement, verify_for_this_server
from floatd.store.server_key import public_key_text


class AuthorityUnavailable(FloatdError):
    """The authority could not be reached, or answered nonsense."""

    code = "AUTHORITY_UNAVAILABLE"


RECORD = "activation.json"


@dataclass(frozen=True)
class ActivationRecord:
    activation_id: str
    url: str
    license: str
    activated_at: float
    revoked: bool = False
    #: An offline response was installed over it: it is no longer refreshed,
    #: and giving it back (floatd deactivate) leaves that entitlement alone.
    superseded: bool = False

    @property
    def in_force(self) -> bool:
        """Whether this activation is refreshed (neither revoked nor superseded)."""
        return not (self.revoked or self.superseded)

    @staticmethod
    def path(config: Config) -> Path:
        return config.state_dir / RECORD

    @classmethod
    def read(cls, config: Config) -> ActivationRecord | None:
        try:
            doc = json.loads(cls.path(config).read_text(encoding="utf-8"))
            return cls(**doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # unreadable: as if none; `floatd activate` writes a new one

    def write(self, config: Config) -> None:
        atomic_write(self.path(config), json.dumps(self.__dict__, indent=2) + "\n")


def client(config: Config) -> httpx.AsyncClient:
    verify: Any = config.authority_ca_bundle or True
    return httpx.AsyncClient(
        base_url=config.authority_url,
        timeout=config.authority_timeout,
        verify=verify,
        proxy=config.authority_proxy or None,
        headers={"user-agent": f"floatd/{__version__}"},
        follow_redirects=False,
    )


def _reason(exc: BaseException) -> str:
    """Why a request failed, in words: the innermost cause that has some (an
    untrusted certificate surfaces as an httpx error with an empty message,
    the SSL error that says why only among its causes)."""
    words = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause):
            words = f"{cause.__class__.__name__}: {cause}"
        cause = cause.__cause__ or cause.__context__
    return words


async def call(
    http: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """One API call: ``(status, json body)``; AuthorityUnavailable when the
    authority cannot be reached or its answer is not the API's."""
    try:
        response = await http.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise AuthorityUnavailable(
            f"cannot reach the authority at {http.base_url}: {_reason(exc)}"
        ) from None
    if response.status_code == 204:
        return 204, {}
    if response.status_code >= 500:
        raise AuthorityUnavailable(f"the authority failed (HTTP {response.status_code})")
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if len(response.content) > 1_000_000 or not isinstance(doc, dict):
        raise AuthorityUnavailable(
            f"the authority's answer (HTTP {response.status_code}) is not a JSON object"
        )
    if response.status_code >= 400:
        found = doc.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        raise AuthorityError(
            response.status_code,
            str(error.get("code", "UNKNOWN"))[:64],
            str(error.get("message", f"HTTP {response.status_code}"))[:500],
        )
    return response.status_code, doc


def _entitlement_text(doc: dict[str, Any]) -> str:
    text = doc.get("entitlement")
    if not isinstance(text, str) or len(text) > 1_000_000:
        raise AuthorityUnavailable("the authority's answer carries no entitlement")
    return text


async def activate(
    config: Config, server_id: str, license_key: str, now: float
) -> tuple[ActivationRecord, Entitlement, ActivationRecord | None]:
    """Activate, verify what came back, and install it (entitlement, then record).
    Also returns the activation this one replaced (another license's), which
    is given back to the authority, or None."""
    if not config.authority_url:
        raise AuthorityError(0, "NO_AUTHORITY", "[authority] url is not set")
    body = {
        "license_key": license_key,
        "server": server_id,
        "hostname": socket.gethostname(),
        "floatd": __version__,
        "server_key": public_key_text(config.state_dir),
    }
    previous = ActivationRecord.read(config)
    async with client(config) as http:
        status, doc = await call(http, "POST", "/v1/activations", body)
        activation_id = doc.get("activation_id")
        if status != 201 or not isinstance(activation_id, str) or not activation_id:
            raise AuthorityUnavailable(f"unexpected answer to an activation (HTTP {status})")
        fresh = previous is None or previous.activation_id != activation_id
        try:
            text = _entitlement_text(doc)
            ent = verify_for_this_server(config, server_id, text, now)
            record = ActivationRecord(activation_id, config.authority_url, ent.license, now)
            install_entitlement(config, ent)
            record.write(config)
        except BaseException:
            # Not activated here after all (say, the vendor's key is not
            # trusted): a place taken just now goes back at once.
            if fresh:
                await _give_back(http, activation_id, server_id)
            raise
        replaced = previous if fresh else None
        if replaced is not None:
            # This server held another activation (another license): it is
            # replaced here, so it is given back there.
            await _give_back(http, replaced.activation_id, server_id)
    return record, ent, replaced


async def _give_back(http: httpx.AsyncClient, activation_id: str, server_id: str) -> None:
    """Best effort DELETE of an activation (it may be gone there already)."""
    with contextlib.suppress(AuthorityError, AuthorityUnavailable):
        await call(http, "DELETE", f"/v1/activations/{activation_id}", {"server": server_id})


async def refresh(
    config: Config,
    server_id: str,
    record: ActivationRecord,
    now: float,
    local_users: dict[str, list[str]] | None = None,
) -> tuple[str, Entitlement]:
    """A fresh entitlement, verified (never installed here: the daemon does).
    ``local_users``: the license users assigned on this server, which the
    authority shows and counts against max_users."""
    body: dict[str, Any] = {
        "server": server_id,
        "floatd": __version__,
        "server_key": public_key_text(config.state_dir),
    }
    if local_users is not None:
        body["local_users"] = local_users
    async with client(config) as http:
        _, doc = await call(http, "POST", f"/v1/activations/{record.activation_id}/refresh", body)
    text = _entitlement_text(doc)
    try:
        ent = verify_for_this_server(config, server_id, text, now)
    except EntitlementError as exc:
        raise AuthorityUnavailable(f"the refreshed entitlement was rejected: {exc}") from None
    if ent.license != record.license:
        raise AuthorityUnavailable("the refreshed entitlement is for another license")
    return text, ent


async def deactivate(config: Config, server_id: str) -> ActivationRecord:
    record = ActivationRecord.read(config)
    if record is None:
        raise AuthorityError(0, "NOT_ACTIVATED", "this server has no online activation")
    # Also after the activation was refused (410: a suspension, say): the
    # authority still counts it until told, and a reinstated license would
    # then find this server's place taken.
    async with client(config) as http:
        try:
            await call(
                http, "DELETE", f"/v1/activations/{record.activation_id}", {"server": server_id}
            )
        except AuthorityError as exc:
            if exc.status not in (404, 410):  # already gone there: finish here
                raise
    if not record.superseded:
        config.entitlement_path.unlink(missing_ok=True)
    ActivationRecord.path(config).unlink(missing_ok=True)
    return record


class RefreshSchedule:
    """When to refresh next (sans-IO): every interval with +-10% jitter, so a
    site's servers do not all call at once; after a failure, exponential
    backoff from 30 s (or the interval, if shorter) up to the interval, with
    jitter too."""

    def __init__(self, interval: float, rng: random.Random | None = None) -> None:
        self.interval = interval
        self.failures = 0
        self._rng = rng or random.Random()

    def first(self) -> float:
        """Soon after start, so a suspension while we were down is seen early."""
        return min(self.interval, 60.0) * self._rng.uniform(0.1, 0.3)

    def after(self, ok: bool) -> float:
        if ok:
            self.failures = 0
            return self.interval * self._rng.uniform(0.9, 1.1)
        self.failures += 1
        base = min(30.0, self.interval)
        delay: float = min(self.interval, base * 2.0 ** min(self.failures - 1, 30))
        return delay * self._rng.uniform(0.5, 1.0)
