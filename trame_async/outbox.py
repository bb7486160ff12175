"""One client's outbox: what waits for its transport, its budget and slow-consumer policy (no asyncio).

Theory of operation
-------------------
The server appends every frame meant for a client to that client's :class:`Outbox` (a multicast
appends the same ``bytes`` object to many outboxes: nothing is copied per recipient). Once per loop
iteration the adapter :meth:`~Outbox.take`\\ s what is pending, writes it in one call and reports the
transport's buffer with :meth:`~Outbox.wrote`. :meth:`~Outbox.push` answers true when the pending
bytes passed :attr:`~Outbox.limit`; the adapter then calls :meth:`~Outbox.overflow`, which says
what to do: write now, cut the client, or nothing (the policy dropped what did not fit).

A transport above its high-water mark is *congested* (:meth:`~Outbox.pause` /
:meth:`~Outbox.resume`, from ``pause_writing``/``resume_writing``). Frames then stay here, where
the policy can still act on them:

- ``disconnect``: a client whose pending bytes plus transport buffer pass ``max_bytes`` is cut.
- ``drop-oldest``: the oldest frames go (counted), the newest frame is always kept.
- ``keep-latest``: while congested, a RELAY replaces the pending one of the same (sender, trame
  code), a GROUP_RELAY the one of the same (sender, group, trame code), in O(1); at most ``max_streams`` streams are kept, then the oldest go; over the budget the
  oldest go too. DATA replies and multi-frame objects never fold.

Every drop is counted in :attr:`~Outbox.dropped` and announced to the client by a DROPPED frame
ahead of the next write (:meth:`~Outbox.take`): loss is never silent.

A congested client must keep draining: every ``check_interval`` the outbox asks the adapter
(:attr:`~Outbox.next_check`) how many bytes written so far the peer has not taken, and
:meth:`~Outbox.check` answers true (cut it) once the client took less than ``min_rate`` bytes/s for
``stall_timeout``. A reader that takes a few bytes now and then is therefore not "making progress".
Nothing here waits on a clock: every time is passed in, so tests drive it by hand.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final, Literal

from .wire import Kind, dropped_notice

__all__ = ["CUT", "NOTHING", "WRITE", "Ledger", "Outbox", "OutboxLimits", "Policy"]

Policy = Literal["disconnect", "drop-oldest", "keep-latest"]

#: What :meth:`Outbox.overflow` asks of the adapter.
NOTHING: Final = 0
WRITE: Final = 1
CUT: Final = 2

# Bytes 4..12 of a RELAY frame are kind, sender id and trame code: the identity of a stream. They
# come before the format, so the key is the same for every length of a variable-length trame.
_KEY: Final = slice(4, 12)
_RELAY: Final = int(Kind.RELAY)
# GROUP_RELAY: kind, sender id, group id and trame code, bytes 4..16.
_GROUP_KEY: Final = slice(4, 16)
_GROUP_RELAY: Final = int(Kind.GROUP_RELAY)
#: length u32 | kind u8: a single RELAY frame's length field counts the rest of the object.
_HEAD: Final = struct.Struct(">IB")
_INF: Final = float("inf")
#: Answers to a client's own requests: no policy may drop them (see Outbox._drop_oldest).
_KEPT_KINDS: Final = frozenset((int(Kind.REPLY), int(Kind.PRESENCE), int(Kind.MEMBER_LIST)))


def _must_keep(frame: bytes) -> bool:
    return frame[4] in _KEPT_KINDS and len(frame) == 4 + int.from_bytes(frame[:4], "big")


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The settings of every outbox of a server. Sizes in bytes, times in seconds.

    ``stall_timeout`` None: a congested client is never cut for being slow (only over the budget,
    under ``disconnect``). ``probe_at_pause``: take the progress baseline at once when a congestion
    starts (a syscall per episode; for the short windows of the pace mode), rather than at the
    first check.
    """

    policy: Policy = "disconnect"
    max_bytes: int = 4 << 20
    write_high_water: int = 64 << 10
    stall_timeout: float | None = 5.0
    min_rate: int = 1024
    max_streams: int = 4096
    check_interval: float = 1.25
    probe_at_pause: bool = False


class Ledger:
    """What all the outboxes of one server hold and dropped (a server-wide budget reads it)."""

    __slots__ = ("dropped", "pending")

    def __init__(self) -> None:
        #: Bytes pending in the outboxes.
        self.pending = 0
        #: Frames the policies dropped, in every outbox, since the start.
        self.dropped = 0


class Outbox:
    """The frames waiting for one client's transport, with its budget and policy.

    :attr:`frames`, :attr:`size` and :attr:`limit` are public so that a fan-out loop may do what
    :meth:`push` does inline (one attribute access per recipient instead of a call); it must then
    add the bytes to the :class:`Ledger` itself.
    """

    __slots__ = (
        "_free_limit",
        "_keyseq",
        "_latest",
        "_ledger",
        "_limits",
        "_mark_delivered",
        "_mark_time",
        "_unreported",
        "buffered",
        "congested",
        "cut_detail",
        "dropped",
        "frames",
        "limit",
        "next_check",
        "size",
        "written",
    )

    def __init__(self, limits: OutboxLimits, ledger: Ledger | None = None) -> None:
        """Make an empty outbox under ``limits``, adding its pending bytes to ``ledger``."""
        self._limits = limits
        self._ledger = ledger if ledger is not None else Ledger()
        #: Pending frames in order (while not folding).
        self.frames: deque[bytes] = deque()
        #: Pending bytes (frames, or the folded streams).
        self.size = 0
        self._free_limit = min(limits.write_high_water, limits.max_bytes)
        #: Pending size past which :meth:`overflow` must be called.
        self.limit = self._free_limit
        #: The transport's buffer, as last reported.
        self.buffered = 0
        #: Whether the transport is above its high-water mark.
        self.congested = False
        #: Bytes handed to the transport since the start.
        self.written = 0
        #: Frames dropped by the policy since the start.
        self.dropped = 0
        self._unreported = 0
        # keep-latest while congested: stream key -> newest frame, oldest stream first.
        self._latest: OrderedDict[bytes | int, bytes] | None = None
        self._keyseq = 0
        #: When :meth:`check` is due (inf: no check).
        self.next_check = _INF
        self._mark_time: float | None = None
        self._mark_delivered = 0
        #: Why :meth:`overflow` or :meth:`check` asked for a cut.
        self.cut_detail = ""

    def __len__(self) -> int:
        latest = self._latest
        return len(self.frames) + (len(latest) if latest is not None else 0)

    @property
    def limits(self) -> OutboxLimits:
        """The settings this outbox enforces."""
        return self._limits

    @property
    def queued(self) -> int:
        """Bytes queued in user space for this client: pending plus the transport's buffer."""
        return self.size + self.buffered

    # --- feeding ------------------------------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Append one whole frame (or several back to back); true when :meth:`overflow` is due."""
        self.frames.append(frame)
        n = len(frame)
        self.size += n
        self._ledger.pending += n
        return self.size > self.limit

    def overflow(self) -> int:
        """Act on a pending size past :attr:`limit`: return :data:`WRITE`, :data:`CUT` or
        :data:`NOTHING` (the policy made it fit, or the transport is congested and it fits)."""
        limits = self._limits
        if self._latest is not None and self._absorb():
            return CUT
        left = limits.max_bytes - self.buffered
        if self.size > left and len(self) > 1:
            policy = limits.policy
            if policy == "disconnect":
                self.cut_detail = (
                    f"{self.size + self.buffered} bytes queued, over max_queue_bytes="
                    f"{limits.max_bytes}"
                )
                return CUT
            if self._drop_oldest(left):
                return CUT
        self._set_limit()
        if self.congested or not self.size:
            return NOTHING
        return WRITE

    def shed(self) -> bool:
        """Drop every pending frame but the newest (counted): the server-wide budget needs room.

        Returns true when the client must be cut instead (a reply it waits for was in the way).
        """
        if self._latest is not None and self._absorb():
            return True
        if self._drop_oldest(0):
            return True
        self._set_limit()
        return False

    def clear(self) -> None:
        """Forget everything pending (the client is gone or cut); nothing is counted as dropped."""
        self._ledger.pending -= self.size
        self.frames.clear()
        self._latest = None
        self.size = 0
        self._unreported = 0
        self.next_check = _INF

    # --- draining -----------------------------------------------------------------------------

    def take(self, cap: int | None = None) -> bytes:
        """Remove and return the oldest pending frames as one ``bytes`` object, ready to write.

        With ``cap``, about that many bytes (at least one frame); otherwise everything. A DROPPED
        frame announcing the frames dropped since the last take comes first.
        """
        if self._latest is not None:
            self._absorb()
            parts = self._take_latest(cap)
        elif cap is None or self.size <= cap:
            frames = self.frames
            if not self._unreported and len(frames) == 1:
                return self._pop_single()
            parts = list(frames)
            frames.clear()
            self._ledger.pending -= self.size
            self.size = 0
        else:
            parts = self._take_front(cap)
        if self._unreported:
            parts.insert(0, dropped_notice(self._unreported))
            self._unreported = 0
        data = b"".join(parts)
        self.written += len(data)
        return data

    def take_single(self) -> bytes | None:
        """Remove and return the one pending object when nothing else is to be done about it:
        the transport's buffer was empty, no congestion, no fold, no drop to report. Otherwise
        return None (use :meth:`take` and :meth:`wrote`).

        The fan-out's common case, once per recipient: after writing it, the adapter needs to
        call :meth:`wrote` only if the transport kept some of it.
        """
        frames = self.frames
        if (
            len(frames) != 1
            or self.buffered
            or self.congested
            or self._latest is not None
            or self._unreported
        ):
            return None
        return self._pop_single()

    def _pop_single(self) -> bytes:
        """Remove the one pending object and count it as written."""
        data = self.frames.popleft()
        n = len(data)
        self.size -= n
        self._ledger.pending -= n
        self.written += n
        return data

    def wrote(self, buffered: int) -> None:
        """Report the transport's buffer after a write (or whenever it is looked at)."""
        self.buffered = buffered
        self._set_limit()

    def pause(self, now: float, undelivered: int | None = None) -> None:
        """The transport went above its high-water mark at ``now``.

        ``undelivered`` (bytes written that the peer has not taken) gives the progress baseline
        at once; without it the first :meth:`check` takes it.
        """
        self.congested = True
        limits = self._limits
        if limits.policy == "keep-latest" and self._latest is None:
            self._latest = OrderedDict()
            self._absorb()
        self._mark_time = None
        if undelivered is not None:
            self._mark_time = now
            self._mark_delivered = self.written - undelivered
        if limits.stall_timeout is not None:
            self.next_check = now + limits.check_interval
        self._set_limit()

    def resume(self) -> None:
        """The transport went back below its low-water mark: the congestion episode is over.

        The adapter then writes what is pending (:meth:`take`, with a cap under the drop
        policies, so that what the transport does not take at once stays here, foldable).
        """
        self.congested = False
        self.next_check = _INF
        self._mark_time = None
        if self._latest is not None and not self._latest:
            self._latest = None
        self._set_limit()

    def check(self, now: float, undelivered: int) -> bool:
        """Look at a congested client's progress; return true when it must be cut.

        ``undelivered`` is what the peer has not taken of the bytes written so far (transport
        buffer plus, where the OS tells, the socket's unacknowledged bytes).
        """
        limits = self._limits
        timeout = limits.stall_timeout
        if not self.congested or timeout is None:
            self.next_check = _INF
            return False
        delivered = self.written - undelivered
        mark = self._mark_time
        if mark is None or delivered - self._mark_delivered >= max(
            1.0, limits.min_rate * (now - mark)
        ):
            self._mark_time = now
            self._mark_delivered = delivered
        elif now - mark >= timeout - 1e-9:
            taken = delivered - self._mark_delivered
            self.cut_detail = (
                f"took {taken} bytes in {now - mark:.2f} s while congested, under "
                f"{limits.min_rate} bytes/s"
            )
            self.next_check = _INF
            return True
        self.next_check = now + limits.check_interval
        return False

    # --- internals ----------------------------------------------------------------------------

    def _set_limit(self) -> None:
        limits = self._limits
        if self.congested:
            # keep-latest folds every frame that arrives while congested: -1 sends each push
            # through overflow(), which folds in O(1).
            if limits.policy == "keep-latest":
                self.limit = -1
            else:
                self.limit = limits.max_bytes - self.buffered
        elif self._latest is not None:
            self.limit = -1
        elif not self.buffered:
            self.limit = self._free_limit
        else:
            # Past the high-water mark the queue is written at once instead of at the end of the
            # loop iteration: a loop may deliver megabytes of reads before that.
            self.limit = min(limits.write_high_water, limits.max_bytes - self.buffered)

    def _count(self, dropped: int) -> None:
        self.dropped += dropped
        self._unreported += dropped
        self._ledger.dropped += dropped

    def _absorb(self) -> bool:
        """Fold the frames pushed since the last look into the keep-latest streams; true when
        the client must be cut (see :meth:`_drop_oldest`)."""
        frames = self.frames
        if not frames:
            return False
        latest = self._latest
        assert latest is not None
        unpack = _HEAD.unpack_from
        dropped = 0
        freed = 0
        for frame in frames:
            length, kind = unpack(frame)
            if length == len(frame) - 4 and (kind == _RELAY or kind == _GROUP_RELAY):
                # A stream: kind, sender, (group id,) trame code.
                key: bytes | int = frame[_KEY] if kind == _RELAY else frame[_GROUP_KEY]
                old = latest.pop(key, None)
                if old is not None:
                    dropped += 1
                    freed += len(old)
            else:
                self._keyseq += 1
                key = self._keyseq
            latest[key] = frame
        frames.clear()
        over = len(latest) - self._limits.max_streams
        cut = False
        for _ in range(over if over > 0 else 0):
            frame = next(iter(latest.values()))
            if _must_keep(frame):
                cut = self._cut_for(frame)
                break
            latest.popitem(last=False)
            freed += len(frame)
            dropped += 1
        if dropped:
            self.size -= freed
            self._ledger.pending -= freed
            self._count(dropped)
        return cut

    def _drop_oldest(self, left: int) -> bool:
        """Drop the oldest pending frames until ``size <= left``; the newest is always kept.

        Returns true (the client must be cut) when the oldest is an answer to one of its own
        requests (REPLY, PRESENCE, MEMBER_LIST): dropping it would leave a join or a member
        list unanswered for ever, so a client that far behind is cut instead.
        """
        size = self.size
        dropped = 0
        latest = self._latest
        keep = _must_keep
        cut = False
        if latest is not None:
            while size > left and len(latest) > 1:
                frame = next(iter(latest.values()))  # an OrderedDict's head: O(1)
                if keep(frame):
                    cut = self._cut_for(frame)
                    break
                latest.popitem(last=False)
                size -= len(frame)
                dropped += 1
        else:
            frames = self.frames
            while size > left and len(frames) > 1:
                frame = frames[0]
                if keep(frame):
                    cut = self._cut_for(frame)
                    break
                frames.popleft()
                size -= len(frame)
                dropped += 1
        self._ledger.pending -= self.size - size
        self.size = size
        self._count(dropped)
        return cut

    def _cut_for(self, frame: bytes) -> bool:
        self.cut_detail = (
            f"so far behind that its policy would drop an answer to its own request (kind "
            f"{frame[4]:#04x}), over max_queue_bytes={self._limits.max_bytes}"
        )
        return True

    def _take_front(self, cap: int) -> list[bytes]:
        frames = self.frames
        parts: list[bytes] = []
        taken = 0
        while frames and taken < cap:
            frame = frames.popleft()
            parts.append(frame)
            taken += len(frame)
        self.size -= taken
        self._ledger.pending -= taken
        return parts

    def _take_latest(self, cap: int | None) -> list[bytes]:
        latest = self._latest
        assert latest is not None
        parts: list[bytes] = []
        taken = 0
        limit = self.size if cap is None else cap
        while latest and taken < limit:
            frame = latest.popitem(last=False)[1]
            parts.append(frame)
            taken += len(frame)
        self.size -= taken
        self._ledger.pending -= taken
        if not latest and not self.congested:
            self._latest = None
        return parts
