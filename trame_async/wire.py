"""Framing of trames on a byte stream, and the control frames of the protocol (no asyncio).

Every frame on the wire::

    0        4       5
    +--------+-------+----------------------------+
    | length | kind  | body (length - 1 bytes)    |
    | u32 BE | u8    |                            |
    +--------+-------+----------------------------+

``length`` counts the kind byte and the body, so it is at least 1; the *frame size* checked against
``max_frame_size`` is this ``length``. All header integers are big-endian (network order); values of
data frames use the byte order of their own format. docs/protocol.md gives every kind's layout with
hex examples.

:class:`FrameParser` is the incremental parser: it is fed arbitrary chunks and returns whole frames,
refusing an oversized length from the header alone, before any body is buffered.
"""

from __future__ import annotations

import enum
import itertools
import struct
import unicodedata
from typing import Final, NamedTuple

from .codes import DisconnectReason, ErrorCode, PresenceEvent
from .exceptions import (
    FrameTooLargeError,
    HandshakeError,
    InvalidTextError,
    MalformedFrameError,
    ParserFailedError,
    ProtocolError,
    TrailingDataError,
    TruncatedFrameError,
    UnknownKindError,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_GROUP_NAME_LENGTH",
    "FLAG_PRESENCE",
    "GROUP_HEAD",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "HEADER",
    "MAGIC",
    "MAX_GROUP_NAME_LENGTH",
    "MAX_MEMBER_IDS",
    "PROTOCOL_VERSION",
    "ErrorFrame",
    "FrameParser",
    "Goodbye",
    "Hello",
    "Join",
    "Kind",
    "Leave",
    "MemberList",
    "Members",
    "PresenceNotice",
    "Reply",
    "Welcome",
    "check_group_name",
    "group_multicast",
]

#: Opening bytes of HELLO and WELCOME bodies: a stray HTTP request or another protocol fails here.
MAGIC: Final = b"TRAM"
#: Version of the wire protocol described in docs/protocol.md.
PROTOCOL_VERSION: Final = 1
#: Default largest frame (value of the length field) a peer accepts: 1 MiB.
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
#: Largest frame accepted before the handshake completes (a HELLO with a token fits easily).
HANDSHAKE_MAX_FRAME_SIZE: Final = 4096
#: Largest frame size the length field can express.
MAX_LENGTH: Final = 0xFFFF_FFFF

#: length u32 | kind u8
HEADER: Final = struct.Struct(">IB")
LENGTH_SIZE: Final = 4
_LENGTH: Final = struct.Struct(">I")

# Bodies of the control frames (after the kind byte):
#: HELLO: magic[4] | version u8 | flags u8 | token_len u16 | token[token_len]
_HELLO: Final = struct.Struct(">4sBBH")
#: WELCOME: magic[4] | version u8 | flags u8 | client_id u32 | interval_ms u32 | timeout_ms u32 |
#: max_frame_size u32
_WELCOME: Final = struct.Struct(">4sBBIIII")
#: PING / PONG: ping_id u32
_PING_ID: Final = struct.Struct(">I")
#: length u32 | kind u8 | u32: the head of a PING/PONG (the ping id: the whole frame) and of a
#: RELAY (the sender id), packed or unpacked in one call on the hot paths.
HEADER_U32: Final = struct.Struct(">IBI")
_PING_FRAME: Final = HEADER_U32.pack
#: ERROR: code u16 | reason_len u8 | reason[reason_len]
_ERROR: Final = struct.Struct(">HB")
#: GOODBYE: reason u16 | retry_after_ms u32 | text_len u8 | text[text_len]
_GOODBYE: Final = struct.Struct(">HIB")
#: RELAY prefix before the data body: sender u32
SENDER: Final = struct.Struct(">I")
#: How much larger a RELAY is than the MULTICAST it relays.
RELAY_OVERHEAD: Final = 4

#: HELLO flag: the client wants its own multicasts back.
FLAG_ECHO: Final = 0x01

# Groups (docs/protocol.md, "Groups"):
#: JOIN flag: the member wants PRESENCE frames of the group's other members.
FLAG_PRESENCE: Final = 0x01
#: length u32 | kind u8 | sender u32 | group_id u32: the head of a GROUP_RELAY, which the server
#: writes once per GROUP_MULTICAST: ``GROUP_HEAD.pack(len(frame) + 4, Kind.GROUP_RELAY, sender,
#: group_id) + frame[5:]``, ``frame`` being the GROUP_MULTICAST from its kind byte.
GROUP_HEAD: Final = struct.Struct(">IBII")
#: GROUP_RELAY / GROUP_MULTICAST prefix: sender u32 | group_id u32 (from offset 1 of a GROUP_RELAY)
_SENDER_GROUP: Final = struct.Struct(">II")
#: JOIN: request_id u32 | flags u8 | name_len u8 | name[name_len]
_JOIN: Final = struct.Struct(">IBB")
#: LEAVE: request_id u32 | group_id u32
_LEAVE: Final = struct.Struct(">II")
#: MEMBERS: request_id u32 | group_id u32 | after u32
_MEMBERS: Final = struct.Struct(">III")
#: REPLY: request_id u32 | op u8 | status u16 | group_id u32 | text_len u8 | text[text_len]
_REPLY: Final = struct.Struct(">IBHIB")
#: PRESENCE: group_id u32 | event u8 | client_id u32 | reason u16
_PRESENCE: Final = struct.Struct(">IBIH")
#: MEMBER_LIST: request_id u32 | group_id u32 | more u8 | count u16 | client_id u32 * count
_MEMBER_LIST: Final = struct.Struct(">IIBH")
#: Most client ids in one MEMBER_LIST frame (4 KiB of ids).
MAX_MEMBER_IDS: Final = 1024
#: Longest group name the JOIN layout can carry (``name_len`` is a u8), in UTF-8 bytes.
MAX_GROUP_NAME_LENGTH: Final = 255
#: The server's default limit on group names, in UTF-8 bytes.
DEFAULT_MAX_GROUP_NAME_LENGTH: Final = 64
_U32_MAX: Final = 0xFFFF_FFFF


class Kind(enum.IntEnum):
    """The function of a frame: its first byte after the length."""

    HELLO = 0x01
    """Client -> server: opens the connection (magic, version, flags, token)."""
    WELCOME = 0x02
    """Server -> client: accepts it (client id, heartbeat settings, limits)."""
    PING = 0x03
    """Either way: liveness probe carrying an id."""
    PONG = 0x04
    """Either way: answer to PING, echoing its id."""
    MULTICAST = 0x10
    """Client -> server: a trame to relay to every connected client."""
    RELAY = 0x11
    """Server -> client: a multicast as relayed, with the sender's id (0: the server)."""
    DATA = 0x12
    """Client -> server: a trame for the server's own handlers; server -> client: a direct trame."""
    DROPPED = 0x13
    """Server -> client: this many frames for the client were dropped by its slow-consumer policy,
    just before this point of the stream."""
    JOIN = 0x14
    """Client -> server: join a group by name (answered by REPLY)."""
    LEAVE = 0x15
    """Client -> server: leave a group by id (answered by REPLY)."""
    GROUP_MULTICAST = 0x16
    """Client -> server: a trame to relay to the other members of one of the client's groups."""
    GROUP_RELAY = 0x17
    """Server -> client: a group multicast as relayed, with the sender's id and the group's id."""
    MEMBERS = 0x18
    """Client -> server: list the ids of a group's members (answered by MEMBER_LIST or REPLY)."""
    REPLY = 0x19
    """Server -> client: the outcome of a group request, or a join/leave the server made."""
    PRESENCE = 0x1A
    """Server -> client: another member joined or left a group (to members that asked)."""
    MEMBER_LIST = 0x1B
    """Server -> client: a page of a group's member ids, ascending."""
    ERROR = 0x20
    """Either way: the sender found a protocol error and closes after this frame."""
    GOODBYE = 0x21
    """Either way: clean close, with a reason and a retry-after hint for shutdowns."""


_KINDS: Final = frozenset(int(k) for k in Kind)
_PING: Final = int(Kind.PING)
_PONG: Final = int(Kind.PONG)


def check_kind(kind: int) -> Kind:
    """Return ``kind`` as a :class:`Kind`, or raise :class:`UnknownKindError`."""
    if kind not in _KINDS:
        raise UnknownKindError(kind)
    return Kind(kind)


def frame(kind: Kind, body: bytes = b"") -> bytes:
    """Return a whole frame of ``kind`` around ``body``."""
    return HEADER.pack(1 + len(body), kind) + body


def _exact(body: memoryview | bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise TruncatedFrameError(what, size, len(body))
    if len(body) > size:
        raise TrailingDataError(what, len(body) - size)


def _text(raw: bytes | memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise InvalidTextError(what, str(err.reason)) from err


def _short_text(text: str) -> bytes:
    """UTF-8 encode ``text``, cut at 255 bytes on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) > 255:
        raw = raw[:255].decode("utf-8", "ignore").encode("utf-8")
    return raw


# --- control frames ---------------------------------------------------------------------------


class Hello(NamedTuple):
    """Body of a HELLO frame."""

    version: int
    flags: int
    token: bytes

    @property
    def echo(self) -> bool:
        """Whether the client asked to receive its own multicasts."""
        return bool(self.flags & FLAG_ECHO)

    def encode(self) -> bytes:
        """Return the whole HELLO frame."""
        if len(self.token) > 0xFFFF:
            raise ValueError("authentication token longer than 65535 bytes")
        return frame(
            Kind.HELLO, _HELLO.pack(MAGIC, self.version, self.flags, len(self.token)) + self.token
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Hello:
        """Parse a HELLO body (after the kind byte); check magic before anything else."""
        if len(body) < 4 or bytes(body[:4]) != MAGIC:
            raise HandshakeError(
                f"first frame does not start with magic {MAGIC!r}: the peer is not a "
                f"trame_async client"
            )
        if len(body) < _HELLO.size:
            raise TruncatedFrameError("HELLO", _HELLO.size, len(body))
        _, version, flags, token_len = _HELLO.unpack_from(body)
        _exact(body, _HELLO.size + token_len, "HELLO")
        return cls(version, flags, bytes(body[_HELLO.size :]))


class Welcome(NamedTuple):
    """Body of a WELCOME frame. Times are in milliseconds on the wire, seconds here."""

    version: int
    flags: int
    client_id: int
    heartbeat_interval: float | None
    heartbeat_timeout: float | None
    max_frame_size: int

    def encode(self) -> bytes:
        """Return the whole WELCOME frame."""
        return frame(
            Kind.WELCOME,
            _WELCOME.pack(
                MAGIC,
                self.version,
                self.flags,
                self.client_id,
                _to_ms(self.heartbeat_interval),
                _to_ms(self.heartbeat_timeout),
                self.max_frame_size,
            ),
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Welcome:
        """Parse a WELCOME body (after the kind byte)."""
        if len(body) < 4 or bytes(body[:4]) != MAGIC:
            raise HandshakeError(
                f"answer does not start with magic {MAGIC!r}: the peer is not a trame_async server"
            )
        _exact(body, _WELCOME.size, "WELCOME")
        _, version, flags, client_id, interval, timeout, max_size = _WELCOME.unpack_from(body)
        return cls(version, flags, client_id, _from_ms(interval), _from_ms(timeout), max_size)


def _to_ms(seconds: float | None) -> int:
    if seconds is None:
        return 0
    return max(1, min(MAX_LENGTH, round(seconds * 1000)))


def _from_ms(ms: int) -> float | None:
    return None if ms == 0 else ms / 1000


def ping(ping_id: int) -> bytes:
    """Return a PING frame."""
    return _PING_FRAME(5, _PING, ping_id)


def pong(ping_id: int) -> bytes:
    """Return a PONG frame echoing ``ping_id``."""
    return _PING_FRAME(5, _PONG, ping_id)


#: DROPPED: count u32
_COUNT: Final = struct.Struct(">I")


def dropped_notice(count: int) -> bytes:
    """Return a DROPPED frame telling a client that ``count`` frames were dropped for it."""
    return HEADER.pack(5, Kind.DROPPED) + _COUNT.pack(min(count, 0xFFFF_FFFF))


def parse_dropped(body: memoryview | bytes) -> int:
    """Return the count of a DROPPED body."""
    _exact(body, 4, "DROPPED")
    value: int = _COUNT.unpack_from(body)[0]
    return value


def parse_ping_id(body: memoryview | bytes, what: str) -> int:
    """Return the id of a PING or PONG body."""
    _exact(body, 4, what)
    value: int = _PING_ID.unpack_from(body)[0]
    return value


class ErrorFrame(NamedTuple):
    """Body of an ERROR frame: numeric code and short reason (never internals)."""

    code: int
    reason: str

    def encode(self) -> bytes:
        """Return the whole ERROR frame."""
        raw = _short_text(self.reason)
        return frame(Kind.ERROR, _ERROR.pack(self.code, len(raw)) + raw)

    @classmethod
    def parse(cls, body: memoryview | bytes) -> ErrorFrame:
        """Parse an ERROR body (after the kind byte)."""
        if len(body) < _ERROR.size:
            raise TruncatedFrameError("ERROR", _ERROR.size, len(body))
        code, n = _ERROR.unpack_from(body)
        _exact(body, _ERROR.size + n, "ERROR")
        return cls(code, _text(body[_ERROR.size :], "ERROR reason"))

    @classmethod
    def salvage(cls, body: memoryview | bytes) -> ErrorFrame:
        """Read what an ERROR body holds, never raising: an ERROR is never answered.

        A code cut short reads as 0 (a code no version uses, so :attr:`error_code` is None); the
        reason is what its bytes hold, undecodable bytes replaced.
        """
        code = int.from_bytes(body[:2]) if len(body) >= 2 else 0
        reason = bytes(body[3 : 3 + body[2]]) if len(body) > 2 else b""
        return cls(code, reason.decode("utf-8", "replace"))

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an :class:`ErrorCode`, or None for a code this version does not know."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


class Goodbye(NamedTuple):
    """Body of a GOODBYE frame: reason, retry-after hint (seconds, None for none), short text."""

    reason: int
    retry_after: float | None
    text: str

    def encode(self) -> bytes:
        """Return the whole GOODBYE frame."""
        raw = _short_text(self.text)
        return frame(
            Kind.GOODBYE, _GOODBYE.pack(self.reason, _to_ms(self.retry_after), len(raw)) + raw
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Goodbye:
        """Parse a GOODBYE body (after the kind byte)."""
        if len(body) < _GOODBYE.size:
            raise TruncatedFrameError("GOODBYE", _GOODBYE.size, len(body))
        reason, retry_ms, n = _GOODBYE.unpack_from(body)
        _exact(body, _GOODBYE.size + n, "GOODBYE")
        return cls(reason, _from_ms(retry_ms), _text(body[_GOODBYE.size :], "GOODBYE text"))

    @classmethod
    def salvage(cls, body: memoryview | bytes) -> Goodbye:
        """Read what a GOODBYE body holds, never raising: a GOODBYE is never answered.

        A reason cut short reads as GOODBYE (1), a hint cut short as none; the text is what its
        bytes hold, undecodable bytes replaced.
        """
        reason = int.from_bytes(body[:2]) if len(body) >= 2 else int(DisconnectReason.GOODBYE)
        retry = _from_ms(int.from_bytes(body[2:6])) if len(body) >= 6 else None
        text = bytes(body[7 : 7 + body[6]]) if len(body) > 6 else b""
        return cls(reason, retry, text.decode("utf-8", "replace"))

    @property
    def disconnect_reason(self) -> DisconnectReason:
        """The reason as a :class:`DisconnectReason` (GOODBYE for codes this version does not know)."""
        try:
            return DisconnectReason(self.reason)
        except ValueError:
            return DisconnectReason.GOODBYE


# --- groups -----------------------------------------------------------------------------------


def check_group_name(raw: bytes, max_length: int = MAX_GROUP_NAME_LENGTH) -> str | None:
    """Return ``raw`` decoded if it is a valid group name, else None.

    A valid name is 1 to ``max_length`` bytes of UTF-8 with no control character (Unicode
    category Cc: C0, DEL and C1) and not only whitespace. Names are compared byte for byte: no
    normalisation happens, so two spellings of one text are two groups.
    """
    if not 0 < len(raw) <= max_length:
        return None
    try:
        name = str(raw, "utf-8")
    except UnicodeDecodeError:
        return None
    if name.isspace():
        return None
    # isprintable() is false for every Cc character: a quick pass for the usual name.
    if not name.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in name):
        return None
    return name


def group_multicast(group_id: int, multicast: bytes) -> bytes:
    """Return the GROUP_MULTICAST to ``group_id`` of a whole MULTICAST frame's data body."""
    # The GROUP_MULTICAST is 4 bytes longer: its length field is the MULTICAST's whole size.
    return HEADER_U32.pack(len(multicast), Kind.GROUP_MULTICAST, group_id) + multicast[5:]


class Join(NamedTuple):
    """Body of a JOIN frame. ``name`` is raw bytes: the server judges it (REPLY ``BAD_NAME``)."""

    request_id: int
    flags: int
    name: bytes

    @property
    def presence(self) -> bool:
        """Whether the member asks for PRESENCE frames of this group."""
        return bool(self.flags & FLAG_PRESENCE)

    def encode(self) -> bytes:
        """Return the whole JOIN frame."""
        if len(self.name) > MAX_GROUP_NAME_LENGTH:
            raise ValueError(f"group name longer than {MAX_GROUP_NAME_LENGTH} bytes")
        return frame(Kind.JOIN, _JOIN.pack(self.request_id, self.flags, len(self.name)) + self.name)

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Join:
        """Parse a JOIN body (after the kind byte); reserved flag bits are malformed."""
        if len(body) < _JOIN.size:
            raise TruncatedFrameError("JOIN", _JOIN.size, len(body))
        request_id, flags, n = _JOIN.unpack_from(body)
        _exact(body, _JOIN.size + n, "JOIN")
        if flags & ~FLAG_PRESENCE:
            raise MalformedFrameError(
                f"JOIN flags 0x{flags:02x} set reserved bits (only 0x01 PRESENCE is defined)"
            )
        return cls(request_id, flags, bytes(body[_JOIN.size :]))


class Leave(NamedTuple):
    """Body of a LEAVE frame."""

    request_id: int
    group_id: int

    def encode(self) -> bytes:
        """Return the whole LEAVE frame."""
        return frame(Kind.LEAVE, _LEAVE.pack(self.request_id, self.group_id))

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Leave:
        """Parse a LEAVE body (after the kind byte)."""
        _exact(body, _LEAVE.size, "LEAVE")
        return cls(*_LEAVE.unpack_from(body))


class Members(NamedTuple):
    """Body of a MEMBERS frame: the member ids above ``after`` are asked for."""

    request_id: int
    group_id: int
    after: int

    def encode(self) -> bytes:
        """Return the whole MEMBERS frame."""
        return frame(Kind.MEMBERS, _MEMBERS.pack(self.request_id, self.group_id, self.after))

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Members:
        """Parse a MEMBERS body (after the kind byte)."""
        _exact(body, _MEMBERS.size, "MEMBERS")
        return cls(*_MEMBERS.unpack_from(body))


class Reply(NamedTuple):
    """Body of a REPLY frame: ``op`` a GroupOp, ``status`` a GroupStatus (0 OK).

    For an OK JOIN ``text`` is the group's name; for a refusal, a short human reason.
    """

    request_id: int
    op: int
    status: int
    group_id: int
    text: str

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.status == 0

    def encode(self) -> bytes:
        """Return the whole REPLY frame (text cut at 255 bytes on a character boundary)."""
        raw = _short_text(self.text)
        return frame(
            Kind.REPLY,
            _REPLY.pack(self.request_id, self.op, self.status, self.group_id, len(raw)) + raw,
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> Reply:
        """Parse a REPLY body (after the kind byte)."""
        if len(body) < _REPLY.size:
            raise TruncatedFrameError("REPLY", _REPLY.size, len(body))
        request_id, op, status, group_id, n = _REPLY.unpack_from(body)
        _exact(body, _REPLY.size + n, "REPLY")
        return cls(request_id, op, status, group_id, _text(body[_REPLY.size :], "REPLY text"))


class PresenceNotice(NamedTuple):
    """Body of a PRESENCE frame: ``event`` a PresenceEvent; ``reason`` 0, or the DisconnectReason
    of a member that left by disconnecting."""

    group_id: int
    event: int
    client_id: int
    reason: int

    def encode(self) -> bytes:
        """Return the whole PRESENCE frame."""
        return frame(
            Kind.PRESENCE,
            _PRESENCE.pack(self.group_id, self.event, self.client_id, self.reason),
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> PresenceNotice:
        """Parse a PRESENCE body (after the kind byte); an unknown event is malformed."""
        _exact(body, _PRESENCE.size, "PRESENCE")
        group_id, event, client_id, reason = _PRESENCE.unpack_from(body)
        if event not in _PRESENCE_EVENTS:
            raise MalformedFrameError(f"PRESENCE event {event} is neither 1 JOINED nor 2 LEFT")
        return cls(group_id, event, client_id, reason)


_PRESENCE_EVENTS: Final = frozenset(int(e) for e in PresenceEvent)


class MemberList(NamedTuple):
    """Body of a MEMBER_LIST frame: ascending ids; ``more`` when the server holds further ones."""

    request_id: int
    group_id: int
    more: bool
    ids: tuple[int, ...]

    def encode(self) -> bytes:
        """Return the whole MEMBER_LIST frame."""
        n = len(self.ids)
        if n > MAX_MEMBER_IDS:
            raise ValueError(f"a MEMBER_LIST carries at most {MAX_MEMBER_IDS} ids, not {n}")
        return frame(
            Kind.MEMBER_LIST,
            _MEMBER_LIST.pack(self.request_id, self.group_id, int(self.more), n)
            + struct.pack(f">{n}I", *self.ids),
        )

    @classmethod
    def parse(cls, body: memoryview | bytes) -> MemberList:
        """Parse a MEMBER_LIST body (after the kind byte).

        Malformed: a count above :data:`MAX_MEMBER_IDS`, ``more`` other than 0 or 1 (or 1 with no
        id: the asker could not go on), ids not strictly ascending.
        """
        if len(body) < _MEMBER_LIST.size:
            raise TruncatedFrameError("MEMBER_LIST", _MEMBER_LIST.size, len(body))
        request_id, group_id, more, n = _MEMBER_LIST.unpack_from(body)
        _exact(body, _MEMBER_LIST.size + 4 * n, "MEMBER_LIST")
        if n > MAX_MEMBER_IDS:
            raise MalformedFrameError(f"MEMBER_LIST of {n} ids (at most {MAX_MEMBER_IDS})")
        if more > 1 or (more and not n):
            raise MalformedFrameError(f"MEMBER_LIST more={more} with {n} ids")
        ids: tuple[int, ...] = struct.unpack_from(f">{n}I", body, _MEMBER_LIST.size)
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise MalformedFrameError("MEMBER_LIST ids are not strictly ascending")
        return cls(request_id, group_id, bool(more), ids)


# --- incremental parser -----------------------------------------------------------------------


class FrameParser:
    """Cut a byte stream into frames, checking each length before buffering its body.

    :meth:`feed` returns the frames completed by a chunk, each as a read-only ``memoryview`` that
    starts at the kind byte (the length field is stripped). The views stay valid forever: they point
    into immutable ``bytes``, never into the parser's own buffer.

    Work is linear in the bytes fed, whatever the chunking: complete frames are sliced out of the
    chunk without copying, and only the unfinished tail is kept, in a buffer never larger than
    ``max_frame_size + 4`` bytes. After an error the parser is failed and refuses further input.
    """

    __slots__ = ("_buf", "_failed", "_need", "error", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 1 <= max_frame_size <= MAX_LENGTH:
            raise ValueError(f"max_frame_size must be between 1 and {MAX_LENGTH}")
        #: Largest accepted value of the length field; may be changed between feeds.
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        # Total bytes (header included) of the frame being buffered, 0 while the header is short.
        self._need = 0
        self._failed = False
        #: An error found after the frames returned by the last :meth:`feed` (the parser is failed).
        self.error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held by the parser."""
        return len(self._buf)

    @property
    def missing(self) -> int:
        """Bytes that complete the frame in progress (its length field first), 0 if none."""
        buf = self._buf
        return (self._need or LENGTH_SIZE) - len(buf) if buf else 0

    @property
    def in_frame(self) -> bool:
        """Whether a frame has been started but not completed."""
        return bool(self._buf)

    def _check_length(self, length: int) -> int:
        if length > self.max_frame_size:
            self._failed = True
            raise FrameTooLargeError(length, self.max_frame_size)
        if length < 1:
            self._failed = True
            raise TruncatedFrameError("frame header (length shorter than the kind byte)", 1, length)
        return length + LENGTH_SIZE

    def frame_end(self, data: bytes) -> int | None:
        """Return the offset in ``data`` where the frame in progress ends, if its length is known.

        Lets a caller feed exactly one frame, then change :attr:`max_frame_size` for the next.
        """
        buf = self._buf
        if self._need:
            return self._need - len(buf)
        have = bytes(buf[:LENGTH_SIZE]) + bytes(data[: LENGTH_SIZE - len(buf)])
        if len(have) < LENGTH_SIZE:
            return None
        length: int = _LENGTH.unpack(have)[0]
        return LENGTH_SIZE + length - len(buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Consume ``data``; return the frames it completes, in order.

        Raises:
            FrameTooLargeError: a length prefix above :attr:`max_frame_size`.
            TruncatedFrameError: a length of 0 (shorter than the header).
            ParserFailedError: the parser raised before (it refuses any further input).

        When frames precede the bad header in the same chunk, they are returned and the error is
        left in :attr:`error` instead.
        """
        if self._failed:
            if self.error is not None:
                err, self.error = self.error, None
                raise err
            raise ParserFailedError
        if type(data) is not bytes:
            data = bytes(data)  # views handed out must point into immutable memory
        frames: list[memoryview] = []
        buf = self._buf
        pos = 0
        end = len(data)
        if buf:
            # Finish the frame in progress first: only the bytes it needs are copied.
            if not self._need:
                take = LENGTH_SIZE - len(buf)
                buf += data[:take]
                pos = min(take, end)
                if len(buf) < LENGTH_SIZE:
                    return frames
                self._need = self._check_length(_LENGTH.unpack_from(buf)[0])
            take = self._need - len(buf)
            if take > end - pos:
                buf += data[pos:]
                return frames
            buf += data[pos : pos + take]
            pos += take
            frames.append(memoryview(bytes(buf))[LENGTH_SIZE:])
            buf.clear()
            self._need = 0
        view = memoryview(data)
        max_size = self.max_frame_size
        unpack_length = _LENGTH.unpack_from
        while end - pos >= LENGTH_SIZE:
            length = unpack_length(view, pos)[0]
            if length > max_size or length < 1:
                try:
                    self._check_length(length)
                except ProtocolError as err:
                    if not frames:
                        raise
                    # The frames before the bad header are good: hand them over first.
                    self.error = err
                    return frames
            stop = pos + LENGTH_SIZE + length
            if stop > end:
                self._need = stop - pos
                break
            frames.append(view[pos + LENGTH_SIZE : stop])
            pos = stop
        if pos < end:
            buf += view[pos:]
        return frames
