"""Idle benchmark: N connected, silent trame_async clients with a 1 s heartbeat.

The server runs in its own process (``python -m trame_async --port 0 --heartbeat-interval 1
--heartbeat-timeout 2 --loop uvloop --log-level WARNING``); the baseline of the same run,
``floor``, is bench/relays/idle_floor.py: the least a Python server on uvloop does to keep the same
clients alive (WELCOME, one PING per client per interval, a deadline per client, nothing else). ``--workers`` load processes (this
script with ``--worker``) open N/workers minimal clients each: a Protocol that sends HELLO and
answers every PING with a PONG, nothing else. After all are connected and a warm-up, it measures:

- server RSS per connection: (RSS with N clients - RSS before any client) / N;
- server CPU % over ``--window`` seconds (psutil cpu_times, user+system);
- pings answered per client per second (about 1 when the heartbeat keeps up) and connections lost.

    python bench/idle.py                 # N = 10,000, trame_async then the floor
    python bench/idle.py -N 2000 --servers trame --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _util
import psutil

HERE = Path(__file__).resolve().parent

# --- the load side (--worker) ---------------------------------------------------------------------

_U32 = struct.Struct(">I")


class IdleClient(asyncio.Protocol):
    """HELLO, wait for WELCOME, answer PINGs. Bulk parsing over a bytearray."""

    def __init__(self, stats: dict[str, int], hello: bytes, pong: Any) -> None:
        self.stats = stats
        self.hello = hello
        self.pong = pong
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.hello)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        transport = self.transport
        with memoryview(buf) as view:
            while end - pos >= 5:
                stop = pos + 4 + _U32.unpack_from(view, pos)[0]
                if stop > end:
                    break
                kind = view[pos + 4]
                if kind == 0x03 and transport is not None:  # PING
                    transport.write(self.pong(_U32.unpack_from(view, pos + 5)[0]))
                    self.stats["pings"] += 1
                elif kind == 0x02 and not self.welcome.done():  # WELCOME
                    self.welcome.set_result(None)
                pos = stop
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(f"lost before WELCOME: {exc}"))
            self.welcome.exception()
        else:
            self.stats["lost"] += 1


async def worker(host: str, port: int, count: int, lifetime: float) -> None:
    """Open ``count`` clients, say so on stdout, answer pings until SIGTERM (or ``lifetime``).

    SIGUSR1 prints the counters (pings answered, connections lost) as a JSON line.
    """
    from trame_async.wire import Hello, pong

    hello = Hello(1, 0, b"").encode()
    loop = asyncio.get_running_loop()
    stats = {"pings": 0, "lost": 0}
    clients: list[IdleClient] = []
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(stats), flush=True))
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: IdleClient(stats, hello, pong), host, port), 30.0
            )
            clients.append(proto)
            await asyncio.wait_for(asyncio.shield(proto.welcome), 30.0)

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        print(
            json.dumps(
                {
                    "connected": count - len(errors),
                    "errors": len(errors),
                    "first_error": repr(errors[0]) if errors else None,
                    "seconds": time.perf_counter() - t0,
                }
            ),
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), lifetime)
    finally:
        for proto in clients:
            if proto.transport is not None:
                proto.transport.abort()
        await asyncio.sleep(0)


def run_worker(args: argparse.Namespace) -> int:
    _util.raise_nofile()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(worker(args.host, args.port, args.count, args.lifetime))
    return 0


# --- the orchestrator -----------------------------------------------------------------------------


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Read one JSON line from ``proc``'s stdout within ``timeout`` seconds."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"load process {proc.pid} said nothing within {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"load process {proc.pid} exited with status {proc.wait(5)}")
    result: dict[str, Any] = json.loads(line)
    return result


def counters(workers: list[subprocess.Popen[str]]) -> dict[str, int]:
    """Ask every load process for its counters (SIGUSR1); return their sums."""
    for w in workers:
        w.send_signal(signal.SIGUSR1)
    lines = [read_json_line(w, 30.0) for w in workers]
    return {key: sum(line[key] for line in lines) for key in ("pings", "lost")}


def server_command(name: str, heartbeat: float) -> list[str]:
    """The command line of idle server ``name`` ("trame" or "floor"), on uvloop."""
    beat = ["--heartbeat-interval", str(heartbeat), "--heartbeat-timeout", str(2 * heartbeat)]
    if name == "floor":
        script = HERE / "relays" / "idle_floor.py"
        return [*_util.python(), str(script), "--loop", "uvloop", "--port", "0", *beat]
    return [
        *_util.python(),
        "-m",
        "trame_async",
        "--port",
        "0",
        *beat,
        "--loop",
        "uvloop",
        "--log-level",
        "WARNING",
    ]


def run(args: argparse.Namespace, name: str) -> dict[str, Any]:
    limit = _util.raise_nofile()
    need = args.clients + 100
    if limit < need:
        raise SystemExit(
            f"RLIMIT_NOFILE is {limit}: not enough for {args.clients} connections in the server"
        )
    cmd = server_command(name, args.heartbeat)
    # cwd: not the checkout's root, where "-m trame_async" would import ./trame_async before
    # PYTHONPATH (the benchmarks may measure another copy of the package).
    server, host, port = _util.start_listening(cmd, cwd=HERE)
    workers: list[subprocess.Popen[str]] = []
    try:
        proc = psutil.Process(server.pid)
        time.sleep(1.0)
        rss0 = proc.memory_info().rss
        share = [
            args.clients // args.workers + (i < args.clients % args.workers)
            for i in range(args.workers)
        ]
        t0 = time.perf_counter()
        lifetime = args.warmup + args.window + 120
        for count in share:
            workers.append(
                subprocess.Popen(
                    [
                        *_util.python(),
                        str(HERE / "idle.py"),
                        "--worker",
                        "--host",
                        host,
                        "--port",
                        str(port),
                        "--count",
                        str(count),
                        "--lifetime",
                        str(lifetime),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        hello = [read_json_line(w, 120.0) for w in workers]
        connect_s = time.perf_counter() - t0
        connected = sum(h["connected"] for h in hello)
        if connected < args.clients:
            errors = [h["first_error"] for h in hello if h["first_error"]]
            print(
                f"warning: {args.clients - connected} clients failed to connect: {errors[:1]}",
                file=sys.stderr,
            )
        time.sleep(args.warmup)
        rss1 = proc.memory_info().rss
        fds = proc.num_fds()
        before = counters(workers)
        cpu0 = proc.cpu_times()
        w0 = time.perf_counter()
        time.sleep(args.window)
        cpu1 = proc.cpu_times()
        window = time.perf_counter() - w0
        after = counters(workers)
        rss2 = proc.memory_info().rss
        if args.py_spy and name == "trame":
            # After the measurement window, so that the profiler's cost is not in the figures.
            profile(server.pid, args.py_spy, args.window)
    finally:
        for w in workers:
            _util.stop_process(w)
        _util.stop_process(server)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "server": name,
        "clients": args.clients,
        "connected": connected,
        "lost": after["lost"],
        "workers": args.workers,
        "heartbeat_s": args.heartbeat,
        "connect_s": connect_s,
        "server_fds": fds,
        "rss_before_mib": rss0 / (1 << 20),
        "rss_with_clients_mib": rss1 / (1 << 20),
        "rss_end_mib": rss2 / (1 << 20),
        "rss_per_connection_kib": (rss1 - rss0) / max(connected, 1) / 1024,
        "server_cpu_pct": 100 * cpu / window,
        "server_cpu_s": cpu,
        "window_s": window,
        "pings_per_client_per_s": (after["pings"] - before["pings"]) / max(connected, 1) / window,
    }


def profile(pid: int, out: str, seconds: float) -> None:
    """Record ``seconds`` of py-spy samples (raw format) of ``pid`` to ``out``."""
    subprocess.run(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--duration",
            str(max(1, round(seconds))),
            "--format",
            "raw",
            "-o",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=seconds + 60,
        check=False,
    )


_COLUMNS = (
    ("connected", "clients"),
    ("lost", "lost"),
    ("connect_s", "connect s"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_with_clients_mib", "RSS with clients MiB"),
    ("rss_per_connection_kib", "RSS / connection KiB"),
    ("server_cpu_pct", "server CPU %"),
    ("pings_per_client_per_s", "pings / client / s"),
)


def report(results: list[dict[str, Any]], heartbeat: float) -> str:
    """The table of every server measured, then trame_async / floor when both ran."""
    clients = max(r["connected"] for r in results)
    lines = [f"## Idle: {clients:,} clients, heartbeat {heartbeat:g} s, servers on uvloop", ""]
    lines.append(
        _util.table(
            ["server", *(title for _, title in _COLUMNS)],
            [[r["server"], *(r[key] for key, _ in _COLUMNS)] for r in results],
        )
    )
    by_name = {r["server"]: r for r in results}
    if "trame" in by_name and "floor" in by_name:
        trame, floor = by_name["trame"], by_name["floor"]
        lines += ["", "## trame_async / idle floor, same run (<1 is cheaper)", ""]
        keys = ("rss_per_connection_kib", "server_cpu_pct")
        lines.append(
            _util.table(
                ["RSS / connection", "server CPU %"],
                [[trame[k] / floor[k] if floor[k] else None for k in keys]],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-N", "--clients", type=int, default=10_000, help="idle clients")
    p.add_argument("--workers", type=int, default=2, help="load processes")
    p.add_argument("--heartbeat", type=float, default=1.0, help="server heartbeat interval, s")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the last connect")
    p.add_argument("--window", type=float, default=10.0, help="seconds of CPU measurement")
    p.add_argument(
        "--servers",
        nargs="+",
        choices=("trame", "floor"),
        default=["trame", "floor"],
        help="servers to measure, one after the other (ratios need both)",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    p.add_argument(
        "--py-spy",
        metavar="FILE",
        help="after the CPU window, record the server with py-spy for as long (raw format)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lifetime", type=float, default=300.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    meta = _util.metadata()
    results = [run(args, name) for name in args.servers]
    print(report(results, args.heartbeat))
    if args.json:
        data: dict[str, Any] = {"meta": _util.finish_metadata(meta), "runs": results}
        data.update(next((r for r in results if r["server"] == "trame"), results[0]))
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
