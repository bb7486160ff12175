"""The settings of one cluster node: where NATS is, how the node names itself, its timers and
bounds. Plain data, checked at construction (no I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["MAX_NODES", "NODE_ID_BITS", "ClusterConfig", "parse_urls"]

#: Bits of a cluster-wide client id that number the connections of one node; the bits above
#: them hold the node's index (docs/protocol.md, "Client ids in a cluster").
NODE_ID_BITS: Final = 22
#: Node indexes are 0 .. MAX_NODES - 1.
MAX_NODES: Final = 1 << (32 - NODE_ID_BITS)
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """Split ``"nats://h1:4222,nats://h2:4222"`` (or a sequence of such strings) into URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if "://" not in part:
                part = "nats://" + part
            out.append(part)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How a server joins a cluster of trame servers through NATS (``serve(cluster=...)``).

    Times in seconds, sizes in bytes. Every node of one cluster must use the same ``name`` and
    should use the same timers.
    """

    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    """NATS servers to connect to (any of them; the client fails over between them)."""
    name: str = "trame"
    """The cluster's name: the first token of its NATS subjects, so that several deployments
    can share one NATS (letters, digits, ``_`` and ``-``)."""
    node_index: int | None = None
    """This node's index in ``0 .. 1023``: the high bits of its clients' ids. None: pick a free
    one at start (from the live nodes' answers on ``.ctl.who``); give one explicitly to keep
    ids stable."""
    heartbeat_interval: float = 1.0
    """Every node announces itself on NATS this often."""
    dead_after: float = 3.0
    """A node not heard from for this long is gone: its members and last values are removed."""
    snapshot_timeout: float = 1.0
    """How long a node gaining its first member in a group waits for the other nodes' presence
    and last values (the join is answered when all live nodes replied, or at this deadline)."""
    probe_interval: float = 2.0
    """The node sends itself a probe through NATS this often (the deaf-subscription check)."""
    probe_timeout: float = 1.0
    """A probe not back within this long means a deaf connection: it is rebuilt."""
    outbox_max_bytes: int | None = 8 << 20
    """While NATS is unreachable, envelopes for the cluster wait, up to this many bytes."""
    outbox_max_age: float | None = 5.0
    """... and at most this long; beyond either bound the oldest are dropped and counted."""
    max_envelope: int = 256 << 10
    """A batch of frames is split before one NATS message passes this many bytes."""
    connect_timeout: float = 2.0
    """Timeout of one connection attempt to a NATS server."""
    reconnect_wait: float = 0.5
    """Longest wait between reconnection attempts (full jitter below it)."""
    nats_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Extra keyword arguments for ``nats.connect`` (credentials, TLS, ``user_credentials``...)."""

    def __post_init__(self) -> None:
        urls = parse_urls(self.urls)
        if not urls:
            raise ValueError("a cluster needs at least one NATS URL (nats://host:4222)")
        object.__setattr__(self, "urls", urls)
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"cluster name {self.name!r} must be 1 to 64 letters, digits, '_' or '-' "
                f"(it is a NATS subject token)"
            )
        if self.node_index is not None and not 0 <= self.node_index < MAX_NODES:
            raise ValueError(
                f"node_index must be between 0 and {MAX_NODES - 1}, not {self.node_index}"
            )
        for name in (
            "heartbeat_interval",
            "dead_after",
            "snapshot_timeout",
            "probe_interval",
            "probe_timeout",
            "connect_timeout",
            "reconnect_wait",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be more than 0 seconds, not {value}")
        if self.dead_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"dead_after ({self.dead_after}) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}): one late heartbeat must not declare a node gone"
            )
        if self.max_envelope < 1024:
            raise ValueError(f"max_envelope must be at least 1024 bytes, not {self.max_envelope}")
