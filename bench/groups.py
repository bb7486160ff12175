"""Multicast groups benchmark (issue 10): what a group multicast and a join cost the server.

Each run starts a fresh trame_async server (bench/relays/trame.py: default ServerConfig, 20 s
heartbeat, uvloop) in its own process; this process (on uvloop) holds every client. The clients
are minimal raw Protocols like bench/fanout.py's ``trame-raw`` ones: they speak the groups frames
of the design (JOIN, LEAVE, GROUP_MULTICAST, REPLY; see docs/protocol.md) by hand and count the
RELAY and GROUP_RELAY frames they receive in bulk, so that the load process stays cheap. The
publishers send fanout.py's 24-byte ``<Qdd`` trame as fast as flow control allows, with fanout.py's
windows (``--lead``, ``--window``). Figures are printed, never asserted; the goals are issue 10's.

**1. Scale** (``-N``, default 200, 500, 1000, 2000): N clients in N/k groups of k (``-k``, 10),
each client in one group; ``-P`` (4) publishers, each an extra member of its own group, the groups
spread over the range of groups (not the first ones created). A publisher's multicast reaches the
k members of its group; the other clients sit idle in theirs. Server CPU per delivered frame at
each N and its ratio to the first N (goal: flat within 20 %, the cost is O(k), not O(N)). "stray"
counts frames that reached a client outside the publisher's group (must be 0).

**2. Group vs all-clients multicast at the same fan-out** (``-S``, 10): S subscribers and a
publisher all in one group, the publisher sending GROUP_MULTICAST, against S subscribers and a
publisher in no group, the publisher sending the all-clients MULTICAST; each on a fresh server,
taking turns. Server CPU µs per delivered frame and delivered/s of both and their ratio (goal: a
group multicast costs at most 1.2x per delivered frame). A GROUP_RELAY is 4 bytes longer than a
RELAY (45 and 41 bytes here).

**3. Join/leave throughput**: ``--jl-clients`` (2) clients, each cycling JOIN + LEAVE on
``--jl-window`` (32) slots: a slot has its own group name and one request in flight, and its next
request goes out in the same write as the REPLY that allows it (a LEAVE needs the group id of the
JOIN's REPLY). Joins + leaves answered OK per second and server CPU per operation (goal: at least
20,000/s on one server process), in two cases: ``new`` (each JOIN creates the group, each LEAVE
forgets it) and ``held`` (another client is a member of every name, so the group stays).

    python bench/groups.py                                # all three parts, about a minute
    python bench/groups.py --parts scale -N 200 2000 --repeat 3 --json out.json
    PYTHONPATH=/path/to/other/checkout python bench/groups.py --parts joins

``--server-script`` runs another relay script with the command line of bench/relays/ (``--loop
uvloop --port 0``, prints ``listening on HOST:PORT``) instead of bench/relays/trame.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import _util
import psutil
import uvloop
from fanout import BNC, Counts, Progress, RawClient, Tally, close_all, open_many, publish

import trame_async
from trame_async.wire import Hello, pong

HERE = Path(__file__).resolve().parent
perf_counter = time.perf_counter

# --- the groups frames, by hand ---------------------------------------------------------------
# Kinds and layouts of the groups design (issue 10), spelled here by number so that this script
# speaks them whatever the trame_async it imports knows.

_WELCOME, _PING, _RELAY, _MULTICAST = 0x02, 0x03, 0x11, 0x10
JOIN, LEAVE, GROUP_MULTICAST, GROUP_RELAY, REPLY = 0x14, 0x15, 0x16, 0x17, 0x19
OP_JOIN, OP_LEAVE = 1, 2
STATUS = {
    0: "OK",
    1: "NOT_MEMBER",
    2: "REFUSED",
    3: "BAD_NAME",
    4: "TOO_MANY_GROUPS",
    5: "SERVER_GROUP_LIMIT",
    6: "NOT_ALLOWED",
}
_U32 = struct.Struct(">I")
#: JOIN: length u32 | kind | request_id u32 | flags u8 | name_len u8 | name
_JOIN_HEAD = struct.Struct(">IBIBB")
#: LEAVE: length u32 = 9 | kind | request_id u32 | group_id u32
_LEAVE = struct.Struct(">IBII")
#: GROUP_MULTICAST head: length u32 | kind | group_id u32, then the data body of a MULTICAST
_GROUP_HEAD = struct.Struct(">IBI")
#: REPLY body after the kind byte: request_id u32 | op u8 | status u16 | group_id u32 | text_len u8
_REPLY = struct.Struct(">IBHIB")
#: The MULTICAST frame of BNC is fixed-size: 5 bytes of head, then the data body.
_MULTICAST_SIZE = len(BNC.pack_frame(_MULTICAST, (0, 0.0, 0.0)))


def join_frame(request_id: int, name: bytes, flags: int = 0) -> bytes:
    """Return a whole JOIN frame."""
    return _JOIN_HEAD.pack(7 + len(name), JOIN, request_id, flags, len(name)) + name


def leave_frame(request_id: int, group_id: int) -> bytes:
    """Return a whole LEAVE frame."""
    return _LEAVE.pack(9, LEAVE, request_id, group_id)


class GroupRefused(RuntimeError):
    """A JOIN answered with a non-OK REPLY."""


class GroupClient(RawClient):
    """A minimal trame_async client with groups: HELLO, WELCOME, PING->PONG, JOIN with REPLY.

    It counts RELAY and GROUP_RELAY frames into its tally. Its publisher side sends BNC frames as
    GROUP_MULTICAST to ``group_id`` once set, else as the all-clients MULTICAST.
    """

    def __init__(self, tally: Counts, host: str, port: int, token: bytes = b"") -> None:
        super().__init__(tally, host, port, token)
        self.group_id = 0
        self._group_head = b""
        self._replies: dict[int, asyncio.Future[tuple[int, int, int, bytes]]] = {}
        self._request = 0
        #: REPLY frames no request of ours waits for (request_id 0: a refused GROUP_MULTICAST).
        self.unsolicited = 0
        #: Frames of kinds this client does not expect (PRESENCE, DROPPED, ...), by kind.
        self.others: dict[int, int] = {}

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(Hello(1, 0, self.token).encode())

    def frame(self, seq: int, sent: float) -> bytes:
        data = BNC.pack_frame(_MULTICAST, (seq, sent, 0.0))
        if self.group_id:
            return self._group_head + data[5:]
        return data

    async def join(self, name: str, timeout: float = 30.0) -> int:
        """JOIN ``name``, wait for the REPLY; return the group id, and publish there from now."""
        transport = self.transport
        if transport is None:
            raise ConnectionError("connection lost before JOIN")
        self._request += 1
        request = self._request
        fut: asyncio.Future[tuple[int, int, int, bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._replies[request] = fut
        transport.write(join_frame(request, name.encode()))
        try:
            op, status, group_id, text = await asyncio.wait_for(fut, timeout)
        except ConnectionError as err:
            raise ConnectionError(
                f"the server closed the connection on JOIN: does it support groups? ({err})"
            ) from err
        if op != OP_JOIN or status:
            raise GroupRefused(
                f"JOIN {name!r}: op {op} {STATUS.get(status, status)} {text.decode(errors='replace')!r}"
            )
        self.group_id = group_id
        self._group_head = _GROUP_HEAD.pack(_MULTICAST_SIZE, GROUP_MULTICAST, group_id)
        return group_id

    def reply(
        self, request: int, op: int, status: int, group_id: int, text: bytes, out: list[bytes]
    ) -> None:
        """Handle a REPLY; ``out`` collects what to write back in one go."""
        fut = self._replies.pop(request, None) if request else None
        if fut is None:
            self.unsolicited += 1
        elif not fut.done():
            fut.set_result((op, status, group_id, text))

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        buf = self.buf
        buf += data
        end = len(buf)
        pos = count = 0
        out: list[bytes] = []
        with memoryview(buf) as view:
            while end - pos >= 5:
                stop = pos + 4 + _U32.unpack_from(view, pos)[0]
                if stop > end:
                    break
                kind = view[pos + 4]
                if kind == GROUP_RELAY or kind == _RELAY:
                    count += 1
                elif kind == REPLY:
                    request, op, status, group_id, n = _REPLY.unpack_from(view, pos + 5)
                    text = bytes(view[pos + 5 + _REPLY.size : pos + 5 + _REPLY.size + n])
                    self.reply(request, op, status, group_id, text, out)
                elif kind == _PING:
                    out.append(pong(_U32.unpack_from(view, pos + 5)[0]))
                elif kind == _WELCOME and not self.ready.done():
                    self.ready.set_result(None)
                else:
                    self.others[kind] = self.others.get(kind, 0) + 1
                pos = stop
        del buf[:pos]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if not self._overflow() and count:
            self.tally.add(count, now)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {exc}"))
        self._replies.clear()


class JoinLeaveClient(GroupClient):
    """Cycles JOIN + LEAVE on one slot per name, one request in flight per slot.

    Slot ``i`` uses request id ``i + 1``; its JOIN's OK REPLY sends its LEAVE, the LEAVE's REPLY
    sends its next JOIN (all the requests a read allows leave in one write). A JOIN refused is
    counted and tried again: ``failed`` says so.
    """

    def __init__(self, tally: Counts, host: str, port: int, names: list[bytes]) -> None:
        super().__init__(tally, host, port)
        self.names = names
        self._joins = [join_frame(i + 1, name) for i, name in enumerate(names)]
        self.running = False
        self.ops = 0
        self.failed: dict[str, int] = {}
        self.in_flight = 0
        self.last = 0.0
        self.idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def begin(self) -> None:
        assert self.transport is not None
        self.running = True
        self.in_flight = len(self._joins)
        self.transport.write(b"".join(self._joins))

    def reply(
        self, request: int, op: int, status: int, group_id: int, text: bytes, out: list[bytes]
    ) -> None:
        if not 0 < request <= len(self._joins) or op not in (OP_JOIN, OP_LEAVE):
            super().reply(request, op, status, group_id, text, out)
            return
        self.last = perf_counter()
        self.in_flight -= 1
        if status:
            key = f"{'JOIN' if op == OP_JOIN else 'LEAVE'} {STATUS.get(status, status)}"
            self.failed[key] = self.failed.get(key, 0) + 1
        else:
            self.ops += 1
        if self.running:
            self.in_flight += 1
            if op == OP_JOIN and not status:
                out.append(leave_frame(request, group_id))
            else:
                out.append(self._joins[request - 1])
        elif self.in_flight == 0 and not self.idle.done():
            self.idle.set_result(None)

    def stop(self) -> None:
        self.running = False
        if self.in_flight == 0 and not self.idle.done():
            self.idle.set_result(None)


async def open_group_client(host: str, port: int, counts: Counts) -> GroupClient:
    """Connect one GroupClient, wait for its WELCOME (10 s at most)."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: GroupClient(counts, host, port), host, port), 10.0
    )
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), 10.0)
    except BaseException:
        await proto.close()
        raise
    return proto


async def gather_limited(coros: Iterable[Any], concurrency: int = 200) -> list[Any]:
    """Await ``coros``, ``concurrency`` at a time; raise the first error after all finished."""
    sem = asyncio.Semaphore(concurrency)

    async def one(coro: Any) -> Any:
        async with sem:
            return await coro

    results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def group_name(index: int) -> str:
    return f"bench-{index:06d}"


# --- parts 1 and 2: multicast cells -----------------------------------------------------------


async def multicast_cell(
    host: str,
    port: int,
    server_pid: int,
    clients: int,
    group_size: int,
    publishers: int,
    grouped: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Connect, join, flood from every publisher, wait for every frame (or a stall); measure.

    ``grouped``: ``clients`` in groups of ``group_size``, ``publishers`` extra members of groups
    spread over the range. Otherwise ``clients`` subscribers and one publisher in no group (the
    all-clients multicast: ``group_size`` must then be ``clients``).
    """
    groups = clients // group_size if grouped else 1
    measured = sorted({(2 * i + 1) * groups // (2 * publishers) for i in range(publishers)})
    tallies = {g: Tally(latency=False) for g in measured}
    stray = Tally(latency=False)  # frames to clients outside every publisher's group
    t_connect = perf_counter()
    subs: list[GroupClient] = await open_many(clients, lambda: open_group_client(host, port, stray))
    pubs: list[GroupClient] = []
    try:
        for i, sub in enumerate(subs):
            group = i // group_size
            if group in tallies:
                sub.tally = Progress(tallies[group])
        pubs = await open_many(len(measured), lambda: open_group_client(host, port, stray))
        for pub, group in zip(pubs, measured, strict=True):
            pub.tally = tallies[group]
        connect_s = perf_counter() - t_connect
        t_join = perf_counter()
        if grouped:
            await gather_limited(
                [sub.join(group_name(i // group_size)) for i, sub in enumerate(subs)]
                + [pub.join(group_name(g)) for pub, g in zip(pubs, measured, strict=True)]
            )
        join_s = perf_counter() - t_join
        await asyncio.sleep(args.settle)
        server = psutil.Process(server_pid)
        cpu0 = server.cpu_times()
        load0 = os.times()
        wall0 = perf_counter()
        senders = [
            asyncio.create_task(publish(pub, tallies[g], group_size, None, args))
            for pub, g in zip(pubs, measured, strict=True)
        ]
        all_done = asyncio.ensure_future(asyncio.gather(*(t.done.wait() for t in tallies.values())))
        last_total, last_change = -1, wall0
        try:
            while not all_done.done():
                await asyncio.wait({all_done}, timeout=0.2)
                now = perf_counter()
                total = sum(t.total for t in tallies.values())
                if now - wall0 > args.cell_timeout:
                    break
                if total != last_total:
                    last_total, last_change = total, now
                elif all(s.done() for s in senders) and now - last_change > args.stall:
                    break
        finally:
            all_done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_done
        wall1 = perf_counter()
        cpu1 = server.cpu_times()
        load1 = os.times()
        rss_peak = _util.peak_rss(server_pid)
        cut = sum(1 for c in subs if c.ended())
        for sender in senders:
            if not sender.done():
                sender.cancel()
        for sender in senders:
            with contextlib.suppress(asyncio.CancelledError):
                await sender  # raises if a publisher failed
        others: dict[str, int] = {}
        for c in [*subs, *pubs]:
            for kind, n in c.others.items():
                others[f"0x{kind:02x}"] = others.get(f"0x{kind:02x}", 0) + n
        unsolicited = sum(c.unsolicited for c in [*subs, *pubs])
    finally:
        await close_all([*subs, *pubs])
    sent = sum(t.sent for t in tallies.values())
    received = sum(t.total for t in tallies.values())
    first = min(t.first_send for t in tallies.values())
    last = max(t.last for t in tallies.values())
    span = last - first if received else 0.0
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    load_cpu = (load1.user + load1.system) - (load0.user + load0.system)
    window = wall1 - wall0
    return {
        "multicast": "group" if grouped else "all",
        "clients": clients,
        "connections": clients + len(pubs),
        "groups": groups if grouped else 0,
        "group_size": group_size,
        "publishers": len(pubs),
        "frames": sent,
        "received": received,
        "loss": group_size * sent - received,
        "stray": stray.total,
        "subscribers_cut": cut,
        "unexpected_frames": others,
        "unsolicited_replies": unsolicited,
        "seconds": span,
        "delivered_per_s": received / span if span > 0 else 0.0,
        "server_cpu_s": server_cpu,
        "server_cpu_pct": 100 * server_cpu / window if window > 0 else 0.0,
        "server_us_per_frame": 1e6 * server_cpu / received if received else None,
        "server_peak_rss_mib": rss_peak / (1 << 20),
        "load_cpu_pct": 100 * load_cpu / window if window > 0 else 0.0,
        "connect_s": connect_s,
        "join_s": join_s,
    }


# --- part 3: join/leave throughput ------------------------------------------------------------


async def joins_run(
    host: str, port: int, server_pid: int, held: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """Cycle JOIN + LEAVE for ``--jl-duration`` s; ``held``: another member keeps every group."""
    loop = asyncio.get_running_loop()
    tally = Tally(latency=False)
    names = [
        [f"jl-{c}-{s}".encode() for s in range(args.jl_window)] for c in range(args.jl_clients)
    ]
    cyclers: list[JoinLeaveClient] = []
    holders: list[GroupClient] = []
    try:
        for client_names in names:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda n=client_names: JoinLeaveClient(tally, host, port, n), host, port
                ),
                10.0,
            )
            cyclers.append(proto)
            await asyncio.wait_for(asyncio.shield(proto.ready), 10.0)
        if held:
            every = [n.decode() for client_names in names for n in client_names]
            per = max(1, args.holder_groups)
            chunks = [every[i : i + per] for i in range(0, len(every), per)]
            holders = await open_many(len(chunks), lambda: open_group_client(host, port, tally))
            await gather_limited(
                h.join(name) for h, chunk in zip(holders, chunks, strict=True) for name in chunk
            )
        await asyncio.sleep(args.settle)
        server = psutil.Process(server_pid)
        cpu0 = server.cpu_times()
        load0 = os.times()
        t0 = perf_counter()
        for c in cyclers:
            c.begin()
        await asyncio.sleep(args.jl_duration)
        for c in cyclers:
            c.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.idle for c in cyclers)), args.stall)
        wall1 = perf_counter()
        cpu1 = server.cpu_times()
        load1 = os.times()
        cut = sum(1 for c in [*cyclers, *holders] if c.ended())
        in_flight = sum(c.in_flight for c in cyclers)
    finally:
        await close_all([*cyclers, *holders])
    ops = sum(c.ops for c in cyclers)
    failed: dict[str, int] = {}
    for c in cyclers:
        for key, n in c.failed.items():
            failed[key] = failed.get(key, 0) + n
    last = max((c.last for c in cyclers), default=t0)
    span = last - t0 if ops else 0.0
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    load_cpu = (load1.user + load1.system) - (load0.user + load0.system)
    window = wall1 - t0
    return {
        "groups": "held" if held else "new",
        "clients": args.jl_clients,
        "window": args.jl_window,
        "ops": ops,
        "failed": sum(failed.values()),
        "failed_by_reason": failed,
        "unanswered": in_flight,
        "clients_cut": cut,
        "seconds": span,
        "ops_per_s": ops / span if span > 0 else 0.0,
        "server_cpu_s": server_cpu,
        "server_cpu_pct": 100 * server_cpu / window if window > 0 else 0.0,
        "server_us_per_op": 1e6 * server_cpu / ops if ops else None,
        "load_cpu_pct": 100 * load_cpu / window if window > 0 else 0.0,
    }


# --- running: a fresh server per cell ---------------------------------------------------------


def with_server(
    runner: asyncio.Runner, args: argparse.Namespace, cell: Callable[[str, int, int], Any]
) -> dict[str, Any]:
    """Start the server, run ``cell(host, port, pid)`` in ``runner``, stop the server."""
    cmd = [*_util.python(), str(args.server_script), "--loop", "uvloop", "--port", "0"]
    proc, host, port = _util.start_listening(cmd)
    try:
        result: dict[str, Any] = runner.run(
            asyncio.wait_for(cell(host, port, proc.pid), args.cell_timeout + 120)
        )
    finally:
        status = _util.stop_process(proc)
    result["server_exit"] = status
    return result


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scale": [], "fanout": [], "joins": []}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for rep in range(args.repeat):
            if "scale" in args.parts:
                for n in args.clients:
                    log(f"scale N={n} k={args.group_size} repeat {rep + 1}")
                    cell = with_server(
                        runner,
                        args,
                        lambda h, p, pid, n=n: multicast_cell(
                            h, p, pid, n, args.group_size, args.publishers, True, args
                        ),
                    )
                    cell["repeat"] = rep
                    log(f"    {_cell_text(cell)}")
                    out["scale"].append(cell)
            if "fanout" in args.parts:
                for s in args.fanout:
                    for grouped in (False, True) if rep % 2 == 0 else (True, False):
                        log(f"fanout S={s} {'group' if grouped else 'all-clients'} rep {rep + 1}")
                        cell = with_server(
                            runner,
                            args,
                            lambda h, p, pid, s=s, g=grouped: multicast_cell(
                                h, p, pid, s, s, 1, g, args
                            ),
                        )
                        cell["repeat"] = rep
                        log(f"    {_cell_text(cell)}")
                        out["fanout"].append(cell)
            if "joins" in args.parts:
                for held in (False, True):
                    log(f"joins {'held' if held else 'new'} groups repeat {rep + 1}")
                    run = with_server(
                        runner, args, lambda h, p, pid, held=held: joins_run(h, p, pid, held, args)
                    )
                    run["repeat"] = rep
                    log(
                        f"    {run['ops_per_s']:,.0f} joins+leaves/s, failed {run['failed']}, "
                        f"server {run['server_us_per_op'] or 0:.2f} µs/op, "
                        f"{run['server_cpu_pct']:.0f} % CPU"
                    )
                    out["joins"].append(run)
    return out


def _cell_text(cell: dict[str, Any]) -> str:
    return (
        f"M={cell['frames']:,}: {cell['delivered_per_s']:,.0f} frames/s, loss {cell['loss']}, "
        f"stray {cell['stray']}, server {cell['server_us_per_frame'] or 0:.3f} µs/frame, "
        f"{cell['server_cpu_pct']:.0f} % CPU, load {cell['load_cpu_pct']:.0f} % CPU"
    )


# --- summaries --------------------------------------------------------------------------------

_CELL_FIGURES = (
    "frames",
    "delivered_per_s",
    "server_us_per_frame",
    "server_cpu_pct",
    "server_peak_rss_mib",
    "load_cpu_pct",
    "connect_s",
    "join_s",
)
_JOIN_FIGURES = ("ops_per_s", "server_us_per_op", "server_cpu_pct", "load_cpu_pct")


def medians(
    runs: list[dict[str, Any]],
    key: tuple[str, ...],
    figures: tuple[str, ...],
    worst: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Median of ``figures`` per ``key``; the largest of ``worst`` (loss, failures) over repeats."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in key), []).append(run)
    out = []
    for values, group in groups.items():
        row: dict[str, Any] = dict(zip(key, values, strict=True))
        row["repeats"] = len(group)
        for name in figures:
            found = [r[name] for r in group if r.get(name) is not None]
            row[name] = statistics.median(found) if found else None
        for name in worst:
            row[f"{name}_max"] = max(r[name] for r in group)
        out.append(row)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(data: dict[str, Any]) -> None:
    """Add medians and ratios to ``data`` (figures of the same run only)."""
    worst = ("loss", "stray", "subscribers_cut")
    scale = medians(data["scale"], ("clients",), _CELL_FIGURES, worst)
    scale.sort(key=lambda r: r["clients"])
    if scale:
        base = scale[0]
        for row in scale:
            row["us_per_frame_vs_first"] = _ratio(
                row["server_us_per_frame"], base["server_us_per_frame"]
            )
            row["delivered_vs_first"] = _ratio(row["delivered_per_s"], base["delivered_per_s"])
    data["scale_medians"] = scale
    fan = medians(data["fanout"], ("multicast", "clients"), _CELL_FIGURES, worst)
    fan.sort(key=lambda r: (r["clients"], r["multicast"] != "all"))
    data["fanout_medians"] = fan
    by_key = {(r["multicast"], r["clients"]): r for r in fan}
    data["fanout_ratios"] = [
        {
            "fanout": s,
            "server_us_per_frame": _ratio(
                by_key[("group", s)]["server_us_per_frame"],
                by_key[("all", s)]["server_us_per_frame"],
            ),
            "delivered_per_s": _ratio(
                by_key[("group", s)]["delivered_per_s"], by_key[("all", s)]["delivered_per_s"]
            ),
        }
        for s in sorted({c for _, c in by_key})
        if ("group", s) in by_key and ("all", s) in by_key
    ]
    joins = medians(
        data["joins"], ("groups",), _JOIN_FIGURES, ("failed", "unanswered", "clients_cut")
    )
    data["joins_medians"] = joins


def server_settings() -> dict[str, Any]:
    """The ServerConfig bench/relays/trame.py runs (its defaults, 20 s heartbeat), as JSON values."""
    config = trame_async.ServerConfig(heartbeat_interval=20.0, heartbeat_timeout=20.0)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "token":
            continue
        value = getattr(config, f.name)
        out[f.name] = (
            value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
        )
    return out


_GROUP_SETTINGS = (
    "max_groups_per_client",
    "max_groups",
    "max_group_name_length",
    "max_presence_members",
    "last_value_groups",
)


def header(meta: dict[str, Any], settings: dict[str, Any], args: argparse.Namespace) -> str:
    script = Path(args.server_script)
    try:
        where = script.resolve().relative_to(_util.ROOT)
    except ValueError:
        where = script
    groups = ", ".join(f"{k} {settings[k]}" for k in _GROUP_SETTINGS if k in settings)
    mem = meta["memory_bytes"] / (1 << 30)
    return "\n".join(
        [
            f"Machine: {meta['cpu_model'] or 'unknown CPU'}, {meta['cpus']} CPUs, {mem:.0f} GiB, "
            f"{meta['platform']}; Python {meta['python']}, uvloop {meta['uvloop']}",
            f"Code: trame_async {meta['git_head']} (sha256 {meta['trame_async_sha256']}) at "
            f"{meta['trame_async_path']}",
            f"Server: {where} on uvloop, one process per run; ServerConfig defaults, heartbeat "
            f"{settings.get('heartbeat_interval')} s, max_queue_bytes "
            f"{settings.get('max_queue_bytes', 0):,}, slow_consumer_policy "
            f"{settings.get('slow_consumer_policy')}; "
            + (groups or "no groups settings in this trame_async"),
            f"Load: this process (uvloop), raw clients; publishers at most --lead {args.lead:,} "
            f"frames ahead of their slowest subscriber, --window {args.window:,} deliveries "
            f"in flight, {args.duration:g} s of sending per cell.",
        ]
    )


def report(data: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    reps = args.repeat
    if data["scale_medians"]:
        first = data["scale_medians"][0]["clients"]
        lines += [
            f"## 1. Scale: N clients in groups of k = {args.group_size}, {args.publishers} "
            f"publishers in {args.publishers} groups (fan-out {args.group_size}), medians of {reps}",
            "",
            f"Goal: server µs per delivered frame flat within 20 % from N = {first} "
            f"(ratio at most 1.2). stray: frames that reached a client outside the sender's group.",
            "",
        ]
        headers = [
            "N",
            "groups",
            "M",
            "delivered/s",
            "loss",
            "stray",
            "subs cut",
            "srv CPU %",
            "srv µs/frame",
            f"µs/frame / N={first}",
            f"delivered/s / N={first}",
            "srv peak RSS MiB",
            "load CPU %",
        ]
        rows = [
            [
                r["clients"],
                r["clients"] // args.group_size,
                r["frames"],
                r["delivered_per_s"],
                r["loss_max"],
                r["stray_max"],
                r["subscribers_cut_max"],
                r["server_cpu_pct"],
                r["server_us_per_frame"],
                r["us_per_frame_vs_first"],
                r["delivered_vs_first"],
                r["server_peak_rss_mib"],
                r["load_cpu_pct"],
            ]
            for r in data["scale_medians"]
        ]
        lines.append(_util.table(headers, rows))
    if data["fanout_medians"]:
        if lines:
            lines.append("")
        lines += [
            "## 2. Group multicast vs all-clients multicast at the same fan-out, medians of "
            f"{reps}",
            "",
            "group: S subscribers and the publisher in one group, GROUP_MULTICAST; all: S "
            "subscribers and the publisher in no group, MULTICAST. Fresh server per cell.",
            "",
        ]
        headers = [
            "multicast",
            "S",
            "M",
            "delivered/s",
            "loss",
            "subs cut",
            "srv CPU %",
            "srv µs/frame",
            "srv peak RSS MiB",
            "load CPU %",
        ]
        rows = [
            [
                r["multicast"],
                r["clients"],
                r["frames"],
                r["delivered_per_s"],
                r["loss_max"],
                r["subscribers_cut_max"],
                r["server_cpu_pct"],
                r["server_us_per_frame"],
                r["server_peak_rss_mib"],
                r["load_cpu_pct"],
            ]
            for r in data["fanout_medians"]
        ]
        lines.append(_util.table(headers, rows))
        if data["fanout_ratios"]:
            lines += [
                "",
                "group / all-clients, same run (goal for srv µs/frame: at most 1.2; "
                "delivered/s: >1 is faster):",
                "",
                _util.table(
                    ["S", "srv µs/frame", "delivered/s"],
                    [
                        [e["fanout"], e["server_us_per_frame"], e["delivered_per_s"]]
                        for e in data["fanout_ratios"]
                    ],
                ),
            ]
    if data["joins_medians"]:
        if lines:
            lines.append("")
        lines += [
            f"## 3. Join/leave throughput: {args.jl_clients} clients x {args.jl_window} slots "
            f"(one request in flight per slot), {args.jl_duration:g} s, medians of {reps}",
            "",
            "new: each JOIN creates its group, each LEAVE forgets it; held: another client is in "
            "every group. Goal: at least 20,000 joins+leaves/s.",
            "",
        ]
        headers = [
            "groups",
            "joins+leaves/s",
            "failed",
            "unanswered",
            "clients cut",
            "srv CPU %",
            "srv µs/op",
            "load CPU %",
        ]
        rows = [
            [
                r["groups"],
                r["ops_per_s"],
                r["failed_max"],
                r["unanswered_max"],
                r["clients_cut_max"],
                r["server_cpu_pct"],
                r["server_us_per_op"],
                r["load_cpu_pct"],
            ]
            for r in data["joins_medians"]
        ]
        lines.append(_util.table(headers, rows))
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("scale", "fanout", "joins"),
        default=["scale", "fanout", "joins"],
    )
    p.add_argument("--repeat", type=int, default=1, help="repeats per cell (medians are reported)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of sending per cell")
    p.add_argument(
        "--window",
        type=int,
        default=100_000,
        help="per publisher: most deliveries in flight (sent x fan-out - received)",
    )
    p.add_argument(
        "--lead",
        type=int,
        default=10_000,
        metavar="W",
        help="per publisher: most frames ahead of its slowest subscriber (0: off)",
    )
    p.add_argument("--yield-every", type=int, default=64, help="publishers yield every N frames")
    p.add_argument("--settle", type=float, default=0.3, help="seconds between joins and sending")
    p.add_argument(
        "--stall", type=float, default=3.0, help="give up when nothing arrives this long"
    )
    p.add_argument("--cell-timeout", type=float, default=60.0, help="seconds per cell at most")
    p.add_argument(
        "--server-script",
        default=str(HERE / "relays" / "trame.py"),
        help="the server (bench/relays/ command line; default bench/relays/trame.py)",
    )
    a = p.add_argument_group("1: scale")
    a.add_argument(
        "--clients", "-N", nargs="+", type=int, default=[200, 500, 1000, 2000], metavar="N"
    )
    a.add_argument("--group-size", "-k", type=int, default=10, help="members per group")
    a.add_argument(
        "--publishers", "-P", type=int, default=4, help="publishers, each in its own group"
    )
    b = p.add_argument_group("2: group vs all-clients")
    b.add_argument("--fanout", "-S", nargs="+", type=int, default=[10], metavar="S")
    c = p.add_argument_group("3: join/leave")
    c.add_argument("--jl-clients", type=int, default=2, help="clients cycling JOIN + LEAVE")
    c.add_argument("--jl-window", type=int, default=32, help="slots (requests in flight) each")
    c.add_argument("--jl-duration", type=float, default=3.0, help="seconds of cycling per run")
    c.add_argument(
        "--holder-groups",
        type=int,
        default=64,
        help="held: groups per holding client (the server's max_groups_per_client)",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.set_defaults(rate=None)  # fanout.publish(): never paced here
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "scale" in args.parts and any(n < args.group_size * args.publishers for n in args.clients):
        raise SystemExit("every N must hold the publishers' groups: N >= k x P")
    need = max([*args.clients, 0]) + args.publishers + 100
    limit = _util.raise_nofile()  # the server subprocesses inherit it
    if limit < need:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: not enough for {need} connections")
    if not hasattr(trame_async.Kind, "JOIN"):
        print(
            "warning: this trame_async has no Kind.JOIN (multicast groups, issue 10); its server "
            "will refuse the JOIN frames",
            file=sys.stderr,
        )
    meta = _util.metadata()
    settings = server_settings()
    print(header(meta, settings, args) + "\n", flush=True)
    data = run_all(args)
    summarize(data)
    print(report(data, args))
    if args.json:
        out = {
            "meta": _util.finish_metadata(meta),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "server_config": settings,
            **data,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
