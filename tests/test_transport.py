"""The lean TCP stream the lease port uses, on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from floatd.transport import TcpStream


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    """(server side as TcpStream, client side as trio's own stream)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    await listeners[0].aclose()
    server = TcpStream(accepted)
    try:
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()


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
