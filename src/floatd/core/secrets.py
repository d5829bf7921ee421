"""New lease ids and tokens: OS randomness, drawn and encoded in blocks."""

from __future__ import annotations

import base64
import os


class _RandomText:
    """URL-safe base64 text of OS randomness, drawn and encoded a block at a
    time: getrandom costs ~20 us a call on the VMs we measured, as much as the
    rest of an acquire, and encoding each id and token apart cost an acquire
    four calls into base64.  Every character still carries six random bits."""

    #: Characters per draw: 51 bytes, which encode to whole characters with no
    #: padding (an id takes 22 of them, a token 43).
    DRAW = 68
    BLOCK = 51 * 256

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0

    def take(self) -> str:
        pos = self._pos
        if pos + self.DRAW > len(self._text):
            self._text = base64.urlsafe_b64encode(os.urandom(self.BLOCK)).decode()
            pos = 0
        self._pos = pos + self.DRAW
        return self._text[pos : pos + self.DRAW]


_random = _RandomText()


def new_lease_secrets() -> tuple[str, str]:
    """A lease id (22 characters, 132 random bits) and its token (43
    characters, 258 bits).

    An id never starts with "-": admins paste ids into ``floatd revoke LEASE``,
    where a leading dash reads as an option.  One id in 64 is drawn again.
    """
    drawn = _random.take()
    lease_id = drawn[:22]
    while lease_id[0] == "-":
        lease_id = _random.take()[:22]
    return lease_id, drawn[22:65]
