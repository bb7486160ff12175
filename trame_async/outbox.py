"""Slow-consumer policies on a client's pending frames (no asyncio).

The server keeps, per client, the list of frames not yet handed to the transport. When a client is
over its outbound budget, one of these functions trims that list in place. Frames are whole
``bytes`` RELAY/DATA frames shared with other clients, so trimming never copies them.
"""

from __future__ import annotations

__all__ = ["drop_oldest", "keep_latest"]

# Bytes 4..12 of a RELAY frame are kind, sender id and trame code: the identity of a stream.
_KEY = slice(4, 12)


def drop_oldest(frames: list[bytes], size: int, limit: int) -> tuple[int, int]:
    """Drop frames from the front until their total ``size`` is at most ``limit``.

    Returns ``(new_size, dropped)``. The newest frame is always kept, even if it alone is over.
    """
    dropped = 0
    cut = 0
    last = len(frames) - 1
    while size > limit and cut < last:
        size -= len(frames[cut])
        cut += 1
    if cut:
        del frames[:cut]
        dropped = cut
    return size, dropped


def keep_latest(frames: list[bytes]) -> tuple[int, int]:
    """Keep only the newest frame of each (sender, trame code), in their order of arrival.

    Returns ``(new_size, dropped)``.
    """
    newest: dict[bytes, int] = {}
    for i, frame in enumerate(frames):
        newest[frame[_KEY]] = i
    if len(newest) == len(frames):
        return sum(map(len, frames)), 0
    kept = [frames[i] for i in sorted(newest.values())]
    dropped = len(frames) - len(kept)
    frames[:] = kept
    return sum(map(len, kept)), dropped
