"""A cluster node in a process of its own, for the tests that SIGKILL or SIGSTOP one.

Usage: ``python cluster_node_main.py NAME INDEX NATS_URL [NATS_URL...]``. It prints
``listening on 127.0.0.1:PORT`` once serving, and serves until killed or sent SIGTERM. The
timers are those of tests/cluster_helpers.py.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from cluster_helpers import cluster_config

import trame_async


async def main() -> None:
    name, index, *urls = sys.argv[1:]
    config = cluster_config(urls, name, node_index=int(index))
    server = await trame_async.start_server("127.0.0.1", 0, cluster=config, heartbeat_interval=None)
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
