"""The default client fingerprint, shared by every floatd client.

Two clients on one machine must send the same fingerprint, or a per-machine
product counts that machine twice; so there is one recipe, written down in
docs/protocol.md for clients in other languages:

1. the first non-empty of ``/etc/machine-id`` and ``/var/lib/dbus/machine-id``,
   with surrounding whitespace (the trailing newline) stripped; where neither
   exists, the host name;
2. ``"floatd-client-v1:"`` + that text, UTF-8, through SHA-256;
3. the first 32 lower-case hex digits.

The salt keeps the raw machine id on the machine.  No MAC addresses or disk
ids: they change under virtualisation.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def fingerprint_of(machine_id: str) -> str:
    """Step 2 and 3 of the recipe, for a machine id already read."""
    return hashlib.sha256(b"floatd-client-v1:" + machine_id.encode()).hexdigest()[:32]


def machine_fingerprint(files: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    for path in files:
        try:
            raw = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if raw:
            return fingerprint_of(raw)
    return fingerprint_of(socket.gethostname())
