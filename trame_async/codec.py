"""The shared codec: trame types, their registry, and data frames (no asyncio).

A *trame type* is a 3-character code plus a ``struct`` format. Its value is packed with that format
and travels in a data frame (MULTICAST, RELAY or DATA) whose body is::

    +---------+-------------+-----------------+------------------------+
    | code[3] | fmt_len u8  | fmt[fmt_len]    | value (size of fmt)    |
    +---------+-------------+-----------------+------------------------+

RELAY bodies start with the sender's id (u32 BE) before the code. ``fmt`` is the ASCII struct format
of *this* value with an explicit byte order, so any receiver can unpack a frame with ``struct`` alone.
A variable-length type is registered as ``"<*s"`` and sends ``"<5s"`` for a 5-byte value.

Structs are compiled at registration; encoding a fixed-size value is one ``Struct.pack`` that also
writes the (constant) frame header, and decoding checks the header with one dictionary lookup.
Encoding refuses any value that would not decode back to itself: ``struct`` alone would pack
``"false"`` as True for ``?`` and pad or cut bytes for ``s`` and ``p``. Formats with those items
get a packer that checks them after packing; every other format keeps the bare ``Struct.pack``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import operator
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, NamedTuple, TypeVar, cast

from .exceptions import (
    BadFormatError,
    BadValueError,
    CodecError,
    InvalidTextError,
    RegistrationError,
    TrailingDataError,
    TruncatedFrameError,
    UnexpectedFrameError,
    UnknownKindError,
    UnknownTrameError,
    ValueMismatchError,
    ValueSizeMismatchError,
)
from .wire import HEADER, LENGTH_SIZE, MAX_LENGTH, RELAY_OVERHEAD, SENDER, Kind

__all__ = [
    "BOL",
    "BYT",
    "FLT",
    "INT",
    "POS",
    "REGISTRY",
    "STR",
    "Message",
    "Position",
    "Registry",
    "Trame",
    "decode",
    "encode",
    "register",
    "registered",
]

_T = TypeVar("_T")
#: What names a trame type: the Trame, its code, or the class bound to it by register().
TrameLike = Any

#: Byte-order characters a format may start with. Native ones ("@", "=") are refused: their sizes or
#: order change from one machine to another.
_PORTABLE_ORDERS: Final = "<>!"
_VARIABLE_BODY: Final = "*s"
_DATA_KINDS: Final = frozenset((Kind.MULTICAST, Kind.RELAY, Kind.DATA))
_MULTICAST: Final = int(Kind.MULTICAST)
_DATA: Final = int(Kind.DATA)
_RELAY: Final = int(Kind.RELAY)
# The member itself, for Message.kind: a lookup on the Enum class costs 70 ns a time on 3.11.
_KIND_RELAY: Final = Kind.RELAY
_GROUP_RELAY: Final = int(Kind.GROUP_RELAY)
_GROUP_MULTICAST: Final = int(Kind.GROUP_MULTICAST)
#: Upper bound on cached formats of unregistered codes (server relay checks, generic decode); the
#: least recently used one goes first, so a peer sending endless new formats costs one eviction per
#: format, never a wipe of every format the other peers use.
_FORMAT_CACHE_SIZE: Final = 1024
_CODE: Final = re.compile(rb"[\x20-\x7e]{3}")


def _check_code(code: object) -> bytes:
    if not isinstance(code, str):
        raise RegistrationError(f"trame code must be a str of 3 characters, not {code!r}")
    raw = code.encode("ascii", "replace")
    if len(code) != 3 or not code.isascii() or not all(0x20 <= b <= 0x7E for b in raw):
        raise RegistrationError(
            f"trame code {code!r} is not 3 printable ASCII characters; use a code like 'POS'"
        )
    return raw


def _normalize_format(code: str, fmt: object) -> str:
    if not isinstance(fmt, str):
        raise RegistrationError(f"format of trame {code!r} must be a str, not {fmt!r}")
    norm = "".join(fmt.split())
    if not norm:
        raise RegistrationError(f"format of trame {code!r} is empty; give a struct format")
    if norm[0] in "@=":
        raise RegistrationError(
            f"format {fmt!r} of trame {code!r} uses native byte order or alignment, which differs "
            f"between machines; start it with '<' (little-endian), '>' or '!' (big-endian)"
        )
    if norm[0] not in _PORTABLE_ORDERS:
        norm = "<" + norm
    elif norm[0] == "!":
        # The same order as ">": one spelling, so that peers registering either agree.
        norm = ">" + norm[1:]
    if not norm.isascii() or len(norm) > 255:
        raise RegistrationError(
            f"format {fmt!r} of trame {code!r} must be ASCII and at most 255 characters"
        )
    if "*" in norm and norm != "<" + _VARIABLE_BODY:
        # Variable values always travel as "<Ns": accepting ">*s" would list a format never sent.
        raise RegistrationError(
            f"format {fmt!r} of trame {code!r} is not a struct format: '*' is only allowed in "
            f"'<*s', the whole format of a variable-length type (each value is sent as '<Ns')"
        )
    return norm


def _not_data_kind(kind: object) -> CodecError:
    shown = _KIND_NAMES.get(kind, repr(kind)) if isinstance(kind, int) else repr(kind)
    return CodecError(
        f"kind {shown} is not a data frame kind; data frames are Kind.MULTICAST, Kind.DATA "
        f"or Kind.RELAY"
    )


class Trame(str):
    """A registered trame type: its 3-character code (the ``str`` value) plus its format.

    A ``Trame`` compares and hashes as its code, so ``msg.trame == "POS"`` works and the trame can
    key a dict. Get one from :func:`register` or ``trame_async.INT``/``STR``/...; do not build one
    directly.

    Attributes:
        fmt: The registered struct format, normalised (explicit byte order, ``"<*s"`` for
            variable-length types).
        cls: The Python type of decoded values (a NamedTuple, a dataclass, ``str`` for text), or
            None for plain values/tuples.
        size: The value's size in bytes for fixed-size types, None for variable-length ones.
    """

    fmt: str
    cls: type[Any] | None
    size: int | None
    registered: bool
    head: bytes
    _code: bytes
    _variable: bool
    _text: bool
    _struct: struct.Struct | None
    _items: int
    _getter: Callable[[Any], Any] | None
    _make: Callable[..., Any] | None
    _star: bool
    _wrap: bool
    _spread: bool
    #: Items ``struct`` would pack lossily: (index, "s"/"p", count) or (first index, "?", run).
    _checks: tuple[tuple[int, str, int], ...]
    _value_packer: Callable[[Any], bytes] | None
    #: Bytes of a value that only some values may take: (offset, length, largest byte allowed,
    #: item), for '?' runs (0 or 1) and 'p' length bytes (at most min(count - 1, 255)).
    _bounds: tuple[tuple[int, int, int, str], ...]
    _frames: dict[int, Callable[..., bytes]]
    _owner: Registry
    #: Unpack a fixed-size value at ``offset`` of a buffer (its size already checked).
    unpack_from: Callable[..., Any]
    #: For the compiled receive loop (_speedups.c), when a value is the struct's items as they
    #: are: (the struct's unpack_from, the NamedTuple class or None, 1 for the lone item or 0).
    _plan: tuple[Callable[..., Any], type[Any] | None, int] | None

    def __new__(cls, code: str, fmt: str, value_cls: type[Any] | None = None) -> Trame:
        """Build a trame type; :func:`register` validates ``code`` and ``fmt`` first."""
        self = super().__new__(cls, code)
        self.fmt = fmt
        self.cls = None
        self.registered = False
        self._code = code.encode("ascii")
        self._variable = fmt[1:] == _VARIABLE_BODY
        self._text = False
        self._struct = None
        self._items = 1
        self._getter = None
        self._make = None
        self._star = False  # build values as make(*fields) rather than make(fields)
        self._wrap = False  # make(the struct's tuple) builds the value, whatever the item count
        self._spread = False  # frame packers take the value's items: packer(*value)
        self._checks = ()
        self._bounds = ()
        self._value_packer = None
        # Per-kind (frame struct, frame prefix) of fixed-size types, built on first use.
        self._frames = {}
        if self._variable:
            self.size = None
            self.head = b""
        else:
            try:
                st = struct.Struct(fmt)
            except struct.error as err:
                raise RegistrationError(
                    f"format {fmt!r} of trame {code!r} is not a struct format: {err}"
                ) from err
            if _ZERO_PASCAL.search(fmt):
                # CPython raises SystemError when unpacking "0p"; a peer could send it.
                raise RegistrationError(
                    f"format {fmt!r} of trame {code!r} has a zero-length Pascal string '0p'"
                )
            self._items, self._checks = _scan_items(fmt)
            self._bounds = _value_bounds(fmt)
            if self._items == 0:
                raise RegistrationError(
                    f"format {fmt!r} of trame {code!r} carries no value (only padding); add a field"
                )
            self._struct = st
            self.size = st.size
            fmt_b = fmt.encode("ascii")
            #: code + fmt_len + fmt: constant start of every data body of this type.
            self.head = self._code + bytes((len(fmt_b),)) + fmt_b
        self._compile_unpack()
        if value_cls is not None:
            self._bind(value_cls)
        return self

    # str subclasses must keep hashing and comparing as their code.
    __hash__ = str.__hash__

    def __repr__(self) -> str:
        cls_name = f", cls={self.cls.__name__}" if self.cls is not None else ""
        return f"Trame({str(self)!r}, {self.fmt!r}{cls_name})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Trame, (str(self), self.fmt, self.cls))

    @property
    def code(self) -> str:
        """The 3-character code as a plain ``str``."""
        return str(self)

    @property
    def variable(self) -> bool:
        """Whether values have a variable length (``"<*s"`` formats)."""
        return self._variable

    @property
    def can_refuse(self) -> bool:
        """Whether some values of the right size are refused (:class:`BadValueError`).

        True for a '?' item (a byte other than 0 or 1), a 'p' item (a length byte above
        ``min(count - 1, 255)``), a class that may raise (not a NamedTuple) and UTF-8 text. A
        relay must decode such values before relaying them; any other value of the right size is
        good, so a size check is enough.
        """
        return bool(self._bounds) or self._star or self._text

    def __call__(self, value_cls: type[_T]) -> type[_T]:
        """Bind ``value_cls`` as the type of decoded values; lets :func:`register` decorate."""
        try:
            self._bind(value_cls)
        except RegistrationError:
            owner = self.__dict__.get("_owner")
            if owner is not None and self.cls is None:
                owner._remove(self)  # a refused class must not leave the code taken
            raise
        return value_cls

    def _bind(self, value_cls: type[Any]) -> None:
        if not isinstance(value_cls, type):
            raise RegistrationError(
                f"cls of trame {self.code!r} must be a class, not {value_cls!r}"
            )
        if self.cls is not None:
            if not _same_class(self.cls, value_cls):
                raise RegistrationError(
                    f"trame {self.code!r} already has cls {self.cls.__qualname__}, not "
                    f"{value_cls.__qualname__}; register each code with one class"
                )
            # The same class defined again (a re-run notebook cell, a reloaded module): rebind.
            self.cls = None
        if self._variable:
            if value_cls not in (str, bytes):
                raise RegistrationError(
                    f"variable-length trame {self.code!r} carries str (UTF-8 text) or bytes, "
                    f"not {value_cls.__name__}"
                )
            self._text = value_cls is str
            self.cls = value_cls
            return
        fields: tuple[str, ...] | None = None
        if dataclasses.is_dataclass(value_cls):
            fields = tuple(f.name for f in dataclasses.fields(value_cls))
            self._getter = operator.attrgetter(*fields)
            self._make = cast("Callable[..., Any]", value_cls)
            self._star = True
        elif issubclass(value_cls, tuple) and hasattr(value_cls, "_fields"):
            fields = tuple(value_cls._fields)
            # What NamedTuple._make does, minus its Python frame and length check (the struct's
            # tuple always has one item per field: checked below).
            self._make = functools.partial(tuple.__new__, value_cls)
            self._wrap = True
            if self._items == 1:
                self._getter = operator.itemgetter(0)
        else:
            self._make = value_cls
            self._star = True
        if fields is not None and len(fields) != self._items:
            raise RegistrationError(
                f"{value_cls.__name__} has {len(fields)} fields but format {self.fmt!r} of trame "
                f"{self.code!r} has {self._items} items; make them match"
            )
        self.cls = value_cls
        self._compile_unpack()
        self._frames = {}  # packers compiled before the class was bound
        self._value_packer = None
        owner = self.__dict__.get("_owner")
        if owner is not None:
            owner._reset_sizes()  # its decode table holds our unpacker
        # Lets the class stand for its trame: client.multicast(Velocity, Velocity(1, 2)).
        with contextlib.suppress(AttributeError, TypeError):
            value_cls.__trame__ = self

    # --- values ---------------------------------------------------------------------------------

    def _mismatch(self, value: object, err: BaseException) -> ValueMismatchError:
        return ValueMismatchError(self.code, self.fmt, value, self._wanted(value, err))

    def _wanted(self, value: object, err: BaseException) -> str:
        """Say what the trame takes and what was given, in its own terms (not struct's)."""
        n = self._items
        fields = _field_names(self.cls)
        want = f"{n} item{'' if n == 1 else 's'}"
        if fields:
            want += f" ({', '.join(fields)})"
        if n > 1 and not isinstance(value, (tuple, list)):
            return f"it takes {want}, got a single {type(value).__name__}"
        if isinstance(value, (tuple, list)) and n > 1 and len(value) != n:
            return f"it takes {want}, got {len(value)}"
        return f"it takes {want}: {str(err) or type(err).__name__}"

    def _variable_bytes(self, value: object) -> bytes:
        if self._text:
            if not isinstance(value, str):
                raise ValueMismatchError(self.code, self.fmt, value, "expected str")
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise self._mismatch(value, err) from err
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise ValueMismatchError(self.code, self.fmt, value, "expected bytes")

    def pack_frame(self, kind: int, value: Any) -> bytes:
        """Return a whole data frame of ``kind`` (MULTICAST, DATA, or RELAY from the server).

        Raises:
            ValueMismatchError: the value does not fit the format (or would not decode back to
                itself).
            CodecError: ``kind`` is not a data frame kind.
        """
        if self._variable:
            if kind not in _DATA_KINDS:
                raise _not_data_kind(kind)  # as fixed-size types do: never a PING-kind frame
            data = self._variable_bytes(value)
            fmt = b"<%ds" % len(data)
            extra = b"\0\0\0\0" if kind == _RELAY else b""
            n = len(extra) + 4 + len(fmt) + len(data)
            if n >= MAX_LENGTH:
                raise ValueMismatchError(
                    self.code, self.fmt, value, f"{len(data)} bytes cannot fit in one frame"
                )
            return b"".join(
                (HEADER.pack(1 + n, kind), extra, self._code, bytes((len(fmt),)), fmt, data)
            )
        packer = self._frames.get(kind)
        try:
            if packer is None:
                packer = self._frame_packer(kind)
            if self._spread:
                return packer(*value)
            return packer(value)
        except CodecError:
            raise  # a bad kind: not the value's fault
        except (struct.error, TypeError, ValueError, OverflowError, AttributeError) as err:
            raise self._mismatch(value, err) from err

    def _frame_packer(self, kind: int) -> Callable[..., bytes]:
        """Compile the packer of whole ``kind`` frames; pack_frame spreads items if ``_spread``."""
        st, prefix = self._frame_struct(kind)
        pack = st.pack
        getter = self._getter
        packer: Callable[..., bytes]
        self._spread = False
        if self._checks:
            packer = self._checked_packer(pack, (prefix,))
        elif getter is None:
            # No Python frame per call: pack_frame calls packer(value), or packer(*value) for
            # several items, and struct checks the count.
            packer = functools.partial(pack, prefix)
            self._spread = self._items > 1
        elif self._items == 1:
            packer = lambda value: pack(prefix, getter(value))  # noqa: E731
        else:
            packer = lambda value: pack(prefix, *getter(value))  # noqa: E731
        self._frames[kind] = packer
        return packer

    def _checked_packer(
        self, pack: Callable[..., bytes], prefix: tuple[bytes, ...]
    ) -> Callable[[Any], bytes]:
        """Return a packer that also refuses items ``struct`` would pack lossily.

        The items are checked after a successful pack, which has already checked their count and
        types, so the check can index them blindly.
        """
        getter = self._getter
        check = self._check_items

        def pack_one(value: Any) -> bytes:
            item = value if getter is None else getter(value)
            data = pack(*prefix, item)
            check((item,))
            return data

        def pack_many(value: Any) -> bytes:
            items = tuple(value if getter is None else getter(value))  # may be an iterator
            data = pack(*prefix, *items)
            check(items)
            return data

        return pack_one if self._items == 1 else pack_many

    def _check_items(self, items: tuple[Any, ...]) -> None:
        """Raise ValueError for an item that would not decode back to itself."""
        for index, char, count in self._checks:
            if char == "?":
                # struct packs any object by truthiness: "false" and None would travel as bools.
                for at in range(index, index + count):
                    item = items[at]
                    if not (isinstance(item, int) and (item == 0 or item == 1)):
                        where = f"item {at} (from 0): " if self._items > 1 else ""
                        raise ValueError(
                            f"{where}'?' takes True or False (or the int 0 or 1), "
                            f"not {_brief(item)}"
                        )
                continue
            item = items[index]
            where = f"item {index} (from 0): " if self._items > 1 else ""
            if char == "s":
                if len(item) != count:  # struct pads short values with NULs, cuts long ones
                    raise ValueError(
                        f"{where}'{count}s' takes exactly {count} bytes, not {len(item)} (struct "
                        f"would pad or cut it)"
                    )
            elif len(item) > min(count - 1, 255):  # "p": one length byte, at most 255
                raise ValueError(
                    f"{where}'{count}p' takes at most {min(count - 1, 255)} bytes, "
                    f"not {len(item)} (struct would cut it)"
                )

    def _frame_struct(self, kind: int) -> tuple[struct.Struct, bytes]:
        if kind not in _DATA_KINDS:
            raise _not_data_kind(kind)
        assert self.size is not None
        extra = b"\0\0\0\0" if kind == Kind.RELAY else b""
        prefix = HEADER.pack(1 + len(extra) + len(self.head) + self.size, kind) + extra + self.head
        # One struct writes the constant prefix and the value: one allocation per frame.
        st = struct.Struct(f"{self.fmt[0]}{len(prefix)}s{self.fmt[1:]}")
        return st, prefix

    def pack(self, value: Any) -> bytes:
        """Return the packed value alone (no frame), as ``struct.pack(fmt, ...)`` would."""
        if self._variable:
            return self._variable_bytes(value)
        st = self._struct
        assert st is not None
        try:
            if self._checks:
                packer = self._value_packer
                if packer is None:
                    packer = self._value_packer = self._checked_packer(st.pack, ())
                return packer(value)
            getter = self._getter
            if self._items == 1:
                return st.pack(value if getter is None else getter(value))
            if getter is not None:
                return st.pack(*getter(value))
            return st.pack(*value)
        except (struct.error, TypeError, ValueError, OverflowError, AttributeError) as err:
            raise self._mismatch(value, err) from err

    def wire_format(self, value_size: int) -> str:
        """Return the format sent on the wire for a value of ``value_size`` bytes."""
        return f"<{value_size}s" if self._variable else self.fmt

    def _compile_unpack(self) -> None:
        """Set :attr:`unpack_from` to the cheapest callable for this type's value shape."""
        st = self._struct
        self._plan = None
        if st is None:
            self.unpack_from = self._variable_unpack
            return
        raw = st.unpack_from
        make = self._make
        if not self._bounds and (self._wrap or make is None):
            self._plan = (
                raw,
                self.cls if self._wrap else None,
                int(make is None and self._items == 1),
            )
        if self._wrap:
            # tuple.__new__ with the struct's tuple, one item per field: it cannot raise.
            assert make is not None
            self.unpack_from = lambda buf, offset=0: make(raw(buf, offset))
        elif make is None:
            if self._items == 1:
                self.unpack_from = lambda buf, offset=0: raw(buf, offset)[0]
            else:
                self.unpack_from = raw  # the struct's own bound method: no Python frame at all
        else:
            # A user class may refuse a peer's value: that is the peer's error, not a crash of
            # the receiver (a try costs nothing until it catches).
            refused = self._refused
            if self._items == 1:

                def unpack_from(buf: Any, offset: int = 0) -> Any:
                    item = raw(buf, offset)[0]
                    try:
                        return make(item)
                    except Exception as err:
                        raise refused(err) from err

            else:
                assert self._star  # a class that is not a NamedTuple takes the items spread

                def unpack_from(buf: Any, offset: int = 0) -> Any:
                    items = raw(buf, offset)
                    try:
                        return make(*items)
                    except Exception as err:
                        raise refused(err) from err

            self.unpack_from = unpack_from
        if self._bounds:
            self._check_bounds()

    def _check_bounds(self) -> None:
        """Make :attr:`unpack_from` refuse the bytes that no value packs to ('?' 2, 'p' too long).

        ``struct`` reads them anyway (any non-zero byte as True, a long length byte as the
        longest string), so two receivers could read one frame differently: docs/protocol.md
        makes them a ``BAD_VALUE``. Only formats with '?' or 'p' items pay for the check.
        """
        inner = self.unpack_from
        bounds = self._bounds
        refused = self._bad_byte
        if bounds == ((0, 1, 1, "?"),) and self._make is None and self._items == 1:
            # A lone bool (BOL): one tuple index checks and converts the byte.
            bools = (False, True)

            def unpack_bool(buf: Any, offset: int = 0) -> Any:
                try:
                    return bools[buf[offset]]
                except IndexError:
                    raise refused(buf, offset) from None

            self.unpack_from = unpack_bool
            return

        def unpack_from(buf: Any, offset: int = 0) -> Any:
            for at, n, limit, _ in bounds:
                at += offset
                if (buf[at] if n == 1 else max(buf[at : at + n])) > limit:
                    raise refused(buf, offset)
            return inner(buf, offset)

        self.unpack_from = unpack_from

    def _bad_byte(self, buf: Any, offset: int) -> BadValueError:
        for at, n, limit, char in self._bounds:
            for pos in range(offset + at, offset + at + n):
                if buf[pos] > limit:
                    rule = "'?' takes 0 or 1" if char == "?" else f"'p' length at most {limit}"
                    return BadValueError(
                        self.code,
                        f"format {self.fmt!r}",
                        f"byte {buf[pos]} at value offset {pos - offset} ({rule})",
                    )
        raise AssertionError("no byte out of bounds")  # pragma: no cover

    def _refused(self, err: Exception) -> BadValueError:
        cls = self.cls if self.cls is not None else self._make
        name = getattr(cls, "__name__", repr(cls))
        return BadValueError(self.code, name, f"{type(err).__name__}: {err}")

    def _variable_unpack(self, buf: bytes | memoryview, offset: int = 0) -> Any:
        return self.unpack_variable(memoryview(buf)[offset:])

    def unpack_variable(self, raw: bytes | memoryview) -> Any:
        """Turn the raw bytes of a variable-length value into ``str`` or ``bytes``."""
        if self._text:
            try:
                return str(raw, "utf-8")
            except UnicodeDecodeError as err:
                raise InvalidTextError(f"value of trame {self.code!r}", str(err.reason)) from err
        return bytes(raw)


class Position(NamedTuple):
    """A 2-D position: the value type of the built-in ``POS`` trame."""

    x: float
    y: float


class Message(NamedTuple):
    """A data frame received: who sent it, its trame type and its decoded value.

    ``sender`` is the client id of the sender, 0 for the server. ``kind`` is RELAY for a multicast
    to every client, GROUP_RELAY for a multicast to a group, and DATA for a frame addressed to this
    peer alone. ``group`` is the group's name for a group multicast, None otherwise.
    """

    sender: int
    trame: Trame
    value: Any
    kind: Kind = Kind.RELAY
    group: str | None = None


_FORMAT_ITEM: Final = re.compile(r"(\d*)([A-Za-z?])")
_ZERO_PASCAL: Final = re.compile(r"(?<!\d)0+p")


def _scan_items(fmt: str) -> tuple[int, tuple[tuple[int, str, int], ...]]:
    """Return how many values ``struct`` packs for the valid format ``fmt``, without unpacking,
    and its checked items: ``(index, "s" or "p", count)``, ``(first index, "?", run length)``.

    Counting by unpacking ``bytes(size)`` would let a peer's 20-byte frame declaring
    ``"<2000000000s"`` make the receiver allocate gigabytes before the value size is checked; for
    the same reason a run such as ``"1000000000?"`` is one entry, not one per item.
    """
    items = 0
    checks: list[tuple[int, str, int]] = []
    for count, char in _FORMAT_ITEM.findall(fmt):
        n = int(count) if count else 1
        if char in "sp":
            checks.append((items, char, n))
            items += 1  # "5s" is one bytes value
        elif char == "?":
            if n:
                checks.append((items, char, n))
            items += n
        elif char != "x":
            items += n
    return items, tuple(checks)


_ITEM_SIZES: Final = dict(
    zip("xcbB?hHiIlLqQefd", (1, 1, 1, 1, 1, 2, 2, 4, 4, 4, 4, 8, 8, 2, 4, 8), strict=True)
)


def _value_bounds(fmt: str) -> tuple[tuple[int, int, int, str], ...]:
    """Return the bytes of a valid portable format's value that only some values may take.

    Each entry is ``(offset, length, largest byte allowed, item)``: a run of '?' items (0 or 1),
    or the length byte of a 'p' item (at most ``min(count - 1, 255)``). Standard sizes, no
    padding between items, as in docs/protocol.md.
    """
    bounds: list[tuple[int, int, int, str]] = []
    offset = 0
    for count, char in _FORMAT_ITEM.findall(fmt):
        n = int(count) if count else 1
        if char in "sp":
            if char == "p":
                bounds.append((offset, 1, min(n - 1, 255), "p"))
            offset += n
        else:
            if char == "?" and n:
                bounds.append((offset, n, 1, "?"))
            offset += n * _ITEM_SIZES[char]
    return tuple(bounds)


def _brief(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _parse_digits(raw: bytes | memoryview) -> int:
    digits = bytes(raw)
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == 0x30):
        return -1
    return int(digits)


class Registry:
    """Trame types by code. :data:`REGISTRY` is the one used unless another is passed.

    Server and clients must register the same types (same codes and formats); the server relays
    codes it does not know after checking that their frames are well formed.
    """

    def __init__(self, *, builtins: bool = True) -> None:
        """Make a registry, holding the built-in types unless ``builtins`` is false."""
        self._by_code: dict[bytes, Trame] = {}
        # code+fmt_len+fmt of fixed-size types -> type: one lookup checks code and format together.
        self._by_head: dict[Any, Trame] = {}  # keys: bytes, looked up with read-only views too
        #: head -> value size of every fixed-size head known good: registered types, and formats
        #: of unregistered codes already checked once (bounded). The server's relay check.
        self.sizes: dict[Any, int] = {}
        #: whole constant prefix of MULTICAST/DATA frames of fixed-size types -> type.
        self._frame_heads: dict[bytes, tuple[Trame, int, Callable[..., Any]]] = {}
        #: code + fmt of unregistered codes -> (generic type, value size, head in :attr:`sizes`).
        self._generic: collections.OrderedDict[bytes, tuple[Trame, int, bytes]] = (
            collections.OrderedDict()
        )
        if builtins:
            for t in (INT, FLT, BOL, STR, BYT, POS):
                self._add(t)

    def _add(self, trame: Trame) -> None:
        self._by_code[trame._code] = trame
        if not trame.variable:
            self._by_head[trame.head] = trame
        self._reset_sizes()

    def _reset_sizes(self) -> None:
        # A code registered now may have been relayed as unknown: forget what was learnt.
        # A type that refuses some values of the right size is not a size check away from good.
        self.sizes = {
            head: t.size
            for head, t in self._by_head.items()
            if t.size is not None and not t.can_refuse
        }
        self._generic.clear()
        self._frame_heads = {
            HEADER.pack(1 + len(head) + t.size, kind) + head: (
                t,
                LENGTH_SIZE + 1 + len(head) + t.size,
                t.unpack_from,
            )
            for head, t in self._by_head.items()
            if t.size is not None and 1 + len(head) + t.size <= 0xFFFF_FFFF
            for kind in (_MULTICAST, _DATA)
        }

    def register(self, code: str, fmt: str, cls: type[Any] | None = None) -> Trame:
        """Register trame type ``code`` with struct format ``fmt``; return it.

        ``fmt`` is a struct format with an explicit portable byte order (``"<"`` is added when
        none is given), or ``"<*s"`` for a variable-length value (``cls=str`` for UTF-8 text,
        bytes otherwise). ``cls`` is the type of decoded values: a NamedTuple or dataclass whose
        fields map onto the format's items in order. The result also works as a class decorator::

            @trame_async.register("VEL", "<ff")
            class Velocity(NamedTuple):
                dx: float
                dy: float

        Values that would not decode back to themselves are refused at encoding: a ``?`` item
        takes ``True``/``False`` (or the int 0 or 1), an ``Ns`` item bytes of exactly N bytes, an
        ``Np`` item at most ``min(N - 1, 255)`` bytes.

        Raises:
            RegistrationError: the code is not 3 printable ASCII characters, is registered already,
                or the format cannot be carried (native byte order, no field, not a struct format,
                ``*`` other than in ``"<*s"``, a value too large for any frame).
        """
        raw = _check_code(code)
        normalized = _normalize_format(code, fmt)
        if raw in self._by_code:
            have = self._by_code[raw]
            if have.fmt == normalized and (cls is None or _same_class(have.cls, cls)):
                # The same registration again (a re-run cell, a reloaded module): a no-op, but
                # the newest definition of the class decodes from now on.
                if cls is not None and cls is not have.cls:
                    have._bind(cls)
                return have
            held = f" and class {have.cls.__qualname__}" if have.cls is not None else ""
            raise RegistrationError(
                f"trame code {code!r} is already registered with format {have.fmt!r}{held}; "
                f"registering it again with another format or class would change what the "
                f"frames mean: pick another code"
            )
        trame = Trame(code, normalized)
        if trame.size is not None:
            # The largest frame of the type is its RELAY; the length field must hold it.
            room = MAX_LENGTH - 1 - RELAY_OVERHEAD - len(trame.head)
            if trame.size > room:
                raise RegistrationError(
                    f"format {trame.fmt!r} of trame {code!r} packs {trame.size} bytes, more than "
                    f"the {room} a frame can carry; use a smaller format (frames are also limited "
                    f"by max_frame_size, 1 MiB by default)"
                )
        if cls is not None:
            trame._bind(cls)  # after the checks: a refused type must not mark the class
        trame.registered = True
        trame._owner = self
        self._add(trame)
        return trame

    def _remove(self, trame: Trame) -> None:
        if self._by_code.get(trame._code) is trame:
            del self._by_code[trame._code]
            self._by_head.pop(trame.head, None)
            self._reset_sizes()

    def __getitem__(self, code: str) -> Trame:
        trame = self._by_code.get(code.encode("ascii", "replace"))
        if trame is None:
            raise UnknownTrameError(code)
        return trame

    def get(self, code: str) -> Trame | None:
        """Return the type registered as ``code``, or None."""
        return self._by_code.get(code.encode("ascii", "replace"))

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and code.encode("ascii", "replace") in self._by_code

    def __iter__(self) -> Iterator[Trame]:
        return iter(self._by_code.values())

    def __len__(self) -> int:
        return len(self._by_code)

    def listing(self) -> Mapping[str, tuple[str, type[Any] | None]]:
        """Return ``{code: (format, value type)}`` for every registered type."""
        return {str(t): (t.fmt, t.cls) for t in self._by_code.values()}

    def _resolve(self, trame: TrameLike) -> Trame:
        if isinstance(trame, Trame) and trame.registered:
            return trame
        if isinstance(trame, type):
            bound = getattr(trame, "__trame__", None)
            if isinstance(bound, Trame):
                return bound
            raise TypeError(f"class {trame.__name__} is not bound to a trame by register()")
        if not isinstance(trame, str):
            raise TypeError(f"trame must be a Trame or a 3-character code, not {trame!r}")
        return self[trame]

    # --- data frames ----------------------------------------------------------------------------

    def encode(self, trame: TrameLike, value: Any, kind: int = Kind.MULTICAST) -> bytes:
        """Return a whole data frame (MULTICAST by default) carrying ``value``."""
        t = trame if type(trame) is Trame and trame.registered else self._resolve(trame)
        return t.pack_frame(kind, value)

    def decode_body(
        self, buf: bytes | bytearray | memoryview, start: int, *, strict: bool = True
    ) -> tuple[Trame, Any]:
        """Decode the data body ``buf[start:]`` (code, format, value).

        With ``strict`` an unknown code raises :class:`UnknownTrameError`; otherwise the value is
        unpacked with the frame's own format into a tuple (a scalar for one item).
        """
        return self._decode_body(_hashable(buf), start, strict)

    def _decode_body(self, buf: bytes | memoryview, start: int, strict: bool) -> tuple[Trame, Any]:
        end = len(buf)
        if end - start < 4:
            raise TruncatedFrameError("data frame code and format length", 4, end - start)
        fmt_end = start + 4 + buf[start + 3]
        if fmt_end > end:
            raise TruncatedFrameError("data frame format", fmt_end - start, end - start)
        trame = self._by_head.get(buf[start:fmt_end])
        if trame is not None:
            if end - fmt_end != trame.size:
                raise ValueSizeMismatchError(trame.code, trame.fmt, trame.size or 0, end - fmt_end)
            return trame, trame.unpack_from(buf, fmt_end)
        return self._decode_slow(buf, start, fmt_end, strict)

    def _decode_slow(
        self, buf: bytes | memoryview, start: int, fmt_end: int, strict: bool
    ) -> tuple[Trame, Any]:
        code_raw = bytes(buf[start : start + 3])
        if _CODE.fullmatch(code_raw) is None:
            raise BadFormatError(code_raw, "trame code is not 3 printable ASCII characters")
        fmt_raw = buf[start + 4 : fmt_end]
        value = buf[fmt_end:]
        code = code_raw.decode("ascii")
        trame = self._by_code.get(code_raw)
        if trame is not None:
            if trame.variable:
                if (
                    len(fmt_raw) >= 3
                    and fmt_raw[0] == 0x3C  # "<"
                    and fmt_raw[-1] == 0x73  # "s"
                ):
                    declared = _parse_digits(fmt_raw[1:-1])
                    if declared >= 0:
                        if declared != len(value):
                            raise ValueSizeMismatchError(
                                trame.code, f"<{declared}s", declared, len(value)
                            )
                        return trame, trame.unpack_variable(value)
                _check_syntax(fmt_raw)
                raise ValueSizeMismatchError(
                    trame.code, trame.fmt, f"<{len(value)}s", _fmt_text(fmt_raw)
                )
            fmt = _fmt_text(fmt_raw)
            if fmt[:1] == "!" and ">" + fmt[1:] == trame.fmt:
                # "!" is ">" (a peer may spell it either way): the registered type, as such.
                if len(value) != trame.size:
                    raise ValueSizeMismatchError(trame.code, fmt, trame.size or 0, len(value))
                return trame, trame.unpack_from(value)
            # A fixed type whose format differs from the registered one: a broken format is
            # BAD_FORMAT before it is compared (the order of checks of docs/protocol.md).
            _check_syntax(fmt_raw)
            raise ValueSizeMismatchError(trame.code, trame.fmt, trame.fmt, fmt)
        if strict:
            raise UnknownTrameError(code)
        generic, size = self.check_format(code_raw, fmt_raw)
        if size != len(value):
            raise ValueSizeMismatchError(code, generic.fmt, size, len(value))
        return generic, generic.unpack_from(value)

    def check_format(self, code_raw: bytes, fmt_raw: bytes | memoryview) -> tuple[Trame, int]:
        """Return an unregistered trame for ``code_raw`` with format ``fmt_raw``, and its size.

        Raises :class:`BadFormatError` when the format is not a portable struct format.
        """
        key = code_raw + bytes(fmt_raw)
        cache = self._generic
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit[0], hit[1]
        fmt = _check_syntax(fmt_raw)
        if fmt[0] == "!":
            fmt = ">" + fmt[1:]  # one spelling of big-endian, as at registration
        try:
            st = struct.Struct(fmt)
        except struct.error as err:
            raise BadFormatError(bytes(fmt_raw), str(err)) from err
        try:
            trame = Trame(code_raw.decode("ascii"), fmt)
        except RegistrationError as err:
            raise BadFormatError(bytes(fmt_raw), str(err)) from err
        if len(cache) >= _FORMAT_CACHE_SIZE:
            _, (_, _, old_head) = cache.popitem(last=False)
            self.sizes.pop(old_head, None)
        head = code_raw + bytes((len(fmt_raw),)) + bytes(fmt_raw)
        cache[key] = (trame, st.size, head)
        if code_raw not in self._by_code and fmt_raw[0] != 0x21 and not trame.can_refuse:
            # Next time this head passes the relay check with one lookup. Not a "!" head: the
            # server relays it as ">" (ServerCore.receive_data), which takes the slow path.
            self.sizes[head] = st.size
        return trame, st.size

    def check_body(self, buf: bytes | bytearray | memoryview, start: int) -> bool:
        """Check that the data body ``buf[start:]`` is well formed, without keeping its value.

        Registered codes are checked against their type (format, size, value); unknown codes
        against their own format. Used by the server before relaying.

        Returns whether the format is one of an unregistered code that the registry compiles and
        caches (:meth:`check_format`): the server counts how many distinct ones each connection
        makes it learn. A canonical ``<Ns`` of an unregistered code is checked without being
        learnt (every length would be a new format).
        """
        buf = _hashable(buf)  # its slices are dict keys below
        end = len(buf)
        if end - start < 4:
            self._decode_body(buf, start, False)  # raises
            return False
        fmt_end = start + 4 + buf[start + 3]
        if self.sizes.get(buf[start:fmt_end]) == end - fmt_end:
            return False
        if fmt_end > end or buf[start : start + 3] in self._by_code:
            self._decode_body(buf, start, False)
            return False
        fmt_raw = buf[start + 4 : fmt_end]
        if len(fmt_raw) >= 3 and fmt_raw[0] == 0x3C and fmt_raw[-1] == 0x73:  # "<", "s"
            declared = _parse_digits(fmt_raw[1:-1])
            if declared >= 0:
                code_raw = bytes(buf[start : start + 3])
                if _CODE.fullmatch(code_raw) is None:
                    raise BadFormatError(code_raw, "trame code is not 3 printable ASCII characters")
                if declared > MAX_LENGTH:  # as struct says of it: not a format that can travel
                    raise BadFormatError(bytes(fmt_raw), "total struct size too long")
                if declared != end - fmt_end:
                    raise ValueSizeMismatchError(
                        code_raw.decode("ascii"), f"<{declared}s", declared, end - fmt_end
                    )
                return False
        self._decode_body(buf, start, False)
        return True

    def decode_frame(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        strict: bool = True,
        group: str | None = None,
    ) -> Message:
        """Decode a data frame given from its kind byte (as :class:`~.wire.FrameParser` yields).

        GROUP_MULTICAST and GROUP_RELAY frames carry a group id, not a name: the caller, which
        maps ids to names, passes the name as ``group`` for :attr:`Message.group`.
        """
        frame = _hashable(frame)  # lookups hash slices of the frame
        if not frame:
            raise TruncatedFrameError("frame kind", 1, 0)
        kind = frame[0]
        if kind == _RELAY:
            if len(frame) < 5:
                raise TruncatedFrameError("RELAY sender", 4, len(frame) - 1)
            sender: int = SENDER.unpack_from(frame, 1)[0]
            trame, value = self._decode_body(frame, 5, strict)
            return _new_message(Message, (sender, trame, value, _KIND_RELAY, None))
        if kind == _MULTICAST or kind == _DATA:
            trame, value = self._decode_body(frame, 1, strict)
            return _new_message(Message, (0, trame, value, _KINDS[kind], None))
        if kind == _GROUP_RELAY:
            if len(frame) < 9:
                raise TruncatedFrameError("GROUP_RELAY sender and group id", 8, len(frame) - 1)
            sender = SENDER.unpack_from(frame, 1)[0]
            trame, value = self._decode_body(frame, 9, strict)
            return _new_message(Message, (sender, trame, value, Kind.GROUP_RELAY, group))
        if kind == _GROUP_MULTICAST:
            if len(frame) < 5:
                raise TruncatedFrameError("GROUP_MULTICAST group id", 4, len(frame) - 1)
            trame, value = self._decode_body(frame, 5, strict)
            return _new_message(Message, (0, trame, value, Kind.GROUP_MULTICAST, group))
        if kind in _KIND_NAMES:
            raise UnexpectedFrameError(_KIND_NAMES[kind], "where a data frame was expected")
        raise UnknownKindError(kind)

    def decode(self, message: bytes | memoryview) -> tuple[Trame, Any]:
        """Decode one whole data frame (length field included); see :func:`decode`."""
        if type(message) is not bytes:
            message = bytes(message)  # views used as dict keys must be read-only
        n = len(message)
        if n > 9:
            # Fast path: the whole prefix of a MULTICAST/DATA frame of a fixed-size type
            # (length, kind, code, format) is constant, so one lookup checks all of it.
            value_at = 9 + message[8]
            hit = self._frame_heads.get(message[:value_at])
            if hit is not None and n == hit[1]:
                return hit[0], hit[2](message, value_at)
        if n < LENGTH_SIZE + 1:
            raise TruncatedFrameError("frame header", LENGTH_SIZE + 1, n)
        length = int.from_bytes(message[:LENGTH_SIZE])
        if length < 1:
            raise TruncatedFrameError("frame header (length shorter than the kind byte)", 1, length)
        if n < LENGTH_SIZE + length:
            raise TruncatedFrameError("frame body", length, n - LENGTH_SIZE)
        if n > LENGTH_SIZE + length:
            raise TrailingDataError("the frame", n - LENGTH_SIZE - length)
        view = memoryview(message)[LENGTH_SIZE:]
        msg = self.decode_frame(view)
        return msg.trame, msg.value


_KIND_NAMES: Final = {int(k): k.name for k in Kind}
_KINDS: Final = {int(k): k for k in Kind}
# tuple.__new__ skips the Python-level __new__ of the NamedTuple: half the cost per message.
_new_message: Final = tuple.__new__


def _hashable(buf: bytes | bytearray | memoryview) -> bytes | memoryview:
    """Return ``buf`` itself if its slices hash (bytes, read-only views), else a bytes copy."""
    if type(buf) is bytes or (type(buf) is memoryview and buf.readonly):
        return buf
    return bytes(buf)


def _fmt_text(fmt_raw: bytes | memoryview) -> str:
    return bytes(fmt_raw).decode("ascii", "replace")


#: The format grammar of docs/protocol.md: an order character, then items; no whitespace. struct
#: alone would take whitespace between items, native orders and the native-only types.
_FORMAT_SYNTAX: Final = re.compile(rb"[<>!](?:[0-9]*[xcbB?hHiIlLqQefdsp])+")


def _check_syntax(fmt_raw: bytes | memoryview) -> str:
    """Return the format as text, or raise BadFormatError if it breaks the format grammar."""
    raw = bytes(fmt_raw)
    if _FORMAT_SYNTAX.fullmatch(raw) is None:
        if not raw or raw[:1] not in (b"<", b">", b"!"):
            raise BadFormatError(raw, "no explicit '<', '>' or '!' byte order")
        if any(c in b" \t\n\r\x0b\x0c" for c in raw):
            raise BadFormatError(raw, "whitespace in a format (struct would ignore it)")
        raise BadFormatError(raw, "not an item of the format grammar")
    return raw.decode("ascii")


def _builtin(code: str, fmt: str, cls: type[Any] | None = None) -> Trame:
    trame = Trame(code, _normalize_format(code, fmt), cls)
    trame.registered = True
    return trame


#: Signed 64-bit integer.
INT: Final = _builtin("INT", "<q")
#: IEEE 754 double.
FLT: Final = _builtin("FLT", "<d")
#: Boolean (one byte, 0 or 1).
BOL: Final = _builtin("BOL", "<?")
#: UTF-8 text of any length (up to the frame size).
STR: Final = _builtin("STR", "<*s", str)
#: Raw bytes of any length (up to the frame size).
BYT: Final = _builtin("BYT", "<*s", bytes)
#: 2-D position: two doubles, decoded as :class:`Position`.
POS: Final = _builtin("POS", "<dd", Position)

#: The registry used by default by :func:`register`, :func:`encode`, :func:`decode`, servers and
#: clients.
REGISTRY: Final = Registry()


def _same_class(a: type[Any] | None, b: type[Any] | None) -> bool:
    """Whether two classes are one definition (the same object, or one defined again)."""
    if a is None or b is None:
        return a is b
    return a is b or (
        a.__module__ == b.__module__
        and a.__qualname__ == b.__qualname__
        and _field_names(a) == _field_names(b)
    )


def _field_names(cls: type[Any] | None) -> tuple[str, ...] | None:
    if cls is None:
        return None
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    fields = getattr(cls, "_fields", None)
    return tuple(fields) if isinstance(fields, tuple) else None


def register(code: str, fmt: str, cls: type[Any] | None = None) -> Trame:
    """Register a trame type in the default registry; see :meth:`Registry.register`."""
    return REGISTRY.register(code, fmt, cls)


def registered() -> Mapping[str, tuple[str, type[Any] | None]]:
    """Return ``{code: (format, value type)}`` of the default registry."""
    return REGISTRY.listing()


def encode(trame: TrameLike, value: Any) -> tuple[bytes, str]:
    """Encode ``value`` as a MULTICAST frame of ``trame``; return ``(message, format)``.

    ``message`` is the whole frame, ready for ``client.send(message)``; ``format`` is the struct
    format of the value as sent.

    Raises:
        UnknownTrameError: ``trame`` is a code that is not registered.
        ValueMismatchError: the value does not fit the trame's format.
    """
    t = trame if type(trame) is Trame and trame.registered else REGISTRY._resolve(trame)
    message = t.pack_frame(_MULTICAST, value)
    if t._variable:
        return message, t.wire_format(len(message) - LENGTH_SIZE - 1 - 4 - message[8])
    return message, t.fmt


def decode(message: bytes | memoryview) -> tuple[Trame, Any]:
    """Decode one whole data frame (MULTICAST, RELAY or DATA); return ``(trame, value)``.

    Raises only :class:`~trame_async.TrameError` subclasses, whatever the bytes: a
    :class:`~trame_async.ProtocolError` for malformed bytes, :class:`UnknownTrameError` for an
    unregistered code.
    """
    return REGISTRY.decode(message)
