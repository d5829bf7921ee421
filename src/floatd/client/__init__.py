"""floatd's client library: hold a seat of a product from an application.

Async (trio)::

    async with floatd.client.lease("licenses.lan:7411", "cad") as lease:
        ...  # lease.features, lease.expires_in; lease.lost is set if the seat is lost

Not async::

    with floatd.client.FloatingLicense("licenses.lan:7411", "cad") as lic:
        ...
"""

from floatd.client.borrowing import borrowed, return_borrow
from floatd.client.connection import (
    INSTANCE_ID,
    Connection,
    ConnectionLost,
    UnknownRefusal,
    Unreachable,
    parse_server,
    wire_code,
)
from floatd.client.fingerprint import machine_fingerprint
from floatd.client.lease import UNREACHABLE, Lease, lease
from floatd.client.sync import FloatingLicense

__all__ = [
    "INSTANCE_ID",
    "UNREACHABLE",
    "Connection",
    "ConnectionLost",
    "FloatingLicense",
    "Lease",
    "UnknownRefusal",
    "Unreachable",
    "borrowed",
    "lease",
    "machine_fingerprint",
    "parse_server",
    "return_borrow",
    "wire_code",
]
