"""Servers joined into one relay through real NATS: all-clients multicasts, groups, presence,
last values and ids across nodes (tests/cluster_helpers.py starts the nodes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import cluster_config, cluster_nodes
from helpers import eventually, receive_n
from hypothesis import given
from hypothesis import strategies as st
from nats_helpers import MS, NatsServer, nats_server

import trame_async
from trame_async import BYT, INT, REGISTRY, PresenceEvent
from trame_async.cluster import NODE_ID_BITS, ClusterConfig, encode
from trame_async.cluster.node import _parts, _uncovered, group_token
from trame_async.wire import Kind, PresenceNotice

pytestmark = pytest.mark.timeout(60)
STEP = 5_000 * MS


async def test_a_multicast_reaches_the_clients_of_every_node(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2) as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        assert alice.id >> NODE_ID_BITS == 1 and bob.id >> NODE_ID_BITS == 2
        await alice.multicast(INT, 7)
        (got,) = await receive_n(bob, 1, STEP)
        assert (got.sender, got.value) == (alice.id, 7)
        await bob.multicast(INT, 8)
        (got,) = await receive_n(alice, 1, STEP)
        assert (got.sender, got.value) == (bob.id, 8)
        # Node a started alone: NATS's "no responders" answer to its discovery is not malformed.
        assert a.stats()["cluster"]["malformed_in"] == b.stats()["cluster"]["malformed_in"] == 0


async def test_groups_presence_and_last_values_span_nodes(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, last_value_groups=("state.*",)) as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", b.port) as bob,
        trame_async.connect("127.0.0.1", b.port) as carol,
    ):
        await alice.join("state.room")
        await alice.multicast(INT, 41, group="state.room")
        await alice.multicast(INT, 42, group="state.room")
        # bob is the room's first member on node b: he gets alice's last value first.
        await bob.join("state.room", presence=True)
        (got,) = await receive_n(bob, 1, STEP)
        assert (got.sender, got.value, got.group) == (alice.id, 42, "state.room")
        assert sorted(await bob.members("state.room")) == sorted([alice.id, bob.id])
        await carol.join("state.room")
        (got,) = await receive_n(carol, 1, STEP)  # the last value, kept on node b too
        assert (got.sender, got.value) == (alice.id, 42)
        presence = await bob.next_presence(STEP)
        assert (presence.client_id, presence.joined) == (carol.id, True)
        await alice.multicast(INT, 43, group="state.room")
        for member in (bob, carol):
            (got,) = await receive_n(member, 1, STEP)
            assert (got.sender, got.value) == (alice.id, 43)
        await alice.leave("state.room")
        presence = await bob.next_presence(STEP)
        assert (presence.client_id, presence.joined) == (alice.id, False)
        await eventually(lambda: alice.id not in b._groups.by_name["state.room"].remote, STEP)


async def test_server_multicasts_reach_every_node_and_remote_group_members(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2) as (a, b),
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        await bob.join("far")
        await eventually(lambda: a.stats()["cluster"]["nodes"] == 1, STEP)
        a.multicast(INT, 1)
        a.multicast(INT, 2, group="far")  # no member on node a: only node b delivers it
        got = await receive_n(bob, 2, STEP)
        assert [(m.sender, m.value, m.group) for m in got] == [(0, 1, None), (0, 2, "far")]


async def test_remote_last_values_past_half_a_members_budget_are_left_out(tmp_path: Path) -> None:
    """A member placed on node b (server.join) gets node a's last values when the snapshot comes:
    at most half of its 64 KiB budget of them, the rest counted; it is not cut."""
    limits = {"last_value_groups": ("zone/*",), "max_frame_size": 16 << 10}
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, max_queue_bytes=64 << 10, **limits) as (a, b),
        contextlib.AsyncExitStack() as stack,
    ):
        robots = [
            await stack.enter_async_context(trame_async.connect("127.0.0.1", a.port))
            for _ in range(20)
        ]
        dashboard = await stack.enter_async_context(trame_async.connect("127.0.0.1", b.port))
        for robot in robots:
            await robot.join("zone/1")
        group = a._groups.by_name["zone/1"]
        for i, robot in enumerate(robots):
            await robot.multicast(BYT, bytes([i]) * 4096, group="zone/1")
            await eventually(lambda n=i + 1: len(group.last or ()) == n, STEP)
        await eventually(lambda: b.stats()["cluster"]["nodes"] == 1, STEP)
        (remote,) = b.clients
        b.join(remote, "zone/1")
        await eventually(lambda: b.stats()["last_values_skipped"] > 0, STEP)
        await robots[0].multicast(BYT, b"live", group="zone/1")
        got = []
        while not got or got[-1] != b"live":
            got.append((await dashboard.receive(timeout=5)).value)
        sent = len(got) - 1
        assert 0 < sent < 20 and sent * 4096 <= 32 << 10, sent
        # The newest ones, in the order they were kept: the last senders' values.
        assert got[:-1] == [bytes([i]) * 4096 for i in range(20 - sent, 20)]
        assert b.stats()["last_values_skipped"] == 20 - sent
        assert dashboard.connected


async def test_nodes_without_an_index_pick_distinct_ones(tmp_path: Path) -> None:
    async with nats_server(tmp_path) as nats:
        config = cluster_config([nats.url], "auto", node_index=None)
        async with contextlib.AsyncExitStack() as stack:
            servers = []
            for _ in range(3):
                servers.append(
                    await stack.enter_async_context(
                        trame_async.serve("127.0.0.1", 0, cluster=config)
                    )
                )
            indexes = {s.cluster.index for s in servers if s.cluster is not None}
            assert len(indexes) == 3 and all(0 <= i < 1024 for i in indexes)
            async with trame_async.connect("127.0.0.1", servers[2].port) as c:
                assert c.id >> NODE_ID_BITS == servers[2].cluster.index  # type: ignore[union-attr]


async def test_garbage_on_the_cluster_subjects_is_counted_and_harms_no_one(
    tmp_path: Path,
) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, name="junk") as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        await bob.join("room")
        rogue = await nats_client(nats.url)
        try:
            for payload in (b"", b"TRCL\x01", b"not an envelope at all" * 3, b"\xff" * 40):
                await rogue.publish("trame.junk.all", payload)
                await rogue.publish(f"trame.junk.g.{group_token('room')}", payload)
            await rogue.publish("trame.junk.ctl.hb", b"{not json")
            await rogue.flush()
        finally:
            await rogue.close()
        await eventually(lambda: b.stats()["cluster"]["malformed_in"] >= 9, STEP)
        await alice.multicast(INT, 3)
        (got,) = await receive_n(bob, 1, STEP)
        assert (got.sender, got.value) == (alice.id, 3)


async def test_gaps_and_tail_loss_from_a_node_are_counted(tmp_path: Path) -> None:
    """A hand-made node sends envelopes 0, 1 and 5 of its all-clients stream, then a heartbeat
    saying 9 were sent: 3 lost in the middle (seen at 5), 3 at the tail (seen by the heartbeat
    after next)."""
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 1, name="gaps") as (b,),
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        fake = await nats_client(nats.url)
        node, epoch = 0xFEED, 1
        try:
            beat = {"v": 1, "node": node, "index": 77, "epoch": epoch, "pos": {}}
            await fake.publish("trame.gaps.ctl.hb", json.dumps(beat).encode())
            await eventually(lambda: b.stats()["cluster"]["nodes"] == 1, STEP)
            sender = (77 << NODE_ID_BITS) | 1
            for seq in (0, 1, 5):
                relay = REGISTRY.encode(INT, seq, Kind.RELAY)
                frame = relay[:5] + sender.to_bytes(4, "big") + relay[9:]
                await fake.publish("trame.gaps.all", encode(node, epoch, seq, [frame]))
            await fake.flush()
            await receive_n(bob, 3, STEP)
            assert b.stats()["cluster"]["missed"] == 3
            beat["pos"] = {"all": [epoch, 9]}
            await fake.publish("trame.gaps.ctl.hb", json.dumps(beat).encode())
            beat["pos"] = {}
            await fake.publish("trame.gaps.ctl.hb", json.dumps(beat).encode())
            await fake.flush()
            await eventually(lambda: b.stats()["cluster"]["tail_missed"] == 3, STEP)
            assert b.stats()["cluster"]["missed"] == 6
        finally:
            await fake.close()


async def nats_client(url: str) -> Any:
    import nats

    async def quiet(err: Exception) -> None:
        pass

    return await nats.connect(url, error_cb=quiet, connect_timeout=2)


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_group_tokens_are_safe_subject_tokens_and_never_shared(x: str, y: str) -> None:
    for name in (x, y):
        token = group_token(name)
        assert token and not any(c in token for c in ".*> \t\r\n")
    assert (group_token(x) == group_token(y)) == (x == y)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"urls": ()}, "at least one NATS URL"),
        ({"name": "a.b"}, "subject token"),
        ({"node_index": 1024}, "between 0 and 1023"),
        ({"heartbeat_interval": 0}, "more than 0"),
        ({"heartbeat_interval": 1.0, "dead_after": 1.5}, "twice heartbeat_interval"),
        ({"max_envelope": 10}, "at least 1024"),
    ],
)
def test_cluster_config_refuses_what_cannot_work(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        ClusterConfig(**options)


def test_cluster_urls_parse_from_one_string() -> None:
    assert ClusterConfig(urls="nats://h1:4222, h2:4223").urls == (  # type: ignore[arg-type]
        "nats://h1:4222",
        "nats://h2:4223",
    )


async def test_a_group_on_one_node_costs_the_others_nothing(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2) as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", a.port) as anna,
    ):
        await alice.join("local")
        await anna.join("local")
        for i in range(20):
            await alice.multicast(INT, i, group="local")
        await receive_n(anna, 20, STEP)
        assert a.stats()["cluster"]["frames_out"] >= 20 or a.stats()["cluster"]["outbox_envelopes"]
        stats = b.stats()["cluster"]
        # Node b follows no group and received none of those envelopes (NATS had no interest).
        assert stats["groups_followed"] == 0 and stats["frames_in"] == 0, stats


# --- found in review: what a node does when NATS is down at start, forged input, resyncs ---


async def test_a_node_starts_and_serves_while_nats_is_down_then_joins(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path, "late")
    with socket.socket() as s:  # a port where nothing listens yet
        s.bind(("127.0.0.1", 0))
        nats.port = s.getsockname()[1]
    config = cluster_config([nats.url], "late", node_index=3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    server = await asyncio.wait_for(trame_async.start_server("127.0.0.1", 0, cluster=config), STEP)
    try:
        assert server.cluster is not None and server.cluster.state == "starting"
        assert loop.time() - began < STEP
        async with (
            trame_async.connect("127.0.0.1", server.port) as alice,
            trame_async.connect("127.0.0.1", server.port) as bob,
        ):
            await alice.multicast(INT, 1)
            (got,) = await receive_n(bob, 1, STEP)  # local delivery does not wait for NATS
            assert got.value == 1
            await nats.start()
            await eventually(lambda: server.stats()["cluster"]["state"] == "connected", STEP)
    finally:
        server.close()
        await server.wait_closed()
        await nats.stop()


async def test_forged_sequence_numbers_and_claims_are_refused(tmp_path: Path) -> None:
    """Any NATS client can publish on the subjects: a forged envelope or heartbeat with a real
    node's id and an impossible seq must not make its real envelopes look like duplicates."""
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, name="forge") as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        await alice.multicast(INT, 1)
        await receive_n(bob, 1, STEP)
        assert a.cluster is not None
        node = a.cluster.node_id
        position = a.cluster._batcher.position("all")
        assert position is not None
        rogue = await nats_client(nats.url)
        try:
            relay = REGISTRY.encode(INT, 666, Kind.RELAY)
            await rogue.publish("trame.forge.all", encode(node, position[0], 10**12, [relay]))
            await rogue.publish("trame.forge.all", encode(node, 2**63, 0, [relay]))
            beat = {
                "v": 1,
                "node": node,
                "index": 1,
                "epoch": 1,
                "pos": {"all": [position[0], 10**9]},
            }
            await rogue.publish("trame.forge.ctl.hb", json.dumps(beat).encode())
            await rogue.flush()
        finally:
            await rogue.close()
        # The two envelopes at once, the claim at the real node's next heartbeat.
        await eventually(lambda: b.stats()["cluster"]["malformed_in"] >= 3, STEP)
        for v in range(2, 6):
            await alice.multicast(INT, v)
        got = await receive_n(bob, 4, STEP)
        assert [m.value for m in got] == [2, 3, 4, 5]
        stats = b.stats()["cluster"]
        assert stats["duplicates"] == 0 and stats["missed"] == 0, stats


async def test_members_announced_by_a_node_never_heard_from_go_away(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 1, name="ghost") as (b,),
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        await bob.join("room", presence=True)
        rogue = await nats_client(nats.url)
        ghost = (55 << NODE_ID_BITS) | 7
        try:
            notice = PresenceNotice(1, PresenceEvent.JOINED, ghost, 0).encode()
            await rogue.publish(
                f"trame.ghost.g.{group_token('room')}", encode(0xBAD, 1, 0, [notice])
            )
            await rogue.flush()
        finally:
            await rogue.close()
        joined = await bob.next_presence(STEP)
        assert (joined.client_id, joined.joined) == (ghost, True)
        # The "node" never sends a heartbeat: gone after dead_after, its member with it.
        left = await bob.next_presence(STEP)
        assert (left.client_id, left.joined) == (ghost, False)
        assert await bob.members("room") == [bob.id]


async def test_a_resync_hands_out_no_last_value_twice(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, last_value_groups=("s.*",)) as (a, b),
        trame_async.connect("127.0.0.1", a.port) as alice,
        trame_async.connect("127.0.0.1", b.port) as bob,
    ):
        await alice.join("s.room")
        await alice.multicast(INT, 42, group="s.room")
        await bob.join("s.room")
        (got,) = await receive_n(bob, 1, STEP)
        assert got.value == 42
        assert b.cluster is not None
        before = b.cluster.resyncs
        b.cluster._resync(["s.room"], None)
        await eventually(lambda: b.cluster is not None and b.cluster.snapshots > before, STEP)
        await alice.multicast(INT, 43, group="s.room")
        (got,) = await receive_n(bob, 1, STEP)
        assert got.value == 43  # not 42 again


def test_envelopes_dropped_while_a_group_waits_count_as_lost_unless_covered() -> None:
    """A first-join buffer's drops, judged against the snapshot's positions (node 7's epoch 100
    covered up to seq 4): per stream life, only the envelopes past the position are lost."""
    covered = {7: (100, 5)}
    assert _uncovered({(7, 100): [2, 10, 9]}, covered) == 6  # seqs 2-4 covered, 5-10 lost
    assert _uncovered({(7, 100): [0, 4, 5]}, covered) == 0  # all covered
    assert _uncovered({(7, 99): [0, 50, 51]}, covered) == 0  # an older life: before the snapshot
    # The stream retired and reopened meanwhile: the new life is not covered at all.
    assert _uncovered({(7, 100): [5, 10, 6], (7, 101): [0, 3, 4]}, covered) == 10
    assert _uncovered({(8, 1): [0, 2, 3]}, covered) == 3  # a node the snapshot did not cover


def test_snapshot_parts_stay_under_nats_max_payload() -> None:
    members = list(range(1, 100_001))
    frames = [bytes(200_000), bytes(300_000), bytes(100)] + [bytes(1_000)] * 600
    parts, skipped = _parts(1, 2, 3, [({"name": "big", "members": members, "pos": None}, frames)])
    assert skipped == 1  # the 300,000-byte value
    assert all(len(p) < 1 << 20 for p in parts) and len(parts) > 2


async def test_cluster_takes_a_config_or_urls_and_says_so_otherwise() -> None:
    with pytest.raises(TypeError, match="ClusterConfig or NATS URLs"):
        await trame_async.start_server("127.0.0.1", 0, cluster=4222)  # type: ignore[arg-type]
