"""Several clients in zones, multicasting their positions to their zone, each drawing what it
receives.

::

    python examples/positions.py                         # 4 clients in 2 zones, own server, 3 s
    python examples/positions.py --clients 6 --zones 3 --rate 60 --seconds 10
    trame-serve --last-value-groups 'zone/*'             # or use a running trame-serve:
    python examples/positions.py --port 8765

Client ``n`` (1, 2, ...) is in zone ``(n - 1) % --zones``: it joins the group ``zone/<z>`` and
multicasts its position there, a ``POS`` trame ``--rate`` times a second, on its own circle. The
server relays each position to the other members of that zone alone. Every client keeps the last
position it received from each other client; once a second the program draws what client 1 sees on
a small grid, and at the end prints a summary: frames sent, and received from the client's own zone
and from the others (none: a zone is a group).

Then a late joiner connects and joins every zone: the server keeps the last values of ``zone/*``
groups (``ServerConfig.last_value_groups``), so it gets at once the last position of every member,
before anything live, and the summary shows them. Without ``--host``/``--port`` the program starts
its own server on a free port (port 0) with that setting; a trame-serve keeps last values when
started with ``--last-value-groups 'zone/*'`` (otherwise the late joiner sees nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections.abc import AsyncIterator

import trame_async
from trame_async import POS, Position

GRID_HEIGHT = 17
# A terminal cell is about twice as tall as it is wide: twice the columns keeps circles round.
GRID_WIDTH = 2 * (GRID_HEIGHT - 1) + 1
#: The groups of the zones, ``zone/0``, ``zone/1``, ...: the pattern the server keeps last values of.
ZONE_GROUPS = "zone/*"
#: Seconds the late joiner waits for the last values, at most.
LATE_WAIT = 2.0


def zone_of(number: int, zones: int) -> str:
    """Return the group of client ``number`` (1, 2, ...): ``zone/<(number - 1) % zones>``."""
    return f"zone/{(number - 1) % zones}"


class Peer:
    """One client of the demo: where it is, what it has seen, and its counters."""

    def __init__(self, number: int, client: trame_async.Client, zone: str) -> None:
        self.number = number
        self.client = client
        #: The group this peer is in, and multicasts to.
        self.zone = zone
        self.sent = 0
        #: Positions received from this peer's zone, and from anywhere else.
        self.received = 0
        self.elsewhere = 0
        #: Last position received from each sender (by client id).
        self.seen: dict[int, Position] = {}
        self.position = Position(0.0, 0.0)
        #: Frames this peer must receive (what the others sent), known once they are done sending.
        self.expected: int | None = None
        self.caught_up = asyncio.Event()

    def expect(self, frames: int) -> None:
        """Note how many frames the others sent; :attr:`caught_up` is set once all arrived."""
        self.expected = frames
        if self.received >= frames:
            self.caught_up.set()

    def move(self, t: float) -> Position:
        """Return this peer's position at time ``t``: a circle of its own radius and speed."""
        radius = 0.3 + 0.6 * (self.number % 3) / 2
        speed = 0.5 + 0.25 * self.number
        phase = self.number * 2 * math.pi / 7
        angle = phase + speed * t
        self.position = Position(
            round(radius * math.cos(angle), 3), round(radius * math.sin(angle), 3)
        )
        return self.position

    async def send_positions(self, rate: float, seconds: float) -> None:
        """Multicast this peer's position to its zone ``rate`` times a second for ``seconds``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        period = 1.0 / rate
        ticks = max(1, round(seconds * rate))
        for tick in range(ticks):
            await self.client.multicast(POS, self.move(tick * period), group=self.zone)
            self.sent += 1
            # Pace on the clock, not on the previous sleep, so that the rate does not drift.
            await asyncio.sleep(max(0.0, start + (tick + 1) * period - loop.time()))

    async def receive_positions(self) -> None:
        """Record every position received until the connection ends."""
        async for message in self.client:
            if message.trame != POS:
                continue
            if message.group != self.zone:
                self.elsewhere += 1  # none from this demo's clients: they multicast to their zone
                continue
            self.received += 1
            self.seen[message.sender] = message.value
            if self.expected is not None and self.received >= self.expected:
                self.caught_up.set()


def draw(viewer: Peer, peers: list[Peer]) -> str:
    """Return the grid as ``viewer`` sees it: its own place (``@``) and the others' (their id)."""
    grid = [[" "] * GRID_WIDTH for _ in range(GRID_HEIGHT)]
    ids = {peer.client.id: peer for peer in peers}

    def plot(pos: Position, mark: str) -> None:
        col = round((pos.x + 1) / 2 * (GRID_WIDTH - 1))
        row = round((1 - (pos.y + 1) / 2) * (GRID_HEIGHT - 1))
        if 0 <= row < GRID_HEIGHT and 0 <= col < GRID_WIDTH:
            grid[row][col] = mark

    for sender, pos in sorted(viewer.seen.items()):
        plot(pos, str(sender % 10) if sender in ids else "?")
    plot(viewer.position, "@")
    border = "+" + "-" * GRID_WIDTH + "+"
    lines = [f"client {viewer.client.id} sees in {viewer.zone}:", border]
    lines += ["|" + "".join(row) + "|" for row in grid]
    lines.append(border)
    for sender, pos in sorted(viewer.seen.items()):
        lines.append(
            f"client {viewer.client.id} sees client {sender} at ({pos.x:+.2f}, {pos.y:+.2f})"
        )
    return "\n".join(lines)


async def show_every_second(peers: list[Peer]) -> None:
    """Draw what the first peer sees, once a second: in place on a terminal, else one after the
    other (a pipe or a log keeps every frame)."""
    live = sys.stdout.isatty()
    drawn = 0
    while True:
        await asyncio.sleep(1.0)
        picture = draw(peers[0], peers)
        if live and drawn:
            # Back to the top of the last picture and clear below it (ANSI: no dependency).
            print(f"\x1b[{drawn}F\x1b[J", end="")
        print(picture, flush=True)
        drawn = picture.count("\n") + 1


@contextlib.asynccontextmanager
async def server_address(host: str | None, port: int | None) -> AsyncIterator[tuple[str, int]]:
    """Yield the server to use: the one given, or one of our own on a free port."""
    if port is not None:
        yield host or "127.0.0.1", port
        return
    async with trame_async.serve(
        host or "127.0.0.1", 0, last_value_groups=(ZONE_GROUPS,)
    ) as server:
        print(
            f"started a server on {host or '127.0.0.1'}:{server.port} "
            f"(keeping last values of {ZONE_GROUPS})",
            flush=True,
        )
        yield host or "127.0.0.1", server.port


async def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit status."""
    async with (
        server_address(args.host, args.port) as (host, port),
        contextlib.AsyncExitStack() as stack,
    ):
        peers: list[Peer] = []
        for number in range(1, args.clients + 1):
            client = await stack.enter_async_context(
                trame_async.connect(host, port, token=args.token)
            )
            zone = zone_of(number, args.zones)
            await client.join(zone)
            peers.append(Peer(number, client, zone))
        print(
            f"{len(peers)} clients connected to {host}:{port}: ids {[p.client.id for p in peers]}",
            flush=True,
        )
        zones = sorted({peer.zone for peer in peers})
        for zone in zones:
            ids = [peer.client.id for peer in peers if peer.zone == zone]
            print(f"{zone}: clients {ids}", flush=True)

        receivers = [asyncio.create_task(peer.receive_positions()) for peer in peers]
        drawer = asyncio.create_task(show_every_second(peers))
        try:
            async with asyncio.TaskGroup() as senders:
                for peer in peers:
                    senders.create_task(peer.send_positions(args.rate, args.seconds))
            # Frames still in flight: wait (bounded) until each client got all its zone sent.
            for peer in peers:
                peer.expect(sum(p.sent for p in peers if p is not peer and p.zone == peer.zone))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    for peer in peers:
                        await peer.caught_up.wait()
        finally:
            drawer.cancel()
            for task in receivers:
                task.cancel()
            await asyncio.gather(drawer, *receivers, return_exceptions=True)

        print(draw(peers[0], peers), flush=True)
        print("summary:", flush=True)
        lost = 0
        for peer in peers:
            expected = peer.expected or 0
            lost += max(0, expected - peer.received)
            print(
                f"  client {peer.client.id} in {peer.zone}: sent {peer.sent} frames, received "
                f"{peer.received} frames from {peer.zone} (expected {expected}), "
                f"{peer.elsewhere} from other zones",
                flush=True,
            )
        print(
            f"  total: sent {sum(p.sent for p in peers)}, received "
            f"{sum(p.received for p in peers)}, missing {lost}, "
            f"{sum(p.elsewhere for p in peers)} from other zones",
            flush=True,
        )
        await late_joiner(host, port, args.token, peers, zones)
    return 0


async def late_joiner(
    host: str, port: int, token: str | None, peers: list[Peer], zones: list[str]
) -> None:
    """Connect once the others are done, join every zone, and show what arrives at once: the
    last position of each member if the server keeps last values of the zones, else nothing."""
    members = {peer.client.id: peer for peer in peers}
    loop = asyncio.get_running_loop()
    async with trame_async.connect(host, port, token=token) as late:
        start = elapsed = loop.time()
        for zone in zones:
            await late.join(zone)
        # The last values follow each join's answer: wait for one per member (bounded).
        last: dict[int, tuple[str | None, Position]] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LATE_WAIT):
                while len(last) < len(members):
                    message = await late.receive()
                    if message.trame == POS and message.sender in members:
                        last[message.sender] = (message.group, message.value)
                        elapsed = loop.time()
    print(
        f"late joiner (client {late.id}) joined {', '.join(zones)} and at once saw "
        f"{len(last)} of {len(members)} members' last positions "
        f"(within {(elapsed - start) * 1e3:.0f} ms of its first join):",
        flush=True,
    )
    for sender, (group, pos) in sorted(last.items()):
        sent = members[sender].position
        same = "its last" if pos == sent else f"not its last ({sent.x:+.2f}, {sent.y:+.2f})"
        print(f"  client {sender} in {group} at ({pos.x:+.2f}, {pos.y:+.2f}): {same}", flush=True)
    if not last:
        print(
            f"  (the server keeps no last values of {ZONE_GROUPS}: start trame-serve with "
            f"--last-value-groups '{ZONE_GROUPS}')",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the demo."""
    parser = argparse.ArgumentParser(description="Clients multicasting their positions.")
    parser.add_argument("--clients", type=int, default=4, help="number of clients")
    parser.add_argument(
        "--zones", type=int, default=2, help="number of zones (groups zone/0, zone/1, ...)"
    )
    parser.add_argument(
        "--rate", type=float, default=20.0, help="positions sent per second per client"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run")
    parser.add_argument("--host", default=None, help="server address (default: start our own)")
    parser.add_argument(
        "--port", type=int, default=None, help="server port (default: start our own)"
    )
    parser.add_argument("--token", default=None, help="the server's token, if it has one")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.zones < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--clients, --zones, --rate and --seconds must be positive")
    if args.host is not None and args.port is None:
        args.port = 8765
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except (trame_async.ConnectError, trame_async.ConnectionClosed) as err:
        print(f"positions: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
