"""The cluster's failure scenarios, against real ``nats-server`` processes (issue 11).

Three trame nodes over a 2-server NATS cluster; one NATS server killed; all of NATS stopped for
2 s then back (with and without drops); a trame node SIGKILLed and one SIGSTOPped (each in a
process of its own); a deaf subscription; a late joiner under live traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import FAST, cluster_nodes, wait_meshed
from helpers import eventually, receive_n, spawn, stop_process, wait_listening
from nats_helpers import MS, nats_cluster, nats_server

import trame_async
from trame_async import INT, Backoff, Client, DisconnectReason, Message, Server
from trame_async.metrics import serve_metrics

pytestmark = pytest.mark.timeout(90)
STEP = 10_000 * MS
HERE = Path(__file__).parent
QUICK = Backoff(initial=5 * MS, factor=1.0, maximum=20 * MS)


class Inbox:
    """Everything a client receives, in order, and a way to wait for a count."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.got: list[Message] = []
        self._changed = asyncio.Event()
        client.on_message = self._on

    def _on(self, message: Message) -> None:
        self.got.append(message)
        self._changed.set()

    async def wait(self, predicate: Any, timeout: float = STEP, what: str = "") -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def values_from(self, sender: int, group: str | None = None) -> list[int]:
        return [m.value for m in self.got if m.sender == sender and m.group == group]


async def send(client: Client, values: Sequence[int], group: str | None = None) -> None:
    for value in values:
        await client.multicast(INT, value, group=group)


async def http_get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()

    return await asyncio.to_thread(fetch)


def tagged(tag: int, who: int, n: int) -> list[int]:
    return [tag * 100_000 + who * 1_000 + i for i in range(n)]


@contextlib.asynccontextmanager
async def clients(ports: Sequence[int]) -> AsyncIterator[list[Client]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for port in ports:
            out.append(
                await stack.enter_async_context(
                    trame_async.connect("127.0.0.1", port, rtt_interval=None)
                )
            )
        yield out


async def test_three_nodes_over_two_nats_servers_lose_nothing_and_keep_order(
    tmp_path: Path,
) -> None:
    async with (
        nats_cluster(tmp_path, 2) as (n1, n2),
        cluster_nodes([n1.url, n2.url], 3, rotate=True) as nodes,
        clients([s.port for s in nodes for _ in range(2)]) as members,
    ):
        inboxes = [Inbox(c) for c in members]
        for c in members:
            await c.join("everyone")
        await eventually(
            lambda: all(len(s._groups.by_name["everyone"].remote) == 4 for s in nodes), STEP
        )
        n = 100
        await asyncio.gather(
            *(send(c, tagged(1, i, n)) for i, c in enumerate(members)),
            *(send(c, tagged(2, i, n), "everyone") for i, c in enumerate(members)),
        )
        others = len(members) - 1
        for box in inboxes:
            await box.wait(lambda box=box: len(box.got) >= others * 2 * n)
        for r, box in enumerate(inboxes):
            for i, sender in enumerate(members):
                if i == r:
                    continue
                assert box.values_from(sender.id) == tagged(1, i, n)
                assert box.values_from(sender.id, "everyone") == tagged(2, i, n)
        for s in nodes:
            stats = s.stats()["cluster"]
            assert stats["missed"] == 0 and stats["outbox_dropped_frames"] == 0, stats


async def test_a_nats_server_killed_the_cluster_carries_on_through_the_other(
    tmp_path: Path,
) -> None:
    async with (
        nats_cluster(tmp_path, 2) as (n1, n2),
        cluster_nodes([n1.url, n2.url], 3, rotate=True) as nodes,
        clients([s.port for s in nodes]) as members,
    ):
        inboxes = [Inbox(c) for c in members]
        await send(members[0], tagged(1, 0, 10))
        for box in inboxes[1:]:
            await box.wait(lambda box=box: len(box.got) >= 10)
        n1.kill()
        # Nodes 1 and 3 were on n1: they fail over to n2 and hear each other again.
        await eventually(
            lambda: all(s.stats()["cluster"]["reconnects"] >= 1 for s in (nodes[0], nodes[2])), STEP
        )
        await wait_meshed(nodes)
        for i, c in enumerate(members):
            await send(c, tagged(2, i, 20))
        for r, box in enumerate(inboxes):
            for i, sender in enumerate(members):
                if i != r:
                    await box.wait(
                        lambda box=box, s=sender: (
                            len([v for v in box.values_from(s.id) if v >= 200_000]) >= 20
                        )
                    )
                    assert [v for v in box.values_from(sender.id) if v >= 200_000] == tagged(
                        2, i, 20
                    )


async def stop_nats_for(nats: Any, nodes: Sequence[Server], sender: Client, n: int) -> list[int]:
    """Stop NATS, send ``n`` frames paced over 2 s while it is down, start it again."""
    await nats.stop()
    await eventually(
        lambda: all(s.stats()["cluster"]["state"] == "disconnected" for s in nodes), STEP
    )
    values = tagged(3, 0, n)
    for value in values:
        await sender.multicast(INT, value)
        await asyncio.sleep(2.0 / n)  # the outage lasts 2 s: this paces the traffic over it
    return values


async def test_nats_down_for_two_seconds_the_outbox_replays_in_order(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2) as (a, b),
        clients([a.port, a.port, b.port]) as (alice, carol, bob),
    ):
        at_carol, at_bob = Inbox(carol), Inbox(bob)
        await alice.join("room")
        await bob.join("room")
        values = await stop_nats_for(nats, (a, b), alice, 100)
        # Local delivery never waited for NATS.
        assert at_carol.values_from(alice.id) == values
        assert at_bob.got == []
        await nats.start()
        await at_bob.wait(lambda: len(at_bob.got) >= len(values))
        assert at_bob.values_from(alice.id) == values
        stats = a.stats()["cluster"]
        assert stats["outbox_dropped_frames"] == 0 and b.stats()["cluster"]["missed"] == 0
        # Both nodes follow the room's subject again: a group frame crosses.
        await alice.multicast(INT, 5, group="room")
        await at_bob.wait(lambda: at_bob.values_from(alice.id, "room") == [5])


async def test_a_node_declared_gone_for_a_slow_reconnect_still_has_its_gaps_counted(
    tmp_path: Path,
) -> None:
    """Node a reconnects to NATS a second after node b: b declares it gone meanwhile (dead_after
    0.3 s), then hears it again. What a dropped during the outage is still counted at b as
    gaps, exactly (b kept a's sequence numbers while it was gone)."""
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes(
            [nats.url],
            2,
            cluster={"outbox_max_bytes": 1_000},
            cluster_each=[{"reconnect_wait": 1.0}],
        ) as (a, b),
        clients([a.port, b.port]) as (alice, bob),
    ):
        at_bob = Inbox(bob)
        values = await stop_nats_for(nats, (a, b), alice, 100)
        await nats.start()
        await at_bob.wait(lambda: values[-1] in at_bob.values_from(alice.id))
        a_stats, b_stats = a.stats()["cluster"], b.stats()["cluster"]
        assert b_stats["nodes_lost"] >= 1 and b_stats["nodes_returned"] >= 1, b_stats
        assert a_stats["outbox_dropped_envelopes"] > 0
        assert b_stats["missed"] == a_stats["outbox_dropped_envelopes"], (a_stats, b_stats)


async def test_nats_down_past_the_outbox_bound_drops_are_counted_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, cluster={"outbox_max_bytes": 1_000}) as (a, b),
        clients([a.port, b.port]) as (alice, bob),
    ):
        at_bob = Inbox(bob)
        values = await stop_nats_for(nats, (a, b), alice, 100)
        dropped = a.stats()["cluster"]["outbox_dropped_frames"]
        assert dropped > 0
        await nats.start()
        # The newest frames survive: the last one arrives, after all that was kept.
        await at_bob.wait(lambda: values[-1] in at_bob.values_from(alice.id))
        got = at_bob.values_from(alice.id)
        assert got == values[dropped:]
        a_stats, b_stats = a.stats()["cluster"], b.stats()["cluster"]
        assert b_stats["missed"] == a_stats["outbox_dropped_envelopes"]

        # ... logged, at most a line a second, the last ones too ...
        def logged() -> list[int]:
            return [
                r.frames  # type: ignore[attr-defined]
                for r in caplog.records
                if getattr(r, "event", None) == "cluster-dropped"
            ]

        await eventually(lambda: sum(logged()) == dropped, STEP)
        assert len(logged()) <= 4, logged()  # a 2 s outage
        # ... and visible to the operator, read over HTTP.
        pytest.importorskip("prometheus_client")
        for server, name, value in (
            (a, "trame_cluster_outbox_dropped_frames_total", dropped),
            (b, "trame_cluster_missed_total", b_stats["missed"]),
            (b, "trame_cluster_nodes", 1),
        ):
            endpoint = await serve_metrics(server, "127.0.0.1", 0)
            try:
                _, text = await http_get(endpoint.port, "/metrics")
            finally:
                endpoint.close()
                await endpoint.wait_closed()
            assert f"{name} {float(value)}" in text, name


@contextlib.asynccontextmanager
async def node_process(name: str, index: int, urls: Sequence[str]) -> AsyncIterator[Any]:
    proc = await spawn([str(HERE / "cluster_node_main.py"), name, str(index), *urls])
    try:
        _, port = await wait_listening(proc)
        proc.port = port  # type: ignore[attr-defined]
        yield proc
    finally:
        await stop_process(proc)


async def test_a_node_killed_its_clients_move_and_presence_shows_it(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 1, name="kill") as (a,),
        node_process("kill", 9, [nats.url]) as doomed,
        trame_async.connect("127.0.0.1", a.port, rtt_interval=None) as erin,
        trame_async.connect(
            [f"127.0.0.1:{doomed.port}", f"127.0.0.1:{a.port}"],
            shuffle=False,
            reconnect=QUICK,
            rtt_interval=None,
        ) as dave,
    ):
        await erin.join("room", presence=True)
        await dave.join("room")
        first = await erin.next_presence(STEP)
        assert (first.client_id, first.joined) == (dave.id, True)
        old_id = dave.id
        assert old_id >> 22 == 9
        doomed.kill()  # SIGKILL
        # dave lands on node a and joins again (a new id there), and node 9 is declared gone
        # (its members leave): in either order.
        events = [await erin.next_presence(STEP), await erin.next_presence(STEP)]
        left = next(e for e in events if not e.joined)
        back = next(e for e in events if e.joined)
        assert left.client_id == old_id and left.reason == DisconnectReason.CONNECTION_LOST
        assert back.client_id == dave.id != old_id
        assert dave.address[1] == a.port
        await erin.multicast(INT, 5, group="room")
        (got,) = await receive_n(dave, 1, STEP)
        assert (got.sender, got.value) == (erin.id, 5)
        assert a.stats()["cluster"]["nodes_lost"] == 1


async def test_a_frozen_node_is_declared_gone_then_comes_back(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 1, name="freeze") as (a,),
        node_process("freeze", 8, [nats.url]) as frozen,
        trame_async.connect("127.0.0.1", a.port, rtt_interval=None) as erin,
        trame_async.connect("127.0.0.1", frozen.port, rtt_interval=None) as fred,
    ):
        await erin.join("room", presence=True)
        await fred.join("room")
        assert (await erin.next_presence(STEP)).client_id == fred.id
        loop = asyncio.get_running_loop()
        os.kill(frozen.pid, signal.SIGSTOP)
        began = loop.time()
        try:
            left = await erin.next_presence(STEP)
            took = loop.time() - began
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        assert (left.client_id, left.joined) == (fred.id, False)
        # Documented bound: dead_after plus one heartbeat interval (plus scheduling slack).
        assert took < FAST["dead_after"] + FAST["heartbeat_interval"] + 1.0
        back = await erin.next_presence(STEP)
        assert (back.client_id, back.joined) == (fred.id, True)
        assert a.stats()["cluster"]["nodes_returned"] == 1


async def test_a_deaf_subscription_is_found_by_the_probe_and_repaired(tmp_path: Path) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2) as (a, b),
        clients([a.port, b.port]) as (alice, bob),
    ):
        at_bob = Inbox(bob)
        node = b.cluster
        assert node is not None
        # Make the NATS server forget b's subscription to the all-clients subject, behind the
        # node's back: connected, subscribed as far as it knows, receiving nothing.
        nc = node._nc
        sub = node._subs[0]
        await nc._send_command(f"UNSUB {sub._id}\r\n".encode())
        await nc.flush()
        await eventually(lambda: b.stats()["cluster"]["deaf"] >= 1, STEP, what="deaf found")
        await eventually(lambda: b.stats()["cluster"]["state"] == "connected", STEP)
        await wait_meshed([a, b])
        await alice.multicast(INT, 77)
        await at_bob.wait(lambda: 77 in at_bob.values_from(alice.id))
        assert b.stats()["cluster"]["rebuilds"] >= 1


async def test_a_late_joiner_gets_the_last_value_then_live_frames_without_gap_or_duplicate(
    tmp_path: Path,
) -> None:
    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, last_value_groups=("feed",)) as (a, b),
        clients([a.port, b.port]) as (alice, bob),
    ):
        await alice.join("feed")
        at_bob = Inbox(bob)
        n = 400
        stop = asyncio.Event()

        async def publish() -> None:
            for i in range(n):
                await alice.multicast(INT, i, group="feed")
                if i % 10 == 0:
                    await asyncio.sleep(0)  # let the join run in the middle of the stream
            stop.set()

        task = asyncio.create_task(publish())
        await eventually(lambda: a.stats()["frames_in"] >= 50, STEP)
        await bob.join("feed")
        await task
        await at_bob.wait(lambda: n - 1 in at_bob.values_from(alice.id, "feed"))
        got = at_bob.values_from(alice.id, "feed")
        # The first is the last value when bob joined; every later one follows it, once each.
        assert got == list(range(got[0], n)), got[:20]


async def test_a_first_join_buffers_within_bounds_and_counts_what_it_drops(tmp_path: Path) -> None:
    """A group's live envelopes wait while its first member here is admitted (an on_join hook
    that takes its time): at most outbox_max_bytes of them; the oldest go, counted as gaps."""
    release = asyncio.Event()

    async def on_join(client: Any, name: str) -> bool:
        if client.id >> 22 == 2:  # the joiner on node b waits
            await release.wait()
        return True

    async with (
        nats_server(tmp_path) as nats,
        cluster_nodes([nats.url], 2, cluster={"outbox_max_bytes": 2048}, on_join=on_join) as (
            a,
            b,
        ),
        clients([a.port, b.port]) as (alice, bob),
    ):
        await alice.join("feed")
        at_bob = Inbox(bob)
        joining = asyncio.create_task(bob.join("feed"))
        await eventually(lambda: "feed" in b.cluster._groups, STEP)  # type: ignore[union-attr]
        feed = b.cluster._groups["feed"]  # type: ignore[union-attr]
        # The snapshot first (its position then precedes every frame below: all drops are lost).
        await eventually(lambda: feed.ready.done(), STEP)
        n = 200
        for i in range(n):
            await alice.multicast(INT, i, group="feed")
            await asyncio.sleep(0)  # one envelope per frame or so: many to buffer
        await eventually(lambda: feed.dropped, STEP)  # the buffer is full: the oldest went
        release.set()
        await joining
        await at_bob.wait(lambda: n - 1 in at_bob.values_from(alice.id, "feed"))
        got = at_bob.values_from(alice.id, "feed")
        assert got == list(range(got[0], n)) and got[0] > 0, got[:5]
        stats = b.stats()["cluster"]
        # Only the dropped envelopes the snapshot did not cover are lost, each counted once.
        assert stats["missed"] == stats["buffer_dropped"] > 0, stats
