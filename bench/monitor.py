"""Log CPU use by processes outside a benchmark run, to spot contention on a shared machine.

    python bench/monitor.py --exclude-tree PID --out monitor.log [--interval 2] [--threshold 5]

Every ``--interval`` seconds, writes one line per process that used more than ``--threshold`` %
of one core since the last line, except ``PID`` and its descendants (the benchmark run) and this
script. Stops on SIGTERM/SIGINT or when ``PID`` exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import psutil


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--exclude-tree", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--threshold", type=float, default=5.0)
    args = p.parse_args(argv)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    me = psutil.Process()
    procs: dict[int, psutil.Process] = {}
    with open(args.out, "a", buffering=1) as out:
        out.write(f"# {time.strftime('%H:%M:%S')} monitoring; excluded tree {args.exclude_tree}\n")
        while running:
            try:
                root = psutil.Process(args.exclude_tree)
                mine = {root.pid, me.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                break
            for proc in psutil.process_iter(["pid"]):
                if proc.pid not in procs:
                    procs[proc.pid] = proc
                    try:
                        proc.cpu_percent(None)  # first call primes the counter
                    except psutil.Error:
                        pass
            time.sleep(args.interval)
            stamp = time.strftime("%H:%M:%S")
            for pid, proc in list(procs.items()):
                try:
                    pct = proc.cpu_percent(None)
                    if pid in mine or pct < args.threshold:
                        continue
                    cmd = " ".join(proc.cmdline())[:120] or proc.name()
                except psutil.Error:
                    procs.pop(pid, None)
                    continue
                out.write(f"{stamp} {pct:5.0f}% pid {pid} {cmd}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
