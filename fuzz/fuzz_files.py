"""Fuzz target: the entitlement and activation-request file parsers.  Only
EntitlementError may come out; anything else is a bug.

    python fuzz/fuzz_files.py [libFuzzer options] [CORPUS_DIR ...]
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from floatd.core.entitlement import (
        format_public_key,
        parse_activation_request,
        trusted_keys,
        verify_entitlement,
    )
    from floatd.errors import EntitlementError

# A fixed key, so seeds signed with it reach past the signature check.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = trusted_keys([format_public_key(KEY.public_key())])
SERVER = "20903adbd00837b0256c680db7a157ca"


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    for parse in (
        lambda: verify_entitlement(text, KEYS, SERVER, 1_800_000_000.0, 60),
        lambda: parse_activation_request(text),
    ):
        with contextlib.suppress(EntitlementError):
            parse()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
