"""Run programs (trame-serve, the examples) as subprocesses with bounded, line-based reads.

Each stream of a :class:`Proc` is read by a thread into a queue, so a test waits for a line with a
deadline instead of sleeping, and never blocks forever on a silent process. :meth:`Proc.stop` ends
the process (SIGINT, then SIGKILL at a deadline), joins the readers and closes every pipe: call it
in a ``finally`` block.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: One millisecond, scaled by TRAME_TESTS_TIMEOUT_FACTOR on slow machines (as in conftest.py).
MS = 0.001 * float(os.environ.get("TRAME_TESTS_TIMEOUT_FACTOR", "1"))
#: The repository's root directory.
ROOT = Path(__file__).resolve().parent.parent
#: The examples directory.
EXAMPLES = ROOT / "examples"
#: Generous bound for one step of a subprocess (start-up, one message), in seconds.
STEP = 20_000 * MS

_LISTENING = re.compile(r"listening on \[?([^\]\s]+?)\]?:(\d+)")


class Proc:
    """A subprocess whose stdout and stderr lines are collected by reader threads."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        stdin: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start ``args``; with ``stdin`` the test can write to the process's standard input."""
        self.args = [str(a) for a in args]
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=cwd,
            env=env,
        )
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self._out: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(
                target=self._pump, args=(self.popen.stdout, self.out_lines, self._out), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.popen.stderr, self.err_lines, None), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()
        self._eof = False

    @staticmethod
    def _pump(stream: object, lines: list[str], q: queue.Queue[str | None] | None) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            line = line.rstrip("\n")
            lines.append(line)
            if q is not None:
                q.put(line)
        if q is not None:
            q.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def describe(self) -> str:
        """Return the command, its exit status and everything it printed (for assertion messages)."""
        out = "\n".join(self.out_lines)
        err = "\n".join(self.err_lines)
        return (
            f"command: {' '.join(self.args)}\nreturncode: {self.popen.returncode}\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )

    def wait_line(self, match: Callable[[str], bool] | str, timeout: float = STEP) -> str:
        """Return the next stdout line for which ``match`` is true (or that contains it).

        Lines before it are skipped (they stay in :attr:`out_lines`). Fails the test at the deadline
        or when the process closes its stdout first.
        """
        pred = (lambda line: match in line) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._eof:
                break
            try:
                line = self._out.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                break
            if pred(line):
                return line
        why = "stdout closed" if self._eof else f"no such line within {timeout:g} s"
        raise AssertionError(f"waiting for {match!r}: {why}\n{self.describe()}")

    def write(self, text: str) -> None:
        """Write ``text`` to the process's stdin and flush it."""
        stdin = self.popen.stdin
        assert stdin is not None, "start the Proc with stdin=True"
        stdin.write(text)
        stdin.flush()

    def close_stdin(self) -> None:
        """Close the process's stdin: it reads EOF."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def wait(self, timeout: float = STEP) -> int:
        """Wait for the process to exit by itself; return its status (fails at the deadline)."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process did not exit within {timeout:g} s\n{self.describe()}"
            ) from None
        self._join()
        return code

    def interrupt(self) -> None:
        """Send SIGINT (Ctrl+C)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)

    def stop(self, timeout: float = STEP) -> int:
        """End the process if it runs (SIGINT, then SIGKILL), join the readers, close the pipes."""
        try:
            if self.popen.poll() is None:
                self.interrupt()
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
        finally:
            self.close_stdin()
            self._join()
            for stream in (self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    stream.close()
        return self.popen.returncode

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(STEP)


def python(*args: str | os.PathLike[str], stdin: bool = False, **kwargs: object) -> Proc:
    """Start ``python args...`` with the interpreter running the tests."""
    return Proc([sys.executable, *args], stdin=stdin, **kwargs)  # type: ignore[arg-type]


def listening_address(line: str) -> tuple[str, int]:
    """Parse ``listening on HOST:PORT ...`` (trame-serve's first line)."""
    found = _LISTENING.search(line)
    assert found is not None, f"not a 'listening on HOST:PORT' line: {line!r}"
    return found.group(1), int(found.group(2))


def start_trame_serve(
    command: Sequence[str | os.PathLike[str]] | None = None, *extra: str
) -> tuple[Proc, str, int]:
    """Start trame-serve on 127.0.0.1, port 0; return it and the address from its first line."""
    cmd = list(command) if command is not None else [sys.executable, "-m", "trame_async"]
    proc = Proc([*cmd, "--host", "127.0.0.1", "--port", "0", *extra])
    try:
        first = proc.wait_line(lambda line: True)
        host, port = listening_address(first)
    except BaseException:
        proc.stop()
        raise
    return proc, host, port


def assert_clean_stderr(proc: Proc) -> None:
    """Fail when the process printed a traceback or an asyncio/resource leak warning."""
    err = "\n".join(proc.err_lines)
    for marker in (
        "Traceback",
        "Task was destroyed",
        "Unclosed",
        "ResourceWarning",
        "never awaited",
    ):
        assert marker not in err, f"{marker!r} on stderr\n{proc.describe()}"
