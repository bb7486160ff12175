"""Per-sender sequence checks of received envelopes: duplicates, gaps, restarts (no asyncio).

Theory of operation
-------------------
NATS delivers at most once: a subscriber cut for being slow, a route that breaks, a sender whose
outage outbox overflowed, and envelopes are gone. They cannot always be saved, but they are
always *seen*: every envelope carries (node, epoch, seq), seq going up by one per envelope of a
(node, stream) counter (:mod:`.envelope`). A :class:`GapTracker` keeps, per (stream, node), the
epoch and the next sequence number it expects, and :meth:`GapTracker.accept` classifies each
envelope:

============================  =================================  =========================
envelope                      verdict                            counted in
============================  =================================  =========================
first from (stream, node)     deliver; expectation set           ``first_contacts``
same epoch, seq == expected   deliver                            ``envelopes``
same epoch, seq > expected    deliver; ``seq - expected`` lost   ``gaps``, ``missed``
same epoch, seq < expected    drop (already delivered)           ``duplicates``
larger epoch                  deliver; new counter life, its     ``resets``, ``missed``
                              first ``seq`` envelopes lost       (and ``gaps`` if seq > 0)
smaller epoch                 drop (an old life, overtaken)      ``stale``
from this node itself         drop (echo)                        ``echoes``
============================  =================================  =========================

A larger epoch is a restarted process or a stream counter the sender retired and opened again;
both start at seq 0, so the first ``seq`` envelopes of the new life went missing while this node
listened. The first envelope ever seen from a (stream, node) sets the expectation without
counting anything lost: this node was not listening before.

:meth:`forget_stream` must be called when this node unsubscribes from a stream (what is
published meanwhile is not lost *for it*), :meth:`forget_node` when a node is forgotten (gone long
enough not to come back with the same epoch).
Counters are kept per node and in total (:meth:`counters`); totals survive :meth:`forget_node`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

__all__ = ["DUPLICATE", "ECHO", "STALE", "GapCounters", "GapTracker"]

#: :meth:`GapTracker.accept`: drop, already delivered.
DUPLICATE: Final = -1
#: :meth:`GapTracker.accept`: drop, from an older epoch than one already seen.
STALE: Final = -2
#: :meth:`GapTracker.accept`: drop, this node's own envelope.
ECHO: Final = -3


@dataclass(slots=True)
class GapCounters:
    """What a :class:`GapTracker` saw, since the start (all counts of envelopes)."""

    #: Envelopes accepted for delivery.
    envelopes: int = 0
    #: Envelopes known lost: the sum of the holes.
    missed: int = 0
    #: Holes in a sequence (each one or more envelopes missed).
    gaps: int = 0
    #: Envelopes dropped as already delivered.
    duplicates: int = 0
    #: Envelopes dropped as coming from an epoch older than one already seen.
    stale: int = 0
    #: New counter lives (restarted sender, or reopened stream).
    resets: int = 0
    #: First envelopes from a (stream, node) never seen before (or forgotten since).
    first_contacts: int = 0
    #: This node's own envelopes, dropped.
    echoes: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name (for stats and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class GapTracker:
    """The expected next envelope of every (stream, node) this node receives, and counters."""

    __slots__ = ("_expect", "_nodes", "own", "total")

    def __init__(self, own: int | None = None) -> None:
        """Track envelopes received by node ``own``, whose own envelopes are dropped as echoes."""
        self.own = own
        # stream -> node -> [epoch, next seq]
        self._expect: dict[str, dict[int, list[int]]] = {}
        self._nodes: dict[int, GapCounters] = {}
        #: Counters over every node, including forgotten ones.
        self.total = GapCounters()

    def accept(self, stream: str, node: int, epoch: int, seq: int) -> int:
        """Classify an envelope received on ``stream``.

        Return how many envelopes of that stream were missed just before it (0 or more; deliver
        it), or :data:`DUPLICATE`, :data:`STALE` or :data:`ECHO` (drop it). Every outcome is
        counted.
        """
        total = self.total
        mine = self._nodes.get(node)
        if mine is None:
            mine = self._nodes[node] = GapCounters()
        if node == self.own:
            mine.echoes += 1
            total.echoes += 1
            return ECHO
        senders = self._expect.get(stream)
        if senders is None:
            senders = self._expect[stream] = {}
        state = senders.get(node)
        if state is None:
            senders[node] = [epoch, seq + 1]
            mine.first_contacts += 1
            total.first_contacts += 1
            missed = 0
        else:
            known, expected = state
            if epoch == known:
                if seq < expected:
                    mine.duplicates += 1
                    total.duplicates += 1
                    return DUPLICATE
                missed = seq - expected
            elif epoch > known:
                state[0] = epoch
                mine.resets += 1
                total.resets += 1
                missed = seq
            else:
                mine.stale += 1
                total.stale += 1
                return STALE
            state[1] = seq + 1
            if missed:
                mine.gaps += 1
                total.gaps += 1
                mine.missed += missed
                total.missed += missed
        mine.envelopes += 1
        total.envelopes += 1
        return missed

    def counters(self, node: int | None = None) -> GapCounters:
        """Return the counters of ``node`` (a copy; zeros for an unknown node), or the totals."""
        if node is None:
            source = self.total
        else:
            source = self._nodes.get(node) or GapCounters()
        return GapCounters(**source.as_dict())

    def nodes(self) -> list[int]:
        """Return the nodes heard from (and not forgotten), in the order first heard."""
        return list(self._nodes)

    def expected(self, stream: str, node: int) -> tuple[int, int] | None:
        """Return (epoch, next seq) expected from ``node`` on ``stream``, or None."""
        state = self._expect.get(stream, {}).get(node)
        return None if state is None else (state[0], state[1])

    def expect(self, stream: str, node: int, epoch: int, next_seq: int) -> None:
        """Set what comes next from ``node`` on ``stream`` (a snapshot covered what was before):
        a later envelope before ``next_seq`` is a duplicate, one after it a gap."""
        self._expect.setdefault(stream, {})[node] = [epoch, next_seq]

    def lost_tail(self, stream: str, node: int, epoch: int, next_seq: int) -> int:
        """Count as missed the envelopes of ``node`` on ``stream`` before ``next_seq`` that never
        came (its heartbeat said they were sent); return how many. Nothing is counted for
        another epoch or an unknown stream."""
        state = self._expect.get(stream, {}).get(node)
        if state is None or state[0] != epoch or state[1] >= next_seq:
            return 0
        missed = next_seq - state[1]
        state[1] = next_seq
        mine = self._nodes.get(node)
        if mine is None:
            mine = self._nodes[node] = GapCounters()
        for counters in (mine, self.total):
            counters.gaps += 1
            counters.missed += missed
        return missed

    def forget_stream(self, stream: str) -> None:
        """Drop the expectations for ``stream``: this node unsubscribed from it."""
        self._expect.pop(stream, None)

    def forget_node(self, node: int) -> None:
        """Drop the expectations and counters of ``node`` (gone); the totals keep its counts."""
        for senders in self._expect.values():
            senders.pop(node, None)
        self._nodes.pop(node, None)
