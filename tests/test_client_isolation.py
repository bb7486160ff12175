"""What one caller does to a Client never leaks into another's: sockets, tasks, waits, connects.

* A cancelled ``connect()`` closes its socket (not only one that hits its own ``timeout=``).
* ``close()`` during a reconnect returns within its timeout, even in the middle of a TLS
  handshake or while the server is down, and leaves no task and no socket behind.
* Tasks waiting on one client wait independently: cancelling one never wakes, cancels or robs
  another; messages go to the waiting tasks in the order they started waiting.
* A ``connect(...)`` object opens one connection: a second ``await`` (or ``async with``) raises.

Socket tests run a real server (or a raw asyncio one that holds its connections silent) on
127.0.0.1 port 0, on the stock loop and on uvloop (see conftest.py). Nothing sleeps to
synchronise: the tests wait on events, or poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import MS, TlsFiles, eventually, make_tls, receive_n

import trame_async
from trame_async import (
    INT,
    Backoff,
    Client,
    ConnectError,
    ConnectionClosed,
    DisconnectReason,
    InvalidStateError,
    Message,
)
from trame_async.wire import Kind


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def trame_tasks() -> list[asyncio.Task[Any]]:
    """Return the running tasks whose coroutine is trame_async's own (a reconnect loop, a hook)."""
    package = Path(trame_async.__file__).parent
    return [
        task
        for task in asyncio.all_tasks()
        if (code := getattr(task.get_coro(), "cr_code", None)) is not None
        and Path(code.co_filename).parent == package
    ]


def sockets_to(port: int) -> list[Any]:
    """Return this process's open TCP sockets whose remote end is ``port`` (the client ends)."""
    return [
        conn
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port
    ]


class Holder:
    """A server that accepts connections, reads their first bytes and never answers.

    With ``ssl`` it completes the TLS handshake first (the client's HELLO then goes unanswered);
    without, a TLS client's handshake never ends.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl = ssl_context
        self.first_bytes = 0  # connections whose first bytes arrived
        self.arrived = asyncio.Event()
        self.expected = 1
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Holder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, OSError):
            if await reader.read(1):
                self.first_bytes += 1
                if self.first_bytes >= self.expected:
                    self.arrived.set()
            await reader.read()  # hold the connection, silent, until the peer or the test ends it

    async def wait_first_bytes(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` connections sent their first bytes (HELLO, or a TLS ClientHello)."""
        self.expected = n
        if self.first_bytes < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout)


class Relay:
    """A TCP relay to ``target_port`` for its first connection; later ones go to a Holder.

    :meth:`cut` aborts the relayed connection (both ends), as a network failure would: the
    client then reconnects, through here, to the Holder.
    """

    def __init__(self, target_port: int, holder: Holder) -> None:
        self.target_port = target_port
        self.holder = holder
        self.relayed = False
        self.port = 0
        self._ends: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop_listening()
        self.cut()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    def stop_listening(self) -> None:
        """Refuse new connections from now on."""
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        """Abort the relayed connection, both ends."""
        for writer in self._ends:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        if self.relayed:
            await self.holder._handle(reader, writer)
            return
        self.relayed = True
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._ends += [writer, up_writer]
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        for _ in range(1_000_000):
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


async def bounded(awaitable: Awaitable[Any], seconds: float, what: str) -> Any:
    """Await ``awaitable``; fail (rather than hang) past ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"{what} took more than {seconds:g} s") from None


# --- 1. a cancelled connect() closes its socket ------------------------------------------------


@pytest.mark.parametrize("stall", ["hello", "hello over tls", "tls handshake"])
async def test_cancelled_connects_leave_no_socket_open(stall: str, tls_files: TlsFiles) -> None:
    n = 20
    server_tls = tls_files.server_context() if stall == "hello over tls" else None
    client_tls = tls_files.client_context() if stall != "hello" else None
    async with Holder(server_tls) as holder:

        async def opening() -> Client:
            return await trame_async.connect("127.0.0.1", holder.port, ssl=client_tls)

        tasks = [asyncio.create_task(opening()) for _ in range(n)]
        # Every client is past TCP (and TLS, but for "tls handshake"), waiting for an answer.
        await holder.wait_first_bytes(n)
        assert len(sockets_to(holder.port)) == n
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        # Closed by the time the cancelled call returns: no wait, no poll.
        assert sockets_to(holder.port) == []
        assert trame_tasks() == []


async def test_a_cancelled_connect_still_closes_its_socket_when_cancelled_twice() -> None:
    # The cancelled connect() waits one loop turn for its socket to close; a second cancel
    # meanwhile must not leave it open either.
    async with Holder() as holder:

        async def opening() -> Client:
            return await trame_async.connect("127.0.0.1", holder.port)

        task = asyncio.create_task(opening())
        await holder.wait_first_bytes(1)
        task.cancel()
        await asyncio.sleep(0)  # one loop turn: the task sees the first cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: sockets_to(holder.port) == [], what="the socket closed")


# --- 2. close() during a reconnect -------------------------------------------------------------

#: A reconnect comes back at once: no wait worth the name before the next attempt.
FAST = Backoff(initial=5 * MS, factor=1.0, maximum=5 * MS)
CLOSE_TIMEOUT = 1.0


async def check_closed_cleanly(client: Client, port: int) -> None:
    """``client`` closed within CLOSE_TIMEOUT, for good, with nothing of it left running."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await bounded(client.close(timeout=CLOSE_TIMEOUT), CLOSE_TIMEOUT + 2, "close()")
    assert loop.time() - start <= CLOSE_TIMEOUT
    assert client.closed and client.close_reason is DisconnectReason.CLOSED
    assert not client.connected
    assert trame_tasks() == []
    assert sockets_to(port) == []
    with pytest.raises(ConnectionClosed):
        await client.receive(timeout=1)
    await bounded(client.close(timeout=CLOSE_TIMEOUT), 1, "a second close()")  # idempotent


async def test_close_during_a_reconnects_tls_handshake_returns_in_time(
    tls_files: TlsFiles,
) -> None:
    async with (
        trame_async.serve("127.0.0.1", 0, ssl=tls_files.server_context()) as server,
        Holder() as holder,
        Relay(server.port, holder) as relay,
    ):
        client = await trame_async.connect(
            "127.0.0.1", relay.port, ssl=tls_files.client_context(), reconnect=FAST
        )
        try:
            assert client.connected
            relay.cut()
            # The reconnect reaches the holder: TCP is up, its ClientHello is never answered.
            await holder.wait_first_bytes(1)
            assert not client.connected
            await check_closed_cleanly(client, relay.port)
        finally:
            await bounded(client.close(timeout=CLOSE_TIMEOUT), CLOSE_TIMEOUT + 2, "close()")


async def test_close_while_reconnecting_to_a_server_that_is_down_returns_in_time() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        Holder() as holder,
        Relay(server.port, holder) as relay,
    ):
        client = await trame_async.connect("127.0.0.1", relay.port, reconnect=FAST)
        try:
            first = client._proto
            relay.stop_listening()
            relay.cut()
            # Attempts are refused now; wait for the first one (then close() lands in the next
            # attempt or in the wait between two).
            await eventually(lambda: client._proto is not first, what="a reconnect attempt")
            await check_closed_cleanly(client, relay.port)
        finally:
            await bounded(client.close(timeout=CLOSE_TIMEOUT), CLOSE_TIMEOUT + 2, "close()")


async def test_close_cancelled_while_it_stops_a_reconnect_is_cancelled(
    tls_files: TlsFiles,
) -> None:
    # close() waits for the reconnect task it cancelled; a cancellation of close() itself must
    # propagate, not be swallowed as the reconnect task's own.
    async with (
        trame_async.serve("127.0.0.1", 0, ssl=tls_files.server_context()) as server,
        Holder() as holder,
        Relay(server.port, holder) as relay,
    ):
        client = await trame_async.connect(
            "127.0.0.1", relay.port, ssl=tls_files.client_context(), reconnect=FAST
        )
        relay.cut()
        await holder.wait_first_bytes(1)
        closing = asyncio.create_task(client.close(timeout=CLOSE_TIMEOUT))
        await asyncio.sleep(0)  # one loop turn: close() runs up to its first wait
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(closing, CLOSE_TIMEOUT + 2, "the cancelled close()")
        await check_closed_cleanly(client, relay.port)


# --- 3. tasks waiting on one client ------------------------------------------------------------


async def started(*tasks: asyncio.Task[Any]) -> None:
    """Let new tasks run up to their first wait: one loop turn, no time passes."""
    await asyncio.sleep(0)
    assert not any(task.done() for task in tasks), [t for t in tasks if t.done()]


async def next_message(client: Client) -> Message:
    """Return the next message through ``async for`` (``__anext__``)."""
    async for message in client:
        return message
    raise AssertionError("the iteration ended")


@pytest.mark.parametrize("way", ["receive", "async for", "receive(timeout=)"])
async def test_cancelling_one_waiting_task_leaves_the_other_waiting(way: str) -> None:
    def wait(client: Client) -> asyncio.Task[Message]:
        if way == "receive":
            return asyncio.create_task(client.receive())
        if way == "async for":
            return asyncio.create_task(next_message(client))
        return asyncio.create_task(client.receive(timeout=10))

    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        first, second = wait(client), wait(client)
        await started(first, second)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0)  # one more turn: the cancelled one's cleanup has run
        assert not second.done(), "cancelling one waiting task ended the other's wait"
        server.multicast(INT, 1)
        got = await bounded(second, 5, "the second task's message")
        assert got.value == 1
        # The cancelled task took nothing: the next message goes to the next caller.
        server.multicast(INT, 2)
        assert (await client.receive(timeout=5)).value == 2
        assert client._gate == 0 and not client._waiters


async def test_waiting_tasks_get_messages_in_the_order_they_started_waiting() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        # One at a time: each message goes to the oldest waiter.
        tasks = [asyncio.create_task(client.receive()) for _ in range(3)]
        await started(*tasks)
        for i, task in enumerate(tasks):
            server.multicast(INT, i)
            assert (await bounded(task, 5, f"message {i}")).value == i
        # Several in one read: the oldest waiter gets the oldest message.
        tasks = [
            asyncio.create_task(client.receive()),
            asyncio.create_task(next_message(client)),  # async for waits in the same line
            asyncio.create_task(client.receive(timeout=10)),
            asyncio.create_task(client.receive()),
        ]
        await started(*tasks)
        for i in range(10, 14):
            server.multicast(INT, i)  # one loop iteration: written, and read, together
        got = [(await bounded(task, 5, "a message")).value for task in tasks]
        assert got == [10, 11, 12, 13]
        assert client.queued == 0


async def test_a_caller_that_comes_late_does_not_take_a_waiters_message() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        waiter = asyncio.create_task(client.receive())
        await started(waiter)
        # A message arrives (as data_received would hand it over): it is the waiter's, woken but
        # not run yet. This task calls receive() before the waiter runs: it gets the next one.
        client._deliver([Message(0, INT, 1, Kind.RELAY)], 20)
        server.multicast(INT, 2)
        assert (await client.receive(timeout=5)).value == 2
        assert (await bounded(waiter, 5, "the waiter's message")).value == 1


async def test_a_waiter_cancelled_after_it_was_woken_passes_its_message_on() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        first, second = (asyncio.create_task(client.receive()) for _ in range(2))
        await started(first, second)
        # A message arrives (as data_received would hand it over) and, before the woken task
        # runs, it is cancelled: the message goes to the next waiter, not nowhere.
        client._deliver([Message(0, INT, 7, Kind.RELAY)], 20)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await bounded(second, 5, "the passed-on message")).value == 7
        assert client.queued == 0
        server.multicast(INT, 8)
        assert (await client.receive(timeout=5)).value == 8
        assert client._gate == 0 and not client._waiters


@pytest.mark.parametrize("way", ["async for", "receive(timeout=)"])
async def test_a_message_handed_to_a_task_cancelled_before_it_ran_goes_back_in_front(
    way: str,
) -> None:
    # One message for one waiting task and an empty queue is handed over as the waiter's result
    # (no trip through the queue). Cancelled before it runs, the task puts it back in front.
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        first = asyncio.create_task(
            next_message(client) if way == "async for" else client.receive(timeout=10)
        )
        await started(first)
        client._deliver([Message(0, INT, 7, Kind.RELAY)], 20)
        assert client.queued == 0  # handed over, not queued
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert client.queued == 1
        server.multicast(INT, 8)
        assert (await client.receive(timeout=5)).value == 7  # first in, first out
        assert (await client.receive(timeout=5)).value == 8
        assert client._gate == 0 and not client._waiters and client.queued_bytes == 0


@pytest.mark.parametrize("end", ["server shutdown", "goodbye", "connection lost"])
async def test_tasks_waiting_in_async_for_learn_of_the_end_together(end: str) -> None:
    """Several tasks wait in ``async for`` (and one in receive()) when the connection ends:
    each iteration stops on a clean end and raises ConnectionClosed on the others."""
    async with (
        await trame_async.start_server("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        iterations = [asyncio.create_task(next_message(client)) for _ in range(3)]
        receiver = asyncio.create_task(client.receive())
        await started(*iterations, receiver)
        (remote,) = server.clients
        if end == "server shutdown":
            await server.shutdown()
        elif end == "goodbye":
            remote.disconnect("bye")
        else:
            assert remote._transport is not None
            remote._transport.abort()
        done = await bounded(
            asyncio.gather(*iterations, receiver, return_exceptions=True), 5, "the end"
        )
        clean = end != "connection lost"
        for outcome in done[:3]:
            if clean:  # next_message() saw the iteration stop
                assert isinstance(outcome, AssertionError), outcome
            else:
                assert isinstance(outcome, ConnectionClosed), outcome
        assert isinstance(done[3], ConnectionClosed), done[3]
        assert not client._waiters


async def test_two_consumers_share_a_stream_each_message_once() -> None:
    n = 500
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        seen: dict[str, list[int]] = {"receive": [], "async for": []}
        done = asyncio.Event()

        async def by_receive() -> None:
            with contextlib.suppress(ConnectionClosed):
                for _ in range(n):
                    message = await client.receive()
                    seen["receive"].append(message.value)
                    if message.value == n - 1:
                        done.set()

        async def by_iteration() -> None:
            async for message in client:
                seen["async for"].append(message.value)
                if message.value == n - 1:
                    done.set()

        consumers = [asyncio.create_task(by_receive()), asyncio.create_task(by_iteration())]
        await started(*consumers)
        for i in range(n):
            server.multicast(INT, i)
            if i % 7 == 0:
                await asyncio.sleep(0)  # let some arrive alone, others in bursts
        await bounded(done.wait(), 10, "the last message")
        await client.close()
        await bounded(asyncio.gather(*consumers), 5, "the consumers' end")
        got = seen["receive"] + seen["async for"]
        assert sorted(got) == list(range(n))  # each message once, none lost
        assert seen["receive"] == sorted(seen["receive"])
        assert seen["async for"] == sorted(seen["async for"])
        assert seen["receive"] and seen["async for"]


async def test_two_consumers_drain_a_full_queue_and_reading_resumes() -> None:
    # Backpressure pauses reading while the queue is full; the consumers' pops resume it. The
    # waiters' turns and the paused reading share the receive() gate: both must settle.
    n = 300
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, max_queue=10) as client,
        trame_async.connect("127.0.0.1", server.port) as publisher,
    ):
        for i in range(n):
            await publisher.multicast(INT, i)
        await eventually(lambda: client._read_paused, what="the client paused reading")
        got: list[list[int]] = [[], []]

        async def consume(mine: list[int]) -> None:
            while len(got[0]) + len(got[1]) < n:
                mine.append((await client.receive()).value)

        consumers = [asyncio.create_task(consume(mine)) for mine in got]
        await bounded(
            asyncio.wait(consumers, return_when=asyncio.FIRST_COMPLETED), 10, "all messages"
        )
        for task in consumers:
            task.cancel()  # the other one waits for a message that will not come
        await asyncio.gather(*consumers, return_exceptions=True)
        assert sorted(got[0] + got[1]) == list(range(n))
        assert not client._read_paused and client._gate == 0 and not client._waiters
        server.multicast(INT, -1)
        assert (await client.receive(timeout=5)).value == -1


async def test_every_waiting_task_learns_of_the_end() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        receivers = [asyncio.create_task(client.receive()) for _ in range(3)]
        iterator = asyncio.create_task(next_message(client))
        await started(*receivers, iterator)
        await client.close()
        for task in receivers:
            with pytest.raises(ConnectionClosed):
                await bounded(task, 5, "a waiter's end")
        with pytest.raises(AssertionError, match="iteration ended"):  # a clean end: no error
            await bounded(iterator, 5, "the iterator's end")


# --- 4. one connect() object, one connection ---------------------------------------------------


async def test_a_connect_object_cannot_be_awaited_twice() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        opening = trame_async.connect("127.0.0.1", server.port)
        client = await opening
        try:
            with pytest.raises(InvalidStateError, match="already used") as info:
                await opening
            assert "connect(...) again" in str(info.value)
            with pytest.raises(InvalidStateError, match="already used"):
                async with opening:
                    raise AssertionError("entered a used connect object")
            # The first connection is the only one, and it is untouched.
            assert len(server.clients) == 1 and client.connected
            server.multicast(INT, 5)
            assert (await client.receive(timeout=5)).value == 5
        finally:
            await client.close()


async def test_a_connect_object_awaited_by_two_tasks_at_once_opens_one_connection() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        opening = trame_async.connect("127.0.0.1", server.port)

        async def use() -> Client:
            return await opening

        results = await asyncio.gather(use(), use(), return_exceptions=True)
        clients = [r for r in results if isinstance(r, Client)]
        errors = [r for r in results if isinstance(r, InvalidStateError)]
        assert len(clients) == 1 and len(errors) == 1, results
        try:
            await eventually(lambda: len(server.clients) == 1, what="one server-side client")
            assert clients[0].connected
        finally:
            await clients[0].close()


async def test_a_connect_object_that_failed_cannot_be_retried() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    opening = trame_async.connect("127.0.0.1", port)
    with pytest.raises(ConnectError):
        await opening
    with pytest.raises(InvalidStateError, match="already used"):
        await opening


async def test_a_client_can_be_used_in_async_with_after_await() -> None:
    # The documented way to manage a client got by 'await connect(...)'.
    async with trame_async.serve("127.0.0.1", 0) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        async with client:
            server.multicast(INT, 3)
            assert [m.value for m in await receive_n(client, 1)] == [3]
        assert client.closed
