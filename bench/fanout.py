"""Fan-out benchmark: one publisher, S subscribers, one relay server; prints tables.

Each cell starts a relay server in its own process (bench/relays/), then this process (on uvloop)
connects S subscribers and one publisher to it. The publisher sends frames of 32 bytes or so
(seq u64, send time f64, padding), either as fast as flow control allows (default) for
``--duration`` seconds (or exactly ``--frames`` frames), or paced at ``--rate`` frames/s (latency).
Unpaced, the publisher also waits while more than ``--window`` deliveries are in flight (sent x S -
received): loopback kernel buffers hold several MiB, so without a window a publisher runs 100,000
frames ahead, a cell at S = 1000 lasts minutes, and with such backlogs the floor relay left both
processes half idle. The default (100,000) came from a sweep of 20,000-500,000. At S = 1 it is
above every relay's own buffers; at S >= 100 it is below trame_async's 64 KiB per-client high-water
mark, so that flow control rarely acts there. ``--window 1000000000000`` turns it off.
Unpaced, the publisher also stays at most ``--lead`` W frames (10,000 by default) ahead of its
slowest subscriber, as an application with end-to-end flow control would (here the subscribers
report progress by counting in this process, where a real one would send acks). Zero loss must not
rest on the server pausing publishers while one subscriber is congested: a server where one slow
client cannot hurt the others leaves a fast publisher unpaced, and a subscriber that falls more
than its outbound budget behind is then cut (``disconnect``) or loses frames (drop policies). W
RELAY frames of 41 bytes (410 KB at 10,000) stay well below the server's 4 MiB per-client budget.
At S = 1, where W rather than ``--window`` binds, delivered/s with W = 10,000, 30,000 or no W
differed by no more than runs of one setting do (a few 2 s runs on 2 cores, within 15 %).
``--lead 0`` turns it off (the publisher then relies on the server's flow control).
Every frame is relayed to the S subscribers; the cell ends when all have arrived (or nothing arrives
for ``--stall`` seconds). M in the tables is the number of frames the publisher sent.

Figures per cell (medians over ``--repeat``):

- delivered frames/s: frames received by all subscribers / (last receipt - first send);
- loss: S*M - received: frames dropped, or still undelivered when the cell gave up (nothing
  arrived for ``--stall`` seconds); "subs cut" counts subscribers whose connection ended early;
- server CPU s (user+system, psutil, from the first send to the end) and µs per delivered frame;
- server peak RSS (VmHWM of a fresh server process);
- load CPU %: this process's CPU over the same window (near 100 %: the load generator limits), and
  its CPU µs per delivery (what the receiving clients cost; the publisher's share is the same for
  every relay);
- paced mode: latency p50/p99/max from the send time to the receipt (same clock, same process);
- per round: each relay's delivered/s, load CPU per delivery and latencies divided by those of
  ``floor-uvloop`` in the same repeat, the median (and range) over the repeats printed last.

Relays (``--relays``): ``trame`` (trame_async server, real trame_async clients consuming with
``async for``), ``trame-cb`` (the same clients handed each message by ``connect(on_message=...)``,
no task switch per message), ``trame-raw`` (same server, minimal raw clients like the baselines'), ``floor-uvloop`` / ``floor-asyncio`` (minimal
length-prefixed relay, bench/relays/floor.py), ``ws`` (websockets server with broadcast(), minimal
raw WebSocket clients). Add ``trame-asyncio`` or ``ws-asyncio`` for those servers on the stock loop.

    python bench/fanout.py                                  # S = 1, 10, 100, 1 repeat
    python bench/fanout.py --subscribers 1 10 100 --repeat 3 --json out.json --plot
    python bench/fanout.py --subscribers 100 --rate 100     # latency, paced
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import _util
import psutil
import uvloop

import trame_async
from trame_async.wire import Hello, pong

HERE = Path(__file__).resolve().parent
perf_counter = time.perf_counter


class Bench(NamedTuple):
    """The benchmark's position-like trame: 24 bytes of value."""

    seq: int
    sent: float
    pad: float


BNC = trame_async.register("BNC", "<Qdd", Bench)
_MULTICAST = int(trame_async.Kind.MULTICAST)


@dataclass(frozen=True)
class Relay:
    """One relay under test: which server script on which loop, and which clients."""

    script: str
    loop: str
    client: str  # "trame" (real client), "trame-cb" (real, on_message), "trame-raw", "floor", "ws"
    server_args: tuple[str, ...] = ()
    token: bytes = b""  # what the clients present in their HELLO


#: The shared secret of the ``*-token`` variants.
TOKEN = b"bench-token-0123456789abcdef"
_TOKEN_ARGS = ("--token", TOKEN.decode())

RELAYS: dict[str, Relay] = {
    "trame": Relay("trame.py", "uvloop", "trame"),
    "trame-cb": Relay("trame.py", "uvloop", "trame-cb"),
    "trame-raw": Relay("trame.py", "uvloop", "trame-raw"),
    # The cost of the robustness limits: defaults plus a token, and every limit relaxed.
    "trame-token": Relay("trame.py", "uvloop", "trame", _TOKEN_ARGS, TOKEN),
    "trame-relaxed": Relay("trame.py", "uvloop", "trame", ("--relaxed",)),
    "trame-raw-token": Relay("trame.py", "uvloop", "trame-raw", _TOKEN_ARGS, TOKEN),
    "trame-raw-relaxed": Relay("trame.py", "uvloop", "trame-raw", ("--relaxed",)),
    "trame-asyncio": Relay("trame.py", "asyncio", "trame"),
    "floor-uvloop": Relay("floor.py", "uvloop", "floor"),
    "floor-asyncio": Relay("floor.py", "asyncio", "floor"),
    # The floor's client with a task hand-off per message: the least ``async for`` can cost.
    "floor-task": Relay("floor.py", "uvloop", "floor-task"),
    "ws": Relay("ws_broadcast.py", "uvloop", "ws"),
    "ws-asyncio": Relay("ws_broadcast.py", "asyncio", "ws"),
}
DEFAULT_RELAYS = ["trame", "trame-cb", "trame-raw", "floor-uvloop", "floor-asyncio", "ws"]
BASELINES = ("floor-uvloop", "floor-asyncio", "ws")


# --- what the subscribers count -----------------------------------------------------------------


class Tally:
    """Frames received by all subscribers of a cell, and when; each subscriber's own count."""

    __slots__ = (
        "crossed",
        "done",
        "expected",
        "first_send",
        "floor",
        "last",
        "latencies",
        "lead_waiter",
        "low",
        "mark",
        "progress",
        "sent",
        "total",
        "waiter",
    )

    def __init__(self, latency: bool) -> None:
        self.expected = 1 << 62  # set when the publisher is done
        self.sent = 0
        self.total = 0
        self.first_send = 0.0
        self.last = 0.0
        self.done = asyncio.Event()
        self.latencies: list[float] | None = [] if latency else None
        self.waiter: asyncio.Future[None] | None = None
        self.low = 0
        #: One Progress per subscriber; the publisher's lead window watches the slowest.
        self.progress: list[Progress] = []
        self.floor = 0  # the slowest subscriber's count when last looked at (counts only grow)
        self.mark = 1 << 62  # wait_lead: the count every subscriber must reach
        self.crossed = 0  # subscribers at or past the mark
        self.lead_waiter: asyncio.Future[None] | None = None

    def add(self, n: int, now: float) -> None:
        self.total += n
        self.last = now
        if self.total >= self.expected:
            self.done.set()
        waiter = self.waiter
        if waiter is not None and self.total >= self.low:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait_window(self, in_flight: int, window: int) -> None:
        """Wait until fewer than ``window / 2`` deliveries are in flight (or 1 s passed)."""
        self.low = self.total + in_flight - window // 2
        self.waiter = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.waiter, 1.0)
        self.waiter = None

    def lead_exceeded(self, lead: int) -> bool:
        """Whether the publisher is more than ``lead`` frames ahead of the slowest subscriber."""
        if not lead or self.sent - self.floor <= lead:
            return False  # the floor only rises: no need to look at every subscriber
        self.floor = min((p.count for p in self.progress), default=self.sent)
        return self.sent - self.floor > lead

    async def wait_lead(self, lead: int) -> None:
        """Wait until every subscriber is within ``lead / 2`` frames of the publisher (or 1 s).

        Each subscriber counts itself when it crosses the mark, so waking costs O(1) per receipt.
        """
        self.mark = mark = self.sent - lead // 2
        self.crossed = sum(1 for p in self.progress if p.count >= mark)
        if self.crossed < len(self.progress):
            self.lead_waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lead_waiter, 1.0)
        self.lead_waiter = None
        self.mark = 1 << 62

    def crossed_mark(self) -> None:
        self.crossed += 1
        waiter = self.lead_waiter
        if waiter is not None and self.crossed >= len(self.progress) and not waiter.done():
            waiter.set_result(None)


class Progress:
    """One subscriber's count, for the publisher's lead window; adds to the cell's Tally too."""

    __slots__ = ("count", "latencies", "tally")

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.count = 0
        self.latencies = tally.latencies
        tally.progress.append(self)

    def add(self, n: int, now: float) -> None:
        before = self.count
        self.count = after = before + n
        tally = self.tally
        if before < tally.mark <= after:
            tally.crossed_mark()
        tally.add(n, now)


#: What a client counts its receipts into: its subscriber's Progress (a publisher: the Tally).
Counts = Tally | Progress


# --- minimal raw clients (bulk parsing over a bytearray and a memoryview) -------------------------

_U32 = struct.Struct(">I")
_BE_F64 = struct.Struct(">d")
_LE_F64 = struct.Struct("<d")
#: floor frame: length u32 BE = 32 | seq u64 | sent f64 | 16 bytes of padding
_FLOOR_FRAME = struct.Struct(">IQd16x")
#: WebSocket binary frame from a client: FIN+binary | MASK+len 32 | mask key 0 | the same 32 bytes.
#: A zero mask key leaves the payload as is; the server still runs its unmasking code.
_WS_FRAME = struct.Struct(">BB4sQd16x")
_WS_FRAME_HEAD = (0x82, 0x80 | 32, b"\0\0\0\0")
#: RELAY frame: length 4 | kind 1 | sender 4 | code 3 | fmt_len 1 | fmt | value (seq u64, sent f64)
_RELAY_FMT_LEN_AT = 4 + 1 + 4 + 3
_MAX_BUFFER = 1 << 22


class RawClient(asyncio.Protocol):
    """Base of the minimal clients: a byte buffer, a ready future, pause/resume flow control."""

    def __init__(self, tally: Counts, host: str, port: int, token: bytes = b"") -> None:
        self.tally = tally
        self.host = host
        self.port = port
        self.token = token
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.start()

    def start(self) -> None:
        self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        error = ConnectionError(f"connection lost: {exc}")
        for fut in (self.ready, self._drain):
            if fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def send(self, seq: int, sent: float) -> None:
        transport = self.transport
        if transport is None:
            raise ConnectionError("publisher lost its connection")
        transport.write(self.frame(seq, sent))
        drain = self._drain
        if drain is not None and not drain.done():
            await drain

    def frame(self, seq: int, sent: float) -> bytes:
        raise NotImplementedError

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 5.0)

    def ended(self) -> bool:
        """Whether the connection ended before the benchmark closed it."""
        return self.lost.done()

    def _overflow(self) -> bool:
        if len(self.buf) > _MAX_BUFFER:
            assert self.transport is not None
            self.transport.abort()
            return True
        return False


class FloorClient(RawClient):
    """Client of the floor relay: length-prefixed 32-byte payloads."""

    def frame(self, seq: int, sent: float) -> bytes:
        return _FLOOR_FRAME.pack(32, seq, sent)

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        buf = self.buf
        buf += data
        end = len(buf)
        pos = count = 0
        lat = self.tally.latencies
        with memoryview(buf) as view:
            while end - pos >= 4:
                stop = pos + 4 + _U32.unpack_from(view, pos)[0]
                if stop > end:
                    break
                if lat is not None:
                    lat.append(now - _BE_F64.unpack_from(view, pos + 12)[0])
                count += 1
                pos = stop
        del buf[:pos]
        if not self._overflow() and count:
            self.tally.add(count, now)


class FloorTaskClient(FloorClient):
    """The floor's client handing each payload to a consumer task, as ``async for`` must: one
    future per wait, no queue object, no checks. What a task hand-off costs at the least in
    asyncio, the fair floor of ``trame`` (``async for``)."""

    def __init__(self, tally: Counts, host: str, port: int, token: bytes = b"") -> None:
        super().__init__(tally, host, port, token)
        self.pending: collections.deque[float] = collections.deque()
        self.waiter: asyncio.Future[float] | None = None
        self.task = asyncio.get_running_loop().create_task(self._consume())

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        pending = self.pending
        with memoryview(buf) as view:
            while end - pos >= 4:
                stop = pos + 4 + _U32.unpack_from(view, pos)[0]
                if stop > end:
                    break
                sent = _BE_F64.unpack_from(view, pos + 12)[0]
                waiter = self.waiter
                if waiter is not None and not pending:
                    self.waiter = None
                    waiter.set_result(sent)
                else:
                    pending.append(sent)
                pos = stop
        del buf[:pos]
        self._overflow()

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self.pending
        tally = self.tally
        lat = tally.latencies
        while True:
            if pending:
                sent = pending.popleft()
            else:
                waiter = self.waiter = loop.create_future()
                sent = await waiter
            now = perf_counter()
            if lat is not None:
                lat.append(now - sent)
            tally.add(1, now)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await super().close()


class TrameRawClient(RawClient):
    """A minimal trame_async client: HELLO, WELCOME, PING->PONG, count RELAY frames."""

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(Hello(1, 0, self.token).encode())

    def frame(self, seq: int, sent: float) -> bytes:
        return BNC.pack_frame(_MULTICAST, (seq, sent, 0.0))

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        buf = self.buf
        buf += data
        end = len(buf)
        pos = count = 0
        lat = self.tally.latencies
        with memoryview(buf) as view:
            while end - pos >= 5:
                stop = pos + 4 + _U32.unpack_from(view, pos)[0]
                if stop > end:
                    break
                kind = view[pos + 4]
                if kind == 0x11:  # RELAY
                    if lat is not None:
                        value = pos + _RELAY_FMT_LEN_AT + 1 + view[pos + _RELAY_FMT_LEN_AT]
                        lat.append(now - _LE_F64.unpack_from(view, value + 8)[0])
                    count += 1
                elif kind == 0x03 and self.transport is not None:  # PING
                    self.transport.write(pong(_U32.unpack_from(view, pos + 5)[0]))
                elif kind == 0x02 and not self.ready.done():  # WELCOME
                    self.ready.set_result(None)
                pos = stop
        del buf[:pos]
        if not self._overflow() and count:
            self.tally.add(count, now)


class WsClient(RawClient):
    """A minimal WebSocket client: HTTP upgrade, then unmasked server frames parsed in bulk."""

    def start(self) -> None:
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def frame(self, seq: int, sent: float) -> bytes:
        return _WS_FRAME.pack(*_WS_FRAME_HEAD, seq, sent)

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        buf = self.buf
        buf += data
        transport = self.transport
        assert transport is not None
        if not self.ready.done():
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                self._overflow()
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(
                    ConnectionError(bytes(buf[:head_end]).decode(errors="replace"))
                )
                transport.abort()
                return
            del buf[: head_end + 4]
            self.ready.set_result(None)
        end = len(buf)
        pos = count = 0
        lat = self.tally.latencies
        with memoryview(buf) as view:
            while end - pos >= 2:
                b1 = view[pos + 1]
                n = b1 & 0x7F
                head = 2
                if n == 126:
                    if end - pos < 4:
                        break
                    n = int.from_bytes(view[pos + 2 : pos + 4])
                    head = 4
                elif n == 127:
                    if end - pos < 10:
                        break
                    n = int.from_bytes(view[pos + 2 : pos + 10])
                    head = 10
                if b1 & 0x80:
                    head += 4  # a server must not mask, but skip the key if one does
                stop = pos + head + n
                if stop > end:
                    break
                opcode = view[pos] & 0x0F
                if opcode == 0x2:
                    if lat is not None:
                        lat.append(now - _BE_F64.unpack_from(view, pos + head + 8)[0])
                    count += 1
                elif opcode == 0x9 and n <= 125:  # PING -> PONG (masked, zero key)
                    transport.write(bytes((0x8A, 0x80 | n)) + b"\0\0\0\0" + view[pos + head : stop])
                elif opcode == 0x8:
                    transport.close()
                pos = stop
        del buf[:pos]
        if not self._overflow() and count:
            self.tally.add(count, now)


_RAW_CLASSES: dict[str, type[RawClient]] = {
    "floor": FloorClient,
    "floor-task": FloorTaskClient,
    "trame-raw": TrameRawClient,
    "ws": WsClient,
}


# --- the real trame_async client ----------------------------------------------------------------


class TrameSubscriber:
    """A real ``trame_async`` client consuming with ``async for``."""

    def __init__(self, client: trame_async.Client, tally: Progress) -> None:
        self.client = client
        self.tally = tally
        self.task = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        tally = self.tally
        lat = tally.latencies
        async for msg in self.client:
            now = perf_counter()
            if lat is not None:
                lat.append(now - msg.value.sent)
            tally.add(1, now)

    def ended(self) -> bool:
        return self.client.closed

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, trame_async.ConnectionClosed):
            await self.task
        await self.client.close()


class TrameCallbackSubscriber:
    """A real ``trame_async`` client handing each message to ``on_message`` (no task per message)."""

    def __init__(self, client: trame_async.Client) -> None:
        self.client = client

    @staticmethod
    def callback(tally: Progress) -> Callable[[trame_async.Message], None]:
        lat = tally.latencies

        def on_message(msg: trame_async.Message) -> None:
            now = perf_counter()
            if lat is not None:
                lat.append(now - msg.value.sent)
            tally.add(1, now)

        return on_message

    def ended(self) -> bool:
        return self.client.closed

    async def close(self) -> None:
        await self.client.close()


class TramePublisher:
    """A real ``trame_async`` client multicasting BNC trames."""

    def __init__(self, client: trame_async.Client) -> None:
        self.client = client

    async def send(self, seq: int, sent: float) -> None:
        await self.client.multicast(BNC, (seq, sent, 0.0))

    async def close(self) -> None:
        await self.client.close()


async def open_client(relay: Relay, host: str, port: int, tally: Tally, subscriber: bool) -> Any:
    """Open one client of ``relay``; wait for its handshake (10 s at most)."""
    token = relay.token
    counts: Counts = Progress(tally) if subscriber else tally
    if relay.client in ("trame", "trame-cb"):
        callback = (
            TrameCallbackSubscriber.callback(cast(Progress, counts))
            if subscriber and relay.client == "trame-cb"
            else None
        )
        client = await trame_async.connect(
            host, port, timeout=10.0, max_queue=100_000, token=token or None, on_message=callback
        )
        if not subscriber:
            return TramePublisher(client)
        if callback is not None:
            return TrameCallbackSubscriber(client)
        return TrameSubscriber(client, cast(Progress, counts))
    cls = _RAW_CLASSES[relay.client]
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: cls(counts, host, port, token), host, port), 10.0
    )
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), 10.0)
    except BaseException:
        await proto.close()
        raise
    return proto


async def open_many(
    count: int, opener: Callable[[], Awaitable[Any]], concurrency: int = 100
) -> list[Any]:
    """Open ``count`` clients, ``concurrency`` at a time; close them all if any fails."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with sem:
            return await opener()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(opened)
        raise RuntimeError(f"{len(errors)} of {count} connections failed: {errors[0]!r}")
    return opened


async def close_all(clients: list[Any]) -> None:
    results = await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    del results  # a client the server already dropped may fail to close: nothing to do


# --- one cell -------------------------------------------------------------------------------------


async def publish(
    pub: Any, tally: Tally, subscribers: int, frames: int | None, args: argparse.Namespace
) -> None:
    """Send frames paced at ``--rate``/s, or as fast as flow control allows; then set the goal.

    Unpaced, the publisher sends ``frames`` frames, or for ``--duration`` seconds when ``frames``
    is None. It yields to the loop every ``--yield-every`` frames: ``await drain()`` does not
    suspend until the socket buffer is full, and the subscribers share this loop. There it also
    waits while more than ``--window`` deliveries are in flight, or while it is more than
    ``--lead`` frames ahead of the slowest subscriber.
    """
    rate, duration, every, window = args.rate, args.duration, args.yield_every, args.window
    lead = args.lead
    tally.first_send = start = perf_counter()
    seq = 0
    try:
        if rate:
            for seq in range(frames or max(1, int(rate * duration))):
                delay = start + seq / rate - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await pub.send(seq, perf_counter())
                tally.sent = seq + 1
            return
        stop = start + duration
        for seq in range(frames or 1 << 40):
            await pub.send(seq, perf_counter())
            if seq % every == every - 1:
                tally.sent = seq + 1
                if frames is None and perf_counter() >= stop:
                    break
                in_flight = tally.sent * subscribers - tally.total
                if in_flight > window:
                    await tally.wait_window(in_flight, window)
                elif tally.lead_exceeded(lead):
                    await tally.wait_lead(lead)
                else:
                    await asyncio.sleep(0)
        tally.sent = seq + 1
    finally:
        tally.expected = subscribers * tally.sent
        if tally.total >= tally.expected:
            tally.done.set()


async def run_cell(
    relay: Relay,
    host: str,
    port: int,
    server_pid: int,
    subscribers: int,
    frames: int | None,
    args: argparse.Namespace,
    tag: str,
) -> dict[str, Any]:
    """Connect, publish, wait for every frame (or a stall), measure; return the cell's figures."""
    tally = Tally(latency=bool(args.rate))
    t_connect = perf_counter()
    subs = await open_many(subscribers, lambda: open_client(relay, host, port, tally, True))
    pub: Any = None
    spy: subprocess.Popen[bytes] | None = None
    load_spy: subprocess.Popen[bytes] | None = None
    try:
        pub = await open_client(relay, host, port, tally, False)
        connect_s = perf_counter() - t_connect
        await asyncio.sleep(args.settle)
        if args.py_spy:
            spy = start_py_spy(server_pid, Path(args.py_spy) / f"{tag}.txt", args)
            if args.py_spy_load:
                load_spy = start_py_spy(os.getpid(), Path(args.py_spy) / f"{tag}-load.txt", args)
            await asyncio.sleep(1.0)  # let it attach
        server = psutil.Process(server_pid)
        cpu0 = server.cpu_times()
        load0 = time.process_time()  # ns resolution: os.times() counts 10 ms ticks
        wall0 = perf_counter()
        sender = asyncio.get_running_loop().create_task(
            publish(pub, tally, subscribers, frames, args)
        )
        last_total, last_change = 0, wall0
        for _ in range(int(args.cell_timeout / 0.2) + 1):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.done.wait(), 0.2)
            now = perf_counter()
            if tally.done.is_set() or now - wall0 > args.cell_timeout:
                break
            if tally.total != last_total:
                last_total, last_change = tally.total, now
            elif sender.done() and now - last_change > args.stall:
                break
        wall1 = perf_counter()
        cpu1 = server.cpu_times()
        load1 = time.process_time()
        rss_peak = _util.peak_rss(server_pid)
        rss_now = server.memory_info().rss
        cut = sum(1 for sub in subs if sub.ended())
        for proc in (spy, load_spy):
            if proc is not None:
                stop_py_spy(proc)
        spy = load_spy = None
        if not sender.done():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        elif sender.exception() is not None:
            raise RuntimeError(f"publisher failed: {sender.exception()!r}")
    finally:
        for proc in (spy, load_spy):
            if proc is not None:
                stop_py_spy(proc)
        await close_all([*subs, *([pub] if pub is not None else [])])
    span = tally.last - tally.first_send if tally.total else 0.0
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    load_cpu = load1 - load0
    window = wall1 - wall0
    result: dict[str, Any] = {
        "subscribers": subscribers,
        "frames": tally.sent,
        "received": tally.total,
        "loss": subscribers * tally.sent - tally.total,
        "subscribers_cut": cut,
        "seconds": span,
        "delivered_per_s": tally.total / span if span > 0 else 0.0,
        "server_cpu_s": server_cpu,
        "server_cpu_pct": 100 * server_cpu / window if window > 0 else 0.0,
        "server_us_per_frame": 1e6 * server_cpu / tally.total if tally.total else None,
        "server_peak_rss_mib": rss_peak / (1 << 20),
        "server_rss_end_mib": rss_now / (1 << 20),
        "load_cpu_pct": 100 * load_cpu / window if window > 0 else 0.0,
        "load_us_per_delivery": 1e6 * load_cpu / tally.total if tally.total else None,
        "connect_s": connect_s,
    }
    if tally.latencies:
        lat = sorted(tally.latencies)
        result["latency_ms"] = {
            "p50": 1e3 * lat[len(lat) // 2],
            "p99": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max": 1e3 * lat[-1],
            "samples": len(lat),
        }
    return result


def start_py_spy(pid: int, out: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = args.py_spy_format
    out = out.with_suffix({"raw": ".txt", "flamegraph": ".svg", "speedscope": ".json"}[fmt])
    rate = str(args.py_spy_rate)
    cmd = ["py-spy", "record", "--pid", str(pid), "--rate", rate, "--format", fmt, "-o", str(out)]
    if args.py_spy_native:
        cmd.append("--native")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT makes py-spy write its output; SIGKILL if it does not within 20 s.
    try:
        if proc.poll() is None:
            proc.send_signal(2)
            proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_one(
    name: str, subscribers: int, frames: int | None, args: argparse.Namespace, rep: int
) -> dict[str, Any]:
    """Start the relay's server, run one cell against it, stop the server."""
    relay = RELAYS[name]
    cmd = [
        *_util.python(),
        str(HERE / "relays" / relay.script),
        "--loop",
        relay.loop,
        "--port",
        "0",
    ]
    cmd += relay.server_args
    if relay.script == "trame.py" and args.server_register:
        cmd += ["--register", "BNC:<Qdd"]
    proc, host, port = _util.start_listening(cmd)
    try:
        tag = f"{name}-S{subscribers}-r{rep}"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(
                asyncio.wait_for(
                    run_cell(relay, host, port, proc.pid, subscribers, frames, args, tag),
                    args.cell_timeout + 120,
                )
            )
    finally:
        status = _util.stop_process(proc)
    result.update(relay=name, repeat=rep, server_exit=status)
    return result


# --- summaries ------------------------------------------------------------------------------------

_FIGURES = (
    "delivered_per_s",
    "server_us_per_frame",
    "server_cpu_s",
    "server_cpu_pct",
    "server_peak_rss_mib",
    "load_cpu_pct",
    "load_us_per_delivery",
    "seconds",
)
_LATENCIES = ("p50", "p99", "max")


def medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every figure per (relay, S); loss is the largest of the repeats."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["relay"], cell["subscribers"]), []).append(cell)
    out = []
    for (relay, subscribers), group in groups.items():
        row: dict[str, Any] = {
            "relay": relay,
            "subscribers": subscribers,
            "frames": statistics.median(c["frames"] for c in group),
            "repeats": len(group),
            "loss_max": max(c["loss"] for c in group),
            "cut_max": max(c["subscribers_cut"] for c in group),
        }
        for key in _FIGURES:
            values = [c[key] for c in group if c.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        if all("latency_ms" in c for c in group):
            row["latency_ms"] = {
                k: statistics.median(c["latency_ms"][k] for c in group) for k in _LATENCIES
            }
        out.append(row)
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each trame* figure divided by the same figure of each baseline at the same S."""
    by_key = {(r["relay"], r["subscribers"]): r for r in rows}
    out = []
    for row in rows:
        if not row["relay"].startswith("trame") or row["relay"].endswith(("-token", "-relaxed")):
            continue  # the limit variants are compared with each other (limit_costs)
        for base in BASELINES:
            other = by_key.get((base, row["subscribers"]))
            if other is None:
                continue
            entry: dict[str, Any] = {
                "relay": row["relay"],
                "baseline": base,
                "subscribers": row["subscribers"],
            }
            for key in (
                "delivered_per_s",
                "server_us_per_frame",
                "server_cpu_s",
                "server_peak_rss_mib",
            ):
                entry[key] = _ratio(row[key], other[key])
            if "latency_ms" in row and "latency_ms" in other:
                for k in _LATENCIES:
                    entry[f"latency_{k}"] = _ratio(row["latency_ms"][k], other["latency_ms"][k])
            out.append(entry)
    return out


def limit_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each trame server configuration divided by the same clients' ``*-relaxed`` cell at one S.

    ``trame`` (default limits), ``trame-token`` (default limits and a token) against
    ``trame-relaxed`` (every limit off or huge); the same for ``trame-raw``.
    """
    by_key = {(r["relay"], r["subscribers"]): r for r in rows}
    out = []
    for (name, subscribers), relaxed in sorted(by_key.items()):
        if not name.endswith("-relaxed"):
            continue
        base = name.removesuffix("-relaxed")
        for variant in (base, f"{base}-token"):
            row = by_key.get((variant, subscribers))
            if row is None:
                continue
            entry: dict[str, Any] = {
                "relay": variant,
                "vs": name,
                "subscribers": subscribers,
                "delivered_per_s": _ratio(row["delivered_per_s"], relaxed["delivered_per_s"]),
                "server_us_per_frame": _ratio(
                    row["server_us_per_frame"], relaxed["server_us_per_frame"]
                ),
                "server_peak_rss_mib": _ratio(
                    row["server_peak_rss_mib"], relaxed["server_peak_rss_mib"]
                ),
            }
            if "latency_ms" in row and "latency_ms" in relaxed:
                entry["latency_p99"] = _ratio(
                    row["latency_ms"]["p99"], relaxed["latency_ms"]["p99"]
                )
            out.append(entry)
    return out


def round_ratios(cells: list[dict[str, Any]], base: str = "floor-uvloop") -> list[dict[str, Any]]:
    """Per relay and S, the median over repeats (rounds) of each round's ratio to ``base``.

    The relays of one round run one after the other, so a round's ratio compares cells measured
    minutes apart at most; on a VM whose speed drifts by the hour, the median of these per-round
    ratios is steadier than the ratio of the medians. Figures: delivered/s, the load process's
    CPU µs per delivery (what the receiving clients cost), and the latency percentiles.
    """
    by_round = {(c["relay"], c["subscribers"], c["repeat"]): c for c in cells}
    keys = sorted({(c["relay"], c["subscribers"]) for c in cells if c["relay"] != base})
    out = []
    for relay, subscribers in keys:
        per: dict[str, list[float]] = {}
        for (name, s, rep), cell in by_round.items():
            other = by_round.get((base, s, rep))
            if name != relay or s != subscribers or other is None:
                continue
            pairs = [
                ("delivered_per_s", cell["delivered_per_s"], other["delivered_per_s"]),
                (
                    "load_us_per_delivery",
                    cell.get("load_us_per_delivery"),
                    other.get("load_us_per_delivery"),
                ),
            ]
            if "latency_ms" in cell and "latency_ms" in other:
                pairs += [(k, cell["latency_ms"][k], other["latency_ms"][k]) for k in _LATENCIES]
            for key, a, b in pairs:
                value = _ratio(a, b)
                if value is not None:
                    per.setdefault(key, []).append(value)
        if per:
            entry: dict[str, Any] = {"relay": relay, "baseline": base, "subscribers": subscribers}
            for key, values in per.items():
                entry[key] = statistics.median(values)
                entry[f"{key}_range"] = (min(values), max(values))
            entry["rounds"] = max(len(v) for v in per.values())
            out.append(entry)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(
    rows: list[dict[str, Any]],
    ratio_rows: list[dict[str, Any]],
    args: argparse.Namespace,
    rounds: list[dict[str, Any]] | None = None,
) -> str:
    if args.rate:
        mode = f"paced at {args.rate:g} frames/s"
    elif args.lead:
        mode = (
            f"publisher as fast as flow control allows, at most W = {args.lead:,} frames ahead "
            f"of its slowest subscriber"
        )
    else:
        mode = "publisher as fast as flow control allows (no publisher window W)"
    rows = sorted(rows, key=lambda r: (r["subscribers"], _order(r["relay"])))
    reps = max((r["repeats"] for r in rows), default=0)
    lines = [f"## Fan-out, {mode} (medians of {reps}; loss and subs cut: worst repeat)", ""]
    headers = [
        "relay",
        "S",
        "M",
        "delivered/s",
        "loss",
        "subs cut",
        "srv CPU s",
        "srv µs/frame",
        "srv CPU %",
        "srv peak RSS MiB",
        "load CPU %",
        "load µs/delivery",
    ]
    body = [
        [
            r["relay"],
            r["subscribers"],
            r["frames"],
            r["delivered_per_s"],
            r["loss_max"],
            r["cut_max"],
            r["server_cpu_s"],
            r["server_us_per_frame"],
            r["server_cpu_pct"],
            r["server_peak_rss_mib"],
            r["load_cpu_pct"],
            r["load_us_per_delivery"],
        ]
        for r in rows
    ]
    if args.rate:
        headers += ["p50 ms", "p99 ms", "max ms"]
        for line, r in zip(body, rows, strict=True):
            lat = r.get("latency_ms") or {}
            line += [lat.get("p50"), lat.get("p99"), lat.get("max")]
    lines.append(_util.table(headers, body))
    if ratio_rows:
        lines += [
            "",
            "## trame_async / baseline, same run (delivered/s: >1 is faster; µs/frame, CPU, RSS, latency: <1 is cheaper)",
            "",
        ]
        headers = ["relay", "S", "vs", "delivered/s", "srv µs/frame", "srv CPU s", "srv peak RSS"]
        if args.rate:
            headers += ["p50", "p99", "max"]
        body = []
        for e in sorted(
            ratio_rows, key=lambda e: (_order(e["relay"]), e["subscribers"], _order(e["baseline"]))
        ):
            line = [
                e["relay"],
                e["subscribers"],
                e["baseline"],
                e["delivered_per_s"],
                e["server_us_per_frame"],
                e["server_cpu_s"],
                e["server_peak_rss_mib"],
            ]
            if args.rate:
                line += [e.get(f"latency_{k}") for k in _LATENCIES]
            body.append(line)
        lines.append(_util.table(headers, body))
    for base in ("floor-uvloop", "trame-raw", "floor-task"):
        # Against trame-raw: the bare Protocol client on the same server, so the real clients'
        # own cost, without what the server adds for every client.
        of_base = [e for e in rounds or [] if e["baseline"] == base]
        if not of_base:
            continue
        lines += [
            "",
            f"## Per round / {base} of the same round: median over rounds (min-max)",
            "",
        ]
        headers = ["relay", "S", "rounds", "delivered/s", "load µs/delivery"]
        if args.rate:
            headers += ["p50", "p99"]
        body = []
        for e in sorted(of_base, key=lambda e: (_order(e["relay"]), e["subscribers"])):
            keys = ["delivered_per_s", "load_us_per_delivery"]
            if args.rate:
                keys += ["p50", "p99"]
            line: list[Any] = [e["relay"], e["subscribers"], e["rounds"]]
            for key in keys:
                if key in e:
                    low, high = e[f"{key}_range"]
                    line.append(f"{e[key]:.2f} ({low:.2f}-{high:.2f})")
                else:
                    line.append(None)
            body.append(line)
        lines.append(_util.table(headers, body))
    costs = limit_costs(rows)
    if costs:
        lines += [
            "",
            "## Cost of the limits: / the same clients against every limit relaxed (same run)",
            "",
        ]
        headers = ["relay", "S", "vs", "delivered/s", "srv µs/frame", "srv peak RSS"]
        if args.rate:
            headers.append("p99")
        body = []
        for e in costs:
            line = [
                e["relay"],
                e["subscribers"],
                e["vs"],
                e["delivered_per_s"],
                e["server_us_per_frame"],
                e["server_peak_rss_mib"],
            ]
            if args.rate:
                line.append(e.get("latency_p99"))
            body.append(line)
        lines.append(_util.table(headers, body))
    return "\n".join(lines)


def _order(name: str) -> int:
    return list(RELAYS).index(name) if name in RELAYS else len(RELAYS)


# --- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--relays",
        nargs="+",
        default=DEFAULT_RELAYS,
        choices=list(RELAYS),
        metavar="RELAY",
        help=f"from {', '.join(RELAYS)}",
    )
    p.add_argument("--subscribers", "-S", nargs="+", type=int, default=[1, 10, 100], metavar="S")
    p.add_argument("--repeat", type=int, default=1, help="repeats per cell (medians are reported)")
    p.add_argument(
        "--frames",
        "-M",
        type=int,
        default=None,
        help="frames per cell (default: send for --duration)",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds of sending per cell")
    p.add_argument(
        "--window",
        type=int,
        default=100_000,
        help="unpaced: most deliveries in flight (sent x S - received)",
    )
    p.add_argument(
        "--lead",
        type=int,
        default=10_000,
        metavar="W",
        help="unpaced: publisher window, the most frames ahead of the slowest subscriber (0: off)",
    )
    p.add_argument("--rate", type=float, default=None, help="paced mode: frames/s, reports latency")
    p.add_argument(
        "--yield-every", type=int, default=64, help="unpaced: publisher yields every N frames"
    )
    p.add_argument("--settle", type=float, default=0.3, help="seconds between connect and publish")
    p.add_argument(
        "--stall", type=float, default=3.0, help="give up when nothing arrives this long"
    )
    p.add_argument("--cell-timeout", type=float, default=60.0, help="seconds per cell at most")
    p.add_argument(
        "--server-register", action="store_true", help="register BNC on the trame server too"
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument(
        "--plot",
        nargs="?",
        const="docs/perf-fanout.png",
        metavar="PNG",
        help="plot delivered/s against S (default docs/perf-fanout.png)",
    )
    p.add_argument(
        "--py-spy", metavar="DIR", help="record a py-spy profile (raw) of the server per cell"
    )
    p.add_argument(
        "--py-spy-load",
        action="store_true",
        help="with --py-spy: also profile this (load) process, to DIR/<cell>-load.txt",
    )
    p.add_argument("--py-spy-native", action="store_true", help="include native frames")
    p.add_argument(
        "--py-spy-rate",
        type=int,
        default=250,
        help="samples/s (a paced cell keeps the load process mostly idle: raise it there)",
    )
    p.add_argument(
        "--py-spy-format",
        choices=("raw", "flamegraph", "speedscope"),
        default="raw",
        help="raw: read it with bench/profile_top.py",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _util.raise_nofile()
    meta = _util.metadata()
    cells = []
    total = len(args.relays) * len(args.subscribers) * args.repeat
    n = 0
    for rep in range(args.repeat):
        for subscribers in args.subscribers:
            for name in args.relays:
                n += 1
                print(
                    f"{time.strftime('%H:%M:%S')} [{n}/{total}] {name} S={subscribers} "
                    f"repeat {rep + 1}",
                    file=sys.stderr,
                    flush=True,
                )
                cell = run_one(name, subscribers, args.frames, args, rep)
                print(
                    f"    M={cell['frames']:,}: {cell['delivered_per_s']:,.0f} frames/s, loss {cell['loss']} "
                    f"({cell['subscribers_cut']} subs cut), "
                    f"server {cell['server_us_per_frame'] or 0:.2f} µs/frame, {cell['server_cpu_pct']:.0f} % CPU, "
                    f"load {cell['load_cpu_pct']:.0f} % CPU",
                    file=sys.stderr,
                    flush=True,
                )
                cells.append(cell)
    rows = medians(cells)
    ratio_rows = ratios(rows)
    rounds = round_ratios(cells) + [
        e for e in round_ratios(cells, "trame-raw") if e["relay"] in ("trame", "trame-cb")
    ]
    # async for against the least a task hand-off per message costs (when floor-task ran).
    rounds += [e for e in round_ratios(cells, "floor-task") if e["relay"] == "trame"]
    print(report(rows, ratio_rows, args, rounds))
    if args.json:
        data = {
            "meta": _util.finish_metadata(meta),
            "mode": "paced" if args.rate else "flood",
            "rate": args.rate,
            "lead": None if args.rate or not args.lead else args.lead,
            "cells": cells,
            "medians": rows,
            "ratios": ratio_rows,
            "round_ratios": rounds,
            "limit_costs": limit_costs(rows),
        }
        Path(args.json).write_text(json.dumps(data, indent=2))
    if args.plot:
        import plot

        plot.plot_fanout(rows, Path(args.plot))
        print(f"\nplot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
