"""Helpers shared by the socket tests: bounded waits, raw frames, subprocesses.

Nothing here sleeps to synchronise: waits are on futures, or bounded polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trustme
from conftest import MS

import trame_async
from trame_async import Kind, Message
from trame_async.wire import PROTOCOL_VERSION, ErrorFrame, Hello

__all__ = [
    "CLIENT_SCRIPT",
    "MS",
    "TLS_CLIENT_SCRIPT",
    "Reading",
    "TlsFiles",
    "eventually",
    "make_tls",
    "raw_handshake",
    "read_frame",
    "read_until_error",
    "receive_n",
    "spawn",
    "stop_process",
    "wait_listening",
]


@dataclass(frozen=True)
class Reading:
    """A value type with a rule of its own, for the tests of refused values: never negative."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"negative reading {self.value}")


#: A client in its own process: connect to the port in argv[1], print the id, read forever.
CLIENT_SCRIPT = """\
import asyncio, sys
import trame_async

async def main():
    client = await trame_async.connect("127.0.0.1", int(sys.argv[1]), rtt_interval=None)
    print(client.id, flush=True)
    while True:
        await client.receive()

asyncio.run(main())
"""

_LISTENING = re.compile(r"listening on (\[[^\]]+\]|[^:\s]+):(\d+)")


async def eventually(
    predicate: Callable[[], object], timeout: float = 5.0, *, what: str = "", poll: float = 2 * MS
) -> None:
    """Poll ``predicate`` every ``poll`` seconds until it is true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {what or predicate}")
        await asyncio.sleep(poll)


async def receive_n(client: trame_async.Client, n: int, timeout: float = 10.0) -> list[Message]:
    """Receive exactly ``n`` messages within ``timeout`` seconds overall."""
    out: list[Message] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < n:
                out.append(await client.receive())
    except TimeoutError:
        raise AssertionError(f"received {len(out)} of {n} messages within {timeout:g} s") from None
    return out


# --- raw sockets ----------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one whole frame; return ``(kind, body)``."""
    head = await reader.readexactly(4)
    length = int.from_bytes(head, "big")
    assert 1 <= length <= 1 << 20, f"implausible frame length {length}"
    data = await reader.readexactly(length)
    return data[0], data[1:]


async def raw_handshake(
    port: int, *, token: bytes = b"", flags: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection and complete the HELLO/WELCOME handshake by hand."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(Hello(PROTOCOL_VERSION, flags, token).encode())
    kind, _ = await asyncio.wait_for(read_frame(reader), 5)
    assert kind == Kind.WELCOME
    return reader, writer


async def read_until_error(reader: asyncio.StreamReader, timeout: float = 5.0) -> ErrorFrame:
    """Skip data and ping frames until an ERROR frame; return it (fail on anything else)."""
    async with asyncio.timeout(timeout):
        for _ in range(100_000):
            kind, body = await read_frame(reader)
            if kind == Kind.ERROR:
                return ErrorFrame.parse(body)
            assert kind in (Kind.RELAY, Kind.DATA, Kind.DROPPED, Kind.PING, Kind.PONG), (
                f"unexpected {kind:#x}"
            )
    raise AssertionError("no ERROR frame")


async def read_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> None:
    """Assert that the peer closed the connection (EOF or reset) within ``timeout``."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return
    assert data == b"", f"unexpected bytes before EOF: {data[:40]!r}"


async def read_frames_until_eof(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> list[tuple[int, bytes]]:
    """Read whole frames until the peer closes (EOF or reset); return them."""
    frames: list[tuple[int, bytes]] = []
    async with asyncio.timeout(timeout):
        for _ in range(100_000):
            try:
                frames.append(await read_frame(reader))
            except asyncio.IncompleteReadError as err:
                assert err.partial == b"", f"frame cut by EOF: {err.partial[:40]!r}"
                return frames
            except ConnectionResetError:
                return frames
    raise AssertionError("too many frames before EOF")


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection, ignoring a peer that already reset it."""
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


# --- subprocesses ---------------------------------------------------------------------------------


async def spawn(
    args: Sequence[str],
    *,
    stderr: IO[Any] | int | None = None,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``python ARGS`` with stdout piped (stderr where asked)."""
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env is not None:
        full_env.update(env)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
        env=full_env,
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> str:
    """Return the next stdout line of ``proc`` (fail on EOF or timeout)."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, f"process {proc.pid} ended (rc={proc.returncode}) without printing a line"
    return line.decode().strip()


async def wait_listening(
    proc: asyncio.subprocess.Process, timeout: float = 10.0
) -> tuple[str, int]:
    """Parse the server's first stdout line ``listening on HOST:PORT ...``."""
    line = await read_line(proc, timeout)
    match = _LISTENING.search(line)
    assert match, f"unexpected first line: {line!r}"
    return match.group(1).strip("[]"), int(match.group(2))


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Make sure ``proc`` is gone: resume it if stopped, kill it, reap it."""
    if proc.returncode is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        except ProcessLookupError:
            pass
    await asyncio.wait_for(proc.wait(), 10)


def log_text(path: Path) -> str:
    """Return the text written so far to a log file."""
    return path.read_text(errors="replace") if path.exists() else ""


# --- TLS ------------------------------------------------------------------------------------------

#: As CLIENT_SCRIPT, over TLS: argv[2] is the PEM file of the CA that signed the server certificate.
TLS_CLIENT_SCRIPT = """\
import asyncio, ssl, sys
import trame_async

async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    client = await trame_async.connect("127.0.0.1", int(sys.argv[1]), ssl=ctx, rtt_interval=None)
    print(client.id, flush=True)
    while True:
        await client.receive()

asyncio.run(main())
"""


@dataclass(frozen=True)
class TlsFiles:
    """A CA made at test time and a server certificate it signed, as PEM files and contexts.

    The server certificate names ``127.0.0.1`` and ``localhost``; :meth:`client_context` trusts the
    CA (and presents a client certificate it signed when asked); :meth:`cli_args` gives the
    ``trame-serve`` flags that load the same files.
    """

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """Return a server context with the certificate (requiring client certificates if asked)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if require_client_cert:
            ctx.load_verify_locations(self.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        """Return a client context that trusts the CA (and presents a client certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            self.ca.issue_cert("client@example.org").configure_cert(ctx)
        return ctx

    def cli_args(self, *, client_ca: bool = False) -> list[str]:
        """Return the ``trame-serve`` TLS flags (with ``--tls-client-ca`` if asked)."""
        args = ["--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file)]
        return [*args, "--tls-client-ca", str(self.ca_file)] if client_ca else args


def make_tls(directory: Path) -> TlsFiles:
    """Make a fresh CA and a certificate for 127.0.0.1/localhost; write their PEM files."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(ca, directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    cert.private_key_pem.write_to_path(str(files.key_file))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(files.cert_file), append=i > 0)
    return files


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[trame_async.Server]:
    """A server on 127.0.0.1, port 0, with ``options`` (ServerConfig fields and hooks); it is
    closed, and waited for, when the block ends."""
    server = await trame_async.start_server("127.0.0.1", 0, **options)
    try:
        yield server
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 20)
