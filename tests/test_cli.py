"""``trame-serve`` as a user runs it: ``python -m trame_async`` in a subprocess.

The server prints ``listening on HOST:PORT ...`` as its first stdout line; its log (stderr) goes to a
file that the tests read. Each test stops what it starts, killing it if a check failed.
"""

from __future__ import annotations

import asyncio
import logging
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
from trame_async.cli import TOKEN_ENV, _config, _frame_limits, build_parser

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None

TOKEN = "s3cret-Token-7f3a9c-never-logged"

_WITH_UVLOOP = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
_WITHOUT_UVLOOP = pytest.mark.skipif(uvloop is not None, reason="uvloop is installed")
#: --loop choice, and the loop class trame-serve must report at startup.
LOOPS = [
    pytest.param("asyncio", r"asyncio\.[\w.]+", id="asyncio"),
    pytest.param("uvloop", r"uvloop\.Loop", id="uvloop", marks=_WITH_UVLOOP),
    pytest.param("auto", r"uvloop\.Loop", id="auto-uvloop", marks=_WITH_UVLOOP),
    pytest.param("auto", r"asyncio\.[\w.]+", id="auto-asyncio", marks=_WITHOUT_UVLOOP),
]


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


@pytest.mark.parametrize(("loop_name", "loop_class"), LOOPS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serves_on_the_printed_port_logs_clients_and_exits_0_on_signal(
    tmp_path: Path, sig: signal.Signals, loop_name: str, loop_class: str
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
    loops = re.findall(r"INFO trame_async\.cli: event loop: (\S+)", text)
    assert len(loops) == 1 and re.fullmatch(loop_class, loops[0]), (loops, text)
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


# --- limits that depend on each other: adjusted with a warning, or refused, never silently -------


def _limits(argv: list[str]) -> tuple[int, int]:
    return _frame_limits(build_parser().parse_args(argv))


def test_defaults_that_do_not_fit_the_frame_size_are_adjusted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trame_async.cli")
    assert _limits([]) == (4 << 20, 4096)
    assert caplog.records == []
    assert _limits(["--max-frame-size", "8M"]) == (8 << 20, 4096)
    assert _limits(["--max-frame-size", "1000"]) == (4 << 20, 1000)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert "--max-queue-bytes raised" in warned[0] and "8388608" in warned[0]
    assert "--handshake-max-frame-size lowered" in warned[1] and "1000" in warned[1]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--max-frame-size", "2M", "--max-queue-bytes", "1M"], "--max-queue-bytes"),
        (["--max-frame-size", "4k", "--handshake-max-frame-size", "8k"], "--handshake-max"),
    ],
)
def test_explicit_limits_that_contradict_each_other_are_refused(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        _config(parser.parse_args(argv), parser, None)
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert names in message and "--max-frame-size" in message, message


def test_explicit_limits_that_fit_are_kept() -> None:
    argv = ["--max-frame-size", "64k", "--max-queue-bytes", "64k"]
    assert _limits([*argv, "--handshake-max-frame-size", "1k"]) == (64 << 10, 1 << 10)


@pytest.mark.parametrize(("text", "value"), [("off", None), ("0", None), ("64k", 64 << 10)])
def test_send_buffer_size_takes_off_for_the_os_default(text: str, value: int | None) -> None:
    assert build_parser().parse_args(["--send-buffer-size", text]).send_buffer_size == value


def test_send_buffer_size_default_is_the_server_default() -> None:
    args = build_parser().parse_args([])
    assert args.send_buffer_size == trame_async.ServerConfig().send_buffer_size


def test_invalid_settings_exit_2_with_the_reason_before_listening() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trame_async", "--port", "0", "--max-frame-size", "10"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    assert "--max-frame-size must be between 64" in result.stderr, result.stderr
    assert "listening on" not in result.stdout


def test_a_token_longer_than_the_handshake_limit_exits_2_naming_both_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trame_async", "--port", "0", "--handshake-max-frame-size", "128"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "TRAME_TOKEN": "t" * 200},
    )
    assert result.returncode == 2, result
    assert "--handshake-max-frame-size" in result.stderr and "--token" in result.stderr
    assert "listening on" not in result.stdout


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--flow-control", "pace"], "flow_control", "pace"),
        (["--max-handshaking", "off"], "max_handshaking", None),
        (["--max-total-queue-bytes", "1G"], "max_total_queue_bytes", 1 << 30),
        (["--slow-consumer-min-rate", "4k"], "slow_consumer_min_rate", 4096),
        (["--max-publisher-pause", "0.05"], "max_publisher_pause", 0.05),
    ],
)
def test_isolation_options_reach_the_config(argv: list[str], field: str, value: object) -> None:
    parser = build_parser()
    assert getattr(_config(parser.parse_args(argv), parser, None), field) == value
