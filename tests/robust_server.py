"""A trame_async server in its own process, instrumented for the robustness tests.

Usage: ``python tests/robust_server.py CONFIG_JSON [asyncio|uvloop]``

``CONFIG_JSON`` is a JSON object of :class:`trame_async.ServerConfig` fields. The process binds
127.0.0.1 on a port the OS picks and prints, one JSON object per line on stdout:

- at start: ``{"type": "listening", "port": N}``;
- on SIGUSR1: ``{"type": "stats", ...}`` (see :func:`_stats`);
- with ``"_report_disconnects": true`` in ``CONFIG_JSON``, for every ``on_disconnect``:
  ``{"type": "disconnect", "id": N, "reason": "NAME", "at": time.monotonic()}`` (the clock is
  system-wide, so a test can compare it with its own);
- on SIGTERM: it shuts the server down gracefully, prints ``{"type": "final", ...}`` and exits 0.

The stats count what a test must see to call the server healthy: ``on_disconnect`` reasons,
connections closed before their handshake (by reason), calls of the loop's exception handler (an
exception escaping a protocol callback lands there), log records at WARNING and above, and the
resources (RSS, open file descriptors, asyncio tasks, connections).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import signal
import sys
import time
from typing import Any

import psutil

import trame_async
from trame_async import DisconnectReason

_MAX_SAMPLES = 10


class _Counts:
    def __init__(self) -> None:
        self.reasons: collections.Counter[str] = collections.Counter()
        self.prehandshake: collections.Counter[str] = collections.Counter()
        self.exc_handler = 0
        self.exc_samples: list[str] = []
        self.errors = 0
        self.warnings = 0
        self.log_samples: list[str] = []


class _CountingHandler(logging.Handler):
    """Count WARNING+ records from every logger and pre-handshake closes from the server's."""

    def __init__(self, counts: _Counts) -> None:
        super().__init__(logging.INFO)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        counts = self.counts
        if record.levelno >= logging.ERROR:
            counts.errors += 1
        elif record.levelno >= logging.WARNING:
            counts.warnings += 1
        else:
            # server.py logs "connection from %s closed before handshake: %s (%s)".
            if (
                record.name == "trame_async.server"
                and "closed before handshake" in str(record.msg)
                and isinstance(record.args, tuple)
                and len(record.args) >= 2
            ):
                reason = record.args[1]
                name = reason.name if isinstance(reason, DisconnectReason) else str(reason)
                counts.prehandshake[name] += 1
            return
        if len(counts.log_samples) < _MAX_SAMPLES:
            try:
                text = record.getMessage()
            except Exception:  # a broken format string is itself worth reporting
                text = repr(record.msg)
            if record.exc_info and record.exc_info[1] is not None:
                text += f" [{record.exc_info[1]!r}]"
            counts.log_samples.append(f"{record.levelname} {record.name}: {text}")


def _stats(kind: str, server: trame_async.Server | None, counts: _Counts) -> dict[str, Any]:
    proc = psutil.Process()
    return {
        "type": kind,
        "rss": proc.memory_info().rss,
        "fds": proc.num_fds(),
        "tasks": len(asyncio.all_tasks()),
        "all": len(server._all) if server is not None else 0,
        "open": len(server.clients) if server is not None else 0,
        "reasons": dict(counts.reasons),
        "prehandshake": dict(counts.prehandshake),
        "exc_handler": counts.exc_handler,
        "exc_samples": counts.exc_samples,
        "errors": counts.errors,
        "warnings": counts.warnings,
        "log_samples": counts.log_samples,
        "slow_consumers": server.slow_consumers if server is not None else 0,
        "dropped_frames": server.dropped_frames if server is not None else 0,
        "peak_queued_bytes": server.peak_queued_bytes if server is not None else 0,
    }


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    counts = _Counts()

    def exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        counts.exc_handler += 1
        if len(counts.exc_samples) < _MAX_SAMPLES:
            counts.exc_samples.append(f"{context.get('message')} {context.get('exception')!r}")

    loop.set_exception_handler(exception_handler)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(_CountingHandler(counts))
    printer = logging.StreamHandler(sys.stderr)
    printer.setLevel(logging.WARNING)
    root.addHandler(printer)

    report = bool(config.pop("_report_disconnects", False))

    def on_disconnect(client: trame_async.RemoteClient, reason: DisconnectReason) -> None:
        counts.reasons[reason.name] += 1
        if report:
            _print(
                {
                    "type": "disconnect",
                    "id": client.id,
                    "reason": reason.name,
                    "at": time.monotonic(),
                }
            )

    server = await trame_async.start_server("127.0.0.1", 0, on_disconnect=on_disconnect, **config)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: _print(_stats("stats", server, counts)))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    _print({"type": "listening", "port": server.port})
    await stop.wait()
    server.close()
    await server.wait_closed()
    _print(_stats("final", server, counts))


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop_name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(cfg))
