"""The client side of groups (issue 10): ClientCore with plain bytes, then the Client API over real
sockets against a small server written here by hand, frame by frame (the real server's group
support lands separately)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import MS
from hypothesis import given
from hypothesis import strategies as st

import trame_async
from trame_async import (
    INT,
    POS,
    REGISTRY,
    Backoff,
    ConnectionClosed,
    DisconnectReason,
    ErrorCode,
    GroupRefused,
    GroupStatus,
    InvalidStateError,
    Kind,
    Message,
    Position,
    Presence,
    encode,
)
from trame_async.protocol import ClientCore, GroupPresence
from trame_async.wire import (
    FLAG_PRESENCE,
    GROUP_HEAD,
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameParser,
    Hello,
    Join,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    Welcome,
    dropped_notice,
    frame,
    ping,
)

JOIN, LEAVE, MEMBERS = 1, 2, 4


def group_relay(sender: int, group_id: int, trame: str, value: Any) -> bytes:
    body = encode(trame, value)[0][5:]
    return GROUP_HEAD.pack(len(body) + 9, Kind.GROUP_RELAY, sender, group_id) + body


def _open_client(**kwargs: Any) -> ClientCore:
    core = ClientCore(0.0, **kwargs)
    core.outgoing.clear()
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, None, 1 << 20).encode(), 0.0)
    return core


def _errors(outgoing: list[bytes]) -> list[ErrorCode | None]:
    return [ErrorFrame.parse(f[5:]).error_code for f in outgoing if f[4] == Kind.ERROR]


# --- ClientCore, plain bytes ---------------------------------------------------------------------


def test_group_relays_carry_the_name_from_the_ok_reply() -> None:
    core = _open_client()
    ok = Reply(1, JOIN, 0, 5, "lobby").encode()
    # The REPLY and the relays right behind it, in one read (the parser path)...
    out = core.receive_data(ok + group_relay(7, 5, "INT", 42) + group_relay(8, 5, "POS", (1, 2)), 0)
    assert out == [
        Message(7, INT, 42, Kind.GROUP_RELAY, "lobby"),
        Message(8, POS, Position(1.0, 2.0), Kind.GROUP_RELAY, "lobby"),
    ]
    assert core.events == [Reply(1, JOIN, 0, 5, "lobby")]
    assert core.group_names == {5: "lobby"} and core.group_ids == {"lobby": 5}
    # ... and alone in a read (the scan path), mixed with RELAYs to everyone.
    out = core.receive_data(
        group_relay(7, 5, "INT", 1)
        + REGISTRY.encode(INT, 2, Kind.RELAY)
        + group_relay(9, 5, "STR", "x"),
        0,
    )
    assert out == [
        Message(7, INT, 1, Kind.GROUP_RELAY, "lobby"),
        Message(0, INT, 2, Kind.RELAY, None),
        Message(9, REGISTRY["STR"], "x", Kind.GROUP_RELAY, "lobby"),
    ]
    assert not core.closed and core.unknown_group == 0


def test_relays_of_a_group_not_mapped_are_dropped_and_counted_never_an_error() -> None:
    core = _open_client()
    core.receive_data(Reply(1, JOIN, 0, 5, "lobby").encode(), 0)
    # Scan path, parser path, and a PRESENCE of a group left: dropped or handed on, no error.
    assert core.receive_data(group_relay(7, 6, "INT", 1), 0) == []
    assert core.receive_data(ping(1) + group_relay(7, 6, "INT", 1), 0) == []
    assert core.unknown_group == 2
    # After the OK REPLY of a LEAVE the group's relays are unknown too.
    core.receive_data(Reply(2, LEAVE, 0, 5, "lobby").encode(), 0)
    assert core.group_names == {} and core.group_ids == {}
    assert core.receive_data(group_relay(7, 5, "INT", 1), 0) == []
    assert core.unknown_group == 3 and not core.closed


def test_joins_and_leaves_of_the_server_application_update_the_map() -> None:
    core = _open_client()
    core.receive_data(Reply(0, JOIN, 0, 9, "ops").encode(), 0)
    assert core.group_ids == {"ops": 9}
    # A refused reply changes nothing; a reused id replaces the stale name.
    core.receive_data(Reply(3, JOIN, GroupStatus.REFUSED, 0, "no").encode(), 0)
    core.receive_data(Reply(0, LEAVE, 0, 9, "ops").encode(), 0)
    core.receive_data(Reply(4, JOIN, 0, 9, "other").encode(), 0)
    assert core.group_names == {9: "other"} and core.group_ids == {"other": 9}
    core.receive_data(Reply(5, JOIN, 0, 10, "other").encode(), 0)  # a new id for a name
    assert core.group_names == {10: "other"} and core.group_ids == {"other": 10}
    assert len(core.events) == 5


def test_presence_and_member_lists_are_events() -> None:
    core = _open_client()
    core.receive_data(Reply(1, JOIN, 0, 5, "g").encode(), 0)
    core.events.clear()
    frames = [
        PresenceNotice(5, 1, 8, 0),
        PresenceNotice(5, 2, 8, int(DisconnectReason.HEARTBEAT_TIMEOUT)),
        MemberList(4, 5, True, (3, 8)),
    ]
    assert core.receive_data(b"".join(f.encode() for f in frames), 0) == []
    assert core.events == [GroupPresence("g", frames[0]), GroupPresence("g", frames[1]), frames[2]]
    # A PRESENCE of a group not mapped (yet: its REPLY comes after it) is dropped in order.
    core.events.clear()
    core.receive_data(PresenceNotice(6, 1, 8, 0).encode() + Reply(2, JOIN, 0, 6, "h").encode(), 0)
    assert core.events == [Reply(2, JOIN, 0, 6, "h")] and core.unknown_group == 1
    # One just before this client's own LEAVE of that group, in the same read, keeps its name.
    core.events.clear()
    leave = Reply(3, LEAVE, 0, 5, "g")
    core.receive_data(PresenceNotice(5, 2, 9, 0).encode() + leave.encode(), 0)
    assert core.events == [GroupPresence("g", PresenceNotice(5, 2, 9, 0)), leave]
    assert 5 not in core.group_names


def test_group_frames_before_welcome_are_unexpected() -> None:
    for early in (group_relay(1, 1, "INT", 1), Reply(0, JOIN, 0, 1, "a").encode()):
        core = ClientCore(0.0)
        core.outgoing.clear()
        core.receive_data(early, 0)
        assert core.closed and _errors(core.outgoing) == [ErrorCode.UNEXPECTED_FRAME]


def test_client_to_server_kinds_from_the_server_are_unexpected() -> None:
    for wrong in (Join(1, 0, b"a").encode(), Leave(1, 1).encode(), Members(1, 1, 0).encode()):
        core = _open_client()
        core.receive_data(wrong, 0)
        assert _errors(core.outgoing) == [ErrorCode.UNEXPECTED_FRAME]


def test_a_group_relay_value_refused_by_its_type_drops_that_message_alone() -> None:
    registry = trame_async.Registry()

    @registry.register("AGE", "<i")
    @dataclasses.dataclass
    class Age:
        years: int

        def __post_init__(self) -> None:
            if self.years < 0:
                raise ValueError("negative age")

    core = _open_client(registry=registry)
    core.receive_data(Reply(1, JOIN, 0, 5, "g").encode(), 0)
    bad = frame(
        Kind.GROUP_RELAY, b"\0\0\0\7\0\0\0\5AGE\x02<i" + (-1).to_bytes(4, "little", signed=True)
    )
    good = frame(Kind.GROUP_RELAY, b"\0\0\0\7\0\0\0\5AGE\x02<i" + (3).to_bytes(4, "little"))
    for data in (bad + good, ping(1) + bad + good):  # scan path, then parser path
        out = core.receive_data(data, 0)
        assert out == [Message(7, registry["AGE"], Age(3), Kind.GROUP_RELAY, "g")]
    assert core.refused == 2 and not core.closed


def test_requests_are_queued_with_increasing_ids_that_skip_zero() -> None:
    core = _open_client()
    assert core.request_join(b"lobby", presence=True) == 1
    assert core.request_leave(5) == 2
    assert core.request_members(5, after=8) == 3
    assert core.outgoing == [
        Join(1, FLAG_PRESENCE, b"lobby").encode(),
        Leave(2, 5).encode(),
        Members(3, 5, 8).encode(),
    ]
    core._request_seq = 0xFFFF_FFFF
    assert core.request_leave(5) == 1  # 0 is the server's own
    closed = ClientCore(0.0)
    with pytest.raises(InvalidStateError):
        closed.request_join(b"x")


_STREAM_ITEMS = st.sampled_from(
    [
        Reply(1, JOIN, 0, 5, "lobby").encode(),
        Reply(2, LEAVE, 0, 5, "lobby").encode(),
        Reply(0, JOIN, 0, 6, "ops").encode(),
        group_relay(7, 5, "INT", 42),
        group_relay(8, 6, "POS", (1.0, 2.0)),
        group_relay(9, 5, "STR", "héllo"),
        REGISTRY.encode(INT, 3, Kind.RELAY),
        PresenceNotice(5, 1, 8, 0).encode(),
        MemberList(3, 5, False, (1, 2)).encode(),
        ping(4),
        dropped_notice(2),
    ]
)


@given(st.lists(_STREAM_ITEMS, max_size=16), st.data())
def test_any_chunking_gives_the_same_messages_and_events(
    items: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(items)
    whole = _open_client()
    expected = whole.receive_data(stream, 0) if stream else []
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    core = _open_client()
    got: list[Message] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:
            got += core.receive_data(stream[prev:cut], 0)
        prev = cut
    assert got == expected
    assert core.events == whole.events and core.unknown_group == whole.unknown_group
    assert core.outgoing == whole.outgoing and not core.closed


_TODAY = st.one_of(
    st.builds(
        lambda s, v: (
            REGISTRY.encode(INT, v, Kind.RELAY)[:5]
            + s.to_bytes(4, "big")
            + REGISTRY.encode(INT, v, Kind.RELAY)[9:]
        ),
        st.integers(0, 2**32 - 1),
        st.integers(-(2**63), 2**63 - 1),
    ),
    st.builds(
        lambda v: REGISTRY.encode(POS, v, Kind.RELAY), st.tuples(st.floats(0, 9), st.floats(0, 9))
    ),
    st.builds(lambda v: REGISTRY.encode("STR", v, Kind.RELAY), st.text(max_size=8)),
    st.builds(lambda v: REGISTRY.encode("BYT", v, Kind.DATA), st.binary(max_size=8)),
    st.builds(ping, st.integers(0, 2**32 - 1)),
    st.builds(dropped_notice, st.integers(0, 100)),
)


@given(st.lists(_TODAY, max_size=20))
def test_a_client_that_never_joins_sees_exactly_todays_protocol(items: list[bytes]) -> None:
    # The same messages as the data frames decoded one by one, group None; no event; only PONGs
    # go out; nothing of groups is ever sent by it.
    core = _open_client()
    got = core.receive_data(b"".join(items), 0) if items else []
    expected = [
        REGISTRY.decode_frame(f[4:], strict=False) for f in items if f[4] in (Kind.RELAY, Kind.DATA)
    ]
    assert got == expected and all(m.group is None and len(m) == 5 for m in got)
    assert core.events == [] and core.group_names == {} and core.unknown_group == 0
    assert {f[4] for f in core.outgoing} <= {Kind.PONG}
    assert core.missed == sum(int.from_bytes(f[5:], "big") for f in items if f[4] == Kind.DROPPED)


# --- the Client API over sockets, against a hand-written server ----------------------------------


@dataclasses.dataclass
class Conn:
    """One connection of the fake server: what it received, and a way to send."""

    writer: asyncio.StreamWriter
    received: list[bytes] = dataclasses.field(default_factory=list)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))


Handler = Callable[[Conn, int, bytes], Awaitable[None] | None]


class FakeServer:
    """Speaks the handshake, then hands each frame (kind, body) to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.next_id = 10
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer)
        self.conns.append(conn)
        parser = FrameParser()
        self.next_id += 1
        client_id = self.next_id
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for f in parser.feed(data):
                    kind, body = f[0], bytes(f[1:])
                    conn.received.append(bytes(f))
                    if kind == Kind.HELLO:
                        Hello.parse(body)
                        conn.send(
                            Welcome(PROTOCOL_VERSION, 0, client_id, None, None, 1 << 20).encode()
                        )
                        continue
                    result = self.handler(conn, kind, body)
                    if result is not None:
                        await result
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()


def member_server(refuse: tuple[str, ...] = ()) -> Handler:
    """Answer JOIN/LEAVE/MEMBERS as a server would; relay a GROUP_MULTICAST back to its sender."""
    ids: dict[bytes, int] = {}

    def handle(conn: Conn, kind: int, body: bytes) -> None:
        if kind == Kind.JOIN:
            join = Join.parse(body)
            if join.name.decode() in refuse:
                conn.send(
                    Reply(join.request_id, JOIN, GroupStatus.REFUSED, 0, "invite only").encode()
                )
                return
            gid = ids.setdefault(join.name, len(ids) + 1)
            conn.send(
                Reply(join.request_id, JOIN, 0, gid, join.name.decode()).encode(),
                group_relay(0, gid, "STR", "last value"),
            )
        elif kind == Kind.LEAVE:
            leave = Leave.parse(body)
            conn.send(Reply(leave.request_id, LEAVE, 0, leave.group_id, "").encode())
        elif kind == Kind.MEMBERS:
            ask = Members.parse(body)
            everyone = list(range(1, 2500))
            page = [i for i in everyone if i > ask.after][:1024]
            more = page[-1] != everyone[-1]
            conn.send(MemberList(ask.request_id, ask.group_id, more, tuple(page)).encode())
        elif kind == Kind.GROUP_MULTICAST:
            gid = int.from_bytes(body[:4], "big")
            conn.send(GROUP_HEAD.pack(len(body) + 5, Kind.GROUP_RELAY, 99, gid) + body[4:])

    return handle


def kinds(conn: Conn) -> list[int]:
    return [f[0] for f in conn.received]


async def test_join_multicast_leave_over_a_socket() -> None:
    async with FakeServer(member_server()) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            assert client.groups == frozenset()
            assert await client.join("lobby", presence=True) == 1
            assert client.groups == {"lobby"}
            # The kept last value comes right after the OK REPLY, with the group's name.
            msg = await client.receive(timeout=5)
            assert msg == Message(0, REGISTRY["STR"], "last value", Kind.GROUP_RELAY, "lobby")
            await client.multicast(INT, 42, group="lobby")
            msg = await client.receive(timeout=5)
            assert msg == Message(99, INT, 42, Kind.GROUP_RELAY, "lobby")
            (conn,) = server.conns
            assert Join.parse(conn.received[1][1:]) == Join(1, FLAG_PRESENCE, b"lobby")
            (sent,) = [f for f in conn.received if f[0] == Kind.GROUP_MULTICAST]
            assert b"\x16" + sent[1:] == b"\x16\0\0\0\1" + encode("INT", 42)[0][5:]
            assert await client.join("lobby") == 1  # again: idempotent
            await client.leave("lobby")
            assert client.groups == frozenset()
            with pytest.raises(InvalidStateError, match="join it first"):
                await client.multicast(INT, 1, group="lobby")
            with pytest.raises(InvalidStateError):
                await client.leave("lobby")
            with pytest.raises(InvalidStateError):
                await client.members("lobby")
            before = len(conn.received)
            for bad in ("", " ", "a\nb", "x" * 256, "\ud800"):
                with pytest.raises(ValueError, match="invalid group name"):
                    await client.join(bad)
            await client.multicast(INT, 7)  # today's multicast still works
            await asyncio.sleep(20 * MS)
            assert kinds(conn)[before:] == [Kind.MULTICAST]  # no JOIN of a bad name was sent


async def test_a_refused_join_raises_group_refused() -> None:
    async with FakeServer(member_server(refuse=("vip",))) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            with pytest.raises(GroupRefused) as info:
                await client.join("vip")
            err = info.value
            assert err.status is GroupStatus.REFUSED and err.reason == "invite only"
            assert err.group == "vip" and "invite only" in str(err)
            assert isinstance(err, trame_async.TrameError)
            assert client.groups == frozenset() and not client.closed


async def test_members_follows_the_pages() -> None:
    async with FakeServer(member_server()) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            await client.join("big")
            assert await client.members("big") == list(range(1, 2500))
            asked = [
                Members.parse(f[1:]).after for f in server.conns[0].received if f[0] == Kind.MEMBERS
            ]
            assert asked == [0, 1024, 2048]


async def test_presence_events_by_queue_and_by_callback() -> None:
    def handle(conn: Conn, kind: int, body: bytes) -> None:
        if kind == Kind.JOIN:
            join = Join.parse(body)
            conn.send(
                PresenceNotice(3, 1, 8, 0).encode(),  # before the REPLY: not mapped, dropped
                Reply(join.request_id, JOIN, 0, 3, join.name.decode()).encode(),
                PresenceNotice(3, 1, 8, 0).encode(),
                PresenceNotice(3, 2, 8, int(DisconnectReason.HEARTBEAT_TIMEOUT)).encode(),
                PresenceNotice(3, 2, 9, 0).encode(),
            )
        elif kind == Kind.LEAVE:
            # Someone left just before this client: both in one write, so in one read.
            leave = Leave.parse(body)
            conn.send(
                PresenceNotice(3, 2, 7, 0).encode(),
                Reply(leave.request_id, LEAVE, 0, leave.group_id, "room").encode(),
            )

    expected = [
        Presence("room", 8, True, None),
        Presence("room", 8, False, DisconnectReason.HEARTBEAT_TIMEOUT),
        Presence("room", 9, False, None),
    ]
    async with FakeServer(handle) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            await client.join("room", presence=True)
            got = [await client.next_presence(timeout=5) for _ in range(3)]
            assert got == expected
            with pytest.raises(TimeoutError):
                await client.next_presence(timeout=20 * MS)
            # A PRESENCE read with this client's own LEAVE answer still names its group.
            await client.leave("room")
            assert await client.next_presence(timeout=5) == Presence("room", 7, False, None)
        seen: list[Presence] = []
        async with trame_async.connect("127.0.0.1", server.port, on_presence=seen.append) as client:
            await client.join("room", presence=True)
            for _ in range(200):
                if len(seen) == 3:
                    break
                await asyncio.sleep(5 * MS)
            assert seen == expected and not client._presence  # the callback instead of the queue
            with pytest.raises(TypeError, match="plain function"):

                async def coro(event: Presence) -> None: ...

                client.on_presence = coro


async def test_pending_requests_fail_with_connection_closed_when_the_connection_ends() -> None:
    def handle(conn: Conn, kind: int, body: bytes) -> None:
        if kind == Kind.JOIN:
            conn.writer.close()  # no answer

    async with FakeServer(handle) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.join("lobby"), 5)
        with pytest.raises(ConnectionClosed):
            await client.join("lobby")
        await client.close()


async def test_a_reconnecting_client_joins_its_groups_again() -> None:
    handle = member_server()
    first = asyncio.Event()

    def dropping(conn: Conn, kind: int, body: bytes) -> None:
        handle(conn, kind, body)
        if kind == Kind.DATA and not first.is_set():
            first.set()
            conn.writer.transport.abort()

    async with FakeServer(dropping) as server:
        backoff = Backoff(initial=MS, maximum=5 * MS)
        async with trame_async.connect("127.0.0.1", server.port, reconnect=backoff) as client:
            await client.join("a", presence=True)
            await client.join("b")
            await client.leave("b")
            await client.send_data(INT, 1)  # the server drops the connection on it
            await first.wait()
            for _ in range(400):
                if client.reconnects:
                    break
                await asyncio.sleep(5 * MS)
            await client.wait_connected(timeout=5)
            assert client.reconnects == 1 and client.groups == {"a"}
            second = server.conns[1]
            joins = [Join.parse(f[1:]) for f in second.received if f[0] == Kind.JOIN]
            assert joins == [Join(1, FLAG_PRESENCE, b"a")]
            await client.multicast(INT, 5, group="a")
            got = []
            while len(got) < 2 or got[-1].trame != INT:
                got.append(await client.receive(timeout=5))
            assert got[-1] == Message(99, INT, 5, Kind.GROUP_RELAY, "a")


async def test_a_group_multicast_refused_by_the_server_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    members = member_server()

    def handle(conn: Conn, kind: int, body: bytes) -> None:
        if kind != Kind.GROUP_MULTICAST:
            members(conn, kind, body)
            return
        group_id = int.from_bytes(body[:4], "big")
        conn.send(Reply(0, 3, GroupStatus.NOT_MEMBER, group_id, "not a member").encode())

    async with FakeServer(handle) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            await client.join("g")
            await client.multicast(INT, 1, group="g")
            with contextlib.suppress(TimeoutError):
                while True:
                    await client.receive(timeout=50 * MS)
            assert not client.closed
            assert "refused a multicast to group id 1" in caplog.text
