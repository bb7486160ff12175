"""Plot fan-out figures: delivered frames/s and server µs per frame against S; paced latency.

    python bench/plot.py flood.json [more.json ...] [--out docs/perf-fanout.png]
    python bench/plot.py paced.json --latency [--out docs/perf-latency.png]

Each JSON file is what ``bench/fanout.py --json`` (or ``bench/run_all.py --json``) writes; the
medians of several files are merged (e.g. a run at S = 1, 10, 100 and one at S = 1000).
``--latency`` plots p50 and p99 of a paced run instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def plot_fanout(rows: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """Write a PNG: delivered frames/s (left) and server CPU µs per frame (right) against S."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relays: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        relays.setdefault(row["relay"], []).append(row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in relays.items():
        group.sort(key=lambda r: r["subscribers"])
        xs = [r["subscribers"] for r in group]
        style = {"linewidth": 2.5} if name.startswith("trame") else {"linestyle": "--"}
        for ax, key in ((left, "delivered_per_s"), (right, "server_us_per_frame")):
            ax.plot(xs, [r[key] for r in group], marker="o", label=name, **style)
            lossy = [(r["subscribers"], r[key]) for r in group if r.get("loss_max")]
            if lossy:  # a cell where frames were lost: its figures are not comparable
                ax.scatter(*zip(*lossy, strict=True), marker="x", s=120, color="red", zorder=5)
    for ax, label in ((left, "delivered frames/s"), (right, "server CPU µs per delivered frame")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("subscribers S")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, title="red x: frames lost", title_fontsize=8)
    fig.suptitle(title or "Fan-out of 32-byte frames over loopback (one publisher, S subscribers)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_latency(rows: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """Write a PNG: p50 (left) and p99 (right) latency against S, from a paced run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relays: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "latency_ms" in row:
            relays.setdefault(row["relay"], []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in relays.items():
        group.sort(key=lambda r: r["subscribers"])
        xs = [r["subscribers"] for r in group]
        style = {"linewidth": 2.5} if name.startswith("trame") else {"linestyle": "--"}
        for ax, key in zip(axes, ("p50", "p99"), strict=True):
            ax.plot(xs, [r["latency_ms"][key] for r in group], marker="o", label=name, **style)
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("subscribers S")
        ax.set_ylabel(f"{key} latency, ms (send to receipt)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Latency of 32-byte frames paced at 100 frames/s over loopback")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="default: docs/perf-fanout.png")
    p.add_argument("--latency", action="store_true", help="plot p50/p99 of a paced run")
    p.add_argument("--title", default="", help="the figure's title")
    args = p.parse_args(argv)
    rows = []
    key = "fanout_paced" if args.latency else "fanout"
    for path in args.json:
        data = json.loads(path.read_text())
        rows += data.get(key, data)["medians"]  # run_all.py nests the fan-out figures
    if args.latency:
        args.out = args.out or Path("docs/perf-latency.png")
        plot_latency(rows, args.out, args.title)
    else:
        args.out = args.out or Path("docs/perf-fanout.png")
        plot_fanout(rows, args.out, args.title)
    print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
