"""The lean TCP stream the lease port uses, on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import wait_until

from floatd.daemon.transport import ReadinessHub, TcpStream

# Every test runs twice: with the server's epoll hub (Linux) and with trio's own waits.
HUB_MODES = ["trio-wait"] + (["hub"] if ReadinessHub.create() is not None else [])


@pytest.fixture(params=HUB_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def connected() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(the accepted side, the client side) of one loopback connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    await listeners[0].aclose()
    return accepted, client


def own_hub() -> ReadinessHub:
    hub = ReadinessHub.create()
    assert hub is not None, "the hub needs epoll (Linux), where floatd serves"
    return hub


@asynccontextmanager
async def on_hub(hub: ReadinessHub | None) -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    """(server side as TcpStream waiting through ``hub``, client side as trio's
    own stream), both closed afterwards; the caller runs the hub, or not."""
    accepted, client = await connected()
    server = TcpStream(accepted, hub)
    try:
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()


@asynccontextmanager
async def pair(mode: str = "trio-wait") -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    """(server side as TcpStream, client side as trio's own stream), with a
    running hub in the "hub" mode."""
    async with trio.open_nursery() as nursery:
        hub = own_hub() if mode == "hub" else None
        if hub is not None:
            nursery.start_soon(hub.run)
        try:
            async with on_hub(hub) as streams:
                yield streams
        finally:
            nursery.cancel_scope.cancel()


async def test_round_trip_and_a_send_larger_than_the_socket_buffers(mode: str) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB: the kernel takes it in pieces
    with trio.fail_after(20):
        async with pair(mode) as (server, client):
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


async def test_peer_hang_up(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
            await client.aclose()
            assert await server.receive_some(100) == b""
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):  # the first sends may still land in buffers
                    await server.send_all(b"x" * 65536)


async def test_closed_stream_refuses_use_and_close_is_idempotent(mode: str) -> None:
    async with pair(mode) as (server, _client):
        await server.aclose()
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some(10)
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")


async def test_close_wakes_a_blocked_receive(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, _client):
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


async def test_receive_is_a_cancellation_point_and_sends_do_not_overlap(mode: str) -> None:
    with trio.fail_after(20):
        async with pair(mode) as (server, client):
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


async def test_send_nowait_takes_what_the_kernel_takes_and_never_blocks(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
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


async def test_a_burst_larger_than_one_read_is_read_whole_without_more_data(mode: str) -> None:
    """The hub is edge-triggered: a read that filled its buffer must not wait for
    another arrival to read what the kernel still holds."""
    burst = bytes(range(256)) * 40  # 10 KiB, sent once (it fits the buffers); nothing follows
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
            await client.send_all(burst)
            await trio.sleep(0.05)  # all of it arrived, as one edge
            got = bytearray()
            for _ in range(len(burst)):  # bounded: each read returns at least a byte
                got += await server.receive_some(1000)
                if len(got) >= len(burst):
                    break
            assert bytes(got) == burst


async def test_data_that_arrives_while_nobody_waits_is_not_lost(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
            assert await _round(server, client, b"one") == b"one"
            # The next request arrives (and the hub hears of it) before anyone waits.
            await client.send_all(b"two")
            await trio.sleep(0.05)
            assert await server.receive_some(100) == b"two"


async def test_a_cancelled_receive_loses_no_readiness(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
            await client.send_all(b"ready")
            await trio.sleep(0.05)  # heard of, with nobody waiting
            with trio.CancelScope() as scope:
                scope.cancel()
                await server.receive_some(100)
            assert scope.cancelled_caught
            assert await server.receive_some(100) == b"ready"


async def test_two_receivers_on_one_stream_are_refused(mode: str) -> None:
    with trio.fail_after(10):
        async with pair(mode) as (server, client):
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


async def test_many_streams_share_one_hub(mode: str) -> None:
    hub = ReadinessHub.create() if mode == "hub" else None
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            if hub is not None:
                nursery.start_soon(hub.run)
            pairs = []
            for _ in range(50):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                pairs.append((TcpStream(await listeners[0].accept(), hub), client))
            for rounds in range(3):
                for i, (_server, client) in enumerate(pairs):
                    await client.send_all(b"%d/%d" % (i, rounds))
                for i, (server, _client) in enumerate(pairs):
                    assert await server.receive_some(100) == b"%d/%d" % (i, rounds)
            for server, client in pairs:
                await server.aclose()
                await client.aclose()
            nursery.cancel_scope.cancel()
    await listeners[0].aclose()


async def _round(server: TcpStream, client: trio.SocketStream, data: bytes) -> bytes:
    await client.send_all(data)
    return await server.receive_some(100)


async def test_a_stream_outlives_its_hub() -> None:
    """Streams still open when the hub stops (not the server's order, but
    possible) go on receiving through trio, including one blocked at the time."""
    hub = own_hub()
    got: list[bytes] = []
    with trio.fail_after(10):
        async with on_hub(hub) as (server, client):
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as hub_nursery:
                    hub_nursery.start_soon(hub.run)
                    await trio.testing.wait_all_tasks_blocked()

                    async def reader() -> None:
                        got.append(await server.receive_some(100))

                    outer.start_soon(reader)
                    await trio.testing.wait_all_tasks_blocked()
                    hub_nursery.cancel_scope.cancel()  # the reader is blocked in the hub
                await client.send_all(b"after")
            assert got == [b"after"]
            await client.send_all(b"again")
            assert await server.receive_some(100) == b"again"


async def test_a_stream_the_hub_cannot_take_waits_through_trio() -> None:
    """Registering can fail (epoll's max_user_watches); the connection must not."""
    hub = own_hub()
    hub._epoll.close()  # every register now fails
    with trio.fail_after(10):
        async with on_hub(hub) as (server, client):
            assert await _round(server, client, b"still served") == b"still served"


# --- read handlers: the hub serving a stream's reads without waking its task ------


async def test_a_read_handler_serves_data_while_the_task_sleeps_on() -> None:
    with trio.fail_after(10):
        async with pair("hub") as (server, client):
            handled: list[bytes | None] = []
            keep_sleeping = True

            def handler() -> bool:
                handled.append(server.receive_nowait(100))
                return keep_sleeping

            assert server.set_read_handler(handler)
            # A new stream counts as ready (data may predate its registration).
            await server.wait_readable()
            assert server.receive_nowait(100) is None
            woke: list[bytes | None] = []

            async def reader() -> None:
                await server.wait_readable()
                woke.append(server.receive_nowait(100))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"one")
                await wait_until(lambda: handled == [b"one"], "the handler")
                await trio.testing.wait_all_tasks_blocked()
                assert woke == []  # served by the handler: the task was left asleep
                keep_sleeping = False
                await client.send_all(b"two")
            # The handler took "two" as well, then sent the task back: nothing left.
            assert handled == [b"one", b"two"]
            assert woke == [None]


async def test_a_read_handler_only_runs_for_a_waiting_task() -> None:
    """Data that arrives while nobody waits is the task's to read, as before."""
    with trio.fail_after(10):
        async with pair("hub") as (server, client):
            calls: list[int] = []

            def handler() -> bool:
                calls.append(1)
                return True

            assert server.set_read_handler(handler)
            await client.send_all(b"early")
            await trio.sleep(0.05)  # heard of by the hub, with nobody waiting
            assert await server.receive_some(100) == b"early"
            assert calls == []


async def test_a_handler_that_cancels_its_task_leaves_the_hub_serving() -> None:
    with trio.fail_after(10):
        async with pair("hub") as (server, client):
            scope = trio.CancelScope()

            def handler() -> bool:
                scope.cancel()  # the task's wait is aborted right here
                return False  # ... and the hub must not wake it a second time

            assert server.set_read_handler(handler)
            await server.wait_readable()  # the readiness every new stream starts with
            assert server.receive_nowait(100) is None

            async def reader() -> None:
                with scope:
                    await server.receive_some(100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"x")
            assert scope.cancelled_caught
            assert server.set_read_handler(lambda: False)  # the hub still runs
            await client.send_all(b"y")
            assert await server.receive_some(100) == b"xy"


async def test_a_read_handler_needs_a_running_hub() -> None:
    with trio.fail_after(10):
        async with pair("trio-wait") as (server, _client):
            assert not server.set_read_handler(lambda: True)
    hub = own_hub()
    with trio.fail_after(10):
        async with on_hub(hub) as (server, client):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub.run)
                await trio.testing.wait_all_tasks_blocked()
                assert server.set_read_handler(lambda: True)
                nursery.cancel_scope.cancel()
            assert hub._handlers == {}
            assert not server.set_read_handler(lambda: True)  # the hub has stopped
            assert await _round(server, client, b"through trio") == b"through trio"


async def test_closing_a_stream_drops_its_handler() -> None:
    with trio.fail_after(10):
        async with pair("hub") as (server, _client):
            hub = server._hub
            assert hub is not None
            assert server.set_read_handler(lambda: True)
            assert hub._handlers
            await server.aclose()
            assert hub._handlers == {}
