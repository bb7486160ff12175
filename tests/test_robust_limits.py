"""Under attack and under load: malformed floods, oversized prefixes, slow-loris, slow consumers, churn.

Each test is a timeline against a real server on 127.0.0.1 (port 0), on the stock loop and on uvloop
(conftest.py; a server in a subprocess runs on the same kind of loop as the test). Limits are shrunk
so that each scenario takes seconds; figures are measured, printed with ``-s`` and checked against
bounds derived from the configured limits (see docs/protocol.md, "Limits"). Nothing sleeps to
synchronise: the tests wait on futures and events, or poll with a deadline; the only sleeps pace an
attacker (a slow-loris dribble) or a sampler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import CLIENT_SCRIPT, read_line, spawn, stop_process
from robust_helpers import (
    ATTACK_MAX_FRAME_SIZE,
    ATTACKS,
    MS,
    Attack,
    RawConn,
    ServerProcess,
    Window,
    error_code_of,
    open_fds,
    push_junk,
    split_frames,
)

import trame_async
from trame_async import (
    INT,
    POS,
    REGISTRY,
    STR,
    Client,
    DisconnectReason,
    ErrorCode,
    Kind,
    Registry,
    RemoteClient,
    Trame,
)
from trame_async.wire import HEADER, MAGIC, ErrorFrame

SENTINEL = -1


def report(name: str, **figures: object) -> None:
    """Print measured figures (shown with ``pytest -s``; kept in the captured output otherwise)."""
    text = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"[{name}] {text}")


async def connect_many(
    stack: contextlib.AsyncExitStack, port: int, n: int, **kwargs: Any
) -> list[Client]:
    """Connect ``n`` clients, 50 at a time; the stack closes them."""
    kwargs.setdefault("rtt_interval", None)
    out: list[Client] = []
    for start in range(0, n, 50):
        out += await asyncio.gather(
            *(
                stack.enter_async_context(trame_async.connect("127.0.0.1", port, **kwargs))
                for _ in range(min(50, n - start))
            )
        )
    return out


async def subscribe(
    client: Client, window: Window | None, got: list[int], timeout: float = 30.0
) -> None:
    """Collect INT values (sequence numbers) until the sentinel."""
    for _ in range(10_000_000):
        msg = await client.receive(timeout=timeout)
        value = msg.value
        if value == SENTINEL:
            return
        got.append(value)
        if window is not None:
            window.received(value)
    raise AssertionError("unreachable")


class Stream:
    """A publisher multicasting 0, 1, 2, ... as ``trame``, then the sentinel.

    It runs at most two batches ahead of the slowest subscriber (``window``) and, with ``tick``,
    sends one batch per tick (set by whoever paces it).
    """

    def __init__(
        self,
        publisher: Client,
        window: Window,
        trame: Trame = INT,
        tick: asyncio.Event | None = None,
    ) -> None:
        self.publisher = publisher
        self.window = window
        self.trame = trame
        self.tick = tick
        self.sent = 0

    async def run(self, stop: asyncio.Event, max_frames: int = 1_000_000) -> int:
        """Publish until ``stop`` is set (or ``max_frames``); return how many were sent."""
        window = self.window
        k = 0
        while not stop.is_set() and self.sent < max_frames:
            for _ in range(window.batch):
                await self.publisher.multicast(self.trame, self.sent)
                self.sent += 1
            await window.wait(k - 1)
            k += 1
            if self.tick is not None:
                await _wait_either(self.tick, stop)
                self.tick.clear()
        await self.publisher.multicast(self.trame, SENTINEL)
        return self.sent


async def _wait_either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def eventually_true(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 10.0,
    detail: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {what} {detail()}")
        await asyncio.sleep(5 * MS)


def fd_targets() -> list[str]:
    """What this process's descriptors point to (for failure messages)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{name}"))
    return sorted(out)


def assert_gap_free(got: list[int], n: int, who: str) -> None:
    if got != list(range(n)):
        missing = sorted(set(range(n)) - set(got))[:10]
        raise AssertionError(
            f"{who}: {len(got)} of {n} frames; first missing {missing}; "
            f"in order: {got == sorted(got)}"
        )


# --- 1. a flood of malformed frames, server in its own process --------------------------------------


FLOOD_CONFIG: dict[str, Any] = {
    "heartbeat_interval": 5.0,
    "heartbeat_timeout": 5.0,
    "handshake_timeout": 5.0,
    "frame_timeout": 5.0,
    "max_frame_size": ATTACK_MAX_FRAME_SIZE,
}
N_ATTACKERS = 10
N_MALFORMED = 10_000
N_SUBSCRIBERS = 100
#: Malformed frames per publisher batch.
TICK = 50
#: Server RSS growth allowed across a flood, warm-up done: 10,000 connections that each leaked
#: 1 KiB would already be twice this.
FLOOD_RSS_GROWTH_MAX = 5 << 20


_BENIGN = frozenset((Kind.RELAY, Kind.PING, Kind.PONG, Kind.DROPPED))


@dataclasses.dataclass
class AttackTally:
    sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    opened: int = 0
    refused_before_hello: int = 0


async def attack_once(port: int, attack: Attack, tally: AttackTally) -> None:
    """One connection, one malformed frame: expect ERROR with the class's code, then the close."""
    conn = await RawConn.connect(port)
    try:
        async with asyncio.timeout(10):
            if attack.after_hello:
                await conn.handshake()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await conn.send(attack.payload)
            frames = await conn.read_to_end()
    finally:
        conn.close()
    tally.sent[attack.name] += 1
    code = error_code_of(frames)
    # An open attacker is a client like any other until its bad frame: it may get relays, pings.
    others = [kind for kind, _ in frames[:-1] if kind not in _BENIGN]
    if code != attack.code or others or not conn.eof:
        if len(tally.failures) < 20:
            try:
                got: object = ErrorCode(code).name
            except ValueError:
                got = code
            tally.failures.append(
                f"{attack.name}: expected {attack.code.name}, got {got}; other kinds {others}; "
                f"eof={conn.eof}"
            )
    if attack.after_hello:
        tally.opened += 1
    else:
        tally.refused_before_hello += 1


async def flood(
    port: int, total: int, tally: AttackTally, tick: asyncio.Event | None = None
) -> float:
    """Send ``total`` malformed frames over ``N_ATTACKERS`` parallel connections; return seconds.

    ``tick`` is set every ``TICK`` connections: it paces the publisher, so that relays are spread
    over the whole attack without crowding out the attackers.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = 0

    async def attacker(k: int) -> None:
        nonlocal done
        for i in range(k, total, N_ATTACKERS):
            await attack_once(port, ATTACKS[i % len(ATTACKS)], tally)
            done += 1
            if tick is not None and done % TICK == 0:
                tick.set()

    await asyncio.gather(*(attacker(k) for k in range(N_ATTACKERS)))
    return loop.time() - start


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_flood_of_malformed_frames_while_subscribers_get_everything(tmp_path: Path) -> None:
    server = await ServerProcess.start(FLOOD_CONFIG, tmp_path / "server.err")
    try:
        empty = await server.stats()
        async with contextlib.AsyncExitStack() as stack:
            publisher, *subscribers = await connect_many(stack, server.port, N_SUBSCRIBERS + 1)
            window = Window(N_SUBSCRIBERS, batch=20)
            got: list[list[int]] = [[] for _ in subscribers]
            readers = [
                asyncio.create_task(subscribe(c, window, g))
                for c, g in zip(subscribers, got, strict=True)
            ]
            stop = asyncio.Event()
            tick = asyncio.Event()
            publishing = asyncio.create_task(Stream(publisher, window, tick=tick).run(stop))
            try:
                # Warm-up (allocator pools, caches), then the baseline.
                warm = AttackTally()
                await flood(server.port, 500, warm, tick)
                assert not warm.failures, warm.failures
                baseline = await server.stats_when(
                    lambda s: s["all"] == N_SUBSCRIBERS + 1, what="warm-up connections gone"
                )

                tally = AttackTally()
                seconds = await flood(server.port, N_MALFORMED, tally, tick)
                stop.set()
                sent = await asyncio.wait_for(publishing, 30)
                await asyncio.wait_for(asyncio.gather(*readers), 30)
            finally:
                stop.set()
                for task in (*readers, publishing):
                    task.cancel()
                await asyncio.gather(*readers, publishing, return_exceptions=True)

            assert sum(tally.sent.values()) == N_MALFORMED
            assert set(tally.sent) == {a.name for a in ATTACKS}, "every class was sent"
            assert not tally.failures, "\n".join(tally.failures)
            for i, g in enumerate(got):
                assert_gap_free(g, sent, f"subscriber {i}")

            after = await server.stats_when(
                lambda s: s["all"] == N_SUBSCRIBERS + 1 and s["fds"] == baseline["fds"],
                what=f"attack connections gone, fds back to {baseline['fds']}",
            )
            assert after["tasks"] == baseline["tasks"], (baseline, after)
            rss_growth = after["rss"] - baseline["rss"]
            assert rss_growth <= FLOOD_RSS_GROWTH_MAX, (
                f"server RSS grew by {rss_growth / 2**20:.1f} MiB over the flood"
            )
            opened = warm.opened + tally.opened
            refused = warm.refused_before_hello + tally.refused_before_hello
            assert after["reasons"] == {"PROTOCOL_ERROR": opened}, after["reasons"]
            assert after["prehandshake"] == {"PROTOCOL_ERROR": refused}, after["prehandshake"]
            assert after["errors"] == 0 and after["exc_handler"] == 0, (
                after["log_samples"],
                after["exc_samples"],
            )
            assert after["warnings"] == 0, after["log_samples"]
            report(
                "flood",
                malformed=N_MALFORMED,
                seconds=seconds,
                per_second=N_MALFORMED / seconds,
                relayed=sent,
                rss_growth_kib=rss_growth // 1024,
                fds=after["fds"],
                tasks=after["tasks"],
            )
        # Every client gone: back to the empty server's descriptors.
        await server.stats_when(
            lambda s: s["all"] == 0 and s["fds"] == empty["fds"], what="all connections gone"
        )
        final = await server.stop()
        assert final["errors"] == 0 and final["exc_handler"] == 0, final
    finally:
        await server.kill()


async def test_closed_connections_are_released_at_once() -> None:
    server = await trame_async.start_server("127.0.0.1", 0, **FLOOD_CONFIG)
    try:
        tally = AttackTally()
        await flood(server.port, 2 * len(ATTACKS), tally)  # every class twice
        assert not tally.failures, tally.failures
        await eventually_true(lambda: not server._all, "every connection gone")
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, RemoteClient) and o._server is server]
        assert not alive, f"{len(alive)} closed connections still referenced by the server"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the server's own loop shows the same
async def test_flood_leaves_server_memory_at_baseline(tmp_path: Path) -> None:
    server = await ServerProcess.start(FLOOD_CONFIG, tmp_path / "server.err")
    try:
        await flood(server.port, 500, AttackTally())  # warm-up
        baseline = await server.stats_when(lambda s: s["all"] == 0, what="warm-up gone")
        tally = AttackTally()
        await flood(server.port, N_MALFORMED, tally)
        after = await server.stats_when(
            lambda s: s["all"] == 0 and s["fds"] == baseline["fds"], what="flood gone"
        )
        rss_growth = after["rss"] - baseline["rss"]
        report("flood memory", rss_growth_kib=rss_growth // 1024)
        assert rss_growth <= FLOOD_RSS_GROWTH_MAX, (
            f"server RSS grew by {rss_growth / 2**20:.1f} MiB"
        )
    finally:
        await server.kill()


# --- 2. a 4 GiB length prefix followed by junk ------------------------------------------------------


JUNK_TOTAL = 50 << 20
#: Far below JUNK_TOTAL: what the kernel buffers plus one read may swallow before the reset.
JUNK_ACCEPTED_MAX = 8 << 20


@pytest.mark.parametrize("phase", ["before-hello", "after-hello"])
async def test_4gib_length_prefix_is_refused_from_the_header(phase: str, tmp_path: Path) -> None:
    config = {"max_frame_size": 1 << 20, "handshake_timeout": 10.0, "frame_timeout": 10.0}
    server = await ServerProcess.start(config, tmp_path / "server.err")
    # Before the handshake the server looks at kind and magic first (docs/protocol.md, HELLO):
    # this is a HELLO announcing 4 GiB. After it, the bare length field is enough.
    header = b"\xff\xff\xff\xff" + (b"\x01" + MAGIC if phase == "before-hello" else b"")
    try:
        baseline = await server.stats()

        async def opened() -> RawConn:
            conn = await RawConn.connect(server.port, sndbuf=64 << 10)
            if phase == "after-hello":
                await conn.handshake()
            return conn

        # (a) The header alone: the ERROR comes back before any junk is sent, then the close.
        conn = await opened()
        try:
            start = time.perf_counter()
            await conn.send(header)
            kind, body = await asyncio.wait_for(conn.next_frame(), 5)
            answered = time.perf_counter() - start
            assert kind == Kind.ERROR, (kind, body)
            assert ErrorFrame.parse(body).error_code is ErrorCode.FRAME_TOO_LARGE
            rest = await asyncio.wait_for(conn.read_to_end(), 5)
            assert conn.eof and not rest, rest
            accepted_after, ended_after = await asyncio.to_thread(
                push_junk, conn.sock, b"", JUNK_TOTAL
            )
        finally:
            conn.close()
        assert ended_after in ("reset", "broken pipe"), ended_after
        assert accepted_after < JUNK_ACCEPTED_MAX

        # (b) Header and junk in one stream: the server stops reading at the header.
        conn = await opened()
        try:
            start = time.perf_counter()
            accepted, ended = await asyncio.to_thread(push_junk, conn.sock, header, JUNK_TOTAL)
            cut_after = time.perf_counter() - start
            frames = await asyncio.wait_for(conn.read_to_end(), 5)
        finally:
            conn.close()
        assert ended in ("reset", "broken pipe"), ended
        assert accepted < JUNK_ACCEPTED_MAX, f"{accepted} bytes of junk accepted"
        # The reset may overtake the ERROR frame; if it got through, it has the right code.
        code = error_code_of(frames)
        assert code in (None, ErrorCode.FRAME_TOO_LARGE), frames
        assert all(k in (Kind.ERROR, Kind.PING) for k, _ in frames), frames

        after = await server.stats_when(
            lambda s: s["all"] == 0 and s["fds"] == baseline["fds"], what="connections gone"
        )
        rss_growth = after["rss"] - baseline["rss"]
        assert rss_growth < 16 << 20, f"server RSS grew by {rss_growth / 2**20:.1f} MiB"
        if phase == "after-hello":
            assert after["reasons"] == {"PROTOCOL_ERROR": 2}, after
        else:
            assert after["prehandshake"] == {"PROTOCOL_ERROR": 2}, after
        assert after["errors"] == 0 and after["exc_handler"] == 0, after
        report(
            f"4GiB {phase}",
            answered_ms=answered * 1000,
            junk_after_error_kib=accepted_after // 1024,
            junk_in_stream_kib=accepted // 1024,
            stream_cut_ms=cut_after * 1000,
            error_seen_in_stream=code is not None,
            rss_growth_kib=rss_growth // 1024,
        )
    finally:
        await server.kill()


# --- 3. idle sockets and slow-loris dribblers -------------------------------------------------------


HANDSHAKE_TIMEOUT = 1.0
FRAME_TIMEOUT = 1.5
#: How late (or, by clock granularity, early) a timeout may fire and still count as on time.
LATE = 500 * MS
EARLY = 50 * MS
N_IDLE = 300
N_DRIBBLERS = 300
DRIBBLE_PERIOD = 50 * MS


@dataclasses.dataclass
class Victim:
    conn: RawConn
    started: float = 0.0
    ended: float = 0.0
    code: int | None = None
    client_id: int = 0


async def await_error(victim: Victim) -> None:
    """Read until the ERROR frame (skipping pings and relays), note when, then read to EOF."""
    conn = victim.conn
    for _ in range(1_000_000):
        try:
            kind, body = await conn.next_frame()
        except EOFError:
            victim.ended = time.perf_counter()
            return
        if kind == Kind.ERROR:
            victim.ended = time.perf_counter()
            victim.code = ErrorFrame.parse(body).code
            await conn.read_to_end()
            return
        assert kind in _BENIGN, f"unexpected kind {kind:#x}"


@pytest.mark.slow
async def test_idle_and_slow_loris_connections_are_closed_on_time() -> None:
    disconnects: list[tuple[int, DisconnectReason]] = []
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        frame_timeout=FRAME_TIMEOUT,
        heartbeat_interval=0.5,
        heartbeat_timeout=2.0,
        on_disconnect=lambda c, r: disconnects.append((c.id, r)),
    )
    victims: list[Victim] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            publisher, *subscribers = await connect_many(stack, server.port, 4)
            healthy_ids = {c.id for c in (publisher, *subscribers)}
            window = Window(len(subscribers), batch=10)
            got: list[list[int]] = [[] for _ in subscribers]
            readers = [
                asyncio.create_task(subscribe(c, window, g))
                for c, g in zip(subscribers, got, strict=True)
            ]
            stop = asyncio.Event()
            tick = asyncio.Event()
            publishing = asyncio.create_task(Stream(publisher, window, tick=tick).run(stop))

            async def idle() -> Victim:
                conn = await RawConn.connect(server.port)
                return Victim(conn, started=time.perf_counter())

            async def dribbler() -> Victim:
                conn = await RawConn.connect(server.port)
                victim = Victim(conn)
                victim.client_id = await conn.handshake()
                # A MULTICAST announcing a 1000-byte body, which will never be finished in time.
                await conn.send(HEADER.pack(1001, Kind.MULTICAST))
                victim.started = time.perf_counter()
                return victim

            try:
                idles = await asyncio.gather(*(idle() for _ in range(N_IDLE)))
                victims += idles
                dribblers = await asyncio.gather(*(dribbler() for _ in range(N_DRIBBLERS)))
                victims += dribblers
                tasks += [asyncio.create_task(await_error(v)) for v in victims]
                # The dribble: one byte per period to every dribbler not yet cut off (this sleep
                # paces the attack; it synchronises nothing).
                deadline = time.perf_counter() + FRAME_TIMEOUT + 5.0
                for _ in range(1000):
                    pending = [v for v in dribblers if not v.ended]
                    if not pending or time.perf_counter() > deadline:
                        break
                    for v in pending:
                        with contextlib.suppress(OSError):
                            v.conn.sock.send(b"\x00")
                    tick.set()
                    await asyncio.sleep(DRIBBLE_PERIOD)
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
                stop.set()
                sent = await asyncio.wait_for(publishing, 30)
                await asyncio.wait_for(asyncio.gather(*readers), 30)
            finally:
                stop.set()
                for task in (*readers, publishing):
                    task.cancel()
                await asyncio.gather(*readers, publishing, return_exceptions=True)

            idle_times = [v.ended - v.started for v in idles]
            loris_times = [v.ended - v.started for v in dribblers]
            wrong = [v.code for v in idles if v.code != ErrorCode.HANDSHAKE_TIMEOUT]
            assert not wrong, f"{len(wrong)} idle sockets got {collections.Counter(wrong)}"
            wrong = [v.code for v in dribblers if v.code != ErrorCode.FRAME_TIMEOUT]
            assert not wrong, f"{len(wrong)} dribblers got {collections.Counter(wrong)}"
            assert all(v.conn.eof for v in victims), "every victim's connection was closed"
            assert HANDSHAKE_TIMEOUT - EARLY <= min(idle_times), min(idle_times)
            assert max(idle_times) <= HANDSHAKE_TIMEOUT + LATE, max(idle_times)
            assert FRAME_TIMEOUT - EARLY <= min(loris_times), min(loris_times)
            assert max(loris_times) <= FRAME_TIMEOUT + LATE, max(loris_times)
            # Dribblers were connected: each reported once, as a frame timeout. Idle sockets never
            # connected, so on_disconnect does not see them (their ERROR frame was checked above).
            by_id = collections.Counter(cid for cid, _ in disconnects)
            assert set(by_id) == {v.client_id for v in dribblers}
            assert max(by_id.values()) == 1
            assert {r for _, r in disconnects} == {DisconnectReason.FRAME_TIMEOUT}
            assert not healthy_ids & set(by_id), "a healthy client was disconnected"
            assert len(server._all) == len(healthy_ids)
            for i, g in enumerate(got):
                assert_gap_free(g, sent, f"subscriber {i}")
            report(
                "slow-loris",
                handshake_timeout_s=f"{min(idle_times):.3f}..{max(idle_times):.3f}",
                frame_timeout_s=f"{min(loris_times):.3f}..{max(loris_times):.3f}",
                relayed=sent,
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for v in victims:
            v.conn.close()
        server.close()
        await server.wait_closed()


# --- 4. slow consumers: cut, drop-oldest, keep-latest, inbound flow control -------------------------


#: A 1 KiB frame carrying a sequence number (padding after it); the server relays it unregistered.
PADDED_REGISTRY = Registry()
SEQ_1K = PADDED_REGISTRY.register("SQK", "<q1000x")
SEQ_200 = PADDED_REGISTRY.register("SQ2", "<q200x")
#: The same 1 KiB frame for server.multicast(), which encodes with the server's registry.
SERVER_REGISTRY = Registry()
SEQ_1K_SERVER = SERVER_REGISTRY.register("SQK", "<q1000x")


class Sampler:
    """Sample ``value()`` every few ms (the sleep paces the sampling) while ``alive()``."""

    def __init__(self, value: Callable[[], int], alive: Callable[[], bool]) -> None:
        self.value = value
        self.alive = alive
        self.max = 0
        self.samples = 0
        self.first_nonzero: float | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        deadline = time.perf_counter() + 60
        while self.alive() and time.perf_counter() < deadline:
            v = self.value()
            self.samples += 1
            if v and self.first_nonzero is None:
                self.first_nonzero = time.perf_counter()
            self.max = max(self.max, v)
            await asyncio.sleep(2 * MS)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def remote(server: trame_async.Server, client_id: int) -> RemoteClient:
    for c in server.clients:
        if c.id == client_id:
            return c
    raise AssertionError(f"client {client_id} is not connected")


SLOW_TIMEOUT = 1.0


@pytest.mark.slow
async def test_subscriber_that_never_reads_is_cut_and_bounded() -> None:
    max_queue = 256 << 10
    cut: dict[int, tuple[DisconnectReason, float]] = {}
    cut_event = asyncio.Event()

    def on_disconnect(client: RemoteClient, reason: DisconnectReason) -> None:
        assert client.id not in cut, f"client {client.id} reported twice"
        cut[client.id] = (reason, time.perf_counter())
        cut_event.set()

    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy="disconnect",
        max_frame_size=64 << 10,
        max_queue_bytes=max_queue,
        send_buffer_size=64 << 10,
        slow_consumer_timeout=SLOW_TIMEOUT,
        heartbeat_interval=None,
        on_disconnect=on_disconnect,
    )
    slow = await RawConn.connect(server.port, rcvbuf=64 << 10)
    try:
        async with contextlib.AsyncExitStack() as stack:
            publisher, *subscribers = await connect_many(
                stack, server.port, 6, registry=PADDED_REGISTRY
            )
            slow_id = await slow.handshake()  # and then never reads again
            slow_rc = remote(server, slow_id)
            window = Window(len(subscribers), batch=20)
            got: list[list[int]] = [[] for _ in subscribers]
            readers = [
                asyncio.create_task(subscribe(c, window, g))
                for c, g in zip(subscribers, got, strict=True)
            ]
            stop = asyncio.Event()
            stream = Stream(publisher, window, SEQ_1K)
            sampler = Sampler(lambda: slow_rc.queued_bytes, lambda: slow_rc.is_open)
            started = time.perf_counter()
            publishing = asyncio.create_task(stream.run(stop, max_frames=200_000))
            try:
                await asyncio.wait_for(cut_event.wait(), SLOW_TIMEOUT + 10)
                # Publishing resumes once the laggard is gone: 50 more batches reach everyone.
                await window.wait(stream.sent // window.batch + 50)
                stop.set()
                sent = await asyncio.wait_for(publishing, 30)
                await asyncio.wait_for(asyncio.gather(*readers), 30)
            finally:
                stop.set()
                await sampler.stop()
                for task in (*readers, publishing):
                    task.cancel()
                await asyncio.gather(*readers, publishing, return_exceptions=True)

            reason, cut_at = cut[slow_id]
            assert reason is DisconnectReason.SLOW_CONSUMER
            assert server.slow_consumers == 1
            assert set(cut) == {slow_id}, f"only the laggard is cut: {cut}"
            detection = cut_at - started
            congested_for = cut_at - (sampler.first_nonzero or started)
            # Publishers are not paused for it: its budget fills within the kernel buffers' time
            # at this rate and it is cut then, or at the latest by the progress checks.
            assert detection <= 1.25 * SLOW_TIMEOUT + 2 * LATE, detection
            assert server.stats()["budget_pauses"] == 0
            frame = len(PADDED_REGISTRY.encode(SEQ_1K, 0)) + 4
            # The server's own peak, taken at every write and every budget decision.
            peak = server.stats()["peak_queued_bytes"]
            # Over the budget by at most what one read of the publisher relays as one object (the
            # disconnect policy batches a chunk's multicasts): the loops read 256 KiB at most.
            assert sampler.max <= peak <= max_queue + max(frame, 256 << 10), (sampler.max, peak)
            for i, g in enumerate(got):
                assert_gap_free(g, sent, f"subscriber {i}")
            report(
                "slow consumer cut",
                detection_s=detection,
                congested_before_cut_s=congested_for,
                max_queued_kib=sampler.max / 1024,
                peak_queued_kib=peak / 1024,
                budget_kib=max_queue // 1024,
                samples=sampler.samples,
                relayed=sent,
            )
    finally:
        slow.close()
        server.close()
        await server.wait_closed()


def read_relays(frames: list[tuple[int, bytes]]) -> list[tuple[str, Any]]:
    """Turn raw frames into ("relay", Message) and ("dropped", count) events, in order."""
    events: list[tuple[str, Any]] = []
    for kind, body in frames:
        if kind == Kind.RELAY:
            events.append(
                ("relay", PADDED_REGISTRY.decode_frame(bytes([kind]) + body, strict=False))
            )
        elif kind == Kind.DROPPED:
            events.append(("dropped", int.from_bytes(body, "big")))
        else:
            raise AssertionError(f"unexpected kind {kind:#x}")
    return events


async def read_until(
    conn: RawConn, done: Callable[[list[tuple[int, bytes]]], bool]
) -> list[tuple[int, bytes]]:
    """Read frames from ``conn`` until ``done(frames)``; fail after 20 s."""
    frames: list[tuple[int, bytes]] = []
    async with asyncio.timeout(20):
        while not done(frames):
            frames.append(await conn.next_frame())
    return frames


@pytest.mark.slow
async def test_drop_oldest_skips_to_the_newest_frames_and_says_how_many() -> None:
    max_queue = 64 << 10
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy="drop-oldest",
        max_frame_size=4096,
        max_queue_bytes=max_queue,
        send_buffer_size=16 << 10,
        write_high_water=16 << 10,
        heartbeat_interval=None,
    )  # and the default slow_consumer_timeout: the stalled reader is cut only if stuck for 5 s
    stalled = await RawConn.connect(server.port, rcvbuf=16 << 10)
    n = 3000
    try:
        async with contextlib.AsyncExitStack() as stack:
            publisher, *subscribers = await connect_many(
                stack, server.port, 4, registry=PADDED_REGISTRY
            )
            stalled_rc = remote(server, await stalled.handshake())
            healthy_rcs = [remote(server, c.id) for c in subscribers]
            window = Window(len(subscribers), batch=16)
            got: list[list[int]] = [[] for _ in subscribers]
            readers = [
                asyncio.create_task(subscribe(c, window, g))
                for c, g in zip(subscribers, got, strict=True)
            ]
            sampler = Sampler(lambda: stalled_rc.queued_bytes, lambda: stalled_rc.is_open)
            try:
                sent = await asyncio.wait_for(
                    Stream(publisher, window, SEQ_200).run(asyncio.Event(), max_frames=n), 30
                )
                await asyncio.wait_for(asyncio.gather(*readers), 30)
            finally:
                await sampler.stop()
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            for i, g in enumerate(got):
                assert_gap_free(g, sent, f"healthy subscriber {i}")
            assert [rc.dropped for rc in healthy_rcs] == [0] * len(healthy_rcs)
            assert stalled_rc.dropped > 0, "the stalled reader was over its budget"
            assert server.dropped_frames == stalled_rc.dropped

            # The stalled reader catches up: old frames, then DROPPED(k) right where k are missing.
            frames = await read_until(
                stalled,
                lambda fs: (
                    bool(fs)
                    and fs[-1][0] == Kind.RELAY
                    and PADDED_REGISTRY.decode_frame(
                        bytes([fs[-1][0]]) + fs[-1][1], strict=False
                    ).value
                    == SENTINEL
                ),
            )
        events = read_relays(frames)
        previous = -1
        pending = 0
        notices = 0
        for what, item in events:
            if what == "dropped":
                pending += item
                notices += 1
                continue
            seq = item.value if item.value != SENTINEL else sent
            assert seq - previous - 1 == pending, (
                f"after {previous} came {seq}: {seq - previous - 1} missing, DROPPED said {pending}"
            )
            previous, pending = seq, 0
        assert previous == sent, "the newest frames arrive, the sentinel last"
        total_notified = sum(item for what, item in events if what == "dropped")
        assert total_notified == stalled_rc.dropped == sent - (len(events) - notices - 1)
        frame = len(PADDED_REGISTRY.encode(SEQ_200, 0)) + 4
        peak = server.stats()["peak_queued_bytes"]
        assert sampler.max <= peak <= max_queue + frame, (sampler.max, peak)
        assert server.slow_consumers == 0
        report(
            "drop-oldest",
            published=sent,
            delivered_to_stalled=len(events) - notices - 1,
            dropped=stalled_rc.dropped,
            notices=notices,
            max_queued_kib=sampler.max / 1024,
            peak_queued_kib=peak / 1024,
        )
    finally:
        stalled.close()
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_keep_latest_delivers_each_senders_latest_value() -> None:
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy="keep-latest",
        max_frame_size=4096,
        max_queue_bytes=16 << 10,
        send_buffer_size=8 << 10,
        write_high_water=8 << 10,
        heartbeat_interval=None,
    )  # and the default slow_consumer_timeout
    stalled = await RawConn.connect(server.port, rcvbuf=8 << 10)
    n = 2000  # positions per sender
    try:
        async with contextlib.AsyncExitStack() as stack:
            senders = await connect_many(stack, server.port, 3)
            subscribers = await connect_many(stack, server.port, 3)
            stalled_rc = remote(server, await stalled.handshake())
            healthy_rcs = [remote(server, c.id) for c in subscribers]
            sender_ids = [c.id for c in senders]
            window = Window(len(subscribers), batch=3 * 16)
            got: list[dict[int, list[float]]] = [collections.defaultdict(list) for _ in subscribers]

            async def healthy(client: Client, positions: dict[int, list[float]]) -> None:
                finished = 0
                async with asyncio.timeout(30):
                    while finished < len(senders):
                        msg = await client.receive()
                        if msg.trame == INT:
                            finished += 1
                            continue
                        positions[msg.sender].append(msg.value.x)
                        window.received(int(msg.value.x))

            readers = [
                asyncio.create_task(healthy(c, g)) for c, g in zip(subscribers, got, strict=True)
            ]
            try:
                # Positions x = 0, 1, 2, ... round robin over the senders (x % 3 is the sender).
                x = 0
                for k in range(n // 16):
                    for _ in range(16):
                        for index, sender in enumerate(senders):
                            await sender.multicast(POS, (float(x), float(index)))
                            x += 1
                    await window.wait(k - 1)
                for sender in senders:
                    await sender.multicast(INT, SENTINEL)  # another trame: never folded into POS
                await asyncio.wait_for(asyncio.gather(*readers), 30)
            finally:
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            total = x
            expected = {
                sid: [float(v) for v in range(i, total, len(senders))]
                for i, sid in enumerate(sender_ids)
            }
            for positions in got:
                assert dict(positions) == expected, "healthy subscribers get every position"
            assert [rc.dropped for rc in healthy_rcs] == [0] * len(healthy_rcs)
            assert stalled_rc.dropped > 0
            assert server.dropped_frames == stalled_rc.dropped

            frames = await read_until(
                stalled,
                lambda fs: (
                    sum(1 for k, b in fs if k == Kind.RELAY and b[4:7] == b"INT") == len(senders)
                ),
            )
        per_sender: dict[int, list[float]] = collections.defaultdict(list)
        notified = 0
        for what, item in read_relays(frames):
            if what == "dropped":
                notified += item
            elif item.trame != INT:
                per_sender[item.sender].append(item.value[0])
        for sid in sender_ids:
            xs = per_sender[sid]
            assert xs == sorted(set(xs)), f"sender {sid}: positions out of order or repeated"
            assert xs[-1] == expected[sid][-1], f"sender {sid}: the latest position comes last"
        received = sum(len(xs) for xs in per_sender.values())
        assert notified == stalled_rc.dropped == total - received
        frame = len(trame_async.encode(POS, (0.0, 0.0))[0]) + 4
        peak = server.stats()["peak_queued_bytes"]
        assert peak <= (16 << 10) + frame, peak
        assert server.slow_consumers == 0
        report(
            "keep-latest",
            published=total,
            delivered_to_stalled=received,
            dropped=notified,
            peak_queued_kib=peak / 1024,
        )
    finally:
        stalled.close()
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_keep_latest_delivers_every_data_reply_to_a_congested_client() -> None:
    """A stalled client over its budget under keep-latest: the server's multicasts (one stream,
    variable-length STR frames) fold to the newest, its DATA replies all arrive, in order."""
    max_queue = 64 << 10
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy="keep-latest",
        max_frame_size=4096,
        max_queue_bytes=max_queue,
        send_buffer_size=8 << 10,
        write_high_water=8 << 10,
        heartbeat_interval=None,
    )
    stalled = await RawConn.connect(server.port, rcvbuf=8 << 10)
    n = 3000
    try:
        rc = remote(server, await stalled.handshake())
        # Without yielding: the kernel and transport buffers fill, then the budget is passed
        # many times over (3000 multicasts of about 120 bytes), with a reply every tenth frame.
        for i in range(n):
            server.multicast(STR, f"{i} " + "x" * (100 + i % 37))
            if i % 10 == 0:
                rc.send(STR, f"reply {i // 10}")
        rc.send(INT, SENTINEL)
        assert rc.dropped > 0, "the stalled client was over its budget"
        frames = await read_until(
            stalled,
            lambda fs: bool(fs) and fs[-1][0] == Kind.DATA and fs[-1][1][:3] == b"INT",
        )
    finally:
        stalled.close()
        server.close()
        await server.wait_closed()
    replies: list[str] = []
    relays: list[int] = []
    notified = 0
    for kind, body in frames:
        if kind == Kind.DROPPED:
            notified += int.from_bytes(body, "big")
            continue
        msg = REGISTRY.decode_frame(bytes([kind]) + body)
        if kind == Kind.DATA:
            replies.append(msg.value)
        else:
            assert kind == Kind.RELAY and msg.sender == 0, (kind, msg)
            relays.append(int(msg.value.split()[0]))
    assert replies == [f"reply {k}" for k in range(n // 10)] + [SENTINEL]
    assert relays == sorted(set(relays)) and relays[-1] == n - 1, "newest multicast last"
    assert notified == rc.dropped == n - len(relays), "only multicasts are dropped"
    report("keep-latest data replies", multicasts=n, delivered=len(relays), replies=len(replies))


#: Three streams (trame codes) of sequence numbers: keep-latest keeps the newest of each.
STREAMS_REGISTRY = Registry()
STREAMS = [STREAMS_REGISTRY.register(f"LA{k}", "<q") for k in range(3)]


class PacedReader:
    """A raw client that reads at most ``chunk`` bytes every ``period`` seconds (the sleep paces
    the reader), until it has seen ``SENTINEL`` on every stream of :data:`STREAMS`.

    ``period`` may be changed while it runs (0: read as fast as it can).
    """

    def __init__(self, conn: RawConn, chunk: int, period: float) -> None:
        self.conn = conn
        self.chunk = chunk
        self.period = period
        self.bytes = 0
        #: ("relay", (code, value)) and ("dropped", count), in arrival order.
        self.events: list[tuple[str, Any]] = []
        self.finished: set[str] = set()
        self.other: list[int] = []
        #: time.perf_counter() of each read.
        self.read_at: list[float] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        deadline = time.perf_counter() + 120
        assert not conn.frames, f"unexpected frames with the WELCOME: {conn.frames}"
        while len(self.finished) < len(STREAMS) and time.perf_counter() < deadline:
            data = await loop.sock_recv(conn.sock, self.chunk)
            if not data:
                return
            self.read_at.append(time.perf_counter())
            self.bytes += len(data)
            conn.buf += data
            for kind, body in split_frames(conn.buf):
                if kind == Kind.RELAY:
                    code = body[4:7].decode()
                    value = int.from_bytes(body[-8:], "little", signed=True)
                    self.events.append(("relay", (code, value)))
                    if value == SENTINEL:
                        self.finished.add(code)
                elif kind == Kind.DROPPED:
                    self.events.append(("dropped", int.from_bytes(body, "big")))
                else:
                    self.other.append(kind)
            if self.period:
                await asyncio.sleep(self.period)

    def values(self) -> dict[str, list[int]]:
        """Return the values received per stream code, in order."""
        out: dict[str, list[int]] = {t.code: [] for t in STREAMS}
        for what, item in self.events:
            if what == "relay":
                out[item[0]].append(item[1])
        return out

    def notified(self) -> int:
        return sum(item for what, item in self.events if what == "dropped")

    def longest_gap(self, until: float) -> float:
        """Return the longest time without a read, from the first read to ``until``."""
        times = [t for t in self.read_at if t <= until] + [until]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def publish_streams(publisher: Client, seconds: float, max_frames: int = 5_000_000) -> int:
    """Multicast 0, 1, 2, ... round robin over :data:`STREAMS` for ``seconds``, then the sentinel
    on each stream; return how many values were sent (sentinels not counted)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    seq = 0
    while seq < max_frames and loop.time() < end:
        for _ in range(300):
            await publisher.multicast(STREAMS[seq % 3], seq)
            seq += 1
        await asyncio.sleep(0)  # let the server run its writes even if the publisher never waits
    for trame in STREAMS:
        await publisher.multicast(trame, SENTINEL)
    return seq


@pytest.mark.slow
@pytest.mark.skipif(
    sys.platform != "linux", reason="a reader's progress inside the kernel is seen on Linux only"
)
@pytest.mark.parametrize("policy", ["drop-oldest", "keep-latest"])
async def test_drop_policies_keep_a_lagging_reader_and_cut_only_a_stuck_one(policy: str) -> None:
    """Under the drop policies a reader that lags is fed, however long it stays congested; only
    one that takes nothing of its backlog for slow_consumer_timeout is cut."""
    timeout = 1000 * MS
    high_water = 512 << 10
    rcvbuf = 16 << 10
    # Each read empties the receive buffer, so that each opens the TCP window and shows as
    # progress (the server's SIOCOUTQ goes down); at most 200 KB/s.
    chunk, period = rcvbuf, 80 * MS
    # The test is meaningful only if one congestion (from the high-water mark down to the low
    # one, a quarter of it) outlasts the first cut a progress-blind server would make.
    assert 0.75 * high_water / (chunk / period) > 1.5 * timeout
    log = DisconnectLog()
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy=policy,
        slow_consumer_timeout=timeout,
        write_high_water=high_water,
        heartbeat_interval=None,
        on_disconnect=log,
    )  # default budget (4 MiB) and send buffer
    lagging = await RawConn.connect(server.port, rcvbuf=rcvbuf)
    stuck = await RawConn.connect(server.port, rcvbuf=rcvbuf)
    reader: PacedReader | None = None
    try:
        lagging_rc = remote(server, await lagging.handshake())
        stuck_id = await stuck.handshake()  # and never reads again
        stuck_rc = remote(server, stuck_id)
        # Past the high-water mark: congested (its transport's buffer is then at most one
        # write behind, at this publishing rate).
        congested = Sampler(
            lambda: int(stuck_rc.queued_bytes > high_water), lambda: stuck_rc.is_open
        )
        reader = PacedReader(lagging, chunk=chunk, period=period)
        async with trame_async.connect(
            "127.0.0.1", server.port, rtt_interval=None, registry=STREAMS_REGISTRY
        ) as publisher:
            sent = await publish_streams(publisher, seconds=4 * timeout)
            ended_at = time.perf_counter()
            await log.wait([stuck_id])
            await congested.stop()
            if not lagging_rc.is_open:
                cut_at = log.reports[lagging_rc.id][0][1]
                gap = reader.longest_gap(cut_at)
                if gap >= timeout / 2:
                    # A loaded machine starved this process: the reader really took nothing for
                    # about a timeout, and the server was right to cut it. No verdict.
                    pytest.skip(f"the reader was stalled for {gap:.3f} s (timeout {timeout:g} s)")
                raise AssertionError(
                    f"the lagging reader was cut, its longest gap between reads {gap:.3f} s: "
                    f"{log.reports}"
                )
            assert lagging_rc.queued_bytes, "it was lagging"
            longest_gap = reader.longest_gap(ended_at)
            reader.period = 0  # catch up now
            await asyncio.wait_for(reader.task, 60)
        reason, cut_at = log.reports[stuck_id][0]
        assert reason is DisconnectReason.SLOW_CONSUMER
        assert congested.first_nonzero is not None
        stuck_for = cut_at - congested.first_nonzero
        # From its last progress (here: its first congestion), one to two timeouts.
        assert timeout - EARLY <= stuck_for <= 2 * timeout + LATE, stuck_for
        assert lagging_rc.id not in log.reports, log.reports
        cut = {cid for cid, reports in log.reports.items() if reports[0][0] is reason}
        assert cut == {stuck_id}, f"only the stuck reader was cut: {log.reports}"
        assert server.slow_consumers == 1
        assert not reader.other, reader.other
        values = reader.values()
        for code, got in values.items():
            assert got[-1] == SENTINEL, f"{code}: the newest value comes last"
            assert got[:-1] == sorted(set(got[:-1])), f"{code}: out of order or repeated"
        received = sum(len(v) - 1 for v in values.values())
        assert lagging_rc.dropped > 0, "the lagging reader was over its budget at some point"
        assert reader.notified() == lagging_rc.dropped == sent - received
        report(
            f"lagging under {policy}",
            published=sent,
            delivered=received,
            dropped=lagging_rc.dropped,
            stuck_cut_after_s=stuck_for,
            longest_read_gap_s=longest_gap,
        )
    finally:
        if reader is not None:
            reader.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader.task
        lagging.close()
        stuck.close()
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_keep_latest_feeds_a_slow_reader_the_newest_values_not_the_backlog() -> None:
    """Default budget (4 MiB), buffers and timeout: a reader slower than the stream, but reading,
    gets at most what the buffers on the way hold once the stream stops, then the newest values;
    it is never cut."""
    log = DisconnectLog()
    config = trame_async.ServerConfig(slow_consumer_policy="keep-latest", heartbeat_interval=None)
    server = await trame_async.start_server("127.0.0.1", 0, config=config, on_disconnect=log)
    rcvbuf = 16 << 10
    slow = await RawConn.connect(server.port, rcvbuf=rcvbuf)
    reader: PacedReader | None = None
    try:
        slow_rc = remote(server, await slow.handshake())
        reader = PacedReader(slow, chunk=2048, period=5 * MS)  # at most 400 KB/s
        async with trame_async.connect(
            "127.0.0.1", server.port, rtt_interval=None, registry=STREAMS_REGISTRY
        ) as publisher:
            sent = await publish_streams(publisher, seconds=3.0)
            stopped_at, before = time.perf_counter(), reader.bytes
            await asyncio.wait_for(reader.task, 30)
            caught_up = time.perf_counter() - stopped_at
        backlog = reader.bytes - before
        # What may still be on the way when the stream stops: the kernel buffers (Linux doubles
        # what is asked), the transport's buffer and one slice of write_high_water, and the
        # newest frame of each stream.
        on_the_way = (
            2 * config.send_buffer_size + 2 * rcvbuf + 2 * config.write_high_water + (4 << 10)
        )
        assert backlog <= on_the_way, (
            f"{backlog} bytes after the stream stopped: an old backlog, not the newest values"
        )
        assert on_the_way < config.max_queue_bytes // 4, "the test tells backlog from buffers"
        assert slow_rc.is_open and slow_rc.id not in log.reports, log.reports
        assert server.slow_consumers == 0
        assert not reader.other, reader.other
        values = reader.values()
        for code, got in values.items():
            assert got[-1] == SENTINEL, f"{code}: the newest value comes last"
            assert got[:-1] == sorted(set(got[:-1])), f"{code}: out of order or repeated"
        received = sum(len(v) - 1 for v in values.values())
        assert slow_rc.dropped > 0, "the reader was slower than the stream"
        assert reader.notified() == slow_rc.dropped == sent - received
        report(
            "keep-latest slow reader",
            published=sent,
            delivered=received,
            backlog_at_stop_kib=backlog / 1024,
            bound_kib=on_the_way / 1024,
            caught_up_s=caught_up,
        )
    finally:
        if reader is not None:
            reader.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader.task
        slow.close()
        server.close()
        await server.wait_closed()


#: A subscriber in its own process that does a fixed amount of CPU work per message.
SLOW_READER_SCRIPT = """\
import asyncio, json, sys, time
import trame_async

async def main():
    port, work_us, max_queue = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    client = await trame_async.connect(
        "127.0.0.1", port, rtt_interval=None, max_queue=max_queue
    )
    print(json.dumps({"id": client.id}), flush=True)
    expected, first = 0, None
    while True:
        msg = await client.receive(timeout=60)
        if first is None:
            first = time.monotonic()
        if msg.value == -1:
            break
        if msg.value != expected:
            print(json.dumps({"error": f"got {msg.value}, expected {expected}"}), flush=True)
            return
        expected += 1
        end = time.perf_counter() + work_us / 1e6
        while time.perf_counter() < end:  # CPU work, not a sleep: the reader is busy
            pass
    last = time.monotonic()
    print(json.dumps({"count": expected, "first": first, "last": last, "dropped": client.dropped}), flush=True)
    await client.close()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the reader runs in its own process anyway
async def test_fast_publisher_is_slowed_to_a_slow_readers_pace_without_loss() -> None:
    """The opt-in pace mode: publishers wait for a congested reader that keeps draining."""
    disconnects: list[tuple[int, DisconnectReason]] = []
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        slow_consumer_policy="disconnect",
        flow_control="pace",
        slow_consumer_timeout=2.0,
        send_buffer_size=64 << 10,
        on_disconnect=lambda c, r: disconnects.append((c.id, r)),
    )
    n = 40_000  # 1 KiB frames: 40 MB, several times what the kernel buffers on the way may hold
    # Control: how fast this publisher goes when nobody has to receive.
    async with trame_async.connect(
        "127.0.0.1", server.port, rtt_interval=None, registry=PADDED_REGISTRY
    ) as publisher:
        start = time.monotonic()
        for seq in range(n // 4):
            await publisher.multicast(SEQ_1K, seq)
        free_rate = (n // 4) / (time.monotonic() - start)
    reader = await spawn(["-c", SLOW_READER_SCRIPT, str(server.port), "20", "64"])
    try:
        hello = json.loads(await read_line(reader, 20))
        async with trame_async.connect(
            "127.0.0.1", server.port, rtt_interval=None, registry=PADDED_REGISTRY
        ) as publisher:
            start = time.monotonic()
            for seq in range(n):
                await publisher.multicast(SEQ_1K, seq)  # must never raise
            published = time.monotonic()
            await publisher.multicast(SEQ_1K, SENTINEL)
            result = json.loads(await read_line(reader, 60))
            assert "error" not in result, result
            assert result["count"] == n and result["dropped"] == 0, result
            assert await asyncio.wait_for(reader.wait(), 20) == 0
            assert server.slow_consumers == 0
            # Nobody was cut: the reader said goodbye itself (the control publisher too).
            assert [r for cid, r in disconnects if cid == hello["id"]] == [DisconnectReason.GOODBYE]
            assert {r for _, r in disconnects} == {DisconnectReason.GOODBYE}, disconnects
        pub_rate = n / (published - start)
        read_rate = n / (result["last"] - result["first"])
        ahead = result["last"] - published
        # Unthrottled, the publisher would be done long before the reader; with inbound flow
        # control it can only run ahead by what the buffers hold.
        assert pub_rate < 1.5 * read_rate, (pub_rate, read_rate)
        assert pub_rate < 0.7 * free_rate, (pub_rate, free_rate)
        report(
            "inbound flow control",
            publisher_alone_per_s=free_rate,
            publisher_per_s=pub_rate,
            reader_per_s=read_rate,
            reader_finished_after_publisher_s=ahead,
        )
    finally:
        await stop_process(reader)
        server.close()
        await server.wait_closed()


# --- 5. killed and hung client processes, connection churn -------------------------------------------


HB_INTERVAL = 0.1
HB_TIMEOUT = 0.2
N_SIGNALLED = 20  # of each signal
PROCESS_BATCH = 10  # processes started and signalled together (half SIGKILL, half SIGSTOP)
N_CYCLES = 2000
CYCLE_BATCH = 50


class DisconnectLog:
    """on_disconnect reports by client id, with the time; a future per awaited id."""

    def __init__(self) -> None:
        self.reports: dict[int, list[tuple[DisconnectReason, float]]] = collections.defaultdict(
            list
        )
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def __call__(self, client: RemoteClient, reason: DisconnectReason) -> None:
        self.reports[client.id].append((reason, time.perf_counter()))
        waiter = self._waiters.pop(client.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, ids: list[int], timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for cid in ids:
            if cid not in self.reports:
                fut = self._waiters[cid] = loop.create_future()
                futures.append(fut)
        if futures:
            _, pending = await asyncio.wait(futures, timeout=timeout)
            assert not pending, (
                f"{len(pending)} of {len(ids)} disconnects not reported in {timeout:g} s"
            )


#: Server RSS growth allowed across the kill/stop/churn scenario, warm-up done.
CHURN_RSS_GROWTH_MAX = 5 << 20
N_WARM_CYCLES = 200


async def churn(port: int, n: int, expected: dict[int, DisconnectReason]) -> None:
    """Connect and close ``n`` clients, ``CYCLE_BATCH`` at a time: half say goodbye, half abort
    their socket (an RST, no GOODBYE). Note the reason each must be reported with."""

    async def cycle(j: int) -> None:
        client = await trame_async.connect("127.0.0.1", port, rtt_interval=None)
        if j % 2 == 0:
            expected[client.id] = DisconnectReason.GOODBYE
            await client.close()
        else:
            expected[client.id] = DisconnectReason.CONNECTION_LOST
            transport = client._proto.transport if client._proto else None
            assert transport is not None
            transport.abort()
            await client.wait_closed()
            await client.close()

    for start in range(0, n, CYCLE_BATCH):
        await asyncio.gather(*(cycle(start + j) for j in range(min(CYCLE_BATCH, n - start))))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_killed_hung_and_churning_clients_are_each_reported_once_on_time(
    tmp_path: Path,
) -> None:
    # The loop's first child process sets up its one-time machinery (uvloop: a signal pipe).
    warm = await spawn(["-c", "pass"])
    await stop_process(warm)
    base_tasks = asyncio.all_tasks()
    server = await ServerProcess.start(
        {"heartbeat_interval": HB_INTERVAL, "heartbeat_timeout": HB_TIMEOUT},
        tmp_path / "server.err",
        report_disconnects=True,
    )
    expected: dict[int, DisconnectReason] = {}
    detection: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    try:
        # Warm-up (allocator pools, caches), then the server's baseline.
        await churn(server.port, N_WARM_CYCLES, expected)
        await server.wait_disconnects(list(expected))
        baseline = await server.stats_when(lambda s: s["all"] == 0, what="warm-up gone")
        base_fds = open_fds()

        # Client processes, killed or stopped several at a time.
        for _ in range(2 * N_SIGNALLED // PROCESS_BATCH):
            procs = await asyncio.gather(
                *(spawn(["-c", CLIENT_SCRIPT, str(server.port)]) for _ in range(PROCESS_BATCH))
            )
            try:
                ids = [int(await read_line(p, 30)) for p in procs]
                early = [cid for cid in ids if cid in server.disconnects]
                assert not early, f"clients {early} were disconnected before any signal"
                signalled: dict[int, tuple[str, float]] = {}
                for i, (proc, cid) in enumerate(zip(procs, ids, strict=True)):
                    sig = signal.SIGKILL if i % 2 == 0 else signal.SIGSTOP
                    signalled[cid] = (sig.name, time.monotonic())  # the server's clock too
                    os.kill(proc.pid, sig)
                    expected[cid] = (
                        DisconnectReason.CONNECTION_LOST
                        if sig is signal.SIGKILL
                        else DisconnectReason.HEARTBEAT_TIMEOUT
                    )
                await server.wait_disconnects(ids)
                for cid, (name, at) in signalled.items():
                    reason, when = server.disconnects[cid][0]
                    assert reason == expected[cid].name, f"{name} of client {cid}: {reason}"
                    detection[name].append(when - at)
            finally:
                for proc in procs:
                    await stop_process(proc)  # SIGCONT, SIGKILL, reap

        await churn(server.port, N_CYCLES, expected)
        await server.wait_disconnects(list(expected))

        reports = server.disconnects
        assert len(expected) == N_WARM_CYCLES + 2 * N_SIGNALLED + N_CYCLES
        twice = {cid: r for cid, r in reports.items() if len(r) != 1}
        assert not twice, f"reported more than once: {dict(list(twice.items())[:5])}"
        wrong = {
            cid: (reports[cid][0][0], want.name)
            for cid, want in expected.items()
            if reports[cid][0][0] != want.name
        }
        assert not wrong, f"{len(wrong)} wrong reasons, e.g. {dict(list(wrong.items())[:5])}"
        assert set(reports) == set(expected)
        kill_max = max(detection["SIGKILL"])
        stop_min, stop_max = min(detection["SIGSTOP"]), max(detection["SIGSTOP"])
        assert kill_max <= LATE, detection["SIGKILL"]
        # The first unanswered ping goes out within one interval; the timeout runs from there.
        assert HB_TIMEOUT - HB_INTERVAL / 2 <= stop_min, detection["SIGSTOP"]
        assert stop_max <= HB_INTERVAL + HB_TIMEOUT + 200 * MS, detection["SIGSTOP"]

        # Nothing left behind, in the server process and in this one.
        after = await server.stats_when(
            lambda s: s["all"] == 0 and s["fds"] == baseline["fds"],
            what=f"every connection gone, server descriptors back to {baseline['fds']}",
        )
        assert after["tasks"] == baseline["tasks"], (baseline, after)
        rss_growth = after["rss"] - baseline["rss"]
        assert rss_growth <= CHURN_RSS_GROWTH_MAX, (
            f"server RSS grew by {rss_growth / 2**20:.1f} MiB over the churn"
        )
        assert after["reasons"] == dict(collections.Counter(r.name for r in expected.values()))
        assert after["errors"] == 0 and after["exc_handler"] == 0, (
            after["log_samples"],
            after["exc_samples"],
        )
        await eventually_true(
            lambda: open_fds() == base_fds,
            "this process's descriptors back to baseline",
            detail=lambda: f"{open_fds()} open, baseline {base_fds}: {fd_targets()}",
        )
        await eventually_true(
            lambda: asyncio.all_tasks() <= base_tasks | {server._reader},
            "no task left but the test's own",
        )
        report(
            "kill/stop/churn",
            sigkill_detect_ms_max=kill_max * 1000,
            sigstop_detect_ms=f"{stop_min * 1000:.0f}..{stop_max * 1000:.0f}",
            reports=len(reports),
            server_rss_growth_kib=rss_growth // 1024,
            server_fds=after["fds"],
        )
        final = await server.stop()
        assert final["errors"] == 0 and final["exc_handler"] == 0, final
    finally:
        await server.kill()


async def test_a_client_cannot_make_itself_count_as_a_slow_consumer() -> None:
    log = DisconnectLog()
    server = await trame_async.start_server("127.0.0.1", 0, on_disconnect=log)
    conn = await RawConn.connect(server.port)
    try:
        client_id = await conn.handshake()
        await conn.send(ErrorFrame(ErrorCode.SLOW_CONSUMER, "I am slow, count me").encode())
        await log.wait([client_id])
        assert server.slow_consumers == 0
        assert log.reports[client_id][0][0] is DisconnectReason.ERROR_RECEIVED
    finally:
        conn.close()
        server.close()
        await server.wait_closed()


async def test_burst_over_budget_is_cut_at_once() -> None:
    """Server-originated multicasts are not flow-controlled: going over the budget cuts at once,
    long before the slow-consumer timeout, and the queue never holds more than the budget."""
    log = DisconnectLog()
    max_queue = 64 << 10
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        registry=SERVER_REGISTRY,
        max_frame_size=4096,
        max_queue_bytes=max_queue,
        send_buffer_size=16 << 10,
        slow_consumer_timeout=30.0,
        heartbeat_interval=None,
        on_disconnect=log,
    )
    stalled = await RawConn.connect(server.port, rcvbuf=16 << 10)
    try:
        client_id = await stalled.handshake()
        rc = remote(server, client_id)
        most = 0
        start = time.perf_counter()
        for i in range(10_000):  # 10 MB in 1 KiB frames, without yielding: only the budget acts
            server.multicast(SEQ_1K_SERVER, i)
            if not rc.is_open:
                break
            most = max(most, rc.queued_bytes)
        await log.wait([client_id])
        reason, at = log.reports[client_id][0]
        assert reason is DisconnectReason.SLOW_CONSUMER
        assert server.slow_consumers == 1
        assert at - start < 1000 * MS, "cut on the budget, not by the 30 s timeout"
        frame = len(SERVER_REGISTRY.encode(SEQ_1K_SERVER, 0)) + 4
        assert most <= max_queue + frame, f"{most} bytes queued, budget {max_queue}"
        assert most <= server.peak_queued_bytes <= max_queue + frame, server.peak_queued_bytes
        report("budget overflow", frames_before_cut=i, max_queued_kib=most / 1024)
    finally:
        stalled.close()
        server.close()
        await server.wait_closed()
