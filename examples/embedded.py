"""A trame_async server embedded in an existing asyncio application.

::

    python examples/embedded.py                 # runs 3 seconds on a free port
    python examples/embedded.py --port 8765 --seconds 60

The application already has its own tasks; the server is one more resource opened with
``async with trame_async.serve(...)``, next to them:

- a ticker task multicasts a server-originated ``INT`` counter (sender 0) every 0.5 s with
  ``server.multicast``: it does not await, whatever the number of clients;
- the ``on_data`` hook answers a client's ``ASK`` request (a DATA frame, for the server alone) with
  ``client.send(...)``, a DATA frame to that client alone;
- ``on_connect``/``on_disconnect`` log arrivals and departures with the reason.

To show that it works, the application also connects one client to itself. After ``--seconds`` it
stops its tasks and leaves the ``async with`` block, which shuts the server down gracefully (clients
get a GOODBYE); the summary says what was sent and received.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import trame_async
from trame_async import INT, DisconnectReason, Message, RemoteClient

#: A request to the server: the name of what is asked ("uptime", "clients").
ASK = trame_async.register("ASK", "<*s", str)
#: The server's answer to an ASK (text).
ANS = trame_async.register("ANS", "<*s", str)


class App:
    """The surrounding application: some state, its tasks, and the server's hooks."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ticks_sent = 0
        self.requests = 0
        self.ticks_received = 0
        self.answers_received = 0
        self.server: trame_async.Server | None = None

    # --- server hooks: plain functions run in the protocol callback, so they must not block ----

    def on_connect(self, client: RemoteClient) -> None:
        print(f"server: client {client.id} connected from {client.address[0]}", flush=True)

    def on_disconnect(self, client: RemoteClient, reason: DisconnectReason) -> None:
        print(f"server: client {client.id} left ({reason})", flush=True)

    def on_data(self, client: RemoteClient, message: Message) -> None:
        if message.trame != ASK:
            return
        self.requests += 1
        if message.value == "uptime":
            answer = f"uptime {time.monotonic() - self.started:.2f} s"
        elif message.value == "clients":
            answer = f"{len(self.server.clients) if self.server else 0} client(s) connected"
        else:
            answer = f"unknown question {message.value!r}"
        print(f"server: client {client.id} asks {message.value!r} -> {answer!r}", flush=True)
        client.send(ANS, answer)

    # --- the application's own tasks ----------------------------------------------------------

    async def ticker(self, server: trame_async.Server, period: float) -> None:
        """Multicast a counter to every client (sender 0) every ``period`` seconds."""
        while True:
            await asyncio.sleep(period)
            self.ticks_sent += 1
            server.multicast(INT, self.ticks_sent)

    async def own_client(self, port: int, questions: list[str]) -> None:
        """Connect to our own server, ask ``questions``, then print what arrives until cancelled."""
        async with trame_async.connect("127.0.0.1", port) as client:
            print(f"client: connected as client {client.id}", flush=True)
            for question in questions:
                await client.send_data(ASK, question)
            async for message in client:
                if message.trame == INT:
                    self.ticks_received += 1
                    print(f"client: tick {message.value} from sender {message.sender}", flush=True)
                elif message.trame == ANS:
                    self.answers_received += 1
                    print(f"client: answer {message.value!r} ({message.kind.name})", flush=True)


async def run(args: argparse.Namespace) -> int:
    """Run the application for ``args.seconds``, then shut everything down."""
    app = App()
    async with trame_async.serve(
        args.host,
        args.port,
        on_connect=app.on_connect,
        on_disconnect=app.on_disconnect,
        on_data=app.on_data,
        heartbeat_interval=5.0,
        heartbeat_timeout=5.0,
    ) as server:
        app.server = server
        print(f"server: listening on {args.host}:{server.port}", flush=True)
        ticker = asyncio.create_task(app.ticker(server, 0.5))
        client = asyncio.create_task(app.own_client(server.port, ["uptime", "clients"]))
        # The application's main work would go here; this one just lets the others run.
        await asyncio.sleep(args.seconds)
        for task in (client, ticker):
            task.cancel()
        await asyncio.gather(client, ticker, return_exceptions=True)
        print("server: shutting down", flush=True)
    print(
        f"summary: server multicast {app.ticks_sent} ticks and answered {app.requests} requests; "
        f"the client received {app.ticks_received} ticks and {app.answers_received} answers",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the application."""
    parser = argparse.ArgumentParser(description="A trame_async server inside an asyncio app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
