"""Servers joined into one relay through real NATS: all-clients multicasts, groups, presence,
last values and ids across nodes (tests/cluster_helpers.py starts the nodes)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from cluster_helpers import cluster_nodes
from helpers import eventually, receive_n
from nats_helpers import MS, nats_server

import trame_async
from trame_async import INT
from trame_async.cluster import NODE_ID_BITS

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
