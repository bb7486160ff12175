"""A websockets relay: each binary message received goes to every other connection.

Built the way the websockets documentation suggests: ``serve()`` with a handler that iterates over
messages and hands each to ``websockets.broadcast()`` (no per-client task or await). Compression is
off; keepalive pings keep their default (20 s), like the trame_async heartbeat.

    python bench/relays/ws_broadcast.py --loop uvloop --port 0
"""

from __future__ import annotations

import asyncio

import _common
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


async def main(stop: asyncio.Event, host: str, port: int) -> None:
    connections: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        connections.add(ws)
        try:
            async for message in ws:
                broadcast(connections - {ws}, message)
        except ConnectionClosed:
            pass  # the benchmark's clients just drop the connection at the end
        finally:
            connections.discard(ws)

    async with serve(handler, host, port, compression=None, backlog=1024) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        _common.announce(host, port)
        await stop.wait()
        server.close(close_connections=False)
        for ws in list(connections):
            ws.transport.abort()


if __name__ == "__main__":
    args = _common.parse_args("websockets relay with broadcast().")
    _common.run(lambda stop: main(stop, args.host, args.port), args.loop)
