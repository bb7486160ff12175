"""The idle floor: the least a Python server can do to keep idle trame_async clients alive.

It answers HELLO with WELCOME, pings every client once per ``--heartbeat-interval`` (spread over
the interval by one repeating timer, as trame_async's timer wheel does), and notes the time of
each client's last frame; a client silent for ``--heartbeat-timeout`` is aborted. No limits, no
handshake checks, no multicast, no stats: any real server costs at least this much per idle client.

    python bench/relays/idle_floor.py --loop uvloop --port 0 --heartbeat-interval 1

The bytes on the wire are trame_async's, so bench/idle.py's clients cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

import _common

from trame_async.wire import Welcome, ping

_U32 = struct.Struct(">I")
_SLOTS = 100  # timer ticks per interval: each tick pings the clients of one slot
_HELLO, _PONG = 0x01, 0x04


class IdleConn(asyncio.Protocol):
    """One client of the idle floor."""

    __slots__ = ("buf", "last", "loop", "server", "slot", "transport")

    def __init__(self, server: IdleServer) -> None:
        self.server = server
        self.loop = server.loop
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.last = self.loop.time()
        self.slot = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot >= 0:
            self.server.slots[self.slot].pop(self, None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        while end - pos >= 5:
            stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
            if stop > end:
                break
            if buf[pos + 4] == _HELLO and self.slot < 0:
                self.server.welcome(self)
            pos = stop
        del buf[:pos]


class IdleServer:
    """The clients by timer slot, and the one repeating timer that pings a slot per tick."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval = interval
        self.timeout = timeout
        self.slots: list[dict[IdleConn, None]] = [{} for _ in range(_SLOTS)]
        self.next_id = 0
        self.tick_no = 0
        self.handle = self.loop.call_later(interval / _SLOTS, self.tick)

    def welcome(self, conn: IdleConn) -> None:
        self.next_id += 1
        conn.slot = self.next_id % _SLOTS
        self.slots[conn.slot][conn] = None
        assert conn.transport is not None
        conn.transport.write(
            Welcome(1, 0, self.next_id, self.interval, self.timeout, 1 << 20).encode()
        )

    def tick(self) -> None:
        self.tick_no += 1
        self.handle = self.loop.call_later(self.interval / _SLOTS, self.tick)
        frame = ping(self.tick_no & 0xFFFF_FFFF)  # one PING object for the whole slot
        dead = self.loop.time() - self.timeout
        for conn in list(self.slots[self.tick_no % _SLOTS]):
            transport = conn.transport
            if transport is None:
                continue
            if conn.last < dead:
                transport.abort()
            else:
                transport.write(frame)


async def main(stop: asyncio.Event, host: str, port: int, interval: float, timeout: float) -> None:
    idle = IdleServer(interval, timeout)
    server = await idle.loop.create_server(lambda: IdleConn(idle), host, port, backlog=1024)
    _common.announce(host, server.sockets[0].getsockname()[1])
    try:
        await stop.wait()
    finally:
        idle.handle.cancel()
        server.close()
        for slot in idle.slots:
            for conn in list(slot):
                if conn.transport is not None:
                    conn.transport.abort()
        await server.wait_closed()


if __name__ == "__main__":
    p = _common.parser("Minimal server keeping idle trame_async clients alive (the idle floor).")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-timeout", type=float, default=2.0)
    args = p.parse_args()
    _common.run(
        lambda stop: main(
            stop, args.host, args.port, args.heartbeat_interval, args.heartbeat_timeout
        ),
        args.loop,
    )
