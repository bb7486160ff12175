"""The asyncio client: ``await connect(...)`` / ``async with connect(...)``, send and receive.

The connection is one ``asyncio.Protocol`` (:class:`_ClientProtocol`) driving a sans-I/O
:class:`~trame_async.protocol.ClientCore`: it answers pings as soon as they are parsed, watches the
server's heartbeat, and queues received multicasts. :meth:`Client.receive` is the one-shot receive of
the original design: each call waits for the next message and re-arms; messages arriving between
calls wait in a bounded queue, so none is lost.

Groups (docs/protocol.md, "Groups"): :meth:`Client.join`, :meth:`Client.leave` and
:meth:`Client.members` are requests, each a future of its connection resolved by the server's
REPLY (or MEMBER_LIST) and failed with :class:`~trame_async.ConnectionClosed` when the connection
ends; ``multicast(..., group=name)`` sends to one group. Presence events arrive as
:class:`Presence`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import random
import socket
import ssl as _ssl
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeAlias, cast

from .codec import REGISTRY, Message, Registry, TrameLike
from .codes import DisconnectReason, GroupOp, GroupStatus, PresenceEvent
from .exceptions import (
    _CHECK_ADDRESS,
    AuthenticationError,
    CodecError,
    ConnectError,
    ConnectionClosed,
    FrameTooLargeError,
    GroupRefused,
    InvalidStateError,
    TrameError,
)
from .protocol import _CLOSED, _OPEN, ClientCore, GroupEvent, GroupPresence
from .wire import (
    DEFAULT_MAX_FRAME_SIZE,
    LENGTH_SIZE,
    MAX_GROUP_NAME_LENGTH,
    Kind,
    MemberList,
    PresenceNotice,
    Reply,
    check_group_name,
    group_multicast,
)

#: The environment variable holding the shared secret, for connect() and trame-serve alike.
TOKEN_ENV: Final = "TRAME_TOKEN"

__all__ = [
    "DEFAULT_MAX_QUEUE_BYTES",
    "Backoff",
    "Client",
    "Presence",
    "QueuePolicy",
    "connect",
]

logger = logging.getLogger("trame_async.client")

QueuePolicy = Literal["backpressure", "disconnect", "drop-oldest", "keep-latest"]
_POLICIES: Final = ("backpressure", "disconnect", "drop-oldest", "keep-latest")
_MULTICAST: Final = int(Kind.MULTICAST)
_DATA: Final = int(Kind.DATA)
_CLEAN: Final = frozenset((DisconnectReason.CLOSED, DisconnectReason.GOODBYE))
#: Ends of the connection that end ``async for`` quietly, as a close code 1000/1001 would.
_ITER_END: Final = _CLEAN | {DisconnectReason.SERVER_SHUTDOWN}
#: Default byte budget of the receive queue (frames as received on the wire).
DEFAULT_MAX_QUEUE_BYTES: Final = 16 << 20


#: Reasons after which reconnecting would fail the same way again.
_FATAL: Final = frozenset((DisconnectReason.AUTH_FAILED, DisconnectReason.CLOSED))
#: Kind bytes a trame_async server can start its answer to a HELLO with.
_FIRST_KINDS: Final = frozenset((int(Kind.WELCOME), int(Kind.GOODBYE), int(Kind.ERROR)))
#: Bytes kept of what the server sent before WELCOME: a length prefix and a kind byte.
_HEAD_SIZE: Final = LENGTH_SIZE + 1
#: Bytes of MULTICAST/DATA frames held for the end-of-iteration write past which send() writes
#: at once: a sender that never yields to the loop still meets the transport's flow control.
_EARLY_WRITE: Final = 64 << 10
#: X.509 verify codes of a certificate issued for another name (hostname, email, IP address).
_NAME_MISMATCH: Final = frozenset((62, 63, 64))
#: X.509 verify codes of a certificate outside its validity period (not yet valid, expired).
_OUT_OF_DATE: Final = frozenset((9, 10))
_PASS_CERT: Final = (
    "pass ssl= a context with load_cert_chain(certfile, keyfile) holding a certificate "
    "signed by a CA the server trusts"
)

#: What connect()'s first argument takes: one address (``"host"``, ``"host:port"``,
#: ``"[v6]:port"``, a ``(host, port)`` pair), a comma-separated string of them, or a sequence.
Addresses: TypeAlias = "str | tuple[str, int] | Sequence[str | tuple[str, int]]"


def _parse_address(text: str, default_port: int) -> tuple[str, int]:
    """Return ``(host, port)`` from ``"host"``, ``"host:port"``, ``"[v6]"`` or ``"[v6]:port"``.

    A string with more than one colon and no brackets is a bare IPv6 address (``"::1"``): it
    takes ``default_port``, as ``connect("::1", 8765)`` always did.
    """
    item = text.strip()
    port_text: str | None = None
    if item.startswith("["):
        end = item.find("]")
        rest = item[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: an IPv6 address in brackets is [addr]:port")
        host = item[1:end]
        port_text = rest[1:] if rest else None
    elif item.count(":") == 1:
        host, port_text = item.split(":")
    else:
        host = item
    if not host:
        raise ValueError(f"bad address {text!r}: no host (write host:port, or [IPv6]:port)")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"bad address {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _parse_addresses(host: Addresses, port: int) -> tuple[tuple[str, int], ...]:
    """Return the addresses ``connect(host, port)`` names, in order, without repeats."""
    items: list[Any]
    if isinstance(host, str):
        items = host.split(",")  # no host name or IP literal holds a comma: never ambiguous
    elif isinstance(host, tuple) and len(host) == 2 and isinstance(host[1], int):
        items = [host]  # one (host, port) pair
    elif isinstance(host, Sequence):
        items = list(host)
    else:
        raise TypeError(f"host must be a str or a sequence of addresses, not {type(host).__name__}")
    addresses: dict[tuple[str, int], None] = {}
    for item in items:
        if isinstance(item, str):
            if "," in item and not isinstance(host, str):
                raise ValueError(f"bad address {item!r}: one address per item of the sequence")
            address = _parse_address(item, port)
        elif (
            isinstance(item, tuple | list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
        ):
            address = (item[0], item[1])
        else:
            raise TypeError(
                f"bad address {item!r}: each address is a 'host', 'host:port' or '[IPv6]:port' "
                "string, or a (host, port) pair"
            )
        addresses.setdefault(address)
    if not addresses:
        raise ValueError("connect() needs at least one server address")
    return tuple(addresses)


class _EveryAddressFailed(ConnectError):
    """No address of several answered: :attr:`errors` says why each failed, in the order tried.

    A :class:`~trame_async.ConnectError` (``host`` and ``port`` are the first address tried).
    """

    def __init__(self, errors: list[tuple[tuple[str, int], Exception]]) -> None:
        hints = {err.hint for _, err in errors if isinstance(err, ConnectError)}
        (host, port), _ = errors[0]
        detail = "; ".join(f"{h}:{p}: {_why(err)}" for (h, p), err in errors)
        super().__init__(host, port, detail, hint=hints.pop() if len(hints) == 1 else None)
        self.errors = errors

    def __str__(self) -> str:
        return (
            f"cannot connect to any of the {len(self.errors)} addresses ({self.detail}); "
            f"{self.hint}"
        )


def _show(addresses: Sequence[tuple[str, int]]) -> str:
    """Return addresses as ``host:port`` (``[v6]:port``) strings, comma-separated."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)


def _why(err: Exception) -> str:
    """Return why one address failed, for the message of :class:`_EveryAddressFailed`."""
    return err.detail if isinstance(err, ConnectError) else str(err)


class Presence(NamedTuple):
    """Another member joined or left a group this client joined with ``presence=True``.

    ``reason`` is None for a join and for a leave; for a member that left by disconnecting, the
    :class:`~trame_async.DisconnectReason` the server saw.
    """

    group: str
    client_id: int
    joined: bool
    reason: DisconnectReason | None


#: A group request waiting for its answer: (future, op, group name, presence flag asked).
_Request = tuple["asyncio.Future[Reply | MemberList]", GroupOp, str, bool]


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff for reconnects (seconds).

    Attempt ``n`` waits ``uniform(0, min(maximum, initial * factor**n))``, so a crowd of clients that
    lost the same server spreads its attempts instead of storming back at once. A retry-after hint
    from the server's GOODBYE is waited first. With several addresses, attempt ``n`` is round ``n``
    through them, and a hint holds back only the address of the server that gave it.
    """

    initial: float = 0.5
    factor: float = 1.6
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.factor >= 1 and self.maximum >= self.initial):
            raise ValueError("backoff needs initial > 0, factor >= 1 and maximum >= initial")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Return the wait before attempt number ``attempt`` (0 for the first)."""
        cap = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return (retry_after or 0.0) + random.uniform(0.0, cap)


class _ClientProtocol(asyncio.Protocol):
    """One TCP connection of a :class:`Client`."""

    def __init__(self, client: Client, core: ClientCore) -> None:
        self._client = client
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        # Whether connect() got this connection: only then is losing it a reason to reconnect
        # (the handshake future is also done when it failed, or was cancelled by a timeout).
        self.opened = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        # Whether the core was seen OPEN after a read (the handshake is then over).
        self._was_open = False
        # Bytes received of a frame the parser has not completed yet: they belong to the next
        # delivery, for the receive queue's byte budget.
        self._unqueued = 0
        # The first bytes from the server before WELCOME, and what ended the transport: a
        # refused connect is explained from them (a TLS alert, a TLS record on a plain socket).
        self.head = b""
        self.lost_exc: Exception | None = None
        # Frames sent during this loop iteration, written together by one call_soon: one
        # syscall for a burst of multicasts instead of one per frame.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._refused_seen = 0  # core.refused when last logged
        # Group requests of this connection by request id; failed when it ends.
        self.requests: dict[int, _Request] = {}

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self._write_outgoing()

    def data_received(self, data: bytes) -> None:
        core = self.core
        messages = core.receive_data(data, self.loop.time())
        if core.quiet:
            # The hot path: only whole data frames, all decoded, none held back by the parser
            # (so none of this read's bytes waits for the next delivery).
            if messages:
                client = self._client
                callback = client._on_message
                if callback is None:
                    client._deliver(messages, len(data))
                    return
                # Straight to the application, in order, with no queue and no task switch.
                for message in messages:
                    try:
                        callback(message)
                    except Exception:
                        logger.exception("on_message callback failed on %r", message[:2])
            return
        self._received(data, messages)

    def _received(self, data: bytes, messages: list[Message]) -> None:
        """Do what a read asks beyond handing messages on: answers, events, handshake, close."""
        core = self.core
        was_open = self._was_open
        if not was_open and len(self.head) < _HEAD_SIZE:
            self.head += data[: _HEAD_SIZE - len(self.head)]
        if core.outgoing:
            self._write_outgoing()
        if core.refused != self._refused_seen:
            self._log_refused()
        if core.events:
            events = core.events
            core.events = []
            self._client._group_events(self, events)
        if messages:
            buffered = core.parser.buffered
            self._client._deliver(messages, self._unqueued + len(data) - buffered)
            self._unqueued = buffered
        else:
            self._unqueued = core.parser.buffered
        if core.state is _CLOSED:
            self._end()
        elif not was_open and core.state is _OPEN:
            self._was_open = True
            if not self.handshake.done():
                self.handshake.set_result(None)
                self.opened = True
            self._arm()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending = []
        self._pending_bytes = 0
        core = self.core
        core.connection_lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self._client._closed_error(core, exc)
        if not self.handshake.done():
            self.handshake.set_exception(error)
            self.handshake.exception()  # retrieved: connect() reports it
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(error)
            self._drain.exception()
        if not self.lost.done():
            self.lost.set_result(None)
        self.transport = None
        requests, self.requests = self.requests, {}
        for future, *_ in requests.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a cancelled caller must not log it
        self._client._lost(self, error)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- internals ------------------------------------------------------------------------------

    def _log_refused(self) -> None:
        """Log dropped multicasts whose value was refused: the 1st, 2nd, 4th, 8th... of them."""
        count = self.core.refused
        logged, self._refused_seen = self._refused_seen, count
        if count.bit_length() > logged.bit_length() and self.core.last_refused is not None:
            sender, err = self.core.last_refused
            logger.warning(
                "dropped a multicast from client %d: %s (%d dropped so far on this connection; "
                "register the type on the server too to refuse such values at their sender)",
                sender,
                err,
                count,
            )

    def _write_outgoing(self) -> None:
        core = self.core
        transport = self.transport
        if transport is not None:
            if self._pending:
                self._flush()  # a GOODBYE goes after every frame already sent
            for frame in core.outgoing:
                transport.write(frame)
        core.outgoing.clear()

    def _flush(self) -> None:
        """Write the frames sent since the last flush in one call."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a write past _EARLY_WRITE: the handle has nothing left
            self._flush_handle = None
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_bytes = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _end(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._pending:
                self._flush()
            self.transport.close()

    def _arm(self) -> None:
        when = self.core.next_timer()
        if when is None or when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        core = self.core
        core.handle_timer(self.loop.time())
        if core.outgoing:
            self._write_outgoing()
        if core.closed:
            self._end()
            # A silent peer may never send FIN: do not wait for the transport to flush.
            if self.transport is not None:
                self.transport.abort()
        else:
            self._arm()

    async def drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            await drain

    def send(self, frame: bytes) -> None:
        core = self.core
        if core.state is not _OPEN or self.transport is None:
            raise self._client._closed_error(core, None)
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if self._pending_bytes >= _EARLY_WRITE:
            self._flush()  # may pause writing: the caller's drain() then waits
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)


class Client:
    """A connection to a trame_async server. Get one from :func:`connect`.

    Attributes:
        host, port: The address of the server this client is connected to: one of
            :attr:`addresses`; while a reconnect is under way, the last one that answered.
        addresses: Every server address given to :func:`connect`, in the order they are tried
            (shuffled once at connect() unless ``shuffle=False``).
        dropped: Messages dropped by the receive queue's policy (``drop-oldest``/``keep-latest``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: Registry,
        max_queue: int,
        queue_policy: QueuePolicy,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        """Prepare a client and check its queue settings; :func:`connect` opens it."""
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if max_queue_bytes < max(1, max_frame_size):
            raise ValueError(
                f"max_queue_bytes ({max_queue_bytes}) must be at least max_frame_size "
                f"({max_frame_size}): one frame must fit; raise it or lower max_frame_size"
            )
        if queue_policy not in _POLICIES:
            raise ValueError(f"queue_policy must be one of {', '.join(_POLICIES)}")
        #: Whether connect() was given a token (for the message of an AuthenticationError).
        self._token_given = False
        self.host = host
        self.port = port
        self.addresses: tuple[tuple[str, int], ...] = ((host, port),)
        # Index in addresses of the one connected (or last connected): a reconnect starts after it.
        self._index = 0
        self.registry = registry
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.queue_policy: QueuePolicy = queue_policy
        self.dropped = 0
        self._proto: _ClientProtocol | None = None
        self._queue: collections.deque[Message] = collections.deque()
        # Byte accounting of the queue, per delivery (one data_received): (first, end, bytes),
        # with first/end counted over every message ever delivered. A message popped or dropped
        # from the front costs nothing here; deliveries fully consumed are settled lazily
        # (_settle), and the oldest one partly consumed is prorated (_queued_bytes).
        self._chunks: collections.deque[tuple[int, int, int]] = collections.deque()
        self._delivered = 0
        self._chunk_bytes = 0
        # Tasks waiting for a message, oldest first: one future each, so that cancelling one
        # never touches another's. A delivery wakes one per queued message not yet promised;
        # those woken that have not taken theirs yet are owed the head of the queue, and a
        # caller that did not wait gets only what lies past it.
        # A waiter's result is None when it was woken for the head of the queue, or the message
        # itself when _deliver() handed one over past an empty queue.
        self._waiters: collections.deque[asyncio.Future[Message | None]] = collections.deque()
        # Zero when receive() may just pop the queue (its one test per message): otherwise one
        # per woken waiter owed a message (see _woken), plus one while reading is paused (a pop
        # may resume it).
        self._gate = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_paused = False
        self._error: ConnectionClosed | None = None
        self._closing = False
        #: Times this client reconnected after losing its connection.
        self.reconnects = 0
        self._reconnect: Backoff | None = None
        self._connect_kwargs: dict[str, Any] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._down: ConnectionClosed | None = None
        self._connected = asyncio.Event()
        self._hook_tasks: set[asyncio.Future[Any]] = set()
        self.on_disconnect: Callable[[ConnectionClosed], Any] | None = None
        self.on_reconnect: Callable[[Client], Any] | None = None
        self._on_message: Callable[[Message], Any] | None = None
        # Groups joined by join() (not the server's joins), with their presence flag: rejoined
        # after a reconnect.
        self._rejoin: dict[str, bool] = {}
        self._on_presence: Callable[[Presence], Any] | None = None
        self._presence: collections.deque[Presence] = collections.deque()
        self._presence_waiter: asyncio.Future[None] | None = None
        #: Presence events dropped because next_presence() fell max_queue behind (oldest first).
        self.presence_dropped = 0

    @property
    def on_presence(self) -> Callable[[Presence], Any] | None:
        """Called with each :class:`Presence` event in the I/O callback instead of queueing it
        for :meth:`next_presence` (a plain function; a coroutine function is refused)."""
        return self._on_presence

    @on_presence.setter
    def on_presence(self, callback: Callable[[Presence], Any] | None) -> None:
        _check_callback(callback, "on_presence", "await client.next_presence()")
        self._on_presence = callback

    @property
    def on_message(self) -> Callable[[Message], Any] | None:
        """Called with each message in the I/O callback instead of queueing it (see connect()).

        Settable at any time; a coroutine function (or an object with an ``async __call__``)
        is refused with ``TypeError``.
        """
        return self._on_message

    @on_message.setter
    def on_message(self, callback: Callable[[Message], Any] | None) -> None:
        _check_on_message(callback)
        self._on_message = callback

    def __repr__(self) -> str:
        return f"<Client id={self.id} server={self.host}:{self.port} closed={self.closed}>"

    # --- public ---------------------------------------------------------------------------------

    @property
    def id(self) -> int:
        """Client id assigned by the server (0 before the handshake)."""
        return self._proto.core.client_id if self._proto is not None else 0

    @property
    def rtt(self) -> float | None:
        """Last measured round-trip time to the server in seconds (None before the first)."""
        return self._proto.core.rtt if self._proto is not None else None

    @property
    def missed(self) -> int:
        """Frames the server dropped for this client (its slow-consumer policy), as it told us.

        Counts over the current connection only; a reconnect starts again from 0.
        """
        return self._proto.core.missed if self._proto is not None else 0

    @property
    def refused(self) -> int:
        """Multicasts dropped here because their registered value type refused the value.

        Such a value (its class's constructor or ``__post_init__`` raised) is the sender's
        error; the server relays it unless it registers the type too. Counts over the current
        connection only.
        """
        return self._proto.core.refused if self._proto is not None else 0

    @property
    def queued(self) -> int:
        """Messages waiting for :meth:`receive`."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the messages waiting for :meth:`receive`, as received (what
        ``max_queue_bytes`` bounds)."""
        return self._queued_bytes()

    @property
    def closed(self) -> bool:
        """Whether the connection is over (messages may still wait in the queue)."""
        return self._error is not None

    @property
    def close_reason(self) -> DisconnectReason | None:
        """Why the connection ended, or None while it is open."""
        return self._error.reason if self._error is not None else None

    @property
    def server_settings(self) -> Any:
        """The WELCOME the server sent: heartbeat interval/timeout and max frame size."""
        return self._proto.core.welcome if self._proto is not None else None

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` of the server connected to now, one of :attr:`addresses`.

        While a reconnect is under way, the last one that answered (the one lost, until another
        completes its handshake).
        """
        return self.host, self.port

    @property
    def local_address(self) -> Any:
        """This end's ``(host, port)``."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        return proto.transport.get_extra_info("sockname")

    async def multicast(self, trame: TrameLike, value: Any, group: str | None = None) -> None:
        """Encode ``value`` as ``trame`` and multicast it through the server to every client,
        or with ``group`` to the other members of that group (which this client must be in).

        Waits only when the transport's buffer is full (flow control).

        Raises:
            ConnectionClosed: the connection is closed.
            InvalidStateError: ``group`` is not one of :attr:`groups`; nothing is sent.
            UnknownTrameError, ValueMismatchError: bad trame or value; nothing is sent.
            FrameTooLargeError: the frame exceeds the server's maximum; nothing is sent.
        """
        if group is None:
            await self.send(self.registry.encode(trame, value, _MULTICAST))
            return
        proto = self._open_proto()
        group_id = proto.core.group_ids.get(group)
        if group_id is None:
            raise InvalidStateError(
                f"not a member of group {group!r}: join it first (await client.join(name))"
            )
        frame = group_multicast(group_id, self.registry.encode(trame, value, _MULTICAST))
        await self._send_frame(proto, frame)

    # --- groups ---------------------------------------------------------------------------------

    @property
    def groups(self) -> frozenset[str]:
        """Names of the groups this client is in now (its joins and the server's)."""
        proto = self._proto
        if proto is None or self._down is not None or self._error is not None:
            return frozenset()
        return frozenset(proto.core.group_ids)

    async def join(self, name: str, presence: bool = False) -> int:
        """Join the group ``name``; return its id (the server's, for this group's life).

        With ``presence`` this client also gets a :class:`Presence` event each time another
        member joins or leaves. Joining a group again answers the same id and updates the
        presence flag. Once this returns, every multicast to the group reaches this client, in
        order, after the group's kept last values if the server keeps them. A reconnecting client
        (``connect(reconnect=...)``) joins its groups again, with the same presence flags, before
        it reports itself reconnected; groups the server application joined it to are the
        server's to join again.

        Raises:
            ValueError: ``name`` is not a valid group name (empty, more than 255 bytes of
                UTF-8, a control character, only whitespace); nothing is sent.
            GroupRefused: the server refused (``status`` says why: ``REFUSED`` by its
                application, ``BAD_NAME``, ``TOO_MANY_GROUPS``, ``SERVER_GROUP_LIMIT``,
                ``NOT_ALLOWED`` for presence in a group too large for it).
            ConnectionClosed: the connection ended before the answer.
        """
        raw = _group_name(name)
        proto = self._open_proto()
        answer = await self._request(proto, GroupOp.JOIN, name, presence, raw=raw)
        return answer.group_id

    async def leave(self, name: str) -> None:
        """Leave the group ``name``; once this returns no more of its multicasts arrive.

        While a reconnect is under way this only forgets the group (it is not joined again).

        Raises:
            InvalidStateError: this client is not in the group; nothing is sent.
            GroupRefused: the server refused (``NOT_MEMBER``: it had already left, e.g. by the
                server application).
            ConnectionClosed: the connection ended before the answer.
        """
        self._rejoin.pop(name, None)
        if self._down is not None and self._error is None:
            return  # in no group now, and not to be rejoined
        proto = self._open_proto()
        if name not in proto.core.group_ids:
            raise InvalidStateError(f"not a member of group {name!r}")
        await self._request(proto, GroupOp.LEAVE, name, False)

    async def members(self, name: str) -> list[int]:
        """Return the client ids of the members of ``name`` (ascending, this client included).

        Large groups come in pages of 1024 ids, asked for one after the other: a member that
        joins or leaves meanwhile may or may not be listed.

        Raises:
            InvalidStateError: this client is not in the group; nothing is sent.
            GroupRefused: the server refused (``NOT_MEMBER``).
            ConnectionClosed: the connection ended before the answer.
        """
        ids: list[int] = []
        after = 0
        while True:
            proto = self._open_proto()
            if name not in proto.core.group_ids:
                raise InvalidStateError(f"not a member of group {name!r}")
            page = await self._request(proto, GroupOp.MEMBERS, name, False, after=after)
            assert isinstance(page, MemberList)
            ids.extend(page.ids)
            if not page.more:
                return ids
            after = page.ids[-1]

    async def next_presence(self, timeout: float | None = None) -> Presence:
        """Return the next :class:`Presence` event (when no ``on_presence`` callback is set).

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds.
            ConnectionClosed: the connection is closed and no event is left.
        """
        async with asyncio.timeout(timeout):
            while True:
                if self._presence:
                    return self._presence.popleft()
                if self._error is not None:
                    raise self._error
                waiter = self._presence_waiter
                if waiter is None or waiter.done():
                    waiter = asyncio.get_running_loop().create_future()
                    self._presence_waiter = waiter
                await asyncio.shield(waiter)

    async def _request(
        self,
        proto: _ClientProtocol,
        op: GroupOp,
        name: str,
        presence: bool,
        *,
        raw: bytes = b"",
        after: int = 0,
    ) -> Reply | MemberList:
        """Send one group request on ``proto`` and wait for its answer (raise if refused)."""
        core = proto.core
        if op is GroupOp.JOIN:
            request_id = core.request_join(raw, presence)
        elif op is GroupOp.LEAVE:
            request_id = core.request_leave(core.group_ids[name])
        else:
            request_id = core.request_members(core.group_ids[name], after)
        future: asyncio.Future[Reply | MemberList] = proto.loop.create_future()
        proto.requests[request_id] = (future, op, name, presence)
        proto._write_outgoing()  # after the data frames sent before it: one order
        answer = await future
        if isinstance(answer, Reply) and answer.status != GroupStatus.OK:
            try:
                status: GroupStatus | int = GroupStatus(answer.status)
            except ValueError:
                status = answer.status
            raise GroupRefused(status, answer.text, op=op, group=name)
        return answer

    def _group_events(self, proto: _ClientProtocol, events: list[GroupEvent]) -> None:
        """Resolve the requests answered by ``events``; hand on presence events."""
        for event in events:
            if isinstance(event, GroupPresence):
                self._presence_event(event.group, event.notice)
                continue
            request = proto.requests.pop(event.request_id, None) if event.request_id else None
            if request is None:
                if isinstance(event, Reply):
                    self._unsolicited(event)
                continue
            future, op, name, presence = request
            if isinstance(event, Reply) and event.status == GroupStatus.OK:
                # Recorded here, not in join(): a caller cancelled meanwhile is still a member.
                if op is GroupOp.JOIN:
                    self._rejoin[name] = presence
                elif op is GroupOp.LEAVE:
                    self._rejoin.pop(name, None)
            if not future.done():
                future.set_result(event)

    def _unsolicited(self, reply: Reply) -> None:
        """Handle a REPLY with no request: a join/leave made by the server, a refused multicast."""
        if reply.op == GroupOp.LEAVE and reply.status == GroupStatus.OK:
            self._rejoin.pop(reply.text, None)  # the server's decision: not undone by a rejoin
        elif reply.op == GroupOp.MULTICAST and reply.status != GroupStatus.OK:
            logger.warning(
                "the server refused a multicast to group id %d: status %d (%s)",
                reply.group_id,
                reply.status,
                reply.text,
            )

    def _presence_event(self, group: str, notice: PresenceNotice) -> None:
        joined = notice.event == PresenceEvent.JOINED
        reason: DisconnectReason | None = None
        if notice.reason:
            try:
                reason = DisconnectReason(notice.reason)
            except ValueError:
                reason = DisconnectReason.GOODBYE  # as for a GOODBYE's unknown reason
        event = Presence(group, notice.client_id, joined, reason)
        callback = self._on_presence
        if callback is not None:
            try:
                callback(event)
            except Exception:
                logger.exception("on_presence callback failed on %r", event)
            return
        queue = self._presence
        queue.append(event)
        if len(queue) > self.max_queue:
            queue.popleft()
            self.presence_dropped += 1
        waiter = self._presence_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _rejoin_groups(self) -> None:
        """Join again, on a new connection, the groups join() had joined (same presence flags).

        A group the server now refuses is forgotten, with a warning.
        """
        proto = self._proto
        assert proto is not None
        for name, presence in list(self._rejoin.items()):
            try:
                await self._request(proto, GroupOp.JOIN, name, presence, raw=name.encode())
            except GroupRefused as err:
                self._rejoin.pop(name, None)
                logger.warning("could not join group %r again after reconnecting: %s", name, err)

    async def send_data(self, trame: TrameLike, value: Any) -> None:
        """Send a DATA frame to the server alone (handled by its ``on_data`` hook)."""
        await self.send(self.registry.encode(trame, value, _DATA))

    async def send(self, message: bytes) -> None:
        """Send an already-encoded message (from :func:`trame_async.encode`) as it is.

        The message must be one whole MULTICAST or DATA frame.
        """
        proto = self._open_proto()
        if len(message) < LENGTH_SIZE + 1 or message[4] not in (_MULTICAST, _DATA):
            raise CodecError(
                "send() takes one whole MULTICAST or DATA frame, as trame_async.encode() returns"
            )
        await self._send_frame(proto, message)

    async def _send_frame(self, proto: _ClientProtocol, message: bytes) -> None:
        limit = proto.core.server_max_frame_size
        if len(message) - LENGTH_SIZE > limit:
            raise FrameTooLargeError(len(message) - LENGTH_SIZE, limit)
        proto.send(message)
        await proto.drain()

    async def receive(self, timeout: float | None = None) -> Message:
        """Return the next message (multicast or direct DATA) from the server.

        Messages received before the connection closed are returned first; then
        :class:`~trame_async.ConnectionClosed` is raised with the reason.

        Several tasks may wait on one client (with ``receive()`` or ``async for``, mixed): each
        message goes to one of them, the one that has waited longest, and a caller that finds a
        message queued gets it at once unless a waiting task is owed it. Each wait is its own:
        cancelling one task's ``receive()`` (or its timeout expiring) never ends, wakes or robs
        another's, and a message handed to a task cancelled before it could take it goes to the
        next waiter.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            ConnectionClosed: the connection is closed and no message is left.
        """
        queue = self._queue
        if queue and not self._gate:
            return queue.popleft()  # no task owed a message, reading not paused: the common case
        woken = False  # whether this call was woken for a message (the queue's head is owed it)
        deadline: float | None = None
        while True:
            if queue and (woken or len(queue) > self._woken):
                if not self._read_paused:
                    return queue.popleft()
                return self._pop()
            if self._error is not None:
                raise self._error
            loop = self._loop
            if loop is None:
                # Kept: get_running_loop() per message showed in profiles (a getpid() each call).
                loop = self._loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Message | None] = loop.create_future()
            if woken:  # woken for a message a drop policy removed: keep the turn, in front
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                if timeout is None:
                    handed = await waiter
                else:
                    if deadline is None:
                        deadline = loop.time() + timeout
                    async with asyncio.timeout_at(deadline):
                        handed = await waiter
            except BaseException:
                self._leave(waiter)
                raise
            if handed is not None:
                return handed  # handed over by _deliver(), past the queue
            self._gate -= 1  # no longer owed: it takes the head now, or waits again in front
            woken = True

    def _leave(self, waiter: asyncio.Future[Message | None]) -> None:
        """Forget the wait of a caller that gave up (cancelled, timed out)."""
        if waiter.done() and not waiter.cancelled():
            # Woken for a message, then cancelled before it ran: the next waiter takes it.
            handed = waiter.result()
            if handed is not None:
                self._queue.appendleft(handed)  # back in front, as it came first
            else:
                self._gate -= 1
            self._wake()
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):  # already taken off by _wake()
                self._waiters.remove(waiter)

    @property
    def _woken(self) -> int:
        """Waiters woken for a message that have not taken it yet."""
        return self._gate - self._read_paused

    def _wake(self) -> None:
        """Wake the oldest waiters: one per queued message not yet promised to a woken one."""
        waiters = self._waiters
        spare = len(self._queue) - self._gate + self._read_paused  # not owed to a woken one
        while spare > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is gone already (see _leave)
                waiter.set_result(None)
                self._gate += 1
                spare -= 1

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        """Iterate over messages; stop on a clean close or server shutdown, raise on other ends.

        Waits as :meth:`receive` does, in turn with the other waiting tasks.
        """
        queue = self._queue
        if queue and not self._gate:
            return queue.popleft()  # the common case at high rates, as in receive()
        woken = False
        while True:
            if queue and (woken or len(queue) > self._woken):
                if not self._read_paused:
                    return queue.popleft()
                return self._pop()
            error = self._error
            if error is not None:
                if error.reason in _ITER_END:
                    raise StopAsyncIteration
                raise error
            # Wait here rather than in receive(): no second coroutine per message at low rates.
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Message | None] = loop.create_future()
            if woken:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                self._leave(waiter)
                raise
            if handed is not None:
                return handed  # handed over by _deliver(), past the queue
            self._gate -= 1  # no longer owed: it takes the head now, or waits again in front
            woken = True

    @property
    def connected(self) -> bool:
        """Whether the connection is open now (false while a reconnect is under way)."""
        proto = self._proto
        return proto is not None and proto.core.state is _OPEN and self._down is None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is open (after a reconnect); raise if it ended for good."""
        async with asyncio.timeout(timeout):
            while not self.connected:
                if self._error is not None:
                    raise self._error
                self._connected.clear()
                await self._connected.wait()

    async def close(self, timeout: float = 5.0) -> None:
        """Say goodbye to the server and close the connection (idempotent).

        Returns within ``timeout`` seconds (plus a loop turn) whatever the connection is doing:
        a reconnect under way is cancelled, its socket closed even in the middle of a TCP or TLS
        handshake; a server that does not answer the GOODBYE in time is cut off (reset). No task
        and no socket of this client outlives the call.
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait, not 'await task': a cancel of close() itself must propagate, and the
            # task's own CancelledError must not. The task closes its socket as it ends.
            await asyncio.wait((task,), timeout=timeout)
            if not task.done():
                logger.warning("the reconnect task did not end within %g s of close()", timeout)
        if self._down is not None and self._error is None:
            self._fail(ConnectionClosed(DisconnectReason.CLOSED, "closed while reconnecting"))
        proto = self._proto
        if proto is None:
            return
        core = proto.core
        if not core.closed:
            core.goodbye(DisconnectReason.CLOSED)
            proto._write_outgoing()
            proto._end()
        if proto.transport is None and not proto.lost.done():
            return  # this connection was never made (an attempt that failed): nothing to wait for
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(proto.lost)
        except TimeoutError:
            if proto.transport is not None:
                proto.transport.abort()  # connection_lost follows within a loop turn
                await proto.lost

    async def wait_closed(self) -> None:
        """Wait until the connection is over."""
        if self._proto is not None:
            await asyncio.shield(self._proto.lost)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- internals ------------------------------------------------------------------------------

    def _open_proto(self) -> _ClientProtocol:
        proto = self._proto
        if proto is None or self._error is not None or proto.core.state is not _OPEN:
            if self._error is not None:
                raise self._error
            if self._down is not None:
                raise ConnectionClosed(
                    self._down.reason, "disconnected, reconnecting: not sent (at-most-once)"
                )
            raise InvalidStateError("client is not connected")
        return proto

    def _pop(self) -> Message:
        msg = self._queue.popleft()
        if (
            self._read_paused
            and len(self._queue) <= self.max_queue // 4
            and self._queued_bytes() <= self.max_queue_bytes // 4
        ):
            self._set_reading(True)
        return msg

    def _set_reading(self, reading: bool) -> None:
        proto = self._proto
        if self._read_paused is reading:  # a change: the fast path of receive() is (un)gated
            self._gate += -1 if reading else 1
        self._read_paused = not reading
        if proto is not None and proto.transport is not None:
            if reading:
                proto.transport.resume_reading()
            else:
                proto.transport.pause_reading()
            # The server's pings wait unread meanwhile: its heartbeat clock must not run.
            proto.core.reading_paused(not reading, proto.loop.time())
            proto._arm()

    def _settle(self) -> None:
        """Forget the deliveries whose messages have all left the queue."""
        chunks = self._chunks
        consumed = self._delivered - len(self._queue)
        while chunks and chunks[0][1] <= consumed:
            self._chunk_bytes -= chunks.popleft()[2]

    def _queued_bytes(self) -> int:
        """Return the bytes of the messages in the queue, as received (the oldest delivery
        partly consumed counts pro rata)."""
        self._settle()
        chunks = self._chunks
        if not chunks:
            return 0
        first, end, size = chunks[0]
        consumed = self._delivered - len(self._queue)
        return self._chunk_bytes - size * (consumed - first) // (end - first)

    def _over(self) -> bool:
        # One message always fits, whatever its size on the wire (frame header included): the
        # byte budget bounds a backlog, as the policies' "the newest always stays" does.
        queue = self._queue
        return len(queue) > self.max_queue or (
            len(queue) > 1 and self._queued_bytes() > self.max_queue_bytes
        )

    def _deliver(self, messages: list[Message], size: int) -> None:
        """Queue the messages of one read of ``size`` bytes; apply the policy if over a bound.

        With an ``on_message`` callback, hand them to it instead (data_received does that itself
        on its hot path).
        """
        callback = self._on_message
        if callback is not None:
            # Straight to the application, in order, with no queue and no task switch.
            for message in messages:
                try:
                    callback(message)
                except Exception:
                    logger.exception("on_message callback failed on %r", message[:2])
            return
        queue = self._queue
        waiters = self._waiters
        if waiters and not queue and not self._gate and len(messages) == 1:
            # One message for a task that waits with nothing queued (every message of a paced
            # stream): handed over as its waiter's result, with no trip through the queue.
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():  # a cancelled one is gone already (see _leave)
                    waiter.set_result(messages[0])
                    return
        chunks = self._chunks
        if queue:
            self._settle()
            self._chunk_bytes += size
        else:  # the reader keeps up: nothing to settle one by one
            chunks.clear()
            self._chunk_bytes = size
        first = self._delivered
        queue.extend(messages)
        self._delivered = end = first + len(messages)
        chunks.append((first, end, size))
        # _chunk_bytes only overstates what is queued: the exact check runs only past it.
        if len(queue) > self.max_queue or self._chunk_bytes > self.max_queue_bytes:
            if self._over():
                self._overflow()
        if waiters:
            if self._gate or len(waiters) > 1:
                self._wake()
            else:
                # _wake() inlined for the common case (one consumer waits, no one is owed a
                # message): this runs once per read, and the call showed in the profile.
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    self._gate += 1

    def _drop_oldest(self, max_count: int, max_bytes: int) -> None:
        """Drop messages from the front down to both bounds; the newest one always stays."""
        queue = self._queue
        while len(queue) > 1 and (len(queue) > max_count or self._queued_bytes() > max_bytes):
            queue.popleft()
            self.dropped += 1

    def _keep_latest(self) -> None:
        """Fold the queue into the newest message per stream, in their order of arrival.

        A stream is a (sender, trame code, kind, group). What is kept is a subsequence of what arrived,
        so each sender's order holds and each stream's newest value is its last. Past
        ``max_queue // 2`` streams (or half the byte budget) the oldest kept are dropped too: the
        headroom makes a fold cost O(1) per message received.
        """
        queue = self._queue
        newest: dict[tuple[Any, ...], int] = {}
        for i, msg in enumerate(queue):
            newest[msg[0], msg[1], msg[3], msg[4]] = i
        kept = sorted(newest.values())
        if len(kept) < len(queue):
            # Bytes of the kept messages: each counts the average of the delivery it came in.
            consumed = self._delivered - len(queue)
            chunks = iter(self._chunks)
            first, end, size = next(chunks)
            total = 0
            for i in kept:
                while consumed + i >= end:
                    first, end, size = next(chunks)
                total += size // (end - first)
            self.dropped += len(queue) - len(kept)
            items = list(queue)
            queue.clear()
            queue.extend(items[i] for i in kept)
            self._chunks.clear()
            self._chunks.append((self._delivered - len(kept), self._delivered, total))
            self._chunk_bytes = total
        self._drop_oldest(max(1, self.max_queue // 2), max(1, self.max_queue_bytes // 2))

    def _overflow(self) -> None:
        policy = self.queue_policy
        if policy == "backpressure":
            if not self._read_paused:
                self._set_reading(False)
        elif policy == "drop-oldest":
            self._drop_oldest(self.max_queue, self.max_queue_bytes)
        elif policy == "keep-latest":
            # The reader catches up with the current state instead of the history.
            self._keep_latest()
        else:
            proto = self._proto
            if proto is not None and not proto.core.closed:
                proto.core.goodbye(
                    DisconnectReason.SLOW_CONSUMER,
                    text=f"receive queue above max_queue={self.max_queue} messages "
                    f"or max_queue_bytes={self.max_queue_bytes}",
                )
                proto._write_outgoing()
                proto._end()

    def _closed_error(self, core: ClientCore, exc: Exception | None) -> ConnectionClosed:
        if self._error is not None:
            return self._error
        reason = core.close_reason or DisconnectReason.CONNECTION_LOST
        detail = core.close_detail
        if exc is not None and reason is DisconnectReason.CONNECTION_LOST:
            detail = f"{detail}: {exc}"
        if reason is DisconnectReason.AUTH_FAILED:
            auth = AuthenticationError(
                reason, detail, error_code=core.error_code, retry_after=core.retry_after
            )
            auth.token_given = bool(self._token_given)
            return auth
        return ConnectionClosed(
            reason, detail, error_code=core.error_code, retry_after=core.retry_after
        )

    def _lost(self, proto: _ClientProtocol, error: ConnectionClosed) -> None:
        if proto is not self._proto or self._down is not None:
            return
        if (
            self._reconnect is not None
            and not self._closing
            and proto.opened
            and error.reason not in _FATAL
        ):
            # Stay alive: receive() keeps waiting while a new connection is made.
            self._down = error
            self._connected.set()
            logger.info("connection to %s:%d lost (%s); reconnecting", self.host, self.port, error)
            self._notify(self.on_disconnect, error)
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(error)
            )
            return
        self._fail(error)

    def _fail(self, error: ConnectionClosed) -> None:
        self._error = error
        self._down = None
        self._connected.set()
        if error.reason not in _CLEAN:
            logger.info("connection to %s:%d closed: %s", self.host, self.port, error)
        # Every waiter learns of the end (those owed a message still get it first).
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._gate += 1
        presence_waiter = self._presence_waiter
        if presence_waiter is not None and not presence_waiter.done():
            presence_waiter.set_result(None)

    def _notify(self, hook: Callable[..., Any] | None, arg: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(arg)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_tasks.discard)
        except Exception:
            logger.exception("client hook failed")

    async def _open_first(self, kwargs: dict[str, Any]) -> None:
        """Make the first connection: try each address in order until one answers.

        With one address its error is raised as it is; with several, a failure moves on to the
        next address, and when none answered one :class:`~trame_async.ConnectError` lists them
        all. A refusal that every server would repeat (a refused token) is raised at once.
        """
        addresses = self.addresses
        if len(addresses) == 1:
            await self._connect(*addresses[0], **kwargs)
            return
        errors: list[tuple[tuple[str, int], Exception]] = []
        for index, address in enumerate(addresses):
            try:
                await self._connect(*address, **kwargs)
            except ConnectionClosed as err:
                if err.reason in _FATAL:
                    raise
                errors.append((address, err))
            except ConnectError as err:
                errors.append((address, err))
            else:
                self._index = index
                return
            logger.debug("could not connect to %s:%d: %s", *address, errors[-1][1])
        raise _EveryAddressFailed(errors)

    async def _reconnect_loop(self, lost: ConnectionClosed) -> None:
        """Connect again, going through the addresses from the one after the one lost.

        A round tries every address once, in order, with no wait between them; the backoff's
        full-jitter delay comes before each round. An address whose server asked to retry after
        some time (a shutdown GOODBYE, a refusal at the handshake) is left out of the rounds
        until then; when every address waits so, the round waits for the first of them.
        """
        backoff = self._reconnect
        assert backoff is not None
        loop = asyncio.get_running_loop()
        addresses = self.addresses
        count = len(addresses)
        # Loop time before which each address is not tried: its server's retry-after hint.
        not_before = [0.0] * count

        def wait_for_hint(index: int, err: ConnectionClosed) -> None:
            if err.retry_after is not None and err.retry_after > 0:
                not_before[index] = loop.time() + err.retry_after

        wait_for_hint(self._index, lost)
        order = [(self._index + 1 + i) % count for i in range(count)]  # the lost one comes last
        attempt = 0
        while True:
            hint = min(not_before) - loop.time()
            delay = backoff.delay(attempt, hint if hint > 0 else None)
            # Timers may fire a little early (uvloop's are in milliseconds): an address whose
            # hint ends by the planned start of the round belongs to it.
            start = loop.time() + delay
            await asyncio.sleep(delay)
            attempt += 1
            for index in order:
                if not_before[index] > max(start, loop.time()):
                    continue
                host, port = addresses[index]
                try:
                    await self._connect(host, port, **self._connect_kwargs)
                    await self._rejoin_groups()
                except ConnectionClosed as err:
                    if err.reason in _FATAL:
                        self._fail(err)
                        return
                    logger.debug("reconnecting to %s:%d failed: %s", host, port, err)
                    wait_for_hint(index, err)
                    continue
                except ConnectError as err:
                    logger.debug("reconnecting to %s:%d failed: %s", host, port, err)
                    continue
                self._index = index
                self._down = None
                self.reconnects += 1
                self._connected.set()
                logger.info("reconnected to %s:%d as client %d", self.host, self.port, self.id)
                self._notify(self.on_reconnect, self)
                return

    async def _connect(
        self,
        host: str,
        port: int,
        *,
        local_addr: tuple[str, int] | None,
        ssl: Any,
        server_hostname: str | None,
        token: bytes | None,
        echo: bool,
        timeout: float | None,
        rtt_interval: float | None,
        max_frame_size: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        core = ClientCore(
            loop.time(),
            token=token,
            echo=echo,
            max_frame_size=max_frame_size,
            rtt_interval=rtt_interval,
            registry=self.registry,
        )
        proto = _ClientProtocol(self, core)
        self._proto = proto
        self._error = None
        if self._read_paused:
            self._read_paused = False  # a new transport reads until the queue is full again
            self._gate -= 1
        kwargs: dict[str, Any] = {}
        if ssl is not None:
            kwargs["ssl"] = ssl
            if server_hostname is not None:
                kwargs["server_hostname"] = server_hostname
            if timeout is not None:
                kwargs["ssl_handshake_timeout"] = timeout
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: proto, host, port, local_addr=local_addr, **kwargs
                )
                await proto.handshake
        except TimeoutError as err:
            proto.opened = False  # a WELCOME in the last instant: connect() fails all the same
            await _abort(proto)
            raise ConnectError(host, port, f"no answer within {timeout:g} s (timed out)") from err
        except ConnectionClosed as err:
            refused = self._refusal(host, port, proto, err, tls=ssl is not None)
            if refused is None:
                raise
            raise refused from proto.lost_exc or err
        except OSError as err:
            await _abort(proto)
            if isinstance(err, TrameError):
                raise
            if isinstance(err, _ssl.SSLError):
                detail, hint = _tls_failure(err)
                raise ConnectError(host, port, detail, hint=hint) from err
            raise ConnectError(host, port, err.strerror or str(err)) from err
        except BaseException:
            # Cancelled from outside (the timeout above is a TimeoutError): nobody will ever get
            # this connection, so its socket must not outlive the call. A socket still inside
            # create_connection() is closed by the loop; one past it is ours to close.
            _discard(proto)
            if proto.transport is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await proto.lost  # one loop turn: closed when the CancelledError arrives
            raise
        self.host, self.port = host, port
        with contextlib.suppress(OSError):
            sock = proto.transport.get_extra_info("socket") if proto.transport else None
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _refusal(
        self, host: str, port: int, proto: _ClientProtocol, err: ConnectionClosed, *, tls: bool
    ) -> ConnectError | None:
        """Explain a connection that ended before WELCOME without a word from a trame_async server.

        Returns None when the server did say why (a GOODBYE or an ERROR frame, a bad WELCOME):
        that ``ConnectionClosed`` is the answer.
        """
        if err.reason not in (DisconnectReason.CONNECTION_LOST, DisconnectReason.PROTOCOL_ERROR):
            return None
        exc = proto.lost_exc
        lost = err.reason is DisconnectReason.CONNECTION_LOST
        # An EOF inside TLS says no more than a TCP one: explained below with it.
        if lost and isinstance(exc, _ssl.SSLError) and not isinstance(exc, _ssl.SSLEOFError):
            detail, hint = _tls_failure(exc)
            return ConnectError(host, port, detail, hint=hint)
        head = proto.head
        if not head:
            if not lost:
                return None
            why = "" if exc is None else f" ({getattr(exc, 'strerror', None) or exc})"
            if tls:
                # With TLS 1.3 the server checks the client's certificate after this side's
                # handshake is over; an asyncio server then closes without sending its alert.
                return ConnectError(
                    host,
                    port,
                    f"the server closed the TLS connection before the trame handshake, "
                    f"without a byte or a TLS alert{why}",
                    hint="a server that requires a client certificate does this when none or "
                    f"an untrusted one is sent: {_PASS_CERT}",
                )
            return ConnectError(
                host,
                port,
                f"the server closed the connection before the handshake, without a byte{why}",
                hint="a TLS port does this to a plaintext client: if the server serves TLS, pass "
                f"ssl= an ssl.SSLContext that trusts its certificate; otherwise {_CHECK_ADDRESS}",
            )
        shown = head.hex(" ")
        if not tls and len(head) >= 2 and 0x14 <= head[0] <= 0x17 and head[1] == 3:
            return ConnectError(
                host,
                port,
                f"the server answered with a TLS record (bytes {shown}), not a trame_async frame",
                hint="it serves TLS: pass ssl= an ssl.SSLContext that trusts its certificate",
            )
        if len(head) == _HEAD_SIZE and head[LENGTH_SIZE] not in _FIRST_KINDS:
            return ConnectError(
                host,
                port,
                f"the server's first bytes ({shown}) are not a trame_async frame",
            )
        return None


def _tls_failure(err: _ssl.SSLError) -> tuple[str, str]:
    """Return what failed in a TLS error and what to do about it: (detail, hint)."""
    if isinstance(err, _ssl.SSLCertVerificationError):
        detail = f"the server's certificate failed verification ({err.reason}): "
        detail += err.verify_message
        if err.verify_code in _NAME_MISMATCH:
            hint = (
                "connect to a name the certificate holds, or pass server_hostname= that name "
                "(and check that this is the server you meant)"
            )
        elif err.verify_code in _OUT_OF_DATE:
            hint = "renew the server's certificate, or check this machine's clock"
        else:
            hint = (
                "pass ssl= a context that trusts the CA that signed the server's certificate: "
                "ssl.create_default_context(cafile=...) or load_verify_locations(...)"
            )
        return detail, hint
    reason = err.reason or str(err)
    if "CERTIFICATE_REQUIRED" in reason:
        return (
            f"the server requires a client certificate and refused the TLS connection ({reason})",
            _PASS_CERT,
        )
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return f"the server refused this client's TLS certificate ({reason})", _PASS_CERT
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return (
            f"the server did not answer with TLS ({reason})",
            "if it serves plaintext, connect without ssl=; otherwise check the address and port",
        )
    return f"TLS failed: {err}", (
        "check the ssl= context against the server's TLS settings: protocol versions, ciphers, "
        "and a client certificate if it requires one (load_cert_chain(certfile, keyfile))"
    )


def _check_on_message(callback: Any) -> None:
    """Refuse an ``on_message`` that is not a plain callable (it runs in the I/O callback)."""
    _check_callback(callback, "on_message", "iterate with 'async for message in client'")


def _check_callback(callback: Any, name: str, instead: str) -> None:
    """Refuse a callback that is not a plain callable (it runs in the I/O callback)."""
    if callback is None:
        return
    if (
        not callable(callback)
        or inspect.iscoroutinefunction(callback)
        or inspect.iscoroutinefunction(getattr(callback, "__call__", None))  # noqa: B004
    ):
        raise TypeError(
            f"{name} must be a plain function (it runs inside the I/O callback); "
            f"for asynchronous handling, {instead}"
        )


def _group_name(name: object) -> bytes:
    """Return ``name`` as UTF-8 if it is a valid group name; raise ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a group name is a str, not {type(name).__name__}")
    raw = name.encode("utf-8", "surrogatepass")
    if check_group_name(raw, MAX_GROUP_NAME_LENGTH) is None:
        raise ValueError(
            f"invalid group name {name!r}: 1 to {MAX_GROUP_NAME_LENGTH} bytes of UTF-8 (the "
            f"server may allow fewer), no control characters, not only whitespace"
        )
    return raw


def _discard(proto: _ClientProtocol) -> None:
    """Drop a connection that connect() will not return: reset its socket now.

    ``proto.lost`` is then done at once (no transport was ever made: nothing is open) or within
    one loop turn (the transport reports the loss), so close() never waits on it in vain.
    """
    if proto.transport is not None:
        proto.transport.abort()
    elif not proto.lost.done():
        proto.lost.set_result(None)


async def _abort(proto: _ClientProtocol) -> None:
    _discard(proto)
    await proto.lost


class connect:
    """Open a connection: ``client = await connect(...)`` or ``async with connect(...) as client``.

    Args:
        host: The server's host name or IP address. It may also name several servers (the
            nodes of a cluster): a sequence of addresses, each a ``(host, port)`` pair or a
            ``"host"``, ``"host:port"`` or ``"[IPv6]:port"`` string, or one string of them
            separated by commas (``"h1:8765,h2:8765"``). A string
            with several colons and no brackets is one bare IPv6 address (``"::1"``), as before.
            Repeated addresses count once.
        port: The server's TCP port, for a host given without one.
        shuffle: With several addresses, try them in an order of this client's own, drawn at
            random once (``random.shuffle``): a crowd of clients given the same list spreads
            over the servers, and so do the clients of a server that goes down. False: in the
            order given (the first is the primary).
        local_addr: ``(host_ip, port)`` to bind the local end to, as the original
            ``connect(host_ip, port, server_host, server_port)`` did.
        token: Shared secret the server asks for (str or bytes); never logged.
        echo: Receive this client's own multicasts too.
        ssl: An ``ssl.SSLContext`` (or True) for TLS; ``server_hostname`` overrides the name checked.
        timeout: Seconds allowed for the TCP connect, TLS and trame handshakes together, at
            each address tried.
        max_queue: Messages held for :meth:`Client.receive` before ``queue_policy`` applies.
        max_queue_bytes: Bytes held for :meth:`Client.receive` (frames as received) before
            ``queue_policy`` applies; at least ``max_frame_size``.
        queue_policy: ``"backpressure"`` (stop reading from the socket until the application
            catches up: nothing is lost, the server may then cut this client as a slow consumer),
            ``"drop-oldest"``, ``"keep-latest"`` (newest per sender and trame, for up to
            ``max_queue // 2`` streams, then drop-oldest) or ``"disconnect"`` (GOODBYE with
            ``SLOW_CONSUMER``).
        rtt_interval: Seconds between this client's own RTT probes (None: no probe; the server's
            heartbeat still runs).
        max_frame_size: Largest frame accepted from the server.
        registry: The trame registry to decode with.
        reconnect: Reconnect by itself after losing the connection (not after ``close()`` or an
            authentication failure), with full-jitter exponential backoff; True for the default
            :class:`Backoff`, or a :class:`Backoff`. ``receive()`` keeps waiting meanwhile; sends
            raise :class:`~trame_async.ConnectionClosed` (at-most-once: nothing is buffered).
            With several addresses, each round of attempts goes through all of them, starting
            with the one after the address lost (which comes last), with no wait between two
            addresses; the backoff's full-jitter delay comes before each round. A server's
            retry-after hint (its shutdown GOODBYE) keeps its own address out of the rounds
            until then, never the others. Groups joined with :meth:`Client.join` are joined
            again on the server reached, before ``on_reconnect``.
        on_disconnect: Called with the :class:`~trame_async.ConnectionClosed` error each time the
            connection is lost while reconnecting is on (function or coroutine function).
        on_reconnect: Called with the client after each successful reconnect.
        on_message: A plain function called with each :class:`~trame_async.Message` as soon as
            it is decoded, in order, inside the I/O callback: the lowest latency, with no queue
            and no task switch per message. It must be quick and must not block; an exception
            it raises is logged and the next message still comes. Messages then do not go to
            :meth:`Client.receive`, which only reports the end of the connection. For
            asynchronous handling, use ``async for`` instead.
        on_presence: A plain function called with each :class:`Presence` event (groups joined
            with ``presence=True``) in the I/O callback; without it, events wait for
            :meth:`Client.next_presence` (at most ``max_queue``, the oldest dropped first).

    One ``connect(...)`` object opens one connection, as a coroutine runs once: await it (or
    enter ``async with`` on it) once. Using it again, whether the first use succeeded, failed
    or is still under way, raises :class:`~trame_async.InvalidStateError` and opens nothing; call
    ``connect(...)`` again for another connection. To manage a client got with ``await``, use
    ``async with client:`` on the :class:`Client` itself.

    With several addresses, the first connection tries them one after the other (each within
    ``timeout``) until one completes the handshake: a refused or unreachable address, a failed
    TLS handshake, or a server that turns the connection away (shutting down, full) moves on to
    the next. :attr:`Client.address` tells which one answered.

    Cancelling the ``await`` (or the task running it) closes the socket it opened: it is closed
    by the time the ``CancelledError`` comes out.

    Raises:
        ConnectError: the connection could not be opened (refused, timed out), TLS failed (the
            server's certificate, or the server refused this client's), or the server closed it
            before the handshake without a trame_async answer (as a TLS port does to a plaintext
            client); ``detail`` and ``hint`` say which and what to do. With several addresses,
            raised when none answered: one error that names every address tried and why each
            failed, whose ``errors`` attribute lists ``((host, port), exception)`` in the order
            tried (a ``ConnectError`` or a ``ConnectionClosed`` each).
        AuthenticationError: the server refused the token. With several addresses, raised
            at once: the nodes of one cluster share their token, so the others would refuse it
            too (and the token is not sent to them).
        ConnectionClosed: the server refused the connection for another reason. With several
            addresses, only when that reason is final (``CLOSED``: its application turned this
            client away); otherwise the next address is tried.
        InvalidStateError: this ``connect(...)`` object was awaited (or entered) before.
        TypeError, ValueError: ``host`` names no valid address (an empty list, a bad port).
    """

    def __init__(
        self,
        host: Addresses = "127.0.0.1",
        port: int = 8765,
        *,
        shuffle: bool = True,
        local_addr: tuple[str, int] | None = None,
        token: str | bytes | None = None,
        echo: bool = False,
        ssl: Any = None,
        server_hostname: str | None = None,
        timeout: float | None = 10.0,
        max_queue: int = 10_000,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        queue_policy: QueuePolicy = "backpressure",
        rtt_interval: float | None = 30.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        registry: Registry = REGISTRY,
        reconnect: bool | Backoff = False,
        on_disconnect: Callable[[ConnectionClosed], Any] | None = None,
        on_reconnect: Callable[[Client], Any] | None = None,
        on_message: Callable[[Message], Any] | None = None,
        on_presence: Callable[[Presence], Any] | None = None,
    ) -> None:
        _check_on_message(on_message)  # before any connection is made
        _check_callback(on_presence, "on_presence", "await client.next_presence()")
        if token is None:
            # As trame-serve does: the shared secret from the environment, never a command line.
            token = os.environ.get(TOKEN_ENV) or None
        addresses = list(_parse_addresses(host, port))
        if shuffle:
            random.shuffle(addresses)  # each client its own order: a crowd spreads over them
        self._client = Client(
            *addresses[0],
            registry=registry,
            max_queue=max_queue,
            queue_policy=queue_policy,
            max_queue_bytes=max_queue_bytes,
            max_frame_size=max_frame_size,
        )
        self._client.addresses = tuple(addresses)
        if reconnect:
            self._client._reconnect = reconnect if isinstance(reconnect, Backoff) else Backoff()
        self._client.on_disconnect = on_disconnect
        self._client.on_reconnect = on_reconnect
        self._client.on_message = on_message
        self._client.on_presence = on_presence
        self._client._token_given = bool(token)
        self._kwargs: dict[str, Any] = {
            "local_addr": local_addr,
            "ssl": ssl,
            "server_hostname": server_hostname,
            "token": token.encode("utf-8") if isinstance(token, str) else token,
            "echo": echo,
            "timeout": timeout,
            "rtt_interval": rtt_interval,
            "max_frame_size": max_frame_size,
        }
        self._used = False

    async def _open(self) -> Client:
        if self._used:
            raise InvalidStateError(
                f"this connect() object for {_show(self._client.addresses)} was already "
                "used: it opens one connection, once; call connect(...) again for another "
                "connection, or 'async with client:' to manage the client the first await returned"
            )
        self._used = True
        self._client._connect_kwargs = self._kwargs
        await self._client._open_first(self._kwargs)
        return self._client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()
