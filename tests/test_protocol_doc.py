"""Check docs/protocol.md against the code: every example frame, every kind and every code.

Each example in the document is a fenced block in the ``frame`` language::

    name: MULTICAST INT 42                       <- starts with the Kind's name
    call: encode("INT", 42)[0]                   <- Python expression giving the frame's bytes
    decoded: Message(0, INT, 42, Kind.MULTICAST) <- what a receiver parses from those bytes
    hex: 00 00 00 0f | 10 | 49 4e 54 | 02 | 3c 71 | 2a 00 00 00 00 00 00 00

A line starting with whitespace continues the previous key. ``call`` and ``decoded`` are evaluated
with every public name of ``trame_async`` and ``trame_async.wire`` in scope. ``|`` separates the
fields of the frame's layout and must fall exactly on field boundaries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import trame_async
from trame_async import (
    REGISTRY,
    DisconnectReason,
    ErrorCode,
    GroupOp,
    GroupStatus,
    Kind,
    PresenceEvent,
    decode,
    wire,
)
from trame_async.wire import (
    ErrorFrame,
    Goodbye,
    Hello,
    Join,
    Leave,
    MemberList,
    Members,
    PresenceNotice,
    Reply,
    Welcome,
    parse_dropped,
    parse_ping_id,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

_BLOCK = re.compile(r"^```frame\n(.*?)^```", re.MULTILINE | re.DOTALL)
_KEYS = ("name", "call", "decoded", "hex")


class Example(NamedTuple):
    """One example block of the document."""

    name: str
    call: str
    decoded: str
    hex: str
    line: int

    @property
    def data(self) -> bytes:
        """The example's bytes (separators and spacing removed)."""
        return bytes.fromhex(self.hex.replace("|", " "))

    @property
    def groups(self) -> list[bytes]:
        """The example's bytes, cut where the document puts a separator."""
        return [bytes.fromhex(group) for group in self.hex.split("|")]

    @property
    def kind(self) -> Kind:
        """The Kind named by the first word of :attr:`name`."""
        return Kind[self.name.split()[0]]


def parse_examples(text: str) -> list[Example]:
    """Return every ``frame`` block of ``text``."""
    examples = []
    for match in _BLOCK.finditer(text):
        fields: dict[str, str] = {}
        key = None
        for raw in match.group(1).splitlines():
            if not raw.strip():
                continue
            if raw[0].isspace():
                assert key is not None, f"continuation line before any key: {raw!r}"
                fields[key] += " " + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            assert sep and key in _KEYS, f"unknown line in a frame block: {raw!r}"
            assert key not in fields, f"key {key!r} given twice"
            fields[key] = value.strip()
        assert set(fields) == set(_KEYS), f"frame block needs {_KEYS}, has {sorted(fields)}"
        line = text.count("\n", 0, match.start()) + 1
        examples.append(Example(line=line, **fields))
    return examples


def layout(frame: bytes) -> list[bytes]:
    """Cut a whole, well-formed frame into the fields of its kind's layout (empty ones left out)."""
    sizes = [4, 1]
    body = frame[5:]
    kind = frame[4]
    if kind == Kind.HELLO:
        sizes += [4, 1, 1, 2, int.from_bytes(body[6:8], "big")]
    elif kind == Kind.WELCOME:
        sizes += [4, 1, 1, 4, 4, 4, 4]
    elif kind in (Kind.PING, Kind.PONG, Kind.DROPPED):
        sizes += [4]
    elif kind == Kind.ERROR:
        sizes += [2, 1, body[2]]
    elif kind == Kind.GOODBYE:
        sizes += [2, 4, 1, body[6]]
    elif kind in (Kind.MULTICAST, Kind.RELAY, Kind.DATA, Kind.GROUP_MULTICAST, Kind.GROUP_RELAY):
        prefix = {Kind.RELAY: 1, Kind.GROUP_MULTICAST: 1, Kind.GROUP_RELAY: 2}.get(Kind(kind), 0)
        sizes += [4] * prefix
        body = body[4 * prefix :]
        sizes += [3, 1, body[3], len(body) - 4 - body[3]]
    elif kind == Kind.JOIN:
        sizes += [4, 1, 1, body[5]]
    elif kind == Kind.LEAVE:
        sizes += [4, 4]
    elif kind == Kind.MEMBERS:
        sizes += [4, 4, 4]
    elif kind == Kind.REPLY:
        sizes += [4, 1, 2, 4, 1, body[11]]
    elif kind == Kind.PRESENCE:
        sizes += [4, 1, 4, 2]
    elif kind == Kind.MEMBER_LIST:
        sizes += [4, 4, 1, 2] + [4] * int.from_bytes(body[9:11], "big")
    else:
        raise AssertionError(f"no layout for kind {kind}")
    fields = []
    pos = 0
    for size in sizes:
        if size:
            fields.append(frame[pos : pos + size])
        pos += size
    assert pos == len(frame), "layout does not cover the frame"
    return fields


def namespace() -> dict[str, Any]:
    """Return the names ``call`` and ``decoded`` may use."""
    names: dict[str, Any] = {name: getattr(trame_async, name) for name in trame_async.__all__}
    names.update((name, value) for name, value in vars(wire).items() if not name.startswith("_"))
    return names


_PARSERS: dict[Kind, Callable[[bytes], Any]] = {
    Kind.HELLO: Hello.parse,
    Kind.WELCOME: Welcome.parse,
    Kind.PING: lambda body: parse_ping_id(body, "PING"),
    Kind.PONG: lambda body: parse_ping_id(body, "PONG"),
    Kind.DROPPED: parse_dropped,
    Kind.ERROR: ErrorFrame.parse,
    Kind.GOODBYE: Goodbye.parse,
    Kind.JOIN: Join.parse,
    Kind.LEAVE: Leave.parse,
    Kind.MEMBERS: Members.parse,
    Kind.REPLY: Reply.parse,
    Kind.PRESENCE: PresenceNotice.parse,
    Kind.MEMBER_LIST: MemberList.parse,
}
#: Where the group id sits in a group data frame (from the kind byte).
_GROUP_ID_AT = {Kind.GROUP_MULTICAST: 1, Kind.GROUP_RELAY: 5}


def parse_frame(frame: bytes) -> Any:
    """Parse a whole frame as a receiver would: a Message for data frames, else the body object."""
    parser = wire.FrameParser()
    frames = parser.feed(frame)
    assert len(frames) == 1 and parser.buffered == 0, "the example is not exactly one frame"
    kind = Kind(frames[0][0])
    if kind in _PARSERS:
        return _PARSERS[kind](frames[0][1:])
    if kind in _GROUP_ID_AT:
        at = _GROUP_ID_AT[kind]
        group_id = int.from_bytes(frames[0][at : at + 4], "big")
        return group_id, REGISTRY.decode_frame(frames[0], strict=False)
    return REGISTRY.decode_frame(frames[0], strict=False)


TEXT = DOC.read_text(encoding="utf-8")
EXAMPLES = parse_examples(TEXT)


def test_document_has_examples() -> None:
    assert len(EXAMPLES) >= len(Kind)
    names = [ex.name for ex in EXAMPLES]
    assert len(set(names)) == len(names), "example names must be unique"


def test_an_example_for_every_kind() -> None:
    assert {ex.kind for ex in EXAMPLES} == set(Kind)


@pytest.mark.parametrize("example", EXAMPLES, ids=[ex.name for ex in EXAMPLES])
def test_example(example: Example) -> None:
    where = f"docs/protocol.md line {example.line} ({example.name})"
    names = namespace()
    data = example.data
    # The kind byte is the one the name says, and the length covers exactly the rest.
    assert data[4] == example.kind, where
    assert int.from_bytes(data[:4], "big") == len(data) - 4, where
    # The code reproduces the bytes exactly.
    produced = eval(example.call, names)
    assert isinstance(produced, bytes), where
    assert produced.hex(" ") == data.hex(" "), where
    # A receiver parses the bytes into what the document says.
    expected = eval(example.decoded, names)
    assert parse_frame(data) == expected, where
    if example.kind in _GROUP_ID_AT:
        expected = expected[1]
    if example.kind in (Kind.MULTICAST, Kind.RELAY, Kind.DATA) and expected.trame in REGISTRY:
        assert (expected.trame, expected.value) == decode(data), where
    # Separators fall on the fields of the layout.
    assert example.groups == layout(data), where


def test_layout_of_every_example_kind_is_checked() -> None:
    # layout() must know every kind, or the separator check above proves nothing for it.
    for example in EXAMPLES:
        assert b"".join(layout(example.data)) == example.data


@pytest.mark.parametrize("member", list(Kind), ids=lambda k: k.name)
def test_every_kind_is_documented(member: Kind) -> None:
    assert re.search(rf"\b{member.name}\b", TEXT), member.name
    assert f"0x{member.value:02x}" in TEXT.lower(), member.name


def _table_rows(heading: str) -> dict[str, int]:
    """Return ``{name: value}`` from the table under ``heading``: rows like ``| 3 | NAME | ...``."""
    start = TEXT.index(heading)
    end = TEXT.find("\n#", start + len(heading))
    section = TEXT[start : end if end != -1 else len(TEXT)]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`?([A-Z_]+)`?\s*\|", section, re.MULTILINE)
    return {name: int(value) for value, name in rows}


def test_error_codes_table_matches_the_code() -> None:
    assert _table_rows("### Error codes") == {code.name: code.value for code in ErrorCode}


def test_group_tables_match_the_code() -> None:
    assert _table_rows("#### Reply status codes") == {s.name: s.value for s in GroupStatus}
    assert _table_rows("#### Group operations") == {op.name: op.value for op in GroupOp}
    assert _table_rows("#### Presence events") == {e.name: e.value for e in PresenceEvent}


def test_group_constants_are_documented() -> None:
    text = TEXT[TEXT.index("## Groups\n") : TEXT.index("## Formats and trame types\n")]
    assert f"0x{wire.FLAG_PRESENCE:02x}" in text
    assert f"at most {wire.MAX_MEMBER_IDS}" in text
    assert f"{wire.DEFAULT_MAX_GROUP_NAME_LENGTH} by default" in text
    assert f"carries at most {wire.MAX_GROUP_NAME_LENGTH}" in text
    # The wording a client relies on: never an error for a group it does not map.
    assert "MUST drop, without any error, a GROUP_RELAY or PRESENCE" in text
    assert "a server MUST NOT send it a group frame" in text


def test_disconnect_reasons_table_matches_the_code() -> None:
    assert _table_rows("### Disconnect reasons") == {
        reason.name: reason.value for reason in DisconnectReason
    }


def test_constants_are_documented() -> None:
    for value in (
        wire.DEFAULT_MAX_FRAME_SIZE,
        wire.HANDSHAKE_MAX_FRAME_SIZE,
        wire.PROTOCOL_VERSION,
    ):
        assert str(value) in TEXT
    assert wire.MAGIC.hex(" ") in TEXT
    assert f"0x{wire.FLAG_ECHO:02x}" in TEXT


def test_parse_examples_rejects_bad_blocks() -> None:
    with pytest.raises(AssertionError, match="needs"):
        parse_examples("```frame\nname: PING 1\nhex: 00\n```\n")
    with pytest.raises(AssertionError, match="unknown line"):
        parse_examples("```frame\nnmae: PING 1\n```\n")


def _section(heading: str) -> str:
    start = TEXT.index(heading + "\n")
    end = TEXT.find("\n#", start + len(heading))
    return TEXT[start : end if end != -1 else len(TEXT)]


def test_builtin_types_table_matches_the_registry() -> None:
    rows = re.findall(
        r"^\| `([A-Z]{3})` \| `([^`]+)`\s*\|", _section("### Trame types"), re.MULTILINE
    )
    assert dict(rows) == {
        code: fmt for code, (fmt, _cls) in trame_async.Registry().listing().items()
    }


def test_largest_variable_value_is_the_documented_one() -> None:
    text = _section("### Trame types")
    found = re.search(r"fits a 1 MiB MULTICAST is (\d+) bytes", text)
    assert found is not None
    size = int(found.group(1))
    # Through the parser a receiver with the default max_frame_size uses: the frame fills it.
    (frame,) = wire.FrameParser().feed(trame_async.encode("BYT", bytes(size))[0])
    assert len(frame) == wire.DEFAULT_MAX_FRAME_SIZE
    with pytest.raises(trame_async.FrameTooLargeError):
        wire.FrameParser().feed(trame_async.encode("BYT", bytes(size + 1))[0])


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        ("<?", [True, False, 0, 1], ["false", None, 2]),  # "? as the byte 0 or 1"
        ("<3s", [b"abc"], [b"ab", b"abcd"]),  # "s values of exactly count bytes"
        ("<4p", [b"", b"abc"], [b"abcd"]),  # "p values of at most min(count - 1, 255) bytes"
        ("<300p", [b"x" * 255], [b"x" * 256]),
    ],
)
def test_sender_value_rules_of_the_formats_section(
    fmt: str, good: list[Any], bad: list[Any]
) -> None:
    assert "A sender MUST write only values that read back as themselves" in _section("### Formats")
    reg = trame_async.Registry(builtins=False)
    trame = reg.register("VAL", fmt)
    for value in good:
        assert reg.decode(reg.encode(trame, value))[1] == value
    for value in bad:
        with pytest.raises(trame_async.ValueMismatchError):
            reg.encode(trame, value)


def test_one_order_of_checks_decides_every_refusal() -> None:
    # One rule, stated once: every other place refers to it rather than giving its own.
    assert TEXT.count("### Order of checks") == 1
    steps = re.findall(r"^(\d)\. \*\*", _section("### Order of checks"), re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5"]
    assert "The server checks the magic first" not in TEXT
    # ERROR and GOODBYE are never answered: the kind table, their sections and the rule agree.
    rows = {
        row.split("|")[1].strip(" `"): row
        for row in TEXT.splitlines()
        if row.startswith("| `ERROR`") or row.startswith("| `GOODBYE`")
    }
    assert all("never answered" in rows[kind] for kind in ("ERROR", "GOODBYE"))
    assert "an ERROR reason or a GOODBYE text             | `INVALID_TEXT`" not in TEXT


def test_receiver_rules_of_the_formats_section() -> None:
    text = _section("### Formats")
    assert "receivers MUST refuse it anywhere in a format with\n  `BAD_FORMAT`" in text
    assert "A receiver MUST treat a format starting with `!` as the same" in text
    assert "A receiver MUST refuse, with `BAD_VALUE`, a `?` byte other than 0 or 1" in text
    reg = trame_async.Registry(builtins=False)
    reg.register("TMP", ">hB")

    def body(fmt: bytes, value: bytes) -> bytes:
        return b"\x10TMP" + bytes((len(fmt),)) + fmt + value

    with pytest.raises(trame_async.BadFormatError):
        reg.decode_frame(body(b">h B", b"\0\0\0"))
    assert reg.decode_frame(body(b"!hB", b"\0\1\2")).value == (1, 2)
    for fmt, value in ((b"<?", b"\x02"), (b"<3p", b"\x03ab")):
        with pytest.raises(trame_async.BadValueError):
            reg.decode_frame(b"\x10UNK" + bytes((len(fmt),)) + fmt + value, strict=False)
