"""Multicast fan-out over real sockets: completeness, order, echo, hooks, direct frames.

Every test runs a server and its clients in one event loop on 127.0.0.1 (port 0), on the stock loop
and on uvloop (see conftest.py). A "marker" multicast sent last proves that nothing else is queued
behind the messages a test expects: frames from one sender keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from typing import Any, NamedTuple

import pytest
from helpers import eventually, receive_n

import trame_async
from trame_async import (
    BOL,
    BYT,
    FLT,
    INT,
    POS,
    REGISTRY,
    STR,
    Client,
    InvalidStateError,
    Kind,
    Message,
    Position,
    Registry,
    RemoteClient,
)


class Seq(NamedTuple):
    """A composite value: who sent it and its sequence number."""

    origin: int
    seq: int
    weight: float


#: Server and clients of the fan-out test share this registry (the composite trame is known).
SEQ_REGISTRY = Registry()
SEQ = SEQ_REGISTRY.register("SEQ", "<IIf", Seq)

N_CLIENTS = 50
K_MESSAGES = 50
MARKER = -1


async def connect_all(
    stack: contextlib.AsyncExitStack, port: int, n: int, **kwargs: Any
) -> list[Client]:
    """Connect ``n`` clients at once; the stack closes them."""
    clients = await asyncio.gather(
        *(
            stack.enter_async_context(trame_async.connect("127.0.0.1", port, **kwargs))
            for _ in range(n)
        )
    )
    return list(clients)


async def expect_marker(client: Client, sender: int = 0, timeout: float = 5.0) -> None:
    """The next message must be the marker ``INT -1`` from ``sender``: nothing else is pending."""
    msg = await client.receive(timeout=timeout)
    assert (msg.sender, msg.trame, msg.value) == (sender, INT, MARKER), msg


# --- fan-out --------------------------------------------------------------------------------------


@pytest.mark.parametrize("echo", [False, True], ids=["echo-off", "echo-on"])
async def test_every_client_gets_every_other_clients_multicasts_in_order(echo: bool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            trame_async.serve("127.0.0.1", 0, registry=SEQ_REGISTRY)
        )
        clients = await connect_all(stack, server.port, N_CLIENTS, registry=SEQ_REGISTRY, echo=echo)
        ids = [c.id for c in clients]
        assert len(set(ids)) == N_CLIENTS and 0 not in ids
        assert all(r.echo is echo for r in server.clients)

        async def publish(index: int, client: Client) -> None:
            # Even clients send plain INTs, odd ones the composite trame.
            for k in range(K_MESSAGES):
                if index % 2 == 0:
                    await client.multicast(INT, k)
                else:
                    await client.multicast(SEQ, Seq(client.id, k, k / 2))
                await asyncio.sleep(0)  # let the other publishers interleave

        # With echo each client also gets its own: N * K in all, else (N - 1) * K.
        expected = (N_CLIENTS if echo else N_CLIENTS - 1) * K_MESSAGES
        received, *_ = await asyncio.gather(
            asyncio.gather(*(receive_n(c, expected, timeout=30) for c in clients)),
            *(publish(i, c) for i, c in enumerate(clients)),
        )

        kind_of = {c.id: (INT if i % 2 == 0 else SEQ) for i, c in enumerate(clients)}
        for client, messages in zip(clients, received, strict=True):
            per_sender: dict[int, list[int]] = defaultdict(list)
            for msg in messages:
                assert msg.kind is Kind.RELAY
                assert msg.trame == kind_of[msg.sender], msg
                if msg.trame == SEQ:
                    assert isinstance(msg.value, Seq)
                    assert msg.value.origin == msg.sender
                    assert msg.value.weight == msg.value.seq / 2
                    per_sender[msg.sender].append(msg.value.seq)
                else:
                    per_sender[msg.sender].append(msg.value)
            if echo:
                assert set(per_sender) == set(ids), "echo is on: a client gets its own too"
            else:
                assert client.id not in per_sender, "echo is off: a client must not get its own"
                assert set(per_sender) == set(ids) - {client.id}
            for sender, seqs in per_sender.items():
                assert seqs == list(range(K_MESSAGES)), f"client {client.id} from {sender}"

        server.multicast(INT, MARKER)
        await asyncio.gather(*(expect_marker(c) for c in clients))


async def test_a_multicast_is_encoded_once_and_the_same_bytes_queued_for_every_recipient() -> None:
    """The fan-out costs one list append per recipient: one bytes object, no copy, no task."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            trame_async.serve("127.0.0.1", 0, heartbeat_interval=None, heartbeat_timeout=None)
        )
        clients = await connect_all(stack, server.port, 10, rtt_interval=None)
        sender, receivers = clients[0], clients[1:]
        remotes = {r.id: r for r in server.clients}
        # (relay bytes, what each client had queued right after the fan-out, tasks then)
        fanned: list[tuple[bytes, dict[int, list[bytes]], int]] = []
        real_fanout = server.fanout

        def spy(
            relay_frame: bytes, exclude: RemoteClient | None = None, frames: int = 1, **kw: Any
        ) -> None:
            real_fanout(relay_frame, exclude, frames, **kw)
            # Still inside the callback, before the end-of-iteration flush writes the queues.
            queued = {rid: list(r.outbox.frames) for rid, r in remotes.items()}
            fanned.append((relay_frame, queued, len(asyncio.all_tasks())))

        server.fanout = spy  # type: ignore[method-assign]
        tasks_before = len(asyncio.all_tasks())

        await sender.multicast(POS, (1.0, 2.0))
        for client in receivers:
            got = await client.receive(timeout=5)
            assert got == Message(sender.id, POS, Position(1.0, 2.0), Kind.RELAY)
        ((relay, queued, tasks_during),) = fanned  # one fan-out for the multicast
        # The RELAY frame is the MULTICAST frame with a sender id spliced in, built once.
        multicast = trame_async.encode(POS, (1.0, 2.0))[0]
        length = int.from_bytes(multicast[:4], "big") + 4
        assert (
            relay
            == (length.to_bytes(4, "big") + bytes([Kind.RELAY]) + sender.id.to_bytes(4, "big"))
            + multicast[5:]
        )
        for client in receivers:
            (frame,) = queued[client.id]
            assert frame is relay, "the same object for every recipient: no copy, no re-encode"
        assert queued[sender.id] == []  # echo is off
        assert tasks_during == tasks_before, "no task per recipient"

        # A server-originated multicast goes through the same fan-out, to every client.
        server.multicast(INT, MARKER)
        relay, queued, tasks_during = fanned[-1]
        assert len(fanned) == 2
        assert all(q == [relay] and q[0] is relay for q in queued.values())
        assert tasks_during == tasks_before
        await asyncio.gather(*(expect_marker(c) for c in clients))
        assert all(not r.outbox.frames for r in remotes.values())  # written out, nothing held back
        assert len(asyncio.all_tasks()) == tasks_before


async def test_echo_on_gets_its_own_multicasts_echo_off_does_not() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, echo=True) as echo,
        trame_async.connect("127.0.0.1", server.port) as plain,
    ):
        assert {c.id: c.echo for c in server.clients} == {echo.id: True, plain.id: False}
        for i in range(10):
            await echo.multicast(INT, i)
            await plain.multicast(INT, 100 + i)

        got_echo = await receive_n(echo, 20)
        got_plain = await receive_n(plain, 10)

        own = [m.value for m in got_echo if m.sender == echo.id]
        other = [m.value for m in got_echo if m.sender == plain.id]
        assert own == list(range(10))
        assert other == [100 + i for i in range(10)]
        assert [(m.sender, m.value) for m in got_plain] == [(echo.id, i) for i in range(10)]

        server.multicast(INT, MARKER)
        await expect_marker(echo)
        await expect_marker(plain)


async def test_server_multicast_reaches_every_client_with_sender_0() -> None:
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(trame_async.serve("127.0.0.1", 0))
        clients = await connect_all(stack, server.port, 5)
        server.multicast(POS, (1.5, -2.0))
        server.multicast("STR", "from the server")
        for client in clients:
            first, second = await receive_n(client, 2)
            assert first == Message(0, POS, Position(1.5, -2.0), Kind.RELAY)
            assert isinstance(first.value, Position)
            assert second == Message(0, STR, "from the server", Kind.RELAY)


async def test_server_clients_lists_id_address_connected_since_and_rtt() -> None:
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            trame_async.serve("127.0.0.1", 0, heartbeat_interval=0.05, heartbeat_timeout=1.0)
        )
        before = time.time()
        clients = []
        for _ in range(3):
            clients.append(
                await stack.enter_async_context(trame_async.connect("127.0.0.1", server.port))
            )
        after = time.time()

        listed = server.clients
        assert all(isinstance(r, RemoteClient) for r in listed)
        assert [r.id for r in listed] == [c.id for c in clients]  # connection order
        assert [r.address for r in listed] == [c.local_address for c in clients]
        for remote in listed:
            assert remote.is_open
            assert before - 1 <= remote.connected_since <= after + 1
        # The first ping goes out after one interval; its pong gives the round-trip time.
        await eventually(lambda: all(r.rtt is not None for r in server.clients), what="rtt")
        for remote in server.clients:
            assert remote.rtt is not None and remote.rtt < 1.0  # sign: test_heartbeat.py

        await clients[1].close()
        await eventually(lambda: len(server.clients) == 2, what="closed client unlisted")
        assert [r.id for r in server.clients] == [clients[0].id, clients[2].id]


# --- sending ------------------------------------------------------------------------------------


async def test_send_takes_messages_pre_encoded_with_trame_async_encode() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as sender,
        trame_async.connect("127.0.0.1", server.port) as receiver,
    ):
        pos_message, pos_fmt = trame_async.encode(POS, (3.0, 4.0))
        str_message, str_fmt = trame_async.encode("STR", "héllo")
        assert (pos_fmt, str_fmt) == ("<dd", "<6s")
        await sender.send(pos_message)
        await sender.send(str_message)
        await sender.send(pos_message)  # the same bytes again

        got = await receive_n(receiver, 3)
        assert got == [
            Message(sender.id, POS, Position(3.0, 4.0), Kind.RELAY),
            Message(sender.id, STR, "héllo", Kind.RELAY),
            Message(sender.id, POS, Position(3.0, 4.0), Kind.RELAY),
        ]


@pytest.mark.parametrize("hook_style", ["sync", "async"])
async def test_send_data_reaches_the_on_data_hook_only(hook_style: str) -> None:
    seen: list[tuple[int, Message]] = []
    done = asyncio.Event()

    def record(remote: RemoteClient, message: Message) -> None:
        seen.append((remote.id, message))
        if len(seen) == 3:
            done.set()

    def sync_hook(remote: RemoteClient, message: Message) -> None:
        record(remote, message)

    async def async_hook(remote: RemoteClient, message: Message) -> None:
        await asyncio.sleep(0)
        record(remote, message)

    hook = sync_hook if hook_style == "sync" else async_hook
    async with (
        trame_async.serve("127.0.0.1", 0, on_data=hook) as server,
        trame_async.connect("127.0.0.1", server.port) as sender,
        trame_async.connect("127.0.0.1", server.port) as other,
    ):
        await sender.send_data(INT, 42)
        await sender.send_data(STR, "to the server")
        await sender.send_data(POS, Position(0.5, 0.25))
        await asyncio.wait_for(done.wait(), 5)

        assert [remote_id for remote_id, _ in seen] == [sender.id] * 3
        assert [m.sender for _, m in seen] == [sender.id] * 3
        assert [m.kind for _, m in seen] == [Kind.DATA] * 3
        assert [(m.trame, m.value) for _, m in seen] == [
            (INT, 42),
            (STR, "to the server"),
            (POS, Position(0.5, 0.25)),
        ]
        # DATA frames are not relayed: the next thing the other client sees is this multicast.
        await sender.multicast(INT, MARKER)
        await expect_marker(other, sender.id)


async def test_on_multicast_filter_drops_the_frames_it_refuses() -> None:
    calls: list[tuple[int, Any]] = []

    def only_even(remote: RemoteClient, message: Message) -> bool:
        assert message.sender == remote.id and message.kind is Kind.MULTICAST
        calls.append((remote.id, message.value))
        return message.trame != INT or message.value == MARKER or message.value % 2 == 0

    async with (
        trame_async.serve("127.0.0.1", 0, on_multicast=only_even) as server,
        trame_async.connect("127.0.0.1", server.port) as sender,
        trame_async.connect("127.0.0.1", server.port) as receiver,
    ):
        for i in range(20):
            await sender.multicast(INT, i)
        got = await receive_n(receiver, 10)
        assert [(m.sender, m.value) for m in got] == [(sender.id, i) for i in range(0, 20, 2)]
        assert calls == [(sender.id, i) for i in range(20)]
        await sender.multicast(INT, MARKER)  # passes the filter
        await expect_marker(receiver, sender.id)
        assert calls[-1] == (sender.id, MARKER)


async def test_remote_client_send_delivers_a_direct_data_frame() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as target,
        trame_async.connect("127.0.0.1", server.port) as bystander,
    ):
        (remote,) = [r for r in server.clients if r.id == target.id]
        remote.send(INT, 5)
        remote.send("POS", (1.0, 2.0))
        got = await receive_n(target, 2)
        assert got == [
            Message(0, INT, 5, Kind.DATA),
            Message(0, POS, Position(1.0, 2.0), Kind.DATA),
        ]
        server.multicast(INT, MARKER)
        await expect_marker(bystander)  # the direct frames went to the target alone
        await expect_marker(target)
        await target.close()
        await eventually(lambda: not remote.is_open, what="target gone")
        with pytest.raises(InvalidStateError):
            remote.send(INT, 6)


VALUES: list[tuple[Any, Any]] = [
    (STR, ""),
    (STR, "hello"),
    (STR, "héllo wörld ✓ 🎉"),
    (STR, "x" * 100_000),
    (BYT, b""),
    (BYT, b"\x00\xff\x00"),
    (BYT, bytes(range(256)) * 400),
    (POS, Position(0.0, 0.0)),
    (POS, Position(-1.5, 2.25)),
    (POS, Position(math.inf, -0.0)),
    (FLT, 1e-300),
    (BOL, True),
    (BOL, False),
    (INT, -(1 << 63)),
    (INT, (1 << 63) - 1),
]


async def test_str_byt_pos_and_scalar_values_arrive_intact() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as sender,
        trame_async.connect("127.0.0.1", server.port) as receiver,
    ):
        for trame, value in VALUES:
            await sender.multicast(trame, value)
        got = await receive_n(receiver, len(VALUES))
        for (trame, value), msg in zip(VALUES, got, strict=True):
            assert msg.sender == sender.id
            assert msg.trame == trame
            assert msg.value == value
            assert type(msg.value) is type(value)
        assert math.copysign(1.0, got[9].value.y) == -1.0  # -0.0 kept


class Custom(NamedTuple):
    a: int
    b: int
    ratio: float


async def test_codes_unknown_to_the_server_are_relayed() -> None:
    client_registry = Registry()
    cus = client_registry.register("CUS", "<hhf", Custom)
    cuv = client_registry.register("CUV", "<*s", str)
    assert "CUS" not in REGISTRY and "CUV" not in REGISTRY  # the server's registry

    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, registry=client_registry) as sender,
        trame_async.connect("127.0.0.1", server.port, registry=client_registry) as knows,
        trame_async.connect("127.0.0.1", server.port) as does_not_know,
    ):
        await sender.multicast(cus, Custom(1, -2, 0.5))
        await sender.multicast(cuv, "variable ✓")
        await sender.multicast(INT, 7)

        got = await receive_n(knows, 3)
        assert got == [
            Message(sender.id, cus, Custom(1, -2, 0.5), Kind.RELAY),
            Message(sender.id, cuv, "variable ✓", Kind.RELAY),
            Message(sender.id, INT, 7, Kind.RELAY),
        ]
        assert isinstance(got[0].value, Custom)

        # A client without the type still gets the frame, unpacked with its own format.
        generic = await receive_n(does_not_know, 3)
        assert [m.trame for m in generic] == ["CUS", "CUV", "INT"]
        assert generic[0].value == (1, -2, 0.5)
        assert generic[1].value == "variable ✓".encode()
        assert generic[2].value == 7
        assert len(server.clients) == 3  # nobody was cut for an unknown code
