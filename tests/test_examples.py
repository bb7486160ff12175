"""The examples run as they are, as a user would run them: ``python examples/<name>.py``.

Every process is started through :mod:`proc_helpers` and stopped in a ``finally`` block; every wait
is a bounded read of the process's output, never a sleep.
"""

from __future__ import annotations

import re

import pytest
from proc_helpers import EXAMPLES, STEP, Proc, assert_clean_stderr, python, start_trame_serve

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None

_CONNECTED = re.compile(r"connected to \S+ as client (\d+)")
_POSITIONS_SUMMARY = re.compile(r"client (\d+): sent (\d+) frames, received (\d+) frames")
_EMBEDDED_SUMMARY = re.compile(
    r"summary: server multicast (\d+) ticks and answered (\d+) requests; "
    r"the client received (\d+) ticks and (\d+) answers"
)

#: trame-serve's event loops: the chat test runs on both.
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
    ),
]


def start_chat(host: str, port: int, name: str) -> tuple[Proc, int]:
    """Start a chat on the server; return it and its client id once it says it is connected."""
    chat = python(
        EXAMPLES / "chat.py", "--host", host, "--port", str(port), "--name", name, stdin=True
    )
    try:
        found = _CONNECTED.search(chat.wait_line("connected to"))
        assert found is not None
    except BaseException:
        chat.stop()
        raise
    return chat, int(found.group(1))


@pytest.mark.parametrize("loop", LOOPS)
def test_chat_relays_lines_between_two_terminals(loop: str) -> None:
    server, host, port = start_trame_serve(None, "--loop", loop)
    chats: list[Proc] = []
    try:
        alice, alice_id = start_chat(host, port, "alice")
        chats.append(alice)
        bob, bob_id = start_chat(host, port, "bob")
        chats.append(bob)
        assert alice_id != bob_id

        # Both are connected (each printed its id after the server's WELCOME): a line typed now
        # reaches the other one.
        alice.write("hello bob, ça va ?\n")
        line = bob.wait_line("hello bob")
        assert line == f"[{alice_id}] alice: hello bob, ça va ?"

        bob.write("fine\n\nand you?\n")  # the empty line is not sent
        assert alice.wait_line("fine") == f"[{bob_id}] bob: fine"
        assert alice.wait_line("and you?") == f"[{bob_id}] bob: and you?"

        # Ctrl+D: each leaves cleanly; a last line without a newline is still sent first.
        bob.write("see you")
        bob.close_stdin()
        assert alice.wait_line("see you") == f"[{bob_id}] bob: see you"
        assert bob.wait() == 0, bob.describe()
        alice.close_stdin()
        assert alice.wait() == 0, alice.describe()
        for chat in chats:
            assert "* bye" in chat.out_lines, chat.describe()
            assert_clean_stderr(chat)
        # Neither saw its own line (no echo), nor an empty line.
        assert not any("alice:" in line for line in alice.out_lines)
        assert not any(line.endswith("bob: ") for line in alice.out_lines)
    finally:
        for chat in chats:
            chat.stop()
        server.stop()
    assert server.popen.returncode == 0, server.describe()
    assert_clean_stderr(server)


def test_chat_reports_a_server_that_goes_away() -> None:
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    chat: Proc | None = None
    try:
        chat, _ = start_chat(host, port, "carol")
        server.interrupt()  # Ctrl+C on the server: it says goodbye to the chat
        assert server.wait() == 0, server.describe()
        assert chat.wait() == 1, chat.describe()
        assert "server-shutdown" in "\n".join(chat.err_lines), chat.describe()
        assert "Traceback" not in "\n".join(chat.err_lines), chat.describe()
    finally:
        if chat is not None:
            chat.stop()
        server.stop()


def test_chat_reports_a_refused_connection(unused_tcp_port: int) -> None:
    chat = python(EXAMPLES / "chat.py", "--port", str(unused_tcp_port), stdin=True)
    try:
        assert chat.wait() == 1, chat.describe()
        assert "cannot connect" in "\n".join(chat.err_lines), chat.describe()
        assert_clean_stderr(chat)
    finally:
        chat.stop()


def check_positions_summary(proc: Proc, clients: int) -> None:
    rows = [m for line in proc.out_lines if (m := _POSITIONS_SUMMARY.search(line))]
    assert len(rows) == clients, proc.describe()
    for row in rows:
        sent, received = int(row.group(2)), int(row.group(3))
        assert sent > 0, proc.describe()
        # Every client receives what the others sent (TCP loses nothing; no echo of its own).
        assert received == sent * (clients - 1), proc.describe()
    assert any(re.search(r"client \d+ sees client \d+ at \(", line) for line in proc.out_lines)


def test_positions_runs_its_own_server_and_prints_a_summary() -> None:
    proc = python(EXAMPLES / "positions.py", "--clients", "3", "--rate", "25", "--seconds", "1.2")
    try:
        assert proc.wait(STEP + 10) == 0, proc.describe()
        assert any("started a server on 127.0.0.1:" in line for line in proc.out_lines)
        check_positions_summary(proc, 3)
        assert_clean_stderr(proc)
    finally:
        proc.stop()


def test_positions_uses_a_running_trame_serve() -> None:
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    proc: Proc | None = None
    try:
        proc = python(
            EXAMPLES / "positions.py",
            "--host",
            host,
            "--port",
            str(port),
            "--clients",
            "2",
            "--rate",
            "20",
            "--seconds",
            "0.5",
        )
        assert proc.wait(STEP + 10) == 0, proc.describe()
        assert not any("started a server" in line for line in proc.out_lines)
        check_positions_summary(proc, 2)
        assert_clean_stderr(proc)
    finally:
        if proc is not None:
            proc.stop()
        server.stop()
    assert server.popen.returncode == 0, server.describe()


def test_embedded_serves_ticks_and_answers_then_shuts_down() -> None:
    proc = python(EXAMPLES / "embedded.py", "--seconds", "1.2")
    try:
        assert proc.wait(STEP + 10) == 0, proc.describe()
        found = next((m for line in proc.out_lines if (m := _EMBEDDED_SUMMARY.search(line))), None)
        assert found is not None, proc.describe()
        ticks_sent, requests, ticks_received, answers = map(int, found.groups())
        assert ticks_sent >= 1, proc.describe()
        assert 1 <= ticks_received <= ticks_sent, proc.describe()
        assert requests == answers == 2, proc.describe()
        assert any("connected as client 1" in line for line in proc.out_lines)
        assert any("client 1 left" in line for line in proc.out_lines), proc.describe()
        assert_clean_stderr(proc)
    finally:
        proc.stop()
