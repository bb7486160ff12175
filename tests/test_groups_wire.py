"""The group frames of issue 10, with no socket: layouts, round trips, chunking, malformed bodies,
and the server core's receive path for JOIN, LEAVE, MEMBERS and GROUP_MULTICAST."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trame_async
from trame_async import INT, POS, REGISTRY, ErrorCode, Kind, Message, Position, encode
from trame_async.exceptions import (
    InvalidTextError,
    MalformedFrameError,
    TrailingDataError,
    TrameError,
    TruncatedFrameError,
)
from trame_async.protocol import ServerCore, ServerLimits
from trame_async.wire import (
    FLAG_PRESENCE,
    GROUP_HEAD,
    MAX_GROUP_NAME_LENGTH,
    MAX_MEMBER_IDS,
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameParser,
    Hello,
    Join,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    check_group_name,
    frame,
    group_multicast,
)

u32 = st.integers(0, 0xFFFF_FFFF)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)
names = st.binary(max_size=MAX_GROUP_NAME_LENGTH)
texts = st.text(max_size=60)
id_lists = st.lists(st.integers(1, 0xFFFF_FFFF), max_size=40, unique=True).map(
    lambda ids: tuple(sorted(ids))
)

joins = st.builds(Join, u32, st.sampled_from([0, FLAG_PRESENCE]), names)
leaves = st.builds(Leave, u32, u32)
members = st.builds(Members, u32, u32, u32)
replies = st.builds(Reply, u32, u8, u16, u32, texts)
presences = st.builds(PresenceNotice, u32, st.sampled_from([1, 2]), u32, u16)
member_lists = id_lists.flatmap(
    lambda ids: st.builds(
        MemberList, u32, u32, st.just(False) if not ids else st.booleans(), st.just(ids)
    )
)
group_frames = st.one_of(joins, leaves, members, replies, presences, member_lists)


def body(whole: bytes) -> bytes:
    """The body of a whole frame (after the kind byte)."""
    return whole[5:]


# --- round trips ---------------------------------------------------------------------------------


@given(group_frames)
def test_every_group_frame_round_trips(item: Any) -> None:
    whole = item.encode()
    assert int.from_bytes(whole[:4], "big") == len(whole) - 4
    (parsed,) = FrameParser().feed(whole)
    assert parsed[0] == _KIND_OF[type(item)]
    assert type(item).parse(parsed[1:]) == item


_KIND_OF: dict[type, Kind] = {
    Join: Kind.JOIN,
    Leave: Kind.LEAVE,
    Members: Kind.MEMBERS,
    Reply: Kind.REPLY,
    PresenceNotice: Kind.PRESENCE,
    MemberList: Kind.MEMBER_LIST,
}


@given(u32, u32, st.sampled_from([("INT", 5), ("POS", (1.0, -2.5)), ("STR", "héllo")]))
def test_group_multicast_and_relay_carry_the_multicast_body_byte_for_byte(
    group_id: int, sender: int, tv: tuple[str, Any]
) -> None:
    multicast = encode(*tv)[0]
    gm = group_multicast(group_id, multicast)
    assert len(gm) == len(multicast) + 4 and gm[4] == Kind.GROUP_MULTICAST
    assert int.from_bytes(gm[5:9], "big") == group_id and gm[9:] == multicast[5:]
    (view,) = FrameParser().feed(gm)
    # The relay the server writes, as the design gives it.
    relay = GROUP_HEAD.pack(len(view) + 4, Kind.GROUP_RELAY, sender, group_id) + bytes(view[5:])
    (rview,) = FrameParser().feed(relay)
    msg = REGISTRY.decode_frame(rview, strict=False, group="g")
    assert msg == Message(
        sender, REGISTRY[tv[0]], REGISTRY.decode(multicast)[1], Kind.GROUP_RELAY, "g"
    )
    assert REGISTRY.decode_frame(view).kind is Kind.GROUP_MULTICAST


@given(st.lists(group_frames, min_size=1, max_size=8), st.data())
def test_any_chunking_yields_the_same_frames(items: list[Any], data: st.DataObject) -> None:
    stream = b"".join(item.encode() for item in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = FrameParser()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += [bytes(f) for f in parser.feed(stream[prev:cut])]
        prev = cut
    assert got == [item.encode()[4:] for item in items]
    assert [type(item).parse(f[1:]) for item, f in zip(items, got, strict=True)] == items


@given(st.sampled_from(list(_KIND_OF)), st.binary(max_size=64))
def test_any_body_parses_or_raises_a_trame_error(cls: Any, raw: bytes) -> None:
    try:
        cls.parse(raw)
    except TrameError:
        pass


# --- malformed bodies ----------------------------------------------------------------------------

_GOOD: list[tuple[str, Callable[[bytes], Any], bytes]] = [
    ("JOIN", Join.parse, body(Join(1, 1, b"lobby").encode())),
    ("LEAVE", Leave.parse, body(Leave(1, 2).encode())),
    ("MEMBERS", Members.parse, body(Members(1, 2, 3).encode())),
    ("REPLY", Reply.parse, body(Reply(1, 1, 0, 2, "lobby").encode())),
    ("PRESENCE", PresenceNotice.parse, body(PresenceNotice(1, 2, 3, 4).encode())),
    ("MEMBER_LIST", MemberList.parse, body(MemberList(1, 2, True, (3, 4)).encode())),
]


@pytest.mark.parametrize(("what", "parse", "good"), _GOOD, ids=[g[0] for g in _GOOD])
def test_every_cut_is_truncated_and_every_extra_byte_trailing(
    what: str, parse: Callable[[bytes], Any], good: bytes
) -> None:
    for n in range(len(good)):
        with pytest.raises(TruncatedFrameError) as info:
            parse(good[:n])
        assert info.value.error_code is ErrorCode.MALFORMED_FRAME
    with pytest.raises(TrailingDataError) as trailing:
        parse(good + b"\0")
    assert trailing.value.error_code is ErrorCode.TRAILING_DATA


def test_field_rules_are_malformed_frames() -> None:
    for flags in (0x02, 0x80, 0xFF):
        with pytest.raises(MalformedFrameError, match="reserved"):
            Join.parse(struct.pack(">IBB", 1, flags, 1) + b"a")
    for event in (0, 3, 255):
        with pytest.raises(MalformedFrameError, match="event"):
            PresenceNotice.parse(struct.pack(">IBIH", 1, event, 2, 0))

    def member_list(more: int, ids: list[int], count: int | None = None) -> bytes:
        n = len(ids) if count is None else count
        return struct.pack(f">IIBH{len(ids)}I", 1, 2, more, n, *ids)

    with pytest.raises(MalformedFrameError, match="more=2"):
        MemberList.parse(member_list(2, [1]))
    with pytest.raises(MalformedFrameError, match="more=1 with 0"):
        MemberList.parse(member_list(1, []))
    with pytest.raises(MalformedFrameError, match="ascending"):
        MemberList.parse(member_list(0, [3, 2]))
    with pytest.raises(MalformedFrameError, match="ascending"):
        MemberList.parse(member_list(0, [3, 3]))
    too_many = list(range(1, MAX_MEMBER_IDS + 2))
    with pytest.raises(MalformedFrameError, match="at most 1024"):
        MemberList.parse(member_list(0, too_many))
    # Each of these is a plain MalformedFrameError: ERROR code MALFORMED_FRAME.
    assert MalformedFrameError("x").error_code is ErrorCode.MALFORMED_FRAME


def test_reply_text_must_be_utf8() -> None:
    with pytest.raises(InvalidTextError) as info:
        Reply.parse(struct.pack(">IBHIB", 1, 1, 0, 2, 2) + b"\xc3\x28")
    assert info.value.error_code is ErrorCode.INVALID_TEXT


def test_encoders_refuse_what_the_layout_cannot_carry() -> None:
    with pytest.raises(ValueError, match="255"):
        Join(1, 0, b"x" * 256).encode()
    with pytest.raises(ValueError, match="1024"):
        MemberList(1, 1, False, tuple(range(1, 1026))).encode()
    assert len(MemberList(1, 1, True, tuple(range(1, 1025))).encode()) == 16 + 4096
    # A REPLY's text is cut at 255 bytes on a character boundary, as an ERROR's.
    long = Reply.parse(body(Reply(1, 1, 2, 0, "é" * 200).encode()))
    assert long.text == "é" * 127


def test_join_keeps_a_bad_name_raw_for_the_server_to_judge() -> None:
    # Invalid UTF-8 in a name is REPLY BAD_NAME, not a protocol error: parse does not decode it.
    assert Join.parse(body(Join(1, 0, b"\xff").encode())).name == b"\xff"
    assert Join.parse(body(Join(1, 0, b"").encode())).name == b""
    assert Join(1, FLAG_PRESENCE, b"a").presence and not Join(1, 0, b"a").presence


# --- group names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"lobby", "lobby"),
        ("café".encode(), "café"),
        (b"a b", "a b"),
        (b" x ", " x "),
        ("\u00a0robots\u2003".encode(), "\u00a0robots\u2003"),  # other whitespace around text
        ("日本".encode(), "日本"),
        ("e\u0301".encode(), "e\u0301"),  # a combining mark (category Mn), not a control
        ("\u200b".encode(), "\u200b"),  # zero-width space is Cf, not whitespace nor Cc
        (b"x" * 64, "x" * 64),
        (b"", None),
        (b" ", None),
        (b" \t ", None),
        ("\u3000".encode(), None),  # ideographic space only
        (b"a\x00b", None),
        (b"a\nb", None),
        (b"\x7f", None),
        ("a\u0085".encode(), None),  # C1 (NEL) is Cc
        ("a\u009f".encode(), None),
        (b"\xff", None),
        (b"\xed\xa0\x80", None),  # an encoded surrogate is not UTF-8
        (b"\xc3", None),
    ],
)
def test_check_group_name(raw: bytes, expected: str | None) -> None:
    assert check_group_name(raw) == expected


def test_check_group_name_length_is_in_bytes() -> None:
    assert check_group_name(("é" * 32).encode(), 64) == "é" * 32
    assert check_group_name(("é" * 33).encode(), 64) is None
    assert check_group_name(b"x" * 65, 64) is None
    assert check_group_name(b"x" * 255) == "x" * 255
    assert check_group_name(b"x" * 256) is None


@given(st.text(max_size=20))
def test_check_group_name_is_the_documented_rule(name: str) -> None:
    import unicodedata

    raw = name.encode("utf-8", "surrogatepass")
    valid = (
        0 < len(raw) <= MAX_GROUP_NAME_LENGTH
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in name)
        and not name.isspace()
        and not any(unicodedata.category(c) == "Cc" for c in name)
    )
    assert check_group_name(raw) == (name if valid else None)


# --- the server core -----------------------------------------------------------------------------


def _server(**limits: Any) -> ServerCore:
    core = ServerCore(3, ServerLimits(heartbeat_interval=None, **limits), 0.0)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    core.outgoing.clear()
    return core


def _errors(outgoing: list[bytes]) -> list[ErrorCode | None]:
    return [ErrorFrame.parse(f[5:]).error_code for f in outgoing if f[4] == Kind.ERROR]


def test_server_core_hands_over_group_requests_and_multicasts() -> None:
    core = _server()
    sent = [
        Join(1, FLAG_PRESENCE, b"lobby").encode(),
        group_multicast(7, encode("POS", (1.0, 2.0))[0]),
        group_multicast(7, encode("STR", "hi")[0]),
        Members(2, 7, 0).encode(),
        Leave(3, 7).encode(),
        Join(4, 0, b"\xff bad name: the server's to judge").encode(),
    ]
    out = core.receive_data(b"".join(sent), 0.0)
    assert [bytes(f) for f in out] == [f[4:] for f in sent]
    assert not core.closed and core.outgoing == []
    # Through the fast path too (a known head, in a second read).
    out = core.receive_data(sent[1], 0.0)
    assert [bytes(f) for f in out] == [sent[1][4:]]


def test_server_core_checks_a_group_multicast_body_as_a_multicasts() -> None:
    cases: list[tuple[bytes, ErrorCode]] = [
        (frame(Kind.GROUP_MULTICAST, b"\0\0\0"), ErrorCode.MALFORMED_FRAME),  # group id cut
        (frame(Kind.GROUP_MULTICAST, b"\0\0\0\1IN"), ErrorCode.MALFORMED_FRAME),
        (
            frame(Kind.GROUP_MULTICAST, b"\0\0\0\1INT\x02<q" + bytes(7)),
            ErrorCode.VALUE_SIZE_MISMATCH,
        ),
        (frame(Kind.GROUP_MULTICAST, b"\0\0\0\1XYZ\x03< q" + bytes(8)), ErrorCode.BAD_FORMAT),
        (frame(Kind.GROUP_MULTICAST, b"\0\0\0\1XYZ\x02<?\x02"), ErrorCode.BAD_VALUE),
        (frame(Kind.GROUP_MULTICAST, b"\0\0\0\1STR\x03<2s\xc3\x28"), ErrorCode.INVALID_TEXT),
        (frame(Kind.JOIN, struct.pack(">IBB", 1, 2, 1) + b"a"), ErrorCode.MALFORMED_FRAME),
        (frame(Kind.JOIN, struct.pack(">IBB", 1, 0, 2) + b"a"), ErrorCode.MALFORMED_FRAME),
        (frame(Kind.LEAVE, bytes(9)), ErrorCode.TRAILING_DATA),
        (frame(Kind.MEMBERS, bytes(11)), ErrorCode.MALFORMED_FRAME),
        (Reply(1, 1, 0, 1, "x").encode(), ErrorCode.UNEXPECTED_FRAME),  # server -> client kinds
        (PresenceNotice(1, 1, 2, 0).encode(), ErrorCode.UNEXPECTED_FRAME),
        (MemberList(1, 1, False, ()).encode(), ErrorCode.UNEXPECTED_FRAME),
        (
            GROUP_HEAD.pack(23, Kind.GROUP_RELAY, 2, 1) + encode("INT", 1)[0][5:],
            ErrorCode.UNEXPECTED_FRAME,
        ),
    ]
    for bad, code in cases:
        core = _server()
        good = group_multicast(1, encode("INT", 1)[0])
        out = core.receive_data(good + bad + good, 0.0)
        assert [bytes(f) for f in out] == [good[4:]], bad.hex(" ")  # frames before it still go
        assert core.closed and _errors(core.outgoing) == [code], bad.hex(" ")


def test_server_core_relays_bang_as_big_endian_in_groups_too() -> None:
    core = _server()
    (out,) = core.receive_data(frame(Kind.GROUP_MULTICAST, b"\0\0\0\1ABC\x02!h\x00\x05"), 0.0)
    assert bytes(out) == b"\x16\0\0\0\1ABC\x02>h\x00\x05"


def test_group_frames_before_the_handshake_are_unexpected() -> None:
    for early in (Join(1, 0, b"a").encode(), group_multicast(1, encode("INT", 1)[0])):
        core = ServerCore(3, ServerLimits(heartbeat_interval=None), 0.0)
        core.receive_data(early, 0.0)
        assert _errors(core.outgoing) == [ErrorCode.UNEXPECTED_FRAME]
        # Right behind the HELLO, in the same read, they are fine.
        core = ServerCore(3, ServerLimits(heartbeat_interval=None), 0.0)
        out = core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode() + early, 0.0)
        assert [bytes(f) for f in out] == [early[4:]]


def test_unknown_formats_in_group_multicasts_count_against_the_limit() -> None:
    core = _server(max_unknown_formats=2)
    frames = [
        frame(Kind.GROUP_MULTICAST, b"\0\0\0\1QQQ\x02<" + c + bytes(n))
        for c, n in ((b"h", 2), (b"i", 4), (b"h", 2), (b"b", 1))
    ]
    out = core.receive_data(b"".join(frames), 0.0)
    assert len(out) == 3
    assert _errors(core.outgoing) == [ErrorCode.TOO_MANY_FORMATS]


def test_messages_have_a_group_slot_that_defaults_to_none() -> None:
    msg = REGISTRY.decode_frame(encode("POS", (1.0, 2.0))[0][4:])
    assert msg == Message(0, POS, Position(1.0, 2.0), Kind.MULTICAST)
    assert msg.group is None and len(msg) == 5
    relay = REGISTRY.decode_frame(REGISTRY.encode(INT, 3, Kind.RELAY)[4:])
    assert relay.group is None and relay.kind is Kind.RELAY
    assert trame_async.Message._fields[-1] == "group"
