"""Authentication, TLS, reconnect and graceful shutdown under load, over real sockets.

Issue "Under attack and under load", tests 6 to 9. The heartbeat tests run over TLS in
test_heartbeat.py (its ``net`` fixture); the multicast ones over TLS are here, next to
``trame-serve --tls-cert/--tls-key/--tls-client-ca`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from helpers import (
    MS,
    TlsFiles,
    close_writer,
    eventually,
    make_tls,
    read_eof,
    read_frame,
    receive_n,
    spawn,
    stop_process,
    wait_listening,
)
from proc_helpers import STEP, assert_clean_stderr, start_trame_serve

import trame_async
from trame_async import BYT, INT, Client, DisconnectReason, ErrorCode, Kind, RemoteClient
from trame_async.wire import PROTOCOL_VERSION, ErrorFrame, FrameParser, Hello, Welcome

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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


#: Fan-out over TLS: fewer clients than test_multicast.py's 50 (each handshake costs CPU).
TLS_CLIENTS = 20
TLS_MESSAGES = 50
MARKER = -1


def _payload(k: int) -> bytes:
    """A BYT value of a few KiB, so that frames straddle TLS records."""
    return bytes([k % 256]) * 3000


async def test_every_tls_client_gets_every_other_clients_multicasts_in_order(
    tls_files: TlsFiles,
) -> None:
    """test_multicast.py's fan-out test over TLS: complete, in order per sender, no echo."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            trame_async.serve("127.0.0.1", 0, ssl=tls_files.server_context())
        )
        ctx = tls_files.client_context()
        clients: list[Client] = list(
            await asyncio.gather(
                *(
                    stack.enter_async_context(
                        trame_async.connect("127.0.0.1", server.port, ssl=ctx)
                    )
                    for _ in range(TLS_CLIENTS)
                )
            )
        )
        ids = [c.id for c in clients]
        assert len(set(ids)) == TLS_CLIENTS

        def value(index: int, k: int) -> Any:
            return k if index % 2 == 0 else _payload(k)

        async def publish(index: int, client: Client) -> None:
            # Even clients send INTs, odd ones 3 KB BYTs.
            for k in range(TLS_MESSAGES):
                await client.multicast(INT if index % 2 == 0 else BYT, value(index, k))
                await asyncio.sleep(0)  # let the other publishers interleave

        expected = (TLS_CLIENTS - 1) * TLS_MESSAGES
        received, *_ = await asyncio.gather(
            asyncio.gather(*(receive_n(c, expected, timeout=30) for c in clients)),
            *(publish(i, c) for i, c in enumerate(clients)),
        )
        index_of = {c.id: i for i, c in enumerate(clients)}
        for client, messages in zip(clients, received, strict=True):
            per_sender: dict[int, list[Any]] = defaultdict(list)
            for msg in messages:
                per_sender[msg.sender].append(msg.value)
            assert client.id not in per_sender, "echo is off: a client must not get its own"
            assert set(per_sender) == set(ids) - {client.id}
            for sender, values in per_sender.items():
                want = [value(index_of[sender], k) for k in range(TLS_MESSAGES)]
                assert values == want, f"client {client.id} from {sender}"

        # Nothing else was pending: the server's marker is next everywhere.
        server.multicast(INT, MARKER)
        for client in clients:
            msg = await client.receive(timeout=5)
            assert (msg.sender, msg.value) == (0, MARKER)


async def test_echo_on_and_off_over_tls(tls_files: TlsFiles) -> None:
    ctx = tls_files.client_context()
    async with (
        trame_async.serve("127.0.0.1", 0, ssl=tls_files.server_context()) as server,
        trame_async.connect("127.0.0.1", server.port, ssl=ctx, echo=True) as echo,
        trame_async.connect("127.0.0.1", server.port, ssl=ctx) as plain,
    ):
        for i in range(10):
            await echo.multicast(INT, i)
            await plain.multicast(INT, 100 + i)
        got_echo = await receive_n(echo, 20)
        got_plain = await receive_n(plain, 10)
        assert [m.value for m in got_echo if m.sender == echo.id] == list(range(10))
        assert [m.value for m in got_echo if m.sender == plain.id] == [100 + i for i in range(10)]
        assert [(m.sender, m.value) for m in got_plain] == [(echo.id, i) for i in range(10)]
        server.multicast(INT, MARKER)
        for client in (echo, plain):
            msg = await client.receive(timeout=5)
            assert (msg.sender, msg.value) == (0, MARKER)


def _connected_lines(err_lines: list[str]) -> list[int]:
    """Ids of the ``client N connected from ...`` lines trame-serve logged."""
    return [
        int(m.group(1)) for line in err_lines if (m := re.search(r"client (\d+) connected", line))
    ]


async def test_trame_serve_tls_flags_serve_tls_clients_and_exit_0_on_sigint(
    tls_files: TlsFiles,
) -> None:
    proc, host, port = start_trame_serve(None, *tls_files.cli_args())
    try:
        assert "(TLS)" in proc.out_lines[0], proc.describe()
        ctx = tls_files.client_context()
        async with (
            trame_async.connect(host, port, ssl=ctx, timeout=5) as alice,
            trame_async.connect(host, port, ssl=ctx, echo=True, timeout=5) as bob,
        ):
            await alice.multicast(INT, 1)
            await bob.multicast(INT, 2)
            assert [(m.sender, m.value) for m in await receive_n(alice, 1)] == [(bob.id, 2)]
            got = sorted((m.sender, m.value) for m in await receive_n(bob, 2))
            assert got == sorted([(alice.id, 1), (bob.id, 2)])
            # A plaintext client on the TLS port is refused, told why, and never becomes a client.
            with pytest.raises(trame_async.ConnectError) as refused:
                await trame_async.connect(host, port, timeout=5)
            assert_plaintext_on_tls_port(refused.value, host, port)

            # Ctrl+C: the clients are told the server is going away, then it exits 0.
            proc.interrupt()
            for client in (alice, bob):
                with pytest.raises(trame_async.ConnectionClosed) as info:
                    await client.receive(timeout=STEP)
                assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
            assert await asyncio.to_thread(proc.wait) == 0, proc.describe()
    finally:
        proc.stop()
    assert sorted(_connected_lines(proc.err_lines)) == sorted([alice.id, bob.id]), proc.describe()
    assert_clean_stderr(proc)


async def test_trame_serve_tls_client_ca_refuses_clients_without_a_certificate(
    tls_files: TlsFiles,
) -> None:
    proc, host, port = start_trame_serve(None, *tls_files.cli_args(client_ca=True))
    try:
        # TLS 1.3 finishes the client's side of the handshake before the server checks its
        # certificate: the server then drops the connection (asyncio's without its alert), and
        # connect() says that it wants a client certificate.
        with pytest.raises(trame_async.ConnectError) as refused:
            await trame_async.connect(host, port, ssl=tls_files.client_context(), timeout=5)
        assert_client_certificate_asked(refused.value, host, port)
        ctx = tls_files.client_context(with_cert=True)
        async with (
            trame_async.connect(host, port, ssl=ctx, echo=True, timeout=5) as client,
            trame_async.connect(host, port, ssl=ctx, timeout=5) as other,
        ):
            await client.multicast(INT, 42)
            assert (await client.receive(timeout=5)).value == 42
            assert (await other.receive(timeout=5)).value == 42
            proc.interrupt()
            with pytest.raises(trame_async.ConnectionClosed) as info:
                await client.receive(timeout=STEP)
            assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
            assert await asyncio.to_thread(proc.wait) == 0, proc.describe()
    finally:
        proc.stop()
    # The refused client never got a client id: only the two with certificates were logged.
    assert sorted(_connected_lines(proc.err_lines)) == sorted([client.id, other.id])
    assert_clean_stderr(proc)


def assert_plaintext_on_tls_port(err: trame_async.ConnectError, host: str, port: int) -> None:
    """Assert that ``err`` says the server closed before the handshake and suggests ssl=."""
    text = str(err)
    assert f"{host}:{port}" in text, text
    assert "closed the connection before the handshake" in text, text
    assert "if the server serves TLS, pass ssl=" in text, text
    assert isinstance(err.__cause__, trame_async.TrameError | OSError), repr(err.__cause__)


def assert_client_certificate_asked(err: trame_async.ConnectError, host: str, port: int) -> None:
    """Assert that ``err`` names the missing client certificate and how to present one."""
    text = str(err)
    assert f"{host}:{port}" in text, text
    assert "client certificate" in text and "load_cert_chain(" in text, text
    assert "check that trame-serve runs there" not in text, text


async def test_plaintext_and_silent_connections_to_tls_port_are_closed(tls: Tls) -> None:
    handshake = 0.5
    async with trame_async.serve(
        "127.0.0.1", 0, ssl=tls.server, handshake_timeout=handshake
    ) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(Hello(PROTOCOL_VERSION, 0, b"").encode())
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        start = loop.time()
        # 0 ms: a HELLO is not a TLS ClientHello: refused at once, long before the deadline.
        await read_eof(reader, timeout=3)
        assert loop.time() - start < handshake / 2
        # 500 ms: the silent one is closed at the handshake deadline, not before.
        await read_eof(silent_r, timeout=3)
        assert handshake * 0.9 <= loop.time() - start <= handshake + 0.5
        await close_writer(writer)
        await close_writer(silent_w)
        # A trame_async client without ssl= is closed the same way, and says what it may mean.
        with pytest.raises(trame_async.ConnectError) as refused:
            await trame_async.connect("127.0.0.1", server.port, timeout=5)
        assert_plaintext_on_tls_port(refused.value, "127.0.0.1", server.port)
        assert server.clients == []
        async with trame_async.connect("127.0.0.1", server.port, ssl=tls.client) as client:
            assert client.id > 0  # and the listener still serves TLS clients


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # A fatal protocol_version alert, as TLS servers send to a peer that does not speak TLS.
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x46", "answered with a TLS record", id="tls-alert"),
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a trame_async frame", id="http"),
    ],
)
async def test_plaintext_client_says_when_the_server_answers_in_another_protocol(
    answer: bytes, expected: str
) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the HELLO has started arriving
        writer.write(answer)
        await close_writer(writer)

    listener = await asyncio.start_server(answer_and_close, "127.0.0.1", 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(trame_async.ConnectError) as refused:
            await trame_async.connect("127.0.0.1", port, timeout=5)
    text = str(refused.value)
    assert f"127.0.0.1:{port}" in text and expected in text, text
    assert answer[:5].hex(" ") in text, text  # the bytes seen, to recognise the protocol
    if answer[0] == 0x15:
        assert "it serves TLS: pass ssl=" in text, text


async def test_tls_client_on_a_plaintext_port_is_told_to_drop_ssl(tls: Tls) -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        with pytest.raises(trame_async.ConnectError) as refused:
            await trame_async.connect("127.0.0.1", server.port, ssl=tls.client, timeout=5)
        text = str(refused.value)
        assert f"127.0.0.1:{server.port}" in text, text
        assert "did not answer with TLS" in text and "connect without ssl=" in text, text
        assert isinstance(refused.value.__cause__, ssl.SSLError)
        assert server.clients == []


@pytest.mark.parametrize("case", ["untrusted-ca", "wrong-name"])
async def test_bad_server_certificate_fails_clearly(
    tls: Tls, tls_files: TlsFiles, case: str
) -> None:
    """A client that cannot verify the server gets a ConnectError naming the address and why."""
    if case == "untrusted-ca":
        server_ctx, client_ctx = tls.server, tls.other_client
        problem = "unable to get local issuer certificate"
        advice = "ssl.create_default_context(cafile=...)"
    else:
        # Signed by the CA the client trusts, but issued for another name.
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_files.ca.issue_cert("example.org").configure_cert(server_ctx)
        client_ctx = tls_files.client_context()
        problem = "IP address mismatch"
        advice = "pass server_hostname="
    async with trame_async.serve("127.0.0.1", 0, ssl=server_ctx) as server:
        with pytest.raises(trame_async.ConnectError) as info:
            await trame_async.connect("127.0.0.1", server.port, ssl=client_ctx, timeout=5)
        assert isinstance(info.value, trame_async.TrameError)
        text = str(info.value)
        assert "CERTIFICATE_VERIFY_FAILED" in text and problem in text, text
        assert f"127.0.0.1:{server.port}" in text
        # The advice is about certificates, not about whether trame-serve runs there.
        assert advice in text and "check that trame-serve runs there" not in text, text
        assert info.value.hint in text
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert server.clients == []


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
        # TLS 1.3: this side's handshake completes; the asyncio server then drops the
        # connection without flushing its alert, and connect() says what that usually means.
        with pytest.raises(trame_async.ConnectError) as refused:
            await trame_async.connect("127.0.0.1", server.port, ssl=without_cert, timeout=5)
        assert_client_certificate_asked(refused.value, "127.0.0.1", server.port)
        assert server.clients == []


async def test_client_certificate_required_alert_is_named(tls_files: TlsFiles) -> None:
    """A server that sends its "certificate required" alert: connect() names it exactly."""
    server_ctx = tls_files.server_context(require_client_cert=True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def refuse_one() -> str:
            # A blocking ssl socket writes its alert to the socket before it raises.
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                        tls_conn.recv(1)
                except ssl.SSLError as err:
                    return str(err.reason)
                return "accepted"

        refusal = asyncio.ensure_future(asyncio.to_thread(refuse_one))
        try:
            with pytest.raises(trame_async.ConnectError) as refused:
                await trame_async.connect(
                    "127.0.0.1", port, ssl=tls_files.client_context(), timeout=5
                )
        finally:
            server_side = await asyncio.wait_for(refusal, 15)
    assert server_side == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert_client_certificate_asked(refused.value, "127.0.0.1", port)
    text = str(refused.value)
    assert "requires a client certificate" in text, text
    assert "TLSV13_ALERT_CERTIFICATE_REQUIRED" in text, text
    assert isinstance(refused.value.__cause__, ssl.SSLError)


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


async def _stalled_subscriber(
    port: int,
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake, then never read again; a tiny receive buffer makes the server's writes back up.

    Returns the client id the server gave it, and the stream pair.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(Hello(PROTOCOL_VERSION, 0, b"").encode())
    kind, body = await asyncio.wait_for(read_frame(reader), 5)
    assert kind == Kind.WELCOME
    return Welcome.parse(body).client_id, reader, writer


async def _read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Read everything until the peer closes (EOF or reset); bounded by ``timeout``."""
    chunks: list[bytes] = []
    async with asyncio.timeout(timeout):
        for _ in range(100_000):
            try:
                chunk = await reader.read(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.timeout(90)
async def test_graceful_shutdown_delivers_everything_then_goodbye_and_aborts_laggard() -> None:
    drain = 1.0
    n = 50_000
    loop = asyncio.get_running_loop()
    ended: dict[int, list[tuple[DisconnectReason, float]]] = defaultdict(list)

    def on_disconnect(remote: RemoteClient, why: DisconnectReason) -> None:
        ended[remote.id].append((why, loop.time()))

    # A high write mark keeps the stalled client from pausing the publisher (flow control), so
    # the shutdown meets it with about a megabyte it will never read.
    server = await trame_async.start_server(
        "127.0.0.1",
        0,
        drain_timeout=drain,
        retry_after=2.0,
        write_high_water=8 << 20,
        max_queue_bytes=16 << 20,
        on_disconnect=on_disconnect,
    )
    subs = [await trame_async.connect("127.0.0.1", server.port, max_queue=n + 10) for _ in range(5)]
    pub = await trame_async.connect("127.0.0.1", server.port, echo=True, max_queue=n + 10)
    laggard_id, laggard_r, laggard_w = await _stalled_subscriber(server.port)
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
        # Every connection ended exactly once with the shutdown as its reason; the healthy ones
        # as soon as they had drained, the laggard only when the deadline cut it.
        assert sorted(ended) == sorted([*(c.id for c in subs), pub.id, laggard_id])
        assert all(
            [why for why, _ in reports] == [DisconnectReason.SERVER_SHUTDOWN]
            for reports in ended.values()
        ), ended
        (_, laggard_end), *_ = ended[laggard_id]
        assert drain * 0.9 <= laggard_end - start, laggard_end - start
        assert all(ended[c.id][0][1] < laggard_end for c in [*subs, pub])
        # The abort, seen from the laggard: its stream stops after a strict prefix of the frames
        # (possibly cut mid-frame), with no GOODBYE: what was still queued for it was discarded.
        parser = FrameParser()
        frames = parser.feed(await _read_to_eof(laggard_r))
        assert {f[0] for f in frames} <= {Kind.RELAY, Kind.PING}, {f[0] for f in frames}
        # (The parser strips the length prefix; decode() wants whole frames.)
        values = [
            trame_async.decode(len(f).to_bytes(4, "big") + f)[1]
            for f in frames
            if f[0] == Kind.RELAY
        ]
        assert values == list(range(len(values))), "the laggard's stream is not a prefix"
        assert len(values) < n, "the laggard got everything: it was not aborted"
    finally:
        await close_writer(laggard_w)
        for c in [*subs, pub]:
            await c.close(timeout=1)
        server.close()
        await server.wait_closed()
