"""The lean TCP stream the lease port uses, on real loopback sockets: trio's
own stream checks, and what the daemon relies on besides."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from floatd.daemon.transport import TcpStream


async def connected() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(the accepted side, the client side) of one loopback connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    await listeners[0].aclose()
    return accepted, client


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    """(server side as TcpStream, client side as trio's own stream), both closed after."""
    accepted, client = await connected()
    server = TcpStream(accepted)
    try:
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()


async def two_tcp_streams() -> tuple[TcpStream, TcpStream]:
    accepted, client = await connected()
    return TcpStream(accepted), TcpStream(client)


async def fill(stream: TcpStream) -> None:
    """Send until the kernel takes no more and the send blocks (as trio's own
    tests clog a socket stream)."""

    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked(0.01)
        nursery.cancel_scope.cancel()


async def clogged_tcp_streams() -> tuple[TcpStream, TcpStream]:
    """A pair whose sends block at once, as trio's checks want."""
    left, right = await two_tcp_streams()
    await fill(left)
    await fill(right)
    return left, right


async def test_it_keeps_trios_stream_contract() -> None:
    """trio's own conformance checks for a two-way stream: checkpoints, busy
    and closed errors, close while blocked, sends larger than the buffers."""
    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(two_tcp_streams, clogged_tcp_streams)


async def test_round_trip_and_a_send_larger_than_the_socket_buffers() -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB: the kernel takes it in pieces
    with trio.fail_after(20):
        async with pair() as (server, client):
            await client.send_all(b"hello")
            assert await server.receive_some(100) == b"hello"
            got = bytearray()

            async def drain() -> None:
                while len(got) < len(payload):
                    chunk = await client.receive_some(65536)
                    assert chunk
                    got.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await server.send_all(payload)
            assert bytes(got) == payload


async def test_peer_hang_up() -> None:
    with trio.fail_after(10):
        async with pair() as (server, client):
            await client.aclose()
            assert await server.receive_some(100) == b""
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):  # the first sends may still land in buffers
                    await server.send_all(b"x" * 65536)


async def test_closed_stream_refuses_use_and_close_is_idempotent() -> None:
    async with pair() as (server, _client):
        await server.aclose()
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some(10)
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")


async def test_close_wakes_a_blocked_receive() -> None:
    with trio.fail_after(10):
        async with pair() as (server, _client):
            outcome: list[str] = []

            async def reader() -> None:
                try:
                    await server.receive_some(10)
                except trio.ClosedResourceError:
                    outcome.append("closed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()
            assert outcome == ["closed"]


@pytest.mark.parametrize("kind", ["receive_owed", "receive_some"])
async def test_both_receive_kinds_read_wait_and_close_like_receive_some(kind: str) -> None:
    """The connection's two ways of reading (wait first, or read first) keep
    receive_some's contract: the data, a wait until data comes, a checkpoint
    that cancellation reaches, the closed and busy errors, and b"" at hang-up."""
    with trio.fail_after(10):
        async with pair() as (server, client):
            receive = getattr(server, kind)
            await client.send_all(b"ready")
            # On loopback the data is in our buffer once send_all returns: owed or
            # not, a receive reads what already arrived.
            assert await receive(100) == b"ready"
            with trio.move_on_after(0.05) as scope:
                await receive(10)  # nothing sent: waits, and is cancelled
            assert scope.cancelled_caught
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_append, got, receive)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await server.receive_some(10)
                await client.send_all(b"later")
            assert got == [b"later"]
            await client.aclose()
            assert await receive(100) == b""
            await server.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await receive(10)


async def _append(into: list[bytes], receive: Callable[[int], Awaitable[bytes]]) -> None:
    into.append(await receive(100))


async def test_receive_is_a_cancellation_point_and_sends_do_not_overlap() -> None:
    with trio.fail_after(20):
        async with pair() as (server, client):
            with trio.move_on_after(0.05) as scope:
                await server.receive_some(10)
            assert scope.cancelled_caught
            errors: list[BaseException] = []

            async def blocked_sender() -> None:
                # Nobody reads the client side, so this send fills the buffers and waits.
                await server.send_all(b"y" * (16 * 1024 * 1024))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_sender)
                await trio.testing.wait_all_tasks_blocked()
                try:
                    await server.send_all(b"z")
                except trio.BusyResourceError as exc:
                    errors.append(exc)
                nursery.cancel_scope.cancel()
            assert len(errors) == 1
            await client.aclose()


async def test_send_nowait_takes_what_the_kernel_takes_and_never_blocks() -> None:
    with trio.fail_after(10):
        async with pair() as (server, client):
            assert server.send_nowait(b"answer") == 6
            assert await client.receive_some(100) == b"answer"
            # The client reads nothing: the buffers fill, and then nothing is taken.
            taken = [server.send_nowait(b"x" * 65536) for _ in range(400)]
            assert taken[-1] == 0 and sum(taken) > 0
            await client.aclose()
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):  # the first sends may still land in buffers
                    server.send_nowait(b"x" * 65536)
                    await trio.sleep(0.001)
            await server.aclose()
            with pytest.raises(trio.ClosedResourceError):
                server.send_nowait(b"x")


async def test_a_cancelled_receive_loses_no_readiness() -> None:
    with trio.fail_after(10):
        async with pair() as (server, client):
            await client.send_all(b"ready")
            await trio.sleep(0.05)  # heard of, with nobody waiting
            with trio.CancelScope() as scope:
                scope.cancel()
                await server.receive_some(100)
            assert scope.cancelled_caught
            assert await server.receive_some(100) == b"ready"


async def test_two_receivers_on_one_stream_are_refused() -> None:
    with trio.fail_after(10):
        async with pair() as (server, client):
            errors: list[BaseException] = []

            async def second() -> None:
                try:
                    await server.receive_some(10)
                except trio.BusyResourceError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some, 10)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"x")
            assert len(errors) == 1
