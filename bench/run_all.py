"""Run every benchmark and print their tables: codec, fan-out, limits, idle, isolation, groups.

Quick by default (a few minutes): fan-out at S = 1, 10, 100 with 1 repeat, the cost of the limits at
S = 100 (default limits, with a token, every limit relaxed), idle with 2,000 clients, isolation (one
bad client among 20 healthy subscribers, 3 s per run), multicast groups (bench/groups.py: 200 to
2,000 clients in groups of 10, group against all-clients multicast at S = 10, join/leave
throughput; skipped while the trame_async measured has no groups), the cluster (bench/cluster.py:
CPU per delivery across 2 nodes against one, the NATS hop's latency, --workers 2, paced groups). ``--full`` runs fan-out at
S = 1, 10, 100, 1000, idle with 10,000 clients and isolation runs of 10 s. Other options:

    python bench/run_all.py [--full] [--repeat 3] [--json FILE] [--plot [PNG]] [--skip idle ...]

``--json FILE`` writes one file holding every figure: ``{"codec": ..., "fanout": ...,
"fanout_paced": ..., "limits": ..., "idle": ..., "isolation": ..., "groups": ..., "cluster": ...}``. The noxfile's ``bench``
session runs this script. docs/performance.md lists the commands behind its figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str], json_path: Path | None, timeout: float) -> None:
    cmd = [sys.executable, str(HERE / script), *args]
    if json_path is not None:
        cmd += ["--json", str(json_path)]
    print(f"\n$ {' '.join(cmd[1:])}\n", flush=True)
    subprocess.run(cmd, check=True, timeout=timeout)


def has_groups() -> bool:
    """Whether the trame_async the benchmarks import has multicast groups (issue 10)."""
    import trame_async

    return hasattr(trame_async.Kind, "JOIN")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="S up to 1000 and 10,000 idle clients")
    p.add_argument("--repeat", type=int, default=1, help="fan-out repeats (medians are reported)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument(
        "--plot",
        nargs="?",
        const="docs/perf-fanout.png",
        metavar="PNG",
        help="plot the fan-out figures",
    )
    p.add_argument("--duration", default="3", help="fan-out: seconds of sending per cell")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=("codec", "fanout", "paced", "limits", "idle", "isolation", "groups", "cluster"),
    )
    args = p.parse_args(argv)
    subscribers = ["1", "10", "100", "1000"] if args.full else ["1", "10", "100"]
    plans = {
        "codec": ("codec.py", [], 600),
        "fanout": (
            "fanout.py",
            ["-S", *subscribers, "--repeat", str(args.repeat), "--duration", args.duration],
            3600,
        ),
        "paced": (
            "fanout.py",
            ["-S", "1", "10", "100", "--rate", "100", "--duration", args.duration],
            1800,
        ),
        "limits": (
            "fanout.py",
            [
                "-S",
                "100",
                "--relays",
                "trame-raw",
                "trame-raw-token",
                "trame-raw-relaxed",
                "trame",
                "trame-token",
                "trame-relaxed",
                "--repeat",
                str(args.repeat),
                "--duration",
                args.duration,
            ],
            1800,
        ),
        "idle": ("idle.py", ["-N", "10000" if args.full else "2000"], 900),
        "isolation": (
            "isolation.py",
            ["--duration", "10", "--b-duration", "5"] if args.full else [],
            900,
        ),
        "groups": (
            "groups.py",
            ["--repeat", str(args.repeat), "--duration", args.duration],
            1800,
        ),
        "cluster": (
            "cluster.py",
            ["--repeat", str(args.repeat), "--duration", args.duration],
            1800,
        ),
    }
    if args.plot:
        plans["fanout"][1].extend(["--plot", args.plot])
    if "groups" not in args.skip and not has_groups():
        print("\nskipping groups: the trame_async measured has no multicast groups (issue 10)")
        args.skip.append("groups")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="trame-bench-") as tmp:
        for name, (script, extra, timeout) in plans.items():
            if name in args.skip:
                continue
            out = Path(tmp) / f"{name}.json" if args.json else None
            run(script, extra, out, timeout)
            if out is not None:
                results["fanout_paced" if name == "paced" else name] = json.loads(out.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
