"""Metrics for the people who run a server: Prometheus text and a JSON snapshot over HTTP.

``await serve_metrics(server, "127.0.0.1", 9100)`` starts a small HTTP/1.1 endpoint beside the
relay, in the same event loop:

- ``GET /metrics``: the Prometheus text format, from ``prometheus_client`` (the ``metrics``
  extra: ``pip install 'trame-async[metrics]'``);
- ``GET /stats.json``: the same figures as one JSON object, plus the clients table (what
  ``trame-top`` draws); ``?limit=N&sort=queued_bytes|rtt|frames_in|bytes_out``.

Everything is read from the server when asked (a custom collector): the relay keeps no metric
per recipient, and a scrape costs one pass over the connected clients. A sampler task measures
the event loop's lag (how late a timer fires) four times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import RemoteClient, Server

__all__ = ["MetricsServer", "serve_metrics", "snapshot"]

#: Buckets of the heartbeat RTT histogram, in seconds.
RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_LAG_PERIOD = 0.25
_SORT_KEYS = ("queued_bytes", "rtt", "frames_in", "bytes_out")


class LoopLag:
    """Samples the event loop's lag: how much later than asked a timer fires."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: The latest sample, in seconds.
        self.last = 0.0
        self._window: deque[tuple[float, float]] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def max(self) -> float:
        """The largest sample of the last 10 s."""
        return max((lag for _, lag in self._window), default=0.0)

    def start(self) -> None:
        self._due = self._loop.time() + _LAG_PERIOD
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self._loop.time()
        self.last = max(0.0, now - self._due)
        window = self._window
        window.append((now, self.last))
        while window and window[0][0] < now - 10.0:
            window.popleft()
        self._due = now + _LAG_PERIOD
        self._handle = self._loop.call_at(self._due, self._tick)


def _client_row(client: RemoteClient) -> dict[str, Any]:
    address = client.address
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        shown = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    else:
        shown = str(address)
    outbox = client.outbox
    return {
        "id": client.id,
        "address": shown,
        "connected_since": client.connected_since,
        "rtt": client.rtt,
        "frames_in": client.frames_in,
        "bytes_in": client.bytes_in,
        "bytes_out": outbox.written,
        "queued_bytes": client.queued_bytes,
        "dropped": outbox.dropped,
        "congested": outbox.congested,
        "groups": sorted(client.groups),
    }


def snapshot(
    server: Server,
    lag: LoopLag | None = None,
    *,
    limit: int = 1000,
    sort: str = "queued_bytes",
    started: float | None = None,
) -> dict[str, Any]:
    """Return the JSON snapshot of ``server`` (the ``/stats.json`` document)."""
    rows = [_client_row(c) for c in server.clients]
    if sort in _SORT_KEYS:
        rows.sort(key=lambda r: r[sort] if r[sort] is not None else -1.0, reverse=True)
    trames = {code: [frames, size] for code, (frames, size) in sorted(server.trames_in.items())}
    now = time.time()
    return {
        "time": now,
        "uptime": now - (started if started is not None else now),
        "loop_lag": lag.last if lag is not None else 0.0,
        "loop_lag_max": lag.max if lag is not None else 0.0,
        "server": server.stats(),
        "trames_in": trames,
        "clients": rows[: max(0, limit)],
        "clients_total": len(rows),
    }


class _Collector:
    """A prometheus_client collector reading one server at scrape time."""

    def __init__(self, server: Server, lag: LoopLag) -> None:
        self._server = server
        self._lag = lag

    def describe(self) -> list[Any]:
        return []  # no registration-time collection: the server may have no client yet

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeHistogramMetricFamily,
            GaugeMetricFamily,
        )

        server = self._server
        stats = server.stats()
        gauges = {
            "clients": ("Clients connected (handshake done).", stats["clients"]),
            "connections": ("Connections, handshaking and closing included.", stats["connections"]),
            "handshaking": ("Connections still in their handshake.", stats["handshaking"]),
            "congested_clients": (
                "Clients whose transport is above write_high_water.",
                stats["congested_clients"],
            ),
            "queued_bytes": ("Bytes queued for all clients in user space.", stats["queued_bytes"]),
            "pending_bytes": ("Bytes in all the outboxes.", stats["pending_bytes"]),
            "groups": ("Live multicast groups.", stats["groups"]),
            "memberships": ("Group memberships of connected clients.", stats["memberships"]),
            "last_values_bytes": (
                "Bytes of the last values kept by all groups.",
                stats["last_values_bytes"],
            ),
            "publishers_paused": (
                "1 while reading from publishers waits (pace mode, server-wide budget).",
                int(stats["publishers_paused"]),
            ),
            "loop_lag_seconds": ("Latest event-loop lag sample.", self._lag.last),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"trame_{name}", doc, value=value)
        worst = max((c.queued_bytes for c in server.clients), default=0)
        yield GaugeMetricFamily(
            "trame_queued_bytes_worst_client", "Most bytes queued for one client.", value=worst
        )
        counters = {
            "frames_in": ("MULTICAST and DATA frames received.", stats["frames_in"]),
            "deliveries": ("Frames queued for clients (one per recipient).", stats["deliveries"]),
            "bytes_relayed": ("Bytes of frames queued for clients.", stats["bytes_relayed"]),
            "dropped_frames": ("Frames dropped by the drop policies.", stats["dropped_frames"]),
            "slow_consumers": ("Clients cut as slow consumers.", stats["slow_consumers"]),
            "budget_pauses": ("Passes of the server-wide budget.", stats["budget_pauses"]),
            "budget_sheds": ("Clients shed for the server-wide budget.", stats["budget_sheds"]),
            "last_values_dropped": (
                "Group last values evicted by their bounds.",
                stats["last_values_dropped"],
            ),
            "last_values_skipped": (
                "Last values left out for late joiners (past half of max_queue_bytes).",
                stats["last_values_skipped"],
            ),
            "connects": ("Clients that completed their handshake.", server.connects),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"trame_{name}", doc, value=value)
        reasons = CounterMetricFamily(
            "trame_disconnects", "Connections ended, by reason.", labels=["reason"]
        )
        for reason, count in stats["disconnects"].items():
            reasons.add_metric([reason], count)
        yield reasons
        by_code = CounterMetricFamily(
            "trame_trame_frames_in", "Frames received, by trame code.", labels=["trame"]
        )
        by_code_bytes = CounterMetricFamily(
            "trame_trame_bytes_in", "Bytes of frames received, by trame code.", labels=["trame"]
        )
        for code, (frames, size) in server.trames_in.items():
            by_code.add_metric([code], frames)
            by_code_bytes.add_metric([code], size)
        yield by_code
        yield by_code_bytes
        cluster = stats.get("cluster")
        if cluster is not None:
            yield from _cluster_metrics(cluster)
        rtts = [c.rtt for c in server.clients if c.rtt is not None]
        buckets: list[tuple[str, float]] = []
        for edge in RTT_BUCKETS:
            buckets.append((repr(edge), float(sum(1 for r in rtts if r <= edge))))
        buckets.append(("+Inf", float(len(rtts))))
        yield GaugeHistogramMetricFamily(
            "trame_heartbeat_rtt_seconds",
            "Heartbeat round-trip times of the connected clients, now.",
            buckets=buckets,
            gsum_value=sum(rtts),
        )


#: Cluster figures exported (server.stats()["cluster"]): name -> (kind, help).
_CLUSTER_METRICS = {
    "nodes": ("gauge", "Other nodes of the cluster heard from and live."),
    "groups_followed": ("gauge", "Group subjects this node follows on NATS."),
    "outbox_envelopes": ("gauge", "Envelopes waiting for NATS."),
    "outbox_bytes": ("gauge", "Bytes of envelopes waiting for NATS."),
    "envelopes_out": ("counter", "Envelopes published on NATS."),
    "frames_out": ("counter", "Frames published on NATS."),
    "envelopes_in": ("counter", "Envelopes received from other nodes."),
    "frames_in": ("counter", "Frames received from other nodes."),
    "outbox_dropped_envelopes": ("counter", "Envelopes dropped by the outbox bounds."),
    "outbox_dropped_frames": ("counter", "Frames dropped by the outbox bounds (other nodes)."),
    "oversize_dropped": ("counter", "Frames too large to cross NATS (local clients got them)."),
    "publish_dropped_frames": ("counter", "Frames in messages NATS refused (other nodes)."),
    "shutdown_dropped_frames": ("counter", "Frames for other nodes dropped at a shutdown."),
    "snapshot_values_skipped": ("counter", "Last values too large for a snapshot."),
    "buffer_dropped": (
        "counter",
        "Envelopes dropped from a group's first-join buffer and not covered by its snapshot.",
    ),
    "missed": ("counter", "Envelopes from other nodes lost in NATS (sequence gaps)."),
    "gaps": ("counter", "Sequence gaps seen."),
    "tail_missed": ("counter", "Envelopes found lost at a stream's tail by heartbeats."),
    "duplicates": ("counter", "Envelopes received twice and dropped."),
    "malformed_in": ("counter", "Malformed messages on the cluster's subjects."),
    "nodes_lost": ("counter", "Nodes declared gone (silent past dead_after)."),
    "nodes_returned": ("counter", "Nodes heard again after being declared gone."),
    "snapshot_timeouts": ("counter", "Snapshot requests not fully answered in time."),
    "deaf": ("counter", "Deaf subscriptions found by the self-probe."),
    "rebuilds": ("counter", "NATS connections rebuilt."),
    "disconnects": ("counter", "NATS connection losses."),
    "reconnects": ("counter", "NATS reconnections."),
}


def _cluster_metrics(cluster: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for name, (kind, doc) in _CLUSTER_METRICS.items():
        family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        yield family(f"trame_cluster_{name}", doc, value=cluster[name])
    yield GaugeMetricFamily(
        "trame_cluster_connected",
        "1 while the node's NATS connection is up.",
        value=int(cluster["state"] == "connected"),
    )


class MetricsServer:
    """The running metrics endpoint; :meth:`close` and :meth:`wait_closed` stop it."""

    def __init__(self, server: Server, token: str | bytes | None = None) -> None:
        self._relay = server
        # With a token, every request must carry "Authorization: Bearer <token>".
        self._auth = (
            None
            if token is None
            else b"bearer " + (token.encode() if isinstance(token, str) else token)
        )
        self._lag = LoopLag(asyncio.get_running_loop())
        self._started = time.time()
        self._http: asyncio.Server | None = None
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:  # pragma: no cover - the extra is in the test extra
            self._registry: Any = None
        else:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(server, self._lag))

    @property
    def port(self) -> int:
        """The port the endpoint listens on."""
        assert self._http is not None
        port: int = self._http.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str, port: int) -> None:
        self._relay.track_trames = True
        self._http = await asyncio.start_server(self._handle, host, port)
        self._lag.start()

    def close(self) -> None:
        """Stop listening and sampling."""
        self._lag.stop()
        if self._http is not None:
            self._http.close()

    async def wait_closed(self) -> None:
        if self._http is not None:
            await self._http.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            if self._auth is not None and not _authorized(request, self._auth):
                self._reply(writer, 401, "text/plain", b"send Authorization: Bearer <token>\n")
                return
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != "GET":
                self._reply(writer, 405, "text/plain", b"only GET\n")
                return
            url = urllib.parse.urlsplit(parts[1])
            query = urllib.parse.parse_qs(url.query)
            if url.path == "/metrics":
                if self._registry is None:
                    self._reply(
                        writer,
                        503,
                        "text/plain",
                        b"prometheus_client is not installed: pip install 'trame-async[metrics]'\n",
                    )
                    return
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                self._reply(writer, 200, CONTENT_TYPE_LATEST, generate_latest(self._registry))
            elif url.path == "/stats.json":
                try:
                    limit = int(query.get("limit", ["1000"])[0])
                except ValueError:
                    limit = 1000
                sort = query.get("sort", ["queued_bytes"])[0]
                body = snapshot(
                    self._relay, self._lag, limit=limit, sort=sort, started=self._started
                )
                self._reply(writer, 200, "application/json", json.dumps(body).encode())
            else:
                self._reply(writer, 404, "text/plain", b"/metrics or /stats.json\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, status: int, kind: str, body: bytes) -> None:
        reason = {
            200: "OK",
            401: "Unauthorized",
            404: "Not Found",
            405: "Method Not Allowed",
        }.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)


def _authorized(request: bytes, expected: bytes) -> bool:
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            given = value.strip()
            scheme, _, secret = given.partition(b" ")
            return hmac.compare_digest(scheme.lower() + b" " + secret.strip(), expected)
    return False


async def serve_metrics(
    server: Server,
    host: str = "127.0.0.1",
    port: int = 9100,
    *,
    token: str | bytes | None = None,
) -> MetricsServer:
    """Start the metrics endpoint of ``server`` on ``host:port`` (port 0: the OS picks).

    Loopback by default: the figures say who is connected from where. With ``token``, every
    request must send ``Authorization: Bearer <token>`` (401 otherwise), compared in constant
    time; ``trame-serve`` requires it for an address beyond loopback.
    """
    metrics = MetricsServer(server, token)
    await metrics.start(host, port)
    return metrics
