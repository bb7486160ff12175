"""Slow-consumer policies on a client's pending frames (no asyncio).

The server keeps, per client, the list of frames not yet handed to the transport. When a client is
over its outbound budget (and, under keep-latest, whenever a lagging client's transport drains),
one of these functions trims that list in place. Frames are whole ``bytes`` RELAY/DATA frames
shared with other clients, so trimming never copies them.
"""

from __future__ import annotations

import struct
from typing import Final

from .wire import Kind

__all__ = ["drop_oldest", "keep_latest"]

# Bytes 4..12 of a RELAY frame are kind, sender id and trame code: the identity of a stream. They
# come before the format, so the key is the same for every length of a variable-length trame.
_KEY = slice(4, 12)
_RELAY: Final = int(Kind.RELAY)
#: length u32 | kind u8: a single RELAY frame's length field counts the rest of the object.
_HEAD: Final = struct.Struct(">IB")


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
    """Keep only the newest RELAY frame of each (sender, trame code), in their order of arrival.

    Only single RELAY frames fold. A DATA frame is a reply addressed to this client alone, and a
    ``bytes`` holding several RELAY frames (:meth:`Server.fanout` from a backplane) may mix
    streams: both are always kept, in place. Returns ``(new_size, dropped)``.
    """
    # Key: the stream for a foldable frame, else the frame's index (an int never equals bytes).
    newest: dict[bytes | int, int] = {}
    unpack = _HEAD.unpack_from
    for i, frame in enumerate(frames):
        if unpack(frame) == (len(frame) - 4, _RELAY):
            newest[frame[_KEY]] = i
        else:
            newest[i] = i
    if len(newest) == len(frames):
        return sum(map(len, frames)), 0
    kept = [frames[i] for i in sorted(newest.values())]
    dropped = len(frames) - len(kept)
    frames[:] = kept
    return sum(map(len, kept)), dropped
