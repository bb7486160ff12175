"""connect() with several server addresses: the first connect goes through them, and a reconnect
lands on another one when the server it was on goes away.

Servers on 127.0.0.1 (port 0) stand for the nodes of a cluster. They share nothing here, so a test
that checks delivery after a move publishes on the server the client landed on. A node that "shuts
down" is ``server.close()`` (a GOODBYE ``SERVER_SHUTDOWN`` with a retry-after hint); a node that is
"killed" stops listening and has every connection aborted without a word, as a SIGKILL or a cut
cable would. A "dead" address is a closed port: connecting to it is refused at once. Runs on both
event loops (conftest.py); every wait is bounded, none synchronises by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import MS, eventually, running

import trame_async
from trame_async import (
    INT,
    AuthenticationError,
    Backoff,
    Client,
    ConnectError,
    ConnectionClosed,
    DisconnectReason,
    Presence,
    Server,
)

#: Reconnect rounds come back at once: no wait worth the name between two.
FAST = Backoff(initial=5 * MS, factor=1.0, maximum=5 * MS)
#: Bound on every wait for a reconnect: far above what it takes, far below a retry-after of 60 s.
WAIT = 10.0


@contextlib.asynccontextmanager
async def nodes(n: int) -> AsyncIterator[list[Server]]:
    """``n`` servers on 127.0.0.1, each on a port of its own."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running()) for _ in range(n)]


@contextlib.asynccontextmanager
async def on_port(port: int) -> AsyncIterator[Server]:
    """A server on 127.0.0.1 at ``port`` (one just freed by another server)."""
    server = await trame_async.start_server("127.0.0.1", port)
    try:
        yield server
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 20)


def at(port: int) -> str:
    return f"127.0.0.1:{port}"


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (a connect is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def kill(server: Server) -> None:
    """Stop listening and reset every connection at once: no GOODBYE, no retry-after hint."""
    server.close()  # the listening socket is closed before this returns
    server._abort_all()  # before the shutdown task runs: nobody gets its goodbye


def trame_tasks() -> list[asyncio.Task[Any]]:
    """Return the running tasks whose coroutine is trame_async's own (a reconnect loop, a hook)."""
    package = Path(trame_async.__file__).parent
    return [
        task
        for task in asyncio.all_tasks()
        if (code := getattr(task.get_coro(), "cr_code", None)) is not None
        and Path(code.co_filename).parent == package
    ]


class Moves:
    """Records a client's reconnects; :meth:`next` waits for the next one."""

    def __init__(self) -> None:
        self.lost: list[DisconnectReason] = []
        self.landed: list[tuple[str, int]] = []
        self._event = asyncio.Event()

    def on_disconnect(self, err: ConnectionClosed) -> None:
        self.lost.append(err.reason)

    def on_reconnect(self, client: Client) -> None:
        self.landed.append(client.address)
        self._event.set()

    async def next(self, timeout: float = WAIT) -> tuple[str, int]:
        """Wait for the next reconnect; return the address it landed on."""
        seen = len(self.landed)
        async with asyncio.timeout(timeout):
            while len(self.landed) == seen:
                self._event.clear()
                await self._event.wait()
        return self.landed[seen]


def connect_to(addresses: Sequence[str], moves: Moves, **options: Any) -> trame_async.connect:
    """A reconnecting client of ``addresses``, tried in the order given."""
    return trame_async.connect(
        list(addresses),
        shuffle=False,
        reconnect=FAST,
        rtt_interval=None,
        on_disconnect=moves.on_disconnect,
        on_reconnect=moves.on_reconnect,
        **options,
    )


async def receives_from(server: Server, client: Client, value: int) -> None:
    """``client`` receives what ``server`` multicasts now."""
    server.multicast(INT, value)
    message = await client.receive(timeout=5)
    assert (message.sender, message.value) == (0, value)


# --- naming the addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", [("10.0.0.1", 8765)]),
        ("10.0.0.1:9000", [("10.0.0.1", 9000)]),
        ("node-a.example", [("node-a.example", 8765)]),
        ("[::1]:9000", [("::1", 9000)]),
        ("[::1]", [("::1", 8765)]),
        ("::1", [("::1", 8765)]),  # a bare IPv6 address: connect("::1", port) as always
        ("fe80::1%eth0", [("fe80::1%eth0", 8765)]),
        ("h1:1, h2:2 ,h3", [("h1", 1), ("h2", 2), ("h3", 8765)]),
        ("h1:1,[::1]:2", [("h1", 1), ("::1", 2)]),
        (["h1:1", ("h2", 2), "[::1]:3", "h4"], [("h1", 1), ("h2", 2), ("::1", 3), ("h4", 8765)]),
        (("h", 5), [("h", 5)]),  # one (host, port) pair
        (("h1:1", "h2"), [("h1", 1), ("h2", 8765)]),  # a tuple of two address strings
        ("h1:1,h2:2,h1:1", [("h1", 1), ("h2", 2)]),  # repeats count once
    ],
)
def test_the_addresses_connect_takes(host: Any, expected: list[tuple[str, int]]) -> None:
    client = trame_async.connect(host, 8765, shuffle=False)._client
    assert client.addresses == tuple(expected)
    assert client.address == expected[0]


@pytest.mark.parametrize(
    ("host", "error", "says"),
    [
        ("", ValueError, "no host"),
        ("h:", ValueError, "port"),
        ("h:0", ValueError, "1 to 65535"),
        ("h:65536", ValueError, "1 to 65535"),
        ("h:http", ValueError, "port"),
        (":8765", ValueError, "no host"),
        ("[::1", ValueError, "brackets"),
        ("[::1]8765", ValueError, "brackets"),
        ("h1,,h2", ValueError, "no host"),
        ([], ValueError, "at least one"),
        (["h1:1,h2:2"], ValueError, "one address per item"),
        ([("h", "8765")], TypeError, "(host, port) pair"),
        ([8765], TypeError, "(host, port) pair"),
        (8765, TypeError, "not int"),
    ],
)
def test_addresses_that_name_no_server_are_refused(host: Any, error: type, says: str) -> None:
    with pytest.raises(error, match=says.replace("(", r"\(").replace(")", r"\)")):
        trame_async.connect(host, 8765)


async def test_clients_given_the_same_list_spread_over_the_servers() -> None:
    async with nodes(3) as servers:
        addresses = ",".join(at(server.port) for server in servers)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(trame_async.connect(addresses, rtt_interval=None))
                for _ in range(12)
            ]
            for client in clients:
                assert sorted(client.addresses) == sorted(
                    ("127.0.0.1", server.port) for server in servers
                )
                assert client.address == client.addresses[0]  # all up: the first of its order
            # Each client drew its own order: all 12 on one server would happen once in 3**11.
            assert len({client.address for client in clients}) > 1
            assert sum(len(server.clients) for server in servers) == 12


# --- the first connect -----------------------------------------------------------------------


async def test_the_first_connect_skips_a_refused_address_at_once() -> None:
    loop = asyncio.get_running_loop()
    async with nodes(2) as (a, b):
        dead = closed_port()
        start = loop.time()
        async with trame_async.connect(
            [at(dead), at(a.port), at(b.port)], shuffle=False, timeout=5.0
        ) as client:
            # Refused at once: not a wait of the 5 s timeout.
            assert loop.time() - start < 2.0
            assert client.address == ("127.0.0.1", a.port)
            assert (client.host, client.port) == client.address
            assert [c.id for c in a.clients] == [client.id] and b.clients == []
            await receives_from(a, client, 1)


async def test_no_address_answering_the_first_connect_is_one_error_naming_them_all() -> None:
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # accepts, never answers the HELLO

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        quiet = listener.sockets[0].getsockname()[1]
        ports = [closed_port(), quiet, closed_port()]
        opening = trame_async.connect(
            ",".join(at(port) for port in ports), shuffle=False, timeout=200 * MS, reconnect=FAST
        )
        with pytest.raises(ConnectError) as info:
            await opening
        err: Any = info.value
        assert [address for address, _ in err.errors] == [("127.0.0.1", p) for p in ports]
        assert all(isinstance(e, ConnectError) for _, e in err.errors)
        assert "timed out" in err.errors[1][1].detail
        text = str(err)
        assert text.startswith("cannot connect to any of the 3 addresses (127.0.0.1:")
        for port in ports:
            assert at(port) in text
        assert (err.host, err.port) == ("127.0.0.1", ports[0])
        assert "check that trame-serve runs there" in err.hint
        # A first connect that failed only raises: no reconnect goes on behind it.
        assert trame_tasks() == []
        assert not opening._client.connected
    finally:
        for writer in silent:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_a_refused_token_is_not_offered_to_the_other_addresses() -> None:
    knocks = 0

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal knocks
        knocks += 1
        writer.close()

    listener = await asyncio.start_server(other, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        async with running(token="s3cret") as guarded:
            with pytest.raises(AuthenticationError):
                await trame_async.connect(
                    [at(guarded.port), at(port)], shuffle=False, token="wrong"
                )
        assert knocks == 0
    finally:
        listener.close()
        await listener.wait_closed()


# --- reconnecting through the addresses ------------------------------------------------------


async def test_a_client_whose_server_shuts_down_lands_on_the_next_and_receives_again() -> None:
    loop = asyncio.get_running_loop()
    async with nodes(3) as (a, b, c):
        moves = Moves()
        async with connect_to([at(a.port), at(b.port), at(c.port)], moves) as client:
            assert client.address == ("127.0.0.1", a.port)
            await receives_from(a, client, 1)
            # A shuts down and asks its clients to come back in a minute: that holds back A
            # alone, and B, next in the list, takes the client at once.
            start = loop.time()
            a.close(retry_after=60)
            assert await moves.next() == ("127.0.0.1", b.port)
            assert loop.time() - start < WAIT
            assert client.connected and client.address == ("127.0.0.1", b.port)
            assert moves.lost == [DisconnectReason.SERVER_SHUTDOWN]
            assert [x.id for x in b.clients] == [client.id]
            await receives_from(b, client, 2)
            # B shuts down too: C, next after B, takes it.
            b.close(retry_after=60)
            assert await moves.next() == ("127.0.0.1", c.port)
            await receives_from(c, client, 3)
            assert client.reconnects == 2


async def test_killing_all_servers_but_one_moves_their_clients_to_the_last() -> None:
    async with nodes(3) as (a, b, c):
        moves = Moves()
        async with connect_to([at(a.port), at(b.port), at(c.port)], moves) as client:
            assert client.address == ("127.0.0.1", a.port)
            # A and B die at once: A's connection is reset (no goodbye, no hint) and B, tried
            # next, refuses; C takes the client in the same round.
            kill(a)
            kill(b)
            assert await moves.next() == ("127.0.0.1", c.port)
            assert moves.lost == [DisconnectReason.CONNECTION_LOST]
            assert [x.id for x in c.clients] == [client.id]
            await receives_from(c, client, 1)


async def test_a_lost_connection_moves_on_even_when_its_server_still_listens() -> None:
    async with nodes(3) as (a, b, c):
        moves = Moves()
        async with connect_to([at(a.port), at(b.port), at(c.port)], moves) as client:
            # The connection to A breaks (a reset on the path), A itself stays up: the
            # reconnect starts with the address after A, and A, which just failed, comes last.
            (remote,) = a.clients
            assert remote._transport is not None
            remote._transport.abort()
            assert await moves.next() == ("127.0.0.1", b.port)
            assert a.clients == [] and [x.id for x in b.clients] == [client.id]
            # From B, the next is C; then the list wraps round to A.
            (remote,) = b.clients
            assert remote._transport is not None
            remote._transport.abort()
            assert await moves.next() == ("127.0.0.1", c.port)
            kill(c)
            assert await moves.next() == ("127.0.0.1", a.port)
            await receives_from(a, client, 1)


async def test_the_retry_after_of_a_server_holds_back_its_own_address_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trame_async.client")
    loop = asyncio.get_running_loop()
    hint = 400 * MS
    dead = closed_port()
    async with running() as a:
        port = a.port
        moves = Moves()
        async with connect_to([at(port), at(dead)], moves) as client:
            # 0: A shuts down, asking its clients to wait 400 ms.
            start = loop.time()
            a.close(retry_after=hint)
            await a.wait_closed()
            # A new server takes A's port at once; the client keeps trying the dead address
            # meanwhile, and comes back to A's port only once the 400 ms are over.
            async with on_port(port) as again:
                assert await moves.next() == ("127.0.0.1", port)
                # Timers may fire a millisecond early (uvloop): a little slack, no more.
                assert loop.time() - start >= hint - 5 * MS
                assert [x.id for x in again.clients] == [client.id]
                await receives_from(again, client, 1)
        tried_dead = [r for r in caplog.records if f"127.0.0.1:{dead} failed" in r.getMessage()]
        assert tried_dead, "the dead address was not tried while A's hint held A back"


async def test_groups_are_joined_again_on_the_server_the_client_lands_on() -> None:
    async with nodes(2) as (a, b):
        moves = Moves()
        async with (
            connect_to([at(a.port), at(b.port)], moves) as client,
            trame_async.connect("127.0.0.1", b.port, rtt_interval=None) as member,
        ):
            await client.join("room")
            await client.join("watch", presence=True)
            await member.join("room", presence=True)
            await member.join("watch")
            assert client.address == ("127.0.0.1", a.port)
            kill(a)
            assert await moves.next() == ("127.0.0.1", b.port)
            # Joined again before on_reconnect: B has the client in both groups already.
            assert client.groups == {"room", "watch"}
            assert client.id in await member.members("room")
            assert await member.next_presence(timeout=5) == Presence("room", client.id, True, None)
            await member.multicast(INT, 42, group="room")
            message = await client.receive(timeout=5)
            assert (message.sender, message.value, message.group) == (member.id, 42, "room")
            # Presence flags come along: the client hears of the member leaving "watch".
            await member.leave("watch")
            assert await client.next_presence(timeout=5) == Presence(
                "watch", member.id, False, None
            )


async def test_close_while_going_round_dead_addresses_returns_in_time() -> None:
    loop = asyncio.get_running_loop()
    async with nodes(2) as (a, b):
        moves = Moves()
        client = await connect_to([at(a.port), at(b.port), at(closed_port())], moves)
        try:
            kill(a)
            kill(b)
            await eventually(lambda: moves.lost != [], what="the loss noticed")
            assert not client.connected
            start = loop.time()
            await client.close(timeout=1.0)
            assert loop.time() - start <= 1.0
            assert client.closed and client.close_reason is DisconnectReason.CLOSED
            assert trame_tasks() == []
            assert moves.landed == []
        finally:
            await client.close(timeout=1.0)
