"""``trame-serve`` as a user runs it: ``python -m trame_async`` in a subprocess.

The server prints ``listening on HOST:PORT ...`` as its first stdout line; its log (stderr) goes to a
file that the tests read. Each test stops what it starts, killing it if a check failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import eventually, log_text, spawn, stop_process, wait_listening

import trame_async
from trame_async import AuthenticationError, ConnectionClosed, DisconnectReason, ErrorCode
from trame_async.cli import TOKEN_ENV, build_parser

TOKEN = "s3cret-Token-7f3a9c-never-logged"


def _env_without_token() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    return env


def test_help_lists_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trame_async", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: trame-serve")
    options = {
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt[:2] == "--"
    }
    assert len(options) >= 15
    missing = sorted(opt for opt in options if opt not in result.stdout)
    assert missing == []


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> int:
    proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), 5)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serves_on_the_printed_port_logs_clients_and_exits_0_on_signal(
    tmp_path: Path, sig: signal.Signals, loop_name: str
) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as log_file:
        proc = await spawn(
            ["-m", "trame_async", "--port", "0", "--loop", loop_name], stderr=log_file
        )
    try:
        host, port = await wait_listening(proc)
        assert host == "127.0.0.1" and port != 0

        # The printed port is the real one: a client connects to it and gets its own echo.
        leaver = await trame_async.connect(host, port, echo=True, timeout=5)
        await leaver.multicast("INT", 42)
        assert (await leaver.receive(timeout=5)).value == 42
        await leaver.close()
        stayer = await trame_async.connect(host, port, timeout=5)
        try:
            await eventually(
                lambda: f"client {leaver.id} disconnected" in log_text(log), what="log line"
            )
            assert await _stop(proc, sig) == 0
            with pytest.raises(ConnectionClosed) as info:
                await stayer.receive(timeout=5)
            assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
        finally:
            await stayer.close()
    finally:
        await stop_process(proc)

    text = log_text(log)
    for client in (leaver, stayer):
        assert re.search(rf"client {client.id} connected from 127\.0\.0\.1:\d+", text), text
    assert re.search(rf"client {leaver.id} disconnected: goodbye\b", text), text
    assert re.search(rf"client {stayer.id} disconnected: server-shutdown\b", text), text
    assert "Traceback" not in text


async def test_refuses_a_non_loopback_address_without_a_token(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as log_file:
        proc = await spawn(
            ["-m", "trame_async", "--host", "0.0.0.0", "--port", "0"],
            stderr=log_file,
            env=_env_without_token(),
        )
    try:
        assert await asyncio.wait_for(proc.wait(), 10) == 2
    finally:
        await stop_process(proc)
    message = log_text(log)
    assert "--token" in message and "--allow-anonymous" in message
    assert "0.0.0.0" in message


async def test_allow_anonymous_starts_on_a_non_loopback_address() -> None:
    proc = await spawn(
        ["-m", "trame_async", "--host", "0.0.0.0", "--port", "0", "--allow-anonymous"],
        env=_env_without_token(),
    )
    try:
        host, port = await wait_listening(proc)
        assert host == "0.0.0.0" and port != 0
        assert await _stop(proc, signal.SIGTERM) == 0
    finally:
        await stop_process(proc)


async def test_token_from_the_environment_is_required_and_never_logged(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = _env_without_token()
    env[TOKEN_ENV] = TOKEN
    with log.open("wb") as log_file:
        proc = await spawn(
            ["-m", "trame_async", "--port", "0", "--log-level", "DEBUG"], stderr=log_file, env=env
        )
    stdout = b""
    try:
        host, port = await wait_listening(proc)

        with pytest.raises(AuthenticationError) as info:
            await trame_async.connect(host, port, timeout=5)
        assert info.value.reason is DisconnectReason.AUTH_FAILED
        assert info.value.peer_error_code is ErrorCode.AUTH_FAILED
        with pytest.raises(AuthenticationError):
            await trame_async.connect(host, port, token=TOKEN + "x", timeout=5)

        async with trame_async.connect(host, port, token=TOKEN, echo=True, timeout=5) as client:
            await client.multicast("STR", "in")
            assert (await client.receive(timeout=5)).value == "in"
        assert await _stop(proc, signal.SIGTERM) == 0
        assert proc.stdout is not None
        stdout = await proc.stdout.read()
    finally:
        await stop_process(proc)
    text = log_text(log)
    assert "disconnected" in text  # the log was written
    assert TOKEN not in text
    assert TOKEN.encode() not in stdout
