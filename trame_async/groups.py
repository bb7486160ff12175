"""Multicast groups on the server: names, ids, members, presence and last values (no asyncio).

Theory of operation
-------------------
A :class:`GroupTable` holds every group of one server. A group exists while it has members: it
is created by its first join, gets an id then (a u32, never the id of another live group), and is
forgotten when its last member leaves. Members are opaque objects keyed by their client id; the
server keeps, for each client, the groups it is in (:meth:`GroupTable.join` and
:meth:`GroupTable.leave` return what changed, the caller does the I/O).

Each group may keep *last values*: the newest frame per (sender, trame code), in the order they
last changed, bounded in count and bytes (the oldest goes first, counted in
:attr:`GroupTable.last_values_dropped`). A sender's entries go when it leaves the group. A new
member is handed them before any live frame, so that it sees the current state at once.

The last values of all groups together are bounded too (``last_values_total_max_bytes``): many
clients each filling the groups they may join cannot grow the server without limit. Past it, the
values that changed least recently, whatever their group, go first (counted the same way). One
ordered dictionary of every kept value, moved to its end when it changes, gives that order in
O(1) per stored value; it holds nothing a group does not hold.

Everything here is plain data and O(1) per call, but for :meth:`GroupTable.members_after` (a
sorted view, cached until the membership changes) and a leave from a group that keeps last
values (a scan of that group's entries, at most ``last_values_max_count``).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Accept", "Group", "GroupLimits", "GroupTable", "Refuse", "newest_that_fit"]

_M = TypeVar("_M")
_MAX_ID = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class GroupLimits:
    """The group settings of a server (see ServerConfig)."""

    max_groups_per_client: int = 64
    max_groups: int = 100_000
    max_group_name_length: int = 64
    max_presence_members: int = 10_000
    last_value_groups: tuple[str, ...] = ()
    last_values_max_count: int = 1024
    last_values_max_bytes: int = 1 << 20
    last_values_total_max_bytes: int = 256 << 20


class Group(Generic[_M]):
    """One live group: its id, name, members (client id -> member) and presence subscribers."""

    __slots__ = ("_sorted", "id", "last", "last_bytes", "members", "name", "presence", "remote")

    def __init__(self, group_id: int, name: str, last_values: bool) -> None:
        self.id = group_id
        self.name = name
        #: client id -> member, in joining order.
        self.members: dict[int, _M] = {}
        #: Client ids of the members that asked for presence events.
        self.presence: set[int] = set()
        #: Client ids of the members on other nodes of a cluster (kept while local ones exist).
        self.remote: set[int] = set()
        #: (sender id, trame code) -> newest frame, oldest change first; None: not kept.
        self.last: OrderedDict[tuple[int, bytes], bytes] | None = (
            OrderedDict() if last_values else None
        )
        self.last_bytes = 0
        self._sorted: list[int] | None = None

    def __repr__(self) -> str:
        return f"<Group {self.id} {self.name!r}: {len(self.members)} members>"


class GroupTable(Generic[_M]):
    """Every group of one server, by name and by id."""

    __slots__ = (
        "_last_order",
        "_next_id",
        "by_id",
        "by_name",
        "last_bytes",
        "last_values_dropped",
        "limits",
    )

    def __init__(self, limits: GroupLimits) -> None:
        """Make an empty table enforcing ``limits``."""
        self.limits = limits
        self.by_name: dict[str, Group[_M]] = {}
        self.by_id: dict[int, Group[_M]] = {}
        self._next_id = 0
        #: Last values evicted by the count or byte bounds since the start.
        self.last_values_dropped = 0
        #: Bytes of the last values of every live group.
        self.last_bytes = 0
        # Every kept value of every live group, least recently changed first:
        # (group id, sender, code) -> group.
        self._last_order: OrderedDict[tuple[int, int, bytes], Group[_M]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.by_name)

    def keeps_last_values(self, name: str) -> bool:
        """Whether a new group of this name keeps last values (``last_value_groups`` patterns)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.limits.last_value_groups)

    def join(
        self,
        client_id: int,
        member: _M,
        name: str,
        presence: bool,
        *,
        last_values: bool | None = None,
    ) -> tuple[Group[_M], bool]:
        """Add ``member`` to the group ``name`` (created if need be); return it and whether the
        member is new (False: it was in already, only its presence flag was updated).

        The caller checked the limits (:meth:`refusal`). ``last_values`` True or False decides
        for a group this join creates (None: the ``last_value_groups`` patterns).
        """
        group = self.by_name.get(name)
        if group is None:
            keep = self.keeps_last_values(name) if last_values is None else last_values
            group = Group(self._new_id(), name, keep)
            self.by_name[name] = group
            self.by_id[group.id] = group
        elif last_values and group.last is None:
            group.last = OrderedDict()
        new = client_id not in group.members
        if new:
            group.members[client_id] = member
            group._sorted = None
        if presence:
            group.presence.add(client_id)
        else:
            group.presence.discard(client_id)
        return group, new

    def leave(self, client_id: int, group: Group[_M]) -> bool:
        """Remove a member (and its last values); return whether the group was forgotten."""
        if group.members.pop(client_id, None) is None:
            return False
        group._sorted = None
        group.presence.discard(client_id)
        self.drop_sender(group, client_id)
        if group.members:
            return False
        del self.by_name[group.name]
        del self.by_id[group.id]
        last = group.last
        if last:
            for key in list(last):  # out of the server-wide order, and released
                self._forget(group, last, key)
        return True

    def drop_sender(self, group: Group[_M], sender: int) -> None:
        """Forget the last values of ``sender`` in ``group``."""
        last = group.last
        if last:
            for key in [k for k in last if k[0] == sender]:
                self._forget(group, last, key)

    def _forget(
        self, group: Group[_M], last: OrderedDict[tuple[int, bytes], bytes], key: tuple[int, bytes]
    ) -> None:
        n = len(last.pop(key))
        group.last_bytes -= n
        self.last_bytes -= n
        del self._last_order[(group.id, *key)]

    def add_remote(self, group: Group[_M], client_id: int) -> bool:
        """Note a member on another node; return whether it is new."""
        if client_id in group.remote or client_id in group.members:
            return False
        group.remote.add(client_id)
        group._sorted = None
        return True

    def remove_remote(self, group: Group[_M], client_id: int) -> bool:
        """Forget a member on another node, and its last values; return whether it was there."""
        if client_id not in group.remote:
            return False
        group.remote.discard(client_id)
        group._sorted = None
        self.drop_sender(group, client_id)
        return True

    def refusal(self, groups_of_client: int, group_name: str, presence: bool) -> str | None:
        """Return why a client in ``groups_of_client`` groups may not join ``group_name``
        (``"TOO_MANY_GROUPS"``, ``"SERVER_GROUP_LIMIT"``, ``"NOT_ALLOWED"``), or None."""
        limits = self.limits
        group = self.by_name.get(group_name)
        if groups_of_client >= limits.max_groups_per_client:
            return "TOO_MANY_GROUPS"
        if group is None and len(self.by_name) >= limits.max_groups:
            return "SERVER_GROUP_LIMIT"
        if presence and group is not None and len(group.members) >= limits.max_presence_members:
            return "NOT_ALLOWED"
        return None

    def keep_last(self, group: Group[_M], sender: int, code: bytes, frame: bytes) -> None:
        """Keep ``frame`` as the newest of (sender, code) in ``group``, within the bounds."""
        last = group.last
        if last is None or self.by_id.get(group.id) is not group:
            return  # a group forgotten meanwhile (its last member left in a hook) keeps nothing
        key = (sender, code)
        order = self._last_order
        where = (group.id, sender, code)
        old = last.pop(key, None)
        n = len(frame)
        if old is None:
            order[where] = group
        else:  # a replacement, the common case
            n -= len(old)
            order.move_to_end(where)
        last[key] = frame
        group.last_bytes += n
        self.last_bytes += n
        limits = self.limits
        while len(last) > 1 and (
            len(last) > limits.last_values_max_count
            or group.last_bytes > limits.last_values_max_bytes
        ):
            self._forget(group, last, next(iter(last)))
            self.last_values_dropped += 1
        # The server-wide bound: the values that changed least recently go, whatever their group
        # (the one just stored stays, as a group's newest does).
        while self.last_bytes > limits.last_values_total_max_bytes and len(order) > 1:
            (_, old_sender, old_code), old_group = next(iter(order.items()))
            old_last = old_group.last
            if old_last is None:
                break  # not reached: only groups that keep last values are in the order
            self._forget(old_group, old_last, (old_sender, old_code))
            self.last_values_dropped += 1

    def members_after(
        self, group: Group[_M], after: int, limit: int = 1024
    ) -> tuple[list[int], bool]:
        """Return up to ``limit`` member ids greater than ``after``, ascending, and whether more
        remain."""
        ids = group._sorted
        if ids is None:
            ids = group._sorted = sorted(group.members.keys() | group.remote)
        start = bisect.bisect_right(ids, after)
        page = ids[start : start + limit]
        return page, start + limit < len(ids)

    def _new_id(self) -> int:
        group_id = self._next_id
        for _ in range(len(self.by_id) + 1):
            group_id = group_id % _MAX_ID + 1
            if group_id not in self.by_id:
                break
        self._next_id = group_id
        return group_id


@dataclass(frozen=True, slots=True)
class Accept:
    """An ``on_join`` verdict: accept; ``last_values`` True or False decides whether a group
    this join creates keeps last values (None: the ``last_value_groups`` patterns decide)."""

    last_values: bool | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """An ``on_join`` verdict: refuse, telling the client ``reason`` (at most 255 bytes)."""

    reason: str = "refused by the server"


def newest_that_fit(frames: Sequence[bytes], room: int) -> int:
    """Return where the newest of ``frames`` (oldest first) that fit in ``room`` bytes start;
    the newest one is always in."""
    start = len(frames)
    while start > 0 and (start == len(frames) or room >= len(frames[start - 1])):
        start -= 1
        room -= len(frames[start])
    return start
