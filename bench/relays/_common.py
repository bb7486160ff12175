"""What the three relay servers share: the command line, the loop choice, the run-until-signal."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable


def parser(description: str) -> argparse.ArgumentParser:
    """Return a parser of ``--loop asyncio|uvloop --host H --port P`` (port 0: the OS picks)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    return p


def parse_args(description: str) -> argparse.Namespace:
    """Parse the common command line."""
    return parser(description).parse_args()


def run(main: Callable[[asyncio.Event], Awaitable[None]], loop: str) -> None:
    """Run ``main(stop)`` on the chosen loop; SIGTERM or SIGINT sets ``stop``."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, stop.set)
        await main(stop)

    factory = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(wrapper())


def announce(host: str, port: int) -> None:
    """Print the line the benchmarks wait for."""
    print(f"listening on {host}:{port}", flush=True)
