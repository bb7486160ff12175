"""No client can hurt the others: each bound of docs/api.md "What one client can do to the others".

Every test here failed on the code before the outbox rework (issue 9): one stalled reader paused
every publisher, an async hook spawned a task per DATA frame, on_connect could be bypassed, a
shutdown waited forever for a hung hook, ids overflowed their u32, and so on.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import MS
from helpers import eventually, raw_handshake, read_frame
from helpers import running as running_server
from robust_helpers import HELLO, RawConn

import trame_async
from trame_async import (
    BYT,
    FLT,
    INT,
    STR,
    ConnectionClosed,
    DisconnectReason,
    ErrorCode,
    Kind,
    Message,
    RemoteClient,
    ServerConfig,
)
from trame_async.server import RemoteClient as _RemoteClient
from trame_async.wire import ErrorFrame

PAD = b"x" * 2000


def running(**options: Any) -> contextlib.AbstractAsyncContextManager[trame_async.Server]:
    # Budgets below the default frame limit: bring the frame limit down with them.
    options.setdefault("max_frame_size", 64 << 10)
    return running_server(**options)


class Rounds:
    """A publisher that sends bursts and waits until every healthy subscriber has the burst's
    timestamp: end-to-end flow control, so the healthy subscribers are never the slow ones.

    ``latencies`` holds, per round, the time from the send to the last healthy arrival.
    """

    def __init__(self, publisher: trame_async.Client, subscribers: list[trame_async.Client]):
        self.publisher = publisher
        self.latencies: list[float] = []
        self._pending: dict[float, tuple[int, asyncio.Future[None]]] = {}
        self._n = len(subscribers)
        for sub in subscribers:
            sub.on_message = self._on_message

    def _on_message(self, message: Message) -> None:
        if message.trame is FLT:
            entry = self._pending.get(message.value)
            if entry is not None:
                left, future = entry
                if left == 1:
                    del self._pending[message.value]
                    future.set_result(None)
                else:
                    self._pending[message.value] = (left - 1, future)

    async def run(self, rounds: int, burst: int, deadline: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(rounds):
            for _ in range(burst):
                await self.publisher.multicast(BYT, PAD)
            stamp = time.perf_counter()
            future = loop.create_future()
            self._pending[stamp] = (self._n, future)
            await self.publisher.multicast(FLT, stamp)
            await asyncio.wait_for(future, deadline)
            self.latencies.append(time.perf_counter() - stamp)


async def healthy_group(
    stack: contextlib.AsyncExitStack, port: int, n: int = 4
) -> tuple[trame_async.Client, list[trame_async.Client]]:
    clients = [
        await stack.enter_async_context(trame_async.connect("127.0.0.1", port, rtt_interval=None))
        for _ in range(n + 1)
    ]
    return clients[0], clients[1:]


# --- a stalled reader ----------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [2.0, None])
@pytest.mark.parametrize("policy", ["disconnect", "drop-oldest", "keep-latest"])
async def test_a_reader_that_stops_never_pauses_the_publishers(
    policy: str, timeout: float | None
) -> None:
    """Before: under disconnect, a stalled reader paused every publisher until the timeout
    (for good with slow_consumer_timeout=None). Now publishers never wait for it."""
    async with (
        running(
            slow_consumer_policy=policy,
            slow_consumer_timeout=timeout,
            max_queue_bytes=512 << 10,
            send_buffer_size=32 << 10,
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        stuck = await RawConn.connect(server.port, rcvbuf=4096)
        stack.callback(stuck.close)
        stuck_id = await stuck.handshake()  # and never reads again
        publisher, subscribers = await healthy_group(stack, server.port)
        rounds = Rounds(publisher, subscribers)
        # 150 rounds of 20 x 2 KB: 6 MB, far past the stuck reader's buffers and budget.
        await rounds.run(150, 20)
        worst = max(rounds.latencies)
        assert worst < 0.5, f"a healthy round took {worst:.3f} s"
        assert not server.stats()["publishers_paused"]
        assert server.stats()["budget_pauses"] == 0
        for sub in subscribers:
            assert sub.missed == 0 and not sub.closed
        stuck_remote = [c for c in server.clients if c.id == stuck_id]
        if policy == "disconnect":
            assert not stuck_remote, "cut as a slow consumer once over its budget"
            assert server.slow_consumers == 1
        else:
            # Kept (unless the progress check cut it), its frames dropped and counted.
            assert server.dropped_frames > 0


async def test_a_stuck_reader_under_a_drop_policy_is_cut_by_the_progress_check() -> None:
    cut: list[tuple[int, DisconnectReason]] = []
    async with (
        running(
            slow_consumer_policy="drop-oldest",
            slow_consumer_timeout=0.4,
            max_queue_bytes=256 << 10,
            send_buffer_size=32 << 10,
            on_disconnect=lambda c, r: cut.append((c.id, r)),
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        stuck = await RawConn.connect(server.port, rcvbuf=4096)
        stack.callback(stuck.close)
        stuck_id = await stuck.handshake()
        publisher, subscribers = await healthy_group(stack, server.port, 2)
        rounds = Rounds(publisher, subscribers)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(100_000):  # bounded in count, and by the deadline
            await rounds.run(1, 20)
            if cut or loop.time() - start > 5:
                break
        assert cut == [(stuck_id, DisconnectReason.SLOW_CONSUMER)]
        # Within 1.25 timeouts of its congestion (which starts within a round or two).
        assert loop.time() - start < 1.25 * 0.4 + 1.0


async def test_pace_mode_waits_for_a_draining_reader_but_cuts_a_stuck_one_in_a_window() -> None:
    async with (
        running(
            flow_control="pace",
            max_publisher_pause=0.1,
            max_queue_bytes=4 << 20,
            send_buffer_size=32 << 10,
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        stuck = await RawConn.connect(server.port, rcvbuf=4096)
        stack.callback(stuck.close)
        stuck_id = await stuck.handshake()
        publisher, subscribers = await healthy_group(stack, server.port)
        rounds = Rounds(publisher, subscribers)
        await rounds.run(60, 20)
        assert stuck_id not in [c.id for c in server.clients]
        assert server.slow_consumers == 1
        # The publishers waited for it one window at most (plus a timer tick and the round).
        assert max(rounds.latencies) < 0.1 + 0.4, max(rounds.latencies)


async def test_the_server_wide_budget_pauses_briefly_then_sheds_the_largest_backlog() -> None:
    async with (
        running(
            slow_consumer_policy="drop-oldest",
            slow_consumer_timeout=None,
            max_queue_bytes=256 << 10,
            max_total_queue_bytes=512 << 10,
            max_publisher_pause=0.05,
            send_buffer_size=32 << 10,
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        for _ in range(4):  # together over the server-wide budget; each within its own
            stuck = await RawConn.connect(server.port, rcvbuf=4096)
            stack.callback(stuck.close)
            await stuck.handshake()
        publisher, subscribers = await healthy_group(stack, server.port, 2)
        rounds = Rounds(publisher, subscribers)
        await rounds.run(100, 20)
        stats = server.stats()
        assert stats["budget_pauses"] >= 1 and stats["budget_sheds"] >= 1, stats
        assert stats["pending_bytes"] <= 512 << 10
        assert max(rounds.latencies) < 0.05 + 0.4, max(rounds.latencies)
        for sub in subscribers:
            assert sub.missed == 0


# --- hooks ---------------------------------------------------------------------------------------


async def test_an_async_on_data_runs_one_call_at_a_time_per_client_in_order() -> None:
    """Before: one task per DATA frame, unbounded (7.6 MB of DATA made 193k tasks)."""
    release = asyncio.Event()
    seen: list[int] = []
    running_now = 0
    most = 0

    async def on_data(client: RemoteClient, message: Message) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        try:
            await release.wait()
            seen.append(message.value)
        finally:
            running_now -= 1

    n = 5000
    async with (
        running(on_data=on_data) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        flooder = await stack.enter_async_context(trame_async.connect("127.0.0.1", server.port))
        publisher, subscribers = await healthy_group(stack, server.port, 2)
        for i in range(n):
            await flooder.send_data(INT, i)
        await eventually(lambda: running_now == 1, 5.0, what="the first hook call")
        # The flooder's reading waits; everyone else goes on.
        rounds = Rounds(publisher, subscribers)
        await rounds.run(20, 5)
        assert len(server._tasks) <= 1 and most == 1
        release.set()
        await eventually(lambda: len(seen) == n, 10.0, what="every DATA handled")
        assert seen == list(range(n)) and most == 1


async def test_what_a_client_sends_after_an_async_hooks_data_waits_for_it() -> None:
    """A MULTICAST behind a DATA whose async hook runs is relayed after the hook, in order."""
    order: list[str] = []
    release = asyncio.Event()

    async def on_data(client: RemoteClient, message: Message) -> None:
        await release.wait()
        order.append("hook")

    async with running(on_data=on_data) as server:
        async with (
            trame_async.connect("127.0.0.1", server.port) as sender,
            trame_async.connect("127.0.0.1", server.port) as receiver,
        ):
            receiver.on_message = lambda m: order.append("relay")
            await sender.send_data(INT, 1)
            await sender.multicast(INT, 2)
            await eventually(lambda: server.clients[0]._hook_task is not None, 5.0, what="hook")
            assert order == []
            release.set()
            await eventually(lambda: order == ["hook", "relay"], 5.0, what="hook then relay")


@pytest.mark.parametrize("style", ["plain", "async"])
async def test_nothing_of_a_client_is_dispatched_before_on_connect_accepts_it(style: str) -> None:
    """Before: HELLO, DATA and MULTICAST in one read dispatched the DATA and relayed the
    MULTICAST before on_connect ran, even when on_connect refused the client."""
    data_calls: list[Message] = []
    gate = asyncio.Event()

    def refuse(client: RemoteClient) -> None:
        client.disconnect("not welcome")

    async def refuse_later(client: RemoteClient) -> None:
        await gate.wait()
        client.disconnect("not welcome")

    hook: Callable[[RemoteClient], Awaitable[None] | None] = (
        refuse if style == "plain" else refuse_later
    )
    async with running(on_data=lambda c, m: data_calls.append(m)) as server:
        async with trame_async.connect("127.0.0.1", server.port) as watcher:
            got: list[Message] = []
            watcher.on_message = got.append
            server.on_connect = hook
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                data = trame_async.REGISTRY.encode(INT, 1, Kind.DATA)
                multicast = trame_async.REGISTRY.encode(INT, 2, Kind.MULTICAST)
                writer.write(HELLO + data + multicast)
                await writer.drain()
                gate.set()
                kinds = []
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    async with asyncio.timeout(5):
                        for _ in range(10):
                            kinds.append((await read_frame(reader))[0])
                assert Kind.GOODBYE in kinds
            finally:
                writer.close()
            # A marker from another client proves the relay went on meanwhile.
            server.on_connect = None
            async with trame_async.connect("127.0.0.1", server.port) as other:
                await other.multicast(STR, "marker")
                await eventually(lambda: got, 5.0, what="the marker")
            assert [m.value for m in got] == ["marker"]
            assert data_calls == []


async def test_an_async_on_connect_holds_the_first_frames_until_it_returns() -> None:
    gate = asyncio.Event()
    order: list[str] = []

    async def on_connect(client: RemoteClient) -> None:
        await gate.wait()
        order.append("connect")

    async with running(on_data=lambda c, m: order.append(f"data {m.value}")) as server:
        server.on_connect = on_connect
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(HELLO + trame_async.REGISTRY.encode(INT, 7, Kind.DATA))
            await writer.drain()
            kind, _ = await asyncio.wait_for(read_frame(reader), 5)
            assert kind == Kind.WELCOME
            assert order == []
            gate.set()
            await eventually(lambda: order == ["connect", "data 7"], 5.0, what="in order")
        finally:
            writer.close()


async def test_a_hook_that_disconnects_its_sender_stops_the_rest_of_its_frames() -> None:
    async def on_data(client: RemoteClient, message: Message) -> None:
        client.disconnect("enough")

    async with running() as server:
        server.on_data = lambda c, m: c.disconnect("enough")
        async with trame_async.connect("127.0.0.1", server.port) as watcher:
            got: list[Message] = []
            watcher.on_message = got.append
            reader, writer = await raw_handshake(server.port)
            try:
                writer.write(
                    trame_async.REGISTRY.encode(INT, 1, Kind.DATA)
                    + trame_async.REGISTRY.encode(INT, 2, Kind.MULTICAST)
                )
                await writer.drain()
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    async with asyncio.timeout(5):
                        for _ in range(10):
                            await read_frame(reader)
            finally:
                writer.close()
            async with trame_async.connect("127.0.0.1", server.port) as other:
                await other.multicast(STR, "marker")
                await eventually(lambda: got, 5.0, what="the marker")
            assert [m.value for m in got] == ["marker"]


@pytest.mark.parametrize("drain", [0.0, 0.3])
async def test_shutdown_finishes_within_its_bound_whatever_a_hook_does(drain: float) -> None:
    """Before: drain_timeout=0 made the shutdown wait forever for a hung async hook."""
    stop = asyncio.Event()
    started = asyncio.Event()

    async def stubborn(client: RemoteClient, reason: DisconnectReason) -> None:
        started.set()
        for _ in range(100):  # ignores cancellation until the test lets it go
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()
                return

    server = await trame_async.start_server(
        "127.0.0.1", 0, drain_timeout=drain, on_disconnect=stubborn
    )
    client = await trame_async.connect("127.0.0.1", server.port)
    await client.close()
    await asyncio.wait_for(started.wait(), 5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        server.close()
        await asyncio.wait_for(server.wait_closed(), drain + 5)
        # The documented bound: drain_timeout plus three grace seconds at most.
        assert loop.time() - start <= drain + 3.0 + 0.5
    finally:
        stop.set()
        await asyncio.sleep(0)
        for task in list(server._tasks):
            await asyncio.wait_for(task, 5)


# --- limits and ids ------------------------------------------------------------------------------


async def test_a_queue_budget_equal_to_the_frame_limit_never_cuts_for_one_max_size_frame() -> None:
    """Before: max_queue_bytes == max_frame_size was accepted, but one max-size relayed frame (a
    few bytes larger) cut every recipient."""
    limit = 64 << 10
    async with running(max_frame_size=limit, max_queue_bytes=limit) as server:
        async with (
            trame_async.connect("127.0.0.1", server.port, max_frame_size=limit) as sender,
            trame_async.connect("127.0.0.1", server.port, max_frame_size=limit) as receiver,
        ):
            # The largest value whose MULTICAST's length field is exactly max_frame_size.
            size = limit
            for _ in range(3):  # the format ('<Ns') grows with the value's length
                head = len(trame_async.REGISTRY.encode(BYT, b"v" * size, Kind.MULTICAST)) - size
                size = limit + 4 - head
            value = b"v" * size
            frame = trame_async.REGISTRY.encode(BYT, value, Kind.MULTICAST)
            assert len(frame) - 4 == limit
            await sender.send(frame)
            got = await receiver.receive(timeout=5)
            assert got.value == value
            assert server.slow_consumers == 0


async def test_client_ids_wrap_at_u32_and_never_repeat_a_live_one() -> None:
    """Before: after 2**32 connections every new one failed with INTERNAL_ERROR."""
    async with running() as server:
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(trame_async.connect("127.0.0.1", server.port))
            assert first.id == 1
            server._next_id = 0xFFFF_FFFF - 1  # as after 4 billion connections
            ids = []
            for _ in range(3):
                client = await stack.enter_async_context(
                    trame_async.connect("127.0.0.1", server.port)
                )
                ids.append(client.id)
            assert ids == [0xFFFF_FFFF, 2, 3]  # wrapped, skipping 0 and the live 1
            await ids_work(server, stack)


async def ids_work(server: trame_async.Server, stack: contextlib.AsyncExitStack) -> None:
    """Every connected client still receives with its wrapped id as the sender."""
    clients = [c for c in server.clients]
    sender = await stack.enter_async_context(trame_async.connect("127.0.0.1", server.port))
    await sender.multicast(INT, 5)
    assert all(c.is_open for c in clients)


def test_a_token_too_long_for_the_handshake_limit_is_refused_at_start() -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig(token="t" * 5000)
    text = str(info.value)
    assert "handshake_max_frame_size" in text and "--token" in text
    ServerConfig(token="t" * (4096 - 9))  # the longest that fits


async def test_connections_in_their_handshake_cannot_lock_out_token_holders() -> None:
    """Before: max_clients counted sockets that never sent a HELLO."""
    async with (
        running(token="s3cret", max_clients=2, max_handshaking=3) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        idle = []
        for _ in range(3):
            conn = await RawConn.connect(server.port)
            stack.callback(conn.close)
            idle.append(conn)
        await eventually(lambda: server.stats()["handshaking"] == 3, 5.0, what="3 idle sockets")
        # A fourth socket without HELLO is refused at once.
        extra = await RawConn.connect(server.port)
        stack.callback(extra.close)
        kind, body = await asyncio.wait_for(extra.next_frame(), 5)
        assert kind == Kind.ERROR
        assert ErrorFrame.parse(body).error_code is ErrorCode.TOO_MANY_CLIENTS
        # Token holders still get in: they are counted apart.
        for conn in idle:
            conn.close()
        await eventually(lambda: server.stats()["handshaking"] == 0, 5.0, what="idle gone")
        a = await stack.enter_async_context(
            trame_async.connect("127.0.0.1", server.port, token="s3cret")
        )
        b = await stack.enter_async_context(
            trame_async.connect("127.0.0.1", server.port, token="s3cret")
        )
        assert a.id != b.id
        with pytest.raises(ConnectionClosed) as info:
            await trame_async.connect("127.0.0.1", server.port, token="s3cret", timeout=5)
        assert info.value.peer_error_code is ErrorCode.TOO_MANY_CLIENTS


async def test_a_failing_timer_of_one_client_does_not_drop_the_others_of_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = _RemoteClient._on_timer
    victim: list[int] = []

    def on_timer(self: _RemoteClient, now: float) -> None:
        if victim and self.id == victim[0]:
            raise RuntimeError("a bug in one client's timer")
        original(self, now)

    monkeypatch.setattr(_RemoteClient, "_on_timer", on_timer)
    async with running(heartbeat_interval=50 * MS, heartbeat_timeout=200 * MS) as server:
        async with (
            trame_async.connect("127.0.0.1", server.port) as bad,
            trame_async.connect("127.0.0.1", server.port) as good,
        ):
            victim.append(bad.id)
            (remote,) = [c for c in server.clients if c.id == good.id]
            # The good client keeps getting pings (its RTT keeps being measured) and stays.
            await eventually(lambda: bad.closed, 5.0, what="the failing client aborted")
            rtt_at = remote._core._ping_seq
            await eventually(lambda: remote._core._ping_seq >= rtt_at + 3, 5.0, what="3 more pings")
            assert not good.closed


def test_struct_header_of_a_relay_is_eight_bytes_over_the_multicast_value() -> None:
    # Guard for the test above: a RELAY is 4 bytes larger than its MULTICAST.
    m = trame_async.REGISTRY.encode(INT, 1, Kind.MULTICAST)
    r = trame_async.REGISTRY.encode(INT, 1, Kind.RELAY)
    assert len(r) - len(m) == 4 and struct.unpack(">I", r[:4])[0] == len(r) - 4


# --- found in review -----------------------------------------------------------------------------


async def test_an_async_on_connect_that_raises_refuses_the_client_and_relays_nothing() -> None:
    async def on_connect(client: RemoteClient) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("not today")

    async with running() as server:
        async with trame_async.connect("127.0.0.1", server.port) as watcher:
            got: list[Message] = []
            watcher.on_message = got.append
            server.on_connect = on_connect
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(HELLO + trame_async.REGISTRY.encode(INT, 7, Kind.MULTICAST))
                await writer.drain()
                kinds = []
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    async with asyncio.timeout(5):
                        for _ in range(10):
                            kinds.append((await read_frame(reader))[0])
                assert kinds[-1] == Kind.GOODBYE
            finally:
                writer.close()
            server.on_connect = None
            async with trame_async.connect("127.0.0.1", server.port) as other:
                await other.multicast(STR, "marker")
                await eventually(lambda: got, 5.0, what="the marker")
            assert [m.value for m in got] == ["marker"]
            assert [c.id for c in server.clients] == [watcher.id]


async def test_a_client_refused_at_max_clients_never_gets_a_welcome() -> None:
    async with running(max_clients=1) as server:
        async with trame_async.connect("127.0.0.1", server.port):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(HELLO)
                await writer.drain()
                kind, body = await asyncio.wait_for(read_frame(reader), 5)
                assert kind == Kind.ERROR, f"got kind {kind:#x} first"
                assert ErrorFrame.parse(body).error_code is ErrorCode.TOO_MANY_CLIENTS
            finally:
                writer.close()


async def test_pace_mode_a_congested_client_that_says_goodbye_does_not_hold_publishers() -> None:
    async with (
        running(
            flow_control="pace",
            max_publisher_pause=0.1,
            drain_timeout=5.0,
            send_buffer_size=32 << 10,
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        quitter = await RawConn.connect(server.port, rcvbuf=4096)
        stack.callback(quitter.close)
        quitter_id = await quitter.handshake()
        publisher, subscribers = await healthy_group(stack, server.port, 2)
        rounds = Rounds(publisher, subscribers)
        (remote,) = [c for c in server.clients if c.id == quitter_id]
        for _ in range(1000):  # bounded: until it is congested
            await rounds.run(1, 20)
            if remote.outbox.congested:
                break
        assert remote.outbox.congested
        # Congested, it says goodbye: the server must not keep waiting for it to drain.
        await quitter.send(trame_async.wire.Goodbye(DisconnectReason.GOODBYE, None, "").encode())
        await rounds.run(30, 20)
        assert max(rounds.latencies[-30:]) < 0.1 + 0.4, max(rounds.latencies[-30:])
        assert not server.stats()["publishers_paused"]


async def test_frames_in_counts_each_frame_once_with_an_async_on_data() -> None:
    async def on_data(client: RemoteClient, message: Message) -> None:
        await asyncio.sleep(0)

    async with running(on_data=on_data) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            for i in range(3):
                await client.send_data(INT, i)
                await client.multicast(INT, i)
            await eventually(lambda: server.frames_in >= 6, 5.0, what="six frames")
            await client.multicast(INT, 99)
            await eventually(lambda: server.frames_in >= 7, 5.0, what="the last one")
            assert server.frames_in == 7
