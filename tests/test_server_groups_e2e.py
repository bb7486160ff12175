"""Groups end to end: the real client against the real server, over 127.0.0.1."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from helpers import eventually, running

import trame_async
from trame_async import BYT, INT, POS, STR, DisconnectReason, GroupRefused, Position
from trame_async.codes import GroupStatus
from trame_async.groups import Refuse


async def clients(
    stack: contextlib.AsyncExitStack, port: int, n: int, **kw: Any
) -> list[trame_async.Client]:
    return [
        await stack.enter_async_context(trame_async.connect("127.0.0.1", port, **kw))
        for _ in range(n)
    ]


async def test_join_multicast_to_a_group_and_leave() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        a, b, outsider = await clients(stack, server.port, 3)
        gid = await a.join("lobby")
        assert await b.join("lobby") == gid
        assert a.groups == frozenset({"lobby"})
        await a.multicast(POS, Position(1.0, 2.0), group="lobby")
        got = await b.receive(timeout=5)
        assert (got.sender, got.value, got.group) == (a.id, Position(1.0, 2.0), "lobby")
        await a.multicast(INT, 5)  # the all-clients multicast, as ever
        got = await outsider.receive(timeout=5)
        assert (got.value, got.group) == (5, None)
        assert (await b.receive(timeout=5)).group is None
        await b.leave("lobby")
        assert b.groups == frozenset()
        await a.multicast(INT, 6, group="lobby")
        await a.multicast(INT, 7)
        assert (await b.receive(timeout=5)).value == 7  # nothing of the group came first


async def test_a_refused_join_raises_with_the_servers_reason() -> None:
    async with (
        running(on_join=lambda c, g: Refuse("invitation only") if g == "vip" else None) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        (a,) = await clients(stack, server.port, 1)
        with pytest.raises(GroupRefused) as info:
            await a.join("vip")
        assert info.value.status is GroupStatus.REFUSED
        assert "invitation only" in str(info.value)
        assert await a.join("open") > 0  # the connection is kept
        with pytest.raises(ValueError):
            await a.join("bad\x00name")


async def test_presence_events_and_member_lists() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        watcher, a, b = await clients(stack, server.port, 3)
        await watcher.join("room", presence=True)
        await a.join("room")
        event = await watcher.next_presence(timeout=5)
        assert (event.group, event.client_id, event.joined) == ("room", a.id, True)
        await b.join("room")
        assert (await watcher.next_presence(timeout=5)).client_id == b.id
        assert await a.members("room") == sorted([watcher.id, a.id, b.id])
        await b.close()
        gone = await watcher.next_presence(timeout=5)
        assert (gone.client_id, gone.joined) == (b.id, False)
        assert gone.reason is DisconnectReason.GOODBYE


async def test_a_late_joiner_sees_the_last_values_then_the_live_stream() -> None:
    async with (
        running(last_value_groups=("zone/*",)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        robot1, robot2, dashboard = await clients(stack, server.port, 3)
        await robot1.join("zone/1")
        await robot2.join("zone/1")
        for x in range(3):
            await robot1.multicast(POS, Position(float(x), 0.0), group="zone/1")
        await robot2.multicast(POS, Position(9.0, 9.0), group="zone/1")
        await eventually(
            lambda: server._groups.by_name["zone/1"].last_bytes > 0, 5.0, what="last values"
        )
        await eventually(
            lambda: len(server._groups.by_name["zone/1"].last or ()) == 2, 5.0, what="both"
        )
        await dashboard.join("zone/1")
        await robot1.multicast(POS, Position(5.0, 5.0), group="zone/1")
        seen = [await dashboard.receive(timeout=5) for _ in range(3)]
        assert [(m.sender, m.value) for m in seen] == [
            (robot1.id, Position(2.0, 0.0)),
            (robot2.id, Position(9.0, 9.0)),
            (robot1.id, Position(5.0, 5.0)),
        ]


async def test_last_values_past_half_a_joiners_budget_are_left_out_and_counted() -> None:
    """20 senders' last values of 4 KiB (80 KiB) for a late joiner with a 64 KiB budget: the
    newest that fit in half of it are sent, the others counted; the joiner is not cut."""
    async with (
        running(
            last_value_groups=("zone/*",), max_frame_size=16 << 10, max_queue_bytes=64 << 10
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        *robots, dashboard = await clients(stack, server.port, 21)
        for robot in robots:
            await robot.join("zone/1")
        group = server._groups.by_name["zone/1"]
        for i, robot in enumerate(robots):
            # One at a time: the robots, members too, are not flooded past their own budget.
            await robot.multicast(BYT, bytes([i]) * 4096, group="zone/1")
            await eventually(lambda n=i + 1: len(group.last or ()) == n, 5.0, what="kept")
        await dashboard.join("zone/1")
        await robots[0].multicast(BYT, b"live", group="zone/1")
        got = []
        while not got or got[-1] != b"live":
            got.append((await dashboard.receive(timeout=5)).value)
        sent = len(got) - 1
        assert 0 < sent < 20 and sent * 4096 <= 32 << 10
        # The newest ones, in the order they were kept: the last senders.
        assert got[:-1] == [bytes([i]) * 4096 for i in range(20 - sent, 20)]
        assert server.stats()["last_values_skipped"] == 20 - sent
        assert dashboard.connected


async def test_last_values_of_all_groups_share_one_bound() -> None:
    """Two groups' last values over last_values_total_max_bytes: the older one goes, counted;
    a late joiner of its group then gets no stale value, only what comes next."""
    with pytest.raises(ValueError, match="last_values_total_max_bytes"):
        trame_async.ServerConfig(last_values_max_bytes=2048, last_values_total_max_bytes=1024)
    async with (
        running(
            last_value_groups=("g*",),
            last_values_max_bytes=8 << 10,
            last_values_total_max_bytes=8 << 10,
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        robot, late = await clients(stack, server.port, 2)
        await robot.join("g1")
        await robot.join("g2")
        await robot.multicast(BYT, b"1" * 6000, group="g1")
        await eventually(lambda: server.stats()["last_values_bytes"] > 0, 5.0, what="kept")
        await robot.multicast(BYT, b"2" * 6000, group="g2")
        await eventually(lambda: server.stats()["last_values_dropped"] == 1, 5.0, what="evicted")
        assert 6000 < server.stats()["last_values_bytes"] <= 8 << 10
        await late.join("g1")
        await robot.multicast(BYT, b"live", group="g1")
        assert (await late.receive(timeout=5)).value == b"live"


async def test_a_sender_taken_out_by_on_multicast_relays_nothing_and_leaves_no_value() -> None:
    """on_multicast takes the sender out of the group and says keep: the frame is not relayed
    (the sender is no longer a member) and leaves no last value behind, even when the sender
    was the group's last member (the group is gone)."""
    servers: list[trame_async.Server] = []

    def on_multicast(client: Any, message: trame_async.Message) -> bool:
        if message.group is not None and message.value == 13:
            servers[0].leave(client, message.group)
        return True

    async with (
        running(last_value_groups=("zone/*",), on_multicast=on_multicast) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        servers.append(server)
        alone, robot, watcher, listener = await clients(stack, server.port, 4)
        await alone.join("zone/alone")
        await alone.multicast(INT, 13, group="zone/alone")
        await eventually(lambda: "zone/alone" not in server._groups.by_name, 5.0, what="gone")
        assert server.stats()["last_values_bytes"] == 0
        for member in (robot, watcher, listener):
            await member.join("zone/1")
        await robot.multicast(INT, 13, group="zone/1")
        await eventually(lambda: robot.groups == frozenset(), 5.0, what="robot out")
        await watcher.multicast(INT, 1, group="zone/1")  # after robot's 13, had it been relayed
        got = await listener.receive(timeout=5)
        assert (got.sender, got.value) == (watcher.id, 1)
        group = server._groups.by_name["zone/1"]
        assert group.last is not None and [k[0] for k in group.last] == [watcher.id]
        assert server.stats()["last_values_bytes"] == group.last_bytes


async def test_the_server_places_a_client_and_it_learns_the_name() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        (a,) = await clients(stack, server.port, 1)
        (remote,) = server.clients
        server.join(remote, "table 3")
        await eventually(lambda: a.groups == frozenset({"table 3"}), 5.0, what="placed")
        server.multicast(STR, "welcome", group="table 3")
        got = await a.receive(timeout=5)
        assert (got.sender, got.value, got.group) == (0, "welcome", "table 3")


async def test_a_multicast_to_a_group_not_joined_is_refused_before_sending() -> None:
    async with running() as server, contextlib.AsyncExitStack() as stack:
        (a,) = await clients(stack, server.port, 1)
        with pytest.raises(trame_async.InvalidStateError):
            await a.multicast(INT, 1, group="nowhere")


async def test_a_reconnecting_client_rejoins_its_groups() -> None:
    async with running() as server:
        port = server.port
        async with (
            trame_async.connect("127.0.0.1", port) as member,
            trame_async.connect(
                "127.0.0.1", port, reconnect=trame_async.Backoff(initial=0.01, maximum=0.05)
            ) as roamer,
        ):
            await member.join("g")
            await roamer.join("g", presence=True)
            old_id = roamer.id
            for remote in list(server.clients):
                if remote.id == old_id:
                    remote._transport.abort()  # the network drops it
            await eventually(
                lambda: (
                    roamer.connected
                    and roamer.id != old_id
                    and roamer.groups == frozenset({"g"})
                    and any(c.id == roamer.id and c.groups for c in server.clients)
                ),
                5.0,
                what="rejoined",
            )
            await member.multicast(INT, 3, group="g")
            got = await roamer.receive(timeout=5)
            assert (got.value, got.group) == (3, "g")
