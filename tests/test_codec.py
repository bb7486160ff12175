"""Tests of the sans-I/O codec: trame types, their registry, and data frames.

Round trips of every built-in type over its whole range, registration rules, value checks, one row
per malformed-input class, and fuzzing: whatever the bytes, decoding returns or raises a
:class:`~trame_async.TrameError`, never another exception.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import string
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from helpers import Reading
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trame_async
from trame_async import (
    BOL,
    BYT,
    FLT,
    INT,
    POS,
    REGISTRY,
    STR,
    BadFormatError,
    CodecError,
    ErrorCode,
    FrameTooLargeError,
    InvalidTextError,
    Kind,
    Message,
    Position,
    ProtocolError,
    RegistrationError,
    Registry,
    TrailingDataError,
    Trame,
    TrameError,
    TruncatedFrameError,
    UnexpectedFrameError,
    UnknownKindError,
    UnknownTrameError,
    ValueMismatchError,
    ValueSizeMismatchError,
    decode,
    encode,
)
from trame_async.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_LENGTH,
    RELAY_OVERHEAD,
    SENDER,
    ErrorFrame,
    FrameParser,
    Goodbye,
    Hello,
    Welcome,
    dropped_notice,
    ping,
    pong,
)
from trame_async.wire import frame as make_frame

FUZZ = settings(max_examples=300, deadline=None)
FEW = settings(max_examples=25, deadline=None)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def largest_variable_value() -> int:
    """Return the largest STR/BYT value (in bytes) whose MULTICAST fits in the default frame size."""
    n = DEFAULT_MAX_FRAME_SIZE
    while 1 + 3 + 1 + len(f"<{n}s") + n > DEFAULT_MAX_FRAME_SIZE:
        n -= 1
    return n


MAX_VARIABLE = largest_variable_value()


def data_body(code: bytes, fmt: bytes, value: bytes) -> bytes:
    """Return a data body (code, fmt_len, fmt, value) without validation."""
    return code + bytes((len(fmt),)) + fmt + value


def data_frame(code: bytes, fmt: bytes, value: bytes, kind: int = Kind.MULTICAST) -> bytes:
    """Return a whole data frame of ``kind`` (RELAY gets sender 7), without validation."""
    prefix = SENDER.pack(7) if kind == Kind.RELAY else b""
    return make_frame(kind, prefix + data_body(code, fmt, value))


def same_float(a: float, b: float) -> bool:
    """Compare doubles bit for bit (NaN payloads and the sign of zero included)."""
    return struct.pack("<d", a) == struct.pack("<d", b)


# --- strategies --------------------------------------------------------------------------------

utf8_text = st.text(st.characters(codec="utf-8"))


@st.composite
def large_text(draw: st.DrawFn) -> str:
    """Text of up to the largest STR value, built by repeating a short non-empty piece."""
    piece = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4))
    size = draw(st.integers(0, MAX_VARIABLE))
    return piece * (size // len(piece.encode("utf-8")))


@st.composite
def large_bytes(draw: st.DrawFn) -> bytes:
    """Bytes of up to the largest BYT value, built by repeating a short piece."""
    piece = draw(st.binary(min_size=1, max_size=4))
    size = draw(st.integers(0, MAX_VARIABLE))
    return piece * (size // len(piece))


# --- round trips of the built-in types -------------------------------------------------------


@FUZZ
@given(st.integers(INT64_MIN, INT64_MAX))
@example(INT64_MIN)
@example(INT64_MAX)
@example(0)
@example(-1)
def test_int_round_trip(value: int) -> None:
    message, fmt = encode(INT, value)
    assert fmt == "<q"
    assert len(message) == 4 + 1 + 3 + 1 + 2 + 8
    trame, decoded = decode(message)
    assert (trame, decoded) == (INT, value)
    assert type(decoded) is int
    assert trame is INT


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True))
@example(math.nan)
@example(-math.nan)
@example(math.inf)
@example(-math.inf)
@example(-0.0)
@example(0.0)
@example(5e-324)
@example(1.7976931348623157e308)
def test_flt_round_trip(value: float) -> None:
    message, fmt = encode("FLT", value)
    assert fmt == "<d"
    trame, decoded = decode(message)
    assert trame == FLT
    assert same_float(decoded, value)
    if math.isnan(value):
        assert math.isnan(decoded)
    else:
        assert decoded == value


@pytest.mark.parametrize("value", [False, True])
def test_bol_round_trip(value: bool) -> None:
    message, fmt = encode(BOL, value)
    assert fmt == "<?"
    assert message[-1] == int(value)
    assert decode(message) == (BOL, value)


@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
def test_bol_refuses_a_byte_other_than_0_or_1(byte: int) -> None:
    # struct's "?" reads any nonzero byte as True, so two receivers could read one frame
    # differently: docs/protocol.md makes it a BAD_VALUE, refused as a value its type refuses.
    with pytest.raises(trame_async.BadValueError, match="'\\?' takes 0 or 1") as info:
        decode(data_frame(b"BOL", b"<?", bytes([byte])))
    assert info.value.error_code is ErrorCode.BAD_VALUE


@FUZZ
@given(utf8_text)
@example("")
@example("héllo wörld ☕ 𝄞")
@example("\x00")
def test_str_round_trip(value: str) -> None:
    message, fmt = encode(STR, value)
    raw = value.encode("utf-8")
    assert fmt == f"<{len(raw)}s"
    assert message.endswith(raw)
    trame, decoded = decode(message)
    assert (trame, decoded) == (STR, value)
    assert type(decoded) is str


@FEW
@given(large_text())
def test_str_round_trip_large(value: str) -> None:
    message, fmt = encode(STR, value)
    assert fmt == f"<{len(value.encode('utf-8'))}s"
    assert len(message) - 4 <= DEFAULT_MAX_FRAME_SIZE
    assert decode(message) == (STR, value)


def test_str_largest_value_fills_the_default_frame_size() -> None:
    value = "é" * (MAX_VARIABLE // 2) + "a" * (MAX_VARIABLE % 2)
    message, fmt = encode(STR, value)
    assert fmt == f"<{MAX_VARIABLE}s"
    assert len(message) - 4 == DEFAULT_MAX_FRAME_SIZE
    assert int.from_bytes(message[:4]) == DEFAULT_MAX_FRAME_SIZE
    assert decode(message) == (STR, value)


@pytest.mark.parametrize(
    ("trame", "value"),
    [
        (BYT, bytes(range(256)) * (MAX_VARIABLE // 256) + b"\xff" * (MAX_VARIABLE % 256)),
        (STR, "é" * (MAX_VARIABLE // 2) + "a" * (MAX_VARIABLE % 2)),
    ],
    ids=["BYT", "STR"],
)
def test_largest_variable_value_passes_the_frame_parser(trame: Trame, value: Any) -> None:
    # What a receiver with the default max_frame_size does: parse the stream, decode the frame.
    message, fmt = encode(trame, value)
    assert fmt == f"<{MAX_VARIABLE}s"
    parser = FrameParser()
    frames = parser.feed(message)
    assert len(frames) == 1
    assert parser.buffered == 0
    assert REGISTRY.decode_frame(frames[0]) == Message(0, trame, value, Kind.MULTICAST)
    # One byte more no longer fits: refused from the header alone.
    bigger = value + (b"\x00" if trame is BYT else "a")
    with pytest.raises(FrameTooLargeError) as info:
        FrameParser().feed(encode(trame, bigger)[0][:5])
    assert (info.value.size, info.value.limit) == (
        DEFAULT_MAX_FRAME_SIZE + 1,
        DEFAULT_MAX_FRAME_SIZE,
    )


@FUZZ
@given(st.binary())
@example(b"")
@example(bytes(range(256)))
def test_byt_round_trip(value: bytes) -> None:
    message, fmt = encode(BYT, value)
    assert fmt == f"<{len(value)}s"
    trame, decoded = decode(message)
    assert (trame, decoded) == (BYT, value)
    assert type(decoded) is bytes


@FEW
@given(large_bytes())
def test_byt_round_trip_large(value: bytes) -> None:
    message, fmt = encode("BYT", value)
    assert fmt == f"<{len(value)}s"
    assert decode(message) == (BYT, value)


def test_byt_accepts_bytearray_and_memoryview() -> None:
    assert decode(encode(BYT, bytearray(b"ab"))[0]) == (BYT, b"ab")
    assert decode(encode(BYT, memoryview(b"cd"))[0]) == (BYT, b"cd")


@FUZZ
@given(st.floats(), st.floats())
@example(math.nan, -0.0)
@example(math.inf, -math.inf)
def test_pos_round_trip(x: float, y: float) -> None:
    for value in ((x, y), Position(x, y), [x, y]):
        message, fmt = encode(POS, value)
        assert fmt == "<dd"
        trame, decoded = decode(message)
        assert trame == POS
        assert type(decoded) is Position
        assert same_float(decoded.x, x)
        assert same_float(decoded.y, y)


# --- round trips of user-registered types ---------------------------------------------------

#: Item types of portable formats, by the sizes they pack (checked below against struct).
_ITEM_TYPES = "bBhHiIqQefd?csp"


@st.composite
def user_formats(draw: st.DrawFn) -> str:
    """A portable struct format of 1 to 6 items (with counts and padding), at most 64 bytes."""
    order = draw(st.sampled_from("<>!"))
    items = []
    for char in draw(st.lists(st.sampled_from(_ITEM_TYPES), min_size=1, max_size=6)):
        if char == "s":
            count = draw(st.integers(0, 9))  # "0s" is one empty bytes value
        elif char == "p":
            count = draw(st.integers(1, 9))  # "0p" is refused
        else:
            count = draw(st.integers(1, 3))
        items.append(f"{count}{char}" if count != 1 or draw(st.booleans()) else char)
        if draw(st.integers(0, 4)) == 0:
            items.append(draw(st.sampled_from(["x", "2x"])))
    return order + "".join(items)


def same_value(a: Any, b: Any) -> bool:
    """Compare decoded items: floats by value and sign, NaN equal to NaN; the rest with ==."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(user_formats(), st.data(), st.sampled_from(["plain", "namedtuple", "dataclass"]))
def test_user_type_round_trip(fmt: str, data: st.DataObject, shape: str) -> None:
    size = struct.calcsize(fmt)
    # Values the format can hold exactly: struct's own reading of random bytes ("e" and "f"
    # floats are then representable, "p" strings short enough, "?" a bool).
    raw = data.draw(st.binary(min_size=size, max_size=size), label="raw value")
    items = struct.unpack(fmt, raw)
    names = [f"f{i}" for i in range(len(items))]
    cls: Any = None
    if shape == "namedtuple":
        cls = collections.namedtuple("Value", names)  # type: ignore[misc]
    elif shape == "dataclass":
        cls = dataclasses.make_dataclass("Value", names)
    reg = Registry()
    trame = reg.register("USR", fmt, cls)
    assert trame.size == size
    if cls is not None:
        value: Any = cls(*items)
    else:
        value = items[0] if len(items) == 1 else items
    message = reg.encode(trame, value)
    packed = struct.pack(fmt, *items)
    assert message.endswith(packed)  # the value as struct packs it, nothing else
    got_trame, got = reg.decode(message)
    assert got_trame is trame
    if cls is not None:
        assert type(got) is cls
        got_items = tuple(getattr(got, name) for name in names)
    else:
        got_items = got if len(items) > 1 else (got,)
    assert len(got_items) == len(items)
    assert all(same_value(a, b) for a, b in zip(got_items, items, strict=True)), (got, items)
    # The same value relayed, through the stream parser.
    relay = reg.encode(trame, value, Kind.RELAY)
    (frame,) = FrameParser().feed(relay)
    msg = reg.decode_frame(frame)
    assert msg.trame is trame
    assert msg.kind == Kind.RELAY
    assert reg.encode(trame, msg.value) == message or any(
        isinstance(item, float) and math.isnan(item) for item in items
    )


@pytest.mark.parametrize(
    ("trame", "value"),
    [
        (INT, -5),
        (FLT, 2.5),
        (BOL, True),
        (STR, "été"),
        (BYT, b"\x00\xff"),
        (POS, Position(1.0, -1.0)),
    ],
)
@pytest.mark.parametrize("kind", [Kind.MULTICAST, Kind.RELAY, Kind.DATA])
def test_round_trip_in_every_data_kind(trame: Trame, value: Any, kind: Kind) -> None:
    message = REGISTRY.encode(trame, value, kind)
    assert message[4] == kind
    assert int.from_bytes(message[:4]) == len(message) - 4
    assert decode(message) == (trame, value)
    # A RELAY built locally is the server's own: sender 0.
    assert REGISTRY.decode_frame(memoryview(message)[4:]) == Message(0, trame, value, kind)


def test_relay_carries_the_sender_id() -> None:
    message = data_frame(b"INT", b"<q", struct.pack("<q", 9), Kind.RELAY)
    msg = REGISTRY.decode_frame(message[4:])
    assert msg == Message(7, INT, 9, Kind.RELAY)
    assert decode(message) == (INT, 9)


# --- encode() ------------------------------------------------------------------------------


def test_encode_exact_bytes_of_int() -> None:
    message, fmt = encode("INT", 42)
    assert message == bytes.fromhex("0000000f 10 494e54 02 3c71 2a00000000000000")
    assert fmt == "<q"


@pytest.mark.parametrize(
    ("trame", "value", "fmt"),
    [
        (INT, 1, "<q"),
        (FLT, 1.0, "<d"),
        (BOL, False, "<?"),
        (POS, (0.0, 0.0), "<dd"),
        (STR, "", "<0s"),
        (STR, "abc", "<3s"),
        (STR, "é", "<2s"),
        (STR, "x" * 1000, "<1000s"),
        (BYT, b"", "<0s"),
        (BYT, b"12345", "<5s"),
    ],
)
def test_encode_returns_the_format_sent(trame: Trame, value: Any, fmt: str) -> None:
    message, got = encode(trame, value)
    assert got == fmt
    # The format is also the one written in the frame, and it sizes the value exactly.
    fmt_len = message[8]
    assert message[9 : 9 + fmt_len].decode("ascii") == fmt
    assert len(message) - 9 - fmt_len == struct.calcsize(fmt)


def test_encode_accepts_trame_or_code() -> None:
    assert encode("POS", (1.0, 2.0)) == encode(POS, (1.0, 2.0))


def test_encode_unknown_code() -> None:
    with pytest.raises(UnknownTrameError, match="'QQQ'") as info:
        encode("QQQ", 1)
    assert info.value.code == "QQQ"
    assert info.value.error_code == ErrorCode.UNKNOWN_TRAME
    assert isinstance(info.value, LookupError)


# --- registration ----------------------------------------------------------------------------


class Velocity(NamedTuple):
    dx: float
    dy: float


class Single(NamedTuple):
    n: int


class Triple(NamedTuple):
    a: int
    b: int
    c: int


@dataclasses.dataclass(frozen=True)
class Sample:
    channel: int
    value: float


def test_register_plain_call() -> None:
    reg = Registry(builtins=False)
    vel = reg.register("VEL", "<ff")
    assert isinstance(vel, Trame)
    assert vel == "VEL"
    assert vel.code == "VEL"
    assert hash(vel) == hash("VEL")
    assert vel.fmt == "<ff"
    assert vel.size == 8
    assert vel.cls is None
    assert not vel.variable
    assert reg["VEL"] is vel
    assert "VEL" in reg
    message = reg.encode(vel, (1.5, -2.5))
    assert reg.decode(message) == (vel, (1.5, -2.5))


def test_register_single_item_decodes_a_scalar() -> None:
    reg = Registry(builtins=False)
    cnt = reg.register("CNT", "<H")
    assert reg.decode(reg.encode(cnt, 65535)) == (cnt, 65535)


@pytest.mark.parametrize(
    ("fmt", "normalised"),
    [("ff", "<ff"), ("< f f", "<ff"), (">ih", ">ih"), ("!I", ">I"), ("2s", "<2s"), ("*s", "<*s")],
)
def test_register_normalises_the_format(fmt: str, normalised: str) -> None:
    reg = Registry(builtins=False)
    assert reg.register("FMT", fmt).fmt == normalised


def test_register_big_endian_format_round_trip() -> None:
    reg = Registry(builtins=False)
    net = reg.register("NET", "!Ih")
    message = reg.encode(net, (0x01020304, -2))
    assert message.endswith(b"\x01\x02\x03\x04\xff\xfe")
    assert reg.decode(message) == (net, (0x01020304, -2))


def test_register_with_cls_argument() -> None:
    reg = Registry(builtins=False)
    vel = reg.register("VEL", "<dd", Velocity)
    assert vel.cls is Velocity
    assert reg.decode(reg.encode(vel, Velocity(1.0, 2.0))) == (vel, Velocity(1.0, 2.0))
    assert type(reg.decode(reg.encode(vel, (1.0, 2.0)))[1]) is Velocity


def test_register_as_decorator_on_namedtuple() -> None:
    reg = Registry(builtins=False)

    @reg.register("VEL", "<ff")
    class Vel(NamedTuple):
        dx: float
        dy: float

    assert Vel.__name__ == "Vel"  # the decorator returns the class itself
    trame = reg["VEL"]
    assert trame.cls is Vel
    _, value = reg.decode(reg.encode("VEL", Vel(0.5, 0.25)))
    assert value == Vel(0.5, 0.25)
    assert type(value) is Vel


def test_register_as_decorator_on_single_field_namedtuple() -> None:
    reg = Registry(builtins=False)
    reg.register("ONE", "<q")(Single)
    assert reg.decode(reg.encode("ONE", Single(-3))) == ("ONE", Single(-3))


def test_register_as_decorator_on_dataclass() -> None:
    reg = Registry(builtins=False)

    @reg.register("SMP", "<Hd")
    @dataclasses.dataclass
    class Smp:
        channel: int
        value: float

    trame, value = reg.decode(reg.encode("SMP", Smp(3, 0.5)))
    assert trame.cls is Smp
    assert value == Smp(3, 0.5)


def test_register_single_field_dataclass() -> None:
    @dataclasses.dataclass
    class Level:
        db: float

    reg = Registry(builtins=False)
    reg.register("LVL", "<f", Level)
    assert reg.decode(reg.encode("LVL", Level(0.5))) == ("LVL", Level(0.5))


@pytest.mark.parametrize(("cls", "value"), [(str, "ça"), (bytes, b"\x00ab")])
def test_register_variable_length(cls: type[Any], value: Any) -> None:
    reg = Registry(builtins=False)
    trame = reg.register("VAR", "<*s", cls)
    assert trame.variable
    assert trame.size is None
    assert trame.cls is cls
    message = reg.encode(trame, value)
    assert reg.decode(message) == (trame, value)


def test_register_duplicate_code_refused() -> None:
    reg = Registry(builtins=False)
    reg.register("DUP", "<q")
    with pytest.raises(RegistrationError, match=r"'DUP' is already registered with format '<q'"):
        reg.register("DUP", "<d")
    assert reg["DUP"].fmt == "<q"


@pytest.mark.parametrize("code", ["INT", "FLT", "BOL", "STR", "BYT", "POS"])
def test_register_builtin_code_refused(code: str) -> None:
    fmt = "<hh" if code == "INT" else "<q"  # INT is "<q": registering it again would be a no-op
    with pytest.raises(RegistrationError, match="already registered"):
        Registry().register(code, fmt)


@pytest.mark.parametrize(
    "code",
    ["AB", "ABCD", "", "ÀBC", "A\x00B", "A\tB", "AB\x7f", "A\nB", "\ud800AB"],
    ids=["2-chars", "4-chars", "empty", "non-ascii", "nul", "tab", "del", "newline", "surrogate"],
)
def test_register_bad_code_refused(code: str) -> None:
    with pytest.raises(RegistrationError, match="3 printable ASCII characters") as info:
        Registry(builtins=False).register(code, "<q")
    assert repr(code) in str(info.value)


def test_register_non_str_code_refused() -> None:
    with pytest.raises(RegistrationError, match="must be a str"):
        Registry(builtins=False).register(123, "<q")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("@q", "native byte order"),
        ("=q", "native byte order"),
        ("@", "native byte order"),
        ("", "empty"),
        ("   ", "empty"),
        ("x", "only padding"),
        ("<4x", "only padding"),
        ("<0q", "only padding"),
        ("<zz", "not a struct format"),
        ("<n", "not a struct format"),  # ssize_t has no standard size
        ("<P", "not a struct format"),
        ("<q0p", "zero-length Pascal string"),
        ("<é", "must be ASCII"),
        ("<" + "q" * 255, "at most 255 characters"),
        # A variable-length value is always sent as "<Ns": any other '*' format is refused.
        (">*s", r"only allowed in '<\*s'"),
        ("!*s", r"only allowed in '<\*s'"),
        ("<*sq", r"only allowed in '<\*s'"),
        ("<q*s", r"only allowed in '<\*s'"),
        ("<*p", r"only allowed in '<\*s'"),
        ("<2*s", r"only allowed in '<\*s'"),
    ],
)
def test_register_bad_format_refused(fmt: str, message: str) -> None:
    with pytest.raises(RegistrationError, match=message) as info:
        Registry(builtins=False).register("BAD", fmt)
    assert "'BAD'" in str(info.value)


def test_register_non_str_format_refused() -> None:
    with pytest.raises(RegistrationError, match="must be a str"):
        Registry(builtins=False).register("BAD", b"<q")  # type: ignore[arg-type]


def test_register_huge_format_does_not_allocate_its_size() -> None:
    # A format's items are counted without unpacking a zero buffer of its size.
    trame = Registry(builtins=False).register("BIG", "<2000000000s2000000000x q")
    assert trame.size == 4_000_000_008


def largest_fixed_size(fmt_len: int) -> int:
    """Return the largest value size whose RELAY frame's length still fits the u32 length field."""
    return MAX_LENGTH - 1 - RELAY_OVERHEAD - (3 + 1 + fmt_len)


def test_register_largest_fixed_size_that_fits_a_frame() -> None:
    size = largest_fixed_size(len("<4294967274s"))
    assert size == 4_294_967_274
    trame = Registry(builtins=False).register("BIG", f"<{size}s")
    assert trame.size == size
    assert 1 + RELAY_OVERHEAD + len(trame.head) + size == MAX_LENGTH


@pytest.mark.parametrize(
    "fmt",
    ["<4294967275s", "<5000000000s", "<2000000000s8000000000x q", "<600000000q", "<4294967290x?"],
)
def test_register_fixed_size_beyond_any_frame_refused(fmt: str) -> None:
    # Refused at registration, not with a struct.error at the first encode.
    class Huge(NamedTuple):
        data: Any

    reg = Registry(builtins=False)
    with pytest.raises(RegistrationError, match=r"more than the \d+ a frame can carry") as info:
        reg.register("BIG", fmt, Huge if fmt.endswith("s") else None)
    assert "'BIG'" in str(info.value)
    assert "BIG" not in reg
    assert not hasattr(Huge, "__trame__")  # a refused type does not mark its class


@pytest.mark.parametrize(
    ("fmt", "cls"),
    [("<dd", Triple), ("<ddd", Velocity), ("<q", Velocity), ("<qq", Single), ("<ddd", Sample)],
)
def test_register_field_count_mismatch_refused(fmt: str, cls: type[Any]) -> None:
    with pytest.raises(RegistrationError, match="fields but format") as info:
        Registry(builtins=False).register("MIS", fmt, cls)
    assert cls.__name__ in str(info.value)
    assert fmt in str(info.value)


def test_register_decorator_field_count_mismatch_refused() -> None:
    reg = Registry(builtins=False)
    with pytest.raises(RegistrationError, match="Triple has 3 fields but format '<dd'"):
        reg.register("MIS", "<dd")(Triple)


@pytest.mark.parametrize("cls", [int, Velocity, list])
def test_register_variable_length_with_bad_cls_refused(cls: type[Any]) -> None:
    with pytest.raises(RegistrationError, match="carries str"):
        Registry(builtins=False).register("VAR", "<*s", cls)


def test_register_cls_not_a_class_refused() -> None:
    with pytest.raises(RegistrationError, match="must be a class"):
        Registry(builtins=False).register("CLS", "<q", 5)  # type: ignore[arg-type]


def test_register_binding_twice_refused() -> None:
    trame = Registry(builtins=False).register("TWO", "<dd", Velocity)
    with pytest.raises(RegistrationError, match="already has cls Velocity"):
        trame(Position)


def test_registration_errors_are_codec_errors() -> None:
    with pytest.raises(CodecError):
        Registry(builtins=False).register("AB", "<q")
    with pytest.raises(ValueError):
        Registry(builtins=False).register("AB", "<q")


# --- the default registry ------------------------------------------------------------------


def _unused_codes() -> Iterator[str]:
    for chars in itertools.product("tuvw", string.digits, string.digits):
        code = "".join(chars)
        if code not in REGISTRY:
            yield code


@pytest.fixture
def global_code() -> str:
    """Return a code not yet in the default registry (tests there cannot be undone)."""
    return next(_unused_codes())


def test_global_register_and_registered(global_code: str) -> None:
    trame = trame_async.register(global_code, "<hh")
    assert trame_async.registered()[global_code] == ("<hh", None)
    message, fmt = encode(global_code, (1, -1))
    assert fmt == "<hh"
    assert decode(message) == (trame, (1, -1))
    # The same registration again (a re-run notebook cell) is a no-op; another format is not.
    assert trame_async.register(global_code, "<hh") is trame
    with pytest.raises(RegistrationError, match="already registered"):
        trame_async.register(global_code, "<hH")


def test_registering_the_same_class_again_rebinds_it(global_code: str) -> None:
    """A reloaded module defines its NamedTuple again: the new class decodes from then on."""
    first = None
    for _ in range(2):

        @trame_async.register(global_code, "<ff")
        class Velocity(NamedTuple):
            dx: float
            dy: float

        first = first or Velocity
    assert Velocity is not first
    assert type(decode(encode(global_code, Velocity(1.0, 2.0))[0])[1]) is Velocity

    class Other(NamedTuple):
        dx: float
        dy: float

    with pytest.raises(RegistrationError, match="already"):
        trame_async.register(global_code, "<ff", Other)


def test_a_value_that_does_not_fit_names_the_trame_its_fields_and_what_was_given() -> None:
    with pytest.raises(ValueMismatchError) as info:
        encode(POS, 1.0)
    assert "'POS'" in str(info.value) and "2 items (x, y)" in str(info.value)
    assert "got a single float" in str(info.value) and "partial" not in str(info.value)
    with pytest.raises(ValueMismatchError, match=r"2 items \(x, y\), got 3"):
        encode(POS, (1.0, 2.0, 3.0))


def test_global_register_as_decorator(global_code: str) -> None:
    @trame_async.register(global_code, "<HH")
    class Size(NamedTuple):
        w: int
        h: int

    assert trame_async.registered()[global_code] == ("<HH", Size)
    assert decode(encode(global_code, Size(640, 480))[0]) == (global_code, Size(640, 480))


def test_registered_lists_the_builtins() -> None:
    listing = trame_async.registered()
    assert {code: listing[code] for code in ("INT", "FLT", "BOL", "STR", "BYT", "POS")} == {
        "INT": ("<q", None),
        "FLT": ("<d", None),
        "BOL": ("<?", None),
        "STR": ("<*s", str),
        "BYT": ("<*s", bytes),
        "POS": ("<dd", Position),
    }


def test_registry_listing() -> None:
    assert dict(Registry().listing()) == {
        "INT": ("<q", None),
        "FLT": ("<d", None),
        "BOL": ("<?", None),
        "STR": ("<*s", str),
        "BYT": ("<*s", bytes),
        "POS": ("<dd", Position),
    }
    reg = Registry(builtins=False)
    assert dict(reg.listing()) == {}
    assert len(reg) == 0
    reg.register("VEL", "<dd", Velocity)
    reg.register("TXT", "<*s", str)
    assert dict(reg.listing()) == {"VEL": ("<dd", Velocity), "TXT": ("<*s", str)}
    assert len(reg) == 2
    assert sorted(reg) == ["TXT", "VEL"]


def test_registry_lookup() -> None:
    reg = Registry()
    assert reg["POS"] is POS
    assert reg.get("POS") is POS
    assert reg.get("ZZZ") is None
    assert "ZZZ" not in reg
    assert 5 not in reg
    with pytest.raises(UnknownTrameError, match="'ZZZ'"):
        reg["ZZZ"]


def test_registries_are_independent() -> None:
    mine = Registry(builtins=False)
    mine.register("VEL", "<dd")
    assert "VEL" not in Registry()
    assert "INT" not in mine
    with pytest.raises(UnknownTrameError):
        mine.encode("INT", 1)


# --- values that do not fit ----------------------------------------------------------------

#: Types with the items struct packs lossily ("?" by truthiness, "s"/"p" padded or cut).
OWN = Registry(builtins=False)
S3 = OWN.register("S3S", "<3s")
P4 = OWN.register("P4P", "<4p")
P300 = OWN.register("P3H", "<300p")
MIX = OWN.register("MIX", "<h?3s2?2p")


@pytest.mark.parametrize(
    ("trame", "value"),
    [
        (INT, INT64_MAX + 1),
        (INT, INT64_MIN - 1),
        (INT, 2**100),
        (INT, "1"),
        (INT, 1.5),
        (INT, None),
        (FLT, "1.0"),
        (FLT, None),
        (FLT, 10**400),
        (POS, (1.0,)),
        (POS, (1.0, 2.0, 3.0)),
        (POS, 5),
        (POS, ("a", "b")),
        (POS, None),
        (STR, "\ud800"),
        (STR, "a\udfffb"),
        (STR, b"bytes"),
        (STR, 5),
        (BYT, "text"),
        (BYT, 5),
        (BYT, None),
        # struct would pack these, but they would not decode back to themselves.
        (BOL, "false"),
        (BOL, ""),
        (BOL, None),
        (BOL, 2),
        (BOL, -1),
        (BOL, 1.0),
        (BOL, [True]),
        (S3, b"a"),
        (S3, b""),
        (S3, b"abcd"),
        (S3, b"abcdef"),
        (S3, bytearray(b"ab")),
        (S3, "abc"),
        (P4, b"abcd"),
        (P4, b"abcdef"),
        (P300, b"x" * 256),
        (P300, b"x" * 299),
        (MIX, (1, True, b"ab", True, False, b"a")),
        (MIX, (1, True, b"abc", 2, False, b"a")),
        (MIX, (1, True, b"abc", True, None, b"a")),
        (MIX, (1, "yes", b"abc", True, False, b"a")),
        (MIX, (1, True, b"abc", True, False, b"ab")),
    ],
)
def test_value_mismatch(trame: Trame, value: Any) -> None:
    with pytest.raises(ValueMismatchError) as info:
        encode(trame, value)
    err = info.value
    assert (err.code, err.fmt) == (trame.code, trame.fmt)
    assert err.value is value
    assert f"trame {trame.code!r}" in str(err)
    assert repr(trame.fmt) in str(err)
    assert isinstance(err, CodecError)
    assert isinstance(err, ValueError)
    with pytest.raises(ValueMismatchError):
        trame.pack(value)


@pytest.mark.parametrize(
    ("trame", "value", "detail"),
    [
        (BOL, "false", "'?' takes True or False (or the int 0 or 1), not 'false'"),
        (S3, b"a", "'3s' takes exactly 3 bytes, not 1"),
        (S3, b"abcdef", "'3s' takes exactly 3 bytes, not 6"),
        (P4, b"abcd", "'4p' takes at most 3 bytes, not 4"),
        (P300, b"x" * 256, "'300p' takes at most 255 bytes, not 256"),
        (MIX, (1, True, b"abc", True, 2, b"a"), "item 4 (from 0): '?' takes True or False"),
        (MIX, (1, True, b"abc", True, False, b"ab"), "item 5 (from 0): '2p' takes at most 1"),
    ],
)
def test_value_mismatch_says_which_item_and_why(trame: Trame, value: Any, detail: str) -> None:
    with pytest.raises(ValueMismatchError) as info:
        encode(trame, value)
    assert detail in info.value.detail
    assert detail in str(info.value)


@pytest.mark.parametrize(
    ("trame", "value", "decoded"),
    [
        (BOL, 1, True),
        (BOL, 0, False),
        (S3, b"abc", b"abc"),
        (S3, bytearray(b"\x00\x01\x02"), b"\x00\x01\x02"),
        (P4, b"", b""),
        (P4, b"abc", b"abc"),
        (P300, b"y" * 255, b"y" * 255),
        (MIX, (-1, 1, b"abc", 0, True, b""), (-1, True, b"abc", False, True, b"")),
        (MIX, iter([7, False, b"xyz", True, True, b"q"]), (7, False, b"xyz", True, True, b"q")),
    ],
)
def test_checked_items_accept_values_that_round_trip(
    trame: Trame, value: Any, decoded: Any
) -> None:
    # True/False are the ints 1/0, so the decoded value equals what was given.
    message, _ = encode(trame, value)
    assert (REGISTRY if trame is BOL else OWN).decode(message) == (trame, decoded)
    if not isinstance(value, Iterator):
        assert decoded == value
        assert trame.pack(value) == message[9 + message[8] :]


@pytest.mark.parametrize("trame", [INT, POS, BOL, STR, BYT, MIX])
@pytest.mark.parametrize(
    "kind", [*sorted(set(Kind) - {Kind.MULTICAST, Kind.RELAY, Kind.DATA}), 0x7F]
)
def test_encode_refuses_a_kind_that_is_not_data(trame: Trame, kind: int) -> None:
    value = {INT: 1, POS: (0.0, 0.0), BOL: True, STR: "x", BYT: b"x"}.get(
        trame, (1, True, b"abc", True, False, b"")
    )
    registry = OWN if trame is MIX else REGISTRY
    with pytest.raises(CodecError, match="is not a data frame kind") as info:
        registry.encode(trame, value, kind)
    assert not isinstance(info.value, ValueMismatchError)  # the value is fine, the kind is not
    assert isinstance(info.value, ValueError)
    name = Kind(kind).name if kind in set(Kind) else str(kind)
    assert f"kind {name} " in str(info.value)


def test_value_mismatch_for_registered_classes() -> None:
    reg = Registry(builtins=False)
    reg.register("SMP", "<Hd", Sample)
    reg.register("VEL", "<dd", Velocity)
    with pytest.raises(ValueMismatchError):
        reg.encode("SMP", Sample(-1, 0.5))  # H is unsigned
    with pytest.raises(ValueMismatchError):
        reg.encode("SMP", (1, 0.5))  # no .channel attribute
    with pytest.raises(ValueMismatchError):
        reg.encode("VEL", Triple(1, 2, 3))


def test_value_mismatch_message_is_shortened() -> None:
    with pytest.raises(ValueMismatchError) as info:
        encode(INT, "x" * 1000)
    assert len(str(info.value)) < 300


# --- malformed data frames: one row per class ------------------------------------------------

INT_VALUE = struct.pack("<q", 42)
GOOD_INT = data_frame(b"INT", b"<q", INT_VALUE)


class Malformed(NamedTuple):
    """One malformed input class: the bytes, the error they raise and what its message says."""

    name: str
    message: bytes
    error: type[TrameError]
    code: ErrorCode
    mentions: tuple[str, ...]
    #: Fed as a byte stream to a FrameParser (default max_frame_size) rather than to decode().
    stream: bool = False


def receive_stream(message: bytes | memoryview) -> list[Message]:
    """Do what a peer does with bytes from its socket: cut them into frames, decode each one."""
    return [REGISTRY.decode_frame(frame) for frame in FrameParser().feed(message)]


_MALFORMED_ROWS: list[tuple[Any, ...]] = [
    ("empty", b"", TruncatedFrameError, ErrorCode.MALFORMED_FRAME, ("needs 5", "only 0")),
    ("3-byte header", b"\x00\x00\x00", TruncatedFrameError, ErrorCode.MALFORMED_FRAME, ("5",)),
    ("no kind byte", b"\x00\x00\x00\x05", TruncatedFrameError, ErrorCode.MALFORMED_FRAME, ("4",)),
    (
        "length 0",
        b"\x00\x00\x00\x00\x10",
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("needs 1", "only 0"),
    ),
    (
        "truncated body",
        GOOD_INT[:-3],
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("needs 15", "only 12"),
    ),
    (
        "length beyond a huge value",
        b"\xff\xff\xff\xff\x10INT",
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("4294967295",),
    ),
    (
        # The header alone: refused before any of the body is sent or buffered.
        "length beyond the maximum",
        (DEFAULT_MAX_FRAME_SIZE + 1).to_bytes(4, "big") + b"\x10",
        FrameTooLargeError,
        ErrorCode.FRAME_TOO_LARGE,
        ("1048577 bytes", "maximum frame size of 1048576"),
        True,
    ),
    (
        "length far beyond the maximum",
        b"\xff\xff\xff\xff",
        FrameTooLargeError,
        ErrorCode.FRAME_TOO_LARGE,
        ("4294967295 bytes",),
        True,
    ),
    (
        "body without code",
        make_frame(Kind.MULTICAST, b"IN"),
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("code and format length", "needs 4", "only 2"),
    ),
    (
        "format past the end",
        make_frame(Kind.MULTICAST, b"INT\x09<q"),
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("format", "needs 13", "only 6"),
    ),
    (
        "RELAY without sender",
        make_frame(Kind.RELAY, b"\x00\x00\x07"),
        TruncatedFrameError,
        ErrorCode.MALFORMED_FRAME,
        ("sender", "needs 4", "only 3"),
    ),
    (
        "unknown kind",
        make_frame(0x7F, data_body(b"INT", b"<q", INT_VALUE)),
        UnknownKindError,
        ErrorCode.UNKNOWN_KIND,
        ("0x7f",),
    ),
    (
        "kind 0",
        b"\x00\x00\x00\x01\x00",
        UnknownKindError,
        ErrorCode.UNKNOWN_KIND,
        ("0x00",),
    ),
    (
        "unknown code",
        data_frame(b"ZZZ", b"<q", INT_VALUE),
        UnknownTrameError,
        ErrorCode.UNKNOWN_TRAME,
        ("'ZZZ'",),
    ),
    (
        "code that is not printable ASCII",
        data_frame(b"I\x00T", b"<q", INT_VALUE),
        BadFormatError,
        ErrorCode.BAD_FORMAT,
        ("'I\\x00T'", "3 printable ASCII characters"),
    ),
    (
        "value shorter than its format",
        data_frame(b"INT", b"<q", INT_VALUE[:7]),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'INT'", "7 bytes", "needs 8"),
    ),
    (
        "value longer than its format",
        data_frame(b"POS", b"<dd", bytes(17)),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'POS'", "17 bytes", "needs 16"),
    ),
    (
        "STR value shorter than its format",
        data_frame(b"STR", b"<5s", b"abcd"),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'STR'", "4 bytes", "needs 5"),
    ),
    (
        "format other than the registered one",
        data_frame(b"INT", b"<i", INT_VALUE[:4]),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'INT'", "'<i'", "'<q'"),
    ),
    (
        "byte order other than the registered one",
        data_frame(b"INT", b">q", INT_VALUE),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'>q'", "'<q'"),
    ),
    (
        "STR format with a leading zero",
        data_frame(b"STR", b"<03s", b"abc"),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'STR'", "'<03s'", "'<3s'"),
    ),
    (
        "BYT format that is not <Ns",
        data_frame(b"BYT", b"<3B", b"abc"),
        ValueSizeMismatchError,
        ErrorCode.VALUE_SIZE_MISMATCH,
        ("'BYT'", "'<3B'"),
    ),
    (
        "invalid UTF-8 in STR",
        data_frame(b"STR", b"<2s", b"\xc3\x28"),
        InvalidTextError,
        ErrorCode.INVALID_TEXT,
        ("'STR'", "UTF-8"),
    ),
    (
        "UTF-8 surrogate in STR",
        data_frame(b"STR", b"<3s", "\ud800".encode("utf-8", "surrogatepass")),
        InvalidTextError,
        ErrorCode.INVALID_TEXT,
        ("UTF-8",),
    ),
    (
        "trailing junk after the frame",
        GOOD_INT + b"\x00",
        TrailingDataError,
        ErrorCode.TRAILING_DATA,
        ("1 unexpected trailing bytes",),
    ),
    (
        "a second frame after the frame",
        GOOD_INT + GOOD_INT,
        TrailingDataError,
        ErrorCode.TRAILING_DATA,
        (f"{len(GOOD_INT)} unexpected",),
    ),
    *[
        (
            f"{name} given to decode",
            control,
            UnexpectedFrameError,
            ErrorCode.UNEXPECTED_FRAME,
            (name,),
        )
        for name, control in [
            ("HELLO", Hello(1, 0, b"").encode()),
            ("WELCOME", Welcome(1, 0, 1, 1.0, 1.0, 1024).encode()),
            ("PING", ping(1)),
            ("PONG", pong(1)),
            ("DROPPED", dropped_notice(1)),
            ("ERROR", ErrorFrame(ErrorCode.MALFORMED_FRAME, "x").encode()),
            ("GOODBYE", Goodbye(1, None, "").encode()),
        ]
    ],
]
MALFORMED: list[Malformed] = [Malformed(*row) for row in _MALFORMED_ROWS]


@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in MALFORMED])
def test_decode_malformed(row: Malformed) -> None:
    receive = receive_stream if row.stream else decode
    with pytest.raises(row.error) as info:
        receive(row.message)
    assert type(info.value) is row.error
    assert info.value.error_code == row.code
    for text in row.mentions:
        assert text in str(info.value)
    # A view decodes (and fails) like bytes.
    with pytest.raises(row.error):
        receive(memoryview(row.message))


def test_malformed_table_covers_every_protocol_error_of_decode() -> None:
    classes = {row.error for row in MALFORMED}
    assert classes == {
        TruncatedFrameError,
        FrameTooLargeError,
        UnknownKindError,
        UnknownTrameError,
        BadFormatError,
        ValueSizeMismatchError,
        InvalidTextError,
        TrailingDataError,
        UnexpectedFrameError,
    }
    # Every malformed-frame class of the hierarchy has a row.
    assert {cls for cls in classes if issubclass(cls, ProtocolError)} >= {
        cls
        for cls in vars(trame_async.exceptions).values()
        if isinstance(cls, type)
        and issubclass(cls, trame_async.exceptions.MalformedFrameError)
        and cls is not trame_async.exceptions.MalformedFrameError
    }


@pytest.mark.parametrize(
    ("code", "fmt", "detail"),
    [
        (b"ABC", b"q", "byte order"),
        (b"ABC", b"@q", "byte order"),
        (b"ABC", b"=q", "byte order"),
        (b"ABC", b" <q", "byte order"),
        (b"ABC", b"<q ", "byte order"),
        (b"ABC", b"", "byte order"),
        (b"ABC", b"<\xc3\xa9", "byte order"),
        (b"ABC", b"<zz", "format grammar"),
        (b"ABC", b"<n", "format grammar"),
        (b"ABC", b"<h h", "whitespace"),
        (b"ABC", b"<h\th", "whitespace"),
        (b"ABC", b"<99999999999999999999s", "too long"),
        (b"ABC", b"<8x", "only padding"),
        (b"ABC", b"<0p", "Pascal"),
        (b"A\x00C", b"<q", "printable"),
        (b"\xffBC", b"<q", "printable"),
    ],
)
def test_decode_body_bad_format_of_unknown_code(code: bytes, fmt: bytes, detail: str) -> None:
    body = data_body(code, fmt, bytes(8))
    with pytest.raises(BadFormatError, match=detail) as info:
        Registry().decode_body(body, 0, strict=False)
    assert info.value.error_code == ErrorCode.BAD_FORMAT
    assert isinstance(info.value, ProtocolError)
    with pytest.raises(BadFormatError):
        Registry().check_body(body, 0)


def test_decode_frame_unknown_code_not_strict() -> None:
    reg = Registry()
    msg = reg.decode_frame(data_frame(b"ABC", b">hh", b"\x00\x01\xff\xff")[4:], strict=False)
    assert msg.trame == "ABC"
    assert msg.trame.fmt == ">hh"
    assert msg.value == (1, -1)
    assert not msg.trame.registered
    one = reg.decode_frame(data_frame(b"ABC", b"<3s", b"xyz", Kind.RELAY)[4:], strict=False)
    assert one == Message(7, "ABC", b"xyz", Kind.RELAY)
    with pytest.raises(UnknownTrameError):
        reg.decode_frame(data_frame(b"ABC", b"<3s", b"xyz")[4:])


def test_unknown_code_not_strict_checks_the_size() -> None:
    body = data_body(b"ABC", b"<hh", b"\x00\x01\xff")
    with pytest.raises(ValueSizeMismatchError, match="3 bytes, the format needs 4"):
        Registry().decode_body(body, 0, strict=False)


@pytest.mark.parametrize(
    "fmt", [b"<2000000000s", b"<1000000000sq", b"<1000000000q", b"!4294967295s", b"<4000000000x?"]
)
def test_unknown_code_with_huge_format_is_refused_cheaply(fmt: bytes) -> None:
    # A 30-byte frame must not make the receiver allocate the size its format declares.
    body = data_body(b"ABC", fmt, b"x")
    with pytest.raises(ValueSizeMismatchError, match="value is 1 bytes"):
        Registry().decode_body(body, 0, strict=False)
    with pytest.raises(ValueSizeMismatchError):
        Registry().check_body(body, 0)


def test_check_body_accepts_well_formed_frames() -> None:
    reg = Registry()
    for message in (
        GOOD_INT,
        encode(STR, "héllo")[0],
        data_frame(b"ABC", b"<3s", b"xyz"),
        data_frame(b"ABC", b"!IH", bytes(6)),
    ):
        reg.check_body(memoryview(message)[4:], 1)


@pytest.mark.parametrize(
    "message",
    [row.message for row in MALFORMED if row.error in (ValueSizeMismatchError, InvalidTextError)],
)
def test_check_body_refuses_what_decode_refuses(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        Registry().check_body(message[4:], 1)


def test_decode_frame_empty() -> None:
    with pytest.raises(TruncatedFrameError, match="frame kind"):
        REGISTRY.decode_frame(b"")


@pytest.mark.parametrize(
    "wrap", [bytes, bytearray, lambda b: memoryview(bytearray(b)), lambda b: memoryview(b)]
)
def test_decode_frame_and_check_body_take_any_bytes_like(wrap: Any) -> None:
    # Lookups hash slices of the frame: writable buffers must be copied, not hashed.
    for message, expected in (
        (GOOD_INT, Message(0, INT, 42, Kind.MULTICAST)),
        (encode(STR, "été")[0], Message(0, STR, "été", Kind.MULTICAST)),
        (data_frame(b"ABC", b"<3s", b"xyz", Kind.RELAY), Message(7, "ABC", b"xyz", Kind.RELAY)),
    ):
        frame = wrap(message[4:])
        assert REGISTRY.decode_frame(frame, strict=False) == expected
        REGISTRY.check_body(frame, 5 if expected.kind == Kind.RELAY else 1)
        body = wrap(message[9:] if expected.kind == Kind.RELAY else message[5:])
        assert REGISTRY.decode_body(body, 0, strict=False) == (expected.trame, expected.value)
    bad = wrap(data_frame(b"INT", b"<q", INT_VALUE[:7])[4:])
    with pytest.raises(ValueSizeMismatchError):
        REGISTRY.decode_frame(bad)
    with pytest.raises(ValueSizeMismatchError):
        REGISTRY.check_body(bad, 1)


# --- values that the receiver's class refuses ---------------------------------------------------


class Span:
    """A plain class whose constructor refuses an empty span (several items: spread)."""

    def __init__(self, start: int, end: int) -> None:
        if end <= start:
            raise ValueError(f"empty span {start}..{end}")
        self.start, self.end = start, end


class Flag:
    """A plain class of one item whose constructor raises something other than ValueError."""

    def __init__(self, on: bool) -> None:
        if not on:
            raise KeyError("off")
        self.on = on


def refusing_registry() -> tuple[Registry, Registry]:
    """Return (a sender's registry with plain formats, a receiver's binding refusing classes)."""
    sender, receiver = Registry(), Registry()
    for code, fmt, cls in (("RDG", "<q", Reading), ("SPN", "<ii", Span), ("FLG", "<?", Flag)):
        sender.register(code, fmt)
        receiver.register(code, fmt, cls)
    return sender, receiver


@pytest.mark.parametrize(
    ("code", "good", "bad", "cls", "why"),
    [
        ("RDG", 5, -1, Reading, "ValueError: negative reading -1"),
        ("SPN", (1, 2), (2, 2), Span, "ValueError: empty span 2..2"),
        ("FLG", True, False, Flag, "KeyError: 'off'"),
    ],
)
def test_a_value_the_class_refuses_is_a_protocol_error(
    code: str, good: Any, bad: Any, cls: type[Any], why: str
) -> None:
    sender, receiver = refusing_registry()
    assert isinstance(receiver.decode(sender.encode(code, good))[1], cls)
    for kind in (Kind.MULTICAST, Kind.DATA, Kind.RELAY):
        message = sender.encode(code, bad, kind)
        calls: list[tuple[Any, ...]] = [
            (receiver.decode_frame, message[4:]),
            (receiver.decode_body, message[9 if kind == Kind.RELAY else 5 :], 0),
        ]
        if kind != Kind.RELAY:
            calls.append((receiver.decode, message))  # the whole-frame fast path
        for call, *args in calls:
            with pytest.raises(trame_async.BadValueError) as info:
                call(*args)
            err = info.value
            assert isinstance(err, ProtocolError) and not isinstance(err, CodecError)
            assert err.error_code is ErrorCode.BAD_VALUE
            assert (err.code, err.cls_name, err.detail) == (code, cls.__name__, why)
            assert isinstance(err.__cause__, ValueError | KeyError)
            assert f"value of trame {code!r} refused by {cls.__name__}" in str(err)


def test_check_body_builds_values_only_for_types_that_can_refuse_one() -> None:
    # The server's relay check (docs/protocol.md: "a server that knows the type refuses such a
    # MULTICAST at its sender with BAD_VALUE"): a class that may raise is called, a NamedTuple
    # or a plain numeric format costs no value at all.
    built: list[int] = []

    @dataclasses.dataclass
    class Watched:
        n: int

        def __post_init__(self) -> None:
            built.append(self.n)
            if self.n < 0:
                raise ValueError("refused")

    sender, receiver = refusing_registry()
    receiver.register("WCH", "<q", Watched)
    sender.register("WCH", "<q")
    assert not receiver["POS"].can_refuse and not receiver["INT"].can_refuse
    assert receiver["WCH"].can_refuse and receiver["BOL"].can_refuse and receiver["STR"].can_refuse
    for kind in (Kind.MULTICAST, Kind.DATA):
        receiver.check_body(sender.encode("POS", (1.0, 2.0), kind)[4:], 1)
        receiver.check_body(sender.encode("WCH", 1, kind)[4:], 1)
        for code, value in (("RDG", -1), ("SPN", (2, 2)), ("FLG", False), ("WCH", -1)):
            message = sender.encode(code, value, kind)
            for body in (message[4:], bytearray(message[4:])):
                with pytest.raises(trame_async.BadValueError):
                    receiver.check_body(body, 1)
    assert built == [1, -1, -1, 1, -1, -1]


# --- fuzzing: only TrameError ------------------------------------------------------------------


def assert_only_trame_errors(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``call``; return its result, or None if it raised a TrameError (anything else fails)."""
    try:
        return call(*args, **kwargs)
    except Exception as err:
        assert isinstance(err, TrameError), f"{type(err).__name__}: {err}"
        return None


_FORMAT_CHARS = "xcbB?hHiIlLqQnNefdspP"

#: Format fields: mostly well-formed, with counts from 0 to huge, sometimes broken.
formats = st.one_of(
    st.builds(
        lambda order, items: (order + "".join(items)).encode("ascii"),
        st.sampled_from(["<", ">", "!", "@", "=", "", " "]),
        st.lists(
            st.builds(
                lambda count, char: count + char,
                st.sampled_from(["", "", "0", "1", "2", "3", "16", "00", "2000000000"]),
                st.sampled_from(_FORMAT_CHARS),
            ),
            max_size=4,
        ),
    ),
    st.binary(max_size=12),
)
codes = st.one_of(
    st.sampled_from([b"INT", b"FLT", b"BOL", b"STR", b"BYT", b"POS", b"ABC", b"\x00BC"]),
    st.binary(min_size=3, max_size=3),
)


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    """A data frame (from the kind byte) with plausible fields, often almost right."""
    kind = draw(st.sampled_from([Kind.MULTICAST, Kind.RELAY, Kind.DATA]))
    fmt = draw(formats)
    try:
        size = struct.calcsize(fmt.decode("ascii"))
    except (struct.error, UnicodeDecodeError):
        size = 8
    size = min(size, 64)
    value = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size),
            st.binary(max_size=max(0, size + 2)),
        )
    )
    body = data_body(draw(codes), fmt, value)
    if kind == Kind.RELAY:
        body = draw(st.binary(min_size=4, max_size=4)) + body
    whole = bytes((kind,)) + body
    cut = draw(st.one_of(st.just(len(whole)), st.integers(0, len(whole))))
    return whole[:cut]


@FUZZ
@given(st.binary(max_size=64))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    assert_only_trame_errors(decode, data)
    assert_only_trame_errors(REGISTRY.decode_frame, memoryview(bytes(data)), strict=False)
    assert_only_trame_errors(REGISTRY.decode_frame, data, strict=True)
    assert_only_trame_errors(REGISTRY.decode_frame, bytearray(data), strict=False)
    assert_only_trame_errors(REGISTRY.check_body, bytearray(data), 1)
    assert_only_trame_errors(REGISTRY.decode_body, bytearray(data), 0, strict=False)


@FUZZ
@given(st.binary(max_size=64))
def test_decode_arbitrary_frame_bodies(body: bytes) -> None:
    # The length field is right, so decoding goes past the header checks.
    message = len(body).to_bytes(4, "big") + body
    assert_only_trame_errors(decode, message)


@settings(max_examples=500, deadline=None)
@given(data_frames())
def test_decode_fuzzed_data_frames(frame: bytes) -> None:
    reg = Registry()
    result = assert_only_trame_errors(reg.decode_frame, memoryview(frame), strict=False)
    if result is not None:
        assert isinstance(result, Message)
        assert result.kind == frame[0]
        # What decodes also passes the server's relay check.
        reg.check_body(frame, 5 if frame[0] == Kind.RELAY else 1)
    assert_only_trame_errors(reg.decode_frame, memoryview(frame), strict=True)
    assert_only_trame_errors(reg.check_body, frame, 5 if frame[:1] == b"\x11" else 1)
    message = len(frame).to_bytes(4, "big") + frame
    assert_only_trame_errors(reg.decode, message)


@FUZZ
@given(st.sampled_from([INT, FLT, BOL, STR, BYT, POS]), st.binary(max_size=24))
def test_decode_registered_codes_with_arbitrary_values(trame: Trame, value: bytes) -> None:
    fmt = trame.wire_format(len(value)).encode("ascii")
    message = data_frame(trame.code.encode("ascii"), fmt, value)
    result = assert_only_trame_errors(decode, message)
    if result is not None:
        assert result[0] is trame
        if trame.size is not None:
            assert len(value) == trame.size


@FUZZ
@given(st.binary(min_size=3, max_size=3), formats)
def test_register_arbitrary_code_and_format(code: bytes, fmt: bytes) -> None:
    text_code = code.decode("latin-1")
    text_fmt = fmt.decode("latin-1")
    trame = assert_only_trame_errors(Registry(builtins=False).register, text_code, text_fmt)
    if trame is not None:
        assert trame.fmt[0] in "<>!"
        assert trame.size == struct.calcsize(trame.fmt) or trame.variable
