"""A minimal blocking client: one socket, one request at a time.

It exists for scripts, the demo, and tests that talk to a real server over real
sockets; it does no renewal or reconnection.  Applications should use the full
client library.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from floatd.client.fingerprint import machine_fingerprint
from floatd.protocol.codec import MAX_FRAME, decode_body, encode_frame


class ProtocolError(Exception):
    """The server closed the connection or sent something unreadable."""


class SimpleClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._next_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SimpleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, op: str, **fields: Any) -> int:
        self._next_id += 1
        self.sock.sendall(encode_frame({"op": op, "id": self._next_id, **fields}))
        return self._next_id

    def _read_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise ProtocolError("connection closed by server")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict[str, Any]:
        (length,) = struct.unpack(">I", self._read_exact(4))
        if not 1 <= length <= MAX_FRAME:
            raise ProtocolError(f"bad frame length {length}")
        return decode_body(self._read_exact(length))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.receive()

    def hello(self, client: str = "floatd-simple/1", **fields: Any) -> dict[str, Any]:
        return self.request("hello", versions=[1], client=client, **fields)


def main(argv: list[str] | None = None) -> int:
    """``python -m floatd.client.simple HOST:PORT PRODUCT [--once]``: take a seat,
    hold it (renewing) until Ctrl-C, then give it back."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    once = "--once" in args
    args = [a for a in args if a != "--once"]
    if len(args) != 2:
        print("usage: python -m floatd.client.simple HOST:PORT PRODUCT [--once]", file=sys.stderr)
        return 2
    host, _, port = args[0].rpartition(":")
    if not port.isdigit():
        print(f"not HOST:PORT: {args[0]!r}", file=sys.stderr)
        return 2
    try:
        return _hold(SimpleClient(host.strip("[]"), int(port)), args[1], once)
    except (OSError, ProtocolError) as exc:
        print(f"cannot lease from {args[0]}: {exc}", file=sys.stderr)
        return 1


def _hold(client: SimpleClient, product: str, once: bool) -> int:
    import sys
    import time

    with client:
        client.hello()
        got = client.request(
            "acquire",
            product=product,
            fingerprint=machine_fingerprint(),
            instance=str(os.getpid()),
            hostname=socket.gethostname(),
        )
        if not got.get("ok"):
            err = got.get("error", {})
            print(f"refused: {err.get('code')}: {err.get('message')}", file=sys.stderr)
            return 1
        print(
            f"leased a seat of {product!r}: lease {got['lease']}, "
            f"expires in {got['expires_in']:.0f}s",
            flush=True,
        )
        try:
            while not once:
                time.sleep(got["renew_in"])
                got = {**got, **client.request("renew", lease=got["lease"], token=got["token"])}
                print(f"renewed: expires in {got['expires_in']:.0f}s", flush=True)
        except KeyboardInterrupt:
            pass
        client.request("release", lease=got["lease"], token=got["token"])
        print("released", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
