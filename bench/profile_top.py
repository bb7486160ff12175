"""Summarise a py-spy ``--format raw`` profile: top functions by own and by total samples.

    py-spy record --pid PID --format raw -o prof.txt      # or bench/fanout.py --py-spy DIR
    python bench/profile_top.py prof.txt [--top 20]

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
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
