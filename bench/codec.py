"""Codec benchmark: ns per encode and decode of a frame, against bare ``struct`` in the same run.

For the built-in INT, POS and STR and a registered composite trame ("<Qdd" NamedTuple), it times:

- the value alone, the same work as the struct baseline plus the value's class:
  ``Trame.pack(value)`` and ``Trame.unpack_from(buf)``;
- encode: ``trame_async.encode(trame, value)`` (public, returns ``(message, format)``),
  ``REGISTRY.encode(trame, value)`` (what ``Client.multicast`` calls) and
  ``Trame.pack_frame(kind, value)`` (the lowest level);
- decode: ``trame_async.decode(message)`` (public, whole frame with its length),
  ``REGISTRY.decode_frame(view)`` (what the client does for each RELAY frame, from the kind byte)
  and ``REGISTRY.check_body(view, 1)`` (what the server does for each MULTICAST before relaying);
- in bulk, per frame, for a 64 KiB chunk of RELAY frames (what one socket read brings):
  ``ClientCore.receive_data(chunk)`` (the client's whole receive path, bytes to ``Message``
  objects) and ``ServerCore.receive_data(chunk)`` of MULTICAST frames (the server's parse and relay
  check, the trame registered on the server or not);
- baselines: ``Struct.pack``/``Struct.unpack`` of the value alone with the same format, and, for
  decode, ``cls._make(Struct.unpack(...))`` where the trame builds a NamedTuple.

Each figure is the best of ``--repeat`` timeit runs of about 0.05 s each, in ns per call.

A last table times the steps any codec written in Python pays per frame (one call of a Python
function, a slice, a dictionary lookup, building a NamedTuple from a tuple) against the same bare
``Struct.unpack``: it shows how much of the budget "2x bare struct" one Python-level step takes.

    python bench/codec.py [--repeat 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import timeit
from pathlib import Path
from typing import Any, NamedTuple

import _util

import trame_async
from trame_async import INT, POS, REGISTRY, STR, Kind, Position
from trame_async.protocol import ClientCore, CoreState, ServerCore, ServerLimits
from trame_async.wire import PROTOCOL_VERSION, Hello, Welcome

#: Bytes of frames fed per receive_data call in the bulk rows (a typical socket read).
CHUNK = 64 << 10


class Sample(NamedTuple):
    """The composite trame of the benchmark: sequence number, time, a double."""

    seq: int
    sent: float
    value: float


CMP = trame_async.register("CMP", "<Qdd", Sample)

CASES: list[tuple[Any, Any]] = [
    (INT, 1_234_567_890),
    (POS, Position(1.5, -2.25)),
    (STR, "hello, trame"),
    (CMP, Sample(42, 1_732_000_000.123, 3.5)),
]


def best_ns(stmt: str, env: dict[str, Any], repeat: int, seconds: float = 0.05) -> float:
    """Best time of one call of ``stmt`` over ``repeat`` runs of about ``seconds`` each, in ns."""
    timer = timeit.Timer(stmt, globals=env)
    probe = 10
    took = timer.timeit(probe)
    if took < 1e-3:  # a fast statement: probe again with enough calls to time it well
        probe = 1000
        took = timer.timeit(probe)
    number = max(10, int(probe * seconds / max(took, 1e-9)))
    return 1e9 * min(timer.repeat(repeat=repeat, number=number)) / number


def client_core() -> ClientCore:
    """An open client core (HELLO sent, WELCOME received)."""
    core = ClientCore(0.0)
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 1, 20.0, 20.0, 1 << 20).encode(), 0.0)
    assert core.state is CoreState.OPEN
    core.outgoing.clear()
    return core


def server_core(registry: trame_async.Registry) -> ServerCore:
    """An open server core (HELLO received), checking frames against ``registry``."""
    core = ServerCore(1, ServerLimits(), 0.0, registry)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    assert core.state is CoreState.OPEN
    core.outgoing.clear()
    return core


def measure(trame: trame_async.Trame, value: Any, repeat: int) -> list[dict[str, Any]]:
    """Time every encode and decode path of ``trame`` and its struct baselines."""
    message, _fmt = trame_async.encode(trame, value)
    relay = REGISTRY.encode(trame, value, Kind.RELAY)
    relay_view = memoryview(relay)[4:]
    multicast_view = memoryview(message)[4:]
    if trame.variable:
        raw = value.encode("utf-8")
        st = struct.Struct(f"<{len(raw)}s")
        base_pack = "st.pack(value.encode('utf-8'))"
        base_unpack = "str(st.unpack(packed)[0], 'utf-8')"
        base_pack_label = f"str.encode + Struct('<{len(raw)}s').pack"
        base_unpack_label = f"Struct('<{len(raw)}s').unpack + str(…, 'utf-8')"
        packed = st.pack(raw)
        make_stmt = None
    else:
        st = struct.Struct(trame.fmt)
        args = value if isinstance(value, tuple) else (value,)
        base_pack = "st.pack(*args)" if isinstance(value, tuple) else "st.pack(value)"
        base_unpack = "st.unpack(packed)"
        base_pack_label = f"Struct({trame.fmt!r}).pack"
        base_unpack_label = f"Struct({trame.fmt!r}).unpack"
        packed = st.pack(*args)
        make_stmt = (
            "make(st.unpack(packed))"
            if trame.cls is not None and hasattr(trame.cls, "_make")
            else None
        )
    relay_chunk = relay * (CHUNK // len(relay))
    multicast_chunk = message * (CHUNK // len(message))
    per_relay_chunk = CHUNK // len(relay)
    per_multicast_chunk = CHUNK // len(message)
    # A registry without this trame: the server relays codes it does not know (the default).
    bare = trame_async.Registry()
    env = {
        "trame_async": trame_async,
        "client": client_core(),
        "server": server_core(REGISTRY),
        "server_bare": server_core(bare),
        "relay_chunk": relay_chunk,
        "multicast_chunk": multicast_chunk,
        "REGISTRY": REGISTRY,
        "trame": trame,
        "value": value,
        "message": message,
        "relay_view": relay_view,
        "multicast_view": multicast_view,
        "st": st,
        "packed": packed,
        "args": value if isinstance(value, tuple) else (value,),
        "MULTICAST": int(Kind.MULTICAST),
        "make": getattr(trame.cls, "_make", None),
    }
    rows: list[dict[str, Any]] = []

    def add(op: str, label: str, stmt: str, baseline: float | None, per_call: int = 1) -> float:
        ns = best_ns(stmt, env, repeat) / per_call
        rows.append(
            {
                "trame": str(trame),
                "fmt": trame.fmt,
                "op": op,
                "path": label,
                "ns": ns,
                "vs_struct": ns / baseline if baseline else None,
            }
        )
        return ns

    base = add("encode", base_pack_label + " (baseline)", base_pack, None)
    rows[-1]["vs_struct"] = 1.0
    add("encode", "Trame.pack(value) [value only]", "trame.pack(value)", base)
    add("encode", "trame_async.encode(trame, value)", "trame_async.encode(trame, value)", base)
    add("encode", "REGISTRY.encode(trame, value)", "REGISTRY.encode(trame, value)", base)
    add("encode", "Trame.pack_frame(MULTICAST, value)", "trame.pack_frame(MULTICAST, value)", base)
    base = add("decode", base_unpack_label + " (baseline)", base_unpack, None)
    rows[-1]["vs_struct"] = 1.0
    if make_stmt is not None:
        add("decode", f"{trame.cls.__name__}._make(Struct.unpack(...))", make_stmt, base)
    add("decode", "Trame.unpack_from(buf) [value only]", "trame.unpack_from(packed)", base)
    add("decode", "trame_async.decode(message)", "trame_async.decode(message)", base)
    add("decode", "REGISTRY.decode_frame(view) [RELAY]", "REGISTRY.decode_frame(relay_view)", base)
    add(
        "decode",
        "REGISTRY.check_body(view, 1) [server]",
        "REGISTRY.check_body(multicast_view, 1)",
        base,
    )
    add(
        "decode",
        f"ClientCore.receive_data(64 KiB of RELAY) / {per_relay_chunk} [client, bulk]",
        "client.receive_data(relay_chunk, 0.0)",
        base,
        per_relay_chunk,
    )
    for label, core in (("registered", "server"), ("unregistered", "server_bare")):
        add(
            "check",
            f"ServerCore.receive_data(64 KiB of MULTICAST) / {per_multicast_chunk} "
            f"[server, {label}]",
            f"{core}.receive_data(multicast_chunk, 0.0)",
            base,
            per_multicast_chunk,
        )
    return rows


def noop(x: Any) -> Any:
    """A Python function doing nothing: what one Python-level call costs."""
    return x


def primitives(repeat: int) -> list[dict[str, Any]]:
    """Time the per-frame steps of any pure-Python codec against bare Struct('<q').unpack."""
    st = struct.Struct("<q")
    message, _ = trame_async.encode(POS, Position(1.5, -2.25))
    head = bytes(message[:12])
    env: dict[str, Any] = {
        "st": st,
        "packed": st.pack(7),
        "noop": noop,
        "message": message,
        "table": {head: POS, b"other-key-12": INT},
        "head": head,
        "Position": Position,
        "fields": (1.5, -2.25),
        "new": tuple.__new__,
        "mv": memoryview(message),
    }
    steps = [
        ("Struct('<q').unpack(8 bytes) (baseline)", "st.unpack(packed)"),
        ("call of a Python function that returns its argument", "noop(packed)"),
        ("bytes slice of 12 bytes: message[:12]", "message[:12]"),
        ("dict lookup of a 12-byte key", "table.get(head)"),
        ("NamedTuple from a tuple: tuple.__new__(Position, t)", "new(Position, fields)"),
        ("NamedTuple from a tuple: Position._make(t)", "Position._make(fields)"),
        ("NamedTuple from fields: Position(x, y)", "Position(1.5, -2.25)"),
        ("memoryview slice: mv[12:]", "mv[12:]"),
    ]
    rows = []
    base = None
    for label, stmt in steps:
        ns = best_ns(stmt, env, repeat)
        base = base or ns
        rows.append({"step": label, "ns": ns, "vs_struct": ns / base})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=7, help="timeit repeats (the best is kept)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = p.parse_args(argv)
    meta = _util.metadata()
    rows: list[dict[str, Any]] = []
    for trame, value in CASES:
        rows += measure(trame, value, args.repeat)
    print(
        f"## Codec: ns per call, best of {args.repeat} (ratio: / bare struct of the same format)\n"
    )
    print(
        _util.table(
            ["trame", "format", "op", "path", "ns", "x struct"],
            [[r["trame"], r["fmt"], r["op"], r["path"], r["ns"], r["vs_struct"]] for r in rows],
        )
    )
    steps = primitives(args.repeat)
    print("\n## Steps any Python codec pays per frame, against bare struct (same run)\n")
    print(
        _util.table(
            ["step", "ns", "x struct"], [[r["step"], r["ns"], r["vs_struct"]] for r in steps]
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"meta": _util.finish_metadata(meta), "rows": rows, "primitives": steps}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
