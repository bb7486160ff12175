"""``trame-serve --workers N``: N server processes on one port, relaying as one through NATS.

Theory of operation
-------------------
The process the user started becomes a *supervisor* that serves no client itself. It

1. **reserves the port** (:func:`reserve_port`): binds, without listening, a socket with
   ``SO_REUSEPORT`` on the address, so that port 0 becomes one real port that every worker binds
   too, and the port stays held while a worker restarts. The kernel spreads new connections over
   the *listening* sockets only, that is the workers';
2. without ``--cluster``, starts a ``nats-server`` of its own on loopback
   (:class:`~trame_async.cluster.embedded.EmbeddedNats`);
3. starts the workers: ``python -m trame_async`` with the user's own arguments followed by
   ``--port PORT`` (and ``--cluster URL`` for the embedded server), with ``TRAME_WORKER=i`` in
   the environment. A worker is the ordinary server with ``reuse_port=True``, node index
   ``--node-index`` (default 0) plus ``i``, and ``[worker i]`` in its log lines; it prints its
   ``listening on`` line into a pipe the supervisor reads, and runs in a process group of its own
   so that a terminal's Ctrl+C reaches the supervisor alone;
4. once every worker listens, prints one ``listening on`` line (theirs: all the same);
5. restarts a worker that exits, after a delay that doubles while it keeps dying young
   (:class:`RestartPolicy`), each time with a WARNING naming its exit status or signal; gives up
   (stops everything, exit 1) on a worker that cannot stay up at all;
6. on SIGINT or SIGTERM, sends each worker SIGTERM (its normal graceful shutdown: clients get a
   GOODBYE), waits for them, SIGKILLs any still running past ``--drain-timeout`` plus a grace,
   then stops its ``nats-server``, and exits 0 if every worker exited 0.

A worker ends with its supervisor even when the supervisor is SIGKILLed: on Linux the kernel
sends it SIGTERM (``PR_SET_PDEATHSIG``, :mod:`trame_async._lifeline`), and everywhere it watches
the pipe on its standard input, whose end of file means the supervisor is gone
(:func:`watch_supervisor`). The embedded ``nats-server`` gets the same signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from ._lifeline import die_with_parent
from .cluster.embedded import EmbeddedNats

__all__ = [
    "WORKER_ENV",
    "RestartPolicy",
    "Supervisor",
    "reserve_port",
    "watch_supervisor",
    "worker_index",
]

logger = logging.getLogger("trame_async.workers")

#: Environment variable that makes ``trame-serve`` a worker, with this index (internal: set by
#: the supervisor for the processes it starts).
WORKER_ENV: Final = "TRAME_WORKER"
#: How often the supervisor looks whether its ``nats-server`` is still running, in seconds.
_NATS_CHECK: Final = 0.5
#: Time a worker has to exit after SIGTERM beyond its ``--drain-timeout``, in seconds.
STOP_GRACE: Final = 10.0


def worker_index() -> int | None:
    """Return this process's worker index when a supervisor started it, else None."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(
            f"trame-serve: ${WORKER_ENV} must be a worker index, not {value!r}"
        ) from None


class _Lifeline(asyncio.Protocol):
    def __init__(self, on_gone: Callable[[], None]) -> None:
        self._on_gone = on_gone

    def data_received(self, data: bytes) -> None:
        """Ignore anything written: only the end of the pipe means something."""

    def eof_received(self) -> bool:
        self._on_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_gone()


async def watch_supervisor(on_gone: Callable[[], None]) -> asyncio.BaseTransport:
    """Call ``on_gone`` when standard input, the supervisor's pipe, reaches its end.

    Return the transport; close it when the worker stops (which calls ``on_gone`` too).
    """
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    transport, _ = await loop.connect_read_pipe(lambda: _Lifeline(on_gone), pipe)
    return transport


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (without listening) one ``SO_REUSEPORT`` socket per address of ``host`` on ``port``.

    ``port`` 0: the kernel picks a port free for everyone (bound without ``SO_REUSEPORT`` while
    reserving it, so never one another server shares). A port that another socket listens on
    is refused with ``OSError`` (address in use), as a single process's bind would be.
    The sockets receive no connection: close them when the workers are gone.
    """
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    seen: set[tuple[int, str]] = set()
    reserved: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, str(sockaddr[0])) in seen:
                continue
            seen.add((family, str(sockaddr[0])))
            address = (sockaddr[0], port, *sockaddr[2:])
            # The probe fails where a server listens (or takes the kernel's free pick); the
            # reservation then shares its port, which SO_REUSEADDR allows as neither listens.
            with _socket(family, kind, proto, reuse_port=False) as probe:
                probe.bind(address)
                port = probe.getsockname()[1]
                keep = _socket(family, kind, proto, reuse_port=True)
                reserved.append(keep)
                keep.bind((sockaddr[0], port, *sockaddr[2:]))
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved


def _socket(family: int, kind: int, proto: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When the supervisor restarts a worker that exited, and when it gives up. Seconds."""

    first_delay: float = 0.1
    """Delay before restarting a worker that had been up at least ``stable_after``."""
    max_delay: float = 10.0
    """The delay doubles at each restart of a worker that died young, up to this."""
    stable_after: float = 10.0
    """A worker up this long had a good run: its next restart waits ``first_delay`` again."""
    max_failures: int = 8
    """A worker that dies young this many times in a row is not restarted: all stop, exit 1."""
    start_timeout: float = 60.0
    """A worker not listening this long after its start is killed (and counts as dying young)."""

    def delay(self, failures: int) -> float:
        """Return the delay before a restart after ``failures`` young deaths in a row."""
        return min(self.max_delay, self.first_delay * (1 << max(0, failures - 1)))


def describe_exit(code: int) -> str:
    """Say how a process ended from its Popen return code (negative: killed by a signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


class _Slot:
    """One worker position: its index, the process in it now, when that one started."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        #: Set when a process of this slot listened for the first time.
        self.first_ready = asyncio.Event()
        self.listening_line = ""


class Supervisor:
    """Run ``count`` workers of ``trame-serve`` on ``port`` and keep them running.

    ``argv`` are the user's ``trame-serve`` arguments, given to each worker after ``-m
    trame_async``. ``port`` is the port already reserved (:func:`reserve_port`); ``cluster_urls``
    None starts an embedded ``nats-server``. ``stop_timeout`` (seconds) is how long a worker may
    take to exit after SIGTERM. ``out`` receives the one ``listening on`` line and what the
    workers print after theirs (``metrics on ...``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        count: int,
        port: int,
        cluster_urls: Sequence[str] | None,
        stop_timeout: float,
        policy: RestartPolicy = RestartPolicy(),
        out: TextIO | None = None,
    ) -> None:
        """Describe the workers; nothing starts before :meth:`run`."""
        self.argv = list(argv)
        self.port = port
        self.cluster_urls = list(cluster_urls) if cluster_urls is not None else None
        self.stop_timeout = stop_timeout
        self.policy = policy
        self.out = out if out is not None else sys.stdout
        self.nats: EmbeddedNats | None = None
        self._slots = [_Slot(i) for i in range(count)]
        self._stop = asyncio.Event()
        self._status = 0
        #: Lines the workers printed before all were listening (None once they were).
        self._held: list[str] | None = []

    def _command(self) -> list[str]:
        extra = ["--port", str(self.port)]
        if self.cluster_urls is None:
            assert self.nats is not None
            extra += ["--cluster", self.nats.url]
        return [sys.executable, "-m", "trame_async", *self.argv, *extra]

    def _fail(self, message: str, *args: object) -> None:
        logger.error(message, *args)
        self._status = 1
        self._stop.set()

    async def run(self) -> int:
        """Run until SIGINT or SIGTERM (or a worker that cannot stay up); return the exit status.

        Installs handlers for both signals while it runs.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.cluster_urls is None:
                self.nats = EmbeddedNats(name="trame-workers")
                try:
                    await self.nats.start()
                except (OSError, RuntimeError, TimeoutError) as err:
                    print(f"trame-serve: cannot start nats-server: {err}", file=sys.stderr)
                    return 1
                logger.info("embedded nats-server at %s (pid %d)", self.nats.url, self._nats_pid())
                tasks.append(asyncio.create_task(self._watch_nats()))
            tasks += [asyncio.create_task(self._guarded(slot)) for slot in self._slots]
            await self._announce()
            await self._stop.wait()
        finally:
            # The handlers stay during the shutdown: a second Ctrl+C hurries it.
            try:
                await self._shutdown(tasks)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        return self._status

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            logger.info("%s: stopping the workers", sig.name)
            self._stop.set()
            return
        logger.warning("%s again: killing the workers that are still running", sig.name)
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.kill()

    def _nats_pid(self) -> int:
        assert self.nats is not None and self.nats.proc is not None
        return self.nats.proc.pid

    async def _announce(self) -> None:
        """Print the first worker's ``listening on`` line once all listen (not when stopped)."""
        everyone = asyncio.gather(*(slot.first_ready.wait() for slot in self._slots))
        stopped = asyncio.ensure_future(self._stop.wait())
        waiters: set[asyncio.Future[Any]] = {everyone, stopped}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not everyone.done():
                everyone.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await everyone
        if self._stop.is_set():
            return
        held, self._held = self._held or [], None
        self._say("\n".join([self._slots[0].listening_line, *held]))
        logger.info("%d workers listening on port %d", len(self._slots), self.port)

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env[WORKER_ENV] = str(slot.index)
        # stdin: the pipe whose end tells the worker that the supervisor is gone.
        # Its own process group: a terminal's Ctrl+C reaches the supervisor alone, which then
        # sends each worker one SIGTERM (a second signal could interrupt its graceful shutdown).
        proc = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent(),
            process_group=0,
        )
        slot.proc = proc
        logger.info("worker %d started (pid %d)", slot.index, proc.pid)
        if self._stop.is_set():  # stopped while it was being spawned
            proc.send_signal(signal.SIGTERM)
        return proc

    async def _pump(
        self, slot: _Slot, proc: asyncio.subprocess.Process, ready: asyncio.Event
    ) -> None:
        """Read the worker's stdout: its ``listening on`` line, then pass on what follows."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            if not ready.is_set() and text.startswith("listening on "):
                slot.listening_line = text
                ready.set()
                slot.first_ready.set()
                logger.info("worker %d (pid %d) listening", slot.index, proc.pid)
            elif self._held is not None:
                self._held.append(text)  # until the one listening line is out: it comes first
            else:
                self._say(text)

    async def _run_once(self, slot: _Slot) -> tuple[int, bool]:
        """Run one process in ``slot`` until it exits; return its status and whether it listened."""
        proc = await self._spawn(slot)
        ready = asyncio.Event()
        pump = asyncio.create_task(self._pump(slot, proc, ready))
        listened = asyncio.create_task(ready.wait())
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait(
                {listened, exited},
                timeout=self.policy.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not ready.is_set() and not exited.done() and not self._stop.is_set():
                logger.warning(
                    "worker %d (pid %d) not listening after %g s: killing it",
                    slot.index,
                    proc.pid,
                    self.policy.start_timeout,
                )
                proc.kill()
            code = await exited
            await pump
        finally:
            listened.cancel()
            if proc.returncode is None:  # cancelled: never leave a worker behind
                proc.kill()
                await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        return code, ready.is_set()

    async def _guarded(self, slot: _Slot) -> None:
        """Run :meth:`_keep`; a bug in it stops everything rather than leave a slot empty."""
        try:
            await self._keep(slot)
        except Exception:
            logger.exception("supervision of worker %d failed", slot.index)
            self._status = 1
            self._stop.set()

    def _say(self, text: str) -> None:
        """Print ``text`` on the output, unless it was closed (``| head -1``): then drop it."""
        try:
            print(text, file=self.out, flush=True)
        except (BrokenPipeError, ValueError, OSError):
            pass

    async def _keep(self, slot: _Slot) -> None:
        """Keep a worker running in ``slot`` until the supervisor stops."""
        loop = asyncio.get_running_loop()
        young_deaths = 0
        while True:
            began = loop.time()
            code, listened = await self._run_once(slot)
            if self._stop.is_set():
                if code == 0:
                    logger.info("worker %d exited with status 0", slot.index)
                else:
                    logger.warning("worker %d %s while stopping", slot.index, describe_exit(code))
                    self._status = 1
                return
            if not slot.first_ready.is_set():
                self._fail(
                    "worker %d %s before listening: stopping (its messages are above)",
                    slot.index,
                    describe_exit(code),
                )
                return
            if listened and loop.time() - began >= self.policy.stable_after:
                young_deaths = 0
            else:
                young_deaths += 1
            if young_deaths >= self.policy.max_failures:
                self._fail(
                    "worker %d %s, the %dth time in a row within %g s of its start: giving up",
                    slot.index,
                    describe_exit(code),
                    young_deaths,
                    self.policy.stable_after,
                )
                return
            delay = self.policy.delay(young_deaths)
            logger.warning(
                "worker %d %s; restarting it in %g s",
                slot.index,
                describe_exit(code),
                delay,
                extra={"event": "worker-exit", "worker": slot.index, "status": code},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return

    async def _watch_nats(self) -> None:
        """Restart the embedded ``nats-server`` on its port if it dies; fail if it cannot."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _NATS_CHECK)
            nats = self.nats
            if self._stop.is_set() or nats is None or nats.returncode is None:
                continue
            tail = "\n".join(nats.log().splitlines()[-10:])
            logger.warning(
                "embedded nats-server %s; restarting it on port %d; its last lines:\n%s",
                describe_exit(nats.returncode),
                nats.port,
                tail,
            )
            await nats.stop()  # reaps it, removes its log
            self.nats = EmbeddedNats(name="trame-workers", port=nats.port)
            try:
                await self.nats.start()
            except (OSError, RuntimeError, TimeoutError) as err:
                self._fail("cannot restart the embedded nats-server: %s", err)
                return
            logger.info("embedded nats-server restarted (pid %d)", self._nats_pid())

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop the workers (SIGTERM, then SIGKILL past the timeout), then the nats-server."""
        self._stop.set()
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGTERM)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.stop_timeout)
            if late:
                for slot in self._slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        logger.warning(
                            "worker %d (pid %d) still running %g s after SIGTERM: killing it",
                            slot.index,
                            slot.proc.pid,
                            self.stop_timeout,
                        )
                        slot.proc.kill()
                self._status = 1
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):
                    logger.error("supervision failed", exc_info=outcome)
                    self._status = 1
        if self.nats is not None:
            await self.nats.stop()
            logger.info("embedded nats-server stopped")
