"""The examples run as they are, as a user would run them: ``python examples/<name>.py``.

Every process is started through :mod:`proc_helpers` and stopped in a ``finally`` block; every wait
is a bounded read of the process's output, never a sleep.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
from proc_helpers import (
    EXAMPLES,
    ROOT,
    STEP,
    Proc,
    assert_clean_stderr,
    listening_address,
    python,
    start_trame_serve,
)

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None

#: The examples import this checkout's trame_async, whatever is installed: ``python
#: examples/x.py`` puts examples/ first on sys.path, not the repository (``python -m trame_async``,
#: run from the repository, does find its package).
ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
)

_CONNECTED = re.compile(r"connected to \S+ as client (\d+)")
_POSITIONS_SUMMARY = re.compile(
    r"client (\d+) in (zone/\d+): sent (\d+) frames, received (\d+) frames from zone/\d+ "
    r"\(expected (\d+)\), (\d+) from other zones"
)
_LATE_JOINER = re.compile(
    r"late joiner \(client \d+\) joined .* at once saw (\d+) of (\d+) members"
)
_LAST_VALUE = re.compile(r"^  client (\d+) in (zone/\d+) at \(.*\): its last$")
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
        EXAMPLES / "chat.py",
        "--host",
        host,
        "--port",
        str(port),
        "--name",
        name,
        stdin=True,
        env=ENV,
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


def restart_trame_serve(host: str, port: int) -> Proc:
    """Start trame-serve again on ``host:port`` (a restart); return it once it listens."""
    proc = Proc([sys.executable, "-m", "trame_async", "--host", host, "--port", str(port)], env=ENV)
    try:
        assert listening_address(proc.wait_line(lambda line: True)) == (host, port)
    except BaseException:
        proc.stop()
        raise
    return proc


def test_chat_reports_a_server_that_goes_away() -> None:
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    chat: Proc | None = None
    try:
        chat, _ = start_chat(host, port, "carol")
        server.interrupt()  # Ctrl+C on the server: it says goodbye to the chat
        assert server.wait() == 0, server.describe()
        # The chat says why and keeps trying (nothing listens: each attempt fails)...
        assert chat.wait_line("connection lost") == (
            "* connection lost (server-shutdown); reconnecting"
        )
        chat.wait_line("(attempt 1)")
        chat.wait_line("(attempt 2)")
        assert chat.popen.poll() is None, chat.describe()
        # ... lines typed meanwhile are not sent, and end of input still ends it.
        chat.write("anyone?\n")
        chat.close_stdin()
        assert chat.wait() == 0, chat.describe()
        assert chat.out_lines[-1] == "* bye", chat.describe()
        assert any("not sent" in line for line in chat.err_lines), chat.describe()
        assert_clean_stderr(chat)
    finally:
        if chat is not None:
            chat.stop()
        server.stop()


def test_chat_rooms_keep_their_lines_to_their_members() -> None:
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    chats: list[Proc] = []
    try:
        alice, alice_id = start_chat(host, port, "alice")
        chats.append(alice)
        bob, bob_id = start_chat(host, port, "bob")
        chats.append(bob)
        carol, carol_id = start_chat(host, port, "carol")  # stays out of the room
        chats.append(carol)

        alice.write("/join lobby\n")
        assert alice.wait_line("you joined") == (
            "* you joined #lobby (alone); your lines go to #lobby"
        )
        bob.write("/join #lobby\n")  # the '#' is optional
        assert bob.wait_line("you joined") == (
            f"* you joined #lobby (with id {alice_id}); your lines go to #lobby"
        )
        # Alice joined with presence: told that client bob_id came, named by its NAM trame.
        assert alice.wait_line("joined #lobby") == f"* bob (id {bob_id}) joined #lobby"

        bob.write("hi room\n")
        assert alice.wait_line("hi room") == f"#lobby [{bob_id}] bob: hi room"
        bob.write("/rooms\n")
        assert bob.wait_line("rooms:") == "* rooms: #lobby; your lines go to #lobby"

        # Out of the room, lines go to everyone again, as for a chat that never joined.
        bob.write("/leave\n")
        assert bob.wait_line("you left") == "* you left #lobby; your lines go to everyone"
        assert alice.wait_line("left #lobby") == f"* bob (id {bob_id}) left #lobby"
        bob.write("hi all\n")
        assert alice.wait_line("hi all") == f"[{bob_id}] bob: hi all"
        # Carol got bob's lines in order: "hi all" came, so "hi room" never will.
        assert carol.wait_line("hi all") == f"[{bob_id}] bob: hi all"
        assert not any("hi room" in line or "#lobby" in line for line in carol.out_lines), (
            carol.describe()
        )
        carol.write("/rooms\n")
        assert carol.wait_line("in no room") == "* in no room; your lines go to everyone"

        # Bob comes back; alice answered his first join with her name, so he can name her when
        # she goes (Ctrl+D: her goodbye is the reason).
        bob.write("/join lobby\n")
        bob.wait_line("you joined")
        alice.wait_line(f"bob (id {bob_id}) joined")
        alice.close_stdin()
        assert alice.wait() == 0, alice.describe()
        assert bob.wait_line("left #lobby") == f"* alice (id {alice_id}) left #lobby (goodbye)"
        for chat in (bob, carol):
            chat.close_stdin()
            assert chat.wait() == 0, chat.describe()
        for chat in chats:
            assert_clean_stderr(chat)
        assert carol_id not in (alice_id, bob_id)
    finally:
        for chat in chats:
            chat.stop()
        server.stop()
    assert server.popen.returncode == 0, server.describe()


def test_chat_reconnects_to_a_restarted_server_back_in_its_rooms() -> None:
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    chats: list[Proc] = []
    try:
        dave, _ = start_chat(host, port, "dave")
        chats.append(dave)
        dave.write("/join ops\n")
        dave.wait_line("you joined #ops")
        server.interrupt()
        assert server.wait() == 0, server.describe()
        dave.wait_line("connection lost (server-shutdown)")
        server.stop()  # its pipes
        server = restart_trame_serve(host, port)
        back = dave.wait_line("reconnected as client")
        assert back.endswith(", back in #ops"), dave.describe()
        # Back in the room for real: a newcomer is seen, by name, and hears dave's lines.
        erin, erin_id = start_chat(host, port, "erin")
        chats.append(erin)
        erin.write("/join ops\n")
        erin.wait_line("you joined #ops (with id")
        assert dave.wait_line("joined #ops") == f"* erin (id {erin_id}) joined #ops"
        dave.write("still here\n")
        assert erin.wait_line("still here").endswith("dave: still here")
        for chat in chats:
            chat.close_stdin()
            assert chat.wait() == 0, chat.describe()
            assert_clean_stderr(chat)
    finally:
        for chat in chats:
            chat.stop()
        server.stop()


def test_chat_reports_a_refused_connection(unused_tcp_port: int) -> None:
    chat = python(EXAMPLES / "chat.py", "--port", str(unused_tcp_port), stdin=True, env=ENV)
    try:
        assert chat.wait() == 1, chat.describe()
        assert "cannot connect" in "\n".join(chat.err_lines), chat.describe()
        assert_clean_stderr(chat)
    finally:
        chat.stop()


def check_positions_summary(proc: Proc, clients: int, zones: int) -> None:
    rows = [m for line in proc.out_lines if (m := _POSITIONS_SUMMARY.search(line))]
    assert len(rows) == clients, proc.describe()
    zone_of = {int(row.group(1)): row.group(2) for row in rows}
    assert sorted(set(zone_of.values())) == [f"zone/{z}" for z in range(min(zones, clients))]
    for row in rows:
        zone, sent, received, expected, elsewhere = row.group(2), *map(int, row.groups()[2:])
        assert sent > 0, proc.describe()
        # Every client receives what the others of its zone sent (TCP loses nothing; no echo of
        # its own), and nothing of the other zones.
        mates = sum(1 for z in zone_of.values() if z == zone) - 1
        assert received == expected == sent * mates, proc.describe()
        assert elsewhere == 0, proc.describe()
    if clients > zones:
        assert any(re.search(r"client \d+ sees client \d+ at \(", line) for line in proc.out_lines)
    # The late joiner got the last position of every client of every zone at once (the server
    # keeps last values of zone/*), each in its own zone.
    late = next((m for line in proc.out_lines if (m := _LATE_JOINER.search(line))), None)
    assert late is not None, proc.describe()
    assert late.groups() == (str(clients), str(clients)), proc.describe()
    last = {
        int(m.group(1)): m.group(2) for line in proc.out_lines if (m := _LAST_VALUE.match(line))
    }
    assert last == zone_of, proc.describe()


def test_positions_runs_its_own_server_and_prints_a_summary() -> None:
    proc = python(
        EXAMPLES / "positions.py", "--clients", "3", "--rate", "25", "--seconds", "1.2", env=ENV
    )
    try:
        assert proc.wait(STEP + 10) == 0, proc.describe()
        assert any("started a server on 127.0.0.1:" in line for line in proc.out_lines)
        check_positions_summary(proc, 3, zones=2)  # the default: zone/0 and zone/1
        assert_clean_stderr(proc)
    finally:
        proc.stop()


def test_positions_uses_a_running_trame_serve() -> None:
    server, host, port = start_trame_serve(
        None, "--loop", "asyncio", "--last-value-groups", "zone/*"
    )
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
            env=ENV,
        )
        assert proc.wait(STEP + 10) == 0, proc.describe()
        assert not any("started a server" in line for line in proc.out_lines)
        check_positions_summary(proc, 2, zones=2)
        assert_clean_stderr(proc)
    finally:
        if proc is not None:
            proc.stop()
        server.stop()
    assert server.popen.returncode == 0, server.describe()


def test_positions_keeps_each_zone_to_itself() -> None:
    proc = python(
        EXAMPLES / "positions.py",
        "--clients",
        "5",
        "--zones",
        "2",
        "--rate",
        "25",
        "--seconds",
        "1",
        env=ENV,
    )
    try:
        assert proc.wait(STEP + 10) == 0, proc.describe()
        assert "zone/0: clients [1, 3, 5]" in proc.out_lines, proc.describe()
        assert "zone/1: clients [2, 4]" in proc.out_lines, proc.describe()
        check_positions_summary(proc, 5, zones=2)
        assert_clean_stderr(proc)
    finally:
        proc.stop()


def test_embedded_serves_ticks_and_answers_then_shuts_down() -> None:
    proc = python(EXAMPLES / "embedded.py", "--seconds", "1.2", env=ENV)
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
