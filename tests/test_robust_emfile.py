"""Out of file descriptors: the accept loop backs off instead of spinning, then recovers."""

from __future__ import annotations

import asyncio
import socket

import psutil
import pytest
from helpers import spawn, stop_process, wait_listening

import trame_async

SERVER = """\
import asyncio, resource, sys
import trame_async

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    server = await trame_async.start_server("127.0.0.1", 0, handshake_timeout=30)
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    await server.serve_forever()

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the server subprocess picks its own loop
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
async def test_accept_backs_off_when_out_of_descriptors(loop_name: str) -> None:
    proc = await spawn(["-c", SERVER, loop_name])
    socks: list[socket.socket] = []
    try:
        _, port = await wait_listening(proc)
        server = psutil.Process(proc.pid)
        for _ in range(100):  # well past the server's 64 descriptors
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            socks.append(s)
        before = server.cpu_times()
        loop = asyncio.get_running_loop()
        start = loop.time()
        # A measurement window (not a synchronisation): the server's CPU while out of descriptors.
        await asyncio.sleep(1.5)
        after = server.cpu_times()
        used = (after.user + after.system) - (before.user + before.system)
        share = used / (loop.time() - start)
        assert share < 0.5, f"server used {share:.0%} of a core while out of descriptors"
        for s in socks:
            s.close()
        socks.clear()
        # Once descriptors are free again, new clients get in (asyncio retries accept after 1 s;
        # uvloop accepts-and-closes while it is still out of descriptors), within a deadline.
        deadline = loop.time() + 10
        for attempt in range(1000):
            try:
                client = await trame_async.connect("127.0.0.1", port, timeout=5)
            except (trame_async.ConnectError, trame_async.ConnectionClosed):
                assert loop.time() < deadline, f"no connection accepted after {attempt} tries"
                await asyncio.sleep(0.05)  # bounded poll interval
                continue
            assert client.id > 0
            await client.close()
            break
    finally:
        for s in socks:
            s.close()
        await stop_process(proc)
