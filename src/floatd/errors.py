"""The one exception hierarchy of floatd.

Every refusal a client can see is a :class:`FloatdError` carrying the wire code
from the protocol contract, so the server turns any of them into an error frame
without a lookup table, and the CLI turns them into one clear line.  Errors that
never reach the wire (config, entitlement files) still derive from the same base
so callers can catch one type.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FloatdError(Exception):
    """Base of every error floatd raises on purpose."""

    code: ClassVar[str] = "INTERNAL"
    #: Whether the server closes the connection after sending this error.
    closes: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of a failure response."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return body


# --- framing and request shape -------------------------------------------------


class BadFrame(FloatdError):
    code = "BAD_FRAME"
    closes = True


class BadRequest(FloatdError):
    code = "BAD_REQUEST"


class UnknownOp(FloatdError):
    code = "UNKNOWN_OP"


class HelloRequired(FloatdError):
    code = "HELLO_REQUIRED"
    closes = True


class UnsupportedVersion(FloatdError):
    code = "UNSUPPORTED_VERSION"
    closes = True


class Forbidden(FloatdError):
    code = "FORBIDDEN"
    closes = True


class Busy(FloatdError):
    code = "BUSY"
    closes = True


class RateLimited(FloatdError):
    code = "RATE_LIMITED"


class InternalError(FloatdError):
    code = "INTERNAL"


class Unavailable(FloatdError):
    """The durable state cannot be written right now: nothing was changed, and
    the server comes back by itself once its disk (or database) does."""

    code = "UNAVAILABLE"


# --- seats and leases ----------------------------------------------------------


class IpNotAllowed(FloatdError):
    code = "IP_NOT_ALLOWED"


class AuthFailed(FloatdError):
    code = "AUTH_FAILED"


class UnknownProduct(FloatdError):
    code = "UNKNOWN_PRODUCT"


class NoFreeSeats(FloatdError):
    code = "NO_FREE_SEATS"


class LeaseNotFound(FloatdError):
    code = "LEASE_NOT_FOUND"


class BorrowNotAllowed(FloatdError):
    """A borrow this server may not grant; details ``reason``: ``product``
    (borrow_max is 0), ``server_key`` (the entitlement names no key of this
    server), ``policy`` (the site policy keeps the seat from being borrowed)."""

    code = "BORROW_NOT_ALLOWED"


class PolicyDenied(FloatdError):
    """The site's policy (floatd.core.policy) keeps this requester from the
    product; details ``rule`` (exclude, include, max) and ``product``."""

    code = "POLICY_DENIED"


# --- the server's own license --------------------------------------------------


class LicenseRefusal(FloatdError):
    """A refusal caused by the server's entitlement rather than the request."""


class NotActivated(LicenseRefusal):
    code = "NOT_ACTIVATED"


class LicenseNotYetValid(LicenseRefusal):
    code = "LICENSE_NOT_YET_VALID"


class LicenseExpired(LicenseRefusal):
    code = "LICENSE_EXPIRED"


class GracePeriodOver(LicenseRefusal):
    code = "GRACE_PERIOD_OVER"


class ServerTimeModified(LicenseRefusal):
    code = "SERVER_TIME_MODIFIED"


# --- local errors (never on the lease wire) -------------------------------------


class ConfigError(FloatdError):
    """An invalid config value; ``key`` names it as ``section.key``."""

    code = "CONFIG"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class PolicyError(ConfigError):
    """A policy file that cannot be used: ``where`` is ``FILE:LINE`` (or the
    file alone), ``key`` the key at fault (``rule 3.max``)."""

    def __init__(self, where: str, key: str, problem: str) -> None:
        super().__init__(where, f"{key}: {problem}" if key else problem)


class BorrowInvalid(FloatdError):
    """A borrow certificate that does not hold offline (floatd.core.borrow);
    ``step`` names the check that failed, in the contract's order.  Never on
    the wire: the client library raises these on the laptop."""

    code = "BORROW_INVALID"
    step = ""


class BorrowUnreadable(BorrowInvalid):
    step = "format"


class BorrowUntrusted(BorrowInvalid):
    step = "entitlement"


class BorrowForged(BorrowInvalid):
    step = "signature"


class BorrowMismatch(BorrowInvalid):
    step = "binding"


class BorrowWrongMachine(BorrowInvalid):
    step = "machine"


class BorrowEnded(BorrowInvalid):
    step = "time"


class BorrowClockBack(BorrowInvalid):
    step = "time"


class EntitlementError(FloatdError):
    """An entitlement or activation file that must not be installed."""

    code = "ENTITLEMENT"


class ListenError(FloatdError):
    """A listener could not be opened (a port in use, an address not here)."""

    code = "LISTEN"


class StoreError(FloatdError):
    """The state directory could not be read or written."""

    code = "INTERNAL"


class AdminError(FloatdError):
    """The running daemon could not be reached, or refused an admin command."""

    code = "ADMIN"


class AuthorityError(FloatdError):
    """An answer of the central authority's HTTP API other than success, on
    either side: the reference authority raises it to answer with ``status`` and
    an ``{"error": {"code", "message"}}`` body; floatd's client raises it when
    the authority answered so."""

    code = "AUTHORITY"

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.error_code, "message": self.message}}
