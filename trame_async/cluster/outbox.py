"""The envelopes that wait while NATS is unreachable: ordered, bounded in bytes and age (no asyncio).

Theory of operation
-------------------
Local delivery never waits on NATS; what is meant for the other nodes does. While the node's NATS
connection is down, the adapter :meth:`~ClusterOutbox.push`\\ es every sealed
:class:`~.envelope.Batch` here instead of publishing it (and turns the NATS client's own
reconnect buffer off, so that this is the only buffer and it is bounded). When NATS is back and
the node has resubscribed, :meth:`~ClusterOutbox.take` hands the envelopes back in the order they
were pushed, capped per call so that the replay is paced. While anything waits, a fresh batch
must be pushed too, not published ahead of it: order is per publisher.

Two bounds, each None to disable (then the outbox may hold everything an outage produces):

- ``max_bytes``: past it, the oldest envelopes go (a single envelope above it goes at once);
- ``max_age`` (seconds): an envelope pushed at ``t`` goes at ``t + max_age`` (stale game or
  sensor state is worse than none). :attr:`~ClusterOutbox.next_expiry` says when the next one
  is due, for the adapter's one timer; :meth:`~ClusterOutbox.expire`, :meth:`push` and
  :meth:`take` drop what is due.

Every drop is counted, as envelopes and as frames, by reason (:attr:`~ClusterOutbox.dropped`).
Each dropped envelope is a hole in its stream's sequence that receivers count as missed, so the
two sides' counts can be compared exactly. Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import Final

from .envelope import Batch

__all__ = ["ClusterOutbox", "OutboxDrops", "OutboxLimits"]

_INF: Final = float("inf")


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds of a :class:`ClusterOutbox`: bytes of envelopes, seconds of age; None: no bound."""

    max_bytes: int | None = 8 << 20
    max_age: float | None = 5.0

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, not {self.max_bytes}")
        if self.max_age is not None and not self.max_age >= 0:
            raise ValueError(f"max_age must be >= 0 or None, not {self.max_age}")


@dataclass(slots=True)
class OutboxDrops:
    """What a :class:`ClusterOutbox` dropped since the start."""

    #: Envelopes dropped because they waited ``max_age``.
    envelopes_by_age: int = 0
    #: Their frames.
    frames_by_age: int = 0
    #: Envelopes dropped to stay under ``max_bytes``.
    envelopes_by_bytes: int = 0
    #: Their frames.
    frames_by_bytes: int = 0
    #: Messages without frames (a node's replies) dropped for either reason; not envelopes, so
    #: not in :attr:`envelopes`: the receivers count only envelopes as missed.
    control: int = 0

    @property
    def envelopes(self) -> int:
        """Envelopes dropped, for either reason."""
        return self.envelopes_by_age + self.envelopes_by_bytes

    @property
    def frames(self) -> int:
        """Frames dropped, for either reason."""
        return self.frames_by_age + self.frames_by_bytes

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name, with the two sums (for stats and logs)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["envelopes"] = self.envelopes
        out["frames"] = self.frames
        return out


class ClusterOutbox:
    """Sealed envelopes waiting for NATS, oldest first, within :class:`OutboxLimits`."""

    __slots__ = ("_queue", "dropped", "limits", "size")

    def __init__(self, limits: OutboxLimits | None = None) -> None:
        """Make an empty outbox bounded by ``limits`` (the defaults when None)."""
        self.limits = limits if limits is not None else OutboxLimits()
        self._queue: deque[tuple[float, Batch]] = deque()
        #: Bytes of the envelopes waiting.
        self.size = 0
        #: What was dropped since the start.
        self.dropped = OutboxDrops()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def frames(self) -> int:
        """Frames in the envelopes waiting."""
        return sum(batch.nframes for _, batch in self._queue)

    @property
    def next_expiry(self) -> float:
        """When the oldest envelope passes ``max_age`` (inf: nothing waits or no age bound)."""
        age = self.limits.max_age
        if age is None or not self._queue:
            return _INF
        return self._queue[0][0] + age

    def push(self, batch: Batch, now: float) -> None:
        """Append ``batch``, sealed at ``now``; drop what passes either bound (counted)."""
        self.expire(now)
        self._queue.append((now, batch))
        self.size += len(batch.data)
        cap = self.limits.max_bytes
        if cap is not None and self.size > cap:
            queue = self._queue
            drops = self.dropped
            while self.size > cap:
                _, old = queue.popleft()
                self.size -= len(old.data)
                if not old.nframes:
                    drops.control += 1
                    continue
                drops.envelopes_by_bytes += 1
                drops.frames_by_bytes += old.nframes

    def expire(self, now: float) -> int:
        """Drop the envelopes that waited ``max_age`` at ``now``; return how many went."""
        age = self.limits.max_age
        if age is None:
            return 0
        queue = self._queue
        limit = now - age
        drops = self.dropped
        n = 0
        while queue and queue[0][0] <= limit:
            _, old = queue.popleft()
            self.size -= len(old.data)
            n += 1
            if not old.nframes:
                drops.control += 1
                continue
            drops.envelopes_by_age += 1
            drops.frames_by_age += old.nframes
        return n

    def take(self, now: float, max_bytes: int | None = None) -> list[Batch]:
        """Remove and return the oldest envelopes still in age at ``now``, in order.

        With ``max_bytes``, about that many bytes (at least one envelope), so that a replay can
        be paced over several calls; otherwise everything.
        """
        self.expire(now)
        queue = self._queue
        if max_bytes is None or self.size <= max_bytes:
            out = [batch for _, batch in queue]
            queue.clear()
            self.size = 0
            return out
        out = []
        taken = 0
        while queue:
            n = len(queue[0][1].data)
            if out and taken + n > max_bytes:
                break
            out.append(queue.popleft()[1])
            taken += n
        self.size -= taken
        return out

    def peek(self, now: float) -> Batch | None:
        """Return the oldest envelope still in age at ``now`` without removing it (None: empty).

        A publisher sends it, then :meth:`pop` s it: an envelope the send refused stays first.
        """
        self.expire(now)
        return self._queue[0][1] if self._queue else None

    def pop(self) -> None:
        """Remove the oldest envelope (the one :meth:`peek` returned, now sent)."""
        _, batch = self._queue.popleft()
        self.size -= len(batch.data)

    def clear(self) -> int:
        """Forget every waiting envelope without counting it (the node shuts down); return how
        many there were."""
        n = len(self._queue)
        self._queue.clear()
        self.size = 0
        return n
