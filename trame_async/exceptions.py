"""Every error trame_async raises, in one hierarchy.

.. code-block:: text

    TrameError
    ├── CodecError (ValueError)               bad use of the codec by this program
    │   ├── RegistrationError                 refused trame type at register()
    │   └── ValueMismatchError                value does not fit its trame's format
    ├── UnknownTrameError (LookupError)       trame code not registered
    ├── ProtocolError                         bad bytes from a peer (answered with an ERROR frame)
    │   ├── MalformedFrameError               layout broken
    │   │   ├── TruncatedFrameError           a field runs past the end of the frame
    │   │   ├── TrailingDataError             bytes after the last field
    │   │   ├── UnknownKindError              kind byte not in the protocol
    │   │   ├── BadFormatError                format field not a carriable struct format
    │   │   ├── ValueSizeMismatchError        value length != size of the format
    │   │   └── InvalidTextError              text field not UTF-8
    │   ├── FrameTooLargeError                length prefix above the maximum frame size
    │   ├── HandshakeError                    not a trame_async peer, or wrong version
    │   ├── UnexpectedFrameError              valid frame, wrong state or direction
    │   └── BadValueError                     value refused by the receiver's value type
    ├── ConnectionClosed                      the connection is gone; carries the reason
    │   └── AuthenticationError               the server refused our token
    ├── GroupRefused                          the server refused a group request (REPLY status)
    ├── ConnectError (OSError)                could not open the connection
    └── InvalidStateError (RuntimeError)      call not valid in the object's current state
        └── ParserFailedError (ValueError)    FrameParser fed again after it raised

A peer-caused :class:`ProtocolError` carries the :class:`~trame_async.codes.ErrorCode` that goes into
the ``ERROR`` frame sent back. :class:`UnknownTrameError` is raised by :func:`trame_async.decode` for an
unregistered code and also carries :attr:`ErrorCode.UNKNOWN_TRAME`.

Messages say what was wrong (sizes, codes) and what to do; attributes carry the same data for
programs.
"""

from __future__ import annotations

from typing import Final

from .codes import DisconnectReason, ErrorCode, GroupOp, GroupStatus

__all__ = [
    "AuthenticationError",
    "BadFormatError",
    "BadValueError",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "FrameTooLargeError",
    "GroupRefused",
    "HandshakeError",
    "InvalidStateError",
    "InvalidTextError",
    "MalformedFrameError",
    "ParserFailedError",
    "ProtocolError",
    "RegistrationError",
    "TrailingDataError",
    "TrameError",
    "TruncatedFrameError",
    "UnexpectedFrameError",
    "UnknownKindError",
    "UnknownTrameError",
    "ValueMismatchError",
    "ValueSizeMismatchError",
]


class TrameError(Exception):
    """Base class of every exception raised by trame_async."""

    #: Code sent in the ERROR frame when this error is caused by a peer.
    error_code: ErrorCode = ErrorCode.INTERNAL_ERROR


class CodecError(TrameError, ValueError):
    """The codec was used wrongly by this program (not by a peer)."""


class RegistrationError(CodecError):
    """A trame type was refused at registration: bad code, duplicate code or bad format."""


class ValueMismatchError(CodecError):
    """A value does not fit the format of its trame (wrong type, wrong field count, out of range)."""

    def __init__(self, code: str, fmt: str, value: object, detail: str) -> None:
        self.code = code
        self.fmt = fmt
        self.value = value
        self.detail = detail
        super().__init__(code, fmt, value, detail)

    def __str__(self) -> str:
        shown = repr(self.value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return (
            f"value {shown} does not fit trame {self.code!r} (format {self.fmt!r}): {self.detail}; "
            f"pass a value that the format can hold"
        )


class UnknownTrameError(TrameError, LookupError):
    """A trame code that is not registered in the registry in use."""

    error_code = ErrorCode.UNKNOWN_TRAME

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(code)

    def __str__(self) -> str:
        return (
            f"unknown trame code {self.code!r}: register it with "
            f"trame_async.register({self.code!r}, fmt) on both sides before use"
        )


class ProtocolError(TrameError):
    """Bytes received from a peer break the wire protocol.

    The receiving side answers with an ``ERROR`` frame carrying :attr:`error_code`, then closes that
    connection alone.
    """

    error_code = ErrorCode.MALFORMED_FRAME


class MalformedFrameError(ProtocolError):
    """A frame whose bytes do not follow the layout of its kind."""

    error_code = ErrorCode.MALFORMED_FRAME


class TruncatedFrameError(MalformedFrameError):
    """A field runs past the end of the frame (or the length is shorter than the header)."""

    def __init__(self, what: str, needed: int, available: int) -> None:
        self.what = what
        self.needed = needed
        self.available = available
        super().__init__(what, needed, available)

    def __str__(self) -> str:
        return (
            f"truncated frame: {self.what} needs {self.needed} bytes but only {self.available} "
            f"remain; the sender must write every field of the frame (see docs/protocol.md)"
        )


class TrailingDataError(MalformedFrameError):
    """Bytes remain after the last field of a frame."""

    error_code = ErrorCode.TRAILING_DATA

    def __init__(self, what: str, extra: int) -> None:
        self.what = what
        self.extra = extra
        super().__init__(what, extra)

    def __str__(self) -> str:
        return (
            f"{self.extra} unexpected trailing bytes after {self.what}; a frame's length must "
            f"cover exactly its fields"
        )


class UnknownKindError(MalformedFrameError):
    """The kind byte names no frame kind of this protocol version."""

    error_code = ErrorCode.UNKNOWN_KIND

    def __init__(self, kind: int) -> None:
        self.kind = kind
        super().__init__(kind)

    def __str__(self) -> str:
        return (
            f"unknown frame kind 0x{self.kind:02x}; the peer may speak a newer protocol version "
            f"(kinds are listed in docs/protocol.md)"
        )


class BadFormatError(MalformedFrameError):
    """The format field of a data frame is not a struct format the protocol can carry."""

    error_code = ErrorCode.BAD_FORMAT

    def __init__(self, fmt: bytes | str, detail: str) -> None:
        self.fmt = fmt
        self.detail = detail
        super().__init__(fmt, detail)

    def __str__(self) -> str:
        return (
            f"bad format field {self.fmt!r}: {self.detail}; formats are ASCII struct formats with "
            f"an explicit '<', '>' or '!' byte order"
        )


class ValueSizeMismatchError(MalformedFrameError):
    """The value's length differs from the size its format says, or the format is not the one
    registered for the code."""

    error_code = ErrorCode.VALUE_SIZE_MISMATCH

    def __init__(self, code: str, fmt: str, expected: int | str, actual: int | str) -> None:
        self.code = code
        self.fmt = fmt
        self.expected = expected
        self.actual = actual
        super().__init__(code, fmt, expected, actual)

    def __str__(self) -> str:
        if isinstance(self.expected, int) and isinstance(self.actual, int):
            return (
                f"trame {self.code!r} format {self.fmt!r}: value is {self.actual} bytes, the "
                f"format needs {self.expected}; sender and receiver must agree on the format"
            )
        return (
            f"trame {self.code!r}: format {self.actual!r} differs from the registered "
            f"{self.expected!r}; register the same format on both sides"
        )


class InvalidTextError(MalformedFrameError):
    """A text field is not valid UTF-8."""

    error_code = ErrorCode.INVALID_TEXT

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(what, detail)

    def __str__(self) -> str:
        return f"{self.what} is not valid UTF-8 ({self.detail}); text must be encoded as UTF-8"


class FrameTooLargeError(ProtocolError):
    """A length prefix above the receiver's maximum frame size (refused from the header alone)."""

    error_code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(size, limit)

    def __str__(self) -> str:
        return (
            f"frame of {self.size} bytes exceeds the maximum frame size of {self.limit} bytes; "
            f"send smaller values or raise max_frame_size on both sides"
        )


class HandshakeError(ProtocolError):
    """The peer is not a trame_async peer (bad magic) or speaks another protocol version."""

    error_code = ErrorCode.BAD_HANDSHAKE

    def __init__(self, detail: str, error_code: ErrorCode = ErrorCode.BAD_HANDSHAKE) -> None:
        self.detail = detail
        self.error_code = error_code
        super().__init__(detail, error_code)

    def __str__(self) -> str:
        return f"handshake failed: {self.detail}"


class UnexpectedFrameError(ProtocolError):
    """A well-formed frame that is not allowed in this state or direction."""

    error_code = ErrorCode.UNEXPECTED_FRAME

    def __init__(self, kind_name: str, state: str) -> None:
        self.kind_name = kind_name
        self.state = state
        super().__init__(kind_name, state)

    def __str__(self) -> str:
        return (
            f"unexpected {self.kind_name} frame {self.state}; follow the frame order of "
            f"docs/protocol.md"
        )


class BadValueError(ProtocolError):
    """A well-formed value that the receiver's value type refuses: its constructor (or a
    dataclass's ``__post_init__``) raised.

    The peer's bytes follow the format, but break a rule of the class registered for the code, so
    the connection fails like any protocol error rather than with the class's own exception.
    """

    error_code = ErrorCode.BAD_VALUE

    def __init__(self, code: str, cls_name: str, detail: str) -> None:
        self.code = code
        self.cls_name = cls_name
        self.detail = detail
        super().__init__(code, cls_name, detail)

    def __str__(self) -> str:
        return (
            f"value of trame {self.code!r} refused by {self.cls_name}: {self.detail}; the sender "
            f"must send values that the receiver's type accepts"
        )


class ConnectionClosed(TrameError):
    """The connection is closed; :attr:`reason` says why.

    Raised by ``receive()`` and by sends on a closed connection. :attr:`peer_error_code` is the
    :class:`~trame_async.ErrorCode` of the ``ERROR`` frame that ended it (sent or received), if any;
    :attr:`retry_after` (seconds) the hint of the server's ``GOODBYE``, if any.
    """

    def __init__(
        self,
        reason: DisconnectReason,
        detail: str = "",
        *,
        error_code: ErrorCode | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.peer_error_code = error_code
        self.retry_after = retry_after
        super().__init__(reason, detail)

    def __str__(self) -> str:
        text = f"connection closed: {self.reason}"
        code = self.peer_error_code
        if self.detail:
            text += f": {self.detail}"
            if code is not None and code.name not in self.detail:
                text += f" (peer error {code.name})"
        elif code is not None:
            text += f" (peer error {code.name})"
        if self.retry_after is not None:
            text += f"; the server asks to retry after {self.retry_after:g} s"
        return text


class AuthenticationError(ConnectionClosed):
    """The server refused the authentication token (``token_given`` says whether one was sent)."""

    #: Whether this client sent a token at all.
    token_given: bool = True

    def __str__(self) -> str:
        if self.token_given:
            what = "the server refused this client's token (AUTH_FAILED)"
            fix = "pass the server's token as connect(..., token=...) or in TRAME_TOKEN"
        else:
            what = "the server requires a token and this client sent none (AUTH_FAILED)"
            fix = "pass it as connect(..., token=...) or set TRAME_TOKEN"
        return f"{what}: {fix}"


#: What to do about each refusal, for GroupRefused's message.
_GROUP_ADVICE: Final = {
    GroupStatus.NOT_MEMBER: "join the group first",
    GroupStatus.REFUSED: "the server application decides who may join",
    GroupStatus.BAD_NAME: (
        "use 1 to 64 bytes of UTF-8 (the server's max_group_name_length), no control "
        "characters, not only whitespace"
    ),
    GroupStatus.TOO_MANY_GROUPS: "leave a group first, or raise the server's max_groups_per_client",
    GroupStatus.SERVER_GROUP_LIMIT: "the server holds its max_groups groups; try again later",
    GroupStatus.NOT_ALLOWED: (
        "the group is above the server's max_presence_members: join without presence"
    ),
}


class GroupRefused(TrameError):
    """The server refused a group request: its REPLY carried a status other than OK.

    Attributes:
        status: The :class:`~trame_async.GroupStatus` (an int for a status this version does not
            know).
        reason: The server's short text (for ``REFUSED``, the application's own reason).
        op: The :class:`~trame_async.GroupOp` refused, if known.
        group: The group's name, if known.
    """

    def __init__(
        self,
        status: GroupStatus | int,
        reason: str = "",
        *,
        op: GroupOp | None = None,
        group: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.op = op
        self.group = group
        super().__init__(status, reason)

    def __str__(self) -> str:
        what = f"{self.op.name.lower()} " if self.op is not None else "request "
        if self.group is not None:
            what += f"of group {self.group!r} "
        name = self.status.name if isinstance(self.status, GroupStatus) else str(self.status)
        text = f"{what}refused by the server: {name}"
        if self.reason:
            text += f" ({self.reason})"
        advice = _GROUP_ADVICE.get(self.status) if isinstance(self.status, GroupStatus) else None
        if advice:
            text += f"; {advice}"
        return text


#: What a failed connect advises when nothing more specific is known.
_CHECK_ADDRESS = "check that trame-serve runs there and that the address and port are right"


class ConnectError(TrameError, OSError):
    """The connection could not be opened (refused, timed out, unreachable, TLS refused).

    :attr:`hint` says what to do; by default, to check the address, which a TLS failure replaces
    with advice about certificates. With several server addresses, :attr:`errors` says why each
    failed.
    """

    def __init__(self, host: str, port: int, detail: str, *, hint: str | None = None) -> None:
        self.host = host
        self.port = port
        self.detail = detail
        self.hint = hint or _CHECK_ADDRESS
        #: With several server addresses, ``((host, port), error)`` of each one tried, in order
        #: (empty for a single address).
        self.errors: list[tuple[tuple[str, int], Exception]] = []
        super().__init__(host, port, detail)

    def __str__(self) -> str:
        return f"cannot connect to {self.host}:{self.port}: {self.detail}; {self.hint}"


class InvalidStateError(TrameError, RuntimeError):
    """A call that is not valid in the object's current state (e.g. sending after close)."""


class ParserFailedError(InvalidStateError, ValueError):
    """:meth:`FrameParser.feed <trame_async.wire.FrameParser.feed>` called after it raised.

    The stream lost its framing at the error, so no later byte can be trusted: close the
    connection. Also a ``ValueError``, which earlier versions raised here.
    """

    def __str__(self) -> str:
        return (
            "the frame parser failed earlier and refuses further input; close the connection "
            "and open a new one"
        )
