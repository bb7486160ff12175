"""Summarise a py-spy ``--format raw`` profile: top functions by own and by total samples.

    py-spy record --pid PID --format raw -o prof.txt      # or bench/fanout.py --py-spy DIR
    python bench/profile_top.py prof.txt [--top 20]
    python bench/profile_top.py load.txt --layers   # a --native profile of a load process

Lines of a raw profile are ``frame;frame;...;leaf count``; each frame is ``function (file:line)``.
"Own" counts samples where the function is the leaf (any line); "total" counts samples where it is
anywhere on the stack (once per sample).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import _util

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    short = "/".join(path.split("/")[-2:]) if path else "?"
    return f"{match.group('func')} ({short})"


def summarise(path: Path) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """Return total samples, own samples per function, total per function, own per leaf line."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    samples = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        funcs = [_function(f) for f in frames]
        own[funcs[-1]] += count
        lines[frames[-1].strip()] += count
        for func in set(funcs):
            total[func] += count
    return samples, own, total, lines


def layer(stack: str) -> str | None:
    """Return the layer a native sample's time belongs to, None for an idle one (epoll).

    The syscalls by their leaf; the cyclic GC wherever it is on the stack; else the deepest Python
    frame's file decides: trame_async (with the C it calls: struct, the compiled loop), the
    benchmark's own code (publisher, subscriber bodies), or the event loop (uvloop's C and
    asyncio, whose runner is the deepest Python frame of uvloop's own work).
    """
    frames = [f.strip() for f in stack.split(";")]
    leaf = frames[-1]
    if leaf.startswith("epoll_pwait"):
        return None
    if leaf.startswith("read (libc"):
        return "read syscall"
    if leaf.startswith(("write (libc", "writev (libc")):
        return "write syscall"
    if "gc_collect" in stack:
        return "cyclic GC"
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        path = match.group("file") if match else ""
        if path and path.endswith(".py"):
            if "trame_async/" in path:
                return "trame_async"
            if "/" not in path or "/bench/" in path:  # py-spy names the script's own files bare
                return "benchmark code"
            return "event loop and asyncio"
    return "event loop and asyncio"


def layers(path: Path) -> tuple[int, Counter[str]]:
    """Return the busy samples of a native profile and their count per :func:`layer`."""
    counts: Counter[str] = Counter()
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if stack and count_text.isdigit():
            name = layer(stack)
            if name is not None:
                counts[name] += int(count_text)
    return sum(counts.values()), counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=20)
    p.add_argument(
        "--layers",
        action="store_true",
        help="busy samples per layer (syscalls, GC, trame_async...)",
    )
    args = p.parse_args(argv)
    if args.layers:
        busy, counts = layers(args.profile)
        print(f"## {args.profile.name}: {busy} busy samples (epoll waits left out)\n")
        rows = [[name, n, 100 * n / busy] for name, n in counts.most_common()]
        print(_util.table(["layer", "samples", "%"], rows))
        return 0 if busy else 1
    samples, own, total, lines = summarise(args.profile)
    if not samples:
        print("no samples")
        return 1
    print(f"## {args.profile.name}: {samples} samples\n")
    print("### Own time (leaf function)\n")
    print(
        _util.table(
            ["function", "samples", "%"],
            [[f, n, 100 * n / samples] for f, n in own.most_common(args.top)],
        )
    )
    print("\n### Total time (function anywhere on the stack)\n")
    print(
        _util.table(
            ["function", "samples", "%"],
            [[f, n, 100 * n / samples] for f, n in total.most_common(args.top)],
        )
    )
    print("\n### Own time by line\n")
    print(
        _util.table(
            ["line", "samples", "%"],
            [[f, n, 100 * n / samples] for f, n in lines.most_common(args.top)],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
