"""Server counters: frames in, deliveries, bytes, disconnects by reason."""

from __future__ import annotations

import json

from helpers import eventually, receive_n

import trame_async
from trame_async import DisconnectReason


async def test_stats_count_frames_deliveries_and_disconnects() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        clients = [await trame_async.connect("127.0.0.1", server.port) for _ in range(4)]
        for i in range(25):
            await clients[0].multicast(trame_async.INT, i)
        for c in clients[1:]:
            await receive_n(c, 25)
        stats = server.stats()
        assert stats["clients"] == 4
        assert stats["frames_in"] == 25
        assert stats["deliveries"] == 25 * 3
        relay_size = len(trame_async.encode(trame_async.INT, 0)[0]) + 4
        assert stats["bytes_relayed"] == 25 * 3 * relay_size
        await clients[3].close()
        await eventually(lambda: server.disconnects[DisconnectReason.GOODBYE] == 1)
        stats = server.stats()
        assert stats["clients"] == 3
        assert stats["disconnects"] == {"goodbye": 1}
        json.dumps(stats)  # ready for a JSON endpoint
        for c in clients[:3]:
            await c.close()
