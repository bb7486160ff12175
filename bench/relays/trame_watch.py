"""The trame_async server with any ServerConfig, reporting what happens to each client.

For bench/isolation.py: besides the ``listening on HOST:PORT`` line, it prints one JSON object per
line on stdout:

- ``{"event": "connect", "id": 3, "port": 40112, "t": ...}`` after a client's handshake;
- ``{"event": "disconnect", "id": 3, "port": 40112, "reason": "slow-consumer", "dropped": 120,
  "t": ...}`` when a connected client goes, with the frames the slow-consumer policy dropped for it;
- ``{"event": "stats", "stats": server.stats(), "clients": [...], "t": ...}`` for each ``stats``
  line read on stdin (``clients``: id, port, dropped and queued bytes of each connected client).

``port`` is the client's own port, which lets the load process tell its clients apart; ``t`` is
``time.monotonic()``, the clock the load process reads too (system-wide on Linux). The server
stops at EOF on stdin, SIGTERM or SIGINT.

    python bench/relays/trame_watch.py --loop uvloop --port 0 \\
        --config '{"slow_consumer_policy": "keep-latest", "slow_consumer_timeout": 1.0}'
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import _common

import trame_async


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _port(address: Any) -> int | None:
    return address[1] if isinstance(address, tuple) and len(address) >= 2 else None


def describe(client: Any) -> dict[str, Any]:
    return {
        "id": client.id,
        "port": _port(client.address),
        "dropped": getattr(client, "dropped", None),
        "queued_bytes": getattr(client, "queued_bytes", None),
    }


async def main(stop: asyncio.Event, host: str, port: int, config: dict[str, Any]) -> None:
    def on_connect(client: Any) -> None:
        emit({"event": "connect", "id": client.id, "port": _port(client.address), "t": now()})

    def on_disconnect(client: Any, reason: Any) -> None:
        emit({"event": "disconnect", **describe(client), "reason": str(reason), "t": now()})

    server = await trame_async.start_server(
        host, port, on_connect=on_connect, on_disconnect=on_disconnect, **config
    )
    _common.announce(host, server.port)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := await reader.readline():
            if line.strip() == b"stats":
                clients = [describe(c) for c in server.clients]
                emit({"event": "stats", "stats": server.stats(), "clients": clients, "t": now()})
        stop.set()

    task = loop.create_task(commands())
    try:
        await stop.wait()
    finally:
        task.cancel()
        server.close()
        await server.wait_closed()


now = time.monotonic

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    p = _common.parser(
        "trame_async server reporting connects, disconnects and stats as JSON lines."
    )
    p.add_argument("--config", default="{}", help="ServerConfig fields as a JSON object")
    args = p.parse_args()
    _common.run(lambda stop: main(stop, args.host, args.port, json.loads(args.config)), args.loop)
