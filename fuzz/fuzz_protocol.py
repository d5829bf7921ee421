"""Fuzz target: bytes from a client, through framing, request validation and
the per-connection rules (floatd.protocol).  Any exception escaping is a bug:
hostile input must only ever produce refusal events.

    python fuzz/fuzz_protocol.py [libFuzzer options] [CORPUS_DIR ...]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from floatd.core.codec import encode_frame
    from floatd.core.connection import Refusal, ServerConnection
    from floatd.core.service import LeaseService


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    tokens = ["t0k3n"] if fdp.ConsumeBool() else []
    conn = ServerConnection(tokens)
    service = LeaseService("0" * 32, 900)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    # Feed in fuzzer-chosen chunks, so partial frames are exercised too.
    pos = 0
    step = 1 + (rest[0] % 7 if rest else 0)
    while pos < len(rest) and not conn.closed:
        conn.receive_data(rest[pos : pos + step])
        pos += step
        while (event := conn.next_event()) is not None:
            if isinstance(event, Refusal):
                encode_frame(event.response)
                continue
            # A valid request: the service must answer it (without an entitlement
            # every lease op is refused), and the answer must be encodable.
            result = service.handle(event, 1_800_000_000.0, "127.0.0.1")
            if isinstance(result, dict):
                encode_frame(result)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
