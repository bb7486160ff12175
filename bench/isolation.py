"""Isolation benchmark: what one bad client costs the healthy ones; prints tables.

No client can hurt the others: a recipient that stops reading should cost only itself, whatever the
slow-consumer policy. Each run starts a fresh trame_async server (bench/relays/trame_watch.py, which
reports every connect and disconnect, and ``server.stats()`` on request), then this process (on
uvloop) connects the clients. Figures are printed, never asserted; the goals below are what the
issue asks for.

**A. Latency of healthy subscribers** (for each ``--policies``): S (``--subscribers``, 20) real
trame_async clients take each frame in ``on_message``; one publisher sends ``--rate`` (100)
frames/s for ``--duration`` seconds, each carrying its sequence number, its send time and
``--payload`` bytes of padding (4 KiB: one stuck client then congests the server within a second,
instead of after megabytes of kernel buffers). Three runs per policy:

- ``baseline``: no bad client;
- ``stuck``: plus one raw client that completes the HELLO/WELCOME handshake by hand on a socket
  whose SO_RCVBUF is ``--bad-rcvbuf`` (4 KiB, set before connect), then never reads;
- ``trickle``: the same client, reading 1 byte per second once publishing starts.

Per run: healthy subscribers' latency (send to ``on_message``, same clock) p50/p99/max and the p99
ratio to the baseline run of the same policy (goal: within 2x); frames the healthy subscribers lost
(goal: 0) and healthy subscribers cut; how late the publisher ever was on its schedule (a publisher
the server stops reading from ends up waiting in ``multicast()``); and what happened to the bad
client, from the server's side: cut with which reason how long after the first frame was sent (it
stopped reading there), and the frames the policy dropped for it. The server runs with
``slow_consumer_timeout`` = ``--slow-timeout`` (1 s), other settings at their defaults.

**B. Relay throughput with a stuck client** (``--b-policies``: keep-latest and drop-oldest): a raw
publisher rotates through ``--codes`` (10,000) distinct trame codes the server never registered,
all of format ``<q``, as fast as it can for ``--b-duration`` seconds, at most ``--b-lead`` frames
ahead of its slowest subscriber (below the number of codes, so that keep-latest never has two
frames of one code to fold for a healthy subscriber); ``--b-subscribers`` (10) raw subscribers
count what they receive. Frames/s delivered to them, with one stuck client (as in A) and without
it; the ratio (goal: at least 0.5) and the server CPU per delivered frame. The stuck client stays
for the whole run: ``slow_consumer_timeout`` is ``--b-slow-timeout`` (off by default).

    python bench/isolation.py                          # A and B, about a minute
    python bench/isolation.py --parts a --policies disconnect --duration 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _util
import psutil
import uvloop
from fanout import Progress, Tally, TrameRawClient, close_all

import trame_async
from trame_async.wire import HEADER, Hello

HERE = Path(__file__).resolve().parent
now = time.monotonic  # the server subprocess stamps its events with the same clock

POLICIES = ("disconnect", "drop-oldest", "keep-latest")
SCENARIOS = ("baseline", "stuck", "trickle")
_WELCOME_SIZE = 27  # length 4 + kind 1 + magic 4 + version 1 + flags 1 + id 4 + 3 x u32 12
_WELCOME = 0x02
_MULTICAST = int(trame_async.Kind.MULTICAST)


# --- the server ---------------------------------------------------------------------------------


class WatchedServer:
    """bench/relays/trame_watch.py in a subprocess: its connect/disconnect events and stats."""

    def __init__(self, proc: asyncio.subprocess.Process, host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.events: list[dict[str, Any]] = []
        self._stats: asyncio.Future[dict[str, Any]] | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, config: dict[str, Any]) -> WatchedServer:
        cmd = [
            *_util.python(),
            str(HERE / "relays" / "trame_watch.py"),
            *("--loop", "uvloop", "--port", "0", "--config", json.dumps(config)),
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=_util.ROOT
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20.0)
            match = _util._LISTENING.search(line.decode())
            if match is None:
                raise RuntimeError(f"trame_watch.py did not start: {line!r}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return cls(proc, match.group(1), int(match.group(2)))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event["event"] == "stats":
                if self._stats is not None and not self._stats.done():
                    self._stats.set_result(event)
            else:
                self.events.append(event)

    async def stats(self) -> dict[str, Any]:
        """The server's stats() and its connected clients, now."""
        assert self.proc.stdin is not None
        self._stats = asyncio.get_running_loop().create_future()
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        return await asyncio.wait_for(self._stats, 10.0)

    def disconnect_of(self, port: int, before: float) -> dict[str, Any] | None:
        """The disconnect of the client at ``port``, if it came before ``before`` (monotonic)."""
        for event in self.events:
            if event["event"] == "disconnect" and event["port"] == port and event["t"] < before:
                return event
        return None

    async def stop(self) -> int:
        """Close stdin (the server shuts down), SIGKILL after 10 s; return the exit status."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            status = await asyncio.wait_for(self.proc.wait(), 10.0)
        except TimeoutError:
            self.proc.kill()
            status = await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._reader, 1.0)
        return status


# --- the bad client -------------------------------------------------------------------------------


class BadClient:
    """A raw socket with a small receive buffer: the handshake by hand, then (almost) no reads.

    ``trickle`` reads 1 byte per second from :meth:`start_reading` on; otherwise it never reads.
    """

    def __init__(self, sock: socket.socket, trickle: bool) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.trickle = trickle
        self.bytes_read = 0
        self.ended: float | None = None  # when this side saw the connection end (trickle only)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, host: str, port: int, rcvbuf: int, trickle: bool) -> BadClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Before connect(): the window scale is agreed in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10.0)
            await loop.sock_sendall(sock, Hello(1, 0, b"").encode())
            welcome = b""
            while len(welcome) < _WELCOME_SIZE:
                chunk = await asyncio.wait_for(
                    loop.sock_recv(sock, _WELCOME_SIZE - len(welcome)), 10.0
                )
                if not chunk:
                    raise ConnectionError("server closed the connection during the handshake")
                welcome += chunk
            if welcome[4] != _WELCOME:
                raise ConnectionError(f"expected WELCOME, got {welcome!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, trickle)

    def start_reading(self) -> None:
        if self.trickle:
            self._task = asyncio.get_running_loop().create_task(self._trickle())

    async def _trickle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            try:
                data = await loop.sock_recv(self.sock, 1)
            except OSError:
                data = b""
            if not data:
                self.ended = now()
                return
            self.bytes_read += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()


# --- A: latency of healthy subscribers ----------------------------------------------------------


class Healthy:
    """A real trame_async client counting and timing the frames it gets in ``on_message``."""

    def __init__(self, latencies: list[float]) -> None:
        self.latencies = latencies
        self.received = 0
        self.client: trame_async.Client | None = None

    def on_message(self, msg: trame_async.Message) -> None:
        self.latencies.append(now() - msg.value[1])
        self.received += 1

    async def open(self, host: str, port: int) -> Healthy:
        self.client = await trame_async.connect(
            host, port, timeout=10.0, on_message=self.on_message
        )
        return self

    def cut(self) -> bool:
        return self.client is None or self.client.closed

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def server_config(policy: str, timeout: float | None, args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "slow_consumer_policy": policy,
        "slow_consumer_timeout": timeout,
        "drain_timeout": 0.5,  # shutdown: do not wait 5 s for a stuck client
    }
    if args.max_queue_bytes is not None:
        config["max_queue_bytes"] = args.max_queue_bytes
        # The budget must hold one frame: a small budget brings the frame limit down with it.
        config["max_frame_size"] = min(1 << 20, args.max_queue_bytes)
        config["handshake_max_frame_size"] = min(4096, args.max_queue_bytes)
    return config


async def latency_run(
    policy: str, scenario: str, iso: trame_async.Trame, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of A: S healthy subscribers, maybe one bad client, a paced publisher."""
    server = await WatchedServer.start(server_config(policy, args.slow_timeout, args))
    latencies: list[float] = []
    healthy: list[Healthy] = []
    bad: BadClient | None = None
    pub: trame_async.Client | None = None
    try:
        healthy = list(
            await asyncio.gather(
                *(
                    Healthy(latencies).open(server.host, server.port)
                    for _ in range(args.subscribers)
                )
            )
        )
        if scenario != "baseline":
            bad = await BadClient.connect(
                server.host, server.port, args.bad_rcvbuf, trickle=scenario == "trickle"
            )
        pub = await trame_async.connect(server.host, server.port, timeout=10.0)
        await asyncio.sleep(args.settle)
        pad = bytes(args.payload)
        frames = max(1, round(args.rate * args.duration))
        late = 0.0
        t0 = now()
        if bad is not None:
            bad.start_reading()
        for seq in range(frames):
            due = t0 + seq / args.rate
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = now()
            late = max(late, sent - due)
            await pub.multicast(iso, (seq, sent, pad))
        t_last = now()
        # Wait for every healthy subscriber to have every frame (or for --drain seconds).
        while now() - t_last < args.drain and any(h.received < frames for h in healthy):
            await asyncio.sleep(0.02)
        waited = now() - t_last
        stats = await server.stats()
        healthy_cut = sum(1 for h in healthy if h.cut())
    finally:
        await close_all([*healthy, *([bad] if bad else []), *([pub] if pub else [])])
        status = await server.stop()
    received = sum(h.received for h in healthy)
    lat = sorted(latencies)
    run: dict[str, Any] = {
        "policy": policy,
        "scenario": scenario,
        "subscribers": args.subscribers,
        "frames": frames,
        "received": received,
        "lost": args.subscribers * frames - received,
        "healthy_cut": healthy_cut,
        "latency_ms": _percentiles(lat),
        "publisher_late_max_ms": 1e3 * late,
        "drain_wait_s": waited,
        "server_stats": stats["stats"],
        "server_exit": status,
    }
    if bad is not None:
        run["bad"] = bad_fate(server, stats, bad, t0)
    return run


def bad_fate(
    server: WatchedServer, stats: dict[str, Any], bad: BadClient, t0: float
) -> dict[str, Any]:
    """What the server did to the bad client: cut (why, when), or what it dropped for it."""
    fate: dict[str, Any] = {"port": bad.port, "bytes_read": bad.bytes_read}
    event = server.disconnect_of(bad.port, before=stats["t"])  # not the end of the run
    if event is not None:
        fate.update(
            cut=True, reason=event["reason"], after_s=event["t"] - t0, dropped=event["dropped"]
        )
    else:
        mine = [c for c in stats["clients"] if c["port"] == bad.port]
        fate.update(
            cut=False,
            dropped=mine[0]["dropped"] if mine else None,
            queued_bytes=mine[0]["queued_bytes"] if mine else None,
        )
    if bad.ended is not None:
        fate["seen_end_after_s"] = bad.ended - t0
    return fate


def _percentiles(lat: Sequence[float]) -> dict[str, float] | None:
    if not lat:
        return None
    return {
        "p50": 1e3 * lat[len(lat) // 2],
        "p99": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max": 1e3 * lat[-1],
        "samples": len(lat),
    }


def fate_text(fate: dict[str, Any] | None) -> str:
    if fate is None:
        return "-"
    dropped = fate.get("dropped")
    drops = f", {dropped:,} frames dropped" if dropped else ""
    if fate["cut"]:
        return f"cut ({fate['reason']}) {fate['after_s']:.2f} s in{drops}"
    queued = fate.get("queued_bytes")
    held = f", {queued / 1024:,.0f} KiB queued" if queued is not None else ""
    return f"not cut{drops or ', nothing dropped'}{held}"


# --- B: relay throughput with a stuck client ------------------------------------------------------

_Q = struct.Struct("<q")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def codes(n: int) -> list[str]:
    """``n`` distinct 3-character codes, none of them registered here (nor built in)."""
    base = len(_ALPHABET)
    taken = set(trame_async.registered())
    out: list[str] = []
    for i in range(base**3):
        code = "".join(_ALPHABET[i // base**k % base] for k in (2, 1, 0))
        if code not in taken:
            out.append(code)
            if len(out) == n:
                return out
    raise ValueError(f"at most {len(out)} codes")


def frame_heads(n: int) -> list[bytes]:
    """The constant part of a MULTICAST of each code, format ``<q``: length, kind, code, format."""
    return [
        HEADER.pack(1 + 3 + 1 + 2 + _Q.size, _MULTICAST) + code.encode() + b"\x02<q"
        for code in codes(n)
    ]


class FloodPublisher(TrameRawClient):
    """The raw trame client of bench/fanout.py, writing batches of hand-built frames."""

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            raise ConnectionError("publisher lost its connection")
        transport.write(data)
        drain = self._drain
        if drain is not None and not drain.done():
            await drain


async def flood(
    pub: FloodPublisher, tally: Tally, heads: list[bytes], args: argparse.Namespace
) -> None:
    """Send batches of 64 frames for --b-duration s, at most --b-lead ahead of every subscriber."""
    n, lead, batch = len(heads), args.b_lead, 64
    pack = _Q.pack
    seq = 0
    tally.first_send = time.perf_counter()
    stop = tally.first_send + args.b_duration
    try:
        while time.perf_counter() < stop:
            await pub.write(b"".join(heads[i % n] + pack(i) for i in range(seq, seq + batch)))
            seq += batch
            tally.sent = seq
            if tally.lead_exceeded(lead):
                await tally.wait_lead(lead)
            else:
                await asyncio.sleep(0)
    finally:
        tally.expected = args.b_subscribers * tally.sent
        if tally.total >= tally.expected:
            tally.done.set()


async def throughput_run(
    policy: str, stuck: bool, heads: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """One run of B: raw subscribers, maybe one stuck client, a flooding publisher."""
    server = await WatchedServer.start(server_config(policy, args.b_slow_timeout, args))
    loop = asyncio.get_running_loop()
    tally = Tally(latency=False)
    subs: list[TrameRawClient] = []
    bad: BadClient | None = None
    pub: FloodPublisher | None = None
    host, port = server.host, server.port
    try:
        for _ in range(args.b_subscribers):
            _, sub = await loop.create_connection(
                lambda: TrameRawClient(Progress(tally), host, port), host, port
            )
            subs.append(sub)
        if stuck:
            bad = await BadClient.connect(host, port, args.bad_rcvbuf, trickle=False)
        _, pub = await loop.create_connection(lambda: FloodPublisher(tally, host, port), host, port)
        for client in [*subs, pub]:
            await asyncio.wait_for(asyncio.shield(client.ready), 10.0)
        await asyncio.sleep(args.settle)
        proc = psutil.Process(server.proc.pid)
        cpu0 = proc.cpu_times()
        t0 = now()
        sender = loop.create_task(flood(pub, tally, heads, args))
        last_total, last_change = -1, time.perf_counter()
        while not (sender.done() and tally.done.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tally.done.wait()), 0.2)
            t = time.perf_counter()
            if tally.total != last_total:
                last_total, last_change = tally.total, t
            elif sender.done() and t - last_change > args.stall:
                break
        await sender  # raises if the publisher failed
        cpu1 = proc.cpu_times()
        stats = await server.stats()
        cut = sum(1 for s in subs if s.ended())
    finally:
        await close_all([*subs, *([bad] if bad else []), *([pub] if pub else [])])
        status = await server.stop()
    span = tally.last - tally.first_send if tally.total else 0.0
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    run: dict[str, Any] = {
        "policy": policy,
        "stuck": stuck,
        "subscribers": args.b_subscribers,
        "codes": len(heads),
        "frames": tally.sent,
        "received": tally.total,
        "lost": args.b_subscribers * tally.sent - tally.total,
        "subscribers_cut": cut,
        "delivered_per_s": tally.total / span if span > 0 else 0.0,
        "server_cpu_s": cpu,
        "server_us_per_frame": 1e6 * cpu / tally.total if tally.total else None,
        "server_stats": stats["stats"],
        "server_exit": status,
    }
    if bad is not None:
        run["bad"] = bad_fate(server, stats, bad, t0)
    return run


# --- main -----------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    iso = trame_async.register("ISO", f"<qd{args.payload}s")
    out: dict[str, Any] = {"latency": [], "throughput": []}
    if "a" in args.parts:
        for policy in args.policies:
            for scenario in args.scenarios:
                log(f"A {policy} {scenario}")
                run = await latency_run(policy, scenario, iso, args)
                lat = run["latency_ms"] or {}
                log(
                    f"    p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms, "
                    f"lost {run['lost']}, bad client: {fate_text(run.get('bad'))}"
                )
                out["latency"].append(run)
    if "b" in args.parts:
        heads = frame_heads(args.codes)
        for policy in args.b_policies:
            for stuck in (False, True):
                log(f"B {policy} {'with' if stuck else 'without'} a stuck client")
                run = await throughput_run(policy, stuck, heads, args)
                log(
                    f"    {run['delivered_per_s']:,.0f} frames/s, lost {run['lost']}, "
                    f"bad client: {fate_text(run.get('bad'))}"
                )
                out["throughput"].append(run)
    return out


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def latency_ratios(runs: list[dict[str, Any]]) -> None:
    """Add each run's p99 / the p99 of the baseline run of its policy."""
    base = {r["policy"]: r for r in runs if r["scenario"] == "baseline"}
    for run in runs:
        other = base.get(run["policy"])
        mine = run["latency_ms"]
        theirs = other["latency_ms"] if other else None
        run["p99_vs_baseline"] = mine["p99"] / theirs["p99"] if mine and theirs else None


def throughput_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Delivered/s with the stuck client / without it, per policy."""
    out = []
    for policy in dict.fromkeys(r["policy"] for r in runs):
        without = [r for r in runs if r["policy"] == policy and not r["stuck"]]
        with_ = [r for r in runs if r["policy"] == policy and r["stuck"]]
        if without and with_ and without[0]["delivered_per_s"]:
            out.append(
                {
                    "policy": policy,
                    "delivered_per_s": with_[0]["delivered_per_s"] / without[0]["delivered_per_s"],
                    "server_us_per_frame": _ratio(
                        with_[0]["server_us_per_frame"], without[0]["server_us_per_frame"]
                    ),
                }
            )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(data: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    if data["latency"]:
        lines += [
            f"## A. Healthy subscribers' latency: S = {args.subscribers} real clients, "
            f"{args.rate:g} frames/s for {args.duration:g} s, {args.payload:,}-byte payload",
            "",
            f"Server: slow_consumer_timeout = {args.slow_timeout:g} s, max_queue_bytes = "
            f"{_queue_text(args)}, other settings default. Bad client: SO_RCVBUF "
            f"{args.bad_rcvbuf:,} bytes; stuck never reads, trickle reads 1 byte/s. "
            "Goals: p99 within 2x the baseline of the same policy, 0 lost.",
            "",
        ]
        rows = [
            [
                r["policy"],
                r["scenario"],
                (r["latency_ms"] or {}).get("p50"),
                (r["latency_ms"] or {}).get("p99"),
                r["p99_vs_baseline"],
                (r["latency_ms"] or {}).get("max"),
                r["lost"],
                r["healthy_cut"],
                r["publisher_late_max_ms"],
                fate_text(r.get("bad")),
            ]
            for r in data["latency"]
        ]
        headers = [
            "policy",
            "bad client",
            "p50 ms",
            "p99 ms",
            "p99 / baseline",
            "max ms",
            "lost",
            "healthy cut",
            "pub late max ms",
            "what happened to the bad client (time since the first frame)",
        ]
        lines.append(_util.table(headers, rows))
    if data["throughput"]:
        if lines:
            lines.append("")
        timeout = "off" if args.b_slow_timeout is None else f"{args.b_slow_timeout:g} s"
        lines += [
            f"## B. Relay throughput with a stuck client: {args.codes:,} distinct unregistered "
            f"codes (format <q), S = {args.b_subscribers} raw subscribers, "
            f"{args.b_duration:g} s flood",
            "",
            f"Publisher at most {args.b_lead:,} frames ahead of its slowest subscriber; "
            f"slow_consumer_timeout {timeout}, max_queue_bytes = {_queue_text(args)}.",
            "",
        ]
        rows = [
            [
                r["policy"],
                "stuck" if r["stuck"] else "none",
                r["frames"],
                r["delivered_per_s"],
                r["lost"],
                r["subscribers_cut"],
                r["server_us_per_frame"],
                fate_text(r.get("bad")),
            ]
            for r in data["throughput"]
        ]
        headers = [
            "policy",
            "bad client",
            "M",
            "delivered/s",
            "lost",
            "subs cut",
            "srv µs/frame",
            "what happened to the bad client",
        ]
        lines.append(_util.table(headers, rows))
        if data["throughput_ratios"]:
            lines += [
                "",
                "With the stuck client / without it (goal for delivered/s: at least 0.5):",
                "",
                _util.table(
                    ["policy", "delivered/s", "srv µs/frame"],
                    [
                        [e["policy"], e["delivered_per_s"], e["server_us_per_frame"]]
                        for e in data["throughput_ratios"]
                    ],
                ),
            ]
    return "\n".join(lines)


def _queue_text(args: argparse.Namespace) -> str:
    if args.max_queue_bytes is None:
        return "default"
    return f"{args.max_queue_bytes:,} bytes"


def _seconds_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", choices=("a", "b"), default=["a", "b"])
    p.add_argument("--settle", type=float, default=0.3, help="seconds between connect and publish")
    p.add_argument(
        "--bad-rcvbuf", type=int, default=4096, help="SO_RCVBUF of the bad client, bytes"
    )
    p.add_argument(
        "--max-queue-bytes", type=int, default=None, help="the server's budget (default: its own)"
    )
    a = p.add_argument_group("A: latency")
    a.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    a.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    a.add_argument("--subscribers", "-S", type=int, default=20, help="healthy subscribers")
    a.add_argument("--rate", type=float, default=100.0, help="frames/s")
    a.add_argument("--duration", type=float, default=3.0, help="seconds of publishing per run")
    a.add_argument("--payload", type=int, default=4096, help="bytes of padding per frame")
    a.add_argument(
        "--slow-timeout",
        type=float,
        default=1.0,
        help="the server's slow_consumer_timeout, seconds",
    )
    a.add_argument(
        "--drain", type=float, default=5.0, help="seconds to wait for the last frames after sending"
    )
    b = p.add_argument_group("B: throughput")
    b.add_argument(
        "--b-policies", nargs="+", choices=POLICIES, default=["keep-latest", "drop-oldest"]
    )
    b.add_argument("--b-subscribers", type=int, default=10, help="healthy raw subscribers")
    b.add_argument("--codes", type=int, default=10_000, help="distinct trame codes")
    b.add_argument("--b-duration", type=float, default=2.0, help="seconds of flooding per run")
    b.add_argument(
        "--b-lead",
        type=int,
        default=2_000,
        metavar="W",
        help="publisher window: most frames ahead of the slowest subscriber",
    )
    b.add_argument(
        "--b-slow-timeout",
        type=_seconds_or_none,
        default=None,
        help="the server's slow_consumer_timeout in B, seconds (default: off)",
    )
    b.add_argument(
        "--stall", type=float, default=3.0, help="give up when nothing arrives this long"
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _util.raise_nofile()
    meta = _util.metadata()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        data = runner.run(run_all(args))
    latency_ratios(data["latency"])
    data["throughput_ratios"] = throughput_ratios(data["throughput"])
    print(report(data, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        data = {"meta": _util.finish_metadata(meta), "settings": settings, **data}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
