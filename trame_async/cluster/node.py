"""One server's part in a cluster: its NATS connection, subscriptions, batching, heartbeats,
snapshots and probes (asyncio and ``nats-py``; the bookkeeping lives in the sans-I/O modules
beside this one).

Theory of operation
-------------------
The server relays its local clients' frames to its local clients first, then hands the same
bytes to :meth:`ClusterNode.publish`. They are batched per loop iteration into envelopes
(:class:`~.envelope.Batcher`), one per stream, and queued in the bounded
:class:`~.outbox.ClusterOutbox`; one publisher task sends the outbox in order whenever NATS is
connected. So NATS never delays a local delivery, and an outage costs only the outbox's bounds
(what passes them is dropped and counted).

Subjects, under ``trame.<cluster name>``:

- ``.all``: RELAY frames for every client; every node subscribes;
- ``.g.<group>``: GROUP_RELAY and PRESENCE frames of one group; only nodes with a local member
  subscribe (interest-based routing);
- ``.ctl.hb``, ``.ctl.who``, ``.ctl.snap``: heartbeats, discovery and snapshot requests;
- ``.n.<node id>.>``: what is addressed to one node (targeted snapshots, replies).

A receiving node checks every envelope's (node, epoch, seq) with a
:class:`~.gaps.GapTracker`: gaps are counted and logged, and a gap in a group stream makes the
node ask the sender for that group's members and last values again. Group ids are per node: the
receiver writes its own id into each frame (one copy per envelope, not per recipient).

A node gaining its first member in a group subscribes to the group's subject, then asks every
live node for the group's members, last values and stream position (a *snapshot*), buffering
the live envelopes meanwhile; the join is answered once the replies are in (or at
``snapshot_timeout``), and the buffered envelopes the snapshot does not cover follow. No
duplicate, no gap.

Every ``heartbeat_interval`` a node announces itself (with the positions of the streams it
published on since its last heartbeat, which reveal loss at a stream's tail). A node not heard
from for ``dead_after`` is gone: its members leave every group here (PRESENCE LEFT to the
watchers) and its last values go. A probe the node sends itself through NATS every
``probe_interval`` (from a second connection, on the ``.all`` subject) finds a deaf
subscription; the main connection is then rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..codes import DisconnectReason, PresenceEvent
from ..wire import Kind, PresenceNotice
from .config import NODE_ID_BITS, ClusterConfig
from .envelope import ENVELOPE_HEAD, Batch, Batcher, EnvelopeError, decode, split_frames
from .gaps import GapTracker
from .outbox import ClusterOutbox, OutboxLimits

if TYPE_CHECKING:
    from ..groups import Group
    from ..server import RemoteClient, Server

__all__ = ["ClusterNode", "group_token"]

logger = logging.getLogger("trame_async.cluster")

_RELAY: Final = int(Kind.RELAY)
_GROUP_RELAY: Final = int(Kind.GROUP_RELAY)
_PRESENCE: Final = int(Kind.PRESENCE)
_ALL_KINDS: Final = frozenset({_RELAY})
_GROUP_KINDS: Final = frozenset({_GROUP_RELAY, _PRESENCE})
_U32: Final = struct.Struct(">I")
_HEAD: Final = ENVELOPE_HEAD.size
_PROBE: Final = struct.Struct(">4sQQ")
_PROBE_MAGIC: Final = b"TRPB"
_SNAP_MAGIC: Final = b"TRSN"
_SNAP_HEAD: Final = struct.Struct(">4sI")
#: Largest snapshot reply message; a bigger snapshot goes in several parts.
_SNAP_PART: Final = 512 << 10
#: Member ids per snapshot section at most (about 180 KB of JSON).
_SNAP_MEMBERS: Final = 16_384
#: A last value larger than this is not sent in a snapshot (counted): with a part's other
#: contents it could pass NATS's max_payload.
_SNAP_FRAME_MAX: Final = 256 << 10
#: Positions of at most this many group streams ride on one heartbeat.
_HB_STREAMS: Final = 256
_ALL: Final = "all"
#: Other nodes remembered at most (gone ones are forgotten first).
_MAX_PEERS: Final = 4096
#: Envelopes one stream can have lost at once, at most (an outbox of 8 MiB holds fewer): a
#: bigger jump is a forged message, refused.
_MAX_JUMP: Final = 1 << 20
#: How far in the future (ns) a node's epoch may be (its clock ahead of ours).
_MAX_CLOCK_AHEAD: Final = 86_400 * 10**9
_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def group_token(name: str) -> str:
    """Return the NATS subject token of a group name: ASCII letters, digits, ``_`` and ``-``
    as they are, every other byte of its UTF-8 as ``%XX`` (so ``.``, ``*``, ``>`` and spaces
    never reach a subject, and two names never share a token)."""
    raw = name.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


@dataclass(slots=True)
class _Peer:
    """Another node, as its heartbeats describe it."""

    node: int
    index: int
    epoch: int
    seen: float
    #: Stream -> (epoch, next seq) it claimed at its previous heartbeat (checked at the next).
    claimed: dict[str, tuple[int, int]] = field(default_factory=dict)
    gone: bool = False


@dataclass(slots=True)
class _Section:
    """What one node said of one group in a snapshot."""

    members: set[int] = field(default_factory=set)
    position: tuple[int, int] | None = None
    #: The node's first epoch (its streams' epochs are at least this).
    epoch: int | None = None
    frames: list[bytes] = field(default_factory=list)


class _Snapshot:
    """The replies to one snapshot request, by node, until every expected node answered."""

    __slots__ = ("done", "expected", "parts", "sections")

    def __init__(self, expected: set[int]) -> None:
        self.expected = expected
        # node -> group name -> section
        self.sections: dict[int, dict[str, _Section]] = {}
        # node -> parts still to come
        self.parts: dict[int, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _GroupSub:
    """This node's subscription to one group's subject, and its state."""

    __slots__ = (
        "buffer",
        "buffered",
        "covered",
        "dropped",
        "group",
        "name",
        "owner",
        "ready",
        "snapshot",
        "sub",
        "sub_nc",
        "subject",
        "unused",
    )

    def __init__(self, name: str, subject: str) -> None:
        self.name = name
        self.subject = subject
        self.sub: Any = None
        #: The connection ``sub`` belongs to.
        self.sub_nc: Any = None
        self.group: Group[RemoteClient] | None = None
        #: Set once the snapshot is in (or timed out); live envelopes wait in buffer until then.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer: deque[bytes] | None = deque()
        #: Bytes in ``buffer``.
        self.buffered = 0
        #: node -> (epoch, next seq) the snapshot covered: earlier envelopes are in it.
        self.covered: dict[int, tuple[int, int]] = {}
        #: (node, epoch) -> [first seq, last seq, count] of envelopes dropped from ``buffer``
        #: (oldest first, so one run per stream life): judged against ``covered`` on replay.
        self.dropped: dict[tuple[int, int], list[int]] = {}
        self.unused: asyncio.TimerHandle | None = None
        #: The snapshot, kept until the group exists here (its first member is admitted).
        self.snapshot: _Snapshot | None = None
        #: Remote member id -> the node it is on (a node gone takes its members with it).
        self.owner: dict[int, int] = {}


class ClusterNode:
    """A :class:`~trame_async.Server`'s link to the other nodes of its cluster (see the module
    docstring). The server makes it from ``cluster=`` and drives it; applications read
    :meth:`stats` (also in ``server.stats()["cluster"]``)."""

    def __init__(self, server: Server, config: ClusterConfig) -> None:
        """Prepare the node of ``server``; :meth:`start` connects it."""
        self.server = server
        self.config = config
        self.prefix = f"trame.{config.name}"
        self.node_id = random.getrandbits(63) + 1
        self.epoch = time.time_ns()
        self.index = config.node_index if config.node_index is not None else -1
        self._loop = asyncio.get_running_loop()
        self._batcher = Batcher(self.node_id, self.epoch, max_envelope=config.max_envelope)
        self._outbox = ClusterOutbox(OutboxLimits(config.outbox_max_bytes, config.outbox_max_age))
        self._tracker = GapTracker(self.node_id)
        self._flush_handle: asyncio.Handle | None = None
        self._wake = asyncio.Event()
        # Set by the publisher whenever it has emptied the outbox.
        self._drained = asyncio.Event()
        self._wake_handle: asyncio.TimerHandle | None = None
        self._nc: Any = None
        self._probe_nc: Any = None
        self._subs: list[Any] = []
        self._groups: dict[str, _GroupSub] = {}
        self._by_subject: dict[str, _GroupSub] = {}
        self._peers: dict[int, _Peer] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._next_request = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._changed: dict[str, None] = {}
        self._probe_seq = 0
        self._probe_due: float | None = None
        self._last_probe = 0.0
        # After a reconnection, the outbox waits until every live node was heard from again
        # (their subscriptions are back on NATS), at most dead_after: see _held().
        self._hold_since: float | None = None
        # When the NATS connection last came up: silence before it proves nothing.
        self._connected_since = 0.0
        self._probe_back = asyncio.Event()
        self.state = "starting"
        # Counters since the start (stats()).
        self.envelopes_out = 0
        self.frames_out = 0
        self.envelopes_in = 0
        self.frames_in = 0
        self.malformed_in = 0
        self.tail_missed = 0
        self.nodes_lost = 0
        self.nodes_returned = 0
        self.snapshots = 0
        self.snapshot_timeouts = 0
        self.resyncs = 0
        self.probes = 0
        self.deaf = 0
        self.rebuilds = 0
        self.disconnects = 0
        self.reconnects = 0
        self.index_conflicts = 0
        self.nats_errors = 0
        self.publish_errors = 0
        self.publish_dropped_frames = 0
        self.shutdown_dropped_frames = 0
        self.snapshot_values_skipped = 0
        self.buffer_dropped = 0
        self._drops_logged = (0, 0)  # outbox drops (frames, replies) already in a log line
        self._drops_logged_at = float("-inf")
        self._oversize_events = 0
        self.peers_refused = 0
        # What a group's first join may buffer of live envelopes (bounded like the outbox).
        self._buffer_cap = (
            config.outbox_max_bytes if config.outbox_max_bytes is not None else 8 << 20
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to NATS, choose the node index, subscribe; retry in the background when NATS
        cannot be reached (the server serves its local clients meanwhile)."""
        try:
            import nats  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "a cluster needs the nats-py client: pip install 'trame-async[cluster]'"
            ) from exc
        try:
            nc = await self._connect()
        except Exception as exc:
            logger.warning(
                "cluster %s: NATS unreachable at %s (%s); serving local clients, retrying",
                self.config.name,
                ", ".join(self.config.urls),
                _why(exc),
                extra={"event": "cluster-disconnected"},
            )
            if self.index < 0:
                self.index = random.randrange(1 << (32 - NODE_ID_BITS))
            self._spawn(self._reconnect_loop())
        else:
            await self._attach(nc)
        self._spawn(self._publisher())
        self._spawn(self._heartbeats())
        logger.info(
            "cluster %s: node %x index %d on %s",
            self.config.name,
            self.node_id,
            self.index,
            ", ".join(self.config.urls),
            extra={"event": "cluster-start", "node": self.node_id, "index": self.index},
        )

    async def close(self) -> None:
        """Send what the outbox holds (briefly), leave NATS and stop every task."""
        if self._closing:
            return
        self._flush()
        nc = self._nc
        if nc is not None and nc.is_connected and self._outbox:
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 1.0)
        self._closing = True
        left = self._outbox.frames
        if left:
            self.shutdown_dropped_frames += left
            logger.warning(
                "cluster %s: shutting down with NATS unreachable: %d frames for the other "
                "nodes dropped",
                self.config.name,
                left,
                extra={"event": "cluster-dropped", "frames": left},
            )
        self._outbox.clear()
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for conn in (self._nc, self._probe_nc):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        self._nc = self._probe_nc = None
        self.state = "closed"

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closing:
            logger.error("cluster task failed", exc_info=task.exception())

    # --- the NATS connection --------------------------------------------------------------------

    async def _connect(self) -> Any:

        cfg = self.config
        holder: list[Any] = []

        async def disconnected() -> None:
            if holder and holder[0] is self._nc and not self._closing:
                self.disconnects += 1
                self.state = "disconnected"
                logger.warning(
                    "cluster %s: NATS connection lost; local delivery goes on, frames for the "
                    "cluster wait in the outbox (up to %s bytes, %s s)",
                    cfg.name,
                    cfg.outbox_max_bytes,
                    cfg.outbox_max_age,
                    extra={"event": "cluster-disconnected"},
                )

        async def reconnected() -> None:
            if holder and holder[0] is self._nc and not self._closing:
                self.reconnects += 1
                self.state = "connected"
                self._hold_since = self._connected_since = self._loop.time()
                logger.warning(
                    "cluster %s: NATS connection back (%s); replaying %d envelopes",
                    cfg.name,
                    holder[0].connected_url.netloc if holder[0].connected_url else "?",
                    len(self._outbox),
                    extra={"event": "cluster-reconnected"},
                )
                self._wake.set()
                self._spawn(self._subscribe_missing())
                # Presence may have changed meanwhile: ask again for every local group.
                self._resync(list(self._groups), None)

        async def error(exc: Exception) -> None:
            self.nats_errors += 1
            # Every failed attempt of a reconnection comes here: logged at 1, 2, 4, 8... and every 100.
            n = self.nats_errors
            if n & (n - 1) == 0 or n % 100 == 0:
                logger.warning("cluster %s: NATS error (%d so far): %s", cfg.name, n, _why(exc))

        options: dict[str, Any] = {
            "servers": list(cfg.urls),
            "name": f"trame-{cfg.name}-{self.node_id:x}",
            "no_echo": True,
            # The outbox is the only buffer (bounded, counted): nats-py buffers nothing.
            "pending_size": 0,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": cfg.reconnect_wait,
            "connect_timeout": cfg.connect_timeout,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
        }
        options.update(cfg.nats_options)
        nc = await _bounded_connect(options, cfg)
        holder.append(nc)
        return nc

    async def _reconnect_loop(self) -> None:
        """NATS was unreachable at start (or the connection was rebuilt): try until it works."""
        attempt = 0
        while not self._closing:
            attempt += 1
            try:
                nc = await self._connect()
            except Exception as exc:
                if attempt == 1 or attempt % 20 == 0:
                    logger.warning(
                        "cluster %s: NATS still unreachable (%s)", self.config.name, _why(exc)
                    )
                await asyncio.sleep(random.uniform(0, self.config.reconnect_wait))
                continue
            self._hold_since = self._loop.time()
            await self._attach(nc)
            self._resync(list(self._groups), None)
            return

    async def _attach(self, nc: Any) -> None:
        """Subscribe everything on ``nc`` and make it the node's connection."""
        p = self.prefix
        subs = [
            await nc.subscribe(f"{p}.all", cb=self._on_all),
            await nc.subscribe(f"{p}.ctl.hb", cb=self._on_heartbeat),
            await nc.subscribe(f"{p}.ctl.who", cb=self._on_who),
            await nc.subscribe(f"{p}.ctl.snap", cb=self._on_snap_request),
            await nc.subscribe(f"{p}.n.{self.node_id:x}.>", cb=self._on_direct),
        ]
        # Who is there (their snapshots are needed from the first join on), and a free index.
        used: set[int] = set()
        for beat in await self._discover(nc):
            used.add(int(beat["index"]))
            self._note_peer(int(beat["node"]), int(beat["index"]), int(beat["epoch"]))
        if self.index < 0:
            free = [i for i in range(1 << (32 - NODE_ID_BITS)) if i not in used]
            if not free:
                raise RuntimeError("every node index of this cluster is taken (1024 nodes)")
            self.index = random.choice(free)
        old = self._nc
        self._nc = nc
        self._subs = subs
        # Groups: on this connection now (one opened meanwhile may sit on the old one).
        for gs in list(self._groups.values()):
            await self._ensure_sub(gs)
        await nc.flush(timeout=self.config.connect_timeout)
        self.state = "connected"
        self._connected_since = self._loop.time()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        self._wake.set()
        self._publish_heartbeat()

    async def _ensure_sub(self, gs: _GroupSub) -> None:
        """Subscribe ``gs`` on the current connection if it is not already."""
        for _ in range(3):  # the connection may change while subscribing
            nc = self._nc
            if nc is None or not nc.is_connected or gs.sub_nc is nc:
                return
            if self._groups.get(gs.name) is not gs:
                return
            sub = await nc.subscribe(gs.subject, cb=self._on_group)
            if self._groups.get(gs.name) is not gs:
                await _unsubscribe(sub)  # closed meanwhile
                return
            old, gs.sub, gs.sub_nc = gs.sub, sub, nc
            if old is not None:
                self._spawn(_unsubscribe(old))

    async def _subscribe_missing(self) -> None:
        """Subscribe the groups opened while NATS was unreachable (nats-py renews the others)."""
        for gs in list(self._groups.values()):
            with contextlib.suppress(Exception):
                await self._ensure_sub(gs)

    def _note_peer(self, node: int, index: int, epoch: int) -> _Peer | None:
        """Record a node heard from (bounded: a flood of forged ids cannot grow it for ever)."""
        peer = self._peers.get(node)
        if peer is None:
            if node == self.node_id:
                return None
            if len(self._peers) >= _MAX_PEERS:
                self._prune_peers()
                if len(self._peers) >= _MAX_PEERS:
                    self.peers_refused += 1
                    if self.peers_refused & (self.peers_refused - 1) == 0:
                        logger.error(
                            "cluster %s: %d nodes known already: node %x ignored (%d so far); "
                            "is someone forging heartbeats on this NATS account?",
                            self.config.name,
                            _MAX_PEERS,
                            node,
                            self.peers_refused,
                        )
                    return None
            peer = self._peers[node] = _Peer(node, index, epoch, self._loop.time())
        return peer

    def _prune_peers(self) -> None:
        """Forget the nodes declared gone long ago."""
        limit = self._loop.time() - 10 * self.config.dead_after
        for node in [n for n, p in self._peers.items() if p.gone and p.seen < limit]:
            del self._peers[node]
            self._tracker.forget_node(node)

    async def _discover(self, nc: Any) -> list[dict[str, Any]]:
        """Ask the live nodes who they are (a short round of replies)."""
        beats: list[dict[str, Any]] = []
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(f"{self.prefix}.ctl.who", b"", reply=inbox)
            await nc.flush(timeout=self.config.connect_timeout)
            deadline = self._loop.time() + min(0.25, self.config.snapshot_timeout)
            while (left := deadline - self._loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except Exception:
                    break
                if not msg.data:
                    break  # NATS's "no responders" status (an empty message): nobody is there
                beat = self._heartbeat_of(msg.data)
                if beat is not None and len(beats) < _MAX_PEERS:
                    beats.append(beat)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return beats

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, group: str | None, data: bytes, count: int) -> None:
        """Queue ``count`` whole frames (back to back in ``data``) for the other nodes: RELAY
        frames for everyone (``group`` None) or GROUP_RELAY / PRESENCE frames of ``group``."""
        stream = _ALL if group is None else group
        if not self._batcher.add(stream, data, count):
            self._oversize_events += 1
            if self._oversize_events & (self._oversize_events - 1):
                return  # logged at the 1st, 2nd, 4th... time
            logger.warning(
                "cluster %s: %d frames of %d bytes too large to cross NATS: delivered here "
                "only (%d in all)",
                self.config.name,
                count,
                len(data),
                self._batcher.oversize_dropped,
                extra={"event": "cluster-dropped", "frames": count},
            )
            return
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Seal this loop iteration's frames into envelopes and queue them for the publisher."""
        self._flush_handle = None
        if not self._batcher:
            return
        now = self._loop.time()
        outbox = self._outbox
        for batch in self._batcher.flush():
            outbox.push(batch, now)
            self._changed[batch.stream] = None
        self._log_drops(now)
        self._wake.set()

    def _log_drops(self, now: float) -> None:
        """Log the outbox's drops (envelopes' frames, and replies to other nodes) since the last
        such line, at most one a second: an outage under a flood drops at every loop iteration,
        and the counters have every drop. The heartbeat loop calls this too, for the last ones."""
        drops = self._outbox.dropped
        frames, control = self._drops_logged
        if (drops.frames, drops.control) == (frames, control) or now - self._drops_logged_at < 1:
            return
        self._drops_logged = (drops.frames, drops.control)
        self._drops_logged_at = now
        logger.warning(
            "cluster %s: outbox over its bounds, %d frames for the other nodes and %d replies "
            "to them dropped (%d frames, %d replies in all since the start)",
            self.config.name,
            drops.frames - frames,
            drops.control - control,
            drops.frames,
            drops.control,
            extra={"event": "cluster-dropped", "frames": drops.frames - frames},
        )

    async def _publisher(self) -> None:
        """Send the outbox in order whenever NATS is connected (the only publisher of envelopes)."""
        outbox = self._outbox
        while True:
            await self._wake.wait()
            self._wake.clear()
            nc = self._nc
            while nc is not None and nc.is_connected and not self._held():
                now = self._loop.time()
                batch = outbox.peek(now)
                self._log_drops(now)  # any aged out
                if batch is None:
                    self._drained.set()
                    break
                try:
                    await nc.publish(self._subject(batch.stream), batch.data)
                except Exception as exc:
                    if not nc.is_connected:
                        break  # disconnected meanwhile: it stays first in the outbox
                    # Refused for itself (over NATS's max_payload...): retrying would block
                    # everything behind it. Dropped, counted, logged.
                    outbox.pop()
                    self.publish_errors += 1
                    self.publish_dropped_frames += batch.nframes
                    logger.error(
                        "cluster %s: NATS refused a message of %d bytes (%s); %d frames dropped",
                        self.config.name,
                        len(batch.data),
                        _why(exc),
                        batch.nframes,
                        extra={"event": "cluster-dropped", "frames": batch.nframes},
                    )
                    continue
                outbox.pop()
                if batch.nframes:
                    self.envelopes_out += 1
                    self.frames_out += batch.nframes
                # Let local work run between envelopes of a long replay.
                if self.envelopes_out % 64 == 0:
                    await asyncio.sleep(0)
            if outbox and outbox.next_expiry < float("inf"):
                # Wake for the age bound even if nothing else happens (one timer at a time).
                self._wake_at(outbox.next_expiry + 0.001)

    def _held(self) -> bool:
        since = self._hold_since
        if since is None:
            return False
        if all(p.seen > since for p in self._peers.values() if not p.gone):
            self._hold_since = None
            return False
        end = since + self.config.dead_after
        if self._loop.time() >= end:
            self._hold_since = None
            logger.warning(
                "cluster %s: some nodes not heard from since the reconnection; replaying anyway",
                self.config.name,
            )
            return False
        self._wake_at(end)
        return True

    def _wake_at(self, when: float) -> None:
        handle = self._wake_handle
        if handle is not None and not handle.cancelled() and handle.when() <= when:
            return  # an earlier wake is already armed
        if handle is not None:
            handle.cancel()
        self._wake_handle = self._loop.call_at(when, self._wake.set)

    def _subject(self, stream: str) -> str:
        if stream[:1] == "\x00":
            return stream[1:]  # a reply or a heartbeat: the subject itself
        if stream == _ALL:
            return f"{self.prefix}.all"
        return f"{self.prefix}.g.{group_token(stream)}"

    # --- receiving ------------------------------------------------------------------------------

    # The subscription callbacks below must never await: nats-py hands each subscription's
    # messages over in order, and the tail-loss check and the snapshot's "no gap" rest on a
    # callback finishing its envelope before the next message of any subscription is handled.
    async def _on_all(self, msg: Any) -> None:
        data: bytes = msg.data
        if data[:4] == _PROBE_MAGIC:
            self._on_probe(data)
            return
        try:
            env = decode(data, kinds=_ALL_KINDS, copy=False)
        except EnvelopeError as exc:
            self._malformed(msg.subject, exc)
            return
        if not self._plausible(_ALL, env.node, env.epoch, env.seq):
            return
        verdict = self._tracker.accept(_ALL, env.node, env.epoch, env.seq)
        if verdict < 0:
            return
        if verdict:
            self._gap(_ALL, env.node, verdict)
        self._count_in(env.node, len(env.frames))
        server = self.server
        if server._batch_relays:
            server.fanout(data[_HEAD:], None, len(env.frames))
        else:
            for frame in env.frames:
                server.fanout(bytes(frame))

    async def _on_group(self, msg: Any) -> None:
        gs = self._by_subject.get(msg.subject)
        if gs is None:
            return  # unsubscribed meanwhile
        buffer = gs.buffer
        if buffer is not None:
            data: bytes = msg.data
            buffer.append(data)
            gs.buffered += len(data)
            # Bounded like the outbox: past it the oldest go, and the gap they leave is counted
            # (and the group fetched again from their node) when the buffer is replayed.
            cap = self._buffer_cap
            while gs.buffered > cap and len(buffer) > 1:
                old = buffer.popleft()
                gs.buffered -= len(old)
                self._note_dropped(gs, old, cap)
            return
        self._group_envelope(gs, msg.data)

    def _note_dropped(self, gs: _GroupSub, data: bytes, cap: int) -> None:
        """Remember an envelope dropped from ``gs``'s full buffer; whether it is lost is known
        only once the snapshot says what it covers (:meth:`_count_dropped`)."""
        if len(data) < _HEAD:
            return  # malformed anyway: it would have been dropped and counted on replay
        _, _, _, node, epoch, seq, _ = ENVELOPE_HEAD.unpack_from(data)
        run = gs.dropped.get((node, epoch))
        if run is None:
            run = gs.dropped[(node, epoch)] = [seq, seq, 0]
        run[1] = seq
        run[2] += 1
        pending = sum(r[2] for r in gs.dropped.values())
        if pending & (pending - 1) == 0:
            logger.warning(
                "cluster %s: group %r waits for its first member here; %d envelopes over the "
                "%d-byte buffer dropped so far (those the snapshot does not cover are counted "
                "as gaps when it opens)",
                self.config.name,
                gs.name,
                pending,
                cap,
            )

    def _count_dropped(self, gs: _GroupSub) -> None:
        """Count, in ``buffer_dropped``, the dropped envelopes the snapshot did not cover: the
        ones the group's members here will never see (the replay counts the same as gaps)."""
        self.buffer_dropped += _uncovered(gs.dropped, gs.covered)
        gs.dropped.clear()

    def _group_envelope(self, gs: _GroupSub, data: bytes) -> None:
        try:
            env = decode(data, kinds=_GROUP_KINDS, copy=False)
        except EnvelopeError as exc:
            self._malformed(gs.subject, exc)
            return
        covered = gs.covered.get(env.node)
        if covered is not None and env.epoch == covered[0] and env.seq < covered[1]:
            return  # the snapshot holds it already
        if not self._plausible(gs.name, env.node, env.epoch, env.seq):
            return
        verdict = self._tracker.accept(gs.name, env.node, env.epoch, env.seq)
        if verdict < 0:
            return
        if verdict:
            self._gap(gs.name, env.node, verdict)
            self._resync([gs.name], env.node)
        self._count_in(env.node, len(env.frames))
        group = gs.group
        if group is not None:
            self._deliver_group(gs, group, env.node, env.frames)

    def _deliver_group(
        self, gs: _GroupSub, group: Group[RemoteClient], node: int, frames: list[Any]
    ) -> None:
        """Hand GROUP_RELAY frames to the local members (with this node's group id) and apply
        PRESENCE frames (from ``node``) to the group's remote members."""
        server = self.server
        table = server._groups
        gid = _U32.pack(group.id)
        batch = server._batch_relays and group.last is None
        run: list[Any] = []
        n = 0
        for frame in frames:
            kind = frame[4]
            if kind == _GROUP_RELAY:
                if batch:
                    run += (frame[:9], gid, frame[13:])
                    n += 1
                    continue
                relay = b"".join((frame[:9], gid, frame[13:]))
                server.fanout(relay, to=group.members)
                if group.last is not None:
                    table.keep_last(group, _U32.unpack_from(frame, 5)[0], relay[13:16], relay)
                continue
            if run:
                server.fanout(b"".join(run), None, n, to=group.members)
                run = []
                n = 0
            try:
                notice = PresenceNotice.parse(frame[5:])
            except Exception as exc:
                self._malformed(group.name, exc)
                continue
            if notice.event == PresenceEvent.JOINED:
                # A node never heard from is noted: if it never sends a heartbeat, it is declared
                # gone after dead_after, and its members with it.
                if node in self._peers or self._note_peer(
                    node, notice.client_id >> NODE_ID_BITS, 0
                ):
                    self._add_member(gs, group, notice.client_id, node, tell=True)
            elif gs.owner.get(notice.client_id) == node:
                self._remove_member(gs, group, notice.client_id, notice.reason)
        if run:
            server.fanout(b"".join(run), None, n, to=group.members)

    def _add_member(
        self, gs: _GroupSub, group: Group[RemoteClient], cid: int, node: int, *, tell: bool
    ) -> None:
        old = gs.owner.get(cid)
        if old is not None and old != node:
            # The id was another node's client (a node restarted with its index reuses ids):
            # that client is gone.
            self._remove_member(gs, group, cid, int(DisconnectReason.CONNECTION_LOST))
        gs.owner[cid] = node
        if self.server._groups.add_remote(group, cid) and tell:
            self.server._presence(group, PresenceEvent.JOINED, cid, 0)

    def _remove_member(
        self, gs: _GroupSub, group: Group[RemoteClient], cid: int, reason: int
    ) -> bool:
        gs.owner.pop(cid, None)
        if self.server._groups.remove_remote(group, cid):
            self.server._presence(group, PresenceEvent.LEFT, cid, reason)
            return True
        return False

    def _count_in(self, node: int, frames: int) -> None:
        self.envelopes_in += 1
        self.frames_in += frames
        peer = self._peers.get(node)
        if peer is not None:
            peer.seen = self._loop.time()

    def _gap(self, stream: str, node: int, missed: int) -> None:
        logger.warning(
            "cluster %s: %d envelopes of stream %r from node %x lost in NATS (%d in all)",
            self.config.name,
            missed,
            stream,
            node,
            self._tracker.total.missed,
            extra={"event": "cluster-gap", "node": node, "missed": missed},
        )

    def _malformed(self, where: str, exc: Exception) -> None:
        self.malformed_in += 1
        logger.warning(
            "cluster %s: malformed message on %s dropped: %s", self.config.name, where, exc
        )

    # --- groups ---------------------------------------------------------------------------------

    def is_ready(self, name: str) -> bool:
        """Whether a join of ``name`` can be answered now (the group's snapshot is in)."""
        gs = self._groups.get(name)
        return gs is not None and gs.ready.done()

    async def prepare(self, name: str) -> None:
        """Subscribe to ``name``'s subject and fetch its snapshot (at most snapshot_timeout)."""
        gs = self._groups.get(name)
        if gs is None:
            gs = self._open_sub(name)
        await asyncio.shield(gs.ready)

    def _open_sub(self, name: str) -> _GroupSub:
        gs = _GroupSub(name, f"{self.prefix}.g.{group_token(name)}")
        self._groups[name] = gs
        self._by_subject[gs.subject] = gs
        self._spawn(self._fetch(gs))
        return gs

    async def _fetch(self, gs: _GroupSub) -> None:
        try:
            nc = self._nc
            if nc is not None and nc.is_connected:
                try:
                    await self._ensure_sub(gs)
                    if self._groups.get(gs.name) is not gs:
                        return  # closed meanwhile
                    # The subscription is known to the server before anyone answers the request
                    # (one connection, in order): every envelope after a reply's position
                    # reaches the buffer.
                    snap = await self._request([gs.name], None)
                except Exception as exc:
                    logger.warning(
                        "cluster %s: snapshot of %r failed: %s",
                        self.config.name,
                        gs.name,
                        _why(exc),
                    )
                    snap = None
                if snap is not None:
                    self._positions(gs, snap)
                    if gs.group is None:
                        gs.snapshot = snap  # applied when the first member is admitted
                    else:
                        self._apply(gs, snap, initial=True, late=True)
        finally:
            if not gs.ready.done():
                gs.ready.set_result(None)
            if self._groups.get(gs.name) is gs:
                if gs.group is None:
                    # The joiner is admitted next; if it went away, drop this after a while.
                    gs.unused = self._loop.call_later(
                        self.config.snapshot_timeout, self._drop_unused, gs
                    )
                else:
                    self._loop.call_soon(self._replay, gs)

    def _replay(self, gs: _GroupSub) -> None:
        """Deliver the envelopes that arrived while the snapshot was fetched, then go live."""
        if gs.buffer is None or gs.group is None or self._groups.get(gs.name) is not gs:
            return
        buffer = gs.buffer
        gs.buffer = None
        gs.buffered = 0
        self._count_dropped(gs)
        for data in buffer or ():
            self._group_envelope(gs, data)

    def _drop_unused(self, gs: _GroupSub) -> None:
        if gs.group is None and self._groups.get(gs.name) is gs:
            self._close_sub(gs)

    def group_opened(self, group: Group[RemoteClient]) -> None:
        """The server created ``group`` for its first local member."""
        gs = self._groups.get(group.name)
        if gs is None:
            gs = self._open_sub(group.name)  # server.join() does not wait for the snapshot
        if gs.unused is not None:
            gs.unused.cancel()
            gs.unused = None
        gs.group = group
        snap = gs.snapshot
        if snap is not None:
            gs.snapshot = None
            self._apply(gs, snap, initial=True, late=False)
        if gs.ready.done():
            # After the joiner's REPLY and last values (queued by the server right after this).
            self._loop.call_soon(self._replay, gs)

    def group_closed(self, group: Group[RemoteClient]) -> None:
        """The last local member of ``group`` left: stop following its subject."""
        gs = self._groups.get(group.name)
        if gs is not None and gs.group is group:
            self._close_sub(gs)
        self._batcher.retire(group.name)

    def _close_sub(self, gs: _GroupSub) -> None:
        del self._groups[gs.name]
        self._by_subject.pop(gs.subject, None)
        self._tracker.forget_stream(gs.name)
        if gs.unused is not None:
            gs.unused.cancel()
        sub = gs.sub
        if sub is not None:
            self._spawn(_unsubscribe(sub))

    def member_event(
        self, group: Group[RemoteClient], event: PresenceEvent, client_id: int, reason: int
    ) -> None:
        """Tell the other nodes that a local client joined or left ``group``."""
        self.publish(group.name, PresenceNotice(group.id, event, client_id, reason).encode(), 1)

    # --- snapshots ------------------------------------------------------------------------------

    async def _request(self, names: list[str], target: int | None) -> _Snapshot | None:
        """Ask every live node (or ``target``) for ``names``' members, last values and stream
        positions; return the replies when all expected nodes answered or at the deadline."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return None
        if target is None:
            expected = {p.node for p in self._peers.values() if not p.gone}
        else:
            expected = {target}
        self.snapshots += 1
        if not expected:
            return _Snapshot(set())
        self._next_request += 1
        rid = f"r{self._next_request}"
        snap = self._snapshots[rid] = _Snapshot(expected)
        reply = f"{self.prefix}.n.{self.node_id:x}.{rid}"
        body = json.dumps({"v": 1, "from": self.node_id, "groups": names}).encode()
        subject = (
            f"{self.prefix}.ctl.snap" if target is None else f"{self.prefix}.n.{target:x}.snap"
        )
        try:
            await nc.publish(subject, body, reply=reply)
            await asyncio.wait_for(asyncio.shield(snap.done), self.config.snapshot_timeout)
        except TimeoutError:
            missing = snap.expected - set(snap.sections)
            self.snapshot_timeouts += 1
            logger.warning(
                "cluster %s: no snapshot of %s from node(s) %s within %.2f s; going on without",
                self.config.name,
                names if len(names) < 4 else f"{len(names)} groups",
                ", ".join(f"{n:x}" for n in missing),
                self.config.snapshot_timeout,
                extra={"event": "cluster-snapshot-timeout"},
            )
        except Exception as exc:
            logger.warning("cluster %s: snapshot request failed: %s", self.config.name, _why(exc))
        finally:
            self._snapshots.pop(rid, None)
        return snap

    def _resync(self, names: list[str], target: int | None) -> None:
        """Fetch ``names`` again (after a gap, a reconnection or a returning node) and merge."""
        if not names or self._closing:
            return
        self.resyncs += 1

        async def run() -> None:
            for i in range(0, len(names), 256):
                part = names[i : i + 256]
                snap = await self._request(part, target)
                if snap is None:
                    return
                for name in part:
                    gs = self._groups.get(name)
                    if gs is not None and gs.group is not None:
                        self._apply(gs, snap, initial=False, late=True)

        self._spawn(run())

    def _positions(self, gs: _GroupSub, snap: _Snapshot) -> None:
        """The group's first fetch: the envelopes before each node's position are in it."""
        for node, sections in snap.sections.items():
            section = sections.get(gs.name)
            if section is None:
                continue
            if section.position is not None:
                epoch, nxt = section.position
                gs.covered[node] = (epoch, nxt)
                self._tracker.expect(gs.name, node, epoch, nxt)
            elif section.epoch is not None:
                # It never published there: its first envelope will be seq 0.
                self._tracker.expect(gs.name, node, section.epoch, 0)

    def _apply(self, gs: _GroupSub, snap: _Snapshot, *, initial: bool, late: bool) -> None:
        """Merge what the nodes said of ``gs``'s group into it: members and last values.

        ``initial``: the group's first fetch. Otherwise (a resync) a node's part is taken only
        when it is not older than what the live stream already brought, and the differences
        are told to the watchers. ``late``: local members are there already (placed by
        ``server.join`` before the snapshot came): they get the last values now.
        """
        server = self.server
        table = server._groups
        group = gs.group
        if group is None:
            return
        handout: list[bytes] = []  # last values new to the members here, if ``late``
        for node, sections in snap.sections.items():
            section = sections.get(gs.name)
            if section is None:
                continue
            pos = section.position
            if not initial:
                known = self._tracker.expected(gs.name, node)
                if known is not None and pos is not None and (pos[0], pos[1]) < known:
                    continue
            if not initial:
                for cid in [c for c, o in gs.owner.items() if o == node]:
                    if cid not in section.members:
                        self._remove_member(gs, group, cid, 0)
            for cid in section.members:
                self._add_member(gs, group, cid, node, tell=not initial)
            gid = _U32.pack(group.id)
            last = group.last
            if last is None:
                continue  # this node keeps no last values for the group
            for frame in section.frames:
                relay = b"".join((frame[:9], gid, frame[13:]))
                key = (_U32.unpack_from(relay, 5)[0], relay[13:16])
                if last.get(key) == relay:
                    continue  # known already (a resync): not handed out twice
                table.keep_last(group, key[0], key[1], relay)
                if late:
                    handout.append(relay)
        if handout:
            self._hand_out(group, handout)

    def _hand_out(self, group: Group[RemoteClient], values: list[bytes]) -> None:
        """Queue for the group's members here the last values the snapshot brought, as for a
        late joiner (Server._last_values_for: the newest that fit, the others counted and
        logged; all kept for later joiners)."""
        server = self.server
        for member in list(group.members.values()):
            for relay in server._last_values_for(member, group, values):
                member._queue(relay)

    async def _on_snap_request(self, msg: Any) -> None:
        await self._answer_snapshot(msg)

    async def _on_direct(self, msg: Any) -> None:
        tail = msg.subject.rsplit(".", 1)[-1]
        if tail == "snap":
            await self._answer_snapshot(msg)
        elif tail.startswith("r"):
            self._on_snap_reply(tail, msg.data)

    async def _answer_snapshot(self, msg: Any) -> None:
        try:
            request = json.loads(msg.data)
            names = [str(n) for n in request["groups"]][:256]
            asker = int(request["from"])
        except Exception as exc:
            self._malformed(msg.subject, exc)
            return
        if asker == self.node_id or not msg.reply:
            return
        if not str(msg.reply).startswith(f"{self.prefix}.n."):
            # Replies go to a node's own subjects only: never onto .all or a group.
            self._malformed(msg.subject, ValueError(f"reply subject {msg.reply!r}"))
            return
        self._flush()  # positions must cover every frame sealed so far
        sections: list[tuple[dict[str, Any], list[bytes]]] = []
        table = self.server._groups
        for name in names:
            group = table.by_name.get(name)
            pos = self._batcher.position(name)
            entry: dict[str, Any] = {
                "name": name,
                "members": [] if group is None else list(group.members),
                "pos": None if pos is None else list(pos),
            }
            frames = [] if group is None or not group.last else list(group.last.values())
            sections.append((entry, frames))
        # Replies go after what the outbox holds, so that each position is already sent.
        parts, skipped = _parts(self.node_id, self.index, self.epoch, sections)
        if skipped:
            self.snapshot_values_skipped += skipped
            logger.warning(
                "cluster %s: %d last values over %d bytes left out of a snapshot",
                self.config.name,
                skipped,
                _SNAP_FRAME_MAX,
            )
        for part in parts:
            self._reply_later(msg.reply, part)

    def _reply_later(self, subject: str, data: bytes) -> None:
        # A reply rides in the outbox as a one-off stream so it follows the envelopes it
        # covers; its stream is retired at once (never a seq gap for anyone).
        self._outbox.push(Batch("\x00" + subject, 0, 0, data), self._loop.time())
        self._wake.set()

    def _on_snap_reply(self, rid: str, data: bytes) -> None:
        snap = self._snapshots.get(rid)
        if snap is None:
            return  # late: the request timed out
        try:
            magic, size = _SNAP_HEAD.unpack_from(data)
            if magic != _SNAP_MAGIC:
                raise ValueError("bad magic")
            head = json.loads(data[8 : 8 + size])
            node = int(head["node"])
            parts = int(head["parts"])
            if node not in snap.expected:
                raise ValueError(f"a reply from node {node:x}, which was not asked")
            frames = split_frames(memoryview(data), 8 + size, None, kinds=frozenset({_GROUP_RELAY}))
            sections = snap.sections.setdefault(node, {})
            at = 0
            for entry in head["groups"]:
                name = str(entry["name"])
                section = sections.setdefault(name, _Section())
                section.members.update(int(c) for c in entry["members"])
                section.epoch = int(head["epoch"])
                if entry.get("pos") is not None:
                    section.position = (int(entry["pos"][0]), int(entry["pos"][1]))
                k = int(entry["frames"])
                section.frames.extend(bytes(f) for f in frames[at : at + k])
                at += k
        except Exception as exc:
            self._malformed(f"snapshot reply {rid}", exc)
            return
        left = snap.parts.get(node, parts) - 1
        snap.parts[node] = left
        if left <= 0 and snap.expected <= {n for n, k in snap.parts.items() if k <= 0}:
            if not snap.done.done():
                snap.done.set_result(None)

    # --- heartbeats, node liveness --------------------------------------------------------------

    async def _heartbeats(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self._check_peers()
            self._publish_heartbeat()
            self._check_probe()
            self._log_drops(self._loop.time())  # the last ones of a burst

    def _heartbeat_body(self) -> bytes:
        positions: dict[str, list[int]] = {}
        pos = self._batcher.position(_ALL)
        if pos is not None:
            positions[_ALL] = list(pos)
        for stream in list(self._changed)[:_HB_STREAMS]:
            if stream != _ALL:
                p = self._batcher.position(stream)
                if p is not None:
                    positions[stream] = list(p)
        self._changed.clear()
        return json.dumps(
            {
                "v": 1,
                "node": self.node_id,
                "index": self.index,
                "epoch": self.epoch,
                "pos": positions,
            }
        ).encode()

    def _publish_heartbeat(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        self._flush()
        # Straight out, even while envelopes wait (after a reconnection the others wait for it):
        # so it announces stream positions only when every envelope they count is sent already.
        body = self._heartbeat_body() if not self._outbox else self._who_body()
        self._spawn(_publish(nc, f"{self.prefix}.ctl.hb", body))

    def _heartbeat_of(self, data: bytes) -> dict[str, Any] | None:
        try:
            beat = json.loads(data)
            if not isinstance(beat, dict) or beat.get("v") != 1:
                raise ValueError("not a version 1 heartbeat")
            int(beat["node"]), int(beat["index"]), int(beat["epoch"])
            return beat
        except Exception as exc:
            self._malformed("heartbeat", exc)
            return None

    async def _on_who(self, msg: Any) -> None:
        if msg.reply and self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, self._who_body())

    def _who_body(self) -> bytes:
        # "pos" null: this says nothing of the streams (a full heartbeat's dict does).
        return json.dumps(
            {"v": 1, "node": self.node_id, "index": self.index, "epoch": self.epoch, "pos": None}
        ).encode()

    async def _on_heartbeat(self, msg: Any) -> None:
        beat = self._heartbeat_of(msg.data)
        if beat is None:
            return
        node = int(beat["node"])
        if node == self.node_id:
            return
        now = self._loop.time()
        peer = self._peers.get(node)
        index = int(beat["index"])
        if peer is None or peer.gone:
            returned = peer is not None
            if returned:
                peer = self._peers[node] = _Peer(node, index, int(beat["epoch"]), now)
            else:
                peer = self._note_peer(node, index, int(beat["epoch"]))
                if peer is None:
                    return  # too many nodes heard of: ignored (logged once per prune)
            if returned:
                self.nodes_returned += 1
                logger.warning(
                    "cluster %s: node %x (index %d) is back; fetching its groups again",
                    self.config.name,
                    node,
                    index,
                    extra={"event": "cluster-node-back", "node": node},
                )
                self._resync([n for n, g in self._groups.items() if g.group is not None], node)
            else:
                logger.info(
                    "cluster %s: node %x (index %d) joined",
                    self.config.name,
                    node,
                    index,
                    extra={"event": "cluster-node", "node": node},
                )
            if index == self.index:
                self.index_conflicts += 1
                logger.error(
                    "cluster %s: node %x has this node's index %d: client ids may clash; give "
                    "each node its own --node-index",
                    self.config.name,
                    node,
                    index,
                )
        peer.index = index
        peer.seen = now
        if self._hold_since is not None:
            self._wake.set()
        # Tail loss: what it claimed a heartbeat ago must have arrived by now.
        for stream, (epoch, nxt) in peer.claimed.items():
            if stream != _ALL:
                gs = self._groups.get(stream)
                if gs is None or gs.buffer is not None:
                    continue  # not followed, or still buffering behind its snapshot
            if not self._plausible(stream, node, epoch, nxt - 1):
                continue
            missed = self._tracker.lost_tail(stream, node, epoch, nxt)
            if missed:
                self.tail_missed += missed
                self._gap(stream, node, missed)
                if stream != _ALL:
                    self._resync([stream], node)
        positions = beat.get("pos")
        if not isinstance(positions, dict):
            positions = None
        if (
            isinstance(positions, dict)
            and _ALL not in positions
            and self._tracker.expected(_ALL, node) is None
        ):
            # It has sent nothing to everyone yet: its first such envelope is seq 0, and if
            # a later one comes first, the ones before it were lost (counted).
            self._tracker.expect(_ALL, node, int(beat["epoch"]), 0)
        claimed: dict[str, tuple[int, int]] = {}
        for stream, value in dict(positions or {}).items():
            with contextlib.suppress(Exception):
                claimed[str(stream)] = (int(value[0]), int(value[1]))
        peer.claimed = claimed

    def _plausible(self, stream: str, node: int, epoch: int, seq: int) -> bool:
        """Whether (epoch, seq) from ``node`` can be real. Any NATS client can publish on the
        cluster's subjects: a forged huge seq or epoch would make every later real envelope of
        that node look like a duplicate or stale. Such a message is refused (``malformed_in``)."""
        if epoch > time.time_ns() + _MAX_CLOCK_AHEAD:
            self._malformed(
                stream, ValueError(f"epoch {epoch} from node {node:x} is in the future")
            )
            return False
        known = self._tracker.expected(stream, node)
        if known is not None and epoch == known[0] and seq - known[1] > _MAX_JUMP:
            self._malformed(
                stream, ValueError(f"seq {seq} from node {node:x} jumps past {known[1]}")
            )
            return False
        return True

    def _check_peers(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # cut off from NATS, this node hears nobody: that says nothing of them
        now = self._loop.time()
        limit = self.config.dead_after
        since = self._connected_since
        for peer in list(self._peers.values()):
            if not peer.gone and now - max(peer.seen, since) > limit:
                self._node_gone(peer)

    def _node_gone(self, peer: _Peer) -> None:
        peer.gone = True
        self.nodes_lost += 1
        # Its sequence expectations stay until it is pruned: a node that comes back with the
        # same epoch (cut off from NATS for longer than dead_after) resumes its counters, and
        # what it could not send meanwhile (its outbox's drops) shows here as gaps.
        removed = 0
        for gs in self._groups.values():
            group = gs.group
            gs.covered.pop(peer.node, None)
            if group is None:
                continue
            for cid in [c for c, o in gs.owner.items() if o == peer.node]:
                if self._remove_member(gs, group, cid, int(DisconnectReason.CONNECTION_LOST)):
                    removed += 1
        logger.warning(
            "cluster %s: node %x (index %d) silent for %.1f s: gone; %d memberships of its "
            "clients removed",
            self.config.name,
            peer.node,
            peer.index,
            self.config.dead_after,
            removed,
            extra={"event": "cluster-node-gone", "node": peer.node, "removed": removed},
        )

    # --- the deaf-subscription probe ------------------------------------------------------------

    def _check_probe(self) -> None:
        """Every probe_interval, send a probe to ourselves on the .all subject through a second
        connection; one not back within probe_timeout means the main one is deaf."""
        now = self._loop.time()
        if self._probe_due is not None:
            return
        if now - self._last_probe < self.config.probe_interval:
            return
        self._last_probe = now
        if self._nc is None or not self._nc.is_connected:
            return
        self._probe_due = now
        self._spawn(self._probe())

    async def _probe(self) -> None:
        try:
            nc = self._probe_nc
            if nc is None or nc.is_closed:
                opts = {
                    k: v
                    for k, v in self.config.nats_options.items()
                    if k not in ("no_echo", "name")
                }

                async def quiet(exc: Exception) -> None:
                    logger.debug("cluster %s: probe connection: %s", self.config.name, _why(exc))

                nc = self._probe_nc = await _bounded_connect(
                    {
                        "servers": list(self.config.urls),
                        "error_cb": quiet,
                        "name": f"trame-{self.config.name}-{self.node_id:x}-probe",
                        "connect_timeout": self.config.connect_timeout,
                        "reconnect_time_wait": self.config.reconnect_wait,
                        "max_reconnect_attempts": -1,
                        **opts,
                    },
                    self.config,
                )
            if not nc.is_connected:
                return
            self._probe_seq += 1
            self._probe_back.clear()
            self.probes += 1
            await nc.publish(
                f"{self.prefix}.all", _PROBE.pack(_PROBE_MAGIC, self.node_id, self._probe_seq)
            )
            try:
                await asyncio.wait_for(self._probe_back.wait(), self.config.probe_timeout)
            except TimeoutError:
                main = self._nc
                if main is None or not main.is_connected or not nc.is_connected:
                    return  # an outage, not deafness: the reconnection handles it
                self.deaf += 1
                logger.error(
                    "cluster %s: probe not back within %.2f s although NATS is connected: deaf "
                    "subscription; rebuilding the connection",
                    self.config.name,
                    self.config.probe_timeout,
                    extra={"event": "cluster-deaf"},
                )
                await self._rebuild()
        except Exception as exc:
            logger.warning("cluster %s: probe failed: %s", self.config.name, _why(exc))
        finally:
            self._probe_due = None

    def _on_probe(self, data: bytes) -> None:
        try:
            _, node, seq = _PROBE.unpack(data)
        except struct.error:
            return
        if node == self.node_id and seq == self._probe_seq:
            self._probe_back.set()

    async def _rebuild(self) -> None:
        """Replace the main connection (every subscription anew); fetch the groups again."""
        self.rebuilds += 1
        self.state = "rebuilding"
        try:
            nc = await self._connect()
        except Exception as exc:
            logger.warning("cluster %s: rebuild failed: %s", self.config.name, _why(exc))
            self.state = (
                "connected" if self._nc is not None and self._nc.is_connected else "disconnected"
            )
            return
        await self._attach(nc)
        self._resync([n for n, g in self._groups.items() if g.group is not None], None)

    # --- stats ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Return the node's counters and gauges (JSON-ready)."""
        gaps = self._tracker.total.as_dict()
        drops = self._outbox.dropped.as_dict()
        return {
            "name": self.config.name,
            "node": f"{self.node_id:x}",
            "index": self.index,
            "state": self.state,
            "nodes": sum(1 for p in self._peers.values() if not p.gone),
            "nodes_lost": self.nodes_lost,
            "nodes_returned": self.nodes_returned,
            "groups_followed": len(self._groups),
            "envelopes_out": self.envelopes_out,
            "frames_out": self.frames_out,
            "envelopes_in": self.envelopes_in,
            "frames_in": self.frames_in,
            "outbox_envelopes": len(self._outbox),
            "outbox_bytes": self._outbox.size,
            "outbox_dropped_envelopes": self._outbox.dropped.envelopes,
            "outbox_dropped_frames": self._outbox.dropped.frames,
            "outbox_dropped": drops,
            "oversize_dropped": self._batcher.oversize_dropped,
            "missed": gaps["missed"],
            "gaps": gaps["gaps"],
            "tail_missed": self.tail_missed,
            "duplicates": gaps["duplicates"],
            "stale": gaps["stale"],
            "malformed_in": self.malformed_in,
            "snapshots": self.snapshots,
            "snapshot_timeouts": self.snapshot_timeouts,
            "resyncs": self.resyncs,
            "probes": self.probes,
            "deaf": self.deaf,
            "rebuilds": self.rebuilds,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "index_conflicts": self.index_conflicts,
            "nats_errors": self.nats_errors,
            "publish_errors": self.publish_errors,
            "publish_dropped_frames": self.publish_dropped_frames,
            "shutdown_dropped_frames": self.shutdown_dropped_frames,
            "snapshot_values_skipped": self.snapshot_values_skipped,
            "buffer_dropped": self.buffer_dropped,
            "peers_refused": self.peers_refused,
        }


def _uncovered(
    dropped: dict[tuple[int, int], list[int]], covered: dict[int, tuple[int, int]]
) -> int:
    """How many of the ``dropped`` envelopes ((node, epoch) -> [first seq, last seq, count]) a
    snapshot's positions (node -> (epoch, next seq)) do not cover: those are lost."""
    lost = 0
    for (node, epoch), (first, last, count) in dropped.items():
        position = covered.get(node)
        if position is not None:
            if position[0] > epoch:
                continue  # an older life of that stream: the snapshot came after all of it
            if position[0] == epoch:
                count = min(count, max(0, last + 1 - max(first, position[1])))
        lost += count
    return lost


def _parts(
    node: int, index: int, epoch: int, sections: list[tuple[dict[str, Any], list[bytes]]]
) -> tuple[list[bytes], int]:
    """Pack snapshot sections into reply messages of about _SNAP_PART bytes each (member lists
    split too), so that none passes NATS's max_payload; return them and how many last values
    were too big to send (over _SNAP_FRAME_MAX)."""
    parts: list[tuple[list[dict[str, Any]], list[bytes]]] = [([], [])]
    size = 0
    skipped = 0

    def room(n: int) -> bool:
        """Count ``n`` bytes; true when they start a new part."""
        nonlocal size
        new = size + n > _SNAP_PART and bool(parts[-1][0] or parts[-1][1])
        if new:
            parts.append(([], []))
            size = 0
        size += n
        return new

    for entry, frames in sections:
        members = entry["members"]
        chunks = [members[i : i + _SNAP_MEMBERS] for i in range(0, len(members), _SNAP_MEMBERS)]
        head: dict[str, Any] = {}
        for chunk in chunks or [[]]:
            room(64 + 4 * len(entry["name"]) + 11 * len(chunk))
            head = dict(entry, members=chunk, frames=0)
            parts[-1][0].append(head)
        for frame in frames:
            if len(frame) > _SNAP_FRAME_MAX:
                skipped += 1
                continue
            if room(len(frame)):
                head = dict(entry, members=[], frames=0)
                parts[-1][0].append(head)
            parts[-1][1].append(frame)
            head["frames"] += 1
    out = []
    for groups, frames in parts:
        head_json = json.dumps(
            {"node": node, "index": index, "epoch": epoch, "parts": len(parts), "groups": groups}
        ).encode()
        out.append(b"".join([_SNAP_HEAD.pack(_SNAP_MAGIC, len(head_json)), head_json, *frames]))
    return out, skipped


async def _bounded_connect(options: dict[str, Any], config: ClusterConfig) -> Any:
    """``nats.connect`` that gives up after one round of the servers: with reconnection on for
    ever, nats-py's own first connect would never return while NATS is down."""
    from nats.aio.client import Client

    nc = Client()
    limit = (config.connect_timeout + config.reconnect_wait) * (len(config.urls) + 1)
    try:
        await asyncio.wait_for(nc.connect(**options), limit)
    except BaseException:
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    return nc


async def _publish(nc: Any, subject: str, data: bytes) -> None:
    with contextlib.suppress(Exception):
        await nc.publish(subject, data)


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
