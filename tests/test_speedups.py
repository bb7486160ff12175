"""The client's optional compiled receive loop (trame_async/_speedups.c).

``nox -s tests`` runs the whole suite twice: with the compiled loop (TRAME_ASYNC_REQUIRE_SPEEDUPS=1
when it was built) and with TRAME_ASYNC_PURE_PYTHON=1. The first test checks that the path asked for
is the one running; the others feed the same bytes to both loops and compare what they make.
"""

from __future__ import annotations

import gc
import os
import struct
from typing import Any, NamedTuple

import pytest
from helpers import Reading
from hypothesis import given
from hypothesis import strategies as st

from trame_async import Kind, Message
from trame_async.codec import Registry
from trame_async.protocol import PURE_PYTHON_ENV, SPEEDUPS, ClientCore, _c_scan
from trame_async.wire import GROUP_HEAD, PROTOCOL_VERSION, Welcome, ping

needs_speedups = pytest.mark.skipif(not SPEEDUPS, reason="the compiled loop is not in use")


def test_the_path_asked_for_is_the_one_running() -> None:
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        assert not SPEEDUPS and _c_scan is None
    elif os.environ.get("TRAME_ASYNC_REQUIRE_SPEEDUPS"):
        assert SPEEDUPS and _c_scan is not None  # built, and used unless told not to


class Trio(NamedTuple):
    seq: int
    sent: float
    pad: float


def registries() -> tuple[Registry, Registry]:
    """Return (a sender's registry: plain formats, a receiver's: classes that check values)."""
    plain, strict = Registry(), Registry()
    for registry, reading, trio in ((plain, None, None), (strict, Reading, Trio)):
        registry.register("RDG", "<q", reading)  # a class that refuses negative values
        registry.register("TRI", "<Qdd", trio)  # a NamedTuple: built from the struct's tuple
        registry.register("PAR", "<hh")  # a plain tuple
    return plain, strict


PLAIN, STRICT = registries()
GROUP = 9


def relay(code: str, value: object, sender: int) -> bytes:
    frame = PLAIN.encode(code, value, Kind.RELAY)
    return frame[:5] + struct.pack(">I", sender) + frame[9:]


def group_relay(frame: bytes, group_id: int) -> bytes:
    (sender,) = struct.unpack_from(">I", frame, 5)
    return GROUP_HEAD.pack(len(frame), Kind.GROUP_RELAY, sender, group_id) + frame[9:]


FRAMES = st.one_of(
    st.builds(relay, st.just("RDG"), st.integers(-3, 3), st.integers(0, 2**32 - 1)),
    st.builds(
        relay, st.just("TRI"), st.tuples(st.integers(0, 9), st.just(0.5), st.just(0.0)), st.just(5)
    ),
    st.builds(relay, st.just("PAR"), st.tuples(st.integers(-9, 9), st.just(1)), st.just(6)),
    st.builds(relay, st.just("INT"), st.integers(-9, 9), st.just(7)),
    st.builds(relay, st.just("BOL"), st.booleans(), st.just(7)),  # bounds-checked: unpack_from
    st.builds(relay, st.just("STR"), st.text(max_size=3), st.just(7)),  # variable: the parser's
    st.builds(
        group_relay,
        st.builds(relay, st.just("RDG"), st.integers(-1, 1), st.just(3)),
        st.sampled_from([GROUP, GROUP + 1]),  # ours, and one the loops leave to the parser
    ),
    st.just(ping(1)),
)


def open_core() -> ClientCore:
    core = ClientCore(0.0, registry=STRICT)
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, None, 1 << 20).encode(), 0.0)
    core._add_group(GROUP, "lobby")
    return core


def scan_both(data: bytes, pos: int) -> tuple[tuple[int, list[Message], int], ...]:
    results = []
    for compiled in (True, False):
        core = open_core()
        out: list[Message] = []
        if compiled:
            assert _c_scan is not None
            end = _c_scan(data, pos, core._known, 1 << 20, out, core.group_names, core)
        else:
            end = core._scan_relays(data, out, pos)
        results.append((end, out, core.refused))
    return tuple(results)


@needs_speedups
@given(st.lists(FRAMES, max_size=12), st.integers(0, 40), st.integers(0, 8))
def test_both_loops_decode_and_stop_alike(frames: list[bytes], cut: int, start: int) -> None:
    data = b"".join(frames)
    data = data[: max(0, len(data) - cut)]  # often a partial frame at the end
    pos = sum(len(f) for f in frames[: min(start, len(frames))]) if start else 0
    compiled, python = scan_both(data, min(pos, len(data)))
    assert compiled == python
    for mine, theirs in zip(compiled[1], python[1], strict=True):
        assert type(mine.value) is type(theirs.value) and mine.kind is theirs.kind


@needs_speedups
def test_both_loops_build_the_same_types() -> None:
    data = (
        relay("TRI", (1, 2.0, 0.0), 5)
        + relay("PAR", (1, 2), 6)
        + relay("RDG", 4, 7)
        + relay("RDG", -4, 8)  # refused: dropped and counted, the scan goes on
        + group_relay(relay("TRI", (3, 4.0, 0.0), 9), GROUP)
    )
    compiled, python = scan_both(data, 0)
    assert compiled == python and compiled[0] == len(data) and compiled[2] == 1
    for mine, theirs in zip(compiled[1], python[1], strict=True):
        assert type(mine) is type(theirs) is Message
        assert type(mine.value) is type(theirs.value)
        assert type(mine.kind) is type(theirs.kind) and mine.kind is theirs.kind
    assert [type(m.value) for m in compiled[1]] == [Trio, tuple, Reading, Trio]
    assert compiled[1][3] == Message(
        9, STRICT.get("TRI"), Trio(3, 4.0, 0.0), Kind.GROUP_RELAY, "lobby"
    )


def test_a_read_that_starts_inside_a_frame_decodes_the_rest_whole() -> None:
    # Every read of a flood starts inside a frame: the core finishes it, then scans the rest.
    frames = [relay("TRI", (i, 0.5, 0.0), 4) for i in range(6)]
    data = b"".join(frames)
    for split in range(1, len(data)):
        core = open_core()
        out = core.receive_data(data[:split], 1.0) + core.receive_data(data[split:], 1.0)
        assert [m.value.seq for m in out] == list(range(6))
        assert core.quiet == (split % len(frames[0]) == 0)


@needs_speedups
def test_messages_of_plain_values_stay_out_of_the_cyclic_collector() -> None:
    # A flood queues thousands of messages per read: tracked, they filled the collector's young
    # generation and were traversed again in every older one. Plain values cannot hold a cycle.
    data = relay("TRI", (1, 2.0, 0.0), 5) + relay("PAR", (1, 2), 6) + relay("RDG", 4, 7)
    core = open_core()
    out: list[Message] = []
    assert core._scan(data, out, 0) == len(data)
    tri, par, rdg = out
    assert not gc.is_tracked(tri) and not gc.is_tracked(tri.value)
    assert not gc.is_tracked(par) and not gc.is_tracked(par.value)
    # A value of a class of the application's (a dataclass here) may refer to anything.
    assert gc.is_tracked(rdg) and gc.is_tracked(rdg.value)


class Tally:
    """A value class whose constructor returns an untracked dict, which may take a list later."""

    def __new__(cls, count: int) -> Any:
        return {"count": count}


def test_a_message_whose_value_may_become_a_container_of_references_stays_tracked() -> None:
    registry = Registry()
    registry.register("TLY", "<q", Tally)
    frame = registry.encode("TLY", 3, Kind.RELAY)
    core = ClientCore(0.0, registry=registry)
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, None, 1 << 20).encode(), 0.0)
    (message,) = core.receive_data(frame, 1.0)
    assert message.value == {"count": 3} and not gc.is_tracked(message.value)
    assert gc.is_tracked(message)  # the dict may hold the message one day: a cycle to collect
