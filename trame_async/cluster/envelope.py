"""Cluster envelopes: frames batched into one NATS message, and their decoder (no asyncio).

Theory of operation
-------------------
A node relays its local clients' multicasts to its local clients at once, and hands the same
encoded frames (RELAY / GROUP_RELAY, exactly the bytes its clients get) to a :class:`Batcher`,
keyed by *stream*: the NATS subject they go to (the all-clients subject, or one group's). Once per
loop iteration the adapter calls :meth:`Batcher.flush`, which seals what accumulated into
:class:`Batch`\\ es: one envelope per stream, split so that none is larger than ``max_envelope``
bytes. Frames are kept as the ``bytes`` objects they were given and copied once, by the join
that builds the envelope.

Every envelope of a stream carries the node id, the *epoch* of the stream's counter and a
sequence number that goes up by one per envelope, so a receiver (:class:`~.link.GapTracker`)
sees duplicates and gaps. A stream's counter is per (node, stream), not per node: a receiver
subscribes only to the streams it needs and would otherwise see every envelope of the others as
a gap. A counter that is forgotten (:meth:`Batcher.retire`, when the node stops publishing to a
group) or that a restarted process starts again gets a new, larger epoch, so that its fresh
sequence numbers are never taken for duplicates of the old ones.

Layout of an envelope (all integers big-endian)::

    0       4     5       6          14          22        30         34
    +-------+-----+-------+----------+-----------+---------+----------+------------------+
    | magic | ver | flags | node     | epoch     | seq     | count    | count frames,    |
    | "TRCL"| u8  | u8 =0 | u64      | u64       | u64     | u32 >= 1 | as on the wire   |
    +-------+-----+-------+----------+-----------+---------+----------+------------------+

Each frame is a whole wire frame (``length u32 | kind u8 | body``, see :mod:`trame_async.wire`),
unchanged: the envelope needs no per-frame header of its own. :func:`decode` walks the lengths,
checks every bound and raises :class:`EnvelopeError` (a :class:`~trame_async.ProtocolError`) on
anything else: any client of the NATS server can publish on the cluster's subjects, so an
envelope is peer input like a client's bytes.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from ..exceptions import MalformedFrameError
from ..wire import DEFAULT_MAX_FRAME_SIZE, HEADER, Kind

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "DEFAULT_MAX_PAYLOAD",
    "ENVELOPE_HEAD",
    "ENVELOPE_MAGIC",
    "ENVELOPE_VERSION",
    "RELAY_KINDS",
    "Batch",
    "Batcher",
    "Envelope",
    "EnvelopeError",
    "decode",
    "encode",
]

#: First bytes of every envelope.
ENVELOPE_MAGIC: Final = b"TRCL"
#: Version of the envelope layout.
ENVELOPE_VERSION: Final = 1
#: magic[4] | version u8 | flags u8 | node u64 | epoch u64 | seq u64 | count u32
ENVELOPE_HEAD: Final = struct.Struct(">4sBBQQQI")
_HEAD_SIZE: Final = ENVELOPE_HEAD.size
#: Soft bound of an envelope, in bytes: a batch is split before it passes this.
DEFAULT_MAX_ENVELOPE: Final = 256 << 10
#: Hard bound of an envelope, in bytes: NATS's default ``max_payload`` (1 MiB).
DEFAULT_MAX_PAYLOAD: Final = 1 << 20
#: The frame kinds an envelope may carry by default.
RELAY_KINDS: Final = frozenset({int(Kind.RELAY), int(Kind.GROUP_RELAY)})
_U64: Final = (1 << 64) - 1
_FRAME_HEAD: Final = HEADER.size


class EnvelopeError(MalformedFrameError):
    """A cluster envelope whose bytes do not follow the envelope layout.

    :attr:`detail` says what was wrong; :attr:`offset` is where in the envelope it was found.
    """

    def __init__(self, detail: str, offset: int = 0) -> None:
        self.detail = detail
        self.offset = offset
        super().__init__(detail, offset)

    def __str__(self) -> str:
        return f"malformed cluster envelope at byte {self.offset}: {self.detail}"


class Envelope(NamedTuple):
    """A decoded envelope: who sent it, its place in the sender's stream, and its frames."""

    node: int
    epoch: int
    seq: int
    frames: list[bytes]


class Batch(NamedTuple):
    """A sealed envelope, ready to publish on ``stream`` (the NATS subject)."""

    stream: str
    seq: int
    #: Frames in the envelope.
    nframes: int
    data: bytes


def encode(node: int, epoch: int, seq: int, frames: list[bytes]) -> bytes:
    """Return the envelope of ``frames`` (whole wire frames) from ``node`` at ``epoch``/``seq``."""
    if not frames:
        raise ValueError("an envelope carries at least one frame")
    head = ENVELOPE_HEAD.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, node, epoch, seq, len(frames))
    return b"".join([head, *frames])


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    kinds: frozenset[int] | None = RELAY_KINDS,
    copy: bool = True,
) -> Envelope:
    """Return the node, epoch, sequence number and frames of the envelope ``data``.

    Every frame's length must be at least 1 and at most ``max_frame_size`` (the frame size of
    :mod:`trame_async.wire`), its kind in ``kinds`` (None: any), and the frames must fill the
    envelope exactly. Raise :class:`EnvelopeError` otherwise, never another exception.
    With ``copy=False`` the frames are ``memoryview`` slices of ``data`` (no copy).
    """
    view = memoryview(data)
    total = len(view)
    if total < _HEAD_SIZE:
        if bytes(view[:4]) != ENVELOPE_MAGIC[: min(4, total)]:
            raise EnvelopeError(f"does not start with magic {ENVELOPE_MAGIC!r}")
        raise EnvelopeError(f"{total} bytes, shorter than the {_HEAD_SIZE}-byte header", total)
    magic, version, flags, node, epoch, seq, count = ENVELOPE_HEAD.unpack_from(view)
    if magic != ENVELOPE_MAGIC:
        raise EnvelopeError(f"does not start with magic {ENVELOPE_MAGIC!r}")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"version {version}, this node reads {ENVELOPE_VERSION}", 4)
    if flags:
        raise EnvelopeError(f"flags {flags:#04x}: no flag is defined in this version", 5)
    if count == 0:
        raise EnvelopeError("count 0: an envelope carries at least one frame", 30)
    # Each frame takes at least 5 bytes: refuse an impossible count before looping on it.
    if count > (total - _HEAD_SIZE) // _FRAME_HEAD:
        raise EnvelopeError(
            f"count {count} frames cannot fit in {total - _HEAD_SIZE} bytes of frames", 30
        )
    frames = split_frames(view, _HEAD_SIZE, count, max_frame_size, kinds, copy)
    return Envelope(node, epoch, seq, frames)


def split_frames(
    view: memoryview,
    pos: int,
    count: int | None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    kinds: frozenset[int] | None = RELAY_KINDS,
    copy: bool = True,
) -> list[bytes]:
    """Return the whole frames of ``view[pos:]``: exactly ``count`` of them filling it (None:
    as many as fill it), each checked as :func:`decode` checks them; raise
    :class:`EnvelopeError` otherwise. ``copy=False`` gives ``memoryview`` slices."""
    frames: list[bytes] = []
    total = len(view)
    unpack = HEADER.unpack_from
    i = 0
    while (i < count) if count is not None else (pos < total):
        if total - pos < _FRAME_HEAD:
            raise EnvelopeError(f"frame {i} of {count}: header runs past the end", pos)
        length, kind = unpack(view, pos)
        if length < 1 or length > max_frame_size:
            raise EnvelopeError(
                f"frame {i} of {count}: length {length} outside 1..{max_frame_size}", pos
            )
        if kinds is not None and kind not in kinds:
            raise EnvelopeError(f"frame {i} of {count}: kind {kind:#04x} not carried", pos + 4)
        end = pos + 4 + length
        if end > total:
            raise EnvelopeError(
                f"frame {i} of {count}: {length} bytes announced, {total - pos - 4} left", pos
            )
        frames.append(bytes(view[pos:end]) if copy else view[pos:end])  # type: ignore[arg-type]
        pos = end
        i += 1
    if pos != total:
        raise EnvelopeError(f"{total - pos} bytes after the last of {count} frames", pos)
    return frames


class _Stream:
    """What the batcher keeps per stream: its counter and the frames of the current batch."""

    __slots__ = ("count", "counts", "epoch", "frames", "seq", "size")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0
        # Items to seal, and how many whole frames each holds (an item may be several frames
        # back to back, as the server relays a run of them as one object).
        self.frames: list[bytes] = []
        self.counts: list[int] = []
        self.count = 0
        self.size = 0


class Batcher:
    """Accumulate a node's frames per stream and seal them into bounded envelopes.

    ``epoch`` is where the epochs of this process start: a value larger than any the same node
    id used before, such as ``time.time_ns()`` at start. Each stream counter takes the next one.

    ``max_envelope`` (bytes) is where a batch is split. A frame too big for ``max_envelope``
    still goes alone in an envelope up to ``max_payload`` (bytes, the NATS server's
    ``max_payload``); a bigger one cannot cross NATS, and is dropped and counted in
    :attr:`oversize_dropped` (its local clients got it anyway).
    """

    __slots__ = (
        "_next_epoch",
        "_pending",
        "_streams",
        "envelopes",
        "frames",
        "max_envelope",
        "max_payload",
        "node",
        "oversize_dropped",
    )

    def __init__(
        self,
        node: int,
        epoch: int,
        *,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        """Make a batcher for ``node`` (a u64), numbering its stream epochs from ``epoch``."""
        if not 0 <= node <= _U64:
            raise ValueError(f"node id {node} is not a u64")
        if not 0 <= epoch <= _U64:
            raise ValueError(f"epoch {epoch} is not a u64")
        if max_envelope < _HEAD_SIZE + _FRAME_HEAD or max_payload < max_envelope:
            raise ValueError(
                f"need {_HEAD_SIZE + _FRAME_HEAD} <= max_envelope ({max_envelope}) <= "
                f"max_payload ({max_payload})"
            )
        self.node = node
        self.max_envelope = max_envelope
        self.max_payload = max_payload
        self._next_epoch = epoch
        self._streams: dict[str, _Stream] = {}
        # Streams with frames waiting, in the order they got their first one.
        self._pending: dict[str, _Stream] = {}
        #: Envelopes sealed since the start.
        self.envelopes = 0
        #: Frames sealed into envelopes since the start.
        self.frames = 0
        #: Frames larger than ``max_payload`` minus the header, dropped since the start.
        self.oversize_dropped = 0

    def __bool__(self) -> bool:
        """Whether frames wait for :meth:`flush`."""
        return bool(self._pending)

    def add(self, stream: str, frame: bytes, count: int = 1) -> bool:
        """Queue ``count`` whole wire frames (back to back in ``frame``) for ``stream``; false
        when they were too big to ever send (counted in :attr:`oversize_dropped`).

        The bytes are kept as given (no copy) until :meth:`flush`.
        """
        n = len(frame)
        if n + _HEAD_SIZE > self.max_payload:
            self.oversize_dropped += count
            return False
        state = self._pending.get(stream)
        if state is None:
            state = self._streams.get(stream)
            if state is None:
                state = self._streams[stream] = _Stream(self._take_epoch())
            self._pending[stream] = state
        state.frames.append(frame)
        state.counts.append(count)
        state.count += count
        state.size += n
        return True

    def flush(self) -> list[Batch]:
        """Seal every queued frame into envelopes, streams in order of their first frame."""
        out: list[Batch] = []
        cap = self.max_envelope - _HEAD_SIZE
        for stream, state in self._pending.items():
            frames = state.frames
            if state.size <= cap:
                out.append(self._seal(stream, state, frames, state.count))
            else:
                part: list[bytes] = []
                size = 0
                count = 0
                for frame, k in zip(frames, state.counts, strict=True):
                    n = len(frame)
                    if part and size + n > cap:
                        out.append(self._seal(stream, state, part, count))
                        part = []
                        size = 0
                        count = 0
                    part.append(frame)
                    size += n
                    count += k
                out.append(self._seal(stream, state, part, count))
            state.frames = []
            state.counts = []
            state.count = 0
            state.size = 0
        self._pending.clear()
        return out

    def retire(self, stream: str) -> None:
        """Forget the counter of ``stream`` (the node publishes there no more, for now).

        Frames still queued for it are sealed at the next flush as usual; a later frame opens a
        new counter with a new epoch, which receivers take as a fresh start.
        """
        self._streams.pop(stream, None)

    def position(self, stream: str) -> tuple[int, int] | None:
        """Return (epoch, next seq) of ``stream``'s counter, frames still queued included (they
        take the next numbers at :meth:`flush`), or None when it has none."""
        state = self._streams.get(stream)
        return None if state is None else (state.epoch, state.seq)

    @property
    def streams(self) -> int:
        """How many stream counters are kept."""
        return len(self._streams)

    def _take_epoch(self) -> int:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        return epoch

    def _seal(self, stream: str, state: _Stream, frames: list[bytes], count: int) -> Batch:
        seq = state.seq
        state.seq = seq + 1
        head = ENVELOPE_HEAD.pack(
            ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, self.node, state.epoch, seq, count
        )
        self.envelopes += 1
        self.frames += count
        return Batch(stream, seq, count, b"".join([head, *frames]))
