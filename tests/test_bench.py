"""The benchmark scripts still run, end to end, on tiny settings.

Not timed tests: figures are printed by ``nox -s bench`` and read by people. What is checked here is
that each script starts its servers, drives real loopback traffic, stops every process it started,
writes its JSON, and that the properties that are not speed (zero loss, no subscriber cut, every
ping answered) hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trame_async

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

pytest.importorskip("uvloop")
pytest.importorskip("psutil")
pytest.importorskip("websockets")


def run_script(script: str, *args: str, out: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``bench/<script> args --json out``; return the JSON it wrote."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "|" in proc.stdout  # printed its table
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.mark.slow
def test_fanout_flood_and_paced_every_relay(tmp_path: Path) -> None:
    flood = run_script(
        "fanout.py",
        *("-S", "1", "5", "--frames", "3000", "--settle", "0.05", "--stall", "5"),
        *("--relays", "trame", "trame-raw", "trame-token", "floor-uvloop", "ws"),
        out=tmp_path / "flood.json",
    )
    assert len(flood["cells"]) == 10
    # Zero loss must not rest on the server pausing publishers: the publisher window is on.
    assert flood["lead"], flood["lead"]
    for cell in flood["cells"]:
        assert cell["loss"] == 0, cell
        assert cell["subscribers_cut"] == 0, cell
        assert cell["server_exit"] == 0, cell
    # Every trame cell is compared with every baseline that ran, at each S.
    assert {(r["relay"], r["baseline"]) for r in flood["ratios"]} >= {
        ("trame", "floor-uvloop"),
        ("trame", "ws"),
        ("trame-raw", "floor-uvloop"),
    }
    paced = run_script(
        "fanout.py",
        *("-S", "3", "--rate", "200", "--duration", "0.5", "--settle", "0.05"),
        *("--relays", "trame", "floor-uvloop"),
        out=tmp_path / "paced.json",
    )
    for row in paced["medians"]:
        assert row["loss_max"] == 0, row
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"] <= row["latency_ms"]["max"]


def test_codec_bench_covers_every_case(tmp_path: Path) -> None:
    data = run_script("codec.py", "--repeat", "1", out=tmp_path / "codec.json")
    text = json.dumps(data)
    for code in ("INT", "POS", "STR", "CMP"):
        assert f'"{code}"' in text


@pytest.mark.slow
def test_idle_bench_trame_and_floor(tmp_path: Path) -> None:
    data = run_script(
        "idle.py",
        *("-N", "200", "--heartbeat", "0.2", "--warmup", "0.5", "--window", "1"),
        out=tmp_path / "idle.json",
    )
    runs = {r["server"]: r for r in data["runs"]}
    assert set(runs) == {"trame", "floor"}
    for run in runs.values():
        assert run["connected"] == 200 and run["lost"] == 0, run
        assert run["pings_per_client_per_s"] > 0, run


@pytest.mark.slow
def test_isolation_bench_every_policy_and_bad_client(tmp_path: Path) -> None:
    data = run_script(
        "isolation.py",
        *("--subscribers", "3", "--rate", "200", "--duration", "0.4", "--payload", "1024"),
        *("--slow-timeout", "0.2", "--drain", "3", "--settle", "0.05"),
        *("--b-subscribers", "2", "--codes", "300", "--b-lead", "100", "--b-duration", "0.2"),
        out=tmp_path / "isolation.json",
    )
    runs = {(r["policy"], r["scenario"]): r for r in data["latency"]}
    assert set(runs) == {
        (policy, scenario)
        for policy in ("disconnect", "drop-oldest", "keep-latest")
        for scenario in ("baseline", "stuck", "trickle")
    }
    for (_, scenario), run in runs.items():
        # Healthy subscribers get every frame, late or not; the bad client is accounted for.
        assert run["lost"] == 0 and run["healthy_cut"] == 0, run
        assert run["latency_ms"]["samples"] == 3 * run["frames"], run
        assert run["p99_vs_baseline"] is not None, run
        assert run["server_exit"] == 0, run
        assert ("bad" in run) == (scenario != "baseline"), run
    runs_b = {(r["policy"], r["stuck"]): r for r in data["throughput"]}
    assert set(runs_b) == {(p, s) for p in ("keep-latest", "drop-oldest") for s in (False, True)}
    for run in runs_b.values():
        assert run["lost"] == 0 and run["subscribers_cut"] == 0, run
        assert run["frames"] > 0 and run["server_exit"] == 0, run
    assert {e["policy"] for e in data["throughput_ratios"]} == {"keep-latest", "drop-oldest"}


#: The groups benchmark on tiny settings: 2 scale cells, 2 fan-out cells, 2 join/leave runs.
GROUPS_TINY = (
    *("-N", "20", "40", "-k", "5", "-P", "2", "-S", "3", "--duration", "0.3"),
    *("--jl-clients", "1", "--jl-window", "4", "--jl-duration", "0.3"),
    *("--settle", "0.05", "--stall", "5"),
)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(trame_async.Kind, "JOIN"),
    reason="multicast groups (issue 10) are not in this trame_async yet",
)
def test_groups_bench_every_part(tmp_path: Path) -> None:
    data = run_script("groups.py", *GROUPS_TINY, out=tmp_path / "groups.json")
    assert [r["clients"] for r in data["scale_medians"]] == [20, 40]
    assert [(c["multicast"], c["groups"]) for c in data["scale"]] == [("group", 4), ("group", 8)]
    assert {c["multicast"] for c in data["fanout"]} == {"all", "group"}
    for cell in data["scale"] + data["fanout"]:
        # Every frame reaches every member of the sender's group, and nobody else.
        assert cell["frames"] > 0 and cell["loss"] == 0 and cell["stray"] == 0, cell
        assert cell["subscribers_cut"] == 0 and cell["server_exit"] == 0, cell
        assert not cell["unexpected_frames"] and cell["unsolicited_replies"] == 0, cell
    (ratio,) = data["fanout_ratios"]
    assert ratio["fanout"] == 3 and ratio["server_us_per_frame"] is not None, ratio
    runs = {r["groups"]: r for r in data["joins"]}
    assert set(runs) == {"new", "held"}
    for run in runs.values():
        assert run["ops"] > 0 and run["failed"] == 0 and run["unanswered"] == 0, run
        assert run["clients_cut"] == 0 and run["server_exit"] == 0, run


@pytest.mark.slow
def test_cluster_bench_every_part(tmp_path: Path) -> None:
    data = run_script(
        "cluster.py",
        *("-S", "4", "--workers-s", "4", "--duration", "0.3", "--latency-seconds", "0.3"),
        *("--group-clients", "20", "--rate", "200"),
        out=tmp_path / "cluster.json",
    )
    assert [(c["S"], c["nodes"]) for c in data["cost"]] == [(4, 1), (4, 2)]
    for cell in data["cost"] + data["workers"] + data["groups"]:
        assert cell["lost"] == 0, cell
    assert data["cost"][1]["frames_per_msg"] >= 1
    (latency,) = data["latency"]
    assert latency["cross_received"] == latency["frames"]
    assert [c["nodes"] for c in data["groups"]] == [1, 2]
