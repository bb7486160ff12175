"""Tests of the framing layer: the incremental FrameParser and the control frames.

The parser must yield the same frames whatever the chunking, refuse an oversized length from the 4
header bytes alone, and do work linear in the bytes fed. Control frames round-trip, and malformed
ones raise the codec's own errors. The sans-I/O modules must not import asyncio.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trame_async
from trame_async import (
    BYT,
    FLT,
    INT,
    POS,
    REGISTRY,
    STR,
    DisconnectReason,
    ErrorCode,
    FrameTooLargeError,
    HandshakeError,
    InvalidStateError,
    InvalidTextError,
    Kind,
    TrailingDataError,
    TrameError,
    TruncatedFrameError,
)
from trame_async.exceptions import ParserFailedError
from trame_async.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ECHO,
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER,
    MAGIC,
    MAX_LENGTH,
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameParser,
    Goodbye,
    Hello,
    Welcome,
    check_kind,
    dropped_notice,
    frame,
    parse_dropped,
    parse_ping_id,
    ping,
    pong,
)

FUZZ = settings(max_examples=300, deadline=None)

# --- a stream of every kind of frame -----------------------------------------------------------

FRAMES: list[bytes] = [
    Hello(PROTOCOL_VERSION, FLAG_ECHO, b"secret").encode(),
    Welcome(PROTOCOL_VERSION, 0, 7, 5.0, 10.0, DEFAULT_MAX_FRAME_SIZE).encode(),
    REGISTRY.encode(INT, -1),
    ping(1),
    REGISTRY.encode(STR, "héllo", Kind.RELAY),
    pong(1),
    dropped_notice(12),
    REGISTRY.encode(POS, (1.0, 2.0), Kind.DATA),
    frame(Kind.PING, b"\x00\x00\x00"),  # malformed body: framing does not care
    REGISTRY.encode(BYT, b""),
    REGISTRY.encode(BYT, bytes(range(40))),
    frame(0x7F, b""),  # unknown kind: framing does not care either
    ErrorFrame(ErrorCode.BAD_FORMAT, "bad format").encode(),
    REGISTRY.encode(FLT, 0.5),
    Goodbye(DisconnectReason.SERVER_SHUTDOWN, 1.5, "restarting").encode(),
]
STREAM = b"".join(FRAMES)
EXPECTED = [f[4:] for f in FRAMES]


def feed_all(parser: FrameParser, chunks: list[bytes]) -> list[bytes]:
    """Feed ``chunks`` in order; return every frame as bytes."""
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(bytes(f) for f in parser.feed(chunk))
    return out


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into pieces of ``sizes`` (cycled), the last piece taking what remains."""
    chunks = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


def test_stream_in_one_chunk() -> None:
    parser = FrameParser()
    frames = parser.feed(STREAM)
    assert [bytes(f) for f in frames] == EXPECTED
    assert all(isinstance(f, memoryview) and f.readonly for f in frames)
    assert parser.buffered == 0
    assert not parser.in_frame


def test_stream_split_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        parser = FrameParser()
        assert feed_all(parser, [STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
        assert parser.buffered == 0


def test_stream_split_at_every_pair_of_offsets() -> None:
    head = b"".join(FRAMES[:6])
    expected = [f[4:] for f in FRAMES[:6]]
    for first in range(len(head) + 1):
        for second in range(first, len(head) + 1, 3):
            parser = FrameParser()
            chunks = [head[:first], head[first:second], head[second:]]
            assert feed_all(parser, chunks) == expected, (first, second)


def test_stream_in_one_byte_chunks() -> None:
    parser = FrameParser()
    out: list[bytes] = []
    for i in range(len(STREAM)):
        frames = parser.feed(STREAM[i : i + 1])
        out.extend(bytes(f) for f in frames)
        # Between frames nothing is held; inside one, exactly the bytes fed so far.
        assert parser.in_frame == (parser.buffered > 0)
    assert out == EXPECTED


@FUZZ
@given(st.lists(st.integers(1, 80), min_size=1, max_size=20))
@example([1])
@example([2])
@example([3])
@example([4])
@example([5])
@example([len(STREAM)])
def test_stream_in_random_chunks(sizes: list[int]) -> None:
    assert feed_all(FrameParser(), chunked(STREAM, sizes)) == EXPECTED


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=12), st.data())
def test_random_frames_in_random_chunks(bodies: list[bytes], data: st.DataObject) -> None:
    frames = [frame(Kind.DATA, body) for body in bodies]
    stream = b"".join(frames)
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=10))
    assert feed_all(FrameParser(), chunked(stream, sizes)) == [f[4:] for f in frames]


def test_empty_chunks_change_nothing() -> None:
    parser = FrameParser()
    out: list[bytes] = []
    for i in range(len(STREAM)):
        assert parser.feed(b"") == []
        out.extend(bytes(f) for f in parser.feed(STREAM[i : i + 1]))
    assert parser.feed(b"") == []
    assert out == EXPECTED


def test_feed_accepts_bytearray_and_memoryview() -> None:
    parser = FrameParser()
    source = bytearray(STREAM)
    frames = parser.feed(source[:20]) + parser.feed(memoryview(source)[20:])
    source[:] = bytes(len(source))  # the frames must not point into the caller's buffer
    assert [bytes(f) for f in frames] == EXPECTED


def test_frames_stay_valid_after_later_feeds() -> None:
    parser = FrameParser()
    first = parser.feed(FRAMES[0] + FRAMES[1][:3])
    split = parser.feed(FRAMES[1][3:] + FRAMES[2][:7])
    parser.feed(FRAMES[2][7:] + STREAM)
    assert bytes(first[0]) == EXPECTED[0]
    assert bytes(split[0]) == EXPECTED[1]


def test_buffered_and_in_frame() -> None:
    parser = FrameParser()
    assert (parser.buffered, parser.in_frame) == (0, False)
    parser.feed(FRAMES[0][:2])
    assert (parser.buffered, parser.in_frame) == (2, True)
    parser.feed(FRAMES[0][2:9])
    assert (parser.buffered, parser.in_frame) == (9, True)
    assert [bytes(f) for f in parser.feed(FRAMES[0][9:])] == [EXPECTED[0]]
    assert (parser.buffered, parser.in_frame) == (0, False)


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [DEFAULT_MAX_FRAME_SIZE + 1, 1 << 31, MAX_LENGTH])
def test_oversize_length_refused_from_the_header_alone(length: int) -> None:
    parser = FrameParser()
    with pytest.raises(FrameTooLargeError) as info:
        parser.feed(length.to_bytes(4, "big"))
    assert (info.value.size, info.value.limit) == (length, DEFAULT_MAX_FRAME_SIZE)
    assert info.value.error_code == ErrorCode.FRAME_TOO_LARGE
    assert str(length) in str(info.value)
    assert str(DEFAULT_MAX_FRAME_SIZE) in str(info.value)
    assert parser.buffered <= 4


def test_oversize_length_split_across_feeds() -> None:
    parser = FrameParser()
    assert parser.feed(b"\xff") == []
    assert parser.feed(b"\xff\xff") == []
    with pytest.raises(FrameTooLargeError):
        parser.feed(b"\xff" + bytes(1000))
    assert parser.buffered <= 4


def test_oversize_length_after_a_good_frame_in_the_same_chunk() -> None:
    parser = FrameParser()
    # The good frame before the bad header is handed over; the error waits in parser.error.
    frames = parser.feed(FRAMES[2] + b"\xff\xff\xff\xff" + bytes(10_000))
    assert [bytes(f) for f in frames] == [FRAMES[2][4:]]
    assert isinstance(parser.error, FrameTooLargeError)
    assert parser.buffered <= 4
    with pytest.raises(FrameTooLargeError):
        parser.feed(b"more")
    with pytest.raises(ParserFailedError):  # the error is raised once, then the parser is failed
        parser.feed(b"more")


@pytest.mark.parametrize("limit", [1, 5, HANDSHAKE_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE])
def test_length_exactly_the_limit_passes(limit: int) -> None:
    body = bytes(limit - 1)
    whole = frame(Kind.DATA, body)
    parser = FrameParser(limit)
    frames = parser.feed(whole[:3]) + parser.feed(whole[3:])
    assert [bytes(f) for f in frames] == [whole[4:]]
    assert len(frames[0]) == limit
    with pytest.raises(FrameTooLargeError):
        FrameParser(limit).feed(frame(Kind.DATA, body + b"\x00"))


def test_limit_can_change_between_feeds() -> None:
    # The handshake limit, then the connection's limit once the HELLO is accepted.
    parser = FrameParser(HANDSHAKE_MAX_FRAME_SIZE)
    hello = Hello(PROTOCOL_VERSION, 0, b"t" * 100).encode()
    assert [bytes(f) for f in parser.feed(hello)] == [hello[4:]]
    parser.max_frame_size = DEFAULT_MAX_FRAME_SIZE
    big = REGISTRY.encode(BYT, bytes(HANDSHAKE_MAX_FRAME_SIZE))
    assert [bytes(f) for f in parser.feed(big)] == [big[4:]]
    parser.max_frame_size = HANDSHAKE_MAX_FRAME_SIZE
    with pytest.raises(FrameTooLargeError):
        parser.feed(big)


def test_handshake_limit_refuses_a_big_first_frame() -> None:
    parser = FrameParser(HANDSHAKE_MAX_FRAME_SIZE)
    with pytest.raises(FrameTooLargeError, match="4096"):
        parser.feed((HANDSHAKE_MAX_FRAME_SIZE + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("limit", [0, -1, MAX_LENGTH + 1])
def test_bad_limit_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameParser(limit)


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4, 5])
def test_length_zero_refused(split: int) -> None:
    data = FRAMES[3] + b"\x00\x00\x00\x00" + FRAMES[3]
    cut = len(FRAMES[3]) + split
    parser = FrameParser()
    with pytest.raises(TruncatedFrameError, match="length shorter than the kind byte") as info:
        parser.feed(data[:cut])
        parser.feed(data[cut:])
    assert info.value.error_code == ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(
    "bad", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"], ids=["length-0", "too-large"]
)
def test_parser_refuses_input_after_an_error(bad: bytes) -> None:
    parser = FrameParser()
    with pytest.raises(TrameError):
        parser.feed(bad)
    for data in (FRAMES[2], b"", bad):
        with pytest.raises(ParserFailedError, match="failed earlier") as info:
            parser.feed(data)
        # One of the package's errors, of the state category, and a ValueError as it used to be.
        assert isinstance(info.value, TrameError)
        assert isinstance(info.value, InvalidStateError)
        assert isinstance(info.value, ValueError)
        assert "close the connection" in str(info.value)


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(1, 16), min_size=1, max_size=5))
def test_arbitrary_bytes_only_trame_errors(data: bytes, sizes: list[int]) -> None:
    parser = FrameParser(64)
    try:
        for chunk in chunked(data, sizes):
            for f in parser.feed(chunk):
                assert 1 <= len(f) <= 64
            assert parser.buffered <= 64 + 4
    except Exception as err:
        assert isinstance(err, TrameError), f"{type(err).__name__}: {err}"
        assert parser.buffered <= 4 + 64


class _CountingBuffer(bytearray):
    """A bytearray that counts the bytes copied into it and out of it."""

    copied = 0

    def __iadd__(self, other: Any) -> _CountingBuffer:
        self.copied += len(other)
        return super().__iadd__(other)

    def __bytes__(self) -> bytes:
        self.copied += len(self)
        return bytes(bytearray(self))


def test_largest_frame_in_one_byte_chunks_is_linear() -> None:
    # Count the bytes the parser copies rather than timing it: re-buffering a 1 MiB frame on
    # every 1-byte feed would copy about 5e11 bytes instead of about 2 MiB.
    whole = frame(Kind.DATA, b"\xab" * (DEFAULT_MAX_FRAME_SIZE - 1)) + ping(9)
    parser = FrameParser()
    counter = _CountingBuffer()
    parser._buf = counter  # type: ignore[misc]
    frames: list[memoryview] = []
    feed = parser.feed
    for i in range(len(whole)):
        frames += feed(whole[i : i + 1])
    assert parser._buf is counter, "the parser replaced its buffer; update this test"
    assert len(frames) == 2
    assert len(frames[0]) == DEFAULT_MAX_FRAME_SIZE
    assert frames[0] == whole[4:-9]
    assert frames[1] == ping(9)[4:]
    assert counter.copied <= 2 * len(whole)
    assert parser.buffered == 0


# --- control frames ----------------------------------------------------------------------------


def body_of(whole: bytes, kind: Kind) -> bytes:
    """Check the header of ``whole`` and return its body (after the kind byte)."""
    assert int.from_bytes(whole[:4], "big") == len(whole) - 4
    assert whole[4] == kind
    return whole[5:]


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
ms = st.one_of(st.none(), st.integers(1, 0xFFFF_FFFF).map(lambda n: n / 1000))
short_text = st.text(st.characters(codec="utf-8"), max_size=80).filter(
    lambda t: len(t.encode("utf-8")) <= 255
)


@FUZZ
@given(u8, u8, st.binary(max_size=300))
@example(PROTOCOL_VERSION, 0, b"")
@example(PROTOCOL_VERSION, FLAG_ECHO, b"\x00" * 0xFFFF)
def test_hello_round_trip(version: int, flags: int, token: bytes) -> None:
    hello = Hello(version, flags, token)
    body = body_of(hello.encode(), Kind.HELLO)
    assert body[:4] == MAGIC
    assert len(body) == 8 + len(token)
    assert Hello.parse(body) == hello
    assert Hello.parse(memoryview(body)) == hello
    assert hello.echo == bool(flags & FLAG_ECHO)


def test_hello_token_too_long() -> None:
    with pytest.raises(ValueError, match="65535"):
        Hello(1, 0, bytes(0x10000)).encode()


@FUZZ
@given(u8, u8, u32, ms, ms, u32)
@example(PROTOCOL_VERSION, 0, 1, None, None, DEFAULT_MAX_FRAME_SIZE)
def test_welcome_round_trip(
    version: int,
    flags: int,
    client_id: int,
    interval: float | None,
    timeout: float | None,
    max_size: int,
) -> None:
    welcome = Welcome(version, flags, client_id, interval, timeout, max_size)
    body = body_of(welcome.encode(), Kind.WELCOME)
    assert len(body) == 22
    assert body[:4] == MAGIC
    assert Welcome.parse(body) == welcome


def test_welcome_times_in_milliseconds() -> None:
    body = body_of(Welcome(1, 0, 3, 0.25, None, 1024).encode(), Kind.WELCOME)
    assert body[10:14] == (250).to_bytes(4, "big")
    assert body[14:18] == bytes(4)  # 0 = disabled
    # A positive time never rounds down to "disabled".
    tiny = Welcome.parse(body_of(Welcome(1, 0, 3, 1e-6, 1e-6, 1024).encode(), Kind.WELCOME))
    assert (tiny.heartbeat_interval, tiny.heartbeat_timeout) == (0.001, 0.001)


@FUZZ
@given(u32)
@example(0)
@example(0xFFFF_FFFF)
def test_ping_pong_round_trip(ping_id: int) -> None:
    assert parse_ping_id(body_of(ping(ping_id), Kind.PING), "PING") == ping_id
    assert parse_ping_id(body_of(pong(ping_id), Kind.PONG), "PONG") == ping_id
    assert ping(ping_id)[5:] == pong(ping_id)[5:]


@FUZZ
@given(u32)
@example(0)
@example(0xFFFF_FFFF)
def test_dropped_round_trip(count: int) -> None:
    assert parse_dropped(body_of(dropped_notice(count), Kind.DROPPED)) == count


def test_dropped_count_saturates() -> None:
    assert parse_dropped(body_of(dropped_notice(1 << 40), Kind.DROPPED)) == 0xFFFF_FFFF


@FUZZ
@given(u16, short_text)
@example(ErrorCode.MALFORMED_FRAME, "")
@example(ErrorCode.INVALID_TEXT, "é" * 127)
def test_error_round_trip(code: int, reason: str) -> None:
    error = ErrorFrame(code, reason)
    assert ErrorFrame.parse(body_of(error.encode(), Kind.ERROR)) == error


@FUZZ
@given(u16, st.text(st.characters(codec="utf-8"), min_size=200, max_size=400))
def test_error_reason_cut_at_255_bytes_on_a_character_boundary(code: int, reason: str) -> None:
    parsed = ErrorFrame.parse(body_of(ErrorFrame(code, reason).encode(), Kind.ERROR))
    raw = parsed.reason.encode("utf-8")
    assert len(raw) <= 255
    assert reason.startswith(parsed.reason)
    assert len(reason.encode("utf-8")) <= 255 or len(raw) > 255 - 4


def test_error_code_property() -> None:
    assert ErrorFrame(5, "").error_code is ErrorCode.VALUE_SIZE_MISMATCH
    assert ErrorFrame(999, "").error_code is None


@FUZZ
@given(u16, ms, short_text)
@example(DisconnectReason.SERVER_SHUTDOWN, 2.5, "restarting")
@example(DisconnectReason.GOODBYE, None, "")
def test_goodbye_round_trip(reason: int, retry_after: float | None, text: str) -> None:
    bye = Goodbye(reason, retry_after, text)
    body = body_of(bye.encode(), Kind.GOODBYE)
    assert len(body) == 7 + len(text.encode("utf-8"))
    assert Goodbye.parse(body) == bye


def test_goodbye_reason_property() -> None:
    assert Goodbye(6, None, "").disconnect_reason is DisconnectReason.SERVER_SHUTDOWN
    assert Goodbye(999, None, "").disconnect_reason is DisconnectReason.GOODBYE


def test_control_frames_exact_bytes() -> None:
    assert ping(5) == bytes.fromhex("00000005 03 00000005")
    assert dropped_notice(5) == bytes.fromhex("00000005 13 00000005")
    assert pong(5) == bytes.fromhex("00000005 04 00000005")
    assert Hello(1, 1, b"").encode() == bytes.fromhex("00000009 01 5452414d 01 01 0000")
    assert ErrorFrame(4, "x").encode() == bytes.fromhex("00000005 20 0004 01 78")
    assert Goodbye(6, 2.0, "").encode() == bytes.fromhex("00000008 21 0006 000007d0 00")


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (Hello.parse, b""),
        (Hello.parse, b"TRA"),
        (Hello.parse, b"GET / HTTP/1.1\r\n"),
        (Hello.parse, b"\x16\x03\x01\x02\x00"),  # a TLS ClientHello
        (Hello.parse, b"tram\x01\x00\x00\x00"),
        (Welcome.parse, b""),
        (Welcome.parse, b"HTTP/1.1 200 OK\r\n" + bytes(10)),
    ],
)
def test_wrong_magic(parse: Any, body: bytes) -> None:
    with pytest.raises(HandshakeError, match="magic") as info:
        parse(body)
    assert info.value.error_code == ErrorCode.BAD_HANDSHAKE


GOOD_BODIES: list[tuple[str, Any, bytes]] = [
    ("HELLO", Hello.parse, body_of(Hello(1, 0, b"abc").encode(), Kind.HELLO)),
    ("WELCOME", Welcome.parse, body_of(Welcome(1, 0, 2, 1.0, 2.0, 4096).encode(), Kind.WELCOME)),
    ("PING", lambda b: parse_ping_id(b, "PING"), body_of(ping(3), Kind.PING)),
    ("PONG", lambda b: parse_ping_id(b, "PONG"), body_of(pong(3), Kind.PONG)),
    ("DROPPED", parse_dropped, body_of(dropped_notice(3), Kind.DROPPED)),
    ("ERROR", ErrorFrame.parse, body_of(ErrorFrame(1, "why").encode(), Kind.ERROR)),
    ("GOODBYE", Goodbye.parse, body_of(Goodbye(1, 1.0, "bye").encode(), Kind.GOODBYE)),
]


@pytest.mark.parametrize(("name", "parse", "body"), GOOD_BODIES, ids=[r[0] for r in GOOD_BODIES])
def test_truncated_control_frames(name: str, parse: Any, body: bytes) -> None:
    parse(body)
    # Every cut keeping the magic must be refused as truncated (shorter cuts: bad magic).
    for cut in range(len(body)):
        if name in ("HELLO", "WELCOME") and cut < 4:
            with pytest.raises(HandshakeError):
                parse(body[:cut])
            continue
        with pytest.raises(TruncatedFrameError, match=name) as info:
            parse(body[:cut])
        assert info.value.available < info.value.needed


@pytest.mark.parametrize(("name", "parse", "body"), GOOD_BODIES, ids=[r[0] for r in GOOD_BODIES])
@pytest.mark.parametrize("extra", [b"\x00", b"junk"])
def test_trailing_data_in_control_frames(name: str, parse: Any, body: bytes, extra: bytes) -> None:
    with pytest.raises(TrailingDataError, match=name) as info:
        parse(body + extra)
    assert info.value.extra == len(extra)
    assert info.value.error_code == ErrorCode.TRAILING_DATA


def test_hello_token_length_beyond_the_body() -> None:
    body = MAGIC + bytes((1, 0)) + (10).to_bytes(2, "big") + b"abc"
    with pytest.raises(TruncatedFrameError, match="needs 18 bytes but only 11"):
        Hello.parse(body)


@pytest.mark.parametrize(
    ("parse", "body", "what"),
    [
        (ErrorFrame.parse, b"\x00\x01\x02\xc3\x28", "ERROR reason"),
        (ErrorFrame.parse, b"\x00\x01\x01\xff", "ERROR reason"),
        (Goodbye.parse, b"\x00\x01\x00\x00\x00\x00\x01\x80", "GOODBYE text"),
    ],
)
def test_invalid_utf8_text(parse: Any, body: bytes, what: str) -> None:
    with pytest.raises(InvalidTextError, match=what) as info:
        parse(body)
    assert info.value.error_code == ErrorCode.INVALID_TEXT


def test_short_texts_never_carry_surrogates() -> None:
    parsed = ErrorFrame.parse(body_of(ErrorFrame(1, "a\ud800b").encode(), Kind.ERROR))
    assert parsed.reason == "a?b"


@FUZZ
@given(st.sampled_from(GOOD_BODIES), st.binary(max_size=40))
def test_control_parsers_on_arbitrary_bytes(row: tuple[str, Any, bytes], body: bytes) -> None:
    _, parse, good = row
    for candidate in (body, good[:4] + body, good[: len(good) // 2] + body):
        try:
            parse(candidate)
        except Exception as err:
            assert isinstance(err, TrameError), f"{type(err).__name__}: {err}"


def test_check_kind() -> None:
    for kind in Kind:
        assert check_kind(int(kind)) is kind
    with pytest.raises(trame_async.UnknownKindError, match="0x42"):
        check_kind(0x42)


def test_kind_values_are_fixed() -> None:
    # Part of the wire protocol: never renumber.
    assert {k.name: int(k) for k in Kind} == {
        "HELLO": 0x01,
        "WELCOME": 0x02,
        "PING": 0x03,
        "PONG": 0x04,
        "MULTICAST": 0x10,
        "RELAY": 0x11,
        "DATA": 0x12,
        "DROPPED": 0x13,
        "JOIN": 0x14,
        "LEAVE": 0x15,
        "GROUP_MULTICAST": 0x16,
        "GROUP_RELAY": 0x17,
        "MEMBERS": 0x18,
        "REPLY": 0x19,
        "PRESENCE": 0x1A,
        "MEMBER_LIST": 0x1B,
        "ERROR": 0x20,
        "GOODBYE": 0x21,
    }
    assert HEADER.size == 5


# --- the sans-I/O boundary ---------------------------------------------------------------------

_CORE = ("trame_async.codec", "trame_async.wire", "trame_async.codes", "trame_async.exceptions")
#: Also sans-I/O by design (their docstrings say "no asyncio").
_SANS_IO = (*_CORE, "trame_async.protocol", "trame_async.timers")
_ROOT = str(Path(trame_async.__file__).resolve().parent.parent)


def _run_python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_sans_io_modules_do_not_import_asyncio() -> None:
    # The package's __init__ is skipped (an empty package stands in), so only these modules and
    # what they import are loaded.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('trame_async'); pkg.__path__ = [{_ROOT!r} + '/trame_async']\n"
        "sys.modules['trame_async'] = pkg\n"
        f"for name in {_SANS_IO!r}: __import__(name)\n"
        "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('asyncio.')))\n"
    )
    assert _run_python(code) == "[]"


def test_importing_the_core_through_the_package_does_not_import_asyncio() -> None:
    # A sans-I/O user (another event loop, a test) should not pay for asyncio.
    code = f"import sys\nfor name in {_CORE!r}: __import__(name)\nprint('asyncio' in sys.modules)\n"
    assert _run_python(code) == "False"
