"""How answers reach clients over real loopback sockets: the outbox and
back-pressure.  Real clock, each test bounded by ``running`` (20 s).  Answers
that cannot be written, and their seats, are tested in test_server.py."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from conftest import WireClient, product, running, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.protocol.codec import encode_frame
from floatd.server import MAX_PIPELINE, Server

SMALL = 4096  # socket buffer size: the kernel takes few answers at once
PINGS = 20000  # about 0.5 MB of answers, far more than both buffers hold


async def small_buffered_client(port: int) -> WireClient:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
    await sock.connect(("127.0.0.1", port))
    return WireClient(trio.SocketStream(sock))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(500):  # 5 s at most
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def only_connection(server: Server) -> Any:
    (conn,) = server._readers
    return conn


async def test_a_client_that_stops_reading_holds_back_only_itself(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    async with running(tmp_path, vendor_key) as server:
        for listener in server._listeners:  # accepted sockets inherit it
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
        port = server.ports[0][1]
        stalled = await small_buffered_client(port)
        assert (await stalled.hello())["ok"]
        conn = only_connection(server)
        frames = b"".join(encode_frame({"op": "ping", "id": i}) for i in range(1, PINGS + 1))

        async with trio.open_nursery() as nursery:
            # The client sends everything and reads nothing for now.
            nursery.start_soon(stalled.send_raw, frames)
            await wait_until(lambda: conn._draining, "the server to wait for the client")
            await trio.sleep(0.2)  # had it gone on reading, it would have answered far more
            answered = server.stats.requests["ping", "ok"]
            assert answered < PINGS // 10, answered  # what the socket buffers hold, and no more
            assert len(conn._pending) <= MAX_PIPELINE

            # Everyone else is served meanwhile.
            other = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
            assert (await other.hello())["ok"]
            assert (await other.request("ping"))["ok"]
            await other.stream.aclose()

            # Once the client reads, every answer arrives, in order.
            ids = [(await stalled.recv())["id"] for _ in range(PINGS)]
            nursery.cancel_scope.cancel()
        assert ids == list(range(1, PINGS + 1))
        assert not conn._draining and not conn._out
        await stalled.stream.aclose()


async def test_answers_to_many_clients_go_out_in_one_pass(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """Pipelined requests from many connections: each gets its answers in order,
    and the outbox really is what writes them (no answer is left queued)."""
    unlimited = sign(vendor_key, products=[product("app", seats=0)])
    async with running(tmp_path, vendor_key, unlimited) as server:
        port = server.ports[0][1]
        clients = [WireClient(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(8)]
        for c in clients:
            assert (await c.hello())["ok"]
        for n, c in enumerate(clients):
            acquire = {"op": "acquire", "product": "app", "fingerprint": f"machine-{n:04}"}
            await c.send_raw(
                b"".join(
                    encode_frame(
                        {**acquire, "id": 100 + i} if i % 2 == 0 else {"op": "ping", "id": 100 + i}
                    )
                    for i in range(10)
                )
            )
        for c in clients:
            answers = [await c.recv() for _ in range(10)]
            assert [a["id"] for a in answers] == list(range(100, 110))
            assert all(a["ok"] for a in answers), answers
        assert not server._outbox
        assert all(not conn._out and not conn._sending for conn in server._readers)
        for c in clients:
            await c.stream.aclose()
