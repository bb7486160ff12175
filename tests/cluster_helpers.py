"""trame servers joined into a cluster through real ``nats-server`` processes, for tests.

:func:`cluster_nodes` starts ``count`` servers on 127.0.0.1 (port 0), each a node of one cluster
over the given NATS URLs, with timers short enough for tests (heartbeats every 50 ms, a node
gone after 300 ms of silence), and waits until every node has heard every other one. Every
server it starts, it stops.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from helpers import eventually
from nats_helpers import MS

import trame_async
from trame_async.cluster import ClusterConfig

_NAMES = itertools.count(1)

#: Timers of the test clusters (seconds).
FAST: dict[str, Any] = {
    "heartbeat_interval": 50 * MS,
    "dead_after": 300 * MS,
    "snapshot_timeout": 1_000 * MS,
    "probe_interval": 200 * MS,
    "probe_timeout": 300 * MS,
    "reconnect_wait": 50 * MS,
    "connect_timeout": 2.0,
}


def cluster_config(urls: Sequence[str], name: str, **overrides: Any) -> ClusterConfig:
    """The ClusterConfig of a test node."""
    return ClusterConfig(urls=tuple(urls), name=name, **{**FAST, **overrides})


@contextlib.asynccontextmanager
async def cluster_nodes(
    urls: Sequence[str],
    count: int,
    *,
    name: str | None = None,
    rotate: bool = False,
    cluster: dict[str, Any] | None = None,
    cluster_each: Sequence[dict[str, Any]] = (),
    **options: Any,
) -> AsyncIterator[list[trame_async.Server]]:
    """Run ``count`` clustered servers; ``cluster`` overrides ClusterConfig fields (and
    ``cluster_each[i]`` those of node i), ``options`` are ServerConfig fields. ``rotate``: node
    i prefers the i-th URL (then the next ones), so the nodes spread over the NATS servers."""
    name = name or f"t{next(_NAMES)}"
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for i in range(count):
            mine = list(urls)
            extra = dict(cluster or {})
            if i < len(cluster_each):
                extra.update(cluster_each[i])
            if rotate:
                k = i % len(mine)
                mine = mine[k:] + mine[:k]
                extra["nats_options"] = {"dont_randomize": True}
            config = cluster_config(mine, name, node_index=i + 1, **extra)
            server = await trame_async.start_server(
                "127.0.0.1", 0, cluster=config, heartbeat_interval=None, **options
            )
            stack.push_async_callback(_stop, server)
            servers.append(server)
        await wait_meshed(servers)
        yield servers


async def wait_meshed(servers: Sequence[trame_async.Server], timeout: float = 10.0) -> None:
    """Wait until every node counts every other as live."""
    want = len(servers) - 1

    def meshed() -> bool:
        return all(s.stats()["cluster"]["nodes"] >= want for s in servers)

    await eventually(meshed, timeout, what=f"{len(servers)} nodes see each other")


async def _stop(server: trame_async.Server) -> None:
    server.close()
    await server.wait_closed()
