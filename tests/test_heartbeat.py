"""Heartbeats: RTT, dead and hung peers on both ends, and the sans-I/O timer logic.

The socket tests run a real peer in a subprocess and kill it (SIGKILL: the kernel closes the socket)
or freeze it (SIGSTOP: the kernel keeps the connection open and ACKs, only the heartbeat notices).
Deadlines are checked against ``loop.time()`` taken at the signal. The socket tests run over plain
TCP and over TLS (the ``net`` fixture; certificates made at test time with trustme), the
server-in-a-subprocess ones through ``trame-serve --tls-cert/--tls-key``. The core tests at the end drive
:class:`~trame_async.protocol.ServerCore` and :class:`~trame_async.protocol.ClientCore` with a fake
clock: no loop, no socket, no waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import (
    CLIENT_SCRIPT,
    MS,
    TLS_CLIENT_SCRIPT,
    TlsFiles,
    eventually,
    make_tls,
    read_line,
    receive_n,
    spawn,
    stop_process,
    wait_listening,
)
from hypothesis import given
from hypothesis import strategies as st

import trame_async
from trame_async import (
    BYT,
    INT,
    Client,
    ConnectionClosed,
    DisconnectReason,
    Kind,
    RemoteClient,
)
from trame_async.protocol import ClientCore, CoreState, ServerCore, ServerLimits
from trame_async.wire import PROTOCOL_VERSION, FrameParser, Hello, Welcome, ping, pong

INTERVAL = 0.1
TIMEOUT = 0.2
#: Scheduling slack allowed on top of a deadline (two processes on two busy cores). The deadline
#: itself is already late by up to one timer-wheel slot (interval / 20 here) and one loop turn.
TOLERANCE = 200 * MS
SERVER_ARGS = [
    "-m",
    "trame_async",
    "--port",
    "0",
    "--heartbeat-interval",
    str(INTERVAL),
    "--heartbeat-timeout",
    str(TIMEOUT),
]


@dataclass(frozen=True)
class Net:
    """How a test reaches its peer: plain TCP (``tls is None``) or TLS with a test-time CA."""

    tls: TlsFiles | None

    def serve_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``serve()``/``start_server()``."""
        return {} if self.tls is None else {"ssl": self.tls.server_context()}

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``connect()``."""
        return {} if self.tls is None else {"ssl": self.tls.client_context()}

    def client_process(self, port: int) -> list[str]:
        """Arguments of ``python`` for a client in its own process (prints its id, reads)."""
        if self.tls is None:
            return ["-c", CLIENT_SCRIPT, str(port)]
        return ["-c", TLS_CLIENT_SCRIPT, str(port), str(self.tls.ca_file)]

    def server_process(self) -> list[str]:
        """Arguments of ``python`` for trame-serve with the short heartbeat."""
        return SERVER_ARGS if self.tls is None else [*SERVER_ARGS, *self.tls.cli_args()]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["tcp", "tls"])
def net(request: pytest.FixtureRequest) -> Net:
    return Net(request.getfixturevalue("tls_files") if request.param == "tls" else None)


# --- RTT ------------------------------------------------------------------------------------------


async def test_rtt_is_measured_on_both_ends(net: Net) -> None:
    async with (
        trame_async.serve(
            "127.0.0.1", 0, heartbeat_interval=0.05, heartbeat_timeout=1.0, **net.serve_kwargs()
        ) as server,
        trame_async.connect(
            "127.0.0.1", server.port, rtt_interval=0.05, **net.connect_kwargs()
        ) as client,
    ):
        (remote,) = server.clients
        await eventually(lambda: remote.rtt is not None, what="server-side rtt")
        await eventually(lambda: client.rtt is not None, what="client-side rtt")
        assert remote.rtt is not None and remote.rtt < 1.0
        assert client.rtt is not None and client.rtt < 1.0


async def test_rtt_is_never_negative() -> None:
    """Sample many round trips on both ends: a round-trip time below zero is impossible."""
    samples: list[float] = []
    seen: dict[object, float | None] = {}

    def sample() -> bool:
        for key, rtt in [(("s", r.id), r.rtt) for r in server.clients] + [
            (("c", c.id), c.rtt) for c in clients
        ]:
            # Count each new measurement once (equal values, e.g. clamped 0.0, count again).
            if rtt is not None and (seen.get(key) is not rtt or rtt == 0.0):
                seen[key] = rtt
                samples.append(rtt)
        return len(samples) >= 300

    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            trame_async.serve("127.0.0.1", 0, heartbeat_interval=0.01, heartbeat_timeout=1.0)
        )
        clients = [
            await stack.enter_async_context(
                trame_async.connect("127.0.0.1", server.port, rtt_interval=0.01)
            )
            for _ in range(5)
        ]
        await eventually(sample, 10, poll=MS, what="300 rtt samples")
    negative = [s for s in samples if s < 0]
    assert negative == [], f"{len(negative)} of {len(samples)} rtt samples < 0"


async def test_idle_but_live_peers_stay_connected_across_many_heartbeats(net: Net) -> None:
    """Nothing but pings and pongs for 20 heartbeat intervals: nobody is cut."""
    reports: list[DisconnectReason] = []
    async with (
        trame_async.serve(
            "127.0.0.1",
            0,
            heartbeat_interval=0.02,
            heartbeat_timeout=0.04,
            on_disconnect=lambda r, why: reports.append(why),
            **net.serve_kwargs(),
        ) as server,
        trame_async.connect(
            "127.0.0.1", server.port, rtt_interval=None, **net.connect_kwargs()
        ) as client,
    ):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.wait_closed(), 0.4)
        assert not client.closed and len(server.clients) == 1
        assert server.clients[0].rtt is not None  # pings did go back and forth
        await client.multicast(INT, 1)  # and the connection still works
        await client.send_data(INT, 2)
    assert reports == [DisconnectReason.GOODBYE]


# --- a dead or hung client ------------------------------------------------------------------------


class Stream:
    """A publisher streams sequence numbers; observers must get every one, in order.

    It runs in lock step (a round = a few multicasts, then every observer receives them), so
    its volume stays small and bounded and no sleep paces it.
    """

    def __init__(self, publisher: Client, observers: list[Client], batch: int = 5) -> None:
        self.publisher = publisher
        self.observers = observers
        self.batch = batch
        self.sent = 0
        self.received: list[list[tuple[int, int]]] = [[] for _ in observers]

    async def round(self) -> None:
        for _ in range(self.batch):
            await self.publisher.multicast(INT, self.sent)
            self.sent += 1
        for got, observer in zip(self.received, self.observers, strict=True):
            got.extend((m.sender, m.value) for m in await receive_n(observer, self.batch))

    async def run_until(self, done: asyncio.Event, timeout: float, max_rounds: int = 300) -> None:
        """Stream until ``done`` (at most ``max_rounds``), wait for it, stream 10 more rounds."""
        for _ in range(max_rounds):
            if done.is_set():
                break
            await self.round()
        await asyncio.wait_for(done.wait(), timeout)
        for _ in range(10):
            await self.round()

    def check(self) -> None:
        expected = [(self.publisher.id, i) for i in range(self.sent)]
        for got in self.received:
            assert got == expected


@pytest.mark.parametrize(
    ("sig", "reason"),
    [
        pytest.param(signal.SIGKILL, DisconnectReason.CONNECTION_LOST, id="SIGKILL"),
        pytest.param(signal.SIGSTOP, DisconnectReason.HEARTBEAT_TIMEOUT, id="SIGSTOP"),
    ],
)
async def test_dead_client_process_is_reported_once_in_time(
    net: Net, sig: signal.Signals, reason: DisconnectReason
) -> None:
    loop = asyncio.get_running_loop()
    reports: list[tuple[int, DisconnectReason, float]] = []
    victim_id = -1
    victim_gone = asyncio.Event()

    def on_disconnect(remote: RemoteClient, why: DisconnectReason) -> None:
        reports.append((remote.id, why, loop.time()))
        if remote.id == victim_id:
            victim_gone.set()

    proc = None
    try:
        async with trame_async.serve(
            "127.0.0.1",
            0,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=TIMEOUT,
            on_disconnect=on_disconnect,
            **net.serve_kwargs(),
        ) as server:
            proc = await spawn(net.client_process(server.port))
            victim_id = int(await read_line(proc))
            assert victim_id in [r.id for r in server.clients]
            port, tls = server.port, net.connect_kwargs()
            async with (
                trame_async.connect("127.0.0.1", port, **tls) as publisher,
                trame_async.connect("127.0.0.1", port, **tls) as observer1,
                trame_async.connect("127.0.0.1", port, **tls) as observer2,
            ):
                stream = Stream(publisher, [observer1, observer2])
                for _ in range(10):
                    await stream.round()

                # 0 ms: the signal; the server must report the client within interval + timeout.
                signalled_at = loop.time()
                os.kill(proc.pid, sig)
                await stream.run_until(victim_gone, INTERVAL + TIMEOUT + TOLERANCE + 1.0)
                stream.check()
                assert victim_id not in [r.id for r in server.clients]
                assert len(server.clients) == 3
    finally:
        if proc is not None:
            await stop_process(proc)

    # Checked after the server shut down: a second report would have come by now.
    victim = [(why, at) for rid, why, at in reports if rid == victim_id]
    assert len(victim) == 1, victim
    why, reported_at = victim[0]
    assert why is reason
    elapsed = reported_at - signalled_at
    assert elapsed <= INTERVAL + TIMEOUT + TOLERANCE
    if sig == signal.SIGSTOP:
        # Not declared dead before a ping went unanswered for the whole timeout.
        assert elapsed >= TIMEOUT / 2


async def test_hung_client_with_unsent_backlog_is_still_cut_at_the_heartbeat_deadline() -> None:
    """A frozen client whose frames fill the kernel buffers leaves bytes in the transport.

    ``transport.close()`` would wait for them forever; the heartbeat deadline must still end the
    connection (and report it) on time.
    """
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    reports: list[tuple[DisconnectReason, float]] = []

    def on_disconnect(remote: RemoteClient, why: DisconnectReason) -> None:
        reports.append((why, loop.time()))
        gone.set()

    proc = None
    try:
        async with trame_async.serve(
            "127.0.0.1",
            0,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=TIMEOUT,
            on_disconnect=on_disconnect,
            drain_timeout=0.5,
        ) as server:
            proc = await spawn(["-c", CLIENT_SCRIPT, str(server.port)])
            await read_line(proc)
            (remote,) = server.clients
            signalled_at = loop.time()
            os.kill(proc.pid, signal.SIGSTOP)

            # Fill the kernel buffers until bytes stay in the transport (below its high water).
            chunk = bytes(16 << 10)
            transport = remote._transport
            assert transport is not None
            for _ in range(2000):
                server.multicast(BYT, chunk)
                await eventually(lambda: not remote.outbox.frames, 1.0, what="flush")
                if transport.get_write_buffer_size() > 0:
                    break
            assert 0 < transport.get_write_buffer_size() < server.config.write_high_water
            assert remote.is_open
            assert loop.time() - signalled_at < TIMEOUT / 2, "filling took too long to test"

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), INTERVAL + TIMEOUT + TOLERANCE)
            assert reports, "no on_disconnect within interval + timeout of the hang"
            (why, reported_at) = reports[0]
            assert why is DisconnectReason.HEARTBEAT_TIMEOUT
            assert reported_at - signalled_at <= INTERVAL + TIMEOUT + TOLERANCE
    finally:
        if proc is not None:
            await stop_process(proc)


# --- a dead or hung server ------------------------------------------------------------------------


async def test_client_notices_a_killed_server_process(net: Net) -> None:
    proc = await spawn(net.server_process())
    try:
        host, port = await wait_listening(proc)
        assert host == "127.0.0.1"
        async with trame_async.connect(host, port, echo=True, **net.connect_kwargs()) as client:
            await client.multicast(INT, 1)
            assert (await client.receive(timeout=5)).value == 1
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            proc.kill()
            with pytest.raises(ConnectionClosed) as info:
                await client.receive(timeout=INTERVAL + TIMEOUT + TOLERANCE)
            assert loop.time() - killed_at <= INTERVAL + TIMEOUT + TOLERANCE
            assert info.value.reason is DisconnectReason.CONNECTION_LOST
            assert client.closed and client.close_reason is DisconnectReason.CONNECTION_LOST
    finally:
        await stop_process(proc)


async def test_client_notices_a_stopped_server_process_by_heartbeat(net: Net) -> None:
    proc = await spawn(net.server_process())
    try:
        host, port = await wait_listening(proc)
        async with trame_async.connect(
            host, port, echo=True, rtt_interval=None, **net.connect_kwargs()
        ) as client:
            assert client.server_settings.heartbeat_interval == INTERVAL
            assert client.server_settings.heartbeat_timeout == TIMEOUT
            await client.multicast(INT, 1)
            assert (await client.receive(timeout=5)).value == 1
            loop = asyncio.get_running_loop()
            stopped_at = loop.time()
            os.kill(proc.pid, signal.SIGSTOP)
            with pytest.raises(ConnectionClosed) as info:
                await client.receive(timeout=INTERVAL + TIMEOUT + TOLERANCE)
            elapsed = loop.time() - stopped_at
            assert info.value.reason is DisconnectReason.HEARTBEAT_TIMEOUT
            assert elapsed <= INTERVAL + TIMEOUT + TOLERANCE
            # Not early: the server's last frame came at most one interval before the stop, so
            # death needed at least a timeout of silence after it.
            assert elapsed >= TIMEOUT / 2
            assert client.close_reason is DisconnectReason.HEARTBEAT_TIMEOUT
    finally:
        await stop_process(proc)  # SIGCONT, then SIGKILL


# --- the sans-I/O cores with a fake clock -------------------------------------------------------

LIMITS = ServerLimits(
    heartbeat_interval=1.0, heartbeat_timeout=2.0, handshake_timeout=None, frame_timeout=None
)


def take(core: ServerCore | ClientCore) -> list[tuple[int, bytes]]:
    """Return and clear the frames a core wants written, as ``(kind, body)``."""
    parser = FrameParser()
    frames = [(f[0], bytes(f[1:])) for f in parser.feed(b"".join(core.outgoing))]
    core.outgoing.clear()
    assert parser.buffered == 0
    return frames


def pings(core: ServerCore | ClientCore) -> list[int]:
    """Return the ids of the PINGs a core wants written (and nothing else may be queued)."""
    out = take(core)
    assert all(kind == Kind.PING for kind, _ in out), out
    return [int.from_bytes(body, "big") for _, body in out]


def open_server_core(now: float = 0.0, limits: ServerLimits = LIMITS) -> ServerCore:
    core = ServerCore(7, limits, now)
    assert core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), now) == []
    assert core.state is CoreState.OPEN
    assert [kind for kind, _ in take(core)] == [Kind.WELCOME]
    return core


def open_client_core(
    now: float = 0.0, interval: float | None = 1.0, timeout: float | None = 2.0, **kw: object
) -> ClientCore:
    core = ClientCore(now, **kw)  # type: ignore[arg-type]
    assert [kind for kind, _ in take(core)] == [Kind.HELLO]
    welcome = Welcome(PROTOCOL_VERSION, 0, 3, interval, timeout, 1 << 20).encode()
    assert core.receive_data(welcome, now) == []
    assert core.state is CoreState.OPEN and core.client_id == 3
    return core


def test_server_core_pings_every_interval_and_declares_death_at_awaiting_plus_timeout() -> None:
    core = open_server_core(0.0)
    # 0 s: open; the first ping is due one interval later.
    assert core.next_timer() == 1.0
    core.handle_timer(0.5)  # an early wake-up does nothing
    assert pings(core) == [] and core.next_timer() == 1.0
    # 1 s: ping 1; from now on the client must say something within 2 s.
    core.handle_timer(1.0)
    assert pings(core) == [1]
    assert core.next_timer() == 2.0
    # 2 s: ping 2; the deadline still counts from the first unanswered ping.
    core.handle_timer(2.0)
    assert pings(core) == [2]
    assert core.next_timer() == 3.0
    core.handle_timer(2.999)
    assert not core.closed
    # 3 s: 1 s (first unanswered ping) + 2 s (timeout): dead.
    core.handle_timer(3.0)
    assert core.closed
    assert core.close_reason is DisconnectReason.HEARTBEAT_TIMEOUT
    assert core.next_timer() is None
    assert take(core) == []  # nothing to say to a dead peer
    assert core.connection_lost() is DisconnectReason.HEARTBEAT_TIMEOUT  # first cause wins


@pytest.mark.parametrize(
    "liveness",
    [
        pytest.param(pong(1), id="pong"),
        pytest.param(ping(99), id="ping"),
        pytest.param(INT.pack_frame(Kind.MULTICAST, 5), id="multicast"),
        pytest.param(INT.pack_frame(Kind.DATA, 5), id="data"),
        pytest.param(INT.pack_frame(Kind.MULTICAST, 5)[:3], id="partial-frame"),
    ],
)
def test_server_core_counts_any_frame_as_liveness(liveness: bytes) -> None:
    core = open_server_core(0.0)
    core.handle_timer(1.0)
    assert pings(core) == [1]
    core.handle_timer(2.0)
    assert pings(core) == [2]
    # 2.5 s: anything from the client proves it alive.
    core.receive_data(liveness, 2.5)
    take(core)  # a pong to its ping, if it sent one
    core.handle_timer(3.0)
    assert not core.closed
    assert pings(core) == [3]
    # The deadline now counts from ping 3.
    assert core.next_timer() == 4.0
    core.handle_timer(4.0)
    assert pings(core) == [4]
    core.handle_timer(4.999)
    assert not core.closed
    core.handle_timer(5.0)
    assert core.close_reason is DisconnectReason.HEARTBEAT_TIMEOUT


@pytest.mark.parametrize("ping_id", [0, 1, 0xDEADBEEF, 0xFFFF_FFFF])
def test_both_cores_answer_a_ping_with_a_pong_echoing_its_id(ping_id: int) -> None:
    for core in (open_server_core(0.0), open_client_core(0.0)):
        assert core.receive_data(ping(ping_id), 0.5) == []
        assert core.outgoing == [pong(ping_id)]


def test_server_core_measures_rtt_from_the_pong_of_its_ping() -> None:
    core = open_server_core(0.0)
    core.handle_timer(1.0)
    assert pings(core) == [1]
    core.receive_data(pong(42), 1.1)  # not an id it sent
    assert core.rtt is None
    core.receive_data(pong(1), 1.25)
    assert core.rtt == pytest.approx(0.25)
    core.handle_timer(2.0)
    assert pings(core) == [2]
    core.receive_data(pong(2), 2.125)
    assert core.rtt == pytest.approx(0.125)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(lambda p: [p], id="lone"),  # the fast path: one read, one PONG
        pytest.param(lambda p: [p[:4], p[4:]], id="split"),
        pytest.param(lambda p: [p[:1], p[1:]], id="split-early"),
        pytest.param(lambda p: [ping(5) + p], id="behind-a-ping"),
        pytest.param(
            lambda p: [
                INT.pack_frame(Kind.MULTICAST, 5)[:-9],
                INT.pack_frame(Kind.MULTICAST, 5)[-9:] + p,
            ],
            id="behind-a-frame-tail",
        ),
    ],
)
def test_server_core_takes_a_pong_however_it_is_read(chunks: Any) -> None:
    core = open_server_core(0.0)
    core.handle_timer(1.0)
    assert pings(core) == [1]
    for chunk in chunks(pong(1)):
        core.receive_data(chunk, 1.25)
    assert core.rtt == pytest.approx(0.25)
    assert not core.closed and core.error_code is None
    take(core)  # a pong to the ping, if one was sent
    # The PONG was liveness: the deadline counts from the next ping.
    core.handle_timer(2.0)
    assert pings(core) == [2]
    core.handle_timer(3.5)
    assert not core.closed


def test_server_core_a_nine_byte_read_inside_a_frame_is_no_pong() -> None:
    core = open_server_core(0.0)
    frame = INT.pack_frame(Kind.MULTICAST, 5)
    assert len(frame[10:]) == 9
    assert core.receive_data(frame[:10], 0.5) == []
    (got,) = core.receive_data(frame[10:], 0.5)  # 9 bytes that end a MULTICAST
    assert bytes(got) == frame[4:]


def test_server_core_a_nine_byte_read_that_is_no_pong_takes_the_full_path() -> None:
    core = open_server_core(0.0)
    bad = bytes.fromhex("00000005") + bytes((0x7F,)) + bytes(4)  # 9 bytes, unknown kind
    core.receive_data(bad, 0.5)
    assert core.closed and core.close_reason is DisconnectReason.PROTOCOL_ERROR


def test_client_core_probes_rtt_every_rtt_interval() -> None:
    core = open_client_core(10.0, interval=10.0, timeout=10.0, rtt_interval=5.0)
    # The first probe goes out at once, then every rtt_interval.
    assert core.next_timer() == 10.0
    core.handle_timer(10.0)
    (probe,) = pings(core)
    core.receive_data(pong(probe), 10.04)
    assert core.rtt == pytest.approx(0.04)
    assert core.next_timer() == 15.0
    core.handle_timer(15.0)
    (probe2,) = pings(core)
    assert probe2 != probe
    core.receive_data(pong(probe2), 15.5)
    assert core.rtt == pytest.approx(0.5)


def test_client_core_declares_a_silent_server_dead_after_interval_plus_timeout() -> None:
    core = open_client_core(10.0, interval=1.0, timeout=2.0)
    # 10 s: WELCOME; a live server pings at least every second, so 3 s of silence is death.
    assert core.next_timer() == 13.0
    core.handle_timer(12.9)
    assert not core.closed
    # 12 s: a ping from the server; it is answered and resets the silence clock.
    core.receive_data(ping(5), 12.0)
    assert core.outgoing == [pong(5)]
    core.outgoing.clear()
    assert core.next_timer() == 15.0
    core.handle_timer(14.999)
    assert not core.closed
    core.handle_timer(15.0)
    assert core.closed and core.close_reason is DisconnectReason.HEARTBEAT_TIMEOUT
    assert core.next_timer() is None


def test_heartbeats_disabled_means_no_timer() -> None:
    limits = ServerLimits(
        heartbeat_interval=None, heartbeat_timeout=None, handshake_timeout=None, frame_timeout=None
    )
    assert open_server_core(0.0, limits).next_timer() is None
    assert open_client_core(0.0, interval=None, timeout=None).next_timer() is None


@given(delays=st.lists(st.floats(min_value=0.0, max_value=1.99), min_size=1, max_size=30))
def test_server_core_never_kills_a_client_that_answers_within_the_timeout(
    delays: list[float],
) -> None:
    """Whatever the pong delays (below the timeout), the client lives and rtt is the last delay."""
    core = open_server_core(0.0)
    now = 0.0
    for delay in delays:
        when = core.next_timer()
        assert when is not None
        now = when
        core.handle_timer(now)
        ids = pings(core)
        assert len(ids) == 1
        # Only ping timers fire: the death deadline is never reached.
        pong_at = now + delay
        while (nxt := core.next_timer()) is not None and nxt <= pong_at:
            core.handle_timer(nxt)
            assert not core.closed
            now = nxt
            ids += pings(core)
        core.receive_data(pong(ids[0]), pong_at)
        now = pong_at
        assert not core.closed
        assert core.rtt == pytest.approx(delay)
        # Late pongs of pings sent meanwhile are answers too: they keep it alive.
        for later in ids[1:]:
            core.receive_data(pong(later), pong_at)
    assert core.state is CoreState.OPEN
