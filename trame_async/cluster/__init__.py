"""Foundations of a cluster of trame servers joined through NATS (sans-I/O, no asyncio).

- :mod:`.envelope`: frames batched per loop iteration into bounded envelopes, and their decoder;
- :mod:`.gaps`: per-sender sequence checks on the receiving side (duplicates, gaps, restarts);
- :mod:`.outbox`: the ordered outbox, bounded in bytes and age, that holds envelopes while NATS
  is unreachable.

None of these imports asyncio or a NATS client: the adapter that publishes, subscribes and arms
timers is built on top of them (docs/cluster.md says what exists and what remains to build).
"""

from __future__ import annotations

from .config import MAX_NODES, NODE_ID_BITS, ClusterConfig, parse_urls
from .envelope import (
    DEFAULT_MAX_ENVELOPE,
    DEFAULT_MAX_PAYLOAD,
    ENVELOPE_HEAD,
    ENVELOPE_MAGIC,
    ENVELOPE_VERSION,
    RELAY_KINDS,
    Batch,
    Batcher,
    Envelope,
    EnvelopeError,
    decode,
    encode,
)
from .gaps import DUPLICATE, ECHO, STALE, GapCounters, GapTracker
from .outbox import ClusterOutbox, OutboxDrops, OutboxLimits

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "DEFAULT_MAX_PAYLOAD",
    "DUPLICATE",
    "ECHO",
    "ENVELOPE_HEAD",
    "ENVELOPE_MAGIC",
    "ENVELOPE_VERSION",
    "MAX_NODES",
    "NODE_ID_BITS",
    "RELAY_KINDS",
    "STALE",
    "Batch",
    "Batcher",
    "ClusterConfig",
    "ClusterOutbox",
    "Envelope",
    "EnvelopeError",
    "GapCounters",
    "GapTracker",
    "OutboxDrops",
    "OutboxLimits",
    "decode",
    "encode",
    "parse_urls",
]
