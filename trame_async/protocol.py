"""Sans-I/O connection state for both ends: handshake, heartbeat, limits, close (no asyncio).

Theory of operation
-------------------
A core is fed bytes with :meth:`receive_data` and the current time, and answers with the data frames
the application must see. Control frames (HELLO/WELCOME, PING/PONG, ERROR, GOODBYE) are handled
inside: answers go to :attr:`outgoing`, which the I/O adapter writes out right after the call, so a
PONG never waits behind application work. The adapter asks :meth:`next_timer` when to call
:meth:`handle_timer` again; every timeout (heartbeat, handshake, slow-loris) is a pure function of
the ``now`` values passed in, so tests drive time by hand.

States::

    HANDSHAKE --HELLO ok / WELCOME--> OPEN --GOODBYE, ERROR, timeout, close()--> CLOSED

A core never closes anything itself: once :attr:`closed` is true the adapter writes
:attr:`outgoing` (an ERROR or GOODBYE frame, if any) and closes the transport. :attr:`close_reason`
is set exactly once, by the first cause.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

from .codec import REGISTRY, Message, Registry
from .codes import DisconnectReason, ErrorCode, GroupOp
from .exceptions import (
    BadValueError,
    HandshakeError,
    InvalidStateError,
    ProtocolError,
    TrameError,
    TruncatedFrameError,
    UnexpectedFrameError,
    UnknownKindError,
)
from .wire import (
    _PING,
    _PONG,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ECHO,
    FLAG_PRESENCE,
    GROUP_HEAD,
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER_U32,
    MAGIC,
    PROTOCOL_VERSION,
    RELAY_OVERHEAD,
    SENDER,
    ErrorFrame,
    FrameParser,
    Goodbye,
    Hello,
    Join,
    Kind,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    Welcome,
    parse_dropped,
    parse_ping_id,
    ping,
    pong,
)

__all__ = ["ClientCore", "CoreState", "GroupEvent", "GroupPresence", "ServerCore", "ServerLimits"]

_MULTICAST: Final = int(Kind.MULTICAST)
_DATA: Final = int(Kind.DATA)
_RELAY: Final = int(Kind.RELAY)
_KIND_RELAY: Final = Kind.RELAY
_GROUP_MULTICAST: Final = int(Kind.GROUP_MULTICAST)
_GROUP_RELAY: Final = int(Kind.GROUP_RELAY)
_KIND_GROUP_RELAY: Final = Kind.GROUP_RELAY
_GROUP_HEAD_UNPACK: Final = GROUP_HEAD.unpack_from
#: Group requests a server core checks for structure and hands to the server, as the NamedTuple
#: parsers that check them (the server parses them again: they are rare).
_GROUP_REQUESTS: Final = {
    int(Kind.JOIN): Join.parse,
    int(Kind.LEAVE): Leave.parse,
    int(Kind.MEMBERS): Members.parse,
}
#: What a client core hands its adapter in ClientCore.events.


class GroupPresence(NamedTuple):
    """A PRESENCE notice and the name its group had when the notice arrived (a LEAVE's REPLY
    later in the same read may unmap the id before the adapter looks)."""

    group: str
    notice: PresenceNotice


GroupEvent = Reply | GroupPresence | MemberList
_INF: Final = float("inf")
_BANG: Final = ord("!")
#: length[4] + kind[1] + magic[4]: what identifies a HELLO.
_PREAMBLE: Final = 9
_SENDER_UNPACK: Final = SENDER.unpack_from
_HEAD_U32_UNPACK: Final = HEADER_U32.unpack_from
# tuple.__new__ skips the Python-level __new__ of the NamedTuple: half the cost per message.
_new_message: Final = tuple.__new__

#: Set to 1 to run the pure-Python receive loop even where the compiled one is built.
PURE_PYTHON_ENV: Final = "TRAME_ASYNC_PURE_PYTHON"


def _load_speedups() -> Callable[..., int] | None:
    """Return the compiled ``scan_relays`` (trame_async/_speedups.c), or None to use Python's.

    None when it was not built (no compiler at install time) or when the environment variable
    :data:`PURE_PYTHON_ENV` is set to anything but ``0`` or nothing.
    """
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    _speedups.setup(Message, Kind.RELAY, Kind.GROUP_RELAY, BadValueError)
    return _speedups.scan_relays


_c_scan: Final = _load_speedups()
#: Whether the client's hot receive loop runs compiled (see :func:`_load_speedups`).
SPEEDUPS: Final = _c_scan is not None

# An ERROR code received from the server, as the reason the client reports.
_REASON_FOR_ERROR: Final = {
    ErrorCode.AUTH_FAILED: DisconnectReason.AUTH_FAILED,
    ErrorCode.SLOW_CONSUMER: DisconnectReason.SLOW_CONSUMER,
    ErrorCode.HANDSHAKE_TIMEOUT: DisconnectReason.HANDSHAKE_TIMEOUT,
    ErrorCode.FRAME_TIMEOUT: DisconnectReason.FRAME_TIMEOUT,
    ErrorCode.TOO_MANY_CLIENTS: DisconnectReason.TOO_MANY_CLIENTS,
    ErrorCode.SHUTTING_DOWN: DisconnectReason.SERVER_SHUTDOWN,
}


class CoreState(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# Module-level names: looking a member up on its Enum class costs 70 ns a time on Python 3.11,
# and the receive paths and timers test the state several times per read.
_HANDSHAKE: Final = CoreState.HANDSHAKE
_OPEN: Final = CoreState.OPEN
_CLOSED: Final = CoreState.CLOSED


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The per-connection settings a server core enforces. Times in seconds, sizes in bytes;
    None disables a limit."""

    heartbeat_interval: float | None = 20.0
    heartbeat_timeout: float | None = 20.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_max_frame_size: int = HANDSHAKE_MAX_FRAME_SIZE
    handshake_timeout: float | None = 10.0
    frame_timeout: float | None = 30.0
    token: bytes | None = None
    #: Distinct formats of unregistered codes one client may make the server compile (whatever
    #: their codes; ``<Ns`` values of any length excluded); above it, ERROR ``TOO_MANY_FORMATS``.
    max_unknown_formats: int | None = 256


class _Core:
    """What both ends share: the parser, the outgoing list, close bookkeeping."""

    # Slots: a server holds one core per client, and idle clients should cost little memory.
    __slots__ = (
        "_frame_started",
        "_ping_seq",
        "close_detail",
        "close_reason",
        "error_code",
        "outgoing",
        "parser",
        "retry_after",
        "state",
    )

    def __init__(self, max_frame_size: int) -> None:
        self.parser = FrameParser(max_frame_size)
        #: Frames the adapter must write, in order (control frames only: data goes its own way).
        self.outgoing: list[bytes] = []
        self.state = _HANDSHAKE
        #: Why the connection ended; set once, by the first cause.
        self.close_reason: DisconnectReason | None = None
        #: Human-readable detail of :attr:`close_reason` (for logs; never the token).
        self.close_detail = ""
        #: ERROR code we sent, or that the peer sent us.
        self.error_code: ErrorCode | None = None
        #: Retry-after hint from a GOODBYE, in seconds.
        self.retry_after: float | None = None
        self._ping_seq = 0
        self._frame_started: float | None = None

    @property
    def closed(self) -> bool:
        """Whether the connection is over and the adapter must close the transport."""
        return self.state is _CLOSED

    def _close(self, reason: DisconnectReason, detail: str = "") -> None:
        if self.state is not _CLOSED:
            self.state = _CLOSED
            self.close_reason = reason
            self.close_detail = detail

    def fail(self, error: ProtocolError, reason: DisconnectReason | None = None) -> None:
        """Send an ERROR frame for ``error`` (code and a short generic text) and close."""
        if self.state is _CLOSED:
            return
        code = error.error_code
        self.error_code = code
        self.outgoing.append(ErrorFrame(code, code.name.lower().replace("_", " ")).encode())
        self._close(reason or DisconnectReason.PROTOCOL_ERROR, str(error))

    def refuse(self, code: ErrorCode, reason: DisconnectReason, detail: str = "") -> None:
        """Send an ERROR frame with ``code`` and close with ``reason`` (limits, auth, timeouts)."""
        if self.state is _CLOSED:
            return
        self.error_code = code
        self.outgoing.append(ErrorFrame(code, code.name.lower().replace("_", " ")).encode())
        self._close(reason, detail or code.name.lower())

    def goodbye(
        self,
        reason: DisconnectReason = DisconnectReason.CLOSED,
        *,
        retry_after: float | None = None,
        text: str = "",
    ) -> None:
        """Queue a GOODBYE frame and close (the local side ends the connection on purpose)."""
        if self.state is _CLOSED:
            return
        wire_reason = DisconnectReason.GOODBYE if reason is DisconnectReason.CLOSED else reason
        self.outgoing.append(Goodbye(wire_reason, retry_after, text).encode())
        self._close(reason, text)

    def connection_lost(self) -> DisconnectReason:
        """Note that the transport ended; return the reason to report (the first cause wins)."""
        self._close(DisconnectReason.CONNECTION_LOST, "EOF or reset")
        assert self.close_reason is not None
        return self.close_reason

    def _next_ping_id(self) -> int:
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
        return self._ping_seq

    def _track_partial(self, completed: bool, now: float) -> None:
        if self.parser.in_frame:
            if completed or self._frame_started is None:
                self._frame_started = now
        else:
            self._frame_started = None

    def _peer_error(self, body: memoryview) -> None:
        # Never answered, whatever its body: the peer has closed, and an ERROR in reply to an
        # ERROR could bounce between two implementations. A broken body changes the report only.
        err, broken = _salvage(ErrorFrame, body)
        code = err.error_code
        self.error_code = code
        reason = DisconnectReason.ERROR_RECEIVED
        if code is not None:
            reason = _REASON_FOR_ERROR.get(code, reason)
        name = code.name if code else str(err.code)
        # The server's text, unless it only repeats the code ("auth failed" for AUTH_FAILED).
        said = "" if err.reason.replace(" ", "_").upper() == name else f": {err.reason}"
        self._close(reason, f"peer sent error {name}{said}{broken}")

    def _peer_goodbye(self, body: memoryview) -> None:
        bye, broken = _salvage(Goodbye, body)  # never answered either
        self.retry_after = bye.retry_after
        reason = bye.disconnect_reason
        if reason is not DisconnectReason.SERVER_SHUTDOWN:
            reason = DisconnectReason.GOODBYE
        self._close(reason, bye.text + broken)


class ServerCore(_Core):
    """The server's view of one client connection."""

    __slots__ = (
        "_awaiting",
        "_formats",
        "_interval",
        "_next_ping",
        "_opened_at",
        "_paused_at",
        "_preamble",
        "_read_paused",
        "_rtt_ping",
        "_timeout",
        "_write_congested",
        "client_id",
        "echo",
        "limits",
        "registry",
        "rtt",
    )

    def __init__(
        self,
        client_id: int,
        limits: ServerLimits,
        now: float,
        registry: Registry = REGISTRY,
    ) -> None:
        """Start a connection accepted at ``now``; the client must send HELLO first."""
        super().__init__(limits.handshake_max_frame_size)
        self.client_id = client_id
        self.limits = limits
        self.registry = registry
        #: The client asked for its own multicasts back.
        self.echo = False
        #: Last measured round-trip time in seconds.
        self.rtt: float | None = None
        self._opened_at = now
        self._preamble: bytes | None = b""
        self._interval = limits.heartbeat_interval
        self._timeout = limits.heartbeat_timeout
        self._next_ping = _INF
        # Time of the first ping sent since the last frame received; None while the peer is live.
        self._awaiting: float | None = None
        self._rtt_ping: tuple[int, float] | None = None
        # While we do not read from this client, or it cannot read our pings because its
        # transport is congested, its silence is not its fault (slow-consumer limits cover it).
        self._read_paused = False
        self._write_congested = False
        self._paused_at: float | None = None
        # Formats of unregistered codes this client made the registry learn.
        self._formats: set[bytes] | None = None

    def receive_data(self, data: bytes, now: float) -> list[memoryview]:
        """Feed bytes from the client; return its valid MULTICAST, DATA and group frames.

        Group frames are JOIN, LEAVE, MEMBERS (checked for structure: the server parses them
        with :class:`~.wire.Join`, :class:`~.wire.Leave`, :class:`~.wire.Members`) and
        GROUP_MULTICAST (its data body from offset 5 checked as a MULTICAST's, ``!`` relayed as
        ``>``). Each returned frame is a memoryview from the kind byte, already checked to be well
        formed.
        Control frames are answered in :attr:`outgoing`. On a protocol error an ERROR frame is
        queued and :attr:`closed` becomes true; frames before the bad one are still returned.
        """
        if self.state is _CLOSED:
            return []
        if len(data) == 9 and self.state is _OPEN and not self.parser.in_frame:
            # A lone PONG is an idle client's one read per heartbeat: no parser pass for it.
            length, kind, ping_id = _HEAD_U32_UNPACK(data)
            if length == 5 and kind == _PONG:
                self._awaiting = None
                self._frame_started = None
                self._pong(ping_id, now)
                return []
        if self._preamble is not None:
            # Hold the first bytes until kind and magic are in: a stray HTTP request or TLS hello
            # is then refused as such, however it is split, rather than as an oversized frame.
            data = self._preamble + data
            try:
                ready = self._check_preamble(data)
            except ProtocolError as err:
                self.fail(err)
                return []
            if not ready:
                self._preamble = data
                if self._frame_started is None:
                    self._frame_started = now  # the frame clock runs from its first byte
                return []
            self._preamble = None
        if self.state is _HANDSHAKE:
            # Frames sent right behind the HELLO are held to the limit the HELLO unlocks.
            end = self.parser.frame_end(data)
            if end is not None and end < len(data):
                first = self.receive_data(data[:end], now)
                if self.closed:
                    return first
                return first + self.receive_data(data[end:], now)
        try:
            frames = self.parser.feed(data)
        except ProtocolError as err:
            self.fail(err)
            return []
        self._awaiting = None  # any byte from the peer proves it alive
        if self.limits.frame_timeout is not None:
            self._track_partial(bool(frames), now)
        out: list[memoryview] = []
        known_size = self.registry.sizes.get
        is_open = self.state is _OPEN
        for frame in frames:
            kind = frame[0]
            if kind == _MULTICAST and is_open and len(frame) > 4:
                # Fast path: a code+format already known good, with a value of the right size.
                value_at = 5 + frame[4]
                if known_size(frame[1:value_at]) == len(frame) - value_at:
                    out.append(frame)
                    continue
            if kind == _MULTICAST or kind == _DATA:
                if self.state is not _OPEN:
                    self.fail(UnexpectedFrameError(Kind(kind).name, "before the handshake"))
                    break
                checked = self._checked(frame, 1)
                if checked is None:
                    break
                out.append(checked)
            elif kind == _GROUP_MULTICAST:
                if self.state is not _OPEN:
                    self.fail(UnexpectedFrameError("GROUP_MULTICAST", "before the handshake"))
                    break
                n = len(frame)
                if n > 8:
                    # The MULTICAST fast path, 4 bytes further on (the group id).
                    value_at = 9 + frame[8]
                    if known_size(frame[5:value_at]) == n - value_at:
                        out.append(frame)
                        continue
                if n < 5:
                    self.fail(TruncatedFrameError("GROUP_MULTICAST group id", 4, n - 1))
                    break
                checked = self._checked(frame, 5)
                if checked is None:
                    break
                out.append(checked)
            elif kind in _GROUP_REQUESTS:
                if self.state is not _OPEN:
                    self.fail(UnexpectedFrameError(Kind(kind).name, "before the handshake"))
                    break
                try:
                    _GROUP_REQUESTS[kind](frame[1:])
                except ProtocolError as err:
                    self.fail(err)
                    break
                out.append(frame)
            else:
                try:
                    self._control(frame, kind, now)
                except ProtocolError as err:
                    self.fail(err)
                if self.closed:
                    break
        if self.parser.error is not None:
            self.fail(self.parser.error)
        return out

    def _checked(self, frame: memoryview, at: int) -> memoryview | None:
        """Check the data body at ``frame[at:]`` in full (the slow path); return the frame to
        relay, or None when the client was refused (the core is then closed)."""
        try:
            learned = self.registry.check_body(frame, at)
        except ProtocolError as err:
            self.fail(err)
            return None
        except TrameError as err:  # an unknown code is relayed, so this is a bug
            self.fail(ProtocolError(str(err)))
            return None
        if learned and self._learned(frame, at):
            return None
        fmt_at = at + 4
        if frame[fmt_at] == _BANG:
            # "!" and ">" are one order: relayed as ">", so that receivers see one spelling (the
            # format's first byte: checked to be there).
            return memoryview(b"".join((frame[:fmt_at], b">", frame[fmt_at + 1 :])))
        return frame

    def _learned(self, frame: memoryview, at: int) -> bool:
        """Count a format of an unregistered code that ``frame`` made the registry compile.

        ``at`` is where the frame's data body starts (1, or 5 behind a group id).

        Returns whether the client went over ``max_unknown_formats`` (then refused): each new
        format costs the server a compiled struct, so a client sending endless new ones would make
        it redo that work for every frame.
        """
        limit = self.limits.max_unknown_formats
        if limit is None:
            return False
        formats = self._formats
        if formats is None:
            formats = self._formats = set()
        # The format alone counts: a publisher rotating through many codes of one format (the
        # relay's own business: it relays codes it never registered) stays at one.
        fmt = bytes(frame[at + 4 : at + 4 + frame[at + 3]])
        if fmt in formats:
            return False
        formats.add(fmt)
        if len(formats) <= limit:
            return False
        self.refuse(
            ErrorCode.TOO_MANY_FORMATS,
            DisconnectReason.PROTOCOL_ERROR,
            f"more than {limit} distinct formats of unregistered trame codes",
        )
        return True

    def _peer_error(self, body: memoryview) -> None:
        # A client's ERROR is its own: it cannot make the server report a slow consumer. Never
        # answered, even broken (see _Core._peer_error).
        err, broken = _salvage(ErrorFrame, body)
        self.error_code = err.error_code
        self._close(
            DisconnectReason.ERROR_RECEIVED, f"client sent error {err.code}: {err.reason}{broken}"
        )

    def _peer_goodbye(self, body: memoryview) -> None:
        # Whatever reason a client gives, for the server it said goodbye; never answered.
        bye, broken = _salvage(Goodbye, body)
        self._close(DisconnectReason.GOODBYE, bye.text + broken)

    def _check_preamble(self, data: bytes) -> bool:
        """Judge the first bytes of a connection; return whether the parser may take them.

        The order of checks of docs/protocol.md for the first frame: the kind byte before the
        length, so that a stray HTTP request or TLS hello is told apart from an oversized HELLO;
        then, for a HELLO, the magic. An ERROR or GOODBYE goes to the parser at once (the
        shortest ERROR is 8 bytes: waiting for a 9th would stall it until the handshake timeout).
        """
        if len(data) <= 4:
            return False
        kind = data[4]
        if kind != _HELLO:
            if kind == _ERROR or kind == _GOODBYE:
                return True
            if kind in _KIND_VALUES:
                raise UnexpectedFrameError(Kind(kind).name, "before HELLO")
            raise HandshakeError("first frame is not a HELLO: the peer is not a trame_async client")
        head = data[5:9]
        if head != MAGIC[: len(head)]:
            raise HandshakeError(
                f"first frame does not start with magic {MAGIC!r}: the peer is not a "
                f"trame_async client"
            )
        return len(data) >= _PREAMBLE

    def _control(self, frame: memoryview, kind: int, now: float) -> None:
        body = frame[1:]
        if kind == _PING:
            self.outgoing.append(pong(parse_ping_id(body, "PING")))
        elif kind == _PONG:
            self._pong(parse_ping_id(body, "PONG"), now)
        elif kind == Kind.HELLO:
            if self.state is not _HANDSHAKE:
                raise UnexpectedFrameError("HELLO", "after the handshake")
            self._hello(Hello.parse(body), now)
        elif kind == Kind.GOODBYE:
            self._peer_goodbye(body)
        elif kind == Kind.ERROR:
            self._peer_error(body)
        elif kind in _KIND_VALUES:
            raise UnexpectedFrameError(Kind(kind).name, "from a client")
        else:
            raise UnknownKindError(kind)

    def _pong(self, ping_id: int, now: float) -> None:
        if self._rtt_ping is not None and self._rtt_ping[0] == ping_id:
            self.rtt = max(0.0, now - self._rtt_ping[1])  # coarse clocks (uvloop: 1 ms)
            self._rtt_ping = None

    def _hello(self, hello: Hello, now: float) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"client speaks protocol version {hello.version}, this server speaks "
                f"{PROTOCOL_VERSION}; upgrade the older side",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        expected = self.limits.token
        if expected is not None and not hmac.compare_digest(hello.token, expected):
            self.refuse(
                ErrorCode.AUTH_FAILED,
                DisconnectReason.AUTH_FAILED,
                "wrong token" if hello.token else "no token",
            )
            return
        self.echo = bool(hello.flags & FLAG_ECHO)
        self.state = _OPEN
        self.parser.max_frame_size = self.limits.max_frame_size
        self.outgoing.append(
            Welcome(
                PROTOCOL_VERSION,
                0,
                self.client_id,
                self._interval,
                # No PING, nothing to time out: 0/0 says "heartbeat off" in one way only.
                self._timeout if self._interval is not None else None,
                self.limits.max_frame_size,
            ).encode()
        )
        if self._interval is not None:
            self._next_ping = now + self._interval

    # --- timers ---------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """Return when :meth:`handle_timer` must next run, or None when no timer is needed."""
        if self.state is _CLOSED:
            return None
        when = _INF
        limits = self.limits
        if self.state is _HANDSHAKE:
            if limits.handshake_timeout is not None:
                when = self._opened_at + limits.handshake_timeout
        else:
            when = self._next_ping
            if self._awaiting is not None and self._timeout is not None:
                when = min(when, self._awaiting + self._timeout)
        if self._frame_started is not None and limits.frame_timeout is not None:
            when = min(when, self._frame_started + limits.frame_timeout)
        return None if when == _INF else when

    def handle_timer(self, now: float) -> None:
        """Fire whatever is due at ``now``: handshake/frame/slow-consumer timeouts, heartbeat."""
        if self.state is _CLOSED:
            return
        limits = self.limits
        if self.state is _HANDSHAKE:
            if limits.handshake_timeout is not None and now >= (
                self._opened_at + limits.handshake_timeout
            ):
                self.refuse(
                    ErrorCode.HANDSHAKE_TIMEOUT,
                    DisconnectReason.HANDSHAKE_TIMEOUT,
                    f"no handshake within {limits.handshake_timeout:g} s",
                )
                return
        if (
            self._frame_started is not None
            and limits.frame_timeout is not None
            and now >= self._frame_started + limits.frame_timeout
        ):
            self.refuse(
                ErrorCode.FRAME_TIMEOUT,
                DisconnectReason.FRAME_TIMEOUT,
                f"frame not completed within {limits.frame_timeout:g} s",
            )
            return
        if self.state is not _OPEN:
            return
        if self._paused_at is not None:
            # Reading is paused by us: the peer's pongs may be unread, so it is not silent.
            self._awaiting = None
        elif (
            self._awaiting is not None
            and self._timeout is not None
            and now >= self._awaiting + self._timeout
        ):
            self._close(
                DisconnectReason.HEARTBEAT_TIMEOUT,
                f"nothing received within {self._timeout:g} s of a ping",
            )
            return
        if self._interval is not None and now >= self._next_ping:
            ping_id = self._next_ping_id()
            self.outgoing.append(ping(ping_id))
            if self._rtt_ping is None:
                self._rtt_ping = (ping_id, now)
            if self._awaiting is None and self._paused_at is None:
                self._awaiting = now
            self._next_ping = now + self._interval

    def reading_paused(self, paused: bool, now: float) -> None:
        """Tell the core that the adapter paused (or resumed) reading from this client."""
        self._read_paused = paused
        self._update_pause(now)

    def writing_congested(self, congested: bool, now: float) -> None:
        """Tell the core that the client's transport is (or is no longer) above its high water.

        A congested client may not get to read our pings: its silence then proves nothing (its
        outbox's progress checks judge it instead).
        """
        self._write_congested = congested
        self._update_pause(now)

    def _update_pause(self, now: float) -> None:
        if self._read_paused or self._write_congested:
            if self._paused_at is None:
                self._paused_at = now
        else:
            self._paused_at = None
            self._awaiting = None


_KIND_VALUES: Final = frozenset(int(k) for k in Kind)
_HELLO: Final = int(Kind.HELLO)
_ERROR: Final = int(Kind.ERROR)
_GOODBYE: Final = int(Kind.GOODBYE)
#: What a server may send before WELCOME: WELCOME itself, or the ERROR or GOODBYE that ends it.
_BEFORE_WELCOME: Final = frozenset((int(Kind.WELCOME), _ERROR, _GOODBYE))


_F = TypeVar("_F", ErrorFrame, Goodbye)


def _salvage(parse: type[_F], body: memoryview) -> tuple[_F, str]:
    """Parse an ERROR or GOODBYE body, or salvage what it holds; never raise.

    Returns the frame and, when it was broken, a note for the close detail.
    """
    try:
        return parse.parse(body), ""
    except ProtocolError as err:
        return parse.salvage(body), f" (malformed: {err})"


class ClientCore(_Core):
    """The client's view of its connection to the server."""

    __slots__ = (
        "_fast",
        "_keepalive",
        "_known",
        "_last_rx",
        "_next_keepalive",
        "_next_probe",
        "_paused_at",
        "_probe",
        "_request_seq",
        "_rtt_interval",
        "_silence_limit",
        "client_id",
        "events",
        "group_ids",
        "group_names",
        "last_refused",
        "missed",
        "quiet",
        "refused",
        "registry",
        "rtt",
        "unknown_group",
        "welcome",
    )

    def __init__(
        self,
        now: float,
        *,
        token: bytes | None = None,
        echo: bool = False,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        rtt_interval: float | None = None,
        registry: Registry = REGISTRY,
    ) -> None:
        """Start a connection opened at ``now``; the HELLO is queued in :attr:`outgoing`."""
        # A RELAY carries 4 bytes (the sender id) more than the MULTICAST it relays.
        super().__init__(max_frame_size + RELAY_OVERHEAD)
        self.registry = registry
        # What the hot loop looks trames up in (head -> Trame; the registry keeps it current).
        self._known = registry._by_head
        #: Id the server assigned (0 until WELCOME).
        self.client_id = 0
        #: The WELCOME received, with the server's heartbeat settings and limits.
        self.welcome: Welcome | None = None
        #: Last measured round-trip time in seconds.
        self.rtt: float | None = None
        #: Frames the server dropped for this client (its slow-consumer policy), as it told us.
        self.missed = 0
        #: Multicasts dropped here because their value type refused the value (BadValueError).
        self.refused = 0
        #: (sender id, error) of the last of them.
        self.last_refused: tuple[int, BadValueError] | None = None
        #: REPLY, PRESENCE and MEMBER_LIST frames received, parsed, in order: the adapter
        #: drains this list after each call, as it does :attr:`outgoing`.
        self.events: list[GroupEvent] = []
        #: The groups this client is in: id -> name and name -> id, from the OK REPLYs of JOIN
        #: and LEAVE (its own requests, or the server application's, request id 0).
        self.group_names: dict[int, str] = {}
        self.group_ids: dict[str, int] = {}
        #: GROUP_RELAY and PRESENCE frames dropped because their group id is not one of
        #: :attr:`group_names` (in flight when the client left: never an error).
        self.unknown_group = 0
        self._request_seq = 0
        # Whether receive_data() may scan a read straight away: open, no frame in progress.
        self._fast = False
        #: Whether the last receive_data() held only whole data frames of known fixed-size
        #: trames, all accepted: nothing for the adapter to write, log or hand on but messages.
        self.quiet = False
        self._last_rx = now
        self._silence_limit = _INF
        self._rtt_interval = rtt_interval
        self._next_probe = _INF
        self._probe: tuple[int, float] | None = None
        # While the adapter does not read (its receive queue is full), the server's pings wait
        # unread: its silence proves nothing, and we tell it we are alive every _keepalive s.
        self._paused_at: float | None = None
        self._keepalive = _INF
        self._next_keepalive = _INF
        self.outgoing.append(
            Hello(PROTOCOL_VERSION, FLAG_ECHO if echo else 0, token or b"").encode()
        )

    @property
    def server_max_frame_size(self) -> int:
        """Largest frame the server accepts (known after WELCOME)."""
        return self.welcome.max_frame_size if self.welcome else HANDSHAKE_MAX_FRAME_SIZE

    def receive_data(self, data: bytes, now: float) -> list[Message]:
        """Feed bytes from the server; return the RELAY and DATA frames decoded as messages.

        Afterwards :attr:`quiet` says whether the read held only whole data frames of known
        fixed-size trames (nothing written, no event, no refusal, no partial frame kept): then the
        adapter has nothing to do but hand the messages on.
        """
        self._last_rx = now
        if self._fast and type(data) is bytes:
            # The hot path: open, no frame in progress. quiet stays true unless _refuse() drops.
            self.quiet = True
            out: list[Message] = []
            if _c_scan is not None:
                pos = _c_scan(
                    data,
                    0,
                    self._known,
                    self.parser.max_frame_size,
                    out,
                    self.group_names,
                    self,
                )
            else:
                pos = self._scan_relays(data, out, 0)
            if pos == len(data):
                return out
            return self._receive_rest(data, pos, out, now)
        return self._receive_rest(data, 0, [], now)

    def _receive_rest(self, data: bytes, pos: int, out: list[Message], now: float) -> list[Message]:
        """Take ``data[pos:]`` through the parser, returning to the hot scan between frames."""
        self.quiet = False
        parser = self.parser
        end = len(data)
        while pos < end and self.state is not _CLOSED:
            missing = parser.missing
            if missing and self.state is _OPEN and type(data) is bytes:
                # Finish the frame in progress alone, then scan the rest: a read that starts
                # inside a frame (every read of a flood) stays on the hot path for the others.
                stop = min(end, pos + missing)
                self._feed(data[pos:stop], now, out)
                pos = stop
                if not parser.missing and self.state is _OPEN:
                    pos = self._scan(data, out, pos)
                continue
            self._feed(data[pos:] if pos else data, now, out)
            break
        self._fast = self.state is _OPEN and not parser.missing
        return out

    def _feed(self, data: bytes, now: float, out: list[Message]) -> None:
        """Parse ``data`` frame by frame, appending its messages to ``out``; handle the rest."""
        try:
            frames = self.parser.feed(data)
        except ProtocolError as err:
            self.fail(err)
            return
        decode = self.registry.decode_frame
        for frame in frames:
            kind = frame[0]
            if kind == _RELAY or kind == _DATA:
                if self.state is not _OPEN:
                    self.fail(UnexpectedFrameError(Kind(kind).name, "before WELCOME"))
                    break
                try:
                    msg = decode(frame, strict=False)
                except BadValueError as err:
                    if kind == _DATA:  # the server's own value: its error, as any other
                        self.fail(err)
                        break
                    self._refuse(SENDER.unpack_from(frame, 1)[0], err)
                    continue
                except ProtocolError as err:
                    self.fail(err)
                    break
                out.append(msg)
            elif kind == _GROUP_RELAY:
                if self.state is not _OPEN:
                    self.fail(UnexpectedFrameError("GROUP_RELAY", "before WELCOME"))
                    break
                if len(frame) < 9:
                    self.fail(TruncatedFrameError("GROUP_RELAY", 8, len(frame) - 1))
                    break
                group = self.group_names.get(int.from_bytes(frame[5:9]))
                if group is None:
                    self.unknown_group += 1  # in flight when we left: dropped unread
                    continue
                try:
                    msg = decode(frame, strict=False, group=group)
                except BadValueError as err:
                    self._refuse(SENDER.unpack_from(frame, 1)[0], err)
                    continue
                except ProtocolError as err:
                    self.fail(err)
                    break
                out.append(msg)
            else:
                try:
                    self._control(frame, kind, now)
                except ProtocolError as err:
                    self.fail(err)
                if self.closed:
                    break
        if self.parser.error is not None:
            self.fail(self.parser.error)

    def _scan(self, data: bytes, out: list[Message], pos: int) -> int:
        """Run the compiled scan if there is one, else :meth:`_scan_relays`."""
        if _c_scan is not None:
            return _c_scan(
                data,
                pos,
                self._known,
                self.parser.max_frame_size,
                out,
                self.group_names,
                self,
            )
        return self._scan_relays(data, out, pos)

    def _scan_relays(self, data: bytes, out: list[Message], pos: int) -> int:
        """Decode the RELAY and GROUP_RELAY frames of known fixed-size trames from ``data[pos:]``.

        The hot path of a receiving client: no memoryview per frame, one dict lookup checks code
        and format. Returns where it stopped; the parser takes the rest (other kinds, unknown
        codes, a partial frame, or anything odd, which it then checks in full). A value that its
        type refuses drops that message alone (:meth:`_refuse`).
        """
        known = self._known.get
        unpack_head = _HEAD_U32_UNPACK
        make = _new_message
        relay = _KIND_RELAY
        limit = self.parser.max_frame_size
        end = len(data)
        while end - pos > 13:
            length, kind, sender = unpack_head(data, pos)
            stop = pos + 4 + length
            if stop > end or length > limit or kind != _RELAY:
                # Off the RELAY path only: the RELAY loop runs the same code as before groups.
                if kind != _GROUP_RELAY or stop > end or length > limit or length < 13:
                    break
                # The same, behind the group id; a group not (or no longer) ours is left to the
                # parser path, which counts it.
                group = self.group_names.get(_GROUP_HEAD_UNPACK(data, pos)[3])
                if group is None:
                    break
                value_at = pos + 17 + data[pos + 16]
                trame = known(data[pos + 13 : value_at])
                if trame is None or stop - value_at != trame.size:
                    break
                try:
                    value = trame.unpack_from(data, value_at)
                except BadValueError as err:
                    self._refuse(sender, err)
                else:
                    out.append(make(Message, (sender, trame, value, _KIND_GROUP_RELAY, group)))
                pos = stop
                continue
            value_at = pos + 13 + data[pos + 12]
            trame = known(data[pos + 9 : value_at])
            if trame is None or stop - value_at != trame.size:
                break
            try:
                value = trame.unpack_from(data, value_at)
            except BadValueError as err:  # a value its registered class refuses
                self._refuse(sender, err)
            else:
                out.append(make(Message, (sender, trame, value, relay, None)))
            pos = stop
        return pos

    def _refuse(self, sender: int, err: BadValueError) -> None:
        """Drop a relayed multicast whose value its registered type refuses, and count it.

        The server relays what it does not decode, so the fault is the sender's, not the
        server's: failing this connection would let one publisher cut every subscriber. The
        adapter reports :attr:`refused`.
        """
        self.refused += 1
        self.last_refused = (sender, err)
        self.quiet = False  # the adapter logs it

    def _close(self, reason: DisconnectReason, detail: str = "") -> None:
        self._fast = False
        super()._close(reason, detail)

    def _control(self, frame: memoryview, kind: int, now: float) -> None:
        body = frame[1:]
        if self.state is _HANDSHAKE and kind not in _BEFORE_WELCOME:
            # The order of checks of docs/protocol.md: the kind decides before the body.
            if kind in _KIND_VALUES:
                raise UnexpectedFrameError(Kind(kind).name, "before WELCOME")
            raise UnknownKindError(kind)
        if kind == _PING:
            self.outgoing.append(pong(parse_ping_id(body, "PING")))
        elif kind == _PONG:
            ping_id = parse_ping_id(body, "PONG")
            if self._probe is not None and self._probe[0] == ping_id:
                self.rtt = max(0.0, now - self._probe[1])  # coarse clocks (uvloop: 1 ms)
                self._probe = None
        elif kind == Kind.DROPPED:
            self.missed += parse_dropped(body)
        elif kind == Kind.REPLY:
            reply = Reply.parse(body)
            if reply.status == 0:
                if reply.op == GroupOp.JOIN:
                    self._add_group(reply.group_id, reply.text)
                elif reply.op == GroupOp.LEAVE:
                    self._drop_group(reply.group_id)
            self.events.append(reply)
        elif kind == Kind.PRESENCE:
            notice = PresenceNotice.parse(body)
            # Judged here, in stream order, as GROUP_RELAY: a PRESENCE of a group not (yet, or
            # no longer) ours is dropped, even if a REPLY later in the same read maps its id.
            group = self.group_names.get(notice.group_id)
            if group is not None:
                self.events.append(GroupPresence(group, notice))
            else:
                self.unknown_group += 1
        elif kind == Kind.MEMBER_LIST:
            self.events.append(MemberList.parse(body))
        elif kind == Kind.WELCOME:
            if self.state is not _HANDSHAKE:
                raise UnexpectedFrameError("WELCOME", "after the handshake")
            self._welcome(Welcome.parse(body), now)
        elif kind == Kind.GOODBYE:
            self._peer_goodbye(body)
        elif kind == Kind.ERROR:
            self._peer_error(body)
        elif kind in _KIND_VALUES:
            raise UnexpectedFrameError(Kind(kind).name, "from the server")
        else:
            raise UnknownKindError(kind)

    # --- groups ---------------------------------------------------------------------------------

    def _add_group(self, group_id: int, name: str) -> None:
        # One id per name and one name per id: an entry either shares is stale (a reused id, or
        # a name the server gave a new id after the group emptied).
        old_id = self.group_ids.pop(name, None)
        if old_id is not None:
            self.group_names.pop(old_id, None)
        old_name = self.group_names.pop(group_id, None)
        if old_name is not None:
            self.group_ids.pop(old_name, None)
        self.group_names[group_id] = name
        self.group_ids[name] = group_id

    def _drop_group(self, group_id: int) -> None:
        name = self.group_names.pop(group_id, None)
        if name is not None:
            self.group_ids.pop(name, None)

    def _next_request_id(self) -> int:
        # 0 is the server's own (unsolicited REPLY): skipped when the counter wraps.
        self._request_seq = self._request_seq % 0xFFFF_FFFF + 1
        return self._request_seq

    def _request(self, frame: bytes) -> None:
        if self.state is not _OPEN:
            raise InvalidStateError("group requests need an open connection")
        self.outgoing.append(frame)

    def request_join(self, name: bytes, presence: bool = False) -> int:
        """Queue a JOIN of the group named ``name`` (raw UTF-8); return its request id.

        The name is sent as it is: the server judges it (a bad one is answered BAD_NAME).
        """
        request_id = self._next_request_id()
        self._request(Join(request_id, FLAG_PRESENCE if presence else 0, name).encode())
        return request_id

    def request_leave(self, group_id: int) -> int:
        """Queue a LEAVE of ``group_id``; return its request id."""
        request_id = self._next_request_id()
        self._request(Leave(request_id, group_id).encode())
        return request_id

    def request_members(self, group_id: int, after: int = 0) -> int:
        """Queue a MEMBERS request for the ids above ``after``; return its request id."""
        request_id = self._next_request_id()
        self._request(Members(request_id, group_id, after).encode())
        return request_id

    def _welcome(self, welcome: Welcome, now: float) -> None:
        if welcome.version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"server speaks protocol version {welcome.version}, this client speaks "
                f"{PROTOCOL_VERSION}; upgrade the older side",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self.welcome = welcome
        self.client_id = welcome.client_id
        # The parser keeps this side's own limit (+ RELAY_OVERHEAD, set at __init__): a server
        # announcing a larger one must not make the client buffer more than it agreed to.
        self.state = _OPEN
        interval, timeout = welcome.heartbeat_interval, welcome.heartbeat_timeout
        if interval is not None and timeout is not None:
            # The server pings every interval: silence longer than interval + timeout means dead.
            self._silence_limit = interval + timeout
            # The server counts any frame as an answer to its ping; half the shorter of the two
            # leaves room for latency.
            self._keepalive = min(interval, timeout) / 2
        if self._rtt_interval is not None:
            self._next_probe = now

    def next_timer(self) -> float | None:
        """Return when :meth:`handle_timer` must next run, or None."""
        if self.state is not _OPEN:
            return None
        if self._paused_at is not None:
            when = self._next_keepalive
        else:
            when = min(self._last_rx + self._silence_limit, self._next_probe)
        return None if when == _INF else when

    def handle_timer(self, now: float) -> None:
        """Declare the server dead after too long a silence; send an RTT probe when due.

        While reading is paused (:meth:`reading_paused`) the server is never declared silent and
        no probe goes out; a PING every half heartbeat period tells the server that this client
        is alive, so that a lagging client is handled by the server's slow-consumer policy rather
        than cut as a dead one.
        """
        if self.state is not _OPEN:
            return
        if self._paused_at is not None:
            if now >= self._next_keepalive:
                self.outgoing.append(ping(self._next_ping_id()))
                self._next_keepalive = now + self._keepalive
            return
        if now >= self._last_rx + self._silence_limit:
            self._close(
                DisconnectReason.HEARTBEAT_TIMEOUT,
                f"server silent for more than {self._silence_limit:g} s",
            )
            return
        if self._rtt_interval is not None and now >= self._next_probe:
            ping_id = self._next_ping_id()
            self.outgoing.append(ping(ping_id))
            self._probe = (ping_id, now)
            self._next_probe = now + self._rtt_interval

    def reading_paused(self, paused: bool, now: float) -> None:
        """Tell the core that the adapter paused (or resumed) reading from the server.

        Resuming restarts the silence clock at ``now``: what the server sent meanwhile, its pings
        included, is still unread in the socket.
        """
        if paused:
            if self._paused_at is None:
                self._paused_at = now
                self._probe = None  # its pong waits behind unread data: no RTT from it
                self._next_keepalive = now + self._keepalive
        elif self._paused_at is not None:
            self._paused_at = None
            self._last_rx = now
            self._next_keepalive = _INF
