"""The metrics endpoint: Prometheus text and the JSON snapshot over HTTP, from a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from helpers import eventually, running
from proc_helpers import ROOT

import trame_async
from trame_async import INT, POS, Position
from trame_async.metrics import serve_metrics

pytest.importorskip("prometheus_client")


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()

    return await asyncio.to_thread(fetch)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the exposition")


async def test_metrics_and_stats_json_report_what_happened() -> None:
    async with running() as server, trame_async.connect("127.0.0.1", server.port) as a:
        metrics = await serve_metrics(server, "127.0.0.1", 0)
        try:
            async with trame_async.connect("127.0.0.1", server.port) as b:
                await a.join("lobby")
                for i in range(5):
                    await a.multicast(INT, i)
                await a.multicast(POS, Position(1.0, 2.0), group="lobby")
                await b.multicast(INT, 9)
                for _ in range(5):
                    await b.receive(timeout=5)
                await a.receive(timeout=5)
                # 5 INT, 1 POS, a JOIN, and b's INT: every frame a client sends but PING/PONG.
                await eventually(lambda: server.frames_in >= 8, 5.0, what="eight frames in")
                status, text = await get(metrics.port, "/metrics")
                assert status == 200
                assert metric(text, "trame_clients") == 2
                assert metric(text, "trame_frames_in_total") == 8
                assert metric(text, "trame_groups") == 1
                assert 'trame_trame_frames_in_total{trame="INT"} 6.0' in text
                assert 'trame_trame_frames_in_total{trame="POS"} 1.0' in text
                assert "trame_heartbeat_rtt_seconds_bucket" in text
                assert "trame_loop_lag_seconds" in text
                status, body = await get(metrics.port, "/stats.json?sort=frames_in&limit=1")
                snap = json.loads(body)
                assert snap["server"]["clients"] == 2 and snap["clients_total"] == 2
                (top,) = snap["clients"]
                assert top["id"] == a.id and top["frames_in"] == 7 and top["groups"] == ["lobby"]
                assert set(top) >= {"address", "rtt", "bytes_in", "bytes_out", "queued_bytes"}
                assert snap["trames_in"]["INT"][0] == 6
            await eventually(lambda: len(server.clients) == 1, 5.0, what="b gone")
            _, text = await get(metrics.port, "/metrics")
            assert 'trame_disconnects_total{reason="goodbye"} 1.0' in text
            with pytest.raises(urllib.error.HTTPError) as info:
                await get(metrics.port, "/nowhere")
            assert info.value.code == 404
            info.value.close()  # it holds the response: close its socket now, not at GC
        finally:
            metrics.close()
            await metrics.wait_closed()


def test_trame_serve_metrics_in_a_subprocess_with_json_logs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trame_async",
            "--port",
            "0",
            "--metrics",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline()
        assert listening.startswith("listening on 127.0.0.1:"), listening
        port = int(listening.split(":")[1])
        metrics_line = proc.stdout.readline()
        assert metrics_line.startswith("metrics on http://127.0.0.1:"), metrics_line
        mport = int(metrics_line.rsplit(":", 1)[1].split("/")[0])

        async def visit() -> str:
            async with trame_async.connect("127.0.0.1", port) as client:
                await client.multicast(INT, 1)
                for _ in range(200):  # bounded poll: until the server counted the frame
                    _, text = await get(mport, "/metrics")
                    if metric(text, "trame_frames_in_total") >= 1:
                        return text
                    await asyncio.sleep(0.02)
            raise AssertionError("the frame was never counted")

        text = asyncio.run(visit())
        assert metric(text, "trame_connects_total") == 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.strip()]
    kinds = {e.get("event") for e in events}
    assert {"connect", "disconnect"} <= kinds, events
    (bye,) = [e for e in events if e.get("event") == "disconnect"]
    assert bye["reason"] == "goodbye" and isinstance(bye["client"], int)


def test_metrics_on_a_public_address_needs_a_token() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trame_async", "--port", "0", "--metrics", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "TRAME_TOKEN"},
    )
    assert result.returncode == 2
    assert "--metrics" in result.stderr and "token" in result.stderr


async def test_an_endpoint_with_a_token_refuses_requests_without_it() -> None:
    async with running() as server:
        metrics = await serve_metrics(server, "127.0.0.1", 0, token="s3cret")
        try:
            with pytest.raises(urllib.error.HTTPError) as info:
                await get(metrics.port, "/stats.json")
            assert info.value.code == 401
            info.value.close()

            def fetch(token: str) -> int:
                request = urllib.request.Request(f"http://127.0.0.1:{metrics.port}/stats.json")
                request.add_header("Authorization", f"Bearer {token}")
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return int(response.status)
                except urllib.error.HTTPError as err:
                    err.close()
                    return int(err.code)

            assert await asyncio.to_thread(fetch, "s3cret") == 200
            assert await asyncio.to_thread(fetch, "wrong") == 401
        finally:
            metrics.close()
            await metrics.wait_closed()
