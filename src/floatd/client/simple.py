"""A minimal blocking client: one socket, one request at a time.

It exists for scripts, the demo, and tests that talk to a real server over real
sockets; it does no renewal or reconnection.  Applications should use the full
client library.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from floatd.client.fingerprint import machine_fingerprint
from floatd.client.frames import receive_frame_blocking
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.errors import FloatdError


class ProtocolError(Exception):
    """The server closed the connection or sent something unreadable."""


class SimpleClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._next_id = 0
        self._decoder = FrameDecoder()

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

    def receive(self) -> dict[str, Any]:
        try:
            frame = receive_frame_blocking(self.sock.recv, self._decoder)
        except FloatdError as exc:  # BadFrame
            raise ProtocolError(exc.message) from None
        if frame is None:
            raise ProtocolError("connection closed by server")
        return frame

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.receive()

    def hello(self, client: str = "floatd-simple/1", **fields: Any) -> dict[str, Any]:
        return self.request("hello", versions=[1], client=client, **fields)


PASSWORD_ENV = "FLOATD_PASSWORD"


def main(argv: list[str] | None = None) -> int:
    """``python -m floatd.client.simple HOST:PORT PRODUCT [--once] [--user U]
    [--password]``: take a seat, hold it (renewing) until Ctrl-C, then give it
    back.  ``--password`` sends the license user's password, taken from
    ``$FLOATD_PASSWORD`` or else prompted for."""
    import argparse
    import getpass
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m floatd.client.simple", description="Take a seat and hold it."
    )
    parser.add_argument("server", metavar="HOST:PORT")
    parser.add_argument("product")
    parser.add_argument("--once", action="store_true", help="give the seat back at once")
    parser.add_argument("--user", help="license user (or OS user) to lease as")
    parser.add_argument(
        "--password",
        action="store_true",
        help=f"send the user's password: from ${PASSWORD_ENV}, else prompted",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    host, _, port = args.server.rpartition(":")
    if not port.isdigit():
        print(f"not HOST:PORT: {args.server!r}", file=sys.stderr)
        return 2
    credentials = {}
    if args.user is not None:
        credentials["user"] = args.user
    if args.password:
        credentials["password"] = os.environ.get(PASSWORD_ENV) or getpass.getpass("password: ")
    try:
        client = SimpleClient(host.strip("[]"), int(port))
        return _hold(client, args.product, args.once, credentials)
    except (OSError, ProtocolError) as exc:
        print(f"cannot lease from {args.server}: {exc}", file=sys.stderr)
        return 1


def _hold(client: SimpleClient, product: str, once: bool, credentials: dict[str, str]) -> int:
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
            **credentials,
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
