"""How answers reach clients over real loopback sockets: the outbox and
back-pressure.  Real clock, each test bounded by ``running`` (20 s).  Answers
that cannot be written, and their seats, are tested in test_server.py."""

from __future__ import annotations

import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import WireClient, product, running, sign, wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.core.codec import encode_frame
from floatd.daemon.server import Server
from floatd.daemon.session import MAX_PIPELINE

SMALL = 4096  # socket buffer size: the kernel takes few answers at once
PINGS = 20000  # about 0.5 MB of answers, far more than both buffers hold


async def small_buffered_client(port: int) -> WireClient:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
    await sock.connect(("127.0.0.1", port))
    return WireClient(trio.SocketStream(sock))


def only_connection(server: Server) -> Any:
    (conn,) = server.port.readers
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
        assert not server.port.outbox
        assert all(not conn._out and not conn._sending for conn in server.port.readers)
        for c in clients:
            await c.stream.aclose()


# --- the hub's read handler: requests served without waking the connection's task ---


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks serving connections."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if "_serve_stream" in task.name:
            self.steps += 1


async def test_requests_on_a_tcp_connection_leave_its_task_asleep(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    unlimited = sign(vendor_key, products=[product("app", seats=0)])
    async with running(tmp_path, vendor_key, unlimited) as server:
        c = WireClient(await trio.open_tcp_stream("127.0.0.1", server.ports[0][1]))
        assert (await c.hello())["ok"]
        counter = TaskSteps()
        trio.lowlevel.add_instrument(counter)
        try:
            for n in range(50):
                assert (await c.request("ping"))["ok"]
                assert (await c.acquire(fingerprint=f"machine-{n:04}"))["ok"]
        finally:
            trio.lowlevel.remove_instrument(counter)
        # 100 requests, each answered before the next was sent; the task woke for none.
        assert counter.steps <= 2, counter.steps
        await c.stream.aclose()


async def test_a_password_check_hands_the_connection_back_to_its_task(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """The check is the one step of an acquire that waits; pipelined requests
    around it are applied and answered in order."""
    named = sign(
        vendor_key,
        products=[product("named", seats=5, authorization="user", users=["ann@example.com"])],
    )
    async with running(tmp_path, vendor_key, named) as server:
        checked: list[str] = []

        async def check_password(req: Any) -> bool:
            checked.append(req.password)
            await trio.sleep(0.01)  # off the event loop, as the real check is
            return bool(req.password == "right")

        server.check_password = check_password  # type: ignore[method-assign]
        c = WireClient(await trio.open_tcp_stream("127.0.0.1", server.ports[0][1]))
        assert (await c.hello())["ok"]
        acquire = {"op": "acquire", "product": "named", "user": "ann@example.com"}
        await c.send_raw(
            b"".join(
                [
                    encode_frame({"op": "ping", "id": 10}),
                    encode_frame(
                        {**acquire, "id": 11, "fingerprint": "machine-0001", "password": "right"}
                    ),
                    encode_frame({"op": "ping", "id": 12}),
                    encode_frame(
                        {**acquire, "id": 13, "fingerprint": "machine-0002", "password": "wrong"}
                    ),
                    encode_frame({"op": "ping", "id": 14}),
                ]
            )
        )
        answers = [await c.recv() for _ in range(5)]
        assert [a["id"] for a in answers] == [10, 11, 12, 13, 14]
        assert answers[1]["ok"], answers[1]
        assert answers[3]["error"]["code"] == "AUTH_FAILED"
        assert checked == ["right", "wrong"]
        assert (await c.request("ping"))["ok"]  # and back to the hub's handler
        await c.stream.aclose()


async def test_a_closing_refusal_and_a_hang_up_end_tcp_connections(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    async with running(tmp_path, vendor_key) as server:
        port = server.ports[0][1]
        bad = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
        assert (await bad.hello())["ok"]
        await bad.send_raw(b"\xff\xff\xff\xff")  # a frame far over the size limit
        refusal = await bad.recv()
        assert refusal["error"]["code"] == "BAD_FRAME"
        assert await bad.closed()

        gone = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
        assert (await gone.hello())["ok"]
        await wait_until(lambda: server.connections == 1, "the bad connection to end")
        await gone.stream.aclose()
        await wait_until(lambda: server.connections == 0, "the hang-up to be noticed")
        await bad.stream.aclose()


async def test_a_failure_in_the_hub_handler_is_raised_by_the_connection(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """A bug met while the hub serves a connection surfaces as it would have in
    the connection's own task, with the hub itself left out of it."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the lease logic")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with running(tmp_path, vendor_key) as server:
            c = WireClient(await trio.open_tcp_stream("127.0.0.1", server.ports[0][1]))
            assert (await c.hello())["ok"]
            server.service.handle = broken  # type: ignore[method-assign]
            await c.send("ping")
            await trio.sleep(5)  # the server fails long before
    failures = caught.value.exceptions
    flat: list[BaseException] = []
    while failures:
        first, *rest = failures
        if isinstance(first, BaseExceptionGroup):
            failures = [*first.exceptions, *rest]
        else:
            flat.append(first)
            failures = rest
    assert [str(e) for e in flat] == ["a bug in the lease logic"]
    frames = traceback.extract_tb(flat[0].__traceback__)
    assert any(f.name == "_reader" for f in frames)


async def test_a_read_that_fills_the_buffer_is_followed_up(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """Requests bigger than one read, all in the socket before the hub looks:
    no further readiness will come, so the rest must be read all the same."""
    unlimited = sign(vendor_key, products=[product("app", seats=0)])
    async with running(tmp_path, vendor_key, unlimited) as server:
        for listener in server._listeners:  # accepted sockets inherit it
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        meta = {f"key-{k:02}": "v" * 1024 for k in range(16)}  # about 17 kB a request
        blob = encode_frame(
            {"op": "hello", "id": 1, "versions": [1], "client": "test/1"}
        ) + b"".join(
            encode_frame(
                {
                    "op": "acquire",
                    "id": 2 + i,
                    "product": "app",
                    "fingerprint": f"machine-{i:04}",
                    "meta": meta,
                }
            )
            for i in range(5)
        )
        assert len(blob) > 65536 + 4  # more than one read takes
        plain = socket.create_connection(("127.0.0.1", server.ports[0][1]), timeout=5)
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        await wait_until(lambda: server.connections == 1, "the connection")
        conn = only_connection(server)
        await wait_until(lambda: conn.receiving, "the reader to wait")
        # Blocking, with the event loop held: everything is in the kernel before
        # the hub hears of it (the timeout bounds it should the buffers not take it).
        plain.sendall(blob)
        c = WireClient(trio.SocketStream(trio.socket.from_stdlib_socket(plain)))
        answers = [await c.recv() for _ in range(6)]
        assert [a["id"] for a in answers] == [1, 2, 3, 4, 5, 6]
        assert all(a["ok"] for a in answers), answers
        await c.stream.aclose()


async def test_nothing_sent_after_a_stop_is_applied(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    """A connection still owed an answer stays open through a graceful stop, but
    a request it sends then is not served, by its task or by the hub."""
    ent = sign(vendor_key, products=[product("app", seats=1), product("free", seats=0)])
    async with running(tmp_path, vendor_key, ent) as server:
        port = server.ports[0][1]
        holder = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
        assert (await holder.hello())["ok"]
        assert (await holder.acquire())["ok"]
        waiting = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
        assert (await waiting.hello())["ok"]
        await waiting.send("acquire", product="app", fingerprint="machine-0002", wait=2)
        await wait_until(
            lambda: any(c._pending for c in server.port.readers), "the acquire to be queued"
        )
        (conn,) = [c for c in server.port.readers if c._pending]
        server.stop()
        await wait_until(lambda: server.port.stopping and conn.receiving, "the stop")
        await waiting.send("acquire", product="free", fingerprint="machine-0003")
        await wait_until(lambda: not conn.receiving, "the late request to be read")
        assert [lease.product for lease in server.service.ledger.leases()] == ["app"]
        answer = await waiting.recv()  # the queued acquire is still answered
        assert answer["error"]["code"] == "NO_FREE_SEATS"
        assert await waiting.closed()  # ... and nothing after it
