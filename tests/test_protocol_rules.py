"""The rules of docs/protocol.md that a client written from the document alone relies on.

Each test names the rule it checks. The cores are driven with plain bytes and a fake clock; a few
rules are also checked end to end over real sockets on 127.0.0.1, where what matters is what
reaches the wire (nothing at all, for an ERROR or a GOODBYE).
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from helpers import Reading, close_writer, raw_handshake, read_eof, read_frame, read_until_error
from hypothesis import given
from hypothesis import strategies as st

import trame_async
import trame_async.codec as codec_module
from trame_async import INT, DisconnectReason, ErrorCode, Kind
from trame_async.protocol import ClientCore, CoreState, ServerCore, ServerLimits
from trame_async.wire import (
    GROUP_HEAD,
    PROTOCOL_VERSION,
    SENDER,
    ErrorFrame,
    FrameParser,
    Goodbye,
    Hello,
    Join,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    Welcome,
    dropped_notice,
    frame,
    group_multicast,
    ping,
    pong,
)

_KINDS = frozenset(int(k) for k in Kind)


def _errors(outgoing: list[bytes]) -> list[ErrorCode | None]:
    """Return the codes of the ERROR frames in ``outgoing`` (other frames are skipped)."""
    frames = FrameParser().feed(b"".join(outgoing))
    return [ErrorFrame.parse(f[1:]).error_code for f in frames if f[0] == Kind.ERROR]


def _kinds(outgoing: list[bytes]) -> list[int]:
    return [f[0] for f in FrameParser().feed(b"".join(outgoing))]


def _server(**limits: object) -> ServerCore:
    return ServerCore(7, ServerLimits(**limits), 0.0)  # type: ignore[arg-type]


def _open_server(**limits: object) -> ServerCore:
    core = _server(**limits)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    assert core.state is CoreState.OPEN
    core.outgoing.clear()
    return core


def _open_client() -> ClientCore:
    core = ClientCore(0.0)
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, None, 1 << 20).encode(), 0.0)
    assert core.state is CoreState.OPEN
    core.outgoing.clear()
    return core


# --- ERROR and GOODBYE are never answered, in any state, whatever their body -------------------

#: ERROR and GOODBYE frames a receiver must close on without answering: well formed, and broken
#: in each way the document lists (truncated, trailing bytes, invalid UTF-8).
CLOSING_FRAMES = [
    pytest.param(ErrorFrame(ErrorCode.INTERNAL_ERROR, "bye").encode(), id="error"),
    pytest.param(ErrorFrame(999, "").encode(), id="error-unknown-code"),
    pytest.param(frame(Kind.ERROR, b""), id="error-empty-body"),
    pytest.param(frame(Kind.ERROR, b"\x00\x05\x09abc"), id="error-truncated-reason"),
    pytest.param(frame(Kind.ERROR, b"\x00\x05\x00trailing"), id="error-trailing-bytes"),
    pytest.param(frame(Kind.ERROR, b"\x00\x05\x02\xff\xfe"), id="error-invalid-utf8"),
    pytest.param(Goodbye(DisconnectReason.GOODBYE, None, "").encode(), id="goodbye"),
    pytest.param(frame(Kind.GOODBYE, b"\x00"), id="goodbye-truncated"),
    pytest.param(frame(Kind.GOODBYE, bytes(7) + b"xx"), id="goodbye-trailing-bytes"),
    pytest.param(frame(Kind.GOODBYE, b"\x00\x01" + bytes(4) + b"\x01\xc3"), id="goodbye-bad-utf8"),
]


@pytest.mark.parametrize("closing", CLOSING_FRAMES)
@pytest.mark.parametrize("state", ["first frame", "open"])
def test_server_closes_on_error_or_goodbye_without_answering(closing: bytes, state: str) -> None:
    # "A receiver of an ERROR or a GOODBYE never answers it": before HELLO (the ERROR row of the
    # kind table: "any time, even before the handshake") as after it.
    core = _server() if state == "first frame" else _open_server()
    assert core.receive_data(closing, 1.0) == []
    assert core.closed
    assert core.outgoing == []
    expected = (
        DisconnectReason.ERROR_RECEIVED if closing[4] == Kind.ERROR else DisconnectReason.GOODBYE
    )
    assert core.close_reason is expected


@pytest.mark.parametrize("closing", CLOSING_FRAMES)
@pytest.mark.parametrize("state", ["before welcome", "open"])
def test_client_closes_on_error_or_goodbye_without_answering(closing: bytes, state: str) -> None:
    core = ClientCore(0.0) if state == "before welcome" else _open_client()
    core.outgoing.clear()  # the HELLO
    assert core.receive_data(closing, 1.0) == []
    assert core.closed
    assert core.outgoing == []


def test_shortest_error_as_first_frame_is_not_held_for_a_ninth_byte() -> None:
    # An ERROR with no reason is 8 bytes; a server waiting for the 9-byte HELLO preamble would
    # keep it until the handshake timeout, then answer HANDSHAKE_TIMEOUT.
    core = _server()
    short = ErrorFrame(ErrorCode.SHUTTING_DOWN, "").encode()
    assert len(short) == 8
    for byte in short:
        core.receive_data(bytes([byte]), 0.5)
    assert core.closed and core.outgoing == []
    assert core.error_code is ErrorCode.SHUTTING_DOWN


@given(body=st.binary(max_size=300), chunk=st.integers(1, 20))
def test_any_error_or_goodbye_body_is_never_answered(body: bytes, chunk: int) -> None:
    for kind in (Kind.ERROR, Kind.GOODBYE):
        data = frame(kind, body)
        for core in (_server(), _open_server()):
            for at in range(0, len(data), chunk):
                core.receive_data(data[at : at + chunk], 1.0)
            assert core.closed and core.outgoing == []


# --- one order of checks for the first frame, over every kind value ---------------------------


def _first_frame(kind: int) -> bytes:
    """A frame of ``kind`` with a well-formed body of its kind (any body for unknown kinds)."""
    bodies = {
        Kind.HELLO: Hello(PROTOCOL_VERSION, 0, b"").encode(),
        Kind.WELCOME: Welcome(PROTOCOL_VERSION, 0, 1, None, None, 4096).encode(),
        Kind.PING: ping(1),
        Kind.PONG: pong(1),
        Kind.MULTICAST: trame_async.REGISTRY.encode(INT, 1),
        Kind.RELAY: trame_async.REGISTRY.encode(INT, 1, Kind.RELAY),
        Kind.DATA: trame_async.REGISTRY.encode(INT, 1, Kind.DATA),
        Kind.DROPPED: dropped_notice(1),
        Kind.ERROR: ErrorFrame(ErrorCode.INTERNAL_ERROR, "x").encode(),
        Kind.GOODBYE: Goodbye(DisconnectReason.GOODBYE, None, "").encode(),
        Kind.JOIN: Join(1, 0, b"g").encode(),
        Kind.LEAVE: Leave(1, 1).encode(),
        Kind.GROUP_MULTICAST: group_multicast(1, trame_async.REGISTRY.encode(INT, 1)),
        Kind.GROUP_RELAY: GROUP_HEAD.pack(23, Kind.GROUP_RELAY, 2, 1)
        + trame_async.REGISTRY.encode(INT, 1)[5:],
        Kind.MEMBERS: Members(1, 1, 0).encode(),
        Kind.REPLY: Reply(1, 1, 0, 1, "g").encode(),
        Kind.PRESENCE: PresenceNotice(1, 1, 2, 0).encode(),
        Kind.MEMBER_LIST: MemberList(1, 1, False, (2,)).encode(),
    }
    if kind in _KINDS:
        return bodies[Kind(kind)]
    return frame(kind, b"TRAM\x01\x00\x00\x00")  # looks like a HELLO but for its kind


def _expected_before_hello(kind: int) -> ErrorCode | str:
    # docs/protocol.md, "Order of checks", the server's first frame: the kind byte decides.
    if kind == Kind.HELLO:
        return "WELCOME"
    if kind in (Kind.ERROR, Kind.GOODBYE):
        return "nothing"
    if kind in _KINDS:
        return ErrorCode.UNEXPECTED_FRAME
    return ErrorCode.BAD_HANDSHAKE


@pytest.mark.parametrize("kind", range(256), ids=lambda k: f"{k:#04x}")
@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_every_kind_value_as_the_servers_first_frame(kind: int, split: bool) -> None:
    core = _server()
    data = _first_frame(kind)
    chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
    for chunk in chunks:
        core.receive_data(chunk, 0.0)
        if core.closed:
            break
    expected = _expected_before_hello(kind)
    if expected == "WELCOME":
        assert _kinds(core.outgoing) == [Kind.WELCOME] and not core.closed
    elif expected == "nothing":
        assert core.closed and core.outgoing == []
    else:
        assert core.closed and _errors(core.outgoing) == [expected]


@pytest.mark.parametrize("kind", range(256), ids=lambda k: f"{k:#04x}")
def test_every_kind_value_as_the_clients_first_frame(kind: int) -> None:
    # Before WELCOME a server may send only WELCOME, or the ERROR or GOODBYE that ends it.
    core = ClientCore(0.0)
    core.outgoing.clear()
    core.receive_data(_first_frame(kind), 0.0)
    if kind == Kind.WELCOME:
        assert not core.closed and core.outgoing == []
    elif kind in (Kind.ERROR, Kind.GOODBYE):
        assert core.closed and core.outgoing == []
    elif kind in _KINDS:
        assert _errors(core.outgoing) == [ErrorCode.UNEXPECTED_FRAME]
    else:
        assert _errors(core.outgoing) == [ErrorCode.UNKNOWN_KIND]


def test_first_frame_kind_is_judged_before_its_length() -> None:
    # A stray request whose first 4 bytes read as a huge length: the kind byte decides first.
    core = _server()
    core.receive_data(b"\xff\xff\xff\xff\x7f", 0.0)
    assert _errors(core.outgoing) == [ErrorCode.BAD_HANDSHAKE]
    # The length is judged next: an ERROR too long for the handshake limit is a framing error,
    # found before its body is read.
    core = _server()
    core.receive_data(b"\x00\x01\x00\x00\x20", 0.0)
    assert _errors(core.outgoing) == [ErrorCode.FRAME_TOO_LARGE]


def test_relayed_frames_in_a_clients_state_after_welcome() -> None:
    # After WELCOME the general rule applies: an unknown kind is UNKNOWN_KIND.
    core = _open_client()
    core.receive_data(frame(0x7F, b""), 0.0)
    assert _errors(core.outgoing) == [ErrorCode.UNKNOWN_KIND]
    core = _open_client()
    core.receive_data(frame(Kind.RELAY, SENDER.pack(1) + INT.head + INT.pack(5)), 0.0)
    assert not core.closed


# --- over real sockets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "closing",
    [
        pytest.param(ErrorFrame(ErrorCode.INTERNAL_ERROR, "").encode(), id="error"),
        pytest.param(frame(Kind.ERROR, b"\x00\x05\x02\xff\xfe"), id="error-invalid-utf8"),
        pytest.param(frame(Kind.GOODBYE, b"\x00"), id="goodbye-truncated"),
    ],
)
async def test_server_sends_nothing_in_reply_to_a_first_frame_error_or_goodbye(
    closing: bytes,
) -> None:
    reports: list[DisconnectReason] = []
    async with trame_async.serve(
        "127.0.0.1", 0, on_disconnect=lambda _r, why: reports.append(why)
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(closing)
            await read_eof(reader)  # no ERROR frame: no byte at all before the close
        finally:
            await close_writer(writer)
        assert server.clients == []


async def test_goodbye_before_hello_is_not_unexpected_frame_but_ping_is() -> None:
    async with trame_async.serve("127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(ping(1))
            kind, body = await asyncio.wait_for(read_frame(reader), 5)
            assert (kind, ErrorFrame.parse(body).error_code) == (
                Kind.ERROR,
                ErrorCode.UNEXPECTED_FRAME,
            )
            await read_eof(reader)
        finally:
            await close_writer(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(frame(0x7F, b"TRAM"))
            assert (await read_until_error(reader)).error_code is ErrorCode.BAD_HANDSHAKE
        finally:
            await close_writer(writer)


# --- the server relays only what a conforming receiver accepts -------------------------------


def _data_frame(code: bytes, fmt: bytes, value: bytes, kind: int = Kind.MULTICAST) -> bytes:
    return frame(kind, code + bytes((len(fmt),)) + fmt + value)


#: (MULTICAST the server must refuse at its sender, the code it answers). Each one a struct-based
#: receiver would read, but a conforming one refuses: relaying it would make one client cut (or
#: mislead) every strict one.
REFUSED_AT_SENDER = [
    # "Whitespace MUST NOT be sent": struct ignores it between items.
    pytest.param(_data_frame(b"ABC", b"<h h", bytes(4)), ErrorCode.BAD_FORMAT, id="space"),
    pytest.param(_data_frame(b"ABC", b"<h\nh", bytes(4)), ErrorCode.BAD_FORMAT, id="newline"),
    pytest.param(_data_frame(b"POS", b"<d d", bytes(16)), ErrorCode.BAD_FORMAT, id="space-known"),
    # "?" is the byte 0 or 1: a registered BOL, and a '?' of a code the server does not know.
    pytest.param(_data_frame(b"BOL", b"<?", b"\x02"), ErrorCode.BAD_VALUE, id="bool-2"),
    pytest.param(_data_frame(b"ABC", b"<h2?", bytes(3) + b"\xff"), ErrorCode.BAD_VALUE, id="bool"),
    # A 'p' length byte above min(count - 1, 255).
    pytest.param(_data_frame(b"ABC", b"<4p", b"\x04abc"), ErrorCode.BAD_VALUE, id="pascal"),
    pytest.param(_data_frame(b"ABC", b"<q1p", bytes(8) + b"\x01"), ErrorCode.BAD_VALUE, id="1p"),
]


@pytest.mark.parametrize(("bad", "code"), REFUSED_AT_SENDER)
@pytest.mark.parametrize("kind", [Kind.MULTICAST, Kind.DATA])
def test_server_core_refuses_what_a_conforming_receiver_refuses(
    bad: bytes, code: ErrorCode, kind: Kind
) -> None:
    core = _open_server()
    good = trame_async.REGISTRY.encode(INT, 1)
    bad = bad[:4] + bytes((kind,)) + bad[5:]
    # Twice: the second time the format is known to the codec's caches, and still refused.
    for _ in range(2):
        core = _open_server()
        out = core.receive_data(good + bad + good, 1.0)
        assert [bytes(f) for f in out] == [good[4:]]
        assert _errors(core.outgoing) == [code]


def test_pascal_string_length_rule_for_decoders() -> None:
    # "p": the length byte is at most min(count - 1, 255); above it the value is refused, not cut.
    reg = trame_async.Registry(builtins=False)
    name = reg.register("NAM", "<4p")
    assert reg.decode(_data_frame(b"NAM", b"<4p", b"\x03abc"))[1] == b"abc"
    assert reg.decode(_data_frame(b"NAM", b"<4p", b"\x00xyz"))[1] == b""  # padding ignored
    for length in (4, 5, 255):
        with pytest.raises(trame_async.BadValueError, match="'p' length at most 3"):
            reg.decode(_data_frame(b"NAM", b"<4p", bytes([length]) + b"abc"))
    with pytest.raises(trame_async.BadValueError):  # an unregistered code: the same rule
        reg.decode_frame(_data_frame(b"XYZ", b"<4p", b"\x09abc")[4:], strict=False)
    assert name.can_refuse


def test_value_the_servers_class_refuses_is_refused_without_a_hook() -> None:
    # BAD_VALUE at the sender even when no on_multicast hook decodes the value.
    reg = trame_async.Registry()
    reg.register("RDG", "<q", Reading)
    core = ServerCore(7, ServerLimits(), 0.0, registry=reg)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    core.outgoing.clear()
    good, bad = _data_frame(b"RDG", b"<q", INT.pack(3)), _data_frame(b"RDG", b"<q", INT.pack(-3))
    assert [bytes(f) for f in core.receive_data(good, 1.0)] == [good[4:]]
    assert core.receive_data(bad, 1.0) == []
    assert _errors(core.outgoing) == [ErrorCode.BAD_VALUE]


def test_plain_numeric_formats_stay_on_the_size_check_fast_path() -> None:
    # Only types that can refuse a value of the right size are decoded by the relay check.
    reg = trame_async.Registry()
    reg.register("RDG", "<q", Reading)
    reg.register("NTP", "<hh")
    for code, fmt in ((b"INT", b"<q"), (b"POS", b"<dd"), (b"NTP", b"<hh")):
        assert reg.sizes[code + bytes((len(fmt),)) + fmt] == struct_size(fmt)
    for code, fmt in ((b"BOL", b"<?"), (b"RDG", b"<q")):
        assert code + bytes((len(fmt),)) + fmt not in reg.sizes
    # Unknown codes: learnt once, unless a value may be refused or the format spells "!".
    for fmt, fast in (
        (b"<i", True),
        (b">i", True),
        (b"<?", False),
        (b"<2p", False),
        (b"!i", False),
    ):
        body = _data_frame(b"UNK", fmt, bytes(struct_size(fmt)))[4:]
        reg.check_body(body, 1)
        assert (body[1 : 5 + len(fmt)] in reg.sizes) is fast, fmt


def struct_size(fmt: bytes) -> int:
    return struct.calcsize(fmt.decode())


# --- "!" is ">" ---------------------------------------------------------------------------------


def test_bang_is_big_endian_for_the_codec() -> None:
    reg = trame_async.Registry(builtins=False)
    temp = reg.register("TMP", "!hB")
    assert temp.fmt == ">hB"  # one spelling, so every peer registers the same format
    assert reg.encode(temp, (-40, 3)) == _data_frame(b"TMP", b">hB", b"\xff\xd8\x03")
    # A frame spelling it "!" is the registered type all the same (not VALUE_SIZE_MISMATCH).
    assert reg.decode(_data_frame(b"TMP", b"!hB", b"\xff\xd8\x03")) == (temp, (-40, 3))
    assert reg.decode_frame(_data_frame(b"XYZ", b"!h", b"\x00\x05")[4:], strict=False).value == 5
    assert (
        reg.decode_frame(_data_frame(b"XYZ", b"!h", b"\x00\x05")[4:], strict=False).trame.fmt
        == ">h"
    )


@pytest.mark.parametrize("kind", [Kind.MULTICAST, Kind.DATA])
def test_server_core_hands_on_a_bang_format_as_big_endian(kind: Kind) -> None:
    core = _open_server()
    data = _data_frame(b"XYZ", b"!hB", b"\xff\xd8\x03", kind)
    for _ in range(2):  # the second time from the codec's caches
        (out,) = core.receive_data(data, 1.0)
        assert bytes(out) == _data_frame(b"XYZ", b">hB", b"\xff\xd8\x03", kind)[4:]
    assert not core.closed


# --- over real sockets: the sender alone is cut, the others receive only good frames ---------


async def test_refused_multicasts_reach_no_one_and_cut_their_sender_alone() -> None:
    reg = trame_async.Registry()
    reg.register("TMP", ">h")
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port, registry=reg) as strict,
    ):
        for bad, code in [(p.values[0], p.values[1]) for p in REFUSED_AT_SENDER]:
            reader, writer = await raw_handshake(server.port)
            try:
                writer.write(bad)
                assert (await read_until_error(reader)).error_code is code
                await read_eof(reader)
            finally:
                await close_writer(writer)
        # A "!h" of a code the server does not know reaches a client that registered ">h".
        reader, writer = await raw_handshake(server.port)
        try:
            writer.write(_data_frame(b"TMP", b"!h", b"\x01\x02"))
            message = await strict.receive(timeout=5)
        finally:
            await close_writer(writer)
        assert (message.trame, message.value) == ("TMP", 0x0102)
        # Nothing refused was relayed before it, and the strict client is still connected.
        server.multicast(INT, 9)
        assert (await strict.receive(timeout=5)).value == 9


# --- timeouts and the heartbeat settings ------------------------------------------------------


def test_welcome_without_heartbeat_says_0_and_0() -> None:
    # WELCOME's heartbeat_timeout_ms is "always 0 when heartbeat_interval_ms is 0": the server
    # used to send 0/20000, against the document's example.
    core = _server(heartbeat_interval=None, heartbeat_timeout=20.0)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    (welcome,) = [Welcome.parse(f[1:]) for f in FrameParser().feed(b"".join(core.outgoing))]
    assert (welcome.heartbeat_interval, welcome.heartbeat_timeout) == (None, None)
    raw = core.outgoing[0]
    assert raw[15:23] == bytes(8)
    # With a heartbeat, both values go out as set.
    core = _server(heartbeat_interval=5.0, heartbeat_timeout=7.0)
    core.receive_data(Hello(PROTOCOL_VERSION, 0, b"").encode(), 0.0)
    welcome = Welcome.parse(FrameParser().feed(core.outgoing[0])[0][1:])
    assert (welcome.heartbeat_interval, welcome.heartbeat_timeout) == (5.0, 7.0)


def test_client_ignores_the_timeout_when_the_heartbeat_is_off() -> None:
    core = ClientCore(0.0)
    core.receive_data(Welcome(PROTOCOL_VERSION, 0, 3, None, 20.0, 1 << 20).encode(), 0.0)
    assert core.next_timer() is None
    core.handle_timer(1e6)
    assert not core.closed


@pytest.mark.parametrize(
    ("handshake", "frame_timeout", "at", "expected"),
    [
        # Both due at once: the handshake timeout wins.
        (1.0, 1.0, 1.0, ErrorCode.HANDSHAKE_TIMEOUT),
        # Both overdue when the timer runs, the frame's first: still the handshake timeout.
        (2.0, 1.0, 5.0, ErrorCode.HANDSHAKE_TIMEOUT),
        # The frame deadline alone has passed.
        (10.0, 1.0, 1.5, ErrorCode.FRAME_TIMEOUT),
    ],
)
@pytest.mark.parametrize("sent", [3, 7, 12], ids=lambda n: f"{n}-bytes")
def test_handshake_timeout_takes_precedence_over_the_frame_timeout(
    handshake: float, frame_timeout: float, at: float, expected: ErrorCode, sent: int
) -> None:
    # An incomplete HELLO: shorter than the 9 bytes the server waits for before parsing, or not.
    hello = Hello(PROTOCOL_VERSION, 0, b"token").encode()
    core = _server(handshake_timeout=handshake, frame_timeout=frame_timeout)
    core.receive_data(hello[:sent], 0.0)
    assert core.next_timer() == min(handshake, frame_timeout)
    core.handle_timer(at)
    assert _errors(core.outgoing) == [expected]


def test_frame_clock_runs_from_the_first_byte_even_without_a_handshake_timeout() -> None:
    core = _server(handshake_timeout=None, frame_timeout=2.0)
    core.receive_data(b"\x00\x00", 1.0)
    assert core.next_timer() == 3.0
    core.handle_timer(3.0)
    assert _errors(core.outgoing) == [ErrorCode.FRAME_TIMEOUT]


# --- bounded work for formats the server does not know -----------------------------------------


def _unknown(n: int) -> bytes:
    """A MULTICAST of an unregistered code with the ``n``-th of endless distinct formats."""
    fmt = b"<%dx%s" % (n, b"b")  # n padding bytes then one byte: every n a new format
    return _data_frame(b"UNK", fmt, bytes(n + 1))


def test_a_client_making_the_server_learn_too_many_formats_is_refused() -> None:
    core = _open_server(max_unknown_formats=5)
    frames = [_unknown(n) for n in range(5)]
    # The same formats again, and variable values of every length, cost nothing more.
    frames += [_unknown(n) for n in range(5)]
    frames += [_data_frame(b"VAR", b"<%ds" % n, bytes(n)) for n in range(50)]
    assert len(core.receive_data(b"".join(frames), 1.0)) == len(frames)
    assert not core.closed
    out = core.receive_data(_unknown(5) + _unknown(0), 1.0)
    assert out == []
    assert _errors(core.outgoing) == [ErrorCode.TOO_MANY_FORMATS]
    assert core.close_reason is DisconnectReason.PROTOCOL_ERROR
    # The limit is per connection: another client starts from zero.
    other = _open_server(max_unknown_formats=5)
    assert len(other.receive_data(_unknown(5), 1.0)) == 1


def test_unknown_variable_values_are_checked_without_filling_the_cache() -> None:
    reg = trame_async.Registry()
    before = dict(reg.sizes)
    for n in range(3000):
        assert reg.check_body(_data_frame(b"VAR", b"<%ds" % n, bytes(n))[4:], 1) is False
    assert reg.sizes == before and not reg._generic
    with pytest.raises(trame_async.ValueSizeMismatchError):
        reg.check_body(_data_frame(b"VAR", b"<5s", bytes(4))[4:], 1)
    with pytest.raises(trame_async.BadFormatError):
        reg.check_body(_data_frame(b"\x00AR", b"<5s", bytes(5))[4:], 1)


def test_endless_new_formats_evict_one_format_each_not_the_whole_cache() -> None:
    # The cache was wiped every 1024 new formats, so every format in use then cost a compile
    # again, all at once. Now each new format evicts the oldest alone, and costs one compile.
    reg = trame_async.Registry()
    compiled = 0
    real_struct = struct.Struct

    def counting(fmt: str) -> struct.Struct:
        nonlocal compiled
        compiled += 1
        return real_struct(fmt)

    heads = [_unknown(n)[5 : 5 + 4 + _unknown(n)[8]] for n in range(1100)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec_module.struct, "Struct", counting)
        for n in range(1100):
            reg.check_body(_unknown(n)[4:], 1)
    assert compiled == 2 * 1100  # the format's struct and its type's: once per format
    assert len(reg._generic) == 1024
    assert [head in reg.sizes for head in heads] == [False] * 76 + [True] * 1024
    assert all(head in reg.sizes for head in (b"INT\x02<q", b"POS\x03<dd"))
