"""trame-sub and trame-pub in subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest
from helpers import eventually, running
from proc_helpers import ROOT

import trame_async
from trame_async import INT, POS, STR, Position

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("TRAME_TOKEN", None)


async def tool(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trame_async.pubsub",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_trame_pub_sends_values_a_client_receives() -> None:
    async with running() as server, trame_async.connect("127.0.0.1", server.port) as client:
        address = f"127.0.0.1:{server.port}"
        assert (await tool("pub", address, "POS", "1.5", "-2"))[0] == 0
        assert (await tool("pub", address, "INT", "42"))[0] == 0
        assert (await tool("pub", address, "STR", "hello", "there"))[0] == 0
        assert (await tool("pub", address, "TMP", "21.5", "3", "--format", "<fh"))[0] == 0
        got = [await client.receive(timeout=5) for _ in range(4)]
        assert [m.value for m in got[:3]] == [Position(1.5, -2.0), 42, "hello there"]
        assert (got[3].trame.code, got[3].value) == ("TMP", (21.5, 3))


async def test_trame_pub_reads_json_lines_at_most_rate_per_second() -> None:
    async with running() as server, trame_async.connect("127.0.0.1", server.port) as client:
        await client.join("g")
        lines = b"".join(
            json.dumps({"trame": "INT", "value": i, "group": "g"}).encode() + b"\n"
            for i in range(5)
        )
        start = time.monotonic()
        rc, _, err = await tool("pub", f"127.0.0.1:{server.port}", "-", "--rate", "50", stdin=lines)
        assert rc == 0, err
        assert time.monotonic() - start >= 4 / 50  # 5 sends, 4 waits of 20 ms at least
        got = [await client.receive(timeout=5) for _ in range(5)]
        assert [(m.value, m.group) for m in got] == [(i, "g") for i in range(5)]


async def test_trame_sub_prints_json_lines_until_sigint() -> None:
    async with running() as server, trame_async.connect("127.0.0.1", server.port) as pub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trame_async.pubsub",
            "sub",
            f"127.0.0.1:{server.port}",
            "--json",
            "--group",
            "lobby",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=ENV,
        )
        try:
            await eventually(lambda: "lobby" in server.groups, 10.0, what="trame-sub joined")
            await pub.multicast(INT, 7)
            await pub.join("lobby")
            await pub.multicast(STR, "in the lobby", group="lobby")
            assert proc.stdout is not None
            first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
            second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
            assert (first["sender"], first["trame"], first["value"], first["group"]) == (
                pub.id,
                "INT",
                7,
                None,
            )
            assert (second["value"], second["group"]) == ("in the lobby", "lobby")
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "rc", "says"),
    [
        (["pub", "127.0.0.1:99999", "INT", "1"], 2, "--"),  # a bad port
        (["pub", "nohostport", "INT", "1"], 2, "HOST:PORT"),
        (["pub", "127.0.0.1:1", "XYZ", "1"], 2, "--format"),
    ],
)
async def test_bad_options_are_one_line_with_status_2(args: list[str], rc: int, says: str) -> None:
    code, _, err = await tool(*args)
    assert code == rc, err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err


async def test_a_wrong_token_is_one_line_with_status_1() -> None:
    async with running(token="s3cret") as server:
        code, _, err = await tool("pub", f"127.0.0.1:{server.port}", "INT", "1", "--token", "no")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "token" in err and "Traceback" not in err


async def test_help_shows_an_example() -> None:
    for command in ("sub", "pub"):
        code, out, _ = await tool(command, "--help")
        assert code == 0 and "example" in out
    assert POS  # the built-in trames the examples use
