"""Fuzzing the server's frame handling: the sans-I/O core, then a live server over a socket.

(a) :class:`~trame_async.protocol.ServerCore` is fed arbitrary bytes, and valid frames followed by
junk, cut into arbitrary chunks, with a fake clock. It must never raise: it returns well-formed data
frames, or closes, and when it closes because of the input it has queued an ERROR frame whose code
is a known :class:`~trame_async.ErrorCode`. The outcome must not depend on the chunking.

(b) A live server in a background thread gets arbitrary bytes after a valid HELLO on a fresh
connection per example; it must log no error and never call the loop's exception handler, and a
healthy subscriber keeps receiving a publisher's multicast sent after each example.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trame_async
from trame_async import BYT, FLT, INT, POS, REGISTRY, STR, DisconnectReason, ErrorCode, Kind
from trame_async.protocol import CoreState, ServerCore, ServerLimits
from trame_async.wire import (
    HEADER,
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameParser,
    Goodbye,
    Hello,
    ping,
    pong,
)

_T = TypeVar("_T")

# When an example fails, hypothesis writes a patch with libcst, whose import warns here
# (mypy_extensions.TypedDict): that must not turn the failure report into an INTERNALERROR.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict:DeprecationWarning")

HELLO = Hello(PROTOCOL_VERSION, 0, b"").encode()
LIMITS = ServerLimits(
    heartbeat_interval=1.0,
    heartbeat_timeout=1.0,
    max_frame_size=512,
    handshake_max_frame_size=128,
    handshake_timeout=10.0,
    frame_timeout=10.0,
)
#: The same with one size limit throughout, for checks that compare chunkings.
ONE_LIMIT = ServerLimits(
    heartbeat_interval=1.0,
    heartbeat_timeout=1.0,
    max_frame_size=512,
    handshake_max_frame_size=512,
    handshake_timeout=10.0,
    frame_timeout=10.0,
)
#: Frames a server core may queue for its client.
SERVER_KINDS = frozenset((Kind.WELCOME, Kind.PING, Kind.PONG, Kind.ERROR))
#: Close reasons that the peer itself causes (it said goodbye or sent an ERROR).
PEER_REASONS = frozenset((DisconnectReason.GOODBYE, DisconnectReason.ERROR_RECEIVED))


def frame_of(kind: int, body: bytes) -> bytes:
    return HEADER.pack(1 + len(body), kind) + body


# --- strategies -------------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFF_FFFF)

valid_data = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(lambda v: REGISTRY.encode(INT, v)),
    st.floats().map(lambda v: REGISTRY.encode(FLT, v)),
    st.text(max_size=20).map(lambda t: REGISTRY.encode(STR, t)),
    st.binary(max_size=20).map(lambda b: REGISTRY.encode(BYT, b)),
    st.tuples(st.floats(), st.floats()).map(lambda p: REGISTRY.encode(POS, p)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: REGISTRY.encode(INT, v, Kind.DATA)),
)
# A data frame with whatever code, format and value: unknown codes are relayed if well formed.
any_data_body = st.builds(
    lambda code, fmt, value: code + bytes((len(fmt),)) + fmt + value,
    st.binary(min_size=3, max_size=3) | st.sampled_from([b"INT", b"STR", b"POS", b"ZZZ"]),
    st.binary(max_size=8)
    | st.sampled_from(
        [b"<q", b"<d", b"<dd", b"<3s", b"<0p", b">I", b"!h", b"<*s", b"<2000000000s"]
    ),
    st.binary(max_size=24),
)
control = st.one_of(
    u32.map(ping),
    u32.map(pong),
    st.builds(
        lambda v, f, t: Hello(v, f, t).encode(),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=8),
    ),
    st.builds(lambda c, r: ErrorFrame(c, r).encode(), st.integers(0, 0xFFFF), st.text(max_size=10)),
    st.builds(
        lambda r, a, t: Goodbye(r, a, t).encode(),
        st.integers(0, 0xFFFF),
        st.none() | st.floats(0.001, 1000),
        st.text(max_size=10),
    ),
)
any_frame = st.one_of(
    valid_data,
    control,
    st.builds(frame_of, st.sampled_from([Kind.MULTICAST, Kind.DATA]), any_data_body),
    st.builds(frame_of, st.integers(0, 255), st.binary(max_size=40)),
    u32.map(lambda n: struct.pack(">I", n)),  # a bare length field: any value, 0 and huge too
)
streams = st.builds(
    lambda hello, frames, junk: (HELLO if hello else b"") + b"".join(frames) + junk,
    st.booleans(),
    st.lists(any_frame, max_size=8),
    st.binary(max_size=64),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out = []
    last = 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


# --- (a) the sans-I/O core ---------------------------------------------------------------------------


class Outcome(NamedTuple):
    frames: list[bytes]
    outgoing: list[bytes]
    state: CoreState
    close_reason: DisconnectReason | None
    error_code: int | None


def parse_all(data: bytes) -> list[tuple[int, bytes]]:
    parser = FrameParser(0xFFFF_FFFF)
    frames = parser.feed(data)
    assert parser.buffered == 0, "the core queued a partial frame"
    return [(f[0], bytes(f[1:])) for f in frames]


def feed(chunks: list[bytes], limits: ServerLimits = LIMITS) -> Outcome:
    """Feed ``chunks`` to a fresh core, checking its invariants after each call."""
    core = ServerCore(7, limits, 0.0)
    frames: list[bytes] = []
    outgoing: list[bytes] = []
    for chunk in chunks:
        was_open = core.state is CoreState.OPEN
        out = core.receive_data(chunk, 0.0)
        for f in out:
            assert f[0] in (Kind.MULTICAST, Kind.DATA), f"returned a {f[0]:#x} frame"
            assert was_open or core.state is not CoreState.HANDSHAKE
            REGISTRY.check_body(f, 1)  # well formed, or it would raise
        frames += [bytes(f) for f in out]
        outgoing += core.outgoing
        core.outgoing.clear()
        if core.closed:
            break
    if core.closed:  # feeding a closed core is harmless
        assert core.receive_data(b"\x00\x00\x00\x05\x03\x00\x00\x00\x01", 0.0) == []
        assert not core.outgoing
    kinds = [k for k, _ in parse_all(b"".join(outgoing))]
    assert set(kinds) <= SERVER_KINDS, kinds
    assert kinds.count(Kind.WELCOME) <= 1 and Kind.WELCOME not in kinds[1:]
    assert Kind.ERROR not in kinds[:-1], "nothing follows an ERROR"
    if core.closed:
        if kinds and kinds[-1] == Kind.ERROR:
            error = ErrorFrame.parse(parse_all(outgoing[-1])[0][1])
            assert error.error_code is not None, f"unknown error code {error.code}"
            assert core.error_code == error.code
        else:
            assert core.close_reason in PEER_REASONS, core.close_reason
    else:
        assert Kind.ERROR not in kinds
    return Outcome(frames, outgoing, core.state, core.close_reason, core.error_code)


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    feed(chunked(data, cuts))
    feed(chunked(HELLO + data, cuts))


@settings(max_examples=2000, deadline=None)
@given(data=streams, cuts=st.lists(st.integers(0, 1000), max_size=8))
def test_frames_then_junk_give_the_same_outcome_however_chunked(
    data: bytes, cuts: list[int]
) -> None:
    feed(chunked(data, cuts))  # the invariants, with the handshake limit below max_frame_size
    whole = feed([data], ONE_LIMIT)
    assert feed(chunked(data, cuts), ONE_LIMIT) == whole
    assert feed([data[i : i + 1] for i in range(len(data))], ONE_LIMIT) == whole


def _big_after_hello(split: bool) -> tuple[Outcome, bytes]:
    big = REGISTRY.encode(BYT, b"x" * (LIMITS.handshake_max_frame_size + 100))
    assert len(big) - 4 <= LIMITS.max_frame_size
    data = HELLO + big
    return feed([data[: len(HELLO)], data[len(HELLO) :]] if split else [data]), big


def test_frame_after_hello_in_a_later_read_is_held_to_max_frame_size() -> None:
    outcome, big = _big_after_hello(split=True)
    assert outcome.error_code is None and outcome.state is CoreState.OPEN
    assert outcome.frames == [big[4:]]


def test_frame_pipelined_behind_hello_is_held_to_max_frame_size() -> None:
    outcome, big = _big_after_hello(split=False)
    assert outcome.error_code is None and outcome.state is CoreState.OPEN, outcome.error_code
    assert outcome.frames == [big[4:]]


def test_a_clients_error_or_goodbye_is_reported_as_its_own() -> None:
    wrong = {}
    for code in [*ErrorCode, 999]:
        error = feed([HELLO + ErrorFrame(code, "spoof").encode()])
        if error.close_reason is not DisconnectReason.ERROR_RECEIVED:
            wrong[f"ERROR {code!r}"] = error.close_reason
    for reason in [*DisconnectReason, 999]:
        bye = feed([HELLO + Goodbye(reason, None, "spoof").encode()])
        if bye.close_reason is not DisconnectReason.GOODBYE:
            wrong[f"GOODBYE {reason!r}"] = bye.close_reason
    assert not wrong, wrong


# --- (b) a live server over a socket ------------------------------------------------------------------


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_info!r}")


class LiveServer:
    """A server, a publisher and a subscriber on a loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.exceptions: list[str] = []
        self.logged = _Counter()
        self.disconnects: list[tuple[int, DisconnectReason]] = []
        self.server: trame_async.Server | None = None
        self.publisher: trame_async.Client | None = None
        self.subscriber: trame_async.Client | None = None
        self.next_seq = 0
        #: ERROR codes the attack connections got back (None: closed without one).
        self.outcomes: collections.Counter[str] = collections.Counter()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def __enter__(self) -> LiveServer:
        self.loop.set_exception_handler(
            lambda loop, ctx: self.exceptions.append(
                f"{ctx.get('message')} {ctx.get('exception')!r}"
            )
        )
        logging.getLogger().addHandler(self.logged)
        self.thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        self.server = await trame_async.start_server(
            "127.0.0.1",
            0,
            max_frame_size=4096,
            handshake_timeout=5.0,
            frame_timeout=5.0,
            on_disconnect=lambda c, r: self.disconnects.append((c.id, r)),
        )
        port = self.server.port
        self.publisher = await trame_async.connect("127.0.0.1", port, rtt_interval=None)
        self.subscriber = await trame_async.connect("127.0.0.1", port, rtt_interval=None)

    async def _stop(self) -> None:
        for client in (self.publisher, self.subscriber):
            if client is not None:
                await client.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.thread.is_alive():
                self.run(self._stop(), timeout=20)
        finally:
            if self.thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(20)
            self.loop.close()
            logging.getLogger().removeHandler(self.logged)

    async def _relay_check(self) -> None:
        """Multicast the next sequence number; the subscriber's next frame from the publisher
        must be exactly it (frames from attackers are skipped)."""
        assert self.publisher is not None and self.subscriber is not None
        seq = self.next_seq
        self.next_seq += 1
        await self.publisher.multicast(INT, seq)
        async with asyncio.timeout(5):
            while True:
                msg = await self.subscriber.receive()
                if msg.sender == self.publisher.id:
                    assert msg.value == seq, f"expected {seq}, got {msg.value}"
                    return

    async def _settled(self) -> None:
        assert self.server is not None
        async with asyncio.timeout(10):
            while len(self.server._all) > 2:
                await asyncio.sleep(0.002)

    def attack(self, payload: bytes) -> None:
        """One connection: HELLO, WELCOME, ``payload``, EOF; then check the server is healthy."""
        assert self.server is not None
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
            sock.sendall(HELLO)
            received = b""
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                while len(received) < 4 or len(received) < 4 + int.from_bytes(received[:4]):
                    more = sock.recv(4096)
                    assert more, "closed before WELCOME"
                    received += more
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                for _ in range(10_000):  # the server closes after our EOF, at the latest
                    more = sock.recv(65536)
                    if not more:
                        break
                    received += more
        frames = parse_all(received[: _complete(received)])
        assert frames and frames[0][0] == Kind.WELCOME
        outcome = "no ERROR"
        for kind, body in frames[1:]:
            assert kind in (Kind.RELAY, Kind.PING, Kind.PONG, Kind.ERROR), kind
            if kind == Kind.ERROR:
                code = ErrorFrame.parse(body).error_code
                assert code is not None, body
                outcome = code.name
        self.outcomes[outcome] += 1
        self.run(self._settled())
        self.run(self._relay_check())
        assert not self.exceptions and not self.logged.records, (
            self.exceptions,
            self.logged.records,
        )


def _complete(data: bytes) -> int:
    """Length of the prefix of ``data`` made of whole frames (a reset may cut the last one)."""
    pos = 0
    while len(data) - pos >= 4:
        n = int.from_bytes(data[pos : pos + 4])
        if len(data) - pos - 4 < n:
            break
        pos += 4 + n
    return pos


payloads = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda frames, junk: b"".join(frames) + junk,
        st.lists(any_frame, max_size=10),
        st.binary(max_size=64),
    ),
)


@pytest.mark.timeout(120)
def test_live_server_survives_arbitrary_bytes_after_hello() -> None:
    with LiveServer() as live:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(payload=payloads)
        def one(payload: bytes) -> None:
            live.attack(payload)

        one()
        print(f"[live fuzz] {sum(live.outcomes.values())} connections: {dict(live.outcomes)}")
        assert sum(live.outcomes.values()) >= 300
        assert live.subscriber is not None and live.publisher is not None
        assert not live.subscriber.closed and not live.publisher.closed
        healthy = {live.subscriber.id, live.publisher.id}
        assert not [d for d in live.disconnects if d[0] in healthy], live.disconnects
    assert not live.exceptions, live.exceptions
    assert not live.logged.records, live.logged.records
