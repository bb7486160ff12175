"""The sans-I/O group table: names, ids, membership, presence, last values, limits.

A hypothesis state machine drives join/leave/multicast interleavings against a plain model.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trame_async.groups import GroupLimits, GroupTable, newest_that_fit
from trame_async.wire import check_group_name


@pytest.mark.parametrize(
    "raw",
    [b"", b"x" * 65, b"\xff\xfe", b"a\x00b", b"tab\there", b"   ", b"\x1b[31m", "a\u0085".encode()],
)
def test_bad_names_are_refused(raw: bytes) -> None:
    assert check_group_name(raw, 64) is None


@pytest.mark.parametrize("name", ["lobby", "match 12", "zone/3", "équipe", "x" * 64, "🤖"])
def test_good_names_pass(name: str) -> None:
    assert check_group_name(name.encode(), 64) == name


def test_a_group_lives_while_it_has_members() -> None:
    table: GroupTable[str] = GroupTable(GroupLimits())
    group, new = table.join(1, "a", "lobby", presence=False)
    assert new and group.id == 1 and table.by_name == {"lobby": group}
    again, new = table.join(1, "a", "lobby", presence=True)
    assert again is group and not new and group.presence == {1}
    table.join(2, "b", "lobby", presence=False)
    assert not table.leave(1, group)
    assert table.leave(2, group)  # the last member: forgotten
    assert table.by_name == {} and table.by_id == {}
    regrown, _ = table.join(3, "c", "lobby", presence=False)
    assert regrown.id == 2  # a new group of the same name, a new id


def test_ids_wrap_and_skip_live_groups() -> None:
    table: GroupTable[str] = GroupTable(GroupLimits())
    table.join(1, "a", "first", presence=False)  # id 1, stays
    table._next_id = 0xFFFF_FFFF - 1
    ids = [table.join(i, "m", f"g{i}", presence=False)[0].id for i in range(2, 5)]
    assert ids == [0xFFFF_FFFF, 2, 3]


def test_limits_give_each_its_reason() -> None:
    limits = GroupLimits(max_groups_per_client=2, max_groups=3, max_presence_members=2)
    table: GroupTable[str] = GroupTable(limits)
    assert table.refusal(2, "x", presence=False) == "TOO_MANY_GROUPS"
    for name in ("a", "b", "c"):
        table.join(1, "m", name, presence=False)
    assert table.refusal(0, "d", presence=False) == "SERVER_GROUP_LIMIT"
    assert table.refusal(0, "a", presence=False) is None  # an existing group: fine
    table.join(2, "m", "a", presence=False)
    assert table.refusal(0, "a", presence=True) == "NOT_ALLOWED"  # presence on a group of 2
    assert table.refusal(0, "a", presence=False) is None


def test_last_values_keep_the_newest_per_sender_and_code_within_bounds() -> None:
    limits = GroupLimits(last_value_groups=("zone/*",), last_values_max_count=3)
    table: GroupTable[str] = GroupTable(limits)
    group, _ = table.join(1, "a", "zone/1", presence=False)
    table.join(3, "c", "zone/1", presence=False)
    plain, _ = table.join(1, "a", "chat", presence=False)
    assert group.last is not None and plain.last is None
    table.keep_last(group, 1, b"POS", b"p1")
    table.keep_last(group, 2, b"POS", b"q1")
    table.keep_last(group, 1, b"POS", b"p2")  # replaces p1, moves to the end
    assert list(group.last.values()) == [b"q1", b"p2"]
    table.keep_last(group, 3, b"POS", b"r1")
    table.keep_last(group, 1, b"VEL", b"v1")  # a fourth entry: the oldest (q1) goes
    assert list(group.last.values()) == [b"p2", b"r1", b"v1"]
    assert table.last_values_dropped == 1
    table.leave(1, group)  # sender 1's entries go with it
    assert list(group.last.values()) == [b"r1"]
    assert group.last_bytes == table.last_bytes == 2
    table.leave(3, group)  # the last member: the group and its values go
    assert not group.last and table.last_bytes == 0 and not table._last_order


def test_last_values_byte_bound_keeps_at_least_the_newest() -> None:
    table: GroupTable[str] = GroupTable(
        GroupLimits(last_value_groups=("*",), last_values_max_bytes=10)
    )
    group, _ = table.join(1, "a", "g", presence=False)
    table.keep_last(group, 1, b"BIG", b"x" * 8)
    table.keep_last(group, 2, b"BIG", b"y" * 8)
    assert group.last is not None and list(group.last.values()) == [b"y" * 8]
    table.keep_last(group, 3, b"BIG", b"z" * 50)  # alone over the bound: still kept
    assert list(group.last.values()) == [b"z" * 50]


def test_last_values_of_all_groups_are_bounded_together() -> None:
    """Past last_values_total_max_bytes, the least recently changed values go, whatever their
    group; groups forgotten and values replaced cost nothing in the bound."""
    table: GroupTable[str] = GroupTable(
        GroupLimits(
            last_value_groups=("*",), last_values_max_bytes=30, last_values_total_max_bytes=40
        )
    )
    a, _ = table.join(1, "x", "a", presence=False)
    b, _ = table.join(2, "y", "b", presence=False)
    table.keep_last(a, 1, b"POS", b"a" * 10)
    table.keep_last(b, 2, b"POS", b"b" * 10)
    table.keep_last(a, 1, b"VEL", b"c" * 10)
    table.keep_last(b, 2, b"VEL", b"d" * 10)
    assert table.last_bytes == 40 and table.last_values_dropped == 0
    table.keep_last(b, 2, b"ACC", b"e" * 10)  # 50 bytes: a's POS, the oldest of all, goes
    assert a.last is not None and b.last is not None
    assert list(a.last.values()) == [b"c" * 10]
    assert list(b.last.values()) == [b"b" * 10, b"d" * 10, b"e" * 10]
    assert table.last_bytes == 40 and table.last_values_dropped == 1
    table.keep_last(a, 1, b"VEL", b"f" * 10)  # a replaced value: no growth, nothing goes
    assert table.last_bytes == 40 and table.last_values_dropped == 1
    table.leave(1, a)  # a forgotten: its bytes leave the bound
    assert table.last_bytes == 30
    assert not a.last  # and its values released
    for i in range(1000):  # the order holds one entry per kept value, no stale one
        table.keep_last(b, 2, b"POS", bytes([i % 256]) * 10)
    assert table.last_bytes == 30 and len(table._last_order) == 3
    # A value for a group forgotten meanwhile (a hook took its last member out) is not kept.
    table.keep_last(a, 1, b"POS", b"g" * 10)
    assert table.last_bytes == 30 and not a.last


def test_the_bound_on_all_groups_holds_what_it_counts_and_no_more() -> None:
    """Replaced and evicted values are released: what the table references is what it counts."""
    table: GroupTable[str] = GroupTable(
        GroupLimits(
            last_value_groups=("*",),
            last_values_max_count=100_000,
            last_values_max_bytes=1 << 20,
            last_values_total_max_bytes=1 << 20,
        )
    )
    g, _ = table.join(1, "x", "g", presence=False)
    for i in range(5000):
        table.keep_last(g, 1, i.to_bytes(3, "big"), b"x" * 20)
    h, _ = table.join(2, "y", "h", presence=False)
    for _ in range(300):
        table.keep_last(h, 2, b"abc", bytes(300_000))
    held = sum(len(f) for group in (g, h) for f in (group.last or {}).values())
    assert held == table.last_bytes <= 1 << 20
    assert len(table._last_order) == len(g.last or ()) + len(h.last or ())


@given(sizes=st.lists(st.integers(1, 50), max_size=20), room=st.integers(-10, 300))
def test_newest_that_fit_keeps_the_longest_suffix_within_room(sizes: list[int], room: int) -> None:
    frames = [b"x" * n for n in sizes]
    start = newest_that_fit(frames, room)
    kept = sizes[start:]
    assert len(kept) == min(len(sizes), 1) or sum(kept) <= room  # the newest is always in
    assert start == 0 or sum(sizes[start - 1 :]) > room or start == len(sizes)


def test_members_after_pages_in_ascending_order() -> None:
    table: GroupTable[str] = GroupTable(GroupLimits())
    for cid in (9, 3, 7, 1, 5):
        group, _ = table.join(cid, "m", "g", presence=False)
    assert table.members_after(group, 0, limit=2) == ([1, 3], True)
    assert table.members_after(group, 3, limit=2) == ([5, 7], True)
    assert table.members_after(group, 7, limit=2) == ([9], False)
    table.leave(5, group)
    assert table.members_after(group, 3, limit=2) == ([7, 9], False)


class GroupMachine(RuleBasedStateMachine):
    """Random joins, leaves and multicasts of 6 clients over 4 names, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = GroupLimits(
            max_groups_per_client=3,
            max_groups=3,
            last_value_groups=("a", "b"),
            last_values_max_count=4,
            last_values_max_bytes=16,
            last_values_total_max_bytes=24,  # six values of 4 bytes: two full groups are over
        )
        self.table: GroupTable[int] = GroupTable(self.limits)
        self.model: dict[str, set[int]] = {}
        self.of: dict[int, set[str]] = {c: set() for c in range(1, 7)}
        self.last: dict[str, dict[tuple[int, bytes], bytes]] = {}
        # Every kept value, least recently changed first (the server-wide bound's order).
        self.order: list[tuple[str, tuple[int, bytes]]] = []

    @rule(client=st.integers(1, 6), name=st.sampled_from("abcd"), presence=st.booleans())
    def join(self, client: int, name: str, presence: bool) -> None:
        in_it = name in self.of[client]
        why = self.table.refusal(len(self.of[client]) - in_it, name, presence and not in_it)
        expect_refused = (not in_it and len(self.of[client]) >= 3) or (
            name not in self.model and len(self.model) >= 3
        )
        if not presence and not in_it:
            assert (why is not None) == expect_refused, (why, expect_refused)
        if why is not None:
            return
        _, new = self.table.join(client, client, name, presence)
        assert new == (not in_it)
        self.model.setdefault(name, set()).add(client)
        self.of[client].add(name)
        if name not in self.last:
            self.last[name] = {}

    @rule(client=st.integers(1, 6), name=st.sampled_from("abcd"))
    def leave(self, client: int, name: str) -> None:
        group = self.table.by_name.get(name)
        if group is None or client not in group.members:
            assert name not in self.of[client]
            return
        forgotten = self.table.leave(client, group)
        self.model[name].discard(client)
        self.of[client].discard(name)
        self.last[name] = {k: v for k, v in self.last[name].items() if k[0] != client}
        self.order = [(n, k) for n, k in self.order if n != name or k[0] != client]
        assert forgotten == (not self.model[name])
        if forgotten:
            del self.model[name]
            del self.last[name]
            self.order = [(n, k) for n, k in self.order if n != name]

    @precondition(lambda self: any(self.of.values()))
    @rule(data=st.data(), code=st.sampled_from([b"POS", b"VEL"]), n=st.integers(0, 9))
    def multicast(self, data: st.DataObject, code: bytes, n: int) -> None:
        client = data.draw(st.sampled_from([c for c, g in self.of.items() if g]))
        name = data.draw(st.sampled_from(sorted(self.of[client])))
        group = self.table.by_name[name]
        frame = bytes([n]) * 4
        self.table.keep_last(group, client, code, frame)
        if group.last is not None:
            model = self.last[name]
            key = (client, code)
            if model.pop(key, None) is not None:
                self.order.remove((name, key))
            model[key] = frame
            self.order.append((name, key))
            while len(model) > 4:
                oldest = next(iter(model))
                del model[oldest]
                self.order.remove((name, oldest))
            while 4 * len(self.order) > 24 and len(self.order) > 1:
                old_name, old_key = self.order.pop(0)
                del self.last[old_name][old_key]

    @invariant()
    def table_matches_model(self) -> None:
        table = self.table
        assert {n: set(g.members) for n, g in table.by_name.items()} == self.model
        assert set(table.by_id) == {g.id for g in table.by_name.values()}
        assert len(table.by_id) == len(table.by_name)
        for name, group in table.by_name.items():
            assert group.presence <= set(group.members)
            if group.last is not None:
                assert dict(group.last) == self.last[name]
                assert list(group.last) == list(self.last[name])
                assert group.last_bytes == sum(map(len, group.last.values()))
                assert all(k[0] in group.members for k in group.last)
        kept = [g for g in table.by_name.values() if g.last is not None]
        assert table.last_bytes == sum(g.last_bytes for g in kept) == 4 * len(self.order) <= 24
        order = [(table.by_id[gid].name, (snd, code)) for gid, snd, code in table._last_order]
        assert order == self.order


GroupMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_group_table_state_machine = GroupMachine.TestCase
