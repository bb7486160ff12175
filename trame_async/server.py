"""The asyncio server: one Protocol per client, multicast fan-out, heartbeats, shutdown.

Each accepted connection is a :class:`RemoteClient` (an ``asyncio.Protocol``) driving a sans-I/O
:class:`~trame_async.protocol.ServerCore`. The per-client "heartbeat task" of the original design is a
deadline in one shared :class:`~trame_async.timers.TimerWheel`; the one-shot multicast-receive task
is the Protocol's ``data_received`` callback, re-armed by the loop for every chunk.

Fan-out: a client's MULTICAST becomes one RELAY ``bytes`` object (built once, sender id inside) that
is appended to every recipient's pending list, without a task or an await per recipient. Once per
loop iteration each recipient's pending frames go to its transport in a single write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import random
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from .cluster.config import NODE_ID_BITS, ClusterConfig, parse_urls
from .codec import REGISTRY, Message, Registry, TrameLike
from .codes import DisconnectReason, ErrorCode, GroupOp, GroupStatus, PresenceEvent
from .exceptions import GroupRefused, InvalidStateError, ProtocolError
from .groups import Accept, Group, GroupLimits, GroupTable, Refuse, newest_that_fit
from .outbox import CUT, WRITE, Ledger, Outbox, OutboxLimits
from .protocol import _OPEN, ServerCore, ServerLimits
from .timers import TimerWheel

if TYPE_CHECKING:
    from .cluster.node import ClusterNode
from .wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_PRESENCE,
    GROUP_HEAD,
    HANDSHAKE_MAX_FRAME_SIZE,
    MAX_LENGTH,
    RELAY_OVERHEAD,
    SENDER,
    Join,
    Kind,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    check_group_name,
)

__all__ = ["RemoteClient", "Server", "ServerConfig", "serve", "start_server"]

logger = logging.getLogger("trame_async.server")

#: HELLO length field without the token: kind[1] magic[4] version[1] flags[1] token_len[2].
_HELLO_BASE: Final = 9
#: length u32 | kind u8 | sender u32: the part of a RELAY frame the server writes itself.
_RELAY_HEAD: Final = struct.Struct(">IBI")
_RELAY: Final = int(Kind.RELAY)
_DATA: Final = int(Kind.DATA)
_WELCOME: Final = int(Kind.WELCOME)
_MULTICAST: Final = int(Kind.MULTICAST)
_GROUP_MULTICAST: Final = int(Kind.GROUP_MULTICAST)
_GROUP_RELAY: Final = int(Kind.GROUP_RELAY)
_JOIN: Final = int(Kind.JOIN)
_LEAVE: Final = int(Kind.LEAVE)
_U32: Final = SENDER.unpack_from
_DATA_KINDS: Final = frozenset((int(Kind.MULTICAST), int(Kind.DATA), int(Kind.GROUP_MULTICAST)))
#: Trame codes counted apart by the metrics (the rest is "other": bounded label cardinality).
_MAX_TRAME_CODES: Final = 64

if sys.platform == "linux":
    import fcntl
    import termios

    #: ioctl giving the bytes a TCP socket holds that the peer has not acknowledged (SIOCOUTQ).
    _SIOCOUTQ: int | None = termios.TIOCOUTQ
else:  # pragma: no cover - elsewhere only the transport's buffer is seen
    _SIOCOUTQ = None

SlowConsumerPolicy = Literal["disconnect", "drop-oldest", "keep-latest"]
FlowControl = Literal["off", "pace"]
ConnectHook = Callable[["RemoteClient"], "Awaitable[None] | None"]
DisconnectHook = Callable[["RemoteClient", DisconnectReason], "Awaitable[None] | None"]
DataHook = Callable[["RemoteClient", Message], "Awaitable[None] | None"]
MulticastFilter = Callable[["RemoteClient", Message], bool]
JoinHook = Callable[["RemoteClient", str], Any]


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of a server. Times in seconds, sizes in bytes; None disables a limit.

    The limits here are security limits: see docs/api.md for what each protects against.
    """

    heartbeat_interval: float | None = 20.0
    """Ping each client this often."""
    heartbeat_timeout: float | None = 20.0
    """Declare a client dead when nothing arrives within this long after a ping."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame accepted from a client after its handshake (the length field's value)."""
    handshake_max_frame_size: int = HANDSHAKE_MAX_FRAME_SIZE
    """Largest frame accepted before the handshake completes."""
    handshake_timeout: float | None = 10.0
    """Close a connection that has not completed its HELLO within this long."""
    frame_timeout: float | None = 30.0
    """Close a connection that started a frame and did not finish it within this long."""
    max_clients: int | None = None
    """Refuse clients beyond this many connected ones (counted at their HELLO; an ERROR frame,
    then close). Connections still in their handshake are bounded apart (max_handshaking), so
    that sockets without a token cannot lock out the clients that hold one."""
    max_handshaking: int | None = 1024
    """Refuse connections beyond this many still in their handshake (TLS or HELLO)."""
    max_unknown_formats: int | None = 256
    """Distinct formats of unregistered trames one client may make the server learn, whatever
    their codes (variable-length ``<Ns`` values excluded); beyond, ERROR TOO_MANY_FORMATS."""
    token: str | bytes | None = field(default=None, repr=False)
    """Shared secret every client must present in its HELLO; never logged."""
    max_queue_bytes: int = 4 << 20
    """Outbound budget per client: bytes queued in user space (our queue + transport buffer)."""
    slow_consumer_policy: SlowConsumerPolicy = "disconnect"
    """What to do with a client over its budget: cut it, drop its oldest frames, or keep only the
    latest RELAY frame per (sender, trame code). keep-latest folds a congested client's pending
    RELAYs as they arrive, over the budget or not; DATA replies are never folded."""
    slow_consumer_timeout: float | None = 5.0
    """Cut a congested client that takes less than slow_consumer_min_rate for this long (checked
    every quarter of it, so the cut comes within 1.25 times this)."""
    slow_consumer_min_rate: int = 1024
    """Bytes per second a congested client must take to count as draining."""
    keep_latest_streams: int = 4096
    """keep-latest: most distinct (sender, trame code) streams kept for one congested client."""
    flow_control: FlowControl = "off"
    """"off": one client's congestion never slows anyone else. "pace" (opt-in, disconnect policy
    only): publishers wait while any reader is congested, so the group moves at the pace of its
    slowest reader; a congested reader that takes less than pace_min_rate over a
    max_publisher_pause window is cut."""
    pace_min_rate: int = 16 << 10
    """Pace mode: bytes per second a congested reader must take for publishers to wait for it."""
    max_publisher_pause: float = 0.1
    """Longest pause of the publishers for one congestion (pace mode) or one pass of the
    server-wide budget; at most 1 s."""
    max_total_queue_bytes: int | None = 256 << 20
    """Server-wide budget: bytes pending in all outboxes (taken as at least twice
    max_queue_bytes, so that one client alone never reaches it). Past it publishers are paused;
    if still over after max_publisher_pause, the largest backlogs are shed by the policy."""
    max_groups_per_client: int = 64
    """Groups one client may be in at once (JOIN beyond: REPLY TOO_MANY_GROUPS)."""
    max_groups: int = 100_000
    """Groups the server holds at once (a JOIN creating one more: REPLY SERVER_GROUP_LIMIT)."""
    max_group_name_length: int = 64
    """Longest group name, in bytes of UTF-8 (at most 255)."""
    max_presence_members: int = 10_000
    """Presence (events and member lists) only for groups up to this many members."""
    last_value_groups: tuple[str, ...] = ()
    """fnmatch patterns of the group names that keep last values for late joiners."""
    last_values_max_count: int = 1024
    """Last values kept per group at most (the oldest goes first)."""
    last_values_max_bytes: int = 1 << 20
    """Bytes of last values kept per group at most (the oldest goes first)."""
    last_values_total_max_bytes: int = 256 << 20
    """Bytes of last values kept by all groups together at most: past it, the values that
    changed least recently go first, whatever their group."""
    write_high_water: int = 64 << 10
    """Transport buffer size at which a client counts as congested (pause_writing)."""
    send_buffer_size: int | None = 128 << 10
    """SO_SNDBUF of client sockets, kept modest so that the budget above is the real bound."""
    drain_timeout: float = 5.0
    """On shutdown, how long to wait for queued frames to reach the clients before aborting."""
    retry_after: float | None = 1.0
    """Retry-after hint sent in the shutdown GOODBYE."""

    def __post_init__(self) -> None:
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("heartbeat_timeout", self.heartbeat_timeout)
        _positive("handshake_timeout", self.handshake_timeout)
        _positive("frame_timeout", self.frame_timeout)
        _positive("slow_consumer_timeout", self.slow_consumer_timeout)
        # A MULTICAST is relayed RELAY_OVERHEAD bytes larger: its length must still fit the u32.
        if not 64 <= self.max_frame_size <= MAX_LENGTH - RELAY_OVERHEAD:
            raise ValueError(
                f"max_frame_size must be between 64 and {MAX_LENGTH - RELAY_OVERHEAD} bytes "
                f"(a relayed frame is {RELAY_OVERHEAD} bytes larger), not {self.max_frame_size}"
            )
        if not 64 <= self.handshake_max_frame_size <= self.max_frame_size:
            raise ValueError("handshake_max_frame_size must be between 64 and max_frame_size")
        if self.max_clients is not None and self.max_clients < 1:
            raise ValueError("max_clients must be at least 1 (or None for no limit)")
        if self.max_queue_bytes < self.max_frame_size:
            raise ValueError(
                f"max_queue_bytes ({self.max_queue_bytes}) must be at least max_frame_size "
                f"({self.max_frame_size}) so that one frame always fits"
            )
        if self.slow_consumer_policy not in ("disconnect", "drop-oldest", "keep-latest"):
            raise ValueError(
                f"slow_consumer_policy must be 'disconnect', 'drop-oldest' or 'keep-latest', "
                f"not {self.slow_consumer_policy!r}"
            )
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        for name in (
            "max_groups_per_client",
            "max_groups",
            "max_presence_members",
            "last_values_max_count",
            "last_values_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.last_values_total_max_bytes < self.last_values_max_bytes:
            raise ValueError(
                f"last_values_total_max_bytes ({self.last_values_total_max_bytes}) must be at "
                f"least last_values_max_bytes ({self.last_values_max_bytes}): it bounds all "
                f"groups together"
            )
        if not 1 <= self.max_group_name_length <= 255:
            raise ValueError("max_group_name_length must be between 1 and 255 bytes")
        if isinstance(self.last_value_groups, str):  # type: ignore[unreachable]
            raise ValueError("last_value_groups is a tuple of patterns, not one string")
        if self.max_unknown_formats is not None and self.max_unknown_formats < 1:
            raise ValueError("max_unknown_formats must be at least 1 (or None for no limit)")
        if self.max_handshaking is not None and self.max_handshaking < 1:
            raise ValueError("max_handshaking must be at least 1 (or None for no limit)")
        if self.slow_consumer_min_rate < 0 or self.pace_min_rate < 0:
            raise ValueError("slow_consumer_min_rate and pace_min_rate must be >= 0 bytes/s")
        if self.keep_latest_streams < 1:
            raise ValueError("keep_latest_streams must be at least 1")
        if self.flow_control not in ("off", "pace"):
            raise ValueError(f"flow_control must be 'off' or 'pace', not {self.flow_control!r}")
        if self.flow_control == "pace" and self.slow_consumer_policy != "disconnect":
            raise ValueError(
                "flow_control='pace' needs slow_consumer_policy='disconnect': the drop policies "
                "exist to let a reader fall behind without slowing anyone"
            )
        if not 0 < self.max_publisher_pause <= 1.0:
            raise ValueError(
                f"max_publisher_pause must be more than 0 and at most 1 s, not "
                f"{self.max_publisher_pause}: it bounds how long one client can stall the others"
            )
        if self.max_total_queue_bytes is not None and self.max_total_queue_bytes < 1:
            raise ValueError("max_total_queue_bytes must be at least 1 (or None for no limit)")
        token = self.token.encode("utf-8") if isinstance(self.token, str) else self.token
        if token is not None:
            hello = _HELLO_BASE + len(token)
            if len(token) > 0xFFFF or hello > self.handshake_max_frame_size:
                raise ValueError(
                    f"a token of {len(token)} bytes makes a HELLO of {hello} bytes, more than "
                    f"handshake_max_frame_size={self.handshake_max_frame_size} (option "
                    f"--handshake-max-frame-size) allows: no client could ever connect. Use a "
                    f"shorter token (--token, TRAME_TOKEN) or raise that limit"
                )

    def group_limits(self) -> GroupLimits:
        """Return the settings of the server's group table."""
        return GroupLimits(
            max_groups_per_client=self.max_groups_per_client,
            max_groups=self.max_groups,
            max_group_name_length=self.max_group_name_length,
            max_presence_members=self.max_presence_members,
            last_value_groups=tuple(self.last_value_groups),
            last_values_max_count=self.last_values_max_count,
            last_values_max_bytes=self.last_values_max_bytes,
            last_values_total_max_bytes=self.last_values_total_max_bytes,
        )

    def outbox_limits(self) -> OutboxLimits:
        """Return the settings of every client's outbox."""
        if self.flow_control == "pace":
            # Publishers wait for a congested reader one window at a time, while it drains at
            # pace_min_rate; the baseline is taken at once since the window is short.
            window = self.max_publisher_pause
            return OutboxLimits(
                policy=self.slow_consumer_policy,
                max_bytes=self.max_queue_bytes,
                write_high_water=self.write_high_water,
                stall_timeout=window,
                min_rate=self.pace_min_rate,
                max_streams=self.keep_latest_streams,
                check_interval=window,
                probe_at_pause=True,
            )
        timeout = self.slow_consumer_timeout
        return OutboxLimits(
            policy=self.slow_consumer_policy,
            max_bytes=self.max_queue_bytes,
            write_high_water=self.write_high_water,
            stall_timeout=timeout,
            min_rate=self.slow_consumer_min_rate,
            max_streams=self.keep_latest_streams,
            check_interval=timeout / 4 if timeout is not None else 1.0,
        )

    def limits(self) -> ServerLimits:
        """Return the per-connection limits for the sans-I/O core."""
        token = self.token.encode("utf-8") if isinstance(self.token, str) else self.token
        return ServerLimits(
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            max_frame_size=self.max_frame_size,
            handshake_max_frame_size=self.handshake_max_frame_size,
            handshake_timeout=self.handshake_timeout,
            frame_timeout=self.frame_timeout,
            token=token,
            max_unknown_formats=self.max_unknown_formats,
        )


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, or None to disable it")


class RemoteClient(asyncio.Protocol):
    """One client connection as the server sees it.

    Attributes:
        id: Client id assigned by the server (1, 2, ...; 0 is the server itself). Ids of live
            connections are unique; after 2**32 - 1 connections they wrap, skipping live ones.
        address: The peer's ``(host, port, ...)`` as the socket reports it.
        connected_since: Wall-clock time (``time.time()``) of the accept.
        outbox: What waits to be written to this client, its budget and policy
            (:class:`~trame_async.outbox.Outbox`).
    """

    __slots__ = (
        "_close_timer",
        "_core",
        "_dirty",
        "_groups",
        "_held",
        "_held_at",
        "_hook_task",
        "_in_handshake",
        "_paused_by",
        "_publisher",
        "_server",
        "_transport",
        "_was_open",
        "address",
        "bytes_in",
        "connected_since",
        "frames_in",
        "id",
        "outbox",
    )

    def __init__(self, server: Server, client_id: int) -> None:
        self._server = server
        self.id = client_id
        self.address: Any = None
        self.connected_since = time.time()
        #: MULTICAST/DATA/group frames and bytes received from this client (counted per read).
        self.frames_in = 0
        self.bytes_in = 0
        self._transport: asyncio.Transport | None = None
        # Built at the accept (before any TLS handshake): handshake_timeout counts from here.
        self._core = ServerCore(client_id, server._limits, server._loop.time(), server.registry)
        self.outbox = Outbox(server._outbox_limits, server._ledger)
        self._dirty = False
        # The groups this client is in, by id.
        self._groups: dict[int, Group[RemoteClient]] = {}
        self._was_open = False
        self._in_handshake = False
        self._publisher = False
        self._close_timer: asyncio.TimerHandle | None = None
        # Frames received but not yet dispatched because a hook of this client is running: hooks
        # run one at a time per client, in order, and its reading waits meanwhile.
        self._held: list[memoryview] | None = None
        self._held_at = 0
        self._hook_task: asyncio.Task[bool] | None = None
        # Why reading from this client is paused (_BY_HOOK | _BY_FLOW); 0 when it is not.
        self._paused_by = 0

    def __repr__(self) -> str:
        return (
            f"<RemoteClient id={self.id} address={self.address!r} state={self._core.state.value}>"
        )

    # --- public ---------------------------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Last measured round-trip time in seconds (None before the first pong)."""
        return self._core.rtt

    @property
    def echo(self) -> bool:
        """Whether this client receives its own multicasts."""
        return self._core.echo

    @property
    def is_open(self) -> bool:
        """Whether the handshake is done and the connection not closed."""
        return self._core.state is _OPEN

    @property
    def dropped(self) -> int:
        """Frames dropped for this client by the slow-consumer policy."""
        return self.outbox.dropped

    @property
    def groups(self) -> frozenset[str]:
        """The names of the groups this client is in."""
        return frozenset(g.name for g in self._groups.values())

    @property
    def queued_bytes(self) -> int:
        """Bytes queued for this client in user space (pending frames + transport buffer)."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self.outbox.size + buffered

    def send(self, trame: TrameLike, value: Any) -> None:
        """Send a DATA frame to this client alone (it arrives with sender 0, kind DATA)."""
        if not self.is_open:
            raise InvalidStateError(f"client {self.id} is not connected")
        self._queue(self._server.registry.encode(trame, value, Kind.DATA))

    def disconnect(self, text: str = "") -> None:
        """Say goodbye to this client (after its queued frames) and close the connection."""
        self._close(DisconnectReason.CLOSED, text=text)

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self.address = transport.get_extra_info("peername")
        server = self._server
        config = server.config
        sock = transport.get_extra_info("socket")
        if sock is not None and config.send_buffer_size is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer_size)
        self._transport.set_write_buffer_limits(high=config.write_high_water)
        server._accepted(self)

    def data_received(self, data: bytes) -> None:
        core = self._core
        try:
            was_open = core.state is _OPEN
            server = self._server
            frames = core.receive_data(data, server._loop.time())
            self.bytes_in += len(data)
            if frames:
                server.frames_in += len(frames)
                self.frames_in += len(frames)
                if server.track_trames:
                    server._count_trames(frames)
            opened = not was_open and core.state is _OPEN
            if opened and not server._admit(self):
                frames = []  # refused at max_clients: the ERROR replaced the WELCOME
            if core.outgoing:
                self._write_control()
            if opened and core.state is _OPEN:
                # on_connect runs before anything that came with the HELLO is dispatched: a
                # client it refuses gets nothing relayed, and an async one holds the rest.
                server._opened(self, frames)
            elif self._held is not None:
                self._held.extend(frames)  # a hook runs: these wait behind it, in order
            elif frames:
                server._dispatch(self, frames)
            if core.state is not _OPEN:
                if core.closed:
                    self._finish()
                elif core.parser.in_frame:
                    self._server._reschedule(self)
            elif core.parser.in_frame:
                self._server._reschedule(self)
        except Exception as err:
            self._failed(err)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.outbox.congested:
            self.outbox.resume()
            self._server._congested(self, False)
        self._held = None
        reason = self._core.connection_lost()
        self._server._lost(self, reason, exc)
        self._transport = None
        self.outbox.clear()

    def pause_writing(self) -> None:
        server = self._server
        transport = self._transport
        undelivered = None
        if self.outbox.limits.probe_at_pause and transport is not None:
            # With the short windows of the pace mode the baseline is taken at once; otherwise at
            # the first check, so that a fan-out burst that pauses many clients costs no syscall.
            undelivered = _undelivered(transport)
        self.outbox.pause(server._loop.time(), undelivered)
        # The transport's buffer went past the high-water mark: the one place it grows to a new
        # peak (writes only move bytes here from the outbox; see peak_queued_bytes).
        self._note_peak()
        server._congested(self, True)

    def resume_writing(self) -> None:
        outbox = self.outbox
        outbox.resume()
        self._server._congested(self, False)
        if outbox.size:
            if outbox.limits.policy == "disconnect":
                self._flush()
            else:
                self._write_slices()

    # --- internals ------------------------------------------------------------------------------

    def _failed(self, err: Exception) -> None:
        core = self._core
        if isinstance(err, ProtocolError):
            # Found while dispatching (a value the server's registered class refuses, decoded
            # for a hook): the peer's fault, handled as any protocol error, without a traceback.
            core.fail(err)
        else:
            # A bug of ours: this connection alone ends, with an ERROR that says nothing of the
            # internals; the log has the traceback.
            logger.error("internal error on data from client %d: closing it", self.id, exc_info=err)
            core.refuse(ErrorCode.INTERNAL_ERROR, DisconnectReason.PROTOCOL_ERROR, "internal error")
        self._write_control()
        self._finish()

    def _queue(self, frame: bytes) -> None:
        if self.outbox.push(frame):
            self._server._overflow(self)
        if not self._dirty and self.outbox.size:
            self._dirty = True
            self._server._mark_dirty(self)

    def _flush(self) -> None:
        """Write what is pending in one call (unless the transport is congested)."""
        self._dirty = False
        outbox = self.outbox
        transport = self._transport
        if not outbox.size or transport is None:
            return
        if outbox.congested:
            # What was queued since the last look may be a new peak.
            self._note_peak()
            return
        # One join and one syscall beat one syscall per frame by far (docs/performance.md).
        transport.write(outbox.take())  # may call pause_writing
        outbox.wrote(transport.get_write_buffer_size())

    def _write_slices(self) -> None:
        """Write the oldest pending frames, about ``write_high_water`` bytes a time, until the
        transport pauses: what it does not take stays in the outbox, where the policy can act."""
        outbox = self.outbox
        transport = self._transport
        cap = outbox.limits.write_high_water
        for _ in range(len(outbox) + 1):  # every round writes at least one frame
            if not outbox.size or transport is None or outbox.congested:
                break
            transport.write(outbox.take(cap))
        if transport is not None:
            outbox.wrote(transport.get_write_buffer_size())

    def _note_peak(self) -> None:
        """Raise ``peak_queued_bytes`` to this client's queue if it is larger."""
        queued = self.queued_bytes
        server = self._server
        if queued > server.peak_queued_bytes:
            server.peak_queued_bytes = queued

    def _write_control(self) -> None:
        core = self._core
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if core.closed:
                if core.close_reason in _ABORT_REASONS:
                    core.outgoing.clear()  # the peer is not reading: it would never get there
                    return
                # ERROR/GOODBYE go after every frame already queued for this client.
                if self.outbox.size:
                    transport.write(self.outbox.take())
            for frame in core.outgoing:
                transport.write(frame)
        core.outgoing.clear()

    def _on_timer(self, now: float) -> None:
        core = self._core
        outbox = self.outbox
        transport = self._transport
        if now >= outbox.next_check and transport is not None:
            # A congested client must keep taking its backlog at the minimum rate.
            if outbox.check(now, _undelivered(transport)):
                self._server._cut(self, outbox.cut_detail)
                return
        core.handle_timer(now)
        if core.outgoing:
            self._write_control()
        if core.closed:
            self._finish()
        else:
            self._server._reschedule(self)

    def _set_paused(self, why: int, paused: bool) -> None:
        """Pause or resume reading from this client for one reason (_BY_HOOK, _BY_FLOW)."""
        was = self._paused_by
        now_by = was | why if paused else was & ~why
        self._paused_by = now_by
        transport = self._transport
        if bool(was) == bool(now_by) or transport is None or transport.is_closing():
            return
        if now_by:
            transport.pause_reading()
        else:
            transport.resume_reading()
        self._core.reading_paused(bool(now_by), self._server._loop.time())

    def _run_hook(
        self, name: str, awaitable: Awaitable[Any], held: list[memoryview], at: int
    ) -> None:
        """Run an async hook of this client; ``held[at:]``, and what it sends meanwhile, wait
        (its reading paused)."""
        server = self._server
        task = server._loop.create_task(_guard(name, awaitable))
        server._tasks.add(task)
        self._hook_task = task
        self._held = held
        self._held_at = at
        self._set_paused(_BY_HOOK, True)
        task.add_done_callback(functools.partial(self._hook_done, name))

    def _hook_done(self, name: str, task: asyncio.Task[bool]) -> None:
        self._server._tasks.discard(task)
        self._hook_task = None
        held, at = self._held, self._held_at
        self._held = None
        if self._core.state is not _OPEN:
            return  # refused or gone meanwhile: nothing of it is dispatched
        if name == "on_connect" and (task.cancelled() or not task.result()):
            # An on_connect that raised refuses the client, as a plain one does.
            self.disconnect("refused by the server")
            return
        try:
            if held is not None and at < len(held):
                self._server._dispatch(self, held, at)
        except Exception as err:
            self._failed(err)
            return
        if self._held is None:  # no other async hook started on the way
            self._set_paused(_BY_HOOK, False)

    def _close(
        self, reason: DisconnectReason, *, retry_after: float | None = None, text: str = ""
    ) -> None:
        core = self._core
        if core.closed:
            return
        core.goodbye(reason, retry_after=retry_after, text=text)
        self._write_control()
        self._finish()

    def _finish(self) -> None:
        """The core is closed: close the transport, at once if the peer cannot or will not read."""
        self._server._closing(self)
        self._held = None
        transport = self._transport
        if transport is None or self._close_timer is not None:
            return
        server = self._server
        if self._core.close_reason in _ABORT_REASONS or (server._pace and self.outbox.congested):
            # Pace mode: a congested client holds the publishers until it is gone, and a closing
            # one is no longer checked for progress: it goes at once.
            transport.abort()
            return
        if not transport.is_closing():
            transport.close()
        # close() waits for the buffer to flush, forever if the peer never reads.
        self._close_timer = server._loop.call_later(server._drain_timeout, transport.abort)


_BY_HOOK: Final = 1
_BY_FLOW: Final = 2


def _undelivered(transport: asyncio.Transport) -> int:
    """Return the bytes written to ``transport`` that the peer has not taken yet.

    That is the transport's buffer plus, on Linux, what the kernel holds unsent or unacknowledged
    (SIOCOUTQ): the sum goes down when the peer's TCP stack acknowledges data, which it can only
    keep doing while the peer's application reads, however big the socket buffers are. Elsewhere
    only the transport's buffer is seen; it goes down when the kernel takes more of it.
    """
    size = transport.get_write_buffer_size()
    if _SIOCOUTQ is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
                size += int.from_bytes(raw, sys.byteorder, signed=True)
    return size


_INF: Final = float("inf")
#: The text of a REPLY for each status, when nothing more precise is said.
_STATUS_TEXT: Final = {
    GroupStatus.OK: "ok",
    GroupStatus.NOT_MEMBER: "not a member of this group",
    GroupStatus.REFUSED: "refused by the server",
    GroupStatus.BAD_NAME: "not a valid group name",
    GroupStatus.TOO_MANY_GROUPS: "in too many groups: leave one first",
    GroupStatus.SERVER_GROUP_LIMIT: "the server holds too many groups",
    GroupStatus.NOT_ALLOWED: "presence is not available for a group this large",
}
#: How long a shutdown waits, past its drain deadline, for aborted connections and cancelled hooks.
_GRACE: Final = 1.0

#: Reasons after which the peer is not reading: nothing queued for it would ever get through.
_ABORT_REASONS: Final = frozenset(
    (DisconnectReason.SLOW_CONSUMER, DisconnectReason.HEARTBEAT_TIMEOUT)
)


class Server:
    """A running trame_async server. Get one from :func:`start_server` or :func:`serve`.

    ``close()`` and ``wait_closed()`` behave as in asyncio, with a graceful twist: closing stops
    accepting, flushes what is queued for each client, sends it a GOODBYE with a retry-after hint,
    and aborts only the clients that have not drained within ``drain_timeout``.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: Registry = REGISTRY,
        on_connect: ConnectHook | None = None,
        on_disconnect: DisconnectHook | None = None,
        on_data: DataHook | None = None,
        on_multicast: MulticastFilter | None = None,
        on_join: JoinHook | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        """Prepare a server; :meth:`start` binds it. Prefer :func:`start_server`."""
        self.config = config
        self.registry = registry
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_data = on_data
        self.on_multicast = on_multicast
        self.on_join = on_join
        self._limits = config.limits()
        self._groups: GroupTable[RemoteClient] = GroupTable(config.group_limits())
        self._outbox_limits = config.outbox_limits()
        self._ledger = Ledger()
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._next_id = 0
        # Client ids are _id_base | n for n in 1.._id_span (in a cluster the node's index sits in
        # the high bits, so that an id names one client cluster-wide).
        self._id_base = 0
        self._id_span = 0xFFFF_FFFF
        self._cluster_config = cluster
        #: This server's node in a cluster (``cluster=``), once started; None otherwise.
        self.cluster: ClusterNode | None = None
        # Every connection (handshaking, open or closing) by id, the open ones, and how many are
        # still in their handshake (max_handshaking bounds those apart from max_clients).
        self._all: dict[int, RemoteClient] = {}
        self._open: dict[int, RemoteClient] = {}
        self._handshaking = 0
        self._dirty: list[RemoteClient] = []
        self._flush_handle: asyncio.Handle | None = None
        self._wheel: TimerWheel[RemoteClient] = TimerWheel(_resolution(config))
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_at = float("inf")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publishers: set[RemoteClient] = set()
        self._n_congested = 0
        # Publishers wait for congested readers only in the opt-in pace mode; by default one
        # client's congestion is its policy's business alone.
        self._pace = config.flow_control == "pace"
        self._publishers_paused = False
        # Server-wide budget: when the outboxes together pass it, publishers are paused, for at
        # most max_publisher_pause; then the largest outboxes are shed (_check_total).
        total = config.max_total_queue_bytes
        self._total_limit = (1 << 62) if total is None else max(total, 2 * config.max_queue_bytes)
        self._total_low = self._total_limit // 2
        self._over_total = False
        self._total_handle: asyncio.TimerHandle | None = None
        #: Clients that completed their handshake since the start.
        self.connects = 0
        #: Frames and bytes received per trame code, while :attr:`track_trames` (the metrics
        #: endpoint turns it on): at most 64 codes, the rest under "other".
        self.trames_in: dict[str, list[int]] = {}
        self.track_trames = False
        #: Times the server-wide budget was passed (publishers paused) since the start.
        self.budget_pauses = 0
        #: Clients shed (cut, or emptied under the drop policies) for the server-wide budget.
        self.budget_sheds = 0
        #: Last values not sent to a late joiner because all of them would not fit in half its
        #: outbound budget (the oldest ones are left out; counted, and logged now and then).
        self.last_values_skipped = 0
        self._skip_events = 0
        self._batch_relays = config.slow_consumer_policy == "disconnect"
        # How long a closing client may take to drain (the shutdown's override, once it runs).
        self._drain_timeout = config.drain_timeout
        #: Clients cut as slow consumers since the start.
        self.slow_consumers = 0
        #: MULTICAST and DATA frames received from clients since the start.
        self.frames_in = 0
        #: RELAY frames queued for clients (one per frame per recipient) since the start.
        self.deliveries = 0
        #: Bytes of RELAY frames queued for clients since the start.
        self.bytes_relayed = 0
        #: Most bytes queued for one client (pending frames + transport buffer), taken whenever a
        #: queue passes its limit (before the policy acts) and while a client is congested: when
        #: its transport's buffer passes the high-water mark (a write never grows the sum
        #: otherwise: it moves pending bytes to the buffer) and once per loop iteration that
        #: queues more for it. A queue below its limit is below the budget, so every excursion
        #: past the budget is seen; an uncongested client holds at most about two
        #: write_high_water, which is not tracked (that would cost a look per write).
        self.peak_queued_bytes = 0
        #: Connections that ended, by reason, since the start (handshake failures included).
        self.disconnects: collections.Counter[DisconnectReason] = collections.Counter()
        self._closing_flag = False
        self._closed = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._gone: asyncio.Event = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(
        self,
        host: str | Sequence[str] | None,
        port: int,
        *,
        ssl: Any = None,
        reuse_port: bool | None = None,
        backlog: int = 1024,
        ssl_handshake_timeout: float | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise InvalidStateError("server already started")
        if self._cluster_config is not None and self.cluster is None:
            from .cluster.node import ClusterNode

            node = ClusterNode(self, self._cluster_config)
            await node.start()
            self.cluster = node
            self._id_base = node.index << NODE_ID_BITS
            self._id_span = (1 << NODE_ID_BITS) - 1
            # A node restarted with its index should not hand out, at once, the ids its previous
            # life's clients still have in the other nodes' tables: start anywhere in the range.
            self._next_id = random.randrange(self._id_span)
        kwargs: dict[str, Any] = {}
        if ssl is not None:
            kwargs["ssl"] = ssl
            # One deadline for TLS and HELLO together: both loops build the protocol (and with it
            # the core's clock, see RemoteClient.__init__) at the accept, before the TLS handshake,
            # so the HELLO deadline counts from the accept too; this bounds the TLS stage alone.
            kwargs["ssl_handshake_timeout"] = (
                ssl_handshake_timeout or self.config.handshake_timeout or 60.0
            )
        if sock is not None:
            self._server = await self._loop.create_server(
                self._make_protocol, sock=sock, backlog=backlog, **kwargs
            )
        else:
            self._server = await self._loop.create_server(
                self._make_protocol,
                host,
                port,
                reuse_port=reuse_port,
                backlog=backlog,
                **kwargs,
            )
        for s in self.sockets:
            logger.info("listening on %s", _format_address(s.getsockname()))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        if self._server is None:
            return ()
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        for s in self.sockets:
            port: int = s.getsockname()[1]
            return port
        raise InvalidStateError("server is not listening")

    @property
    def clients(self) -> list[RemoteClient]:
        """The connected clients (handshake done), in connection order."""
        return list(self._open.values())

    @property
    def dropped_frames(self) -> int:
        """Frames dropped by the drop-oldest/keep-latest policies since the start."""
        return self._ledger.dropped

    def stats(self) -> dict[str, Any]:
        """Return the server's counters and gauges as a JSON-ready dict.

        Counters only ever grow (since the start); gauges are read now. Keeping them costs a few
        additions per received chunk, nothing per recipient.
        """
        return {
            "clients": len(self._open),
            "connections": len(self._all),
            "handshaking": self._handshaking,
            "frames_in": self.frames_in,
            "deliveries": self.deliveries,
            "bytes_relayed": self.bytes_relayed,
            "slow_consumers": self.slow_consumers,
            "dropped_frames": self._ledger.dropped,
            "peak_queued_bytes": self.peak_queued_bytes,
            "congested_clients": self._n_congested,
            "pending_bytes": self._ledger.pending,
            "queued_bytes": sum(c.queued_bytes for c in self._all.values()),
            "publishers_paused": self._publishers_paused,
            "budget_pauses": self.budget_pauses,
            "budget_sheds": self.budget_sheds,
            "groups": len(self._groups),
            "memberships": sum(len(c._groups) for c in self._open.values()),
            "last_values_dropped": self._groups.last_values_dropped,
            "last_values_bytes": self._groups.last_bytes,
            "last_values_skipped": self.last_values_skipped,
            "disconnects": {str(r): n for r, n in self.disconnects.items()},
            **({"cluster": self.cluster.stats()} if self.cluster is not None else {}),
        }

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._server is not None and self._server.is_serving() and not self._closing_flag

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called or the task is cancelled (then shut down)."""
        if self._server is None:
            raise InvalidStateError("server not started")
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            self.close()
            await asyncio.shield(self.wait_closed())
            raise

    def close(self, *, retry_after: float | None = None) -> None:
        """Stop listening now and start a graceful shutdown; :meth:`wait_closed` waits for its end.

        As with ``asyncio.Server.close()``, the listening sockets are closed before this returns
        (``is_serving()`` is then false); the goodbyes and the drain run in a task.
        """
        self._begin_shutdown(retry_after, None)

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection is gone.

        If the shutdown itself failed (a bug), the server is closed all the same, every
        connection aborted, and the failure is raised here.
        """
        if self._shutdown_task is not None:
            await asyncio.shield(self._shutdown_task)
        await self._closed.wait()

    async def shutdown(
        self, *, retry_after: float | None = None, drain_timeout: float | None = None
    ) -> None:
        """Stop accepting, flush each client, say goodbye, close; abort laggards at the deadline.

        The shutdown runs in its own task: cancelling the caller does not interrupt it. Only the
        call that starts it chooses ``retry_after`` and ``drain_timeout``: once :meth:`close` (or
        an earlier ``shutdown``) has begun, the goodbyes are sent and the deadline is set, so
        this call just waits for that shutdown and its arguments are ignored.
        """
        await asyncio.shield(self._begin_shutdown(retry_after, drain_timeout))
        await self._closed.wait()

    def _begin_shutdown(
        self, retry_after: float | None, drain_timeout: float | None
    ) -> asyncio.Task[None]:
        task = self._shutdown_task
        if task is None:
            self._closing_flag = True
            if self._server is not None:
                self._server.close()  # stop listening at once, as asyncio's close() does
            task = self._loop.create_task(self._shutdown(retry_after, drain_timeout))
            self._shutdown_task = task
        return task

    async def _shutdown(self, retry_after: float | None, drain_timeout: float | None) -> None:
        # One deadline for the drain and the hooks together; past it every connection is aborted
        # and every hook task cancelled, and _GRACE more bounds the wait for them to go.
        deadline = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self._drain_timeout = deadline
        end = self._loop.time() + deadline
        try:
            hint = self.config.retry_after if retry_after is None else retry_after
            for client in list(self._all.values()):
                try:
                    client._close(
                        DisconnectReason.SERVER_SHUTDOWN, retry_after=hint, text="server shutdown"
                    )
                except Exception:
                    # One client's failure must not keep the others from their goodbye.
                    logger.exception("closing client %d at shutdown failed: aborting it", client.id)
                    if client._transport is not None:
                        client._transport.abort()
            if self._all:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_gone(), max(0.0, end - self._loop.time()))
            self._abort_all()
            if self._all:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_gone(), _GRACE)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), _GRACE)
            self._stop_timers()
            if self.cluster is not None:
                await self.cluster.close()
            if self._tasks:
                left = end - self._loop.time()
                if left > 0:
                    await asyncio.wait(set(self._tasks), timeout=left)
                for task in list(self._tasks):
                    task.cancel()
                if self._tasks:
                    # A hook that ignores its cancellation must not hold the shutdown forever.
                    await asyncio.wait(set(self._tasks), timeout=_GRACE)
                if self._tasks:
                    logger.warning(
                        "%d hook task(s) ignored cancellation at shutdown: left running",
                        len(self._tasks),
                    )
        finally:
            # Whatever failed or was cancelled above, the server is closed now: serve_forever and
            # wait_closed must not wait forever (wait_closed then raises the failure). Set first:
            # the waiters only run after this block anyway.
            self._closed.set()
            self._abort_all()
            self._stop_timers()
            logger.info("server closed")

    def _abort_all(self) -> None:
        for client in list(self._all.values()):
            if client._transport is not None:
                client._transport.abort()

    def _stop_timers(self) -> None:
        for handle in (self._tick_handle, self._flush_handle, self._total_handle):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._flush_handle = self._total_handle = None

    async def _wait_gone(self) -> None:
        while self._all:
            self._gone.clear()
            await self._gone.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # --- multicast ------------------------------------------------------------------------------

    def multicast(self, trame: TrameLike, value: Any, group: str | None = None) -> _Done:
        """Send a server-originated multicast (sender 0) to every connected client, or to the
        members of ``group`` (nothing when it has none). Encoded once.

        It never waits: the frames are queued before it returns. It returns an awaitable that
        is already done, so ``await server.multicast(...)`` works too, as
        ``await client.multicast(...)`` does.
        """
        relay = self.registry.encode(trame, value, _RELAY)
        if group is None:
            self._send_run(relay, None, 1, None)
            return _DONE
        target = self._groups.by_name.get(group)
        if target is None:
            if self.cluster is not None:
                # No member here; other nodes may have some (they write their own group id).
                frame = GROUP_HEAD.pack(len(relay), _GROUP_RELAY, 0, 0) + relay[9:]
                self.cluster.publish(group, frame, 1)
            return _DONE
        # RELAY: length | kind | sender | body  ->  GROUP_RELAY: length | kind | sender | gid | body
        frame = GROUP_HEAD.pack(len(relay), _GROUP_RELAY, 0, target.id) + relay[9:]
        self._send_run(frame, None, 1, target)
        if target.last is not None:
            self._groups.keep_last(target, 0, frame[13:16], frame)
        return _DONE

    def _send_run(
        self,
        data: bytes,
        exclude: RemoteClient | None,
        count: int,
        group: Group[RemoteClient] | None,
    ) -> None:
        """Relay ``count`` frames to the local clients (everyone, or ``group``'s members), then
        hand the same bytes to the cluster: local delivery never waits on it."""
        self.fanout(data, exclude, count, to=None if group is None else group.members)
        node = self.cluster
        if node is not None:
            node.publish(None if group is None else group.name, data, count)

    def fanout(
        self,
        relay_frame: bytes,
        exclude: RemoteClient | None = None,
        frames: int = 1,
        *,
        to: dict[int, RemoteClient] | None = None,
    ) -> None:
        """Queue already-encoded RELAY (or GROUP_RELAY) frames for every open client except
        ``exclude``, or for the clients of ``to`` (a group's members, by id).

        ``relay_frame`` holds ``frames`` whole frames back to back. The same ``bytes`` object
        goes to every client: nothing is copied or re-encoded per recipient. This is the entry
        point for frames from other nodes (backplane).
        """
        n = len(relay_frame)
        open_clients = self._open if to is None else to
        recipients = len(open_clients) - (exclude is not None and exclude.id in open_clients)
        self.deliveries += frames * recipients
        self.bytes_relayed += n * recipients
        dirty = self._dirty
        over: list[RemoteClient] | None = None
        for client in open_clients.values():
            if client is exclude:
                continue
            # Outbox.push inline: one attribute access per recipient instead of a call.
            outbox = client.outbox
            outbox.frames.append(relay_frame)
            outbox.size += n
            if not client._dirty:
                client._dirty = True
                dirty.append(client)
            if outbox.size > outbox.limit:
                if over is None:
                    over = []
                over.append(client)
        ledger = self._ledger
        ledger.pending += n * recipients
        if dirty and self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_all)
        if over is not None:
            for client in over:
                self._overflow(client)
        if ledger.pending > self._total_limit and not self._over_total:
            self._total_passed()

    def _overflow(self, client: RemoteClient) -> None:
        """Act on a client whose outbox passed its limit: write it early, or apply the policy."""
        transport = client._transport
        if transport is None:
            return
        outbox = client.outbox
        outbox.buffered = transport.get_write_buffer_size()
        queued = outbox.size + outbox.buffered
        if queued > self.peak_queued_bytes:
            self.peak_queued_bytes = queued
        action = outbox.overflow()
        if action == WRITE:
            client._flush()  # may pause writing
        elif action == CUT:
            self._cut(client, outbox.cut_detail)

    def _cut(self, client: RemoteClient, detail: str) -> None:
        """Disconnect a slow consumer at once; what is queued for it is discarded."""
        core = client._core
        if core.closed:
            return
        logger.warning(
            "client %d is a slow consumer, cutting it: %s",
            client.id,
            detail,
            extra={"event": "slow-consumer", "client": client.id, "action": "cut"},
        )
        core.refuse(ErrorCode.SLOW_CONSUMER, DisconnectReason.SLOW_CONSUMER, detail)
        core.outgoing.clear()  # it would sit behind the backlog that caused the cut
        client.outbox.clear()
        client._finish()

    def _dispatch(self, sender: RemoteClient, frames: list[memoryview], start: int = 0) -> None:
        """Relay a sender's MULTICAST frames and hand its DATA frames to ``on_data``.

        Under the disconnect policy, consecutive multicasts of one chunk are relayed as one
        ``bytes`` object holding their RELAY frames back to back: each recipient then costs one
        list append per chunk instead of one per frame. The drop policies count and trim whole
        frames, so they get one object per frame.

        An asynchronous ``on_data`` holds the frames after its DATA until it has returned: hooks
        run one at a time per client, in order, while that client's reading waits. A hook that
        disconnects the sender stops the relaying of whatever it sent after.
        """
        if not sender._publisher:
            self._add_publisher(sender)
        on_multicast = self.on_multicast
        exclude = None if sender._core.echo else sender
        pack_head = _RELAY_HEAD.pack
        sid = sender.id
        core = sender._core
        # Frames before a bad one (the core already closed) are still handled; only a hook that
        # closes a client that was open stops the rest.
        was_open = core.state is _OPEN
        batch = self._batch_relays
        # Consecutive relays for the same recipients (everyone, or one group's members) go as
        # one object: each recipient then costs one append per run instead of one per frame.
        parts: list[bytes | memoryview] = []
        to: dict[int, RemoteClient] | None = None
        to_group: Group[RemoteClient] | None = None
        batch_groups = batch and on_multicast is None
        for i in range(start, len(frames)):
            frame = frames[i]
            kind = frame[0]
            if kind == _GROUP_MULTICAST and batch_groups:
                gid = _U32(frame, 1)[0]
                group = sender._groups.get(gid)
                if group is not None:
                    members = group.members
                    if parts and to is not members:
                        self._send_run(b"".join(parts), exclude, len(parts) // 2, to_group)
                        parts = []
                    to = members
                    to_group = group
                    head = GROUP_HEAD.pack(len(frame) + 4, _GROUP_RELAY, sid, gid)
                    if group.last is None:
                        parts.append(head)
                        parts.append(frame[5:])
                    else:
                        relay = head + frame[5:]
                        parts.append(relay)
                        parts.append(b"")
                        self._groups.keep_last(group, sid, relay[13:16], relay)
                    continue
            if kind != _MULTICAST:
                if parts:  # relays before this frame go out first, in order
                    self._send_run(b"".join(parts), exclude, len(parts) // 2, to_group)
                    parts = []
                if kind == _GROUP_MULTICAST:
                    self._group_multicast(sender, frame, exclude)
                elif kind == _DATA:
                    if self._handle_data(sender, frame, frames, i + 1):
                        return  # an async hook runs; the rest waits for it
                elif self._group_request(sender, frame, frames, i + 1):
                    return  # an async on_join runs; the rest waits for it
                if was_open and core.state is not _OPEN:
                    return  # a hook disconnected it
                continue
            if on_multicast is not None:
                try:
                    message = self.registry.decode_frame(frame, strict=False)
                except ProtocolError:
                    if parts:  # what came before the bad frame is relayed all the same
                        self._send_run(b"".join(parts), exclude, len(parts) // 2, None)
                    raise  # ends the sender's connection (RemoteClient.data_received)
                try:
                    # As for on_data: the message names its sender (a MULTICAST carries none).
                    keep = on_multicast(sender, message._replace(sender=sid))
                except Exception:
                    logger.exception("on_multicast hook failed for client %d", sid)
                    keep = False
                if was_open and core.state is not _OPEN:
                    break  # the hook disconnected it: nothing more of it is relayed
                if not keep:
                    continue
            if batch:
                if to is not None:
                    if parts:
                        self._send_run(b"".join(parts), exclude, len(parts) // 2, to_group)
                        parts = []
                    to = None
                    to_group = None
                parts.append(pack_head(len(frame) + 4, _RELAY, sid))
                parts.append(frame[1:])
            else:
                self._send_run(pack_head(len(frame) + 4, _RELAY, sid) + frame[1:], exclude, 1, None)
        if parts:
            self._send_run(b"".join(parts), exclude, len(parts) // 2, to_group)

    # --- groups ---------------------------------------------------------------------------------

    @property
    def groups(self) -> dict[str, int]:
        """The live groups: name -> number of members (a snapshot)."""
        return {name: len(g.members) for name, g in self._groups.by_name.items()}

    def members(self, group: str) -> list[RemoteClient]:
        """The members of ``group`` in joining order (empty when it does not exist)."""
        target = self._groups.by_name.get(group)
        return [] if target is None else list(target.members.values())

    def join(
        self,
        client: RemoteClient,
        group: str,
        *,
        presence: bool = False,
        last_values: bool | None = None,
    ) -> int:
        """Place ``client`` in ``group`` from the application (as Socket.IO's ``enter_room``).

        The client is told (a REPLY with request id 0) and receives the group's last values, as
        after its own JOIN; ``on_join`` is not called. Returns the group id. Raises
        ``ValueError`` for an invalid name, :class:`GroupRefused` when a limit refuses it and
        :class:`InvalidStateError` when the client is not connected.
        """
        if not client.is_open:
            raise InvalidStateError(f"client {client.id} is not connected")
        name = check_group_name(
            group.encode("utf-8", "surrogatepass"), self.config.max_group_name_length
        )
        if name is None:
            raise ValueError(
                f"{group!r} is not a valid group name (1 to "
                f"{self.config.max_group_name_length} bytes of UTF-8, no control "
                f"character, not only white space)"
            )
        status = self._join_refusal(client, name, presence)
        if status is not None:
            raise GroupRefused(status, _STATUS_TEXT[status])
        return self._admit_member(client, 0, name, presence, last_values)

    def leave(self, client: RemoteClient, group: str) -> bool:
        """Take ``client`` out of ``group``; return whether it was in (it is told, as after its
        own LEAVE)."""
        target = self._groups.by_name.get(group)
        if target is None or client.id not in target.members:
            return False
        self._leave(client, target, 0)
        client._queue(Reply(0, GroupOp.LEAVE, GroupStatus.OK, target.id, target.name).encode())
        return True

    def _group_multicast(
        self, sender: RemoteClient, frame: memoryview, exclude: RemoteClient | None
    ) -> None:
        gid = _U32(frame, 1)[0]
        group = sender._groups.get(gid)
        if group is None:
            # Not a protocol error: the client may have left while this was on its way.
            sender._queue(
                Reply(
                    0, GroupOp.MULTICAST, GroupStatus.NOT_MEMBER, gid, "not a member of this group"
                ).encode()
            )
            return
        on_multicast = self.on_multicast
        if on_multicast is not None:
            message = self.registry.decode_frame(bytes((_MULTICAST,)) + frame[5:], strict=False)
            try:
                keep = on_multicast(sender, message._replace(sender=sender.id, group=group.name))
            except Exception:
                logger.exception("on_multicast hook failed for client %d", sender.id)
                keep = False
            if not keep or sender._core.state is not _OPEN or sender.id not in group.members:
                return  # refused, or the hook took the sender out of the group (or cut it)
        relay = GROUP_HEAD.pack(len(frame) + 4, _GROUP_RELAY, sender.id, gid) + frame[5:]
        self._send_run(relay, exclude, 1, group)
        if group.last is not None:
            self._groups.keep_last(group, sender.id, relay[13:16], relay)

    def _group_request(
        self, sender: RemoteClient, frame: memoryview, frames: list[memoryview], rest: int
    ) -> bool:
        """Handle a JOIN, LEAVE or MEMBERS; true when an async ``on_join`` now runs and
        ``frames[rest:]`` wait for it."""
        kind = frame[0]
        body = frame[1:]
        if kind == _JOIN:
            join = Join.parse(body)
            rid = join.request_id
            name = check_group_name(join.name, self.config.max_group_name_length)
            if name is None:
                self._reply(sender, rid, GroupOp.JOIN, GroupStatus.BAD_NAME, 0)
                return False
            presence = bool(join.flags & FLAG_PRESENCE)
            status = self._join_refusal(sender, name, presence)
            if status is not None:
                self._reply(sender, rid, GroupOp.JOIN, status, 0)
                return False
            node = self.cluster
            if node is not None and name not in self._groups.by_name and not node.is_ready(name):
                # The group's first member here: its members and last values on the other
                # nodes come first (the client's later frames wait, as for an async hook).
                sender._run_hook(
                    "cluster-join", self._join_cluster(sender, rid, name, presence), frames, rest
                )
                return True
            later = self._join_now(sender, rid, name, presence)
            if later is None:
                return False
            sender._run_hook("on_join", later, frames, rest)
            return True
        if kind == _LEAVE:
            leave = Leave.parse(body)
            group = sender._groups.get(leave.group_id)
            if group is None:
                self._reply(
                    sender, leave.request_id, GroupOp.LEAVE, GroupStatus.NOT_MEMBER, leave.group_id
                )
                return False
            self._leave(sender, group, 0)
            sender._queue(
                Reply(
                    leave.request_id, GroupOp.LEAVE, GroupStatus.OK, group.id, group.name
                ).encode()
            )
            return False
        ask = Members.parse(body)  # the core passes no other kind here
        group = sender._groups.get(ask.group_id)
        if group is None:
            self._reply(
                sender, ask.request_id, GroupOp.MEMBERS, GroupStatus.NOT_MEMBER, ask.group_id
            )
        elif len(group.members) > self.config.max_presence_members:
            self._reply(sender, ask.request_id, GroupOp.MEMBERS, GroupStatus.NOT_ALLOWED, group.id)
        else:
            ids, more = self._groups.members_after(group, ask.after)
            sender._queue(MemberList(ask.request_id, group.id, more, tuple(ids)).encode())
        return False

    async def _join_cluster(
        self, client: RemoteClient, rid: int, name: str, presence: bool
    ) -> None:
        """A JOIN of a group with no member on this node yet: fetch the cluster's view of it,
        then decide as for any JOIN."""
        assert self.cluster is not None
        await self.cluster.prepare(name)
        if client._core.state is not _OPEN:
            return
        status = self._join_refusal(client, name, presence)
        if status is not None:
            self._reply(client, rid, GroupOp.JOIN, status, 0)
            return
        later = self._join_now(client, rid, name, presence)
        if later is not None:
            await later

    def _join_now(
        self, client: RemoteClient, rid: int, name: str, presence: bool
    ) -> Awaitable[None] | None:
        """Decide a JOIN the limits allow: ask ``on_join`` and admit or refuse. Return the rest
        to await when the hook is asynchronous, else None (decided already)."""
        hook = self.on_join
        group = self._groups.by_name.get(name)
        if hook is None or (group is not None and client.id in group.members):
            # A JOIN of a group the client is in is answered OK (the presence flag updated): the
            # application decided when it joined.
            self._admit_member(client, rid, name, presence, None)
            return None
        try:
            verdict = hook(client, name)
        except Exception:
            logger.exception("on_join hook failed for client %d", client.id)
            verdict = Refuse("the server failed to decide")
        if inspect.isawaitable(verdict):
            return self._join_later(client, rid, name, presence, verdict)
        self._apply_verdict(client, rid, name, presence, verdict)
        return None

    def _apply_verdict(
        self, client: RemoteClient, rid: int, name: str, presence: bool, verdict: Any
    ) -> None:
        try:
            self._decide(client, rid, name, presence, verdict)
        except Exception:
            logger.exception("on_join verdict for client %d could not be applied", client.id)
            self._reply(client, rid, GroupOp.JOIN, GroupStatus.REFUSED, 0)

    async def _join_later(
        self, client: RemoteClient, rid: int, name: str, presence: bool, verdict: Awaitable[Any]
    ) -> None:
        try:
            decided = await verdict
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("on_join hook failed for client %d", client.id)
            decided = Refuse("the server failed to decide")
        node = self.cluster
        if node is not None and name not in self._groups.by_name and not node.is_ready(name):
            await node.prepare(name)
        if client._core.state is _OPEN:
            group = self._groups.by_name.get(name)
            if group is not None and client.id in group.members:
                # Placed meanwhile (server.join): a member's JOIN is answered OK.
                self._admit_member(client, rid, name, presence, None)
                return
            # The limits again: other joins may have run meanwhile.
            status = self._join_refusal(client, name, presence)
            if status is not None:
                self._reply(client, rid, GroupOp.JOIN, status, 0)
                return
            self._apply_verdict(client, rid, name, presence, decided)

    def _decide(
        self, client: RemoteClient, rid: int, name: str, presence: bool, verdict: Any
    ) -> None:
        if verdict is None or verdict is True:
            self._admit_member(client, rid, name, presence, None)
        elif isinstance(verdict, Accept):
            self._admit_member(client, rid, name, presence, verdict.last_values)
        else:
            if isinstance(verdict, Refuse):
                reason = str(verdict.reason)
            elif isinstance(verdict, str):
                reason = verdict
            else:
                reason = "refused by the server"
            self._reply(client, rid, GroupOp.JOIN, GroupStatus.REFUSED, 0, reason)

    def _join_refusal(self, client: RemoteClient, name: str, presence: bool) -> GroupStatus | None:
        group = self._groups.by_name.get(name)
        member = group is not None and client.id in group.members
        if member:
            assert group is not None
            if presence and len(group.members) > self.config.max_presence_members:
                return GroupStatus.NOT_ALLOWED
            return None
        why = self._groups.refusal(len(client._groups), name, presence)
        return None if why is None else GroupStatus[why]

    def _admit_member(
        self, client: RemoteClient, rid: int, name: str, presence: bool, last_values: bool | None
    ) -> int:
        """Add a client to a group: the OK REPLY, then the last values, then live frames (all
        through its one outbox, in order: no gap, no duplicate); presence to the others."""
        group, new = self._groups.join(client.id, client, name, presence, last_values=last_values)
        client._groups[group.id] = group
        node = self.cluster
        if node is not None and new:
            if len(group.members) == 1:
                node.group_opened(group)  # remote members and last values, before the REPLY
            node.member_event(group, PresenceEvent.JOINED, client.id, 0)
        client._queue(Reply(rid, GroupOp.JOIN, GroupStatus.OK, group.id, name).encode())
        if new:
            if group.last:
                core = client._core
                for frame in self._last_values_for(client, group, list(group.last.values())):
                    if core.state is not _OPEN:
                        break  # cut by its own backlog: it left the group on the way
                    client._queue(frame)
            if client._core.state is _OPEN and client.id in group.members:
                self._presence(group, PresenceEvent.JOINED, client.id, 0)
        return group.id

    def _last_values_for(
        self, client: RemoteClient, group: Group[RemoteClient], frames: list[bytes]
    ) -> list[bytes]:
        """The newest of ``group``'s last values ``frames`` (oldest first) that ``client`` may be
        sent at once: within half its budget, less what is queued for it already (joins in a row
        add up), or they would cut it. The others are counted and logged."""
        start = newest_that_fit(frames, self.config.max_queue_bytes // 2 - client.queued_bytes)
        if start:
            self.last_values_skipped += start
            self._skip_events += 1
            if self._skip_events & (self._skip_events - 1) == 0:  # the 1st, 2nd, 4th... time
                logger.warning(
                    "group %r: %d of its %d last values left out for client %d, past half of "
                    "max_queue_bytes (%d; %d times so far): lower last_values_max_bytes or "
                    "raise max_queue_bytes",
                    group.name,
                    start,
                    len(frames),
                    client.id,
                    self.config.max_queue_bytes,
                    self._skip_events,
                    extra={"event": "last-values-skipped", "skipped": start},
                )
        return frames[start:]

    def _leave(self, client: RemoteClient, group: Group[RemoteClient], reason: int) -> None:
        client._groups.pop(group.id, None)
        forgotten = self._groups.leave(client.id, group)
        self._presence(group, PresenceEvent.LEFT, client.id, reason)
        node = self.cluster
        if node is not None:
            node.member_event(group, PresenceEvent.LEFT, client.id, reason)
            if forgotten:
                node.group_closed(group)

    def _presence(
        self, group: Group[RemoteClient], event: PresenceEvent, client_id: int, reason: int
    ) -> None:
        """Tell the members that asked for presence (encoded once, the same bytes to each)."""
        watchers = group.presence
        if not watchers or (len(watchers) == 1 and client_id in watchers):
            return
        notice = PresenceNotice(group.id, event, client_id, reason).encode()
        members = group.members
        # A snapshot: a watcher the notice puts over its budget is cut on the spot, and its
        # leaving changes the set (and the members) while this loop runs.
        for cid in list(watchers):
            member = members.get(cid)
            if cid != client_id and member is not None:
                member._queue(notice)

    def _reply(
        self,
        client: RemoteClient,
        rid: int,
        op: GroupOp,
        status: GroupStatus,
        gid: int,
        text: str | None = None,
    ) -> None:
        client._queue(Reply(rid, op, status, gid, text or _STATUS_TEXT[status]).encode())

    def _handle_data(
        self, sender: RemoteClient, frame: memoryview, frames: list[memoryview], rest: int
    ) -> bool:
        """Call ``on_data``; true when it is asynchronous and ``frames[rest:]`` now wait for it."""
        hook = self.on_data
        if hook is None:
            return False
        message = self.registry.decode_frame(frame, strict=False)
        message = message._replace(sender=sender.id)
        try:
            result = hook(sender, message)
        except Exception:
            logger.exception("on_data hook failed for client %d", sender.id)
            return False
        if inspect.isawaitable(result):
            sender._run_hook("on_data", result, frames, rest)
            return True
        return False

    def _count_trames(self, frames: list[memoryview]) -> None:
        """Count frames and bytes per trame code (metrics only: one dict update per frame)."""
        table = self.trames_in
        for frame in frames:
            kind = frame[0]
            at = 5 if kind == _GROUP_MULTICAST else 1
            if kind not in _DATA_KINDS or len(frame) < at + 3:
                continue
            code = bytes(frame[at : at + 3]).decode("ascii", "replace")
            entry = table.get(code)
            if entry is None:
                if len(table) >= _MAX_TRAME_CODES:
                    code = "other"
                entry = table.setdefault(code, [0, 0])
            entry[0] += 1
            entry[1] += len(frame) + 4

    def _mark_dirty(self, client: RemoteClient) -> None:
        self._dirty.append(client)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_handle = None
        dirty = self._dirty
        self._dirty = []
        for client in dirty:
            # RemoteClient._flush's common case inline (one object pending, the transport's
            # buffer empty before and after): paced, this runs once per recipient and frame.
            transport = client._transport
            if transport is None or (data := client.outbox.take_single()) is None:
                client._flush()
                continue
            client._dirty = False
            transport.write(data)  # may call pause_writing
            buffered = transport.get_write_buffer_size()
            if buffered:
                client.outbox.wrote(buffered)
        if self._over_total and self._ledger.pending <= self._total_low:
            self._total_ok()

    # --- server-wide budget ---------------------------------------------------------------------

    def _total_passed(self) -> None:
        """The outboxes together passed max_total_queue_bytes: pause publishers, briefly."""
        self._over_total = True
        self.budget_pauses += 1
        self._update_publishers()
        self._total_handle = self._loop.call_later(
            self.config.max_publisher_pause, self._check_total
        )

    def _check_total(self) -> None:
        """The pause is over: shed the largest outboxes if still over, and let publishers go."""
        self._total_handle = None
        ledger = self._ledger
        if ledger.pending > self._total_low:
            policy = self.config.slow_consumer_policy
            for client in sorted(self._all.values(), key=lambda c: -c.outbox.size):
                if ledger.pending <= self._total_low or not client.outbox.size:
                    break
                self.budget_sheds += 1
                detail = (
                    f"server-wide budget max_total_queue_bytes={self.config.max_total_queue_bytes} "
                    f"passed; this client had the largest backlog, {client.outbox.size} bytes"
                )
                if policy == "disconnect":
                    self._cut(client, detail)
                else:
                    logger.warning(
                        "client %d: dropping its backlog: %s",
                        client.id,
                        detail,
                        extra={"event": "slow-consumer", "client": client.id, "action": "shed"},
                    )
                    if client.outbox.shed():
                        self._cut(client, client.outbox.cut_detail)
        self._total_ok()

    def _total_ok(self) -> None:
        self._over_total = False
        if self._total_handle is not None:
            self._total_handle.cancel()
            self._total_handle = None
        self._update_publishers()

    # --- connections ----------------------------------------------------------------------------

    def _make_protocol(self) -> RemoteClient:
        # Ids travel as u32 and 0 is the server: wrap, never giving a live connection's id (one
        # still in its TLS handshake is not registered yet: only a whole wrap of 2**32 accepts
        # during one handshake could reach its id again).
        all_ = self._all
        n = self._next_id
        base = self._id_base
        span = self._id_span
        for _ in range(len(all_) + 1):
            n = n % span + 1
            if base | n not in all_:
                break
        self._next_id = n
        return RemoteClient(self, base | n)

    def _accepted(self, client: RemoteClient) -> None:
        # Registered here, not in _make_protocol: a TLS handshake that fails never reaches
        # connection_made, and must leave nothing behind.
        self._all[client.id] = client
        self._handshaking += 1
        client._in_handshake = True
        core = client._core
        if self._closing_flag:
            core.refuse(ErrorCode.SHUTTING_DOWN, DisconnectReason.SERVER_SHUTDOWN)
            client._write_control()
            client._finish()
            return
        limit = self.config.max_handshaking
        if limit is not None and self._handshaking > limit:
            core.refuse(
                ErrorCode.TOO_MANY_CLIENTS,
                DisconnectReason.TOO_MANY_CLIENTS,
                f"server is at max_handshaking={limit} connections in their handshake",
            )
            client._write_control()
            client._finish()
            return
        self._reschedule(client)

    def _admit(self, client: RemoteClient) -> bool:
        """A client's HELLO was accepted: count it against max_clients before its WELCOME goes.

        Refused, the WELCOME waiting in its core's outgoing frames is replaced by the ERROR.
        """
        if client._in_handshake:
            client._in_handshake = False
            self._handshaking -= 1
        max_clients = self.config.max_clients
        if max_clients is None or len(self._open) < max_clients:
            return True
        core = client._core
        core.outgoing[:] = [f for f in core.outgoing if f[4] != _WELCOME]
        core.refuse(
            ErrorCode.TOO_MANY_CLIENTS,
            DisconnectReason.TOO_MANY_CLIENTS,
            f"server is at max_clients={max_clients}",
        )
        return False

    def _opened(self, client: RemoteClient, frames: list[memoryview]) -> None:
        """A client completed its HELLO: run ``on_connect``, then dispatch its first frames."""
        client._was_open = True
        self.connects += 1
        self._open[client.id] = client
        self._reschedule(client)
        address = _format_address(client.address)
        logger.info(
            "client %d connected from %s",
            client.id,
            address,
            extra={"event": "connect", "client": client.id, "address": address},
        )
        hook = self.on_connect
        if hook is not None:
            try:
                result = hook(client)
            except Exception:
                logger.exception(
                    "on_connect hook failed for client %d: disconnecting it", client.id
                )
                client.disconnect("refused by the server")
                return
            if inspect.isawaitable(result):
                client._run_hook("on_connect", result, frames, 0)
                return
            if client._core.state is not _OPEN:
                return  # refused by the hook: nothing it sent is dispatched
        if frames:
            self._dispatch(client, frames)

    def _closing(self, client: RemoteClient) -> None:
        """The client's core closed: stop sending it multicasts and timers; leave its groups."""
        reason = client._core.close_reason
        if reason is DisconnectReason.SLOW_CONSUMER:
            self.slow_consumers += 1
        if client._groups:
            self._leave_all(client, reason)
        if self._open.pop(client.id, None) is not None:
            self._wheel.cancel(client)

    def _leave_all(self, client: RemoteClient, reason: DisconnectReason | None) -> None:
        code = int(reason) if reason is not None else 0
        for group in list(client._groups.values()):
            self._leave(client, group, code)

    def _lost(self, client: RemoteClient, reason: DisconnectReason, exc: Exception | None) -> None:
        opened = client._was_open
        if client._groups:
            self._leave_all(client, reason)
        self.disconnects[reason] += 1
        self._open.pop(client.id, None)
        self._wheel.cancel(client)
        self._all.pop(client.id, None)
        if client._in_handshake:
            client._in_handshake = False
            self._handshaking -= 1
        self._publishers.discard(client)
        self._gone.set()
        core = client._core
        detail = core.close_detail
        if exc is not None and reason is DisconnectReason.CONNECTION_LOST:
            detail = f"{detail}: {exc}"
        if opened:
            logger.info(
                "client %d disconnected: %s%s",
                client.id,
                reason,
                f" ({detail})" if detail else "",
                extra={
                    "event": "disconnect",
                    "client": client.id,
                    "reason": str(reason),
                    "detail": detail,
                },
            )
            if self.on_disconnect is not None:
                self._call_hook("on_disconnect", self.on_disconnect, client, reason)
        else:
            logger.info(
                "connection from %s closed before handshake: %s (%s)",
                _format_address(client.address),
                reason,
                detail,
                extra={"event": "refused", "reason": str(reason), "detail": detail},
            )

    def _congested(self, client: RemoteClient, congested: bool) -> None:
        """A client's transport went above (or back below) its high-water mark."""
        self._n_congested += 1 if congested else -1
        if self._pace:
            # Pace mode: publishers wait while any reader is congested; a reader that drains
            # under pace_min_rate for max_publisher_pause is cut (Outbox.check).
            self._update_publishers()
        core = client._core
        core.writing_congested(congested, self._loop.time())
        if not core.closed:
            self._reschedule(client)

    def _add_publisher(self, client: RemoteClient) -> None:
        client._publisher = True
        self._publishers.add(client)
        if self._publishers_paused:
            client._set_paused(_BY_FLOW, True)

    def _update_publishers(self) -> None:
        paused = self._over_total or (self._pace and self._n_congested > 0)
        if paused == self._publishers_paused:
            return
        self._publishers_paused = paused
        for client in self._publishers:
            client._set_paused(_BY_FLOW, paused)

    # --- timers ---------------------------------------------------------------------------------

    def _reschedule(self, client: RemoteClient, sooner: float | None = None) -> None:
        when = client._core.next_timer()
        check = client.outbox.next_check
        if check != _INF and (when is None or check < when):
            when = check
        if sooner is not None and (when is None or sooner < when):
            when = sooner
        if when is None:
            self._wheel.cancel(client)
            return
        self._wheel.schedule(client, when)
        if when < self._tick_at:
            self._arm()

    def _arm(self) -> None:
        when = self._wheel.next_time()
        if self._tick_handle is not None:
            if when is not None and when == self._tick_at:
                return
            self._tick_handle.cancel()
            self._tick_handle = None
        if when is None:
            self._tick_at = _INF
            return
        self._tick_at = when
        self._tick_handle = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        now = max(self._loop.time(), self._tick_at)
        self._tick_at = _INF
        for client in self._wheel.pop_due(now):
            try:
                client._on_timer(now)
            except Exception:
                # A bug of ours in one client's timer must not drop the others of this slot.
                logger.exception("timer of client %d failed: aborting it", client.id)
                if client._transport is not None:
                    client._transport.abort()
        self._arm()

    # --- hooks ----------------------------------------------------------------------------------

    def _call_hook(self, name: str, hook: Callable[..., Any], *args: Any) -> None:
        try:
            result = hook(*args)
        except Exception:
            logger.exception("%s hook failed", name)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(_guard(name, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class _Done:
    """What :meth:`Server.multicast` returns: done already, and awaitable for symmetry with
    ``Client.multicast`` (awaiting it does not yield to the loop)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that ends at once

    def __repr__(self) -> str:
        return "<multicast queued>"


_DONE: Final = _Done()


async def _guard(name: str, awaitable: Awaitable[Any]) -> bool:
    """Await a hook; log its failure. Return whether it succeeded."""
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("%s hook failed", name)
        return False
    return True


def _resolution(config: ServerConfig) -> float:
    times = [
        t
        for t in (
            config.heartbeat_interval,
            config.heartbeat_timeout,
            config.handshake_timeout,
            config.frame_timeout,
        )
        if t is not None
    ]
    shortest = min(times, default=1.0)
    return min(0.05, max(0.001, shortest / 20))


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


def _config(config: ServerConfig | None, options: dict[str, Any]) -> ServerConfig:
    base = config or ServerConfig()
    return replace(base, **options) if options else base


async def start_server(
    host: str | Sequence[str] | None = "127.0.0.1",
    port: int = 8765,
    *,
    config: ServerConfig | None = None,
    registry: Registry = REGISTRY,
    ssl: Any = None,
    reuse_port: bool | None = None,
    sock: socket.socket | None = None,
    on_connect: ConnectHook | None = None,
    on_disconnect: DisconnectHook | None = None,
    on_data: DataHook | None = None,
    on_multicast: MulticastFilter | None = None,
    on_join: JoinHook | None = None,
    cluster: ClusterConfig | str | Sequence[str] | None = None,
    **options: Any,
) -> Server:
    """Start a server listening on ``host:port`` (``port=0``: the OS picks; see ``server.port``).

    ``options`` are :class:`ServerConfig` fields (``heartbeat_interval=5.0``, ``token="s3cret"``,
    ...). Hooks may be plain functions or coroutine functions:

    - ``on_connect(client)`` after a client's handshake;
    - ``on_disconnect(client, reason)`` exactly once for every client that was connected;
    - ``on_data(client, message)`` for each DATA frame a client addresses to the server;
    - ``on_multicast(client, message) -> bool`` (plain function) to filter multicasts before they are
      relayed (group multicasts too, with ``message.group`` set); it costs a decode per
      multicast, so leave it unset when not needed;
    - ``on_join(client, group)`` before a client joins a group: None or True accepts,
      ``Accept(last_values=True)`` accepts and makes the group keep last values, False, a str or
      ``Refuse(reason)`` refuses (the client's join raises GroupRefused with the reason).

    ``cluster`` joins a cluster of servers through NATS (docs/cluster.md): a
    :class:`~trame_async.cluster.ClusterConfig`, or NATS URLs (``"nats://h1:4222,nats://h2:4222"``)
    for the defaults. It needs the ``cluster`` extra (``pip install 'trame-async[cluster]'``).

    Installs no signal handler and changes no loop policy: embed it in any asyncio program.
    """
    server = Server(
        _config(config, options),
        registry=registry,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        on_data=on_data,
        on_multicast=on_multicast,
        on_join=on_join,
        cluster=_cluster_config(cluster),
    )
    try:
        await server.start(host, port, ssl=ssl, reuse_port=reuse_port, sock=sock)
    except BaseException:
        if server.cluster is not None:
            await server.cluster.close()
        raise
    return server


def _cluster_config(cluster: ClusterConfig | str | Sequence[str] | None) -> ClusterConfig | None:
    if cluster is None or isinstance(cluster, ClusterConfig):
        return cluster
    if not isinstance(cluster, (str, list, tuple)) or not all(isinstance(u, str) for u in cluster):
        raise TypeError(
            f"cluster= takes a ClusterConfig or NATS URLs ('nats://h1:4222,nats://h2:4222'), "
            f"not {cluster!r}"
        )
    return ClusterConfig(urls=parse_urls(cluster))


@contextlib.asynccontextmanager
async def serve(
    host: str | Sequence[str] | None = "127.0.0.1",
    port: int = 8765,
    **kwargs: Any,
) -> AsyncIterator[Server]:
    """``async with serve(host, port, ...) as server:`` runs a server for the block's duration.

    Takes the arguments of :func:`start_server`; on exit the server shuts down gracefully.
    """
    server = await start_server(host, port, **kwargs)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
