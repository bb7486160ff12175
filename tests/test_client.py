"""The client's receive queue: its policies, its byte budget, and heartbeats while it lags.

Socket tests run a server and clients in one event loop on 127.0.0.1 (port 0), on the stock loop
and on uvloop (see conftest.py). A client that "lags" simply does not call ``receive()`` for a
while; each test then reads what was kept and checks it against what was sent. The sans-I/O tests
at the end drive :class:`~trame_async.protocol.ClientCore` with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import MS, Reading, eventually, receive_n

import trame_async
from trame_async import (
    BYT,
    INT,
    POS,
    Client,
    ConnectError,
    ConnectionClosed,
    DisconnectReason,
    ErrorCode,
    Kind,
    Message,
    Registry,
)
from trame_async.protocol import ClientCore, CoreState, ServerCore, ServerLimits
from trame_async.wire import (
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameParser,
    Hello,
    Welcome,
    ping,
    pong,
)

MARKER = -1
#: Same-size BYT values, so that the wire size of each frame is known: the first 4 bytes number it.
PAYLOAD = 1000
MARKER_SEQ = 0xFFFF_FFFF


def payload(seq: int) -> bytes:
    return seq.to_bytes(4, "big") + bytes(PAYLOAD - 4)


def seq_of(msg: Message) -> int:
    assert msg.trame == BYT and len(msg.value) == PAYLOAD, msg
    return int.from_bytes(msg.value[:4], "big")


#: Size on the wire of one relayed BYT frame of PAYLOAD bytes (a RELAY adds the 4-byte sender).
RELAY_BYT_SIZE = len(trame_async.encode(BYT, payload(0))[0]) + 4


async def receive_until_marker(client: Client, limit: int, timeout: float = 10.0) -> list[Message]:
    """Receive up to ``limit`` messages, until the INT marker (excluded)."""
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        for _ in range(limit):
            msg = await client.receive()
            if msg.trame == INT and msg.value == MARKER:
                return out
            out.append(msg)
    raise AssertionError(f"no marker within {limit} messages")


async def read_paused(client: Client) -> None:
    """Wait until the client stopped reading from its socket (its queue is full)."""
    await eventually(lambda: client._read_paused, what="the client paused reading")


# --- heartbeats while the application lags ----------------------------------------------------


async def test_a_client_that_stops_consuming_outlives_the_heartbeat_then_gets_everything() -> None:
    interval, timeout = 50 * MS, 200 * MS
    lost: list[tuple[int, DisconnectReason]] = []
    n = 200
    async with (
        trame_async.serve(
            "127.0.0.1",
            0,
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
            on_disconnect=lambda c, r: lost.append((c.id, r)),
        ) as server,
        trame_async.connect("127.0.0.1", server.port, max_queue=10, rtt_interval=None) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        assert slow.queue_policy == "backpressure"
        for i in range(n):
            await pub.multicast(INT, i)
        await read_paused(slow)
        for i in range(n, 2 * n):  # these wait unread in the socket, with the server's pings
            await pub.multicast(INT, i)
        # The application stays away for four times interval + timeout: neither end may take
        # the other for dead meanwhile (the server's pings are unread, the client's pongs unsent).
        loop = asyncio.get_running_loop()
        until = loop.time() + 4 * (interval + timeout)
        while loop.time() < until:
            assert not slow.closed, slow.close_reason
            assert lost == []
            await asyncio.sleep(10 * MS)
        got = await receive_n(slow, 2 * n)
        assert [m.value for m in got] == list(range(2 * n))
        assert {m.sender for m in got} == {pub.id}
        await pub.multicast(INT, MARKER)
        assert (await slow.receive(timeout=5)).value == MARKER
        assert slow.close_reason is None and slow.dropped == 0
        assert lost == [] and len(server.clients) == 2


# --- the policies -------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["count", "bytes"])
async def test_disconnect_policy_says_goodbye_with_slow_consumer_then_closes(bound: str) -> None:
    lost: list[tuple[int, DisconnectReason]] = []
    limits: dict[str, Any] = (
        {"max_queue": 10}
        if bound == "count"
        else {"max_queue_bytes": 8 * RELAY_BYT_SIZE, "max_frame_size": 4096}
    )
    async with (
        trame_async.serve(
            "127.0.0.1", 0, on_disconnect=lambda c, r: lost.append((c.id, r))
        ) as server,
        trame_async.connect("127.0.0.1", server.port, queue_policy="disconnect", **limits) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        for i in range(50):
            await pub.multicast(BYT, payload(i))
        await asyncio.wait_for(slow.wait_closed(), 5)
        assert slow.close_reason is DisconnectReason.SLOW_CONSUMER
        # What was queued is still handed out, in order; then the reason.
        got: list[int] = []
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(100):
                got.append(seq_of(await slow.receive(timeout=5)))
        assert info.value.reason is DisconnectReason.SLOW_CONSUMER
        assert "max_queue" in str(info.value)
        assert got == list(range(len(got)))
        assert len(got) > (10 if bound == "count" else 8)
        # A real GOODBYE reached the server: not a reset, not a lost connection.
        await eventually(lambda: lost, what="the server saw the slow client go")
        assert lost == [(slow.id, DisconnectReason.GOODBYE)]
        assert server.disconnects[DisconnectReason.GOODBYE] == 1


async def test_drop_oldest_keeps_the_newest_max_queue_messages() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect(
            "127.0.0.1", server.port, max_queue=10, queue_policy="drop-oldest"
        ) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        for i in range(100):
            await pub.multicast(INT, i)
        await pub.multicast(INT, MARKER)
        # 101 arrived, 10 are kept, whatever the reads they came in.
        await eventually(lambda: slow.dropped == 91, what=f"91 dropped, not {slow.dropped}")
        got = await receive_n(slow, 10)
        assert [m.value for m in got] == [*range(91, 100), MARKER]
        assert slow.missed == 0  # the server dropped nothing


async def test_drop_oldest_keeps_the_byte_budget() -> None:
    n = 64
    budget = 16 << 10
    kept = budget // RELAY_BYT_SIZE
    async with (
        trame_async.serve(
            "127.0.0.1", 0, heartbeat_interval=None, heartbeat_timeout=None
        ) as server,
        trame_async.connect(
            "127.0.0.1",
            server.port,
            queue_policy="drop-oldest",
            max_queue_bytes=budget,
            max_frame_size=4096,
            rtt_interval=None,
        ) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        assert slow.max_queue_bytes == budget and slow.max_queue == 10_000
        for i in range(n):
            await pub.multicast(BYT, payload(i))
        await pub.multicast(BYT, payload(MARKER_SEQ))
        # Frames of one size: the budget holds exactly `kept` of them (the count bound is far).
        await eventually(lambda: slow.dropped == n + 1 - kept, what=f"dropped {slow.dropped}")
        assert slow.queued == kept and 0 < slow.queued_bytes <= budget
        got = [seq_of(m) for m in await receive_n(slow, kept)]
        assert got == [*range(n + 1 - kept, n), MARKER_SEQ]
        assert kept * RELAY_BYT_SIZE <= budget < (kept + 1) * RELAY_BYT_SIZE


async def test_backpressure_pauses_on_the_byte_budget_and_loses_nothing() -> None:
    n = 200
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect(
            "127.0.0.1",
            server.port,
            max_queue_bytes=8 * RELAY_BYT_SIZE,
            max_frame_size=4096,
        ) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        for i in range(n):
            await pub.multicast(BYT, payload(i))
        await read_paused(slow)  # a few KiB in: far below max_queue=10_000 messages
        assert slow.queued < slow.max_queue and slow.queued_bytes > slow.max_queue_bytes
        got = [seq_of(m) for m in await receive_n(slow, n)]
        assert got == list(range(n))
        assert not slow._read_paused  # reading resumed as the queue emptied
        assert slow.dropped == 0


async def test_keep_latest_hands_out_a_folded_value_before_a_newer_one() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect(
            "127.0.0.1", server.port, max_queue=2, queue_policy="keep-latest"
        ) as slow,
        trame_async.connect("127.0.0.1", server.port) as pub,
    ):
        for i in range(3):
            await pub.multicast(INT, i)
        await eventually(lambda: slow.dropped == 2, what="0, 1 and 2 folded into 2")
        await pub.multicast(INT, 3)
        await eventually(lambda: slow.queued == 2, what=f"2 and 3 queued: {slow.queued}")
        got = await receive_n(slow, 2)
        assert [m.value for m in got] == [2, 3]  # the newest value comes last
        assert slow.dropped == 2
        server.multicast(INT, MARKER)
        assert (await slow.receive(timeout=5)).value == MARKER


async def test_keep_latest_keeps_each_senders_order_and_the_newest_of_each_stream() -> None:
    k = 300
    max_queue = 50
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(trame_async.serve("127.0.0.1", 0))
        slow = await stack.enter_async_context(
            trame_async.connect(
                "127.0.0.1", server.port, max_queue=max_queue, queue_policy="keep-latest"
            )
        )
        pubs = [
            await stack.enter_async_context(trame_async.connect("127.0.0.1", server.port))
            for _ in range(3)
        ]

        async def publish(pub: Client) -> None:
            for i in range(k):
                await pub.multicast(INT, i)
                await pub.multicast(POS, (float(i), 0.0))
                await asyncio.sleep(0)  # interleave the senders

        await asyncio.gather(*(publish(p) for p in pubs))
        total = 3 * 2 * k
        # Wait until the client has lagged through (nearly) everything before reading.
        await eventually(lambda: slow.dropped >= total - max_queue, what=f"{slow.dropped}")
        server.multicast(INT, MARKER)
        got = await receive_until_marker(slow, total)
        assert len(got) + slow.dropped == total

        per_sender: dict[int, list[int]] = defaultdict(list)
        last: dict[tuple[int, str], Any] = {}
        for msg in got:
            assert msg.kind is Kind.RELAY
            step = 2 * msg.value if msg.trame == INT else 2 * int(msg.value.x) + 1
            per_sender[msg.sender].append(step)
            last[msg.sender, msg.trame] = msg.value
        assert set(per_sender) == {p.id for p in pubs}
        for sender, steps in per_sender.items():
            assert steps == sorted(set(steps)), f"sender {sender} out of order"
        # 6 streams, far below the cap: the newest value of every stream survived, last.
        assert last == {
            **{(p.id, "INT"): k - 1 for p in pubs},
            **{(p.id, "POS"): (float(k - 1), 0.0) for p in pubs},
        }


async def test_keep_latest_beyond_max_queue_half_streams_drops_the_oldest() -> None:
    # 20 streams (one code each) from one sender, for a client that keeps at most 10 // 2 = 5.
    registry = Registry()
    codes = [registry.register(f"K{i:02d}", "<q") for i in range(20)]
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect(
            "127.0.0.1", server.port, max_queue=10, queue_policy="keep-latest", registry=registry
        ) as slow,
        trame_async.connect("127.0.0.1", server.port, registry=registry) as pub,
    ):
        sent: list[tuple[str, int]] = []
        for i, code in enumerate(codes):
            await pub.multicast(code, i)
            sent.append((code, i))
        await pub.multicast(INT, MARKER)
        sent.append(("INT", MARKER))
        # All streams are distinct, so only the fallback drops; 21 > 10 must have triggered it.
        await eventually(lambda: slow.dropped >= len(sent) - 10, what=f"{slow.dropped}")
        got = [(str(m.trame), m.value) for m in await receive_n(slow, len(sent) - slow.dropped)]
        assert 5 <= len(got) <= 10
        assert got == sent[-len(got) :]  # the newest streams, in order: drop-oldest


async def test_missed_counts_what_the_servers_policy_dropped_for_this_client() -> None:
    async with (
        trame_async.serve(
            "127.0.0.1",
            0,
            slow_consumer_policy="drop-oldest",
            max_frame_size=4096,
            max_queue_bytes=64 << 10,
            slow_consumer_timeout=None,
            heartbeat_interval=None,
            heartbeat_timeout=None,
        ) as server,
        trame_async.connect("127.0.0.1", server.port, max_queue=10, rtt_interval=None) as slow,
    ):
        (remote,) = server.clients
        sent = 0
        # Faster than the client reads (it stops at 10 queued messages): the kernel's buffers
        # fill, then the server's budget for it; at most 400 x 100 KiB before the server drops.
        for _ in range(400):
            for _ in range(100):
                server.multicast(BYT, payload(sent))
                sent += 1
            await asyncio.sleep(0)  # let the writes go out
            if remote.dropped:
                break
        assert remote.dropped, f"nothing dropped after {sent} frames"
        server.multicast(BYT, payload(MARKER_SEQ))  # the newest: never dropped
        got: list[int] = []
        async with asyncio.timeout(30):
            while not got or got[-1] != MARKER_SEQ:
                assert len(got) <= sent
                got.append(seq_of(await slow.receive()))
        assert got[:-1] == sorted(set(got[:-1]))
        # The DROPPED notices arrive ahead of the frames that follow the gaps.
        assert slow.missed == remote.dropped == server.dropped_frames
        assert len(got) + slow.missed == sent + 1
        assert slow.dropped == 0  # the client itself lost nothing (backpressure)


async def test_connect_refuses_a_byte_budget_below_one_frame() -> None:
    with pytest.raises(ValueError, match="max_queue_bytes"):
        trame_async.connect("127.0.0.1", 1, max_queue_bytes=1000, max_frame_size=4096)
    with pytest.raises(ValueError, match="max_queue_bytes"):
        Client(
            "127.0.0.1",
            1,
            registry=trame_async.REGISTRY,
            max_queue=1,
            queue_policy="disconnect",
            max_queue_bytes=0,
        )
    # Client checks the budget against the frame size itself: connect() has no check of its own.
    with pytest.raises(ValueError, match=r"max_queue_bytes \(1000\) must be at least max_frame"):
        Client(
            "127.0.0.1",
            1,
            registry=trame_async.REGISTRY,
            max_queue=1,
            queue_policy="disconnect",
            max_queue_bytes=1000,
            max_frame_size=4096,
        )


# --- on_message: messages handed over in the I/O callback ----------------------------------------


async def test_on_message_gets_every_message_in_order_and_receive_only_reports_the_end() -> None:
    got: list[Message] = []
    done = asyncio.Event()

    def on_message(message: Message) -> None:
        got.append(message)
        if sum(1 for m in got if m.value == MARKER) == 2:  # one from each sender: the end
            done.set()

    async with trame_async.serve("127.0.0.1", 0) as server:
        listener = await trame_async.connect("127.0.0.1", server.port, on_message=on_message)
        async with (
            trame_async.connect("127.0.0.1", server.port) as a,
            trame_async.connect("127.0.0.1", server.port) as b,
        ):
            for i in range(200):
                await a.multicast(INT, i)
                await b.multicast(POS, (float(i), 0.0))
            await a.multicast(INT, MARKER)
            await b.multicast(INT, MARKER)
            async with asyncio.timeout(10):
                await done.wait()
        by_sender: dict[int, list[Any]] = defaultdict(list)
        for message in got:
            by_sender[message.sender].append(message.value)
        assert by_sender[a.id] == [*range(200), MARKER]
        assert by_sender[b.id] == [*((float(i), 0.0) for i in range(200)), MARKER]
        assert len(got) == 402
        assert listener.queued == 0  # nothing was queued for receive()
        server.close()
        # receive() hands out no message: it waits for the end and reports it.
        with pytest.raises(ConnectionClosed) as info:
            await listener.receive(timeout=10)
        assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
        await listener.close()


async def test_an_exception_in_on_message_is_logged_and_the_next_message_still_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    def on_message(message: Message) -> None:
        if message.value == 1:
            raise RuntimeError("application bug")
        got.append(message.value)

    caplog.set_level(logging.ERROR, logger="trame_async")
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, on_message=on_message) as listener,
    ):
        for i in range(3):
            server.multicast(INT, i)
        await eventually(lambda: got == [0, 2], what="messages 0 and 2")
        assert listener.connected
    failures = [r for r in caplog.records if "on_message" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_on_message_must_be_a_plain_function() -> None:
    async def handler(message: Message) -> None:
        del message

    with pytest.raises(TypeError, match="plain function"):
        trame_async.connect("127.0.0.1", 1, on_message=handler)
    with pytest.raises(TypeError, match="plain function"):
        trame_async.connect("127.0.0.1", 1, on_message="not callable")  # type: ignore[arg-type]

    class AsyncCallable:
        async def __call__(self, message: Message) -> None:
            del message

    with pytest.raises(TypeError, match="plain function"):
        trame_async.connect("127.0.0.1", 1, on_message=AsyncCallable())


async def test_on_message_set_on_a_connected_client_is_checked_and_used() -> None:
    got: list[int] = []
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):

        async def handler(message: Message) -> None:
            del message

        with pytest.raises(TypeError, match="plain function"):
            client.on_message = handler
        assert client.on_message is None
        server.multicast(INT, 1)
        assert (await client.receive(timeout=5)).value == 1  # still queued
        client.on_message = lambda message: got.append(message.value)
        server.multicast(INT, 2)
        await eventually(lambda: got == [2], what="the callback got the message")


# --- a failed first connect ---------------------------------------------------------------------


def trame_tasks() -> list[asyncio.Task[Any]]:
    """Return the running tasks whose coroutine is trame_async's own (a reconnect loop, a hook)."""
    package = Path(trame_async.__file__).parent
    return [
        task
        for task in asyncio.all_tasks()
        if (code := getattr(task.get_coro(), "cr_code", None)) is not None
        and Path(code.co_filename).parent == package
    ]


@pytest.mark.parametrize("server", ["closes at once", "says nothing"])
async def test_a_failed_first_connect_leaves_no_reconnect_task(server: str) -> None:
    """reconnect= is for a connection that was made: a first connect that fails only raises."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server == "closes at once":
            writer.close()
        else:
            writers.append(writer)  # holds the connection open, silent, until the test ends

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        # "says nothing": the connect times out while waiting for WELCOME (TCP is long done).
        opening = trame_async.connect("127.0.0.1", port, reconnect=True, timeout=300 * MS)
        with pytest.raises(ConnectError):
            await opening
        client = opening._client
        assert trame_tasks() == []
        assert client._reconnect_task is None and client._down is None
        assert client.closed and not client.connected
        await client.close()  # idempotent, and nothing to wait for
    finally:
        for writer in writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


# --- a value that the client's class refuses ---------------------------------------------------


def reading_registries() -> tuple[Registry, Registry]:
    """Return (the server's registry: RDG as a plain <q, a client's: RDG bound to Reading)."""
    plain, strict = Registry(), Registry()
    plain.register("RDG", "<q")
    strict.register("RDG", "<q", Reading)
    return plain, strict


async def test_a_multicast_value_the_clients_class_refuses_drops_that_message_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server relays the value unchecked (its registry has no class for it): the fault is the
    # sender's, so the subscriber drops that one message and stays connected, rather than let
    # one publisher cut every subscriber.
    plain, strict = reading_registries()
    lost: list[DisconnectReason] = []
    caplog.set_level(logging.INFO, logger="trame_async")
    async with (
        trame_async.serve(
            "127.0.0.1", 0, registry=plain, on_disconnect=lambda c, r: lost.append(r)
        ) as server,
        trame_async.connect("127.0.0.1", server.port, registry=strict) as client,
    ):
        for value in (1, 2, -1, 3, -4, 5):  # one loop iteration: one write, one read
            server.multicast("RDG", value)
        got = [(await client.receive(timeout=5)).value for _ in range(4)]
        assert got == [Reading(1), Reading(2), Reading(3), Reading(5)]
        assert client.refused == 2
        assert client.connected and client.close_reason is None
        server.multicast("RDG", 6)  # and the connection still carries what comes next
        assert (await client.receive(timeout=5)).value == Reading(6)
    assert lost == [DisconnectReason.GOODBYE]  # the client's own close, nothing else
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One line for the read that brought both (then at the 4th, 8th... refusal), no traceback.
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert "dropped a multicast from client 0" in text and "2 dropped so far" in text
    assert "refused by Reading: ValueError: negative reading -4" in text
    assert [r for r in caplog.records if r.exc_info is not None] == []


async def test_a_data_value_the_clients_class_refuses_fails_the_connection_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A DATA frame is the server's own value: a value it sends that the client's class refuses
    # is the server's error, handled as any other (ERROR BAD_VALUE, this connection closed).
    plain, strict = reading_registries()
    lost: list[DisconnectReason] = []
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    caplog.set_level(logging.INFO, logger="trame_async")
    try:
        async with (
            trame_async.serve(
                "127.0.0.1", 0, registry=plain, on_disconnect=lambda c, r: lost.append(r)
            ) as server,
            trame_async.connect("127.0.0.1", server.port, registry=strict) as client,
        ):
            (remote,) = server.clients
            # One loop iteration: the server writes the four frames together.
            for value in (1, 2, -1, 3):
                remote.send("RDG", value)
            got = [(await client.receive(timeout=5)).value for _ in range(2)]
            assert got == [Reading(1), Reading(2)]
            with pytest.raises(ConnectionClosed) as info:
                await client.receive(timeout=5)
            assert info.value.reason is DisconnectReason.PROTOCOL_ERROR
            assert info.value.peer_error_code is ErrorCode.BAD_VALUE
            assert "refused by Reading" in str(info.value)
            assert client.close_reason is DisconnectReason.PROTOCOL_ERROR
            # The server got the client's ERROR, not a reset.
            await eventually(lambda: lost, what="the server saw the client go")
            assert lost == [DisconnectReason.ERROR_RECEIVED]
    finally:
        loop.set_exception_handler(None)
    assert loop_errors == [], "the exception escaped to the event loop"
    assert [r for r in caplog.records if r.exc_info is not None] == []


def test_client_core_drops_a_refused_relay_and_fails_on_a_refused_data_value() -> None:
    plain, strict = reading_registries()
    relays = [plain.encode("RDG", v, Kind.RELAY) for v in (1, 2, -1, 3)]
    datas = [plain.encode("RDG", v, Kind.DATA) for v in (1, 2, -1, 3)]
    partial = relays[0][:3]  # the start of a frame: the parser takes the chunk, not the scan
    for chunks, is_relay in (
        ([b"".join(relays)], True),
        ([partial, relays[0][3:] + b"".join(relays[1:])], True),
        ([b"".join(datas)], False),
    ):
        core = ClientCore(0.0, registry=strict)
        core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, None, 1 << 20).encode(), 0.0)
        take(core)
        out: list[Message] = []
        for chunk in chunks:
            out += core.receive_data(chunk, 1.0)
        if is_relay:
            assert [m.value for m in out] == [Reading(1), Reading(2), Reading(3)]
            assert core.refused == 1 and not core.closed and take(core) == []
            assert core.last_refused is not None and core.last_refused[0] == 0
            continue
        assert [m.value for m in out] == [Reading(1), Reading(2)]
        assert core.refused == 0
        assert core.closed and core.close_reason is DisconnectReason.PROTOCOL_ERROR
        ((kind, body),) = take(core)
        assert kind == Kind.ERROR and ErrorFrame.parse(body).error_code is ErrorCode.BAD_VALUE
        assert core.receive_data(relays[3], 2.0) == []  # closed: nothing more


def test_server_core_refuses_a_value_its_class_refuses_at_the_sender() -> None:
    # docs/protocol.md: "a server that knows the type refuses such a MULTICAST at its sender with
    # BAD_VALUE", hook or no hook: what it relays, a client with the same type accepts.
    plain, strict = reading_registries()
    for kind in (Kind.MULTICAST, Kind.DATA):
        core = ServerCore(7, ServerLimits(), 0.0, registry=strict)
        core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
        assert core.state is CoreState.OPEN
        core.outgoing.clear()
        good, bad = plain.encode("RDG", 1, kind), plain.encode("RDG", -1, kind)
        out = core.receive_data(good + bad + good, 1.0)
        assert [bytes(f) for f in out] == [good[4:]]
        assert core.closed and core.close_reason is DisconnectReason.PROTOCOL_ERROR
        (error,) = [ErrorFrame.parse(f[1:]) for f in FrameParser().feed(b"".join(core.outgoing))]
        assert error.error_code is ErrorCode.BAD_VALUE


# --- the sans-I/O core with a fake clock ---------------------------------------------------------


def take(core: ClientCore) -> list[tuple[int, bytes]]:
    """Return and clear the frames the core wants written, as ``(kind, body)``."""
    parser = FrameParser()
    frames = [(f[0], bytes(f[1:])) for f in parser.feed(b"".join(core.outgoing))]
    core.outgoing.clear()
    return frames


def open_core(
    now: float, interval: float | None, timeout: float | None, rtt_interval: float | None = None
) -> ClientCore:
    core = ClientCore(now, rtt_interval=rtt_interval)
    assert [kind for kind, _ in take(core)] == [Kind.HELLO]
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, interval, timeout, 1 << 20).encode(), now)
    assert core.state is CoreState.OPEN
    return core


def test_client_core_does_not_count_paused_reading_as_server_silence() -> None:
    core = open_core(10.0, interval=1.0, timeout=2.0)
    # 10 s: WELCOME; 3 s of silence (interval + timeout) would mean a dead server.
    assert core.next_timer() == 13.0
    # 11 s: the receive queue is full, the adapter stops reading: the server's pings go unread.
    core.reading_paused(True, 11.0)
    # Meanwhile a PING every half of min(interval, timeout) tells the server we are alive.
    assert core.next_timer() == 11.5
    now = 11.5
    keepalives = 0
    while now <= 20.0:
        assert core.next_timer() == now
        core.handle_timer(now)
        assert [kind for kind, _ in take(core)] == [Kind.PING]
        keepalives += 1
        now += 0.5
    assert not core.closed and keepalives == 18  # 8.5 s past the 3 s limit, still open
    core.reading_paused(True, 20.2)  # a second pause changes nothing
    # 20.2 s: reading resumes; the silence clock starts again now.
    core.reading_paused(False, 20.2)
    assert core.next_timer() == pytest.approx(23.2)
    core.handle_timer(23.1)
    assert not core.closed and take(core) == []
    # 21 s: what had waited in the socket is read, a ping among it: it is answered.
    core.receive_data(ping(7), 21.0)
    assert take(core) == [(Kind.PONG, (7).to_bytes(4, "big"))]
    assert core.next_timer() == 24.0
    core.handle_timer(23.999)
    assert not core.closed
    core.handle_timer(24.0)
    assert core.closed and core.close_reason is DisconnectReason.HEARTBEAT_TIMEOUT


def test_client_core_sends_no_rtt_probe_while_paused_and_drops_the_one_in_flight() -> None:
    core = open_core(0.0, interval=10.0, timeout=10.0, rtt_interval=1.0)
    core.handle_timer(0.0)
    ((kind, body),) = take(core)
    assert kind == Kind.PING
    probe = int.from_bytes(body, "big")
    # 0.5 s: paused before the pong came: it will be read late, so it must not give an RTT.
    core.reading_paused(True, 0.5)
    assert core.next_timer() == 5.5  # the next keepalive, not the probe due at 1 s
    core.reading_paused(False, 3.0)
    core.receive_data(pong(probe), 3.0)
    assert core.rtt is None
    # The probe that was due meanwhile goes out at once.
    assert core.next_timer() == 1.0
    core.handle_timer(3.0)
    ((kind, body),) = take(core)
    core.receive_data(pong(int.from_bytes(body, "big")), 3.01)
    assert core.rtt == pytest.approx(0.01)


def test_client_core_without_server_heartbeat_needs_no_keepalive() -> None:
    core = open_core(0.0, interval=None, timeout=None)
    core.reading_paused(True, 1.0)
    assert core.next_timer() is None
    core.reading_paused(False, 2.0)
    assert core.next_timer() is None


# --- the client's own frame limit ---------------------------------------------------------------


async def test_the_clients_max_frame_size_holds_whatever_the_server_announces() -> None:
    # The server accepts (and relays) frames four times larger than this client agreed to take:
    # its WELCOME must not raise the client's limit. The client ends that connection alone.
    async with (
        trame_async.serve("127.0.0.1", 0, max_frame_size=20_000) as server,
        trame_async.connect("127.0.0.1", server.port, max_frame_size=5000) as small,
        trame_async.connect("127.0.0.1", server.port, echo=True) as publisher,
    ):
        assert small.server_settings is not None
        assert small.server_settings.max_frame_size == 20_000
        await publisher.multicast(BYT, b"x" * 4000)
        assert (await small.receive(timeout=5)).value == b"x" * 4000
        await publisher.multicast(BYT, b"x" * 12_000)
        with pytest.raises(ConnectionClosed) as info:
            await small.receive(timeout=5)
        assert info.value.reason is DisconnectReason.PROTOCOL_ERROR
        assert info.value.peer_error_code is ErrorCode.FRAME_TOO_LARGE
        # The publisher (default limit, 1 MiB) got both of its own frames.
        got = [(await publisher.receive(timeout=5)).value for _ in range(2)]
        assert [len(v) for v in got] == [4000, 12_000]


async def test_one_frame_within_max_frame_size_always_fits_the_byte_budget() -> None:
    # max_queue_bytes may equal max_frame_size: one such frame, counted with its header bytes,
    # still fits an empty queue, under every policy, the disconnect one included.
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect(
            "127.0.0.1",
            server.port,
            max_frame_size=1000,
            max_queue_bytes=1000,
            queue_policy="disconnect",
        ) as client,
    ):
        value = b"y" * (1000 - 12)  # code, format "<988s" and value: 1000 bytes of body
        server.multicast(BYT, value)
        assert (await client.receive(timeout=5)).value == value
        assert client.connected and client.dropped == 0
