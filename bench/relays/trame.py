"""The trame_async server as the benchmarks run it: default ServerConfig (limits on), 20 s heartbeat.

Equivalent to ``python -m trame_async --port 0 --loop uvloop --log-level WARNING``, with the same
command line as the other relays of this folder.

    python bench/relays/trame.py --loop uvloop --port 0 [--register BNC:<Qdd] [--token T | --relaxed]

By default the server registers no application trame, as a relay deployed for any application would:
it relays unknown codes after checking their frames against their own format. ``--register`` gives
it the type, to measure the registered fast path.

To measure what the robustness limits cost: ``--token T`` keeps every default limit and requires
the token ``T`` in each HELLO; ``--relaxed`` turns every limit off or makes it huge (outbound budget
1 TiB, no slow-consumer, handshake or frame timeout, no SO_SNDBUF cap, 1 GiB frames). Both keep the
20 s heartbeat and the 64 KiB write high-water mark (flow control, which is what gives zero loss).
"""

from __future__ import annotations

import asyncio
import logging

import _common

import trame_async

#: Every limit of ServerConfig off or out of reach (heartbeat and flow control stay as they are).
RELAXED = {
    "max_queue_bytes": 1 << 40,
    "max_frame_size": 1 << 30,
    "slow_consumer_timeout": None,
    "handshake_timeout": None,
    "frame_timeout": None,
    "send_buffer_size": None,
}


async def main(
    stop: asyncio.Event, host: str, port: int, register: list[str], token: str | None, relaxed: bool
) -> None:
    for item in register:
        code, _, fmt = item.partition(":")
        trame_async.register(code, fmt)
    config = trame_async.ServerConfig(
        heartbeat_interval=20.0, heartbeat_timeout=20.0, token=token, **(RELAXED if relaxed else {})
    )
    server = await trame_async.start_server(host, port, config=config)
    _common.announce(host, server.port)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    p = _common.parser("trame_async relay server (default limits).")
    p.add_argument("--register", action="append", default=[], metavar="CODE:FMT")
    p.add_argument("--token", default=None, help="require this token (default limits otherwise)")
    p.add_argument("--relaxed", action="store_true", help="every limit off or huge")
    args = p.parse_args()
    _common.run(
        lambda stop: main(stop, args.host, args.port, args.register, args.token, args.relaxed),
        args.loop,
    )
