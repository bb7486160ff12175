"""The cluster's sans-I/O foundations: envelopes, batching, gap detection, the outage outbox.

Plain bytes and a fake clock: no NATS, no socket and no event loop in this file. Timelines read
as ``# 1.0 s: ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trame_async
from trame_async.cluster import (
    DUPLICATE,
    ECHO,
    ENVELOPE_HEAD,
    ENVELOPE_MAGIC,
    STALE,
    Batch,
    Batcher,
    ClusterOutbox,
    Envelope,
    EnvelopeError,
    GapTracker,
    OutboxLimits,
    decode,
    encode,
)
from trame_async.exceptions import MalformedFrameError, ProtocolError
from trame_async.wire import GROUP_HEAD, HEADER_U32, Kind

_ROOT = str(Path(trame_async.__file__).resolve().parent.parent)


def relay(sender: int, body: bytes) -> bytes:
    """A RELAY frame from ``sender`` whose data is ``body`` (the layout is all that matters)."""
    return HEADER_U32.pack(5 + len(body), Kind.RELAY, sender) + body


def group_relay(sender: int, group: int, body: bytes) -> bytes:
    """A GROUP_RELAY frame from ``sender`` in ``group``."""
    return GROUP_HEAD.pack(9 + len(body), Kind.GROUP_RELAY, sender, group) + body


_U32 = st.integers(0, 0xFFFF_FFFF)
_U64 = st.integers(0, (1 << 64) - 1)
frames_st = st.one_of(
    st.builds(relay, _U32, st.binary(max_size=64)),
    st.builds(group_relay, _U32, _U32, st.binary(max_size=64)),
)


# --- the envelope -----------------------------------------------------------------------------


def test_envelope_layout_is_as_documented() -> None:
    frame = relay(7, b"hi")
    data = encode(0x0102030405060708, 9, 3, [frame])
    assert ENVELOPE_HEAD.size == 34
    assert data[:4] == ENVELOPE_MAGIC == b"TRCL"
    assert data[4:6] == b"\x01\x00"  # version 1, flags 0
    assert data[6:14] == bytes.fromhex("0102030405060708")  # node
    assert data[14:22] == (9).to_bytes(8, "big")  # epoch
    assert data[22:30] == (3).to_bytes(8, "big")  # seq
    assert data[30:34] == (1).to_bytes(4, "big")  # count
    assert data[34:] == frame  # the frame, unchanged
    assert decode(data) == Envelope(0x0102030405060708, 9, 3, [frame])


@given(_U64, _U64, _U64, st.lists(frames_st, min_size=1, max_size=20))
def test_envelope_round_trip(node: int, epoch: int, seq: int, frames: list[bytes]) -> None:
    assert decode(encode(node, epoch, seq, frames)) == Envelope(node, epoch, seq, frames)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_the_envelope_error(data: bytes) -> None:
    try:
        envelope = decode(data)
    except EnvelopeError as err:
        assert isinstance(err, ProtocolError)
        assert str(err).startswith("malformed cluster envelope")
    else:
        assert envelope.frames


@given(
    st.lists(frames_st, min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    st.integers(0, 400),
)
def test_corrupted_envelopes_decode_or_raise_the_envelope_error(
    frames: list[bytes], flips: list[tuple[int, int]], cut: int
) -> None:
    # Random bytes rarely get past the magic; these start from a valid envelope.
    data = bytearray(encode(1, 2, 3, frames))
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    data = data[: len(data) - cut % (len(data) + 1)]
    try:
        envelope = decode(bytes(data))
    except EnvelopeError:
        return
    assert sum(map(len, envelope.frames)) == len(data) - ENVELOPE_HEAD.size


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "shorter than"),
        (b"XXXX", "magic"),
        (b"TRC", "shorter than"),
        (encode(1, 1, 1, [relay(1, b"")])[:-1], "announced"),
        (encode(1, 1, 1, [relay(1, b"")]) + b"\x00", "after the last"),
        (b"TRCL\x02" + bytes(29), "version 2"),
        (b"TRCL\x01\x01" + bytes(28), "flags"),
        (ENVELOPE_HEAD.pack(b"TRCL", 1, 0, 1, 1, 1, 0), "count 0"),
        (ENVELOPE_HEAD.pack(b"TRCL", 1, 0, 1, 1, 1, 0xFFFF_FFFF) + bytes(10), "cannot fit"),
        (ENVELOPE_HEAD.pack(b"TRCL", 1, 0, 1, 1, 1, 1) + bytes(5), "length 0"),
        (ENVELOPE_HEAD.pack(b"TRCL", 1, 0, 1, 1, 1, 1) + b"\x00\x00\x00\x01\x10", "kind 0x10"),
    ],
)
def test_malformed_envelopes_say_what_is_wrong(data: bytes, detail: str) -> None:
    with pytest.raises(EnvelopeError, match=detail) as caught:
        decode(data)
    assert isinstance(caught.value, MalformedFrameError)


def test_decode_bounds_the_frame_size_and_may_carry_other_kinds() -> None:
    big = relay(1, bytes(100))
    with pytest.raises(EnvelopeError, match=r"outside 1\.\.50"):
        decode(encode(1, 1, 1, [big]), max_frame_size=50)
    ping = b"\x00\x00\x00\x05\x03\x00\x00\x00\x01"
    with pytest.raises(EnvelopeError, match="kind 0x03"):
        decode(encode(1, 1, 1, [ping]))
    assert decode(encode(1, 1, 1, [ping]), kinds=None).frames == [ping]


def test_encode_refuses_an_empty_envelope() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        encode(1, 1, 1, [])


# --- the batcher ------------------------------------------------------------------------------


def test_batcher_seals_one_envelope_per_stream_per_flush_with_consecutive_seqs() -> None:
    b = Batcher(node=5, epoch=100)
    assert not b
    f1, f2, f3 = relay(1, b"a"), relay(2, b"b"), group_relay(1, 9, b"c")
    b.add("all", f1)
    b.add("g.red", f3)
    b.add("all", f2)
    assert b
    first = b.flush()
    assert not b
    assert [(x.stream, x.seq, x.nframes) for x in first] == [("all", 0, 2), ("g.red", 0, 1)]
    assert decode(first[0].data) == Envelope(5, 100, 0, [f1, f2])
    assert decode(first[1].data) == Envelope(5, 101, 0, [f3])  # each stream counter its epoch
    b.add("all", f1)
    (second,) = b.flush()
    assert decode(second.data) == Envelope(5, 100, 1, [f1])
    assert b.flush() == []
    assert (b.envelopes, b.frames, b.streams) == (3, 4, 2)


def test_batcher_keeps_the_frames_it_was_given_until_the_flush() -> None:
    b = Batcher(node=1, epoch=1)
    frame = relay(1, b"x" * 100)
    b.add("all", frame)
    assert b._pending["all"].frames[0] is frame  # no copy before the flush


def test_batcher_splits_a_batch_under_max_envelope() -> None:
    frame = relay(1, bytes(1000 - 9))  # 1000 bytes
    b = Batcher(node=1, epoch=1, max_envelope=34 + 3000)
    for _ in range(10):
        b.add("all", frame)
    batches = b.flush()
    assert [x.nframes for x in batches] == [3, 3, 3, 1]
    assert [x.seq for x in batches] == [0, 1, 2, 3]
    assert all(len(x.data) <= 34 + 3000 for x in batches)


def test_batcher_sends_a_large_frame_alone_and_drops_one_over_max_payload() -> None:
    b = Batcher(node=1, epoch=1, max_envelope=1034, max_payload=4096)
    small, large, huge = relay(1, b""), relay(1, bytes(2000)), relay(1, bytes(4096))
    assert b.add("all", small)
    assert b.add("all", large)
    assert not b.add("all", huge)  # cannot cross NATS: its local clients had it
    assert b.add("all", small)
    batches = b.flush()
    assert [x.nframes for x in batches] == [1, 1, 1]
    assert len(batches[1].data) == 34 + len(large) <= 4096
    assert b.oversize_dropped == 1


def test_default_bounds_are_well_under_nats_max_payload() -> None:
    b = Batcher(node=1, epoch=1)
    assert b.max_envelope == 256 << 10
    assert b.max_payload == 1 << 20  # nats-server's default max_payload


def test_batcher_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="u64"):
        Batcher(node=-1, epoch=0)
    with pytest.raises(ValueError, match="u64"):
        Batcher(node=1, epoch=1 << 64)
    with pytest.raises(ValueError, match="max_envelope"):
        Batcher(node=1, epoch=0, max_envelope=2048, max_payload=1024)


def test_a_retired_stream_reopens_with_a_new_epoch() -> None:
    b = Batcher(node=1, epoch=50)
    b.add("g.red", relay(1, b""))
    (old,) = b.flush()
    b.retire("g.red")
    assert b.streams == 0
    b.add("g.red", relay(1, b""))
    (new,) = b.flush()
    assert (decode(old.data).epoch, old.seq) == (50, 0)
    assert (decode(new.data).epoch, new.seq) == (51, 0)
    t = GapTracker()
    assert t.accept("g.red", 1, 50, 0) == 0
    assert t.accept("g.red", 1, 51, 0) == 0  # not a duplicate of seq 0: a fresh start
    assert t.counters().resets == 1


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["all", "g.a", "g.b"]), frames_st),
            st.just(None),  # a flush: the end of a loop iteration
        ),
        max_size=60,
    ),
    st.integers(34 + 80, 600),
)
def test_batcher_preserves_order_per_stream_and_bounds_envelopes(
    ops: list[tuple[str, bytes] | None], max_envelope: int
) -> None:
    b = Batcher(node=3, epoch=10, max_envelope=max_envelope, max_payload=max_envelope)
    sent: dict[str, list[bytes]] = {}
    batches: list[Batch] = []
    for op in ops:
        if op is None:
            batches += b.flush()
        else:
            b.add(*op)
            sent.setdefault(op[0], []).append(op[1])
    batches += b.flush()
    got: dict[str, list[bytes]] = {}
    seqs: dict[str, list[int]] = {}
    for x in batches:
        assert len(x.data) <= max_envelope
        env = decode(x.data)
        assert (env.node, env.seq, len(env.frames)) == (3, x.seq, x.nframes)
        got.setdefault(x.stream, []).extend(env.frames)
        seqs.setdefault(x.stream, []).append(env.seq)
    assert got == sent
    assert all(s == list(range(len(s))) for s in seqs.values())
    assert b.frames == sum(map(len, sent.values()))


# --- gap detection ----------------------------------------------------------------------------


def test_in_order_envelopes_are_delivered_and_nothing_is_counted_lost() -> None:
    t = GapTracker(own=1)
    assert [t.accept("all", 2, 7, seq) for seq in range(5)] == [0] * 5
    c = t.counters(2)
    assert (c.envelopes, c.missed, c.gaps, c.first_contacts) == (5, 0, 0, 1)
    assert t.expected("all", 2) == (7, 5)


def test_first_contact_midstream_is_not_a_gap() -> None:
    # This node subscribed after node 2 had published 40 envelopes there: not lost for it.
    t = GapTracker()
    assert t.accept("all", 2, 7, 40) == 0
    assert t.counters().missed == 0


def test_a_gap_is_counted_by_envelopes_missed() -> None:
    t = GapTracker()
    t.accept("all", 2, 7, 0)
    assert t.accept("all", 2, 7, 4) == 3  # 1, 2, 3 missed
    assert t.accept("all", 2, 7, 5) == 0
    assert t.accept("all", 2, 7, 7) == 1
    c = t.counters()
    assert (c.gaps, c.missed, c.envelopes) == (2, 4, 4)


def test_duplicates_are_dropped_and_counted() -> None:
    t = GapTracker()
    for seq in range(3):
        t.accept("all", 2, 7, seq)
    assert t.accept("all", 2, 7, 1) == DUPLICATE
    assert t.accept("all", 2, 7, 2) == DUPLICATE
    assert t.accept("all", 2, 7, 3) == 0
    assert t.counters(2).duplicates == 2


def test_a_restart_resets_the_expectation_and_counts_its_lost_first_envelopes() -> None:
    t = GapTracker()
    for seq in range(10):
        t.accept("all", 2, 7, seq)
    # Node 2 restarts: a larger epoch, its counter from 0 again.
    assert t.accept("all", 2, 9, 0) == 0
    assert t.accept("all", 2, 9, 1) == 0
    # Its restart again, and this node missed the new life's first two envelopes.
    assert t.accept("all", 2, 12, 2) == 2
    # A late envelope of an older life is not delivered after the newer one.
    assert t.accept("all", 2, 9, 2) == STALE
    c = t.counters(2)
    assert (c.resets, c.missed, c.gaps, c.stale) == (2, 2, 1, 1)


def test_streams_and_nodes_are_tracked_apart() -> None:
    t = GapTracker()
    t.accept("all", 2, 7, 0)
    t.accept("g.red", 2, 8, 0)
    t.accept("all", 3, 5, 0)
    assert t.accept("g.red", 2, 8, 1) == 0  # all's counter of node 2 is another one
    assert t.accept("all", 3, 5, 1) == 0
    assert t.nodes() == [2, 3]


def test_own_envelopes_are_dropped_as_echoes() -> None:
    t = GapTracker(own=1)
    assert t.accept("all", 1, 7, 0) == ECHO
    assert t.counters().echoes == 1
    assert t.expected("all", 1) is None


def test_forgetting_a_stream_makes_the_next_envelope_a_first_contact() -> None:
    t = GapTracker()
    t.accept("g.red", 2, 7, 0)
    t.forget_stream("g.red")  # this node unsubscribed: what follows is not lost for it
    assert t.accept("g.red", 2, 7, 50) == 0
    assert t.counters().first_contacts == 2


def test_forgetting_a_node_keeps_its_counts_in_the_totals() -> None:
    t = GapTracker()
    t.accept("all", 2, 7, 0)
    t.accept("all", 2, 7, 3)
    t.forget_node(2)
    assert t.nodes() == []
    assert t.expected("all", 2) is None
    assert t.counters(2).missed == 0
    assert t.counters().missed == 2
    assert t.counters().as_dict()["missed"] == 2


@given(st.data())
def test_missed_counts_every_lost_envelope_exactly(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 60))
    lost = data.draw(st.sets(st.integers(1, n - 1))) if n > 1 else set()
    arrived = [s for s in range(n) if s not in lost]
    # Some envelopes arrive twice (a replay after a reconnect), right after themselves or later.
    doubled = data.draw(st.lists(st.sampled_from(arrived), max_size=10))
    stream = list(arrived)
    for s in doubled:
        at = data.draw(st.integers(stream.index(s) + 1, len(stream)))
        stream.insert(at, s)
    t = GapTracker()
    delivered = [s for s in stream if t.accept("all", 2, 1, s) >= 0]
    assert delivered == arrived  # each once, in order
    lost_before_last = sum(1 for s in lost if s < arrived[-1])
    c = t.counters()
    assert c.missed == lost_before_last
    assert c.duplicates == len(doubled)


# --- the outage outbox --------------------------------------------------------------------------


def sealed(b: Batcher, n: int = 1, size: int = 91, stream: str = "all") -> Batch:
    for _ in range(n):
        b.add(stream, relay(1, bytes(size - 9)))
    (batch,) = b.flush()
    return batch


def test_outbox_hands_back_envelopes_in_order() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=None, max_age=None))
    batches = [sealed(b, stream=s) for s in ["all", "g.a", "all", "g.b", "all"]]
    for i, x in enumerate(batches):
        box.push(x, float(i))
    assert (len(box), box.frames) == (5, 5)
    assert box.take(100.0) == batches
    assert (len(box), box.size) == (0, 0)
    assert box.dropped.envelopes == 0


def test_outbox_drops_the_oldest_past_max_bytes_and_counts_envelopes_and_frames() -> None:
    b = Batcher(node=1, epoch=1)
    a, c, d = sealed(b, 1), sealed(b, 2), sealed(b, 3)  # 125, 216, 307 bytes
    box = ClusterOutbox(OutboxLimits(max_bytes=600, max_age=None))
    box.push(a, 0.0)
    box.push(c, 0.0)
    assert box.size == 341
    box.push(d, 0.0)  # 648 > 600: the oldest goes
    assert box.size == 523
    assert box.dropped.as_dict() == {
        "envelopes_by_age": 0,
        "frames_by_age": 0,
        "envelopes_by_bytes": 1,
        "frames_by_bytes": 1,
        "control": 0,
        "envelopes": 1,
        "frames": 1,
    }
    assert box.take(0.0) == [c, d]


def test_outbox_counts_frameless_messages_apart_from_envelopes() -> None:
    box = ClusterOutbox(OutboxLimits(max_bytes=100, max_age=1.0))
    reply = Batch("\x00trame.x.n.1.r1", 0, 0, b"r" * 80)
    box.push(reply, 0.0)
    box.push(Batch("\x00trame.x.n.1.r2", 0, 0, b"r" * 80), 0.0)  # over max_bytes: one goes
    assert box.expire(5.0) == 1  # the other ages out
    assert box.dropped.control == 2
    assert box.dropped.envelopes == 0 and box.dropped.frames == 0


def test_outbox_drops_an_envelope_larger_than_max_bytes_at_once() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=100, max_age=None))
    box.push(sealed(b, 3), 0.0)
    assert (len(box), box.size, box.dropped.frames_by_bytes) == (0, 0, 3)


def test_outbox_drops_envelopes_that_waited_max_age() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=None, max_age=5.0))
    assert box.next_expiry == float("inf")
    x0, x1, x2 = sealed(b, 2), sealed(b), sealed(b)
    # 0.0 s: NATS goes down; 0.0, 1.0, 3.0 s: envelopes are sealed
    box.push(x0, 0.0)
    box.push(x1, 1.0)
    box.push(x2, 3.0)
    assert box.next_expiry == 5.0
    # 4.9 s: nothing is due yet
    assert box.expire(4.9) == 0
    # 5.0 s: x0 waited 5 s
    assert box.expire(5.0) == 1
    assert box.next_expiry == 6.0
    assert (box.dropped.envelopes_by_age, box.dropped.frames_by_age) == (1, 2)
    # 6.5 s: NATS is back; x1 expired meanwhile and goes before the replay
    assert box.take(6.5) == [x2]
    assert box.dropped.envelopes == 2
    assert box.dropped.frames == 3


def test_push_and_take_expire_what_is_due_without_a_timer() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=None, max_age=1.0))
    box.push(sealed(b), 0.0)
    box.push(sealed(b), 2.0)  # the first one went on the way
    assert len(box) == 1
    assert box.take(3.5) == []
    assert box.dropped.envelopes_by_age == 2


def test_take_with_a_cap_paces_the_replay() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=None, max_age=None))
    batches = [sealed(b) for _ in range(5)]  # 125 bytes each
    for x in batches:
        box.push(x, 0.0)
    assert box.take(0.0, max_bytes=300) == batches[:2]
    assert box.take(0.0, max_bytes=10) == batches[2:3]  # at least one
    assert box.size == 250
    assert box.take(0.0, max_bytes=300) == batches[3:]


def test_clear_forgets_without_counting() -> None:
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox()
    box.push(sealed(b), 0.0)
    assert box.clear() == 1
    assert (len(box), box.size, box.dropped.envelopes) == (0, 0, 0)


def test_outbox_limits_refuse_negative_bounds() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        OutboxLimits(max_bytes=-1)
    with pytest.raises(ValueError, match="max_age"):
        OutboxLimits(max_age=float("nan"))


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.floats(0.0, 2.0)), min_size=1, max_size=40),
    st.integers(200, 2000),
    st.floats(0.5, 6.0),
)
def test_sender_drops_equal_receiver_misses(
    pushes: list[tuple[int, float]], max_bytes: int, max_age: float
) -> None:
    """An outage end to end: what the outbox drops is exactly what the receiver counts missed."""
    b = Batcher(node=1, epoch=1)
    box = ClusterOutbox(OutboxLimits(max_bytes=max_bytes, max_age=max_age))
    t = GapTracker(own=2)
    # Before the outage, envelope 0 gets through: the receiver knows the stream.
    first = sealed(b)
    assert t.accept("all", 1, decode(first.data).epoch, first.seq) == 0
    now = 0.0
    for frames, step in pushes:
        now += step
        box.push(sealed(b, frames), now)
    # NATS is back: the outbox replays, then one live envelope follows.
    replay = [*box.take(now + 0.1), sealed(b)]
    delivered_frames = 0
    for x in replay:
        env = decode(x.data)
        assert t.accept("all", env.node, env.epoch, env.seq) >= 0
        delivered_frames += len(env.frames)
    assert t.counters().missed == box.dropped.envelopes
    assert delivered_frames + box.dropped.frames == sum(f for f, _ in pushes) + 1


# --- the sans-I/O boundary ---------------------------------------------------------------------


def test_the_cluster_core_does_not_import_asyncio_or_nats() -> None:
    code = (
        "import sys\n"
        "import trame_async.cluster\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'nats')))\n"
    )
    env = dict(os.environ, PYTHONPATH=_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
