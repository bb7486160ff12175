"""Helpers for the attack-and-load tests (test_robust_limits.py, test_fuzz_server.py).

- :class:`ServerProcess`: tests/robust_server.py in its own process, with stats on demand;
- :data:`ATTACKS`: one malformed input per class, with the ERROR code the server must answer;
- :class:`RawConn`: a raw, non-blocking socket that reads whole frames (no asyncio streams, so
  hundreds of them stay cheap and nothing reads behind the test's back);
- :class:`Window`: lets a publisher run at most a few batches ahead of its slowest subscriber,
  without sleeping.

Nothing here sleeps to synchronise: waits are on futures or events, or bounded polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil
from conftest import MS

from trame_async import INT, REGISTRY, ErrorCode, Kind
from trame_async.wire import (
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorFrame,
    Hello,
    frame,
    ping,
)

__all__ = [
    "ATTACKS",
    "HELLO",
    "MS",
    "Attack",
    "RawConn",
    "ServerProcess",
    "Window",
    "loop_name",
    "open_fds",
    "push_junk",
    "split_frames",
]

#: A valid HELLO without token.
HELLO = Hello(PROTOCOL_VERSION, 0, b"").encode()
#: max_frame_size of the servers the attacks are run against (ATTACKS depend on it).
ATTACK_MAX_FRAME_SIZE = 64 << 10
_ROOT = Path(__file__).resolve().parent


def loop_name() -> str:
    """Return "uvloop" or "asyncio": the kind of the running loop (subprocesses use the same)."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


def open_fds() -> int:
    """Return the number of file descriptors this process has open."""
    return psutil.Process().num_fds()


# --- malformed input, one per class ---------------------------------------------------------------


class Attack(NamedTuple):
    """One class of malformed input and the ERROR code the server must answer it with."""

    name: str
    payload: bytes
    code: ErrorCode
    after_hello: bool
    """Sent after a completed handshake (else as the connection's first bytes)."""


def _body(trame_head: bytes, value: bytes) -> bytes:
    return trame_head + value


_INT_VALUE = INT.pack(7)

ATTACKS: tuple[Attack, ...] = (
    # Framing.
    # A zero length then what looks like a HELLO: the preamble (kind, magic) passes, the length not.
    Attack("length-0 before hello", b"\0\0\0\0\x01TRAM", ErrorCode.MALFORMED_FRAME, False),
    Attack("length-0", b"\0\0\0\0", ErrorCode.MALFORMED_FRAME, True),
    Attack(
        "length above the handshake limit",
        HEADER.pack(HANDSHAKE_MAX_FRAME_SIZE + 1, Kind.HELLO) + MAGIC,
        ErrorCode.FRAME_TOO_LARGE,
        False,
    ),
    Attack(
        "length above max_frame_size",
        HEADER.pack(ATTACK_MAX_FRAME_SIZE + 1, Kind.MULTICAST),
        ErrorCode.FRAME_TOO_LARGE,
        True,
    ),
    Attack("unknown kind before hello", frame(0x7F, b"TRAM"), ErrorCode.BAD_HANDSHAKE, False),
    Attack("unknown kind", frame(0x7F, b"\0\0\0\0"), ErrorCode.UNKNOWN_KIND, True),
    # Handshake.
    Attack(
        "multicast before hello",
        REGISTRY.encode(INT, 1),
        ErrorCode.UNEXPECTED_FRAME,
        False,
    ),
    Attack(
        "data before hello",
        REGISTRY.encode(INT, 1, Kind.DATA),
        ErrorCode.UNEXPECTED_FRAME,
        False,
    ),
    Attack("ping before hello", ping(1), ErrorCode.UNEXPECTED_FRAME, False),
    Attack(
        "hello with bad magic",
        frame(Kind.HELLO, b"TRAX\x01\x00\x00\x00"),
        ErrorCode.BAD_HANDSHAKE,
        False,
    ),
    Attack(
        "hello with bad version",
        Hello(PROTOCOL_VERSION + 1, 0, b"").encode(),
        ErrorCode.UNSUPPORTED_VERSION,
        False,
    ),
    Attack("truncated hello", frame(Kind.HELLO, b"TRAM\x01"), ErrorCode.MALFORMED_FRAME, False),
    Attack(
        "hello with trailing bytes",
        frame(Kind.HELLO, HELLO[5:] + b"!!"),
        ErrorCode.TRAILING_DATA,
        False,
    ),
    Attack(
        "http request",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ErrorCode.BAD_HANDSHAKE,
        False,
    ),
    Attack("second hello", HELLO, ErrorCode.UNEXPECTED_FRAME, True),
    Attack(
        "relay from a client",
        frame(Kind.RELAY, b"\0\0\0\1" + _body(INT.head, _INT_VALUE)),
        ErrorCode.UNEXPECTED_FRAME,
        True,
    ),
    # Data frames.
    Attack(
        "unknown code with garbage format",
        frame(Kind.MULTICAST, b"ZZZ\x04<Q!!" + b"\0" * 8),
        ErrorCode.BAD_FORMAT,
        True,
    ),
    Attack(
        "zero-length pascal string format",
        frame(Kind.MULTICAST, b"ZZZ\x03<0p"),
        ErrorCode.BAD_FORMAT,
        True,
    ),
    Attack(
        "non-printable code",
        frame(Kind.MULTICAST, b"\x00\x01\x02\x02<q" + _INT_VALUE),
        ErrorCode.BAD_FORMAT,
        True,
    ),
    Attack(
        "format/value size mismatch",
        frame(Kind.MULTICAST, _body(INT.head, _INT_VALUE[:7])),
        ErrorCode.VALUE_SIZE_MISMATCH,
        True,
    ),
    Attack(
        "registered code with wrong format",
        frame(Kind.MULTICAST, b"INT\x02<d" + _INT_VALUE),
        ErrorCode.VALUE_SIZE_MISMATCH,
        True,
    ),
    Attack(
        "invalid utf-8 in STR",
        frame(Kind.MULTICAST, b"STR\x03<3s\xff\xfe\xfd"),
        ErrorCode.INVALID_TEXT,
        True,
    ),
    Attack("truncated data frame", frame(Kind.MULTICAST, b"IN"), ErrorCode.MALFORMED_FRAME, True),
    # Control frames.
    Attack(
        "ping with trailing junk", frame(Kind.PING, b"\0\0\0\1\2"), ErrorCode.TRAILING_DATA, True
    ),
    Attack("truncated ping", frame(Kind.PING, b"\0\0"), ErrorCode.MALFORMED_FRAME, True),
    # A broken ERROR or GOODBYE is not here: it is never answered (docs/protocol.md, order of
    # checks), which tests/test_protocol_rules.py checks.
    Attack(
        "whitespace in a format",
        frame(Kind.MULTICAST, b"ZZZ\x04<h h" + bytes(4)),
        ErrorCode.BAD_FORMAT,
        True,
    ),
    Attack("bool byte 2", frame(Kind.MULTICAST, b"BOL\x02<?\x02"), ErrorCode.BAD_VALUE, True),
)


# --- raw sockets ----------------------------------------------------------------------------------


def split_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove the whole frames at the start of ``buf``; return them as ``(kind, body)``."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while len(buf) - pos >= 4:
        length = int.from_bytes(buf[pos : pos + 4], "big")
        assert length >= 1, "the server sent a frame of length 0"
        if len(buf) - pos - 4 < length:
            break
        out.append((buf[pos + 4], bytes(buf[pos + 5 : pos + 4 + length])))
        pos += 4 + length
    del buf[:pos]
    return out


class RawConn:
    """A raw non-blocking TCP connection driven with ``loop.sock_*`` calls.

    It reads only when asked, so a test decides exactly when (and whether) the peer reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.frames: list[tuple[int, bytes]] = []
        self.eof = False
        self.reset = False

    @classmethod
    async def connect(
        cls, port: int, *, rcvbuf: int | None = None, sndbuf: int | None = None
    ) -> RawConn:
        """Connect to 127.0.0.1:``port``; ``rcvbuf``/``sndbuf`` set the socket buffers first."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        """Read one chunk; return False at EOF or reset."""
        if self.eof:
            return False
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.frames.extend(split_frames(self.buf))
        return True

    async def next_frame(self) -> tuple[int, bytes]:
        """Return the next whole frame (EOFError if the connection ends first)."""
        for _ in range(1_000_000):
            if self.frames:
                return self.frames.pop(0)
            if not await self._fill():
                raise EOFError(f"connection ended; {len(self.buf)} bytes of a partial frame")
        raise AssertionError("unreachable: too many reads for one frame")

    async def handshake(self) -> int:
        """Send HELLO, read WELCOME; return the client id."""
        await self.send(HELLO)
        kind, body = await self.next_frame()
        assert kind == Kind.WELCOME, f"expected WELCOME, got kind {kind:#x}: {body[:40]!r}"
        return int.from_bytes(body[6:10], "big")

    async def read_to_end(self, limit: int = 1 << 24) -> list[tuple[int, bytes]]:
        """Read until EOF or reset (at most ``limit`` bytes); return every frame not yet taken."""
        total = 0
        while total < limit and await self._fill():
            total += 1 << 16
        frames, self.frames = self.frames, []
        return frames


def push_junk(
    sock: socket.socket, prefix: bytes, total: int, timeout: float = 10.0
) -> tuple[int, str]:
    """Send ``prefix`` then up to ``total`` bytes of junk on a blocking socket (run it in a thread).

    Return ``(junk bytes the kernel accepted, how it ended)``: "reset", "broken pipe", "timeout"
    (the peer neither read nor closed) or "all sent". The socket is non-blocking again afterwards.
    """
    junk = bytes(range(256)) * 256  # 64 KiB that frame no valid header
    sent = 0
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        if prefix:
            sock.sendall(prefix)
        while sent < total:
            sent += sock.send(junk[: total - sent])
    except ConnectionResetError:
        return sent, "reset"
    except BrokenPipeError:
        return sent, "broken pipe"
    except TimeoutError:
        return sent, "timeout"
    finally:
        sock.setblocking(False)
    return sent, "all sent"


def error_code_of(frames: Sequence[tuple[int, bytes]]) -> int | None:
    """Return the code of the last frame if it is an ERROR, else None."""
    if not frames or frames[-1][0] != Kind.ERROR:
        return None
    return ErrorFrame.parse(frames[-1][1]).code


# --- a server in its own process ------------------------------------------------------------------


class ServerProcess:
    """tests/robust_server.py in a subprocess; :meth:`stats` asks it for its counters.

    With ``report_disconnects``, each ``on_disconnect`` of the server lands in :attr:`disconnects`
    (client id -> ``[(reason name, time.monotonic() in the server)]``); :meth:`wait_disconnects`
    waits for some ids.
    """

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.port = 0
        self.disconnects: dict[int, list[tuple[str, float]]] = {}
        #: stdout lines that are not JSON objects (a stray print): shown when a wait fails.
        self.junk: list[str] = []
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._ended = False
        self._reader = asyncio.create_task(self._read_stdout())

    @classmethod
    async def start(
        cls, config: dict[str, Any], stderr_path: Path, *, report_disconnects: bool = False
    ) -> ServerProcess:
        """Start a server with these ServerConfig fields, on the running loop's kind of loop."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if report_disconnects:
            config = {**config, "_report_disconnects": True}
        with open(stderr_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(_ROOT / "robust_server.py"),
                json.dumps(config),
                loop_name(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self = cls(proc, stderr_path)
        try:
            first = await self._line(20.0)
            assert first["type"] == "listening", first
            self.port = int(first["port"])
        except BaseException:
            await self.kill()
            raise
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def _read_stdout(self) -> None:
        """Route the server's lines: disconnect reports to :attr:`disconnects`, others to _line.

        Runs until stdout ends (the process exits; :meth:`kill` cancels it otherwise). However it
        ends, None goes on the queue, so a waiting :meth:`_line` fails at once, not at its timeout.
        """
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while raw := await stdout.readline():
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if not isinstance(line, dict):
                    self.junk.append(raw.decode(errors="replace").rstrip("\n"))
                    continue
                if line.get("type") != "disconnect":
                    self._lines.put_nowait(line)
                    continue
                client_id = int(line["id"])
                self.disconnects.setdefault(client_id, []).append((line["reason"], line["at"]))
                waiter = self._waiters.pop(client_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        finally:
            self._lines.put_nowait(None)

    def _explain(self) -> str:
        junk = "".join(f"\nnot JSON on stdout: {line!r}" for line in self.junk[-5:])
        return f"{junk}\n{self.stderr()}"

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert not self._ended, f"server output ended (rc={self.proc.returncode}){self._explain()}"
        try:
            line = await asyncio.wait_for(self._lines.get(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"server printed nothing within {timeout:g} s{self._explain()}"
            ) from None
        if line is None:
            self._ended = True
            reader = self._reader
            failed = reader.done() and not reader.cancelled() and reader.exception()
            why = f"; reading its output failed: {failed!r}" if failed else ""
            raise AssertionError(
                f"server output ended (rc={self.proc.returncode}){why}{self._explain()}"
            )
        return line

    async def wait_disconnects(self, ids: Sequence[int], timeout: float = 10.0) -> None:
        """Wait until the server reported the disconnect of every client in ``ids``."""
        loop = asyncio.get_running_loop()
        futures = []
        for client_id in ids:
            if client_id not in self.disconnects:
                future = self._waiters.get(client_id)
                if future is None:
                    future = self._waiters[client_id] = loop.create_future()
                futures.append(future)
        if futures:
            _, pending = await asyncio.wait(futures, timeout=timeout)
            assert not pending, (
                f"{len(pending)} of {len(ids)} disconnects not reported in {timeout:g} s"
            )

    async def stats(self) -> dict[str, Any]:
        """Ask the server for its counters (SIGUSR1) and return them."""
        self.proc.send_signal(signal.SIGUSR1)
        line = await self._line(10.0)
        assert line["type"] == "stats", line
        return line

    async def stats_when(
        self, predicate: Any, timeout: float = 10.0, what: str = ""
    ) -> dict[str, Any]:
        """Poll :meth:`stats` until ``predicate(stats)`` holds; fail at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(100_000):
            stats = await self.stats()
            if predicate(stats):
                return stats
            if loop.time() > deadline:
                raise AssertionError(f"not true within {timeout:g} s: {what}\nlast stats: {stats}")
            await asyncio.sleep(20 * MS)
        raise AssertionError("unreachable")

    async def stop(self) -> dict[str, Any]:
        """Shut the server down (SIGTERM); return its final stats; it must exit with 0."""
        self.proc.send_signal(signal.SIGTERM)
        final = await self._line(20.0)
        assert final["type"] == "final", final
        rc = await asyncio.wait_for(self.proc.wait(), 20.0)
        assert rc == 0, f"server exited with {rc}{self._explain()}"
        # Its stdout has ended: the reader stops by itself, and a failure of its shows here.
        await asyncio.wait_for(self._reader, 20.0)
        return final

    async def kill(self) -> None:
        """Make sure the process is gone (for finally blocks)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 20.0)
        # Its stdout ends with it; the reader then stops by itself. This runs in finally blocks:
        # a failure of the reader must not mask the test's own (stop() and _line report it).
        reader = self._reader
        await asyncio.wait([reader], timeout=5.0)
        if not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=5.0)
        if reader.done() and not reader.cancelled():
            reader.exception()  # retrieved: no "never retrieved" warning


# --- pacing a publisher by its slowest subscriber ---------------------------------------------------


class Window:
    """Count batches received by every subscriber; let a publisher wait for the slowest.

    Subscribers call :meth:`received` with each sequence number (0, 1, 2, ...); the publisher calls
    :meth:`wait` for batch ``k`` (sequence numbers ``k*batch .. (k+1)*batch-1``) to have reached
    every subscriber. Nothing polls: each batch has an event.
    """

    def __init__(self, subscribers: int, batch: int) -> None:
        self.subscribers = subscribers
        self.batch = batch
        self._counts: dict[int, int] = {}
        self._events: dict[int, asyncio.Event] = {}

    def _event(self, k: int) -> asyncio.Event:
        event = self._events.get(k)
        if event is None:
            event = self._events[k] = asyncio.Event()
        return event

    def received(self, seq: int) -> None:
        if (seq + 1) % self.batch == 0:
            k = seq // self.batch
            n = self._counts.get(k, 0) + 1
            self._counts[k] = n
            if n >= self.subscribers:
                self._event(k).set()

    async def wait(self, k: int, timeout: float = 20.0) -> None:
        if k < 0:
            return
        try:
            await asyncio.wait_for(self._event(k).wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"batch {k} reached {self._counts.get(k, 0)} of {self.subscribers} subscribers "
                f"within {timeout:g} s"
            ) from None
        self._events.pop(k - 2, None)
        self._counts.pop(k - 2, None)
