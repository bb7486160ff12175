"""The sans-I/O outbox: budget, policies, folding, progress checks, with plain bytes and a fake clock.

Timelines read as ``# 1.0 s: ...``; no socket and no event loop anywhere in this file.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trame_async import INT, REGISTRY, STR, Kind
from trame_async.outbox import CUT, NOTHING, WRITE, Ledger, Outbox, OutboxLimits
from trame_async.wire import dropped_notice


def relay(sender: int, trame: object, value: object) -> bytes:
    """A RELAY frame from ``sender`` (the registry encodes them from the server, sender 0)."""
    frame = REGISTRY.encode(trame, value, Kind.RELAY)  # type: ignore[arg-type]
    return frame[:5] + sender.to_bytes(4, "big") + frame[9:]


def congested(policy: str, **limits: object) -> Outbox:
    box = Outbox(OutboxLimits(policy=policy, **limits))  # type: ignore[arg-type]
    box.pause(0.0)
    return box


def feed(box: Outbox, frames: list[bytes]) -> list[int]:
    """Push each frame as the fan-out does, calling overflow() when push() says so."""
    return [box.overflow() if box.push(f) else NOTHING for f in frames]


# --- keep-latest ------------------------------------------------------------------------------


def test_keep_latest_never_folds_data_replies() -> None:
    """DATA frames (RemoteClient.send) are replies to this client alone: all kept, in order, even
    with one trame code and one length (the bytes a RELAY's stream key is read from)."""
    replies = [REGISTRY.encode(STR, f"reply {i}", Kind.DATA) for i in range(5)]
    relays = [REGISTRY.encode(STR, f"x{i}", Kind.RELAY) for i in range(3)]
    frames = [replies[0], relays[0], replies[1], replies[2], relays[1], replies[3], relays[2]]
    frames.append(replies[4])
    box = congested("keep-latest")
    feed(box, frames)
    kept = [replies[0], replies[1], replies[2], replies[3], relays[2], replies[4]]
    assert box.size == sum(map(len, kept)) and box.dropped == 2
    assert box.take() == dropped_notice(2) + b"".join(kept)


def test_keep_latest_folds_variable_length_relays_of_one_stream() -> None:
    """A stream is (sender, trame code): '<5s' and '<6s' STR frames of one sender fold together;
    another sender, or another code, is another stream."""
    texts = ["short", "longer", "a much longer text", "tiny"]
    a = [relay(7, STR, t) for t in texts]
    b = [relay(8, STR, t) for t in texts[:2]]
    n = relay(7, INT, 1)
    assert len({len(f) for f in a}) == len(a), "every length differs"
    box = congested("keep-latest")
    feed(box, [a[0], b[0], a[1], n, a[2], b[1], a[3]])
    assert box.dropped == 4
    assert box.take() == dropped_notice(4) + n + b[1] + a[3]


def test_keep_latest_keeps_a_multi_frame_fanout_whole() -> None:
    """Server.fanout(frames=k) from a backplane may hold several streams in one bytes object: it
    is never folded (nor does it fold a single frame of its first stream)."""
    blob = REGISTRY.encode(STR, "one", Kind.RELAY) + REGISTRY.encode(INT, 2, Kind.RELAY)
    newer = REGISTRY.encode(STR, "newer", Kind.RELAY)
    box = congested("keep-latest")
    feed(box, [blob, newer, blob])
    assert box.dropped == 0
    assert box.take() == blob + newer + blob


def test_keep_latest_folds_only_while_congested() -> None:
    """A client that keeps up gets every frame: two values of one stream in one loop iteration
    are both written."""
    box = Outbox(OutboxLimits(policy="keep-latest"))
    one, two = relay(3, INT, 1), relay(3, INT, 2)
    assert feed(box, [one, two]) == [NOTHING, NOTHING]
    assert box.take() == one + two and box.dropped == 0


def test_keep_latest_bounds_its_streams() -> None:
    box = congested("keep-latest", max_streams=100)
    frames = [relay(1, INT, i) for i in range(1_000)]  # one stream: folds to one
    codes = [relay(i, INT, 0) for i in range(2, 1_002)]  # a thousand streams
    feed(box, frames + codes)
    assert len(box) == 100
    assert box.dropped == 999 + 901
    assert box.take() == dropped_notice(1_900) + b"".join(codes[-100:])


def test_keep_latest_costs_the_same_per_frame_with_ten_thousand_streams() -> None:
    """O(1) per frame: 10,000 distinct streams cost per frame about what 100 do (the old fold
    re-read the whole pending list for every frame)."""

    def per_frame(streams: int) -> float:
        frames = [relay(i, INT, 0) for i in range(streams)] * 4
        box = congested("keep-latest", max_streams=100_000, max_bytes=1 << 30)
        start = time.perf_counter()
        feed(box, frames)
        return (time.perf_counter() - start) / len(frames)

    per_frame(100)  # warm up
    small = min(per_frame(100) for _ in range(3))
    large = min(per_frame(10_000) for _ in range(3))
    assert large < 10 * small, (large, small)


# --- drop-oldest and disconnect ---------------------------------------------------------------


def test_drop_oldest_trims_from_the_front_and_keeps_the_newest() -> None:
    frames = [relay(1, STR, "x" * 100) for _ in range(10)]
    size = len(frames[0])
    box = congested("drop-oldest", max_bytes=3 * size)
    actions = feed(box, frames)
    assert set(actions) == {NOTHING}
    assert len(box) == 3 and box.dropped == 7 and box.size == 3 * size
    assert box.take() == dropped_notice(7) + b"".join(frames[-3:])


def test_drop_oldest_is_linear_in_the_frames() -> None:
    def per_frame(n: int) -> float:
        frames = [relay(1, INT, i) for i in range(n)]
        box = congested("drop-oldest", max_bytes=len(frames[0]) * n // 2)
        start = time.perf_counter()
        feed(box, frames)
        return (time.perf_counter() - start) / n

    per_frame(1_000)
    assert min(per_frame(100_000) for _ in range(2)) < 10 * min(per_frame(1_000) for _ in range(3))


def test_disconnect_cuts_over_the_budget_but_one_frame_always_fits() -> None:
    """max_queue_bytes == max_frame_size is accepted: a relayed frame of that size, a few bytes
    larger, must not cut anyone (it is alone in the outbox)."""
    big = relay(1, STR, "x" * 1000)
    box = congested("disconnect", max_bytes=len(big) - 8)
    assert feed(box, [big]) == [NOTHING]
    assert feed(box, [relay(1, INT, 1)]) == [CUT]
    assert "over max_queue_bytes" in box.cut_detail


def test_a_burst_past_the_high_water_mark_is_written_early() -> None:
    box = Outbox(OutboxLimits(write_high_water=1000))
    frame = relay(1, STR, "x" * 300)
    assert feed(box, [frame] * 4) == [NOTHING, NOTHING, NOTHING, WRITE]


def test_the_transport_buffer_counts_against_the_budget() -> None:
    frame = relay(1, STR, "x" * 100)
    box = congested("disconnect", max_bytes=10 * len(frame))
    box.wrote(8 * len(frame))  # 0.0 s: the transport holds 8 frames' worth
    assert feed(box, [frame, frame]) == [NOTHING, NOTHING]
    assert feed(box, [frame]) == [CUT]


def test_take_with_a_cap_leaves_the_rest_to_the_policy() -> None:
    frames = [relay(1, INT, i) for i in range(10)]
    box = congested("drop-oldest", max_bytes=1 << 20)
    feed(box, frames)
    box.resume()
    n = len(frames[0])
    assert box.take(3 * n) == b"".join(frames[:3])
    assert box.size == 7 * n


# --- progress checks ----------------------------------------------------------------------------


def test_a_stuck_client_is_cut_after_the_stall_timeout() -> None:
    box = Outbox(OutboxLimits(stall_timeout=4.0, check_interval=1.0, min_rate=1000))
    box.push(b"x" * 10_000)
    box.take()
    box.pause(0.0)  # 0.0 s: congested, all 10,000 bytes undelivered
    assert box.next_check == 1.0
    assert not box.check(1.0, 10_000)  # 1 s: baseline
    assert not box.check(2.0, 10_000)
    assert not box.check(4.0, 10_000)
    assert box.check(5.0, 10_000)  # 5 s: 4 s without taking anything
    assert "took 0 bytes in 4.00 s" in box.cut_detail


def test_a_reader_of_a_few_bytes_now_and_then_is_not_making_progress() -> None:
    box = Outbox(OutboxLimits(stall_timeout=4.0, check_interval=1.0, min_rate=1000))
    box.push(b"x" * 10_000)
    box.take()
    box.pause(0.0)
    undelivered = 10_000
    for second in range(1, 5):
        undelivered -= 10  # 10 bytes a second: far under 1,000 bytes/s
        assert not box.check(float(second), undelivered)
    assert box.check(5.0, undelivered - 10)


def test_a_lagging_reader_at_the_minimum_rate_is_kept() -> None:
    box = Outbox(OutboxLimits(stall_timeout=2.0, check_interval=0.5, min_rate=1000))
    box.push(b"x" * 100_000)
    box.take()
    box.pause(0.0)
    undelivered = 100_000
    for tick in range(1, 100):
        undelivered -= 600  # 1,200 bytes/s
        assert not box.check(tick * 0.5, undelivered), tick


def test_a_baseline_at_pause_shortens_the_first_window() -> None:
    box = Outbox(
        OutboxLimits(stall_timeout=0.1, check_interval=0.1, min_rate=1000, probe_at_pause=True)
    )
    box.push(b"x" * 1000)
    box.take()
    box.pause(0.0, undelivered=1000)
    assert box.check(0.1, 1000)  # 0.1 s: nothing taken in the first window


def test_a_new_episode_starts_with_a_new_baseline() -> None:
    box = Outbox(OutboxLimits(stall_timeout=1.0, check_interval=0.25))
    box.push(b"x" * 5000)
    box.take()
    box.pause(0.0)
    assert not box.check(0.25, 5000)
    box.resume()
    assert box.next_check == float("inf")
    box.pause(0.9)
    assert not box.check(1.15, 5000)  # the old baseline (0.25 s) does not count


# --- accounting ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(["disconnect", "drop-oldest", "keep-latest"]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(1, 5), st.integers(0, 3)),
            st.tuples(st.just("take"), st.integers(0, 400), st.just(0)),
            st.tuples(st.just("single"), st.just(0), st.just(0)),
            st.tuples(st.just("pause"), st.just(0), st.just(0)),
            st.tuples(st.just("resume"), st.just(0), st.just(0)),
            st.tuples(st.just("data"), st.just(0), st.just(0)),
        ),
        max_size=60,
    ),
)
def test_sizes_and_the_ledger_always_add_up(policy: str, ops: list[tuple[str, int, int]]) -> None:
    """Whatever the sequence, size is the sum of what is pending, the ledger the sum over the
    outboxes, every frame pushed is either taken or counted as dropped, and order holds."""
    ledger = Ledger()
    box = Outbox(
        OutboxLimits(policy=policy, max_bytes=200, write_high_water=64, max_streams=3),  # type: ignore[arg-type]
        ledger,
    )
    pushed = 0
    taken = b""
    seq = 0
    for op, a, b in ops:
        if op in ("push", "data"):
            seq += 1
            frame = (
                relay(a, INT, seq) if op == "push" else REGISTRY.encode(INT, seq, Kind.DATA)
            ) + b""
            if op == "push" and b:
                frame = relay(a, STR, "y" * (b * 10 + seq % 7))
            pushed += 1
            if box.push(frame) and box.overflow() == CUT:
                box.clear()
                return
        elif op == "take":
            if box.size:
                taken += box.take(a or None)
        elif op == "single":
            taken += box.take_single() or b""
        elif op == "pause":
            box.pause(0.0)
        else:
            box.resume()
        assert ledger.pending == box.size >= 0
    if box.size:
        taken += box.take()
    assert ledger.pending == box.size == 0
    # Every frame is taken or dropped: count RELAY/DATA frames in what was taken.
    frames = 0
    pos = 0
    while pos < len(taken):
        length = int.from_bytes(taken[pos : pos + 4], "big")
        if taken[pos + 4] != Kind.DROPPED:
            frames += 1
        pos += 4 + length
    assert frames + box.dropped == pushed
    assert ledger.dropped == box.dropped


def test_take_single_takes_only_what_take_would_give_as_it_is() -> None:
    """The fan-out's fast path: the one pending object, only when nothing else is due."""
    ledger = Ledger()
    box = Outbox(OutboxLimits(max_bytes=1000), ledger)
    a, b = relay(1, INT, 1), relay(1, INT, 2)
    assert box.take_single() is None  # nothing pending
    box.push(a)
    assert box.take_single() is a and box.size == ledger.pending == 0 and box.written == len(a)
    box.push(a)
    box.push(b)
    assert box.take_single() is None  # two objects: take() joins them
    assert box.take() == a + b
    box.push(a)
    box.wrote(10)  # the transport kept some of the last write
    assert box.take_single() is None
    box.wrote(0)
    box.pause(0.0)
    assert box.take_single() is None  # congested: the policy decides
    box.resume()
    assert box.take_single() is a
    drop = congested("drop-oldest", max_bytes=len(a) + 1)
    feed(drop, [a, b])  # a dropped: the next take announces it
    drop.resume()
    assert drop.take_single() is None and drop.take() == dropped_notice(1) + b


def _reply_frame() -> bytes:
    from trame_async.codes import GroupOp, GroupStatus
    from trame_async.wire import Reply

    return Reply(1, GroupOp.JOIN, GroupStatus.OK, 7, "lobby").encode()


@pytest.mark.parametrize("policy", ["drop-oldest", "keep-latest"])
def test_an_answer_to_the_clients_own_request_is_never_dropped(policy: str) -> None:
    """A REPLY dropped would leave the client's join() waiting for ever: cut it instead."""
    reply = _reply_frame()
    frames = [relay(i, STR, "x" * 100) for i in range(1, 30)]
    box = congested(policy, max_bytes=1000)
    assert feed(box, [reply]) == [NOTHING]
    actions = feed(box, frames)
    assert CUT in actions
    assert "answer to its own request" in box.cut_detail


def test_the_keep_latest_stream_cap_never_evicts_an_answer() -> None:
    box = congested("keep-latest", max_streams=2, max_bytes=1 << 20)
    assert feed(box, [_reply_frame()]) == [NOTHING]
    assert CUT in feed(box, [relay(i, INT, 0) for i in range(1, 5)])
