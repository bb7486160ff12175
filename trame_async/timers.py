"""A timer wheel: many deadlines behind one event-loop timer (no asyncio).

Ten thousand connections each needing a heartbeat timer every second would be ten thousand
``TimerHandle`` objects pushed through the loop's heap. The wheel quantises deadlines into slots of
``resolution`` seconds and keeps one list per slot; the adapter arms a single ``call_at`` for the
earliest slot. A deadline fires no earlier than asked and at most one ``resolution`` late.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TimerWheel"]

_K = TypeVar("_K", bound=Hashable)


class TimerWheel(Generic[_K]):
    """Deadlines for hashable items, one pending deadline per item."""

    __slots__ = ("_heap", "_res", "_slots", "_where")

    def __init__(self, resolution: float) -> None:
        """Make a wheel whose slots are ``resolution`` seconds wide."""
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self._res = resolution
        # slot -> its items (a dict: ordered, and O(1) removal when an item moves or is cancelled,
        # so a closed connection is released at once rather than when its old slot comes due).
        self._slots: dict[int, dict[_K, None]] = {}
        self._heap: list[int] = []
        self._where: dict[_K, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def schedule(self, item: _K, when: float) -> None:
        """Set ``item``'s deadline to ``when`` (replacing any earlier one)."""
        slot = math.ceil(when / self._res)
        old = self._where.get(item)
        if old == slot:
            return
        if old is not None:
            del self._slots[old][item]
        self._where[item] = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = {item: None}
            heapq.heappush(self._heap, slot)
        else:
            bucket[item] = None

    def cancel(self, item: _K) -> None:
        """Forget ``item``'s deadline, if any."""
        slot = self._where.pop(item, None)
        if slot is not None:
            del self._slots[slot][item]

    def deadline(self, item: _K) -> float | None:
        """Return when ``item`` will fire (its slot's time), or None."""
        slot = self._where.get(item)
        return None if slot is None else slot * self._res

    def next_time(self) -> float | None:
        """Return the time of the earliest non-empty slot, or None when nothing is scheduled."""
        heap = self._heap
        while heap:
            slot = heap[0]
            if self._slots[slot]:
                return slot * self._res
            heapq.heappop(heap)
            del self._slots[slot]
        return None

    def pop_due(self, now: float) -> list[_K]:
        """Remove and return the items whose deadline is at or before ``now``."""
        due: list[_K] = []
        limit = math.floor(now / self._res + 1e-9)
        heap = self._heap
        where = self._where
        while heap and heap[0] <= limit:
            slot = heapq.heappop(heap)
            bucket = self._slots.pop(slot)
            for item in bucket:
                del where[item]
            due.extend(bucket)
        return due
