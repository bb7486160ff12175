"""Numeric codes shared by the wire protocol and the API.

:class:`ErrorCode` is carried by ``ERROR`` frames; :class:`DisconnectReason` by ``GOODBYE`` frames and
by every ``on_disconnect`` report. Both are part of the wire protocol: values never change meaning.
"""

from __future__ import annotations

import enum

__all__ = ["DisconnectReason", "ErrorCode", "GroupOp", "GroupStatus", "PresenceEvent"]


class ErrorCode(enum.IntEnum):
    """Why a peer sent an ``ERROR`` frame (then closed the connection)."""

    MALFORMED_FRAME = 1
    """A frame whose body does not match the layout of its kind (truncated, bad field)."""
    FRAME_TOO_LARGE = 2
    """The length prefix is above the receiver's maximum frame size."""
    UNKNOWN_KIND = 3
    """The kind byte names no frame kind of this protocol version."""
    UNKNOWN_TRAME = 4
    """The trame code is not registered (only raised where the code must be known)."""
    VALUE_SIZE_MISMATCH = 5
    """The value's length differs from the size of the frame's format, or the format differs from
    the registered one."""
    INVALID_TEXT = 6
    """A text field is not valid UTF-8."""
    TRAILING_DATA = 7
    """Bytes follow the last field of a frame whose layout is complete."""
    BAD_FORMAT = 8
    """The format field is not a struct format the protocol can carry."""
    BAD_HANDSHAKE = 9
    """The first frame is not a HELLO, ERROR or GOODBYE of this protocol (wrong magic, or a kind byte
    not in the protocol): not a trame_async peer."""
    UNSUPPORTED_VERSION = 10
    """The peer speaks a protocol version this side does not."""
    AUTH_FAILED = 11
    """The authentication token is missing or wrong."""
    UNEXPECTED_FRAME = 12
    """A valid frame that is not allowed in this direction or state (e.g. data before HELLO, a
    second HELLO)."""
    HANDSHAKE_TIMEOUT = 13
    """No complete handshake within the server's handshake timeout."""
    FRAME_TIMEOUT = 14
    """A frame was started but not completed within the frame timeout (slow-loris)."""
    TOO_MANY_CLIENTS = 15
    """The server is at its ``max_clients`` limit."""
    SLOW_CONSUMER = 16
    """The client did not read fast enough and went over its outbound budget."""
    SHUTTING_DOWN = 17
    """The server is shutting down and accepts no new connection."""
    INTERNAL_ERROR = 18
    """The peer failed while handling a frame; details are in its own log, never on the wire."""
    BAD_VALUE = 19
    """A well-formed value that the receiver's value type refuses (its constructor raised), or that
    breaks the value rules of its format (a '?' byte other than 0 or 1, a 'p' length byte out of
    range)."""
    TOO_MANY_FORMATS = 20
    """The client used more distinct formats of trame codes the server does not know than the
    server's per-connection limit (each one costs the server a compiled format)."""


class DisconnectReason(enum.IntEnum):
    """Why a connection ended. Reported exactly once per connection, on both ends."""

    GOODBYE = 1
    """The peer said goodbye (clean close requested by the other side)."""
    CLOSED = 2
    """This side closed the connection on purpose (``client.close()``, ``RemoteClient.disconnect()``)."""
    CONNECTION_LOST = 3
    """The transport ended with no goodbye: EOF, reset, or an OS error."""
    HEARTBEAT_TIMEOUT = 4
    """Nothing arrived from the peer within the heartbeat deadline."""
    PROTOCOL_ERROR = 5
    """The peer sent a malformed or unexpected frame (an ``ERROR`` frame was sent first)."""
    SERVER_SHUTDOWN = 6
    """The server is shutting down (a ``GOODBYE`` with a retry-after hint was sent)."""
    SLOW_CONSUMER = 7
    """The client went over its outbound budget, or stayed congested too long."""
    AUTH_FAILED = 8
    """Wrong or missing token."""
    HANDSHAKE_TIMEOUT = 9
    """No handshake completed in time."""
    FRAME_TIMEOUT = 10
    """A frame was started but not completed in time (slow-loris)."""
    TOO_MANY_CLIENTS = 11
    """Refused: the server is at ``max_clients``."""
    ERROR_RECEIVED = 12
    """The peer sent an ``ERROR`` frame (see the accompanying error code)."""

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


class GroupOp(enum.IntEnum):
    """The request a ``REPLY`` frame answers (its ``op`` field)."""

    JOIN = 1
    """A JOIN (or, with request id 0, a join made by the server application)."""
    LEAVE = 2
    """A LEAVE (or, with request id 0, a leave made by the server application)."""
    MULTICAST = 3
    """A GROUP_MULTICAST the server refused (request id 0: a multicast has none)."""
    MEMBERS = 4
    """A MEMBERS request the server refused (an accepted one is answered by MEMBER_LIST)."""


class GroupStatus(enum.IntEnum):
    """The outcome carried by a ``REPLY`` frame (its ``status`` field): OK or why not."""

    OK = 0
    """Done. For a JOIN: the group id is in the reply, its text is the group name."""
    NOT_MEMBER = 1
    """A multicast, leave or members request for a group the client is not in."""
    REFUSED = 2
    """The server application refused the join; the reply's text is its reason."""
    BAD_NAME = 3
    """The group name is empty, too long, invalid UTF-8, has control characters or is only
    whitespace."""
    TOO_MANY_GROUPS = 4
    """The client is already in the server's ``max_groups_per_client`` groups."""
    SERVER_GROUP_LIMIT = 5
    """The server already holds its ``max_groups`` groups."""
    NOT_ALLOWED = 6
    """Presence refused: the group has more than the server's ``max_presence_members``."""


class PresenceEvent(enum.IntEnum):
    """What a ``PRESENCE`` frame reports about a member of a group."""

    JOINED = 1
    """The client joined the group."""
    LEFT = 2
    """The client left the group (by a leave, or by disconnecting: see the frame's reason)."""
