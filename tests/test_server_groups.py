"""Groups on the server, over real sockets, speaking the frames by hand (tests/robust_helpers.RawConn).

Each test reads like a timeline of what each raw client sends and receives.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import eventually, running
from robust_helpers import RawConn

import trame_async
from trame_async import INT, REGISTRY, DisconnectReason, Kind
from trame_async.codes import GroupOp, GroupStatus, PresenceEvent
from trame_async.groups import Accept, Refuse
from trame_async.wire import (
    FLAG_PRESENCE,
    SENDER,
    Join,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    group_multicast,
)


class Peer:
    """A raw client: sends frames, reads the next frame of the kinds it is waiting for."""

    def __init__(self, conn: RawConn, client_id: int) -> None:
        self.conn = conn
        self.id = client_id
        self._rid = 0

    @classmethod
    async def connect(cls, stack: contextlib.AsyncExitStack, port: int) -> Peer:
        conn = await RawConn.connect(port)
        stack.callback(conn.close)
        return cls(conn, await conn.handshake())

    async def next(self, *kinds: int, timeout: float = 5.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            for _ in range(10_000):
                kind, body = await self.conn.next_frame()
                if kind in kinds:
                    return kind, body
                assert kind in (Kind.PING,), f"unexpected kind {kind:#x}"
        raise AssertionError("unreachable")

    async def reply(self) -> Reply:
        return Reply.parse((await self.next(Kind.REPLY))[1])

    async def join(self, name: str | bytes, presence: bool = False) -> Reply:
        self._rid += 1
        raw = name.encode() if isinstance(name, str) else name
        await self.conn.send(Join(self._rid, FLAG_PRESENCE if presence else 0, raw).encode())
        reply = await self.reply()
        assert reply.request_id == self._rid and reply.op == GroupOp.JOIN
        return reply

    async def leave(self, group_id: int) -> Reply:
        self._rid += 1
        await self.conn.send(Leave(self._rid, group_id).encode())
        reply = await self.reply()
        assert reply.request_id == self._rid and reply.op == GroupOp.LEAVE
        return reply

    async def send_group(self, group_id: int, value: int) -> None:
        await self.conn.send(group_multicast(group_id, REGISTRY.encode(INT, value, Kind.MULTICAST)))

    async def send_all(self, value: int) -> None:
        await self.conn.send(REGISTRY.encode(INT, value, Kind.MULTICAST))

    async def relayed(self) -> tuple[int, int | None, int]:
        """The next RELAY or GROUP_RELAY: (sender, group id or None, INT value)."""
        kind, body = await self.next(Kind.RELAY, Kind.GROUP_RELAY)
        sender = SENDER.unpack_from(body)[0]
        if kind == Kind.RELAY:
            return sender, None, REGISTRY.decode_frame(bytes([Kind.RELAY]) + body).value
        gid = SENDER.unpack_from(body, 4)[0]
        value = REGISTRY.decode_frame(bytes([Kind.RELAY]) + body[:4] + body[8:]).value
        return sender, gid, value

    async def presence(self) -> PresenceNotice:
        return PresenceNotice.parse((await self.next(Kind.PRESENCE))[1])


async def test_a_group_multicast_reaches_its_members_alone_encoded_once() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a, b, c, outsider = [await Peer.connect(stack, server.port) for _ in range(4)]
        gid = (await a.join("lobby")).group_id
        assert (await b.join("lobby")).group_id == gid
        assert (await c.join("lobby")).text == "lobby"
        assert server.groups == {"lobby": 3}
        await a.send_group(gid, 7)
        assert await b.relayed() == (a.id, gid, 7)
        assert await c.relayed() == (a.id, gid, 7)
        # The outsider gets nothing of it: the next thing it sees is an all-clients multicast.
        await a.send_all(8)
        assert await outsider.relayed() == (a.id, None, 8)
        assert await b.relayed() == (a.id, None, 8)


async def test_joining_is_idempotent_and_leaving_forgets_an_empty_group() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a = await Peer.connect(stack, server.port)
        first = await a.join("g")
        again = await a.join("g", presence=True)
        assert (first.status, again.status, again.group_id) == (0, 0, first.group_id)
        assert (await a.leave(first.group_id)).status == GroupStatus.OK
        assert server.groups == {}
        assert (await a.leave(first.group_id)).status == GroupStatus.NOT_MEMBER


@pytest.mark.parametrize(
    "raw", [b"", b"x" * 65, b"\xff", b"a\x00b", b"  ", b"line\nbreak"], ids=repr
)
async def test_bad_names_get_bad_name_and_the_connection_is_kept(raw: bytes) -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a, b = [await Peer.connect(stack, server.port) for _ in range(2)]
        reply = await a.join(raw)
        assert reply.status == GroupStatus.BAD_NAME and reply.text
        await a.send_all(1)
        assert await b.relayed() == (a.id, None, 1)


async def test_a_multicast_to_a_group_not_joined_is_refused_and_the_connection_kept() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a, b = [await Peer.connect(stack, server.port) for _ in range(2)]
        gid = (await b.join("private")).group_id
        await a.send_group(gid, 5)
        reply = await a.reply()
        assert (reply.request_id, reply.op, reply.status) == (0, GroupOp.MULTICAST, 1)
        await a.send_all(6)
        assert await b.relayed() == (a.id, None, 6)  # the refused frame never reached b


async def test_limits_per_client_and_per_server() -> None:
    async with (
        running(max_groups_per_client=2, max_groups=3) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        a, b = [await Peer.connect(stack, server.port) for _ in range(2)]
        assert (await a.join("1")).status == 0
        assert (await a.join("2")).status == 0
        assert (await a.join("3")).status == GroupStatus.TOO_MANY_GROUPS
        assert (await b.join("3")).status == 0
        assert (await b.join("4")).status == GroupStatus.SERVER_GROUP_LIMIT
        assert (await b.join("1")).status == 0  # an existing group is fine


async def test_a_join_flood_of_a_million_names_keeps_memory_bounded() -> None:
    """Distinct names cost nothing beyond the limits: pipelined joins past them are refused."""
    async with (
        running(max_groups_per_client=8) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        a = await Peer.connect(stack, server.port)
        n = 20_000  # as many as the test affords; each is refused in O(1) past the 8th
        await a.conn.send(b"".join(Join(i + 1, 0, f"g{i}".encode()).encode() for i in range(n)))
        statuses = [(await a.reply()).status for _ in range(n)]
        assert statuses[:8] == [0] * 8
        assert set(statuses[8:]) == {GroupStatus.TOO_MANY_GROUPS}
        assert len(server.groups) == 8


async def test_presence_tells_members_who_joins_and_leaves_and_why() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        watcher, a, b = [await Peer.connect(stack, server.port) for _ in range(3)]
        gid = (await watcher.join("room", presence=True)).group_id
        await a.join("room")
        assert await watcher.presence() == PresenceNotice(gid, PresenceEvent.JOINED, a.id, 0)
        await b.join("room")
        assert (await watcher.presence()).client_id == b.id
        await a.leave(gid)
        assert await watcher.presence() == PresenceNotice(gid, PresenceEvent.LEFT, a.id, 0)
        b.conn.close()  # b vanishes: LEFT with its disconnect reason
        left = await watcher.presence()
        assert (left.event, left.client_id) == (PresenceEvent.LEFT, b.id)
        assert left.reason == DisconnectReason.CONNECTION_LOST
        assert [c.id for c in server.members("room")] == [watcher.id]


async def test_members_lists_ids_in_pages_and_refuses_non_members() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        peers = [await Peer.connect(stack, server.port) for _ in range(5)]
        gid = 0
        for p in peers:
            gid = (await p.join("g")).group_id
        await peers[0].conn.send(Members(9, gid, 0).encode())
        listing = MemberList.parse((await peers[0].next(Kind.MEMBER_LIST))[1])
        assert listing == MemberList(9, gid, False, tuple(sorted(p.id for p in peers)))
        outsider = await Peer.connect(stack, server.port)
        await outsider.conn.send(Members(1, gid, 0).encode())
        reply = await outsider.reply()
        assert (reply.op, reply.status) == (GroupOp.MEMBERS, GroupStatus.NOT_MEMBER)


async def test_presence_on_a_huge_group_is_refused_with_a_clear_status() -> None:
    async with (
        running(max_presence_members=2) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        a, b, c = [await Peer.connect(stack, server.port) for _ in range(3)]
        await a.join("big")
        await b.join("big")
        assert (await c.join("big", presence=True)).status == GroupStatus.NOT_ALLOWED
        gid = (await c.join("big")).group_id  # without presence: fine
        await c.conn.send(Members(1, gid, 0).encode())
        assert (await c.reply()).status == GroupStatus.NOT_ALLOWED


async def test_a_late_joiner_gets_the_last_values_before_any_live_frame() -> None:
    async with (
        running(last_value_groups=("zone/*",)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        r1, r2, dash = [await Peer.connect(stack, server.port) for _ in range(3)]
        gid = (await r1.join("zone/1")).group_id
        await r2.join("zone/1")
        for v in (1, 2, 3):
            await r1.send_group(gid, v)
            assert await r2.relayed() == (r1.id, gid, v)
        await r2.send_group(gid, 20)
        assert await r1.relayed() == (r2.id, gid, 20)
        # The dashboard joins: its REPLY, then each robot's last value, then live frames.
        await dash.conn.send(Join(1, 0, b"zone/1").encode())
        await r1.send_group(gid, 4)
        assert (await dash.reply()).status == 0
        got = [await dash.relayed() for _ in range(3)]
        assert got == [(r1.id, gid, 3), (r2.id, gid, 20), (r1.id, gid, 4)]
        # A sender's entries go when it leaves.
        assert await r2.relayed() == (r1.id, gid, 4)
        await r2.leave(gid)
        late = await Peer.connect(stack, server.port)
        await late.join("zone/1")
        assert await late.relayed() == (r1.id, gid, 4)
        await r1.send_group(gid, 5)
        assert await late.relayed() == (r1.id, gid, 5)


async def test_on_join_accepts_refuses_with_a_reason_and_can_turn_on_last_values() -> None:
    async def on_join(client: trame_async.RemoteClient, group: str) -> object:
        await asyncio.sleep(0)
        if group == "vip":
            return Refuse("members only")
        if group == "state":
            return Accept(last_values=True)
        return group != "closed"

    async with running(on_join=on_join) as server, contextlib.AsyncExitStack() as stack:
        a, b = [await Peer.connect(stack, server.port) for _ in range(2)]
        refused = await a.join("vip")
        assert (refused.status, refused.text) == (GroupStatus.REFUSED, "members only")
        assert (await a.join("closed")).status == GroupStatus.REFUSED
        gid = (await a.join("state")).group_id
        await a.send_group(gid, 42)
        await b.join("state")
        assert await b.relayed() == (a.id, gid, 42)


async def test_the_server_places_clients_and_multicasts_to_a_group() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a, b = [await Peer.connect(stack, server.port) for _ in range(2)]
        await eventually(lambda: len(server.clients) == 2, what="both connected")
        ra = next(c for c in server.clients if c.id == a.id)
        gid = server.join(ra, "table 1")
        note = await a.reply()
        assert (note.request_id, note.op, note.group_id, note.text) == (0, 1, gid, "table 1")
        assert ra.groups == frozenset({"table 1"})
        server.multicast(INT, 9, group="table 1")
        assert await a.relayed() == (0, gid, 9)
        with pytest.raises(ValueError, match="not a valid group name"):
            server.join(ra, "")
        assert server.leave(ra, "table 1")
        assert (await a.reply()).op == GroupOp.LEAVE
        server.multicast(INT, 10)
        assert await a.relayed() == (0, None, 10)
        assert await b.relayed() == (0, None, 10)


async def test_a_client_that_never_joins_sees_exactly_todays_stream() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        plain, a, b = [await Peer.connect(stack, server.port) for _ in range(3)]
        gid = (await a.join("g", presence=True)).group_id
        await b.join("g")
        await a.send_group(gid, 1)
        assert await b.relayed() == (a.id, gid, 1)
        await b.leave(gid)
        await a.send_all(2)
        kind, _ = await plain.next(Kind.RELAY, Kind.GROUP_RELAY, Kind.REPLY, Kind.PRESENCE)
        assert kind == Kind.RELAY  # the first and only thing it got
        assert plain.conn.frames == []


async def test_a_watcher_cut_by_a_presence_notice_does_not_break_the_join() -> None:
    """Before: the cut changed the presence set while it was iterated (RuntimeError): the
    joiner got INTERNAL_ERROR and the other watchers no JOINED."""
    async with running(max_queue_bytes=1 << 20) as server, contextlib.AsyncExitStack() as stack:
        w1, w2, joiner = [await Peer.connect(stack, server.port) for _ in range(3)]
        gid = (await w1.join("room", presence=True)).group_id
        await w2.join("room", presence=True)
        assert (await w1.presence()).client_id == w2.id
        (remote,) = [c for c in server.clients if c.id == w1.id]
        # w1 is as good as over its budget: the next frame queued for it cuts it.
        remote.outbox.push(b"\0" * (1 << 20))
        remote.outbox.push(b"\0" * 10)
        remote.outbox.limit = -1
        reply = await joiner.join("room")
        assert reply.status == 0 and reply.group_id == gid
        # The cut watcher's LEFT may come before or after the joiner's JOINED.
        seen = {((n := await w2.presence()).event, n.client_id) for _ in range(2)}
        assert seen == {(PresenceEvent.JOINED, joiner.id), (PresenceEvent.LEFT, w1.id)}
        await eventually(lambda: w1.id not in [c.id for c in server.clients], 5.0, what="cut")
        assert joiner.id in [c.id for c in server.clients]


async def test_a_members_join_is_answered_ok_whatever_on_join_would_say() -> None:
    async with (
        running(on_join=lambda c, g: Refuse("full") if len(c.groups) == 0 else None) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        a = await Peer.connect(stack, server.port)
        (remote,) = server.clients
        gid = server.join(remote, "room")
        await a.reply()  # the server's placement, announced
        again = await a.join("room", presence=True)
        assert (again.status, again.group_id) == (0, gid)


async def test_accept_without_last_values_follows_the_configuration() -> None:
    async with (
        running(last_value_groups=("zone-*",), on_join=lambda c, g: Accept()) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        a, late = [await Peer.connect(stack, server.port) for _ in range(2)]
        gid = (await a.join("zone-1")).group_id
        await a.send_group(gid, 42)
        await eventually(lambda: bool(server._groups.by_name["zone-1"].last), 5.0, what="kept")
        await late.join("zone-1")
        assert await late.relayed() == (a.id, gid, 42)


async def test_a_verdict_that_cannot_be_sent_is_a_refusal_not_silence() -> None:
    async def on_join(client: trame_async.RemoteClient, group: str) -> object:
        await asyncio.sleep(0)
        return Refuse(KeyError("no such room"))  # type: ignore[arg-type]

    async with running(on_join=on_join) as server, contextlib.AsyncExitStack() as stack:
        a = await Peer.connect(stack, server.port)
        reply = await a.join("x")
        assert reply.status == GroupStatus.REFUSED and "no such room" in reply.text
