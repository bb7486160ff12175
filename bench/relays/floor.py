"""The floor: a minimal length-prefixed relay on ``asyncio.Protocol``.

Frames are ``u32 BE length + payload``. Each frame from a client is written, as is, to every other
client: one ``bytes`` object per frame, one ``transport.write`` per frame per recipient, no flow
control, no limits, no heartbeat. Anything a real relay does costs more than this.

    python bench/relays/floor.py --loop uvloop --port 0
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

import _common

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 20


class Relay(asyncio.Protocol):
    """One client connection of the floor relay."""

    def __init__(self, writers: dict[Relay, object]) -> None:
        self.writers = writers
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.writers[self] = transport.write

    def connection_lost(self, exc: Exception | None) -> None:
        self.writers.pop(self, None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        frames = []
        with memoryview(buf) as view:
            while end - pos >= 4:
                length = _LENGTH.unpack_from(view, pos)[0]
                if length > MAX_FRAME:
                    assert self.transport is not None
                    self.transport.abort()
                    return
                stop = pos + 4 + length
                if stop > end:
                    break
                frames.append(bytes(view[pos:stop]))
                pos = stop
        del buf[:pos]
        items = self.writers.items()
        for frame in frames:
            for proto, write in items:
                if proto is not self:
                    write(frame)  # type: ignore[operator]


async def main(stop: asyncio.Event, host: str, port: int) -> None:
    writers: dict[Relay, object] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Relay(writers), host, port, backlog=1024)
    _common.announce(host, server.sockets[0].getsockname()[1])
    try:
        await stop.wait()
    finally:
        server.close()
        for proto in list(writers):
            if proto.transport is not None:
                proto.transport.abort()
        await server.wait_closed()


if __name__ == "__main__":
    args = _common.parse_args("Minimal length-prefixed asyncio relay (the floor).")
    _common.run(lambda stop: main(stop, args.host, args.port), args.loop)
