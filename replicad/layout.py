"""The fixed-offset record layout: value format revision 2 of typed records.

Theory of operation
-------------------
Revision 1 stored a typed record as one msgpack array; reading any field meant
unpacking the whole array (about 1 µs for a 27-field record in CPython).
Revision 2 puts every scalar at an offset that depends only on the schema
version and one width byte, so a reader fetches one field with one
``struct.unpack_from`` call, and a whole record with one more::

    value   = 0x20 payload  |  0x21 snappy_raw(payload)
    payload = version:u16  width:u8  nulls:u8[NB]  slots  var-area  spill-tail

All integers are little-endian. ``version`` is the record's schema version.
``width`` is 0, 1, 2 or 3: every ``int`` in the record (scalar fields and the
elements of ``list<int>`` fields) is stored signed in 1, 2, 4 or 8 bytes.
Readers take all four; the encoder writes 2 (4 bytes) unless some int of
the record needs 8 bytes (3). (Trying 4 bytes and falling back when
``struct`` refuses costs nothing on the common path; finding the smallest
width would cost a min and a max over every int of every record.)
``nulls`` is a bitmap over the *nullable* fields only, in field order (bit
``j % 8`` of byte ``j // 8`` is set when the ``j``-th nullable field is
null); ``NB`` is the number of nullable fields divided by 8, rounded up (0
when there are none).

``slots`` holds one slot per field, in field order, with no padding:

=================================  ==========================================
field                              slot
=================================  ==========================================
``int``                            signed, ``width`` bytes
``float``                          IEEE float64 (8 bytes)
``float32``                        IEEE float32 (4 bytes)
``bool``                           one byte, 0 or 1
``str`` with ``dictionary``        u32 code in the field's dictionary;
                                   0xFFFFFFFF: the string is in the spill tail
``str``, ``bytes``, ``list<T>``    u32 end offset of its bytes in the var area
=================================  ==========================================

A null scalar or dictionary field's slot is zero; a null variable field has
an empty span (its slot repeats the previous variable field's end). The
var area holds the variable fields' bytes one after the other in field
order: a field's bytes run from the previous variable field's end offset (0
for the first) to its own. ``str`` is UTF-8; ``bytes`` as is; ``list<int>``
packed ints of ``width`` bytes; ``list<float>`` and ``list<float32>``
packed IEEE values; ``list<bool>`` one byte each; ``list<str>`` and
``list<bytes>`` one msgpack array. The spill tail is empty unless a
dictionary field was full when the record was written: then it is one
msgpack array of those fields' strings, in field order.

Canonical: the width is 2 unless an int needs 3, null scalar slots are
zero, the spill tail is present exactly when a code is 0xFFFFFFFF. (Readers
accept some non-canonical bytes too -- another width, unused null bits --
and decode them; the encoder never writes them.) Compression
(raw Snappy of the payload) is used only for payloads of at least
:data:`FIXED_COMPRESS_MIN_BYTES` that it shrinks by 12.5 % or more
(:func:`compression_pays`): a compressed record gives up the one-call field
read.

This module describes a schema version's layout (:class:`Layout`) and makes
the single-field readers (:func:`field_getter`); :mod:`replicad.codec`
generates the encoders and decoders from the same :class:`Layout`. No I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from replicad.schema import Field, FieldType, Schema

HEADER_FIXED = 0x20
"""Header byte of a typed record in the fixed-offset layout."""
HEADER_FIXED_SNAPPY = 0x21
"""Header byte of a typed record in the fixed-offset layout, payload compressed."""

SPILL = 0xFFFFFFFF
"""A dictionary slot whose string is in the spill tail."""

FIXED_COMPRESS_MIN_BYTES = 256
"""Fixed-layout payloads shorter than this are never compressed: a compressed
record costs a Snappy call on every read, including one-field reads."""

COMPRESSED_KEEP = (7, 8)
"""A record's (or opaque value's) Snappy block is kept only when it is at
most 7/8 of the payload, that is when it saves at least 12.5 % (RocksDB's
default for its blocks, ``max_compressed_bytes_per_kb`` = 896): every read
of a compressed value pays for the Snappy call, which for a 500-byte JSON
value was a fifth of a socket worker's CPU per ``HGET`` under ``-P 16``
pipelines (docs/benchmarks.md, session 12)."""


def compression_pays(compressed: int, payload: int) -> bool:
    """Whether a Snappy block of ``compressed`` bytes is kept for a payload of
    ``payload`` bytes (:data:`COMPRESSED_KEEP`)."""
    return compressed * COMPRESSED_KEEP[1] <= payload * COMPRESSED_KEEP[0]


INT_CHARS = "bhiq"
"""struct codes of the four int widths (1, 2, 4, 8 bytes), by width code."""

_SCALAR_CHARS = {FieldType.FLOAT: "d", FieldType.FLOAT32: "f", FieldType.BOOL: "?"}
_PREFIX = struct.Struct("<BHB")

SHORT_LIST = 64
"""Lists shorter than this are packed and unpacked by a precompiled struct of
their length (:data:`LIST_PACK`, :data:`LIST_UNPACK`); longer ones build a
format string per call."""

LIST_PACK: dict[str, tuple[Callable[..., bytes], ...]] = {
    code: tuple(struct.Struct(f"<{n}{code}").pack for n in range(SHORT_LIST))
    for code in (*INT_CHARS, "d", "f")
}
"""struct code -> ``pack`` of ``n`` such values, by ``n`` (made once, shared by
every codec)."""

LIST_UNPACK: dict[str, tuple[Callable[..., tuple[Any, ...]], ...]] = {
    code: tuple(struct.Struct(f"<{n}{code}").unpack_from for n in range(SHORT_LIST))
    for code in (*INT_CHARS, "d", "f")
}
"""struct code -> ``unpack_from`` of ``n`` such values, by ``n``."""


def is_variable(field: Field) -> bool:
    """True for fields stored in the var area (their slot is an end offset)."""
    return field.is_list or (
        field.type in (FieldType.STR, FieldType.BYTES) and not field.dictionary
    )


class Layout:
    """The layout of one schema version: slot formats, tuple positions, offsets.

    ``structs[w]`` unpacks ``(header, version, width, *nulls, *slots)`` from the
    start of a value whose width code is ``w``; ``base[w]`` is where its var
    area begins. ``slot(i)`` is field ``i``'s position in that tuple.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.fields: tuple[Field, ...] = schema.fields
        nullable = [i for i, f in enumerate(self.fields) if f.nullable]
        self.null_bytes = (len(nullable) + 7) // 8
        self.null_bit: dict[int, tuple[int, int]] = {
            i: (j >> 3, 1 << (j & 7)) for j, i in enumerate(nullable)
        }
        """Field index -> (null byte index, bit mask), for nullable fields."""
        self.variable = [i for i, f in enumerate(self.fields) if is_variable(f)]
        self.dictionary = [i for i, f in enumerate(self.fields) if f.dictionary]
        self.ints = [
            i for i, f in enumerate(self.fields) if f.type is FieldType.INT and not f.is_list
        ]
        self.int_lists = [
            i for i, f in enumerate(self.fields) if f.type is FieldType.INT and f.is_list
        ]
        self.structs = tuple(struct.Struct(self.format(w)) for w in range(4))
        self.base = tuple(s.size for s in self.structs)
        self._offsets = tuple(self._slot_offsets(w) for w in range(4))

    def _slot_offsets(self, width: int) -> tuple[int, ...]:
        at = struct.calcsize(self.format(width, 0))
        out = []
        for i in range(len(self.fields)):
            out.append(at)
            at += struct.calcsize("<" + self.slot_char(i, width))
        return tuple(out)

    def slot_char(self, index: int, width: int) -> str:
        field = self.fields[index]
        if field.dictionary or is_variable(field):
            return "I"
        if field.type is FieldType.INT:
            return INT_CHARS[width]
        return _SCALAR_CHARS[field.type]

    def format(self, width: int, upto: int | None = None) -> str:
        """The struct format of the prefix, nulls and slots of fields ``< upto``."""
        count = len(self.fields) if upto is None else upto
        slots = "".join(self.slot_char(i, width) for i in range(count))
        return "<BHB" + "B" * self.null_bytes + slots

    def slot(self, index: int) -> int:
        """Field ``index``'s position in the tuple ``structs[w]`` unpacks."""
        return 3 + self.null_bytes + index

    def offset(self, index: int, width: int) -> int:
        """Byte offset of field ``index``'s slot in a value of width ``width``."""
        return self._offsets[width][index]

    def previous_variable(self, index: int) -> int | None:
        """The variable field before field ``index`` (its end is this one's
        start), or None if ``index`` is the first."""
        before = [i for i in self.variable if i < index]
        return before[-1] if before else None


# --- one-field readers -------------------------------------------------------


def _picker(wanted: Sequence[tuple[int, str]]) -> Any:
    """``unpack_from`` of a struct reading (header, version, *wanted values):
    each of ``wanted`` is (byte offset, struct code), in increasing offset."""
    fmt = "<BH"
    at = 3
    for offset, code in wanted:
        if offset > at:
            fmt += f"{offset - at}x"
        fmt += code
        at = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt).unpack_from


def field_getter(
    layout: Layout,
    index: int,
    strings: list[str] | None,
    slow: Callable[[Any], Any],
) -> Callable[[Any], Any]:
    """A function reading field ``index`` of a value of ``layout``'s schema
    version without decoding the rest.

    It reads an uncompressed fixed-layout record of exactly this schema
    version in one ``struct`` call (plus a slice for ``str`` and ``bytes``);
    every other value (another version, compressed, revision 1, a list field,
    a spilled dictionary string, anything malformed) goes to ``slow(data)``,
    which decodes the whole record and raises what decoding raises. It does
    not check the parts of the record it does not read.
    """
    field = layout.fields[index]
    version = layout.schema.version
    null = layout.null_bit.get(index)
    if field.is_list:
        return slow
    variable = is_variable(field)
    previous = layout.previous_variable(index) if variable else None
    wanted_by_width: list[list[tuple[int, str]]] = []
    for w in range(4):
        wanted: list[tuple[int, str]] = []
        if null is not None:
            wanted.append((4 + null[0], "B"))
        if previous is not None:
            wanted.append((layout.offset(previous, w), "I"))
        wanted.append((layout.offset(index, w), layout.slot_char(index, w)))
        wanted_by_width.append(wanted)
    pick = tuple(_picker(wanted) for wanted in wanted_by_width)
    # The readers below repeat their first lines on purpose: each is a hot
    # path of a few hundred nanoseconds, and a shared helper costs a call.
    base = layout.base
    mask = null[1] if null is not None else 0

    if variable:
        as_str = field.type is FieldType.STR
        has_start = previous is not None
        first = 3 if null is not None else 2  # the start's position in the tuple

        def get_variable(data: Any) -> Any:
            try:
                w = data[3]
                got = pick[w](data)
            except (IndexError, struct.error, TypeError):
                return slow(data)
            if got[0] != HEADER_FIXED or got[1] != version:
                return slow(data)
            if null is not None and got[2] & mask:
                return None
            start = got[first] if has_start else 0
            end = got[-1]
            b = base[w]
            if start > end or b + end > len(data):
                return slow(data)
            if as_str:
                try:
                    return str(data[b + start : b + end], "utf-8")
                except UnicodeDecodeError:
                    return slow(data)
            return bytes(data[b + start : b + end])

        return get_variable

    if strings is not None:
        table = strings

        def get_code(data: Any) -> Any:
            try:
                got = pick[data[3]](data)
            except (IndexError, struct.error, TypeError):
                return slow(data)
            if got[0] != HEADER_FIXED or got[1] != version:
                return slow(data)
            if null is not None and got[2] & mask:
                return None
            try:
                return table[got[-1]]
            except IndexError:
                return slow(data)

        return get_code

    if null is None:

        def get_scalar(data: Any) -> Any:
            try:
                h, v, x = pick[data[3]](data)
            except (IndexError, struct.error, TypeError):
                return slow(data)
            if h == HEADER_FIXED and v == version:
                return x
            return slow(data)

        return get_scalar

    def get_nullable(data: Any) -> Any:
        try:
            h, v, n, x = pick[data[3]](data)
        except (IndexError, struct.error, TypeError):
            return slow(data)
        if h == HEADER_FIXED and v == version:
            return None if n & mask else x
        return slow(data)

    return get_nullable


# --- helpers the generated decoders call ------------------------------------


class LayoutError(ValueError):
    """Raised by the helpers below for bytes that break the layout; the
    generated decoders turn it into CorruptRecordError."""


def read_ints(data: Any, start: int, end: int, width: int) -> list[int]:
    size = 1 << width
    count, rest = divmod(end - start, size)
    if rest:
        raise LayoutError(f"a list<int> span of {end - start} bytes is not a multiple of {size}")
    return list(struct.unpack_from(f"<{count}{INT_CHARS[width]}", data, start))


def read_floats(data: Any, start: int, end: int, code: str) -> list[float]:
    size = 8 if code == "d" else 4
    count, rest = divmod(end - start, size)
    if rest:
        raise LayoutError(f"a float list span of {end - start} bytes is not a multiple of {size}")
    return list(struct.unpack_from(f"<{count}{code}", data, start))


def read_bools(data: Any, start: int, end: int) -> list[bool]:
    return [b != 0 for b in bytes(data[start:end])]


def read_packed(data: Any, start: int, end: int, cls: type) -> list[Any]:
    items = msgpack.unpackb(bytes(data[start:end]), raw=False)
    if items.__class__ is not list or any(x.__class__ is not cls for x in items):
        raise LayoutError(f"a list<{cls.__name__}> span is not a msgpack array of {cls.__name__}")
    return items


def read_spills(data: Any, start: int) -> list[str]:
    """The spill tail from ``start``: a msgpack array of str."""
    try:
        items = msgpack.unpackb(bytes(data[start:]), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise LayoutError(f"the spill tail is not msgpack: {exc}") from None
    if items.__class__ is not list or any(x.__class__ is not str for x in items):
        raise LayoutError("the spill tail is not a msgpack array of str")
    return items


def read_prefix(data: Any) -> tuple[int, int, int]:
    """(header, version, width) of a fixed-layout value."""
    if len(data) < _PREFIX.size:
        raise LayoutError(f"a fixed-layout record of {len(data)} bytes has no room for its prefix")
    h, v, w = _PREFIX.unpack_from(data)
    if w > 3:
        raise LayoutError(f"unknown int width code {w}")
    return h, v, w
