"""trame-top: its figures and drawing from fixed snapshots, then against a server under load."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from helpers import running
from proc_helpers import ROOT

import trame_async
from trame_async import INT
from trame_async.top import rates, render, sparkline

pytest.importorskip("rich")


def snap(t: float, frames: int, clients: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "time": t,
        "uptime": t,
        "loop_lag": 0.001,
        "loop_lag_max": 0.004,
        "server": {
            "clients": len(clients),
            "connections": len(clients),
            "groups": 1,
            "frames_in": frames,
            "deliveries": frames * 2,
            "bytes_relayed": frames * 80,
            "dropped_frames": 3,
            "slow_consumers": 1,
            "congested_clients": 0,
            "queued_bytes": 2048,
        },
        "clients": clients,
        "clients_total": len(clients),
    }


def client(cid: int, frames: int, rtt: float | None, queued: int) -> dict[str, Any]:
    return {
        "id": cid,
        "address": f"127.0.0.1:{5000 + cid}",
        "connected_since": 0.0,
        "rtt": rtt,
        "frames_in": frames,
        "bytes_in": frames * 40,
        "bytes_out": frames * 80,
        "queued_bytes": queued,
        "dropped": 0,
        "congested": False,
        "groups": ["lobby"] if cid == 2 else [],
    }


def test_rates_come_from_two_snapshots() -> None:
    a = snap(10.0, 100, [client(1, 50, 0.001, 0), client(2, 50, None, 0)])
    b = snap(
        12.0, 300, [client(1, 250, 0.002, 0), client(2, 50, None, 4096), client(3, 10, None, 0)]
    )
    r = rates(a, b)
    assert (r["frames_in"], r["deliveries"], r["bytes"]) == (100.0, 200.0, 8000.0)
    assert r["clients"][1] == (100.0, 8000.0)
    assert r["clients"][3][0] == 5.0  # new since the last snapshot: counted from 0
    assert rates(None, b)["frames_in"] == 0.0


def test_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 5, 10]) == " ▄█"
    assert sparkline([]) == ""
    assert len(sparkline(range(100), width=60)) == 60


@pytest.mark.parametrize(("sort", "first"), [("rate", 1), ("queue", 2), ("rtt", 1)])
def test_render_sorts_the_clients_table(sort: str, first: int) -> None:
    from rich.console import Console

    a = snap(10.0, 100, [client(1, 50, 0.001, 0), client(2, 50, None, 0)])
    b = snap(12.0, 300, [client(1, 250, 0.002, 0), client(2, 60, None, 4096)])
    console = Console(record=True, width=120)
    console.print(render(a, b, [100.0, 200.0], sort=sort))
    text = console.export_text()
    assert "frames in 100/s" in text and "deliveries 200/s" in text
    assert "loop lag 1.0 ms" in text and f"sorted by {sort}" in text
    rows = [line for line in text.splitlines() if "127.0.0.1:500" in line]
    assert rows[0].split()[1] == str(first), rows
    assert "lobby" in text


async def test_trame_top_once_against_a_server_under_load() -> None:
    from trame_async.metrics import serve_metrics

    pytest.importorskip("prometheus_client")
    async with running() as server:
        metrics = await serve_metrics(server, "127.0.0.1", 0)
        stop = asyncio.Event()

        async def publish(c: trame_async.Client) -> None:
            i = 0
            while not stop.is_set() and i < 100_000:  # bounded
                await c.multicast(INT, i)
                i += 1
                if i % 50 == 0:
                    await asyncio.sleep(0.005)  # paced: a steady load, not a flood

        try:
            async with (
                trame_async.connect("127.0.0.1", server.port) as a,
                trame_async.connect("127.0.0.1", server.port) as b,
            ):
                tasks = [asyncio.create_task(publish(c)) for c in (a, b)]
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "trame_async.top",
                    f"127.0.0.1:{metrics.port}",
                    "--once",
                    "--interval",
                    "0.3",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
                )
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                stop.set()
                await asyncio.gather(*tasks)
            text = out.decode()
            assert proc.returncode == 0, err.decode()
            assert "clients 2" in text
            for c in (a, b):
                assert any(
                    line.split()[1:2] == [str(c.id)]
                    for line in text.splitlines()
                    if "127.0.0.1:" in line
                ), text
            assert "frames in 0/s" not in text  # a rate was measured under load
        finally:
            metrics.close()
            await metrics.wait_closed()


async def test_trame_top_says_when_the_endpoint_is_unreachable(unused_tcp_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trame_async.top",
        f"127.0.0.1:{unused_tcp_port}",
        "--once",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert len(err.decode().strip().splitlines()) == 1 and "cannot read" in err.decode()
