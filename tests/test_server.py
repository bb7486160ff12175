"""The server's life cycle and its answers to bad peers, over real sockets on 127.0.0.1.

Start and stop (context managers, ``serve_forever``, graceful shutdown that flushes queued frames),
hooks, connection limits, and the ERROR frame each malformed input earns: read back from a raw
socket and parsed with :class:`trame_async.wire.ErrorFrame`. Every socket test runs on the stock
loop and on uvloop (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import socket
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import MS
from helpers import (
    close_writer,
    eventually,
    make_tls,
    raw_handshake,
    read_eof,
    read_frame,
    read_frames_until_eof,
    read_until_error,
    receive_n,
)

import trame_async
from trame_async import (
    INT,
    STR,
    Client,
    ConnectError,
    ConnectionClosed,
    DisconnectReason,
    ErrorCode,
    Kind,
    Registry,
    RemoteClient,
    Server,
    netutil,
)
from trame_async.protocol import ServerCore, ServerLimits
from trame_async.wire import PROTOCOL_VERSION, ErrorFrame, FrameParser, Hello, frame, ping


def free_port() -> int:
    """Return a port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- starting and stopping ------------------------------------------------------------------------


async def test_start_server_on_port_0_binds_a_real_socket() -> None:
    server = await trame_async.start_server("127.0.0.1", 0)
    try:
        assert isinstance(server, Server)
        assert server.is_serving()
        (sock,) = server.sockets
        assert sock.fileno() >= 0
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        host, port = sock.getsockname()
        assert host == "127.0.0.1"
        assert port == server.port != 0
        async with trame_async.connect("127.0.0.1", server.port) as client:
            assert client.id >= 1
            assert [r.id for r in server.clients] == [client.id]
    finally:
        server.close()
        await server.wait_closed()
    assert not server.is_serving()
    with pytest.raises(ConnectError):
        await trame_async.connect("127.0.0.1", port, timeout=5)


async def test_serve_and_server_are_async_context_managers() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        port = server.port
        async with trame_async.connect("127.0.0.1", port) as client:
            await client.send_data(INT, 1)
    assert not server.is_serving()

    async with await trame_async.start_server("127.0.0.1", 0) as server2:
        assert server2.is_serving()
        async with trame_async.connect("127.0.0.1", server2.port):
            pass
    assert not server2.is_serving()
    with pytest.raises(ConnectError):
        await trame_async.connect("127.0.0.1", port, timeout=5)


async def test_clean_close_by_the_client_reports_goodbye_exactly_once() -> None:
    reports: list[tuple[int, DisconnectReason]] = []
    async with trame_async.serve(
        "127.0.0.1", 0, on_disconnect=lambda r, why: reports.append((r.id, why))
    ) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        client_id = client.id
        await client.close()
        await client.close()  # idempotent
        assert client.close_reason is DisconnectReason.CLOSED
        with pytest.raises(ConnectionClosed) as info:
            await client.multicast(INT, 1)
        assert info.value.reason is DisconnectReason.CLOSED
        with pytest.raises(ConnectionClosed):
            await client.receive(timeout=5)
        await eventually(lambda: reports, what="on_disconnect")
        assert server.clients == []
    assert reports == [(client_id, DisconnectReason.GOODBYE)]


async def test_shutdown_delivers_every_queued_frame_then_goodbye_with_retry_after() -> None:
    n_frames = 20_000
    reports: list[tuple[int, DisconnectReason]] = []
    server = await trame_async.start_server(
        "127.0.0.1", 0, retry_after=2.5, on_disconnect=lambda r, why: reports.append((r.id, why))
    )
    clients: list[Client] = []
    try:
        for _ in range(3):
            clients.append(await trame_async.connect("127.0.0.1", server.port))

        for i in range(n_frames):
            server.multicast(INT, i)
        server.close()  # at once: every frame is still queued in user space

        async def drain(client: Client) -> ConnectionClosed:
            got = await receive_n(client, n_frames, timeout=20)
            assert [m.value for m in got] == list(range(n_frames))
            with pytest.raises(ConnectionClosed) as info:
                await client.receive(timeout=5)
            return info.value

        errors = await asyncio.gather(*(drain(c) for c in clients))
        for error in errors:
            assert error.reason is DisconnectReason.SERVER_SHUTDOWN
            assert error.retry_after == 2.5
        await asyncio.wait_for(server.wait_closed(), 10)
    finally:
        server.close()
        await server.wait_closed()
        for client in clients:
            await client.close()
    assert sorted(reports) == sorted((c.id, DisconnectReason.SERVER_SHUTDOWN) for c in clients)


async def test_cancelling_serve_forever_shuts_the_server_down() -> None:
    server = await trame_async.start_server("127.0.0.1", 0)
    task = asyncio.create_task(server.serve_forever())
    async with trame_async.connect("127.0.0.1", server.port) as client:
        await client.send_data(INT, 1)  # the server is serving
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        with pytest.raises(ConnectionClosed) as info:
            await client.receive(timeout=5)
        assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
    await asyncio.wait_for(server.wait_closed(), 5)


async def test_serve_forever_returns_when_the_server_is_closed() -> None:
    server = await trame_async.start_server("127.0.0.1", 0)
    task = asyncio.create_task(server.serve_forever())
    async with trame_async.connect("127.0.0.1", server.port) as client:
        server.close()
        await asyncio.wait_for(task, 5)
        with pytest.raises(ConnectionClosed) as info:
            await client.receive(timeout=5)
        assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
    await server.wait_closed()


async def test_close_stops_listening_before_it_returns() -> None:
    """As with asyncio.Server.close(): no await between close() and a refused connection."""
    server = await trame_async.start_server("127.0.0.1", 0)
    port = server.port
    try:
        async with trame_async.connect("127.0.0.1", port) as client:
            server.close()
            assert not server.is_serving()
            with socket.socket() as probe:  # a blocking connect: the loop does not run meanwhile
                probe.settimeout(5)
                with pytest.raises(ConnectionRefusedError):
                    probe.connect(("127.0.0.1", port))
            # The goodbye and the drain run in the shutdown task.
            with pytest.raises(ConnectionClosed) as info:
                await client.receive(timeout=5)
            assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
        await asyncio.wait_for(server.wait_closed(), 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_shutdown_is_not_interrupted_by_cancelling_its_caller() -> None:
    server = await trame_async.start_server("127.0.0.1", 0)
    async with trame_async.connect("127.0.0.1", server.port) as client:
        caller = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0)  # let shutdown() start its task
        assert not server.is_serving()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        with pytest.raises(ConnectionClosed) as info:
            await client.receive(timeout=5)
        assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
    await asyncio.wait_for(server.wait_closed(), 10)


async def test_a_client_failing_to_close_at_shutdown_is_aborted_and_spares_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug closing one client (RemoteClient._close raising) at shutdown: that connection is
    aborted, the others still get their GOODBYE, and the server finishes closing."""
    real_close = RemoteClient._close
    server = await trame_async.start_server("127.0.0.1", 0)
    forever = asyncio.create_task(server.serve_forever())
    try:
        async with (
            trame_async.connect("127.0.0.1", server.port) as good,
            trame_async.connect("127.0.0.1", server.port) as bad,
        ):
            bad_id = bad.id

            def close(self: RemoteClient, reason: DisconnectReason, **kwargs: Any) -> None:
                if self.id == bad_id and reason is DisconnectReason.SERVER_SHUTDOWN:
                    raise RuntimeError("bug closing a client")
                real_close(self, reason, **kwargs)

            monkeypatch.setattr(RemoteClient, "_close", close)
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)
            await asyncio.wait_for(forever, 5)
            with pytest.raises(ConnectionClosed) as info:
                await good.receive(timeout=5)
            assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
            with pytest.raises(ConnectionClosed) as info:
                await bad.receive(timeout=5)
            assert info.value.reason is DisconnectReason.CONNECTION_LOST
    finally:
        forever.cancel()
        server.close()
        await server.wait_closed()
    assert f"closing client {bad_id} at shutdown failed" in caplog.text


async def test_a_failing_shutdown_still_closes_the_server_and_its_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug inside the shutdown itself: the server is closed all the same (serve_forever
    returns, every connection is aborted) and wait_closed raises the failure."""

    async def broken(self: Server) -> None:
        raise RuntimeError("bug in the shutdown")

    server = await trame_async.start_server("127.0.0.1", 0)
    forever = asyncio.create_task(server.serve_forever())
    try:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            monkeypatch.setattr(Server, "_wait_gone", broken)
            server.close()
            with pytest.raises(RuntimeError, match="bug in the shutdown"):
                await asyncio.wait_for(server.wait_closed(), 10)
            await asyncio.wait_for(forever, 5)
            assert not server.is_serving()
            with pytest.raises(ConnectionClosed):
                await client.receive(timeout=5)
            await eventually(lambda: not server.stats()["connections"], what="connections gone")
    finally:
        forever.cancel()
        monkeypatch.undo()
        server.close()
        with contextlib.suppress(RuntimeError):
            await server.wait_closed()


async def test_frames_sent_just_before_a_clean_close_are_all_relayed() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as observer,
    ):
        publisher = await trame_async.connect("127.0.0.1", server.port)
        for i in range(2000):
            await publisher.multicast(INT, i)
        await publisher.close()  # GOODBYE right behind the last multicast
        got = await receive_n(observer, 2000)
        assert [(m.sender, m.value) for m in got] == [(publisher.id, i) for i in range(2000)]


async def test_connect_to_a_silent_server_times_out_with_connect_error() -> None:
    """A TCP server that accepts and never answers the HELLO: connect() gives up in time."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectError) as info:
            await trame_async.connect("127.0.0.1", port, timeout=0.2)
        assert loop.time() - started < 2.0
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "timed out" in str(info.value)
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_connect_to_a_closed_port_raises_connect_error_naming_host_and_port() -> None:
    port = free_port()
    with pytest.raises(ConnectError) as info:
        await trame_async.connect("127.0.0.1", port, timeout=5)
    err = info.value
    assert isinstance(err, OSError)
    assert (err.host, err.port) == ("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(err)


async def test_local_addr_binds_the_local_end() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, local_addr=("127.0.0.1", 0)) as client,
    ):
        local = client.local_address
        assert local[0] == "127.0.0.1" and local[1] != 0
        (remote,) = server.clients
        assert remote.address == local


async def test_coroutine_hooks_run_once_each_in_order() -> None:
    events: list[tuple[str, int, Any]] = []
    disconnected = asyncio.Event()

    async def on_connect(remote: RemoteClient) -> None:
        await asyncio.sleep(0)
        events.append(("connect", remote.id, remote.is_open))

    async def on_disconnect(remote: RemoteClient, why: DisconnectReason) -> None:
        await asyncio.sleep(0)
        events.append(("disconnect", remote.id, why))
        disconnected.set()

    async with trame_async.serve(
        "127.0.0.1", 0, on_connect=on_connect, on_disconnect=on_disconnect
    ) as server:
        async with trame_async.connect("127.0.0.1", server.port) as client:
            await eventually(lambda: events, what="on_connect")
        await asyncio.wait_for(disconnected.wait(), 5)
    assert events == [
        ("connect", client.id, True),
        ("disconnect", client.id, DisconnectReason.GOODBYE),
    ]


async def test_no_unclosed_resources_and_no_pending_tasks_after_shutdown() -> None:
    async def hook(remote: RemoteClient, *_: object) -> None:
        await asyncio.sleep(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with trame_async.serve(
            "127.0.0.1", 0, on_connect=hook, on_disconnect=hook, on_data=hook
        ) as server:
            a = await trame_async.connect("127.0.0.1", server.port)
            b = await trame_async.connect("127.0.0.1", server.port)
            reader, writer = await raw_handshake(server.port)
            try:
                await a.multicast(STR, "hello")
                await a.send_data(INT, 1)
                assert (await b.receive(timeout=5)).value == "hello"
                # One client leaves cleanly, one is cut by the shutdown, one is mid-frame.
                await a.close()
                writer.write(struct.pack(">I", 100) + b"\x10")
                await writer.drain()
                server.close()
                kinds = [kind for kind, _ in await read_frames_until_eof(reader)]
                assert kinds[-1] == Kind.GOODBYE
            finally:
                await close_writer(writer)
        with pytest.raises(ConnectionClosed):
            await b.receive(timeout=5)
        await b.close()
        del reader, writer, a, b, server
        gc.collect()
        for _ in range(3):  # let transports finish closing on both loops
            await asyncio.sleep(0)
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_max_clients_refuses_the_extra_connection() -> None:
    reports: list[DisconnectReason] = []
    async with trame_async.serve(
        "127.0.0.1", 0, max_clients=2, on_disconnect=lambda r, why: reports.append(why)
    ) as server:
        first = await trame_async.connect("127.0.0.1", server.port)
        second = await trame_async.connect("127.0.0.1", server.port)
        with pytest.raises(ConnectionClosed) as info:
            await trame_async.connect("127.0.0.1", server.port, timeout=5)
        assert info.value.reason is DisconnectReason.TOO_MANY_CLIENTS
        assert info.value.peer_error_code is ErrorCode.TOO_MANY_CLIENTS
        # The two accepted clients are untouched.
        await first.multicast(INT, 1)
        assert (await second.receive(timeout=5)).value == 1
        # A place frees up when one leaves.
        await first.close()
        # Its socket is gone once on_disconnect has run: only then is the place free.
        await eventually(lambda: reports == [DisconnectReason.GOODBYE], what="first client gone")
        third = await trame_async.connect("127.0.0.1", server.port)
        assert {r.id for r in server.clients} == {second.id, third.id}
        await second.close()
        await third.close()
    assert reports == [DisconnectReason.GOODBYE] * 3  # the refused connection is not reported


# --- bad peers ------------------------------------------------------------------------------------

MALFORMED = [
    pytest.param(frame(0x7F), ErrorCode.UNKNOWN_KIND, id="unknown-kind"),
    pytest.param(struct.pack(">IB", 2 << 20, 0x10), ErrorCode.FRAME_TOO_LARGE, id="too-large"),
    pytest.param(b"\x00\x00\x00\x00", ErrorCode.MALFORMED_FRAME, id="zero-length"),
    pytest.param(frame(Kind.MULTICAST, b"IN"), ErrorCode.MALFORMED_FRAME, id="truncated-data"),
    pytest.param(
        frame(Kind.MULTICAST, b"INT\x02<q" + bytes(7)),
        ErrorCode.VALUE_SIZE_MISMATCH,
        id="value-size",
    ),
    pytest.param(
        frame(Kind.MULTICAST, b"INT\x02<d" + bytes(8)),
        ErrorCode.VALUE_SIZE_MISMATCH,
        id="format-not-registered-one",
    ),
    pytest.param(
        frame(Kind.DATA, b"ABC\x02@q" + bytes(8)), ErrorCode.BAD_FORMAT, id="native-format"
    ),
    pytest.param(
        frame(Kind.MULTICAST, b"ABC\x03<zz" + bytes(8)), ErrorCode.BAD_FORMAT, id="not-a-format"
    ),
    pytest.param(
        frame(Kind.MULTICAST, b"STR\x03<2s\xff\xfe"), ErrorCode.INVALID_TEXT, id="invalid-text"
    ),
    pytest.param(frame(Kind.PING, bytes(5)), ErrorCode.TRAILING_DATA, id="trailing-data"),
    pytest.param(
        Hello(PROTOCOL_VERSION, 0, b"").encode(), ErrorCode.UNEXPECTED_FRAME, id="second-hello"
    ),
    pytest.param(
        frame(Kind.RELAY, bytes(4) + b"INT\x02<q" + bytes(8)),
        ErrorCode.UNEXPECTED_FRAME,
        id="relay-from-client",
    ),
]


@pytest.mark.parametrize(("bad", "code"), MALFORMED)
async def test_malformed_frame_gets_its_error_code_and_only_that_connection_closes(
    bad: bytes, code: ErrorCode
) -> None:
    reports: list[tuple[int, DisconnectReason]] = []
    async with (
        trame_async.serve(
            "127.0.0.1", 0, on_disconnect=lambda r, why: reports.append((r.id, why))
        ) as server,
        trame_async.connect("127.0.0.1", server.port) as publisher,
        trame_async.connect("127.0.0.1", server.port) as observer,
    ):
        reader, writer = await raw_handshake(server.port)
        try:
            (raw_id,) = {r.id for r in server.clients} - {publisher.id, observer.id}
            for i in range(50):
                await publisher.multicast(INT, i)
            # A good frame then the bad one, in one write: the good one still goes out.
            writer.write(bad)
            for i in range(50, 100):
                await publisher.multicast(INT, i)

            error = await read_until_error(reader)
            assert error.error_code is code
            assert error.reason == code.name.lower().replace("_", " ")  # nothing internal
            await read_eof(reader)
        finally:
            await close_writer(writer)

        got = await receive_n(observer, 100)
        assert [(m.sender, m.value) for m in got] == [(publisher.id, i) for i in range(100)]
        server.multicast(INT, -1)  # nothing from the bad client got through before it
        assert (await publisher.receive(timeout=5)).sender == 0
        assert (await observer.receive(timeout=5)).sender == 0
        await eventually(lambda: reports, what="on_disconnect of the raw client")
        assert reports == [(raw_id, DisconnectReason.PROTOCOL_ERROR)]
        assert {r.id for r in server.clients} == {publisher.id, observer.id}


async def test_stray_http_request_gets_bad_handshake_and_close() -> None:
    connects: list[int] = []
    async with trame_async.serve(
        "127.0.0.1", 0, on_connect=lambda r: connects.append(r.id)
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            kind, body = await asyncio.wait_for(read_frame(reader), 5)
            assert kind == Kind.ERROR
            assert ErrorFrame.parse(body).error_code is ErrorCode.BAD_HANDSHAKE
            await read_eof(reader)
        finally:
            await close_writer(writer)
        assert connects == [] and server.clients == []


@dataclasses.dataclass
class Checked:
    """A value type whose constructor refuses some values: decoding one raises ValueError."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"secret-internal-detail: {self.n} is negative")


@pytest.mark.parametrize("hook", ["on_data", "on_multicast"])
async def test_value_the_servers_class_refuses_is_a_protocol_error_of_that_client_alone(
    hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A value decoded for a hook that the server's registered class refuses (here a negative
    Checked) is the sender's fault: ERROR BAD_VALUE, that connection closed, no traceback logged
    (a peer must not be able to flood the log), and what it sent before is handled."""
    server_registry = Registry()
    server_registry.register("CHK", "<q", Checked)
    client_registry = Registry()
    client_registry.register("CHK", "<q")
    seen: list[Any] = []
    reports: list[tuple[int, DisconnectReason]] = []
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    caplog.set_level(logging.INFO, logger="trame_async")
    kind = Kind.DATA if hook == "on_data" else Kind.MULTICAST
    hooks: dict[str, Any] = {hook: lambda client, message: seen.append(message.value) or True}
    try:
        async with (
            trame_async.serve(
                "127.0.0.1",
                0,
                registry=server_registry,
                on_disconnect=lambda client, reason: reports.append((client.id, reason)),
                **hooks,
            ) as server,
            trame_async.connect("127.0.0.1", server.port, registry=client_registry) as observer,
            trame_async.connect("127.0.0.1", server.port) as publisher,
        ):
            reader, writer = await raw_handshake(server.port)
            try:
                # One write: the good frame and the bad one arrive in the same chunk.
                writer.write(
                    client_registry.encode("CHK", 1, kind) + client_registry.encode("CHK", -1, kind)
                )
                error = await read_until_error(reader)
                await read_eof(reader)
            finally:
                await close_writer(writer)
            assert error.error_code is ErrorCode.BAD_VALUE
            assert "secret-internal-detail" not in error.reason  # nothing of the exception
            assert seen == [Checked(1)]
            if kind is Kind.MULTICAST:  # the good multicast before the bad one was relayed
                message = await observer.receive(timeout=5)
                assert (message.trame, message.value) == ("CHK", 1)
            await eventually(lambda: reports, what="on_disconnect of the failed client")
            assert [reason for _, reason in reports] == [DisconnectReason.PROTOCOL_ERROR]
            # Everyone else is served as before.
            await publisher.multicast(INT, 7)
            assert (await observer.receive(timeout=5)).value == 7
            assert {c.id for c in server.clients} == {observer.id, publisher.id}
    finally:
        loop.set_exception_handler(None)
    assert [r.getMessage() for r in caplog.records if r.exc_info is not None] == []
    assert loop_errors == [], "the exception did not escape to the event loop"


async def test_a_bug_while_handling_a_frame_sends_internal_error_and_closes_that_client(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is no protocol error (a bug, injected here into the dispatch of one
    client's frames) closes that connection alone with ERROR INTERNAL_ERROR and a generic text,
    logged once with its traceback; the others go on."""
    reports: list[tuple[int, DisconnectReason]] = []
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    caplog.set_level(logging.INFO, logger="trame_async")
    try:
        async with (
            trame_async.serve(
                "127.0.0.1",
                0,
                on_disconnect=lambda client, reason: reports.append((client.id, reason)),
            ) as server,
            trame_async.connect("127.0.0.1", server.port) as observer,
            trame_async.connect("127.0.0.1", server.port) as publisher,
        ):
            reader, writer = await raw_handshake(server.port)
            victim = max(c.id for c in server.clients)
            dispatch = server._dispatch

            def buggy(sender: RemoteClient, frames: list[memoryview]) -> None:
                if sender.id == victim:
                    raise RuntimeError("secret-internal-detail")
                dispatch(sender, frames)

            monkeypatch.setattr(server, "_dispatch", buggy)
            try:
                writer.write(trame_async.REGISTRY.encode(INT, 1))
                error = await read_until_error(reader)
                await read_eof(reader)
            finally:
                await close_writer(writer)
            assert error.error_code is ErrorCode.INTERNAL_ERROR
            assert error.reason == "internal error"  # nothing of the exception on the wire
            await eventually(lambda: reports, what="on_disconnect of the failed client")
            assert reports == [(victim, DisconnectReason.PROTOCOL_ERROR)]
            await publisher.multicast(INT, 7)
            assert (await observer.receive(timeout=5)).value == 7
            assert {c.id for c in server.clients} == {observer.id, publisher.id}
    finally:
        loop.set_exception_handler(None)
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "internal error" in tracebacks[0].getMessage()
    assert loop_errors == [], "the exception did not escape to the event loop"


# The same stray request, cut by TCP at any byte, must be told apart from an oversized HELLO.
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


@pytest.mark.parametrize("split", range(1, 10))
def test_stray_http_request_split_anywhere_gets_bad_handshake(split: int) -> None:
    core = ServerCore(1, ServerLimits(), 0.0)
    for chunk in (HTTP_REQUEST[:split], HTTP_REQUEST[split:]):
        core.receive_data(chunk, 0.0)
        if core.closed:
            break
    assert core.closed
    (error,) = [ErrorFrame.parse(f[1:]) for f in FrameParser().feed(b"".join(core.outgoing))]
    assert error.error_code is ErrorCode.BAD_HANDSHAKE


async def test_data_before_hello_is_refused() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(ping(1))
            kind, body = await asyncio.wait_for(read_frame(reader), 5)
            assert kind == Kind.ERROR
            assert ErrorFrame.parse(body).error_code is ErrorCode.UNEXPECTED_FRAME
            await read_eof(reader)
        finally:
            await close_writer(writer)


@pytest.mark.parametrize(("bad", "code"), MALFORMED)
def test_frames_before_a_bad_one_in_the_same_chunk_are_still_returned(
    bad: bytes, code: ErrorCode
) -> None:
    """ServerCore.receive_data: "frames before the bad one are still returned"."""
    core = ServerCore(1, ServerLimits(), 0.0)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    core.outgoing.clear()
    good = INT.pack_frame(Kind.MULTICAST, 1000)
    frames = core.receive_data(good + good + bad, 0.0)
    assert [bytes(f) for f in frames] == [good[4:], good[4:]]
    assert core.closed and core.close_reason is DisconnectReason.PROTOCOL_ERROR
    (error,) = [ErrorFrame.parse(f[1:]) for f in FrameParser().feed(b"".join(core.outgoing))]
    assert error.error_code is code


# --- get_host_ip ------------------------------------------------------------------------------


def test_get_host_ip_returns_an_ip_address() -> None:
    address = trame_async.get_host_ip()
    assert isinstance(address, str)
    assert ipaddress.ip_address(address).version == 4


class _NoNetwork:
    """Stands in for the socket module in netutil: every socket fails."""

    AF_INET = socket.AF_INET
    SOCK_DGRAM = socket.SOCK_DGRAM

    @staticmethod
    def socket(*args: object) -> Any:
        raise OSError(101, "Network is unreachable")


class _Unbound:
    """Stands in for the socket module in netutil: the socket reports no address."""

    AF_INET = socket.AF_INET
    SOCK_DGRAM = socket.SOCK_DGRAM

    class socket:  # mimics socket.socket
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def connect(self, address: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("0.0.0.0", 0)


@pytest.mark.parametrize("fake", [_NoNetwork, _Unbound])
def test_get_host_ip_never_raises(monkeypatch: pytest.MonkeyPatch, fake: type) -> None:
    monkeypatch.setattr(netutil, "socket", fake)
    assert netutil.get_host_ip() == "127.0.0.1"


def test_get_host_ip_sends_no_packet_and_closes_its_socket() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            trame_async.get_host_ip()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# --- TLS: one handshake deadline from the accept ----------------------------------------------------


async def test_tls_and_hello_share_one_handshake_deadline(tmp_path: Path) -> None:
    """A peer that takes most of handshake_timeout for TLS, then sends no HELLO, is closed at
    handshake_timeout after the accept, not after a second full timeout."""
    timeout = 1000 * MS
    tls = make_tls(tmp_path)
    async with trame_async.serve(
        "127.0.0.1", 0, ssl=tls.server_context(), handshake_timeout=timeout
    ) as server:
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            await asyncio.sleep(0.6 * timeout)  # paces the peer: a slow TLS client
            await writer.start_tls(tls.client_context())
            tls_done = time.perf_counter() - start
            error = await read_until_error(reader, timeout=5)
            closed_after = time.perf_counter() - start
            await read_eof(reader)
        finally:
            await close_writer(writer)
    assert error.error_code is ErrorCode.HANDSHAKE_TIMEOUT
    assert tls_done < timeout, f"the TLS handshake itself took {tls_done:.3f} s"
    assert timeout - 50 * MS <= closed_after <= timeout + 500 * MS, closed_after


def test_server_config_max_frame_size_leaves_room_for_the_relay_header() -> None:
    # A MULTICAST of max_frame_size is relayed 4 bytes larger: its length must fit the u32 field.
    trame_async.ServerConfig(max_frame_size=0xFFFF_FFFF - 4, max_queue_bytes=1 << 33)
    with pytest.raises(ValueError, match="a relayed frame is 4 bytes larger"):
        trame_async.ServerConfig(max_frame_size=0xFFFF_FFFF - 3, max_queue_bytes=1 << 33)
