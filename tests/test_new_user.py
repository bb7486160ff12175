"""What a new user tripped on (issue 12): each mistake gets a message that says what to do."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys

import pytest

import trame_async
from trame_async import INT, AuthenticationError
from trame_async.cli import build_parser


@pytest.mark.parametrize("given", [None, "wrong"])
async def test_a_missing_or_wrong_token_says_what_to_do_once(
    given: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRAME_TOKEN", raising=False)
    async with trame_async.serve("127.0.0.1", 0, token="s3cret") as server:
        with pytest.raises(AuthenticationError) as info:
            await trame_async.connect("127.0.0.1", server.port, token=given, timeout=5)
    text = str(info.value)
    assert "token=" in text and "TRAME_TOKEN" in text
    assert text.count("AUTH_FAILED") == 1 and "auth failed" not in text
    assert ("sent none" in text) == (given is None)


async def test_connect_reads_trame_token_when_no_token_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAME_TOKEN", "s3cret")
    async with (
        trame_async.serve("127.0.0.1", 0, token="s3cret") as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        assert client.connected


async def test_server_multicast_can_be_awaited_like_the_clients() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        server.multicast(INT, 1)  # a plain call, as ever
        await server.multicast(INT, 2)  # and awaitable, as client.multicast is
        assert [(await client.receive(timeout=5)).value for _ in range(2)] == [1, 2]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "-1"], "--port"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert"),
        (["--max-frame-size", "10"], "--max-frame-size"),
    ],
)
def test_every_bad_option_value_is_one_line_naming_the_option(argv: list[str], names: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trame_async", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("trame-serve:")]
    assert len(lines) == 1 and names in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert result.stdout == ""


def test_help_says_the_token_default_once() -> None:
    text = build_parser().format_help()
    start = text.index("--token TOKEN ")
    token_help = text[start : text.index("--allow-anonymous", start)]
    assert token_help.count("default") == 1


def test_a_loopback_server_shows_no_lan_address_and_prints_its_line_first() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trame_async", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:") and " lan " not in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err


async def test_a_disconnect_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trame_async.server")
    async with trame_async.serve("127.0.0.1", 0) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        client._proto.transport.abort()  # type: ignore[union-attr]
        for _ in range(200):
            if any("disconnected" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        await client.close()
    (line,) = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert line.count("connection") == 1, line  # "connection-lost (EOF or reset...)"
