"""trame_async: an asyncio server and client that relay typed binary frames (trames).

Every frame is a typed *trame*: a 3-character code, the struct format of its value and the packed
value, built and read by one codec shared by the server and its clients::

    import trame_async

    async with trame_async.connect("127.0.0.1", 8765) as client:
        await client.multicast(trame_async.POS, (1.0, 2.0))
        msg = await client.receive()
        print(msg.sender, msg.trame, msg.value)

See docs/ for the tutorial, the API and the wire protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .codec import (
    BOL,
    BYT,
    FLT,
    INT,
    POS,
    REGISTRY,
    STR,
    Message,
    Position,
    Registry,
    Trame,
    decode,
    encode,
    register,
    registered,
)
from .codes import DisconnectReason, ErrorCode, GroupOp, GroupStatus, PresenceEvent
from .exceptions import (
    AuthenticationError,
    BadFormatError,
    BadValueError,
    CodecError,
    ConnectError,
    ConnectionClosed,
    FrameTooLargeError,
    GroupRefused,
    HandshakeError,
    InvalidStateError,
    InvalidTextError,
    MalformedFrameError,
    ParserFailedError,
    ProtocolError,
    RegistrationError,
    TrailingDataError,
    TrameError,
    TruncatedFrameError,
    UnexpectedFrameError,
    UnknownKindError,
    UnknownTrameError,
    ValueMismatchError,
    ValueSizeMismatchError,
)
from .wire import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION, FrameParser, Kind

if TYPE_CHECKING:
    from .client import DEFAULT_MAX_QUEUE_BYTES, Backoff, Client, Presence, QueuePolicy, connect
    from .cluster.config import ClusterConfig
    from .netutil import get_host_ip
    from .server import RemoteClient, Server, ServerConfig, serve, start_server

# The asyncio parts load on first use, so that the sans-I/O codec can be imported (by a tool, a
# backplane worker, another event loop) without importing asyncio.
_LAZY = {
    "DEFAULT_MAX_QUEUE_BYTES": "client",
    "Backoff": "client",
    "Client": "client",
    "ClusterConfig": "cluster.config",
    "Presence": "client",
    "QueuePolicy": "client",
    "connect": "client",
    "get_host_ip": "netutil",
    "RemoteClient": "server",
    "Server": "server",
    "ServerConfig": "server",
    "serve": "server",
    "start_server": "server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trame_async' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "BOL",
    "BYT",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_QUEUE_BYTES",
    "FLT",
    "INT",
    "POS",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "STR",
    "AuthenticationError",
    "Backoff",
    "BadFormatError",
    "BadValueError",
    "Client",
    "ClusterConfig",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "DisconnectReason",
    "ErrorCode",
    "FrameParser",
    "FrameTooLargeError",
    "GroupOp",
    "GroupRefused",
    "GroupStatus",
    "HandshakeError",
    "InvalidStateError",
    "InvalidTextError",
    "Kind",
    "MalformedFrameError",
    "Message",
    "ParserFailedError",
    "Position",
    "Presence",
    "PresenceEvent",
    "ProtocolError",
    "QueuePolicy",
    "RegistrationError",
    "Registry",
    "RemoteClient",
    "Server",
    "ServerConfig",
    "TrailingDataError",
    "Trame",
    "TrameError",
    "TruncatedFrameError",
    "UnexpectedFrameError",
    "UnknownKindError",
    "UnknownTrameError",
    "ValueMismatchError",
    "ValueSizeMismatchError",
    "__version__",
    "connect",
    "decode",
    "encode",
    "get_host_ip",
    "register",
    "registered",
    "serve",
    "start_server",
]
