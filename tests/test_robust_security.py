"""Authentication, TLS, reconnect and graceful shutdown under load, over real sockets.

Issue "Under attack and under load", tests 6 to 9.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import statistics
from dataclasses import dataclass

import pytest
import trustme
from helpers import (
    MS,
    close_writer,
    eventually,
    read_eof,
    read_frame,
    receive_n,
    spawn,
    stop_process,
    wait_listening,
)

import trame_async
from trame_async import DisconnectReason, ErrorCode, Kind
from trame_async.wire import PROTOCOL_VERSION, ErrorFrame, Hello

TOKEN = "correct horse battery staple"


# --- 6. authentication -----------------------------------------------------------------------


async def test_right_token_connects_and_wrong_or_missing_token_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    reasons: list[DisconnectReason] = []
    async with trame_async.serve(
        "127.0.0.1", 0, token=TOKEN, on_disconnect=lambda c, r: reasons.append(r)
    ) as server:
        async with trame_async.connect("127.0.0.1", server.port, token=TOKEN) as good:
            assert good.id > 0
            with pytest.raises(trame_async.AuthenticationError) as info:
                await trame_async.connect("127.0.0.1", server.port, token="wrong")
            assert info.value.reason is DisconnectReason.AUTH_FAILED
            assert info.value.peer_error_code is ErrorCode.AUTH_FAILED
            with pytest.raises(trame_async.AuthenticationError):
                await trame_async.connect("127.0.0.1", server.port)
            # The refused ones never counted as connected clients.
            assert [c.id for c in server.clients] == [good.id]
    assert TOKEN not in caplog.text
    assert "wrong" not in caplog.text.replace("wrong token", "")


async def test_frames_before_hello_are_refused_and_never_relayed() -> None:
    async with trame_async.serve("127.0.0.1", 0, token=TOKEN) as server:
        async with trame_async.connect("127.0.0.1", server.port, token=TOKEN) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(trame_async.encode(trame_async.INT, 666)[0])
            kind, body = await asyncio.wait_for(read_frame(reader), 5)
            assert kind == Kind.ERROR
            assert ErrorFrame.parse(body).code == ErrorCode.UNEXPECTED_FRAME
            await read_eof(reader)
            await close_writer(writer)
            # The frame sent before authenticating reached nobody.
            with pytest.raises(TimeoutError):
                await listener.receive(timeout=50 * MS)


async def test_unauthenticated_listener_receives_no_multicast_byte() -> None:
    async with trame_async.serve("127.0.0.1", 0, token=TOKEN, handshake_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with trame_async.connect("127.0.0.1", server.port, token=TOKEN) as pub:
            for i in range(200):
                await pub.multicast(trame_async.INT, i)
            # The sniffer's only bytes are the ERROR that closes it at the handshake deadline.
            data = await asyncio.wait_for(reader.read(), 5)
        assert data[4] == Kind.ERROR
        assert ErrorFrame.parse(data[5:]).code == ErrorCode.HANDSHAKE_TIMEOUT
        assert len(data) == 4 + int.from_bytes(data[:4], "big")
        await close_writer(writer)


async def test_wrong_token_attempts_in_a_loop_leave_the_server_responsive() -> None:
    async with trame_async.serve("127.0.0.1", 0, token=TOKEN) as server:
        async with trame_async.connect("127.0.0.1", server.port, token=TOKEN, echo=True) as ok:

            async def attempt() -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(Hello(PROTOCOL_VERSION, 0, b"guess").encode())
                kind, body = await asyncio.wait_for(read_frame(reader), 5)
                assert (kind, ErrorFrame.parse(body).code) == (Kind.ERROR, ErrorCode.AUTH_FAILED)
                await close_writer(writer)

            for _ in range(10):
                await asyncio.gather(*(attempt() for _ in range(50)))
            await ok.multicast(trame_async.INT, 1)
            assert (await ok.receive(timeout=5)).value == 1


# --- 7. TLS ----------------------------------------------------------------------------------


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    other_client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)  # trusts some other CA only
    return Tls(server_ctx, client_ctx, other)


async def test_multicast_and_heartbeat_over_tls(tls: Tls) -> None:
    async with trame_async.serve(
        "127.0.0.1", 0, ssl=tls.server, heartbeat_interval=0.05, heartbeat_timeout=0.2
    ) as server:
        clients = [
            await trame_async.connect("127.0.0.1", server.port, ssl=tls.client, rtt_interval=0.05)
            for _ in range(5)
        ]
        try:
            for i, c in enumerate(clients):
                await c.multicast(trame_async.INT, i)
            for c in clients:
                got = sorted(m.value for m in await receive_n(c, 4))
                assert got == [i for i in range(5) if clients[i] is not c]
            await eventually(lambda: all(c.rtt is not None for c in clients), what="client rtt")
            await eventually(
                lambda: all(rc.rtt is not None for rc in server.clients), what="server rtt"
            )
        finally:
            for c in clients:
                await c.close()


async def test_plaintext_and_silent_connections_to_tls_port_are_closed(tls: Tls) -> None:
    async with trame_async.serve("127.0.0.1", 0, ssl=tls.server, handshake_timeout=0.5) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(Hello(PROTOCOL_VERSION, 0, b"").encode())
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        start = loop.time()
        await read_eof(reader, timeout=3)
        await read_eof(silent_r, timeout=3)
        assert loop.time() - start < 0.5 + 1.0
        await close_writer(writer)
        await close_writer(silent_w)


async def test_untrusted_certificate_fails_clearly(tls: Tls) -> None:
    async with trame_async.serve("127.0.0.1", 0, ssl=tls.server) as server:
        with pytest.raises(trame_async.ConnectError) as info:
            await trame_async.connect("127.0.0.1", server.port, ssl=tls.other_client, timeout=5)
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_client_certificate_required(tls: Tls) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    with_cert = ssl.create_default_context()
    ca.configure_trust(with_cert)
    ca.issue_cert("client@example.org").configure_cert(with_cert)
    without_cert = ssl.create_default_context()
    ca.configure_trust(without_cert)
    async with trame_async.serve("127.0.0.1", 0, ssl=server_ctx) as server:
        async with trame_async.connect("127.0.0.1", server.port, ssl=with_cert) as client:
            assert client.id > 0
        with pytest.raises((trame_async.ConnectError, trame_async.ConnectionClosed)):
            await trame_async.connect("127.0.0.1", server.port, ssl=without_cert, timeout=5)


# --- 8. reconnect ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingBackoff(trame_async.Backoff):
    """A Backoff that records every delay it hands out (attempt, delay)."""

    log: list[tuple[int, float]] | None = None

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        value = super().delay(attempt, retry_after)
        assert self.log is not None
        self.log.append((attempt, value))
        return value


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_server_restart_with_hundreds_of_reconnecting_clients() -> None:
    n = 200
    args = ["-m", "trame_async", "--port", "0", "--log-level", "WARNING",
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "1"]  # fmt: skip
    server = await spawn(args)
    clients: list[trame_async.Client] = []
    log: list[tuple[int, float]] = []
    lost_at: list[float] = []
    back_at: list[float] = []
    loop = asyncio.get_running_loop()
    restarted = None
    try:
        _, port = await wait_listening(server)
        backoff = RecordingBackoff(initial=0.5, factor=1.6, maximum=1.0, log=log)
        for _ in range(n):
            clients.append(
                await trame_async.connect(
                    "127.0.0.1",
                    port,
                    reconnect=backoff,
                    rtt_interval=None,
                    on_disconnect=lambda err: lost_at.append(loop.time()),
                    on_reconnect=lambda c: back_at.append(loop.time()),
                )
            )
        server.kill()
        await server.wait()
        await eventually(lambda: len(lost_at) == n, 10, what="every client saw the crash")
        await eventually(
            lambda: sum(1 for a, _ in log if a == 0) == n, 10, what="every first attempt planned"
        )
        first_delays = [d for a, d in log if a == 0]
        restarted = await spawn([*args[:2], "--port", str(port), *args[4:]])
        await wait_listening(restarted)
        restart_time = loop.time()
        await eventually(lambda: len(back_at) == n, 10, what="every client reconnected")
        assert max(back_at) - restart_time < 5.0
        assert all(c.connected for c in clients)
        assert all(c.reconnects == 1 for c in clients)
        # First attempts spread out over [0, initial): no 50 ms window holds a third of them.
        assert len(first_delays) == n
        assert max(first_delays) - min(first_delays) > 0.3
        buckets = [0] * 10
        for d in first_delays:
            buckets[min(9, int(d / 0.05))] += 1
        assert max(buckets) < n / 3, buckets
        assert 0.15 < statistics.mean(first_delays) < 0.35
        # And the reconnected clients work.
        await clients[0].multicast(trame_async.INT, 7)
        assert (await clients[1].receive(timeout=5)).value == 7
    finally:
        for c in clients:
            await c.close(timeout=1)
        await stop_process(server)
        if restarted is not None:
            await stop_process(restarted)


async def test_no_reconnect_after_close_or_auth_failure() -> None:
    async with trame_async.serve("127.0.0.1", 0, token=TOKEN) as server:
        with pytest.raises(trame_async.AuthenticationError):
            await trame_async.connect("127.0.0.1", server.port, token="bad", reconnect=True)
        client = await trame_async.connect("127.0.0.1", server.port, token=TOKEN, reconnect=True)
        await client.close()
        assert client.close_reason is DisconnectReason.CLOSED
        with pytest.raises(trame_async.ConnectionClosed):
            await client.receive(timeout=1)


async def test_reconnect_honours_retry_after_and_surfaces_events() -> None:
    events: list[str] = []
    server = await trame_async.start_server("127.0.0.1", 0, retry_after=0.3)
    port = server.port
    client = await trame_async.connect(
        "127.0.0.1",
        port,
        reconnect=trame_async.Backoff(initial=0.05, maximum=0.1),
        on_disconnect=lambda err: events.append(f"down:{err.reason}:{err.retry_after}"),
        on_reconnect=lambda c: events.append("up"),
    )
    loop = asyncio.get_running_loop()
    try:
        server.close()
        await server.wait_closed()
        down_at = loop.time()
        await eventually(lambda: events == ["down:server-shutdown:0.3"], 5, what="down event")
        with pytest.raises(trame_async.ConnectionClosed):
            await client.multicast(trame_async.INT, 1)  # at-most-once: not buffered
        server = await trame_async.start_server("127.0.0.1", port)
        await client.wait_connected(timeout=5)
        assert loop.time() - down_at >= 0.3
        assert events[-1] == "up"
        await client.multicast(trame_async.INT, 2)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# --- 9. graceful shutdown under load ---------------------------------------------------------


async def _stalled_subscriber(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake, then never read again; a tiny receive buffer makes the server's writes back up."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(Hello(PROTOCOL_VERSION, 0, b"").encode())
    kind, _ = await asyncio.wait_for(read_frame(reader), 5)
    assert kind == Kind.WELCOME
    return reader, writer


@pytest.mark.timeout(90)
async def test_graceful_shutdown_delivers_everything_then_goodbye_and_aborts_laggard() -> None:
    drain = 1.0
    n = 50_000
    # A high write mark keeps the stalled client from pausing the publisher (flow control), so
    # the shutdown meets it with about a megabyte it will never read.
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        drain_timeout=drain,
        retry_after=2.0,
        write_high_water=8 << 20,
        max_queue_bytes=16 << 20,
    )
    subs = [await trame_async.connect("127.0.0.1", server.port, max_queue=n + 10) for _ in range(5)]
    pub = await trame_async.connect("127.0.0.1", server.port, echo=True, max_queue=n + 10)
    _laggard_r, laggard_w = await _stalled_subscriber(server.port)
    loop = asyncio.get_running_loop()
    try:
        for i in range(n):
            await pub.multicast(trame_async.INT, i)
        # The publisher's own echo of its last frame proves the server has accepted them all;
        # most are still queued in the server for the others when the shutdown starts.
        echoed = await receive_n(pub, n, timeout=30)
        assert echoed[-1].value == n - 1
        start = loop.time()
        await server.shutdown()
        took = loop.time() - start
        for c in subs:
            values = [m.value for m in await receive_n(c, n, timeout=30)]
            assert values == list(range(n))
            with pytest.raises(trame_async.ConnectionClosed) as info:
                await c.receive(timeout=5)
            assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
            assert info.value.retry_after == 2.0
        # The laggard held the shutdown for the drain deadline, then was aborted.
        assert drain * 0.9 <= took < drain + 1.5, took
    finally:
        await close_writer(laggard_w)
        for c in [*subs, pub]:
            await c.close(timeout=1)
        server.close()
        await server.wait_closed()
