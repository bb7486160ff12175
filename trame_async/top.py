"""``trame-top HOST:PORT``: a live terminal view of a server, from its metrics endpoint.

It reads ``/stats.json`` (``trame-serve --metrics``) once a second and draws, with ``rich``
(the ``top`` extra): totals, frames and bytes per second with a history graph of the last minute,
the event loop's lag, drops and cuts, and the clients table sorted by rate, RTT or queue. ``q``
quits and ``s`` changes the sort on a terminal; ``--once`` prints one snapshot and exits, for
scripts. The drawing is a pure function of two snapshots and the history (:func:`render`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from typing import Any

from .cli import OneLineErrors
from .client import TOKEN_ENV

__all__ = ["main", "rates", "render", "sparkline"]

SORTS = ("rate", "rtt", "queue")
_BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """Draw ``values`` (the newest last) as a line of block characters, ``width`` at most."""
    shown = list(values)[-width:]
    top = max(shown, default=0.0)
    if top <= 0:
        return _BLOCKS[0] * len(shown)
    return "".join(_BLOCKS[min(8, round(v / top * 8))] for v in shown)


def rates(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """Per-second rates between two snapshots: totals, and each client's frames in and bytes
    out (a client not in the previous snapshot counts from 0)."""
    if previous is None:
        return {"frames_in": 0.0, "deliveries": 0.0, "bytes": 0.0, "clients": {}}
    span = max(current["time"] - previous["time"], 1e-6)
    cur, prev = current["server"], previous["server"]
    before = {c["id"]: c for c in previous.get("clients", [])}
    per_client: dict[int, tuple[float, float]] = {}
    for client in current.get("clients", []):
        old = before.get(client["id"], {"frames_in": 0, "bytes_out": 0})
        per_client[client["id"]] = (
            max(0.0, (client["frames_in"] - old["frames_in"]) / span),
            max(0.0, (client["bytes_out"] - old["bytes_out"]) / span),
        )
    return {
        "frames_in": max(0.0, (cur["frames_in"] - prev["frames_in"]) / span),
        "deliveries": max(0.0, (cur["deliveries"] - prev["deliveries"]) / span),
        "bytes": max(0.0, (cur["bytes_relayed"] - prev["bytes_relayed"]) / span),
        "clients": per_client,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(
    previous: dict[str, Any] | None,
    current: dict[str, Any],
    history: Sequence[float],
    sort: str = "rate",
    limit: int = 20,
) -> Any:
    """Return the rich renderable of one refresh."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    server = current["server"]
    r = rates(previous, current)
    head = Text()
    head.append("trame-top", style="bold")
    head.append(
        f"  up {current['uptime']:.0f} s  clients {server['clients']}  connections "
        f"{server['connections']}  groups {server.get('groups', 0)}\n"
    )
    head.append(
        f"frames in {r['frames_in']:,.0f}/s  deliveries {r['deliveries']:,.0f}/s  "
        f"{_size(r['bytes'])}/s out  loop lag {current['loop_lag'] * 1000:.1f} ms "
        f"(max {current['loop_lag_max'] * 1000:.1f} ms)\n"
    )
    head.append(
        f"dropped {server['dropped_frames']}  slow consumers cut {server['slow_consumers']}  "
        f"congested {server['congested_clients']}  queued {_size(server['queued_bytes'])}\n"
    )
    head.append("deliveries/s, last minute: ")
    head.append(sparkline(history), style="green")
    table = Table(expand=False, title=f"clients (sorted by {sort})", title_justify="left")
    for column, justify in (
        ("id", "right"),
        ("address", "left"),
        ("rtt ms", "right"),
        ("in/s", "right"),
        ("out/s", "right"),
        ("queued", "right"),
        ("dropped", "right"),
        ("groups", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    per = r["clients"]

    def key(client: dict[str, Any]) -> float:
        if sort == "rtt":
            return float(client["rtt"]) if client["rtt"] is not None else -1.0
        if sort == "queue":
            return float(client["queued_bytes"])
        rate: float = per.get(client["id"], (0.0, 0.0))[0]
        return rate

    for client in sorted(current.get("clients", []), key=key, reverse=True)[:limit]:
        rate_in, rate_out = per.get(client["id"], (0.0, 0.0))
        rtt = client["rtt"]
        table.add_row(
            str(client["id"]),
            client["address"],
            "-" if rtt is None else f"{rtt * 1000:.1f}",
            f"{rate_in:,.0f}",
            _size(rate_out) + "/s",
            _size(client["queued_bytes"]),
            str(client["dropped"]),
            " ".join(client["groups"]),
        )
    more = current.get("clients_total", 0) - len(table.rows)
    footer = Text(f"... and {more} more\n" if more > 0 else "")
    footer.append("q quits, s changes the sort", style="dim")
    return Group(head, table, footer)


def _fetch(url: str, timeout: float, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``trame-top``."""
    p = OneLineErrors(
        prog="trame-top",
        description="A live view of a trame_async server, from its metrics endpoint.",
        epilog="example: trame-serve --metrics 9100 &  trame-top 127.0.0.1:9100 --sort queue",
    )
    p.add_argument("address", metavar="HOST:PORT", help="the server's --metrics address")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period")
    p.add_argument("--sort", choices=SORTS, default="rate", help="clients table order")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="clients shown")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--token",
        default=None,
        help="the server's token, for an endpoint beyond loopback (default: $TRAME_TOKEN)",
    )
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="refreshes, then exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trame-top``; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.interval > 0:
        parser.error("--interval must be a positive number of seconds")
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("trame-top: needs rich: pip install 'trame-async[top]'", file=sys.stderr)
        return 1
    host, sep, port = args.address.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"HOST:PORT expected, not {args.address!r}")
    url = f"http://{host or '127.0.0.1'}:{port}/stats.json?limit={max(args.limit, 1) * 5}"
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    console = Console()
    history: deque[float] = deque(maxlen=60)
    previous: dict[str, Any] | None = None
    sort = args.sort

    def sample() -> dict[str, Any] | None:
        try:
            return _fetch(url, timeout=max(args.interval, 2.0), token=token)
        except (OSError, urllib.error.URLError, ValueError) as err:
            print(f"trame-top: cannot read {url}: {err}", file=sys.stderr)
            return None

    current = sample()
    if current is None:
        return 1
    if args.once:
        # Two samples one interval apart, so that the rates mean something.
        time.sleep(min(args.interval, 1.0))
        previous, current = current, sample()
        if current is None:
            return 1
        history.append(rates(previous, current)["deliveries"])
        console.print(render(previous, current, history, sort, args.limit))
        return 0
    keys = _Keys()
    try:
        with Live(render(None, current, history, sort, args.limit), console=console) as live:
            count = 0
            while args.iterations is None or count < args.iterations:
                count += 1
                key = keys.wait(args.interval)
                if key == "q":
                    break
                if key == "s":
                    sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                previous, current = current, sample()
                if current is None:
                    return 1
                history.append(rates(previous, current)["deliveries"])
                live.update(render(previous, current, history, sort, args.limit))
    except KeyboardInterrupt:
        pass
    finally:
        keys.close()
    return 0


class _Keys:
    """Single key presses on a terminal (cbreak mode, restored at the end); elsewhere a sleep."""

    def __init__(self) -> None:
        self._saved: Any = None
        if sys.stdin.isatty():
            import termios
            import tty

            fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)

    def wait(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` seconds; return the key pressed, if any."""
        if self._saved is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        return sys.stdin.read(1) if ready else None

    def close(self) -> None:
        if self._saved is not None:
            import termios

            with contextlib.suppress(OSError):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
