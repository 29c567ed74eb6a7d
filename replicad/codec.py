"""The record codec: keys, typed and opaque values, per-field dictionaries.

Theory of operation
-------------------
A dataset is *typed* (it has a list of :class:`~replicad.schema.Schema`
versions) or *opaque* (values are arbitrary bytes). :class:`DatasetCodec` turns
a record into the value bytes the origin stores and ships, and back. It does no
I/O and reads no clock; the only state it changes is its :class:`Dictionary`.

Stored value bytes (docs/FORMAT.md repeats this for other languages)::

    value   = header payload
    header  = 1 byte: 0x20 typed, 0x21 typed + Snappy (the fixed layout,
                      revision 2: what encode writes),
                      0x12 opaque, 0x13 opaque + Snappy,
                      0x10 typed, 0x11 typed + Snappy (revision 1: read only)
              (bit 0: Snappy; every other value is rejected)
    payload = the bytes below, or their *raw* Snappy compression (the block
              format: a varint of the uncompressed length, then the
              compressed stream; no framing, no CRC)

An opaque payload is the value itself. A typed payload is the fixed-offset
layout of :mod:`replicad.layout`: schema version, int width, a null bitmap,
one fixed-size slot per field of that version (scalars and dictionary codes
in place; strings, bytes and lists as end offsets into a variable area),
so names are stored once per dataset (in the schema), never per record, and
one field is one ``struct`` read (:attr:`DatasetCodec.field_getters`).

Revision 1 (written before the fixed layout, still decoded) was one msgpack
array ``[schema_version, v1, ..., vN]``: ``int`` as msgpack int, ``float`` as
float 64, ``float32`` as float 32, ``bool``, ``str``, ``bytes`` as bin,
``list<T>`` as array, null as nil, a ``dictionary`` field's code (or its
string when the dictionary was full).

A ``dictionary`` field holds the string's code in the field's dictionary (a
non-negative int); when that dictionary is full, the string itself (see
:class:`Dictionary`).

Canonical encoding: after defaults are filled, the same record gives the same
bytes for a given dictionary state, schema list and Snappy implementation.
Every field is always written (no trailing-default trimming); an ``int`` given
for a ``float``/``float32`` field is converted first (``1`` and ``1.0`` encode
the same); ``bool`` is never accepted for ``int`` (nor ``int`` for ``bool``).
Floats keep their IEEE bits (``-0.0`` and NaN payloads are preserved), so
``decode(encode(r))`` re-encodes to the same bytes. Ints take four bytes
unless one of the record needs eight, a null scalar's slot is zero and a null
variable field has an empty span.

Compression is per record, only where it pays: the payload is compressed
when it is at least :data:`~replicad.layout.FIXED_COMPRESS_MIN_BYTES` (256)
long and Snappy saves at least 12.5% (``compressed * 8 <= payload * 7``,
:func:`~replicad.layout.compression_pays`; opaque values the same from
:data:`COMPRESS_MIN_BYTES`). This
is a deterministic function of the payload, so it keeps the encoding
canonical. A compressed record costs a Snappy call on every read, one-field
reads included, and frames compress every batch on the wire anyway; so short
records stay raw (seed-like records, about 130 bytes, are never compressed),
and long text-like records, where per-record compression saves map space,
are compressed. (Revision 1 used 128 bytes; its msgpack payloads were
denser.)

Size limit: ``max_value_bytes`` bounds the *uncompressed* payload (an opaque
value's own length, a typed record's bytes after the header), checked on encode
(:class:`~replicad.errors.ValueTooLargeError`) and on decode before any Snappy
decompression allocates (a claimed length above it is
:class:`~replicad.errors.CorruptRecordError`). A reader's limit must be at least
the writer's.

Decoding checks the structure (header, Snappy, schema version, int width,
length against the fixed part and the end offsets, offsets in order, the
spill tail, dictionary codes, UTF-8; for revision 1 the msgpack array and
its number of values) and raises only
:class:`~replicad.errors.CorruptRecordError` for bytes that fail it; it does
not re-check each value's type, which the origin checked on encode and which
frames protect in transit with a checksum. Records of an older schema version
decode with the later fields' defaults (nullable fields without a default
read as ``None``); nothing is rewritten.

Speed: encoders and decoders are generated per schema version at construction
(straight-line Python, as :mod:`dataclasses` does for ``__init__``), with a
type-check fast path per field and a slow path for conversions, defaults,
nulls and errors; a whole record is packed and unpacked by one precompiled
``struct.Struct`` per (schema version, int width).
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import CodeType
from typing import Any, NamedTuple

import cramjam
import msgpack

from replicad.errors import (
    CodecError,
    CorruptRecordError,
    FieldTypeError,
    InvalidKeyError,
    KeyTooLongError,
    MissingFieldError,
    RecordError,
    SchemaError,
    UnknownFieldError,
    ValueTooLargeError,
)
from replicad.layout import (
    COMPRESSED_KEEP,
    FIXED_COMPRESS_MIN_BYTES,
    HEADER_FIXED,
    HEADER_FIXED_SNAPPY,
    INT_CHARS,
    LIST_PACK,
    LIST_UNPACK,
    SHORT_LIST,
    SPILL,
    Layout,
    LayoutError,
    compression_pays,
    field_getter,
    read_bools,
    read_floats,
    read_ints,
    read_packed,
    read_prefix,
    read_spills,
)
from replicad.schema import (
    FLOAT32_MAX,
    INT64_MAX,
    Field,
    FieldType,
    Schema,
    check_name,
    coerce_value,
)

MAX_KEY_BYTES = 507
"""The longest key accepted (:func:`check_key`): LMDB's limit of 511 bytes,
less the 4-byte Merkle leaf prefix the origin's records and every Merkle leaf
index put before a key."""

DEFAULT_MAX_VALUE_BYTES = 1 << 20
"""Default bound of an uncompressed value payload (1 MiB)."""

COMPRESS_MIN_BYTES = 128
"""Opaque values shorter than this are never compressed (typed records: see
the module doc)."""

DEFAULT_DICTIONARY_ENTRIES = 65_536
"""Default bound of entries per dictionary field (codes 0..65535)."""

HEADER_TYPED = 0x10
HEADER_TYPED_SNAPPY = 0x11
HEADER_OPAQUE = 0x12
HEADER_OPAQUE_SNAPPY = 0x13

_H_OPAQUE = bytes([HEADER_OPAQUE])
_H_OPAQUE_SNAPPY = bytes([HEADER_OPAQUE_SNAPPY])

# cramjam's raw Snappy is the standard block format (python-snappy 0.7's
# snappy.compress is this same function behind a bytes() copy).
_compress_raw = cramjam.snappy.compress_raw
_decompress_raw = cramjam.snappy.decompress_raw
_unpackb = msgpack.unpackb

# What a bad payload can make msgpack or cramjam raise.
_DECODE_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    msgpack.UnpackException,
    cramjam.DecompressionError,
)


def check_key(key: bytes) -> bytes:
    """Return ``key`` if it can be stored, else raise.

    Raises :class:`InvalidKeyError` for a key that is not ``bytes`` or is empty,
    :class:`KeyTooLongError` for one longer than :data:`MAX_KEY_BYTES`.
    """
    if type(key) is not bytes:
        if not isinstance(key, bytes):
            raise InvalidKeyError(f"a key must be bytes, got {type(key).__name__}")
        key = bytes(key)
    if not key:
        raise InvalidKeyError("a key cannot be empty")
    if len(key) > MAX_KEY_BYTES:
        raise KeyTooLongError(f"key of {len(key)} bytes is longer than {MAX_KEY_BYTES}")
    return key


# --- dictionary --------------------------------------------------------------


class DictionaryEntry(NamedTuple):
    """One dictionary addition: ``field``'s string ``value`` got ``code``."""

    field: str
    code: int
    value: str


class Dictionary:
    """Append-only per-field string tables: string -> small int code.

    A typed dataset shares one dictionary across its schema versions. Codes of a
    field are 0, 1, 2, ... in the order strings were first encoded. Each field
    holds at most ``max_entries_per_field`` strings; once a field is full, the
    codec stores new strings of that field inline (plain msgpack strings) instead
    of failing the write, so only the size suffers. Decoders accept both forms.

    Every addition is also appended to one log, so :attr:`size` works as a
    *mark*: the origin takes ``mark = dictionary.size`` before encoding a write
    batch, persists :meth:`entries_since` ``(mark)`` in the same transaction,
    and calls :meth:`truncate` ``(mark)`` if the write fails. Replicas
    :meth:`apply` the shipped entries (idempotently). Marks are positions in
    this object's log; :meth:`from_json` rebuilds the log field by field.

    Not thread-safe; the codec mutates it during :meth:`DatasetCodec.encode`.
    """

    def __init__(self, max_entries_per_field: int = DEFAULT_DICTIONARY_ENTRIES) -> None:
        """Raises :class:`CodecError` if the bound is not an int in
        1..2**32-1 (codes are stored in four bytes, 0xFFFFFFFF reserved)."""
        if type(max_entries_per_field) is not int or not 1 <= max_entries_per_field < SPILL:
            raise CodecError(
                f"max_entries_per_field must be an int in 1..{SPILL - 1}, "
                f"got {max_entries_per_field!r}"
            )
        self._max = max_entries_per_field
        self._strings: dict[str, list[str]] = {}
        self._codes: dict[str, dict[str, int]] = {}
        self._log: list[DictionaryEntry] = []

    @property
    def size(self) -> int:
        """Total number of entries over all fields (also the current mark)."""
        return len(self._log)

    @property
    def max_entries_per_field(self) -> int:
        """The per-field bound."""
        return self._max

    def strings(self, field: str) -> tuple[str, ...]:
        """The strings of ``field`` in code order (empty if it has none)."""
        return tuple(self._strings.get(field, ()))

    def code(self, field: str, value: str) -> int | None:
        """The code of ``value`` in ``field``, or None if it has none."""
        return self._codes.get(field, {}).get(value)

    def value(self, field: str, code: int) -> str:
        """The string of ``code`` in ``field``; raises :class:`CorruptRecordError`
        if the dictionary has no such code."""
        strings = self._strings.get(field, [])
        if type(code) is not int or not 0 <= code < len(strings):
            raise CorruptRecordError(
                f"dictionary code {code!r} of field {field!r} is not in the dictionary "
                f"({len(strings)} entries)"
            )
        return strings[code]

    def is_full(self, field: str) -> bool:
        """True when ``field`` holds ``max_entries_per_field`` strings."""
        return len(self._strings.get(field, ())) >= self._max

    def add(self, field: str, value: str) -> int | None:
        """The code of ``value`` in ``field``, appending it if new.

        Returns None, adding nothing, when ``value`` is new and the field is
        full. Raises :class:`SchemaError` for an invalid field name and
        :class:`FieldTypeError` for a value that is not a valid Unicode ``str``
        (the dictionary is unchanged then).
        """
        strings, codes = self._table(field)
        code = codes.get(value)
        if code is not None:
            return code
        if type(value) is not str:
            raise FieldTypeError(f"field {field!r}: expected str, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldTypeError(f"field {field!r}: string is not valid Unicode") from None
        if len(strings) >= self._max:
            return None
        code = len(strings)
        strings.append(value)
        codes[value] = code
        self._log.append(DictionaryEntry(field, code, value))
        return code

    def entries_since(self, mark: int) -> list[DictionaryEntry]:
        """The entries added after ``mark`` (a past :attr:`size`), oldest first.

        Raises :class:`CodecError` if ``mark`` is not in ``0..size``.
        """
        self._check_mark(mark)
        return self._log[mark:]

    def truncate(self, mark: int) -> None:
        """Forget every entry added after ``mark`` (roll back a failed write).

        Raises :class:`CodecError` if ``mark`` is not in ``0..size``; then
        nothing changes. Records encoded with the forgotten codes must be
        discarded too.
        """
        self._check_mark(mark)
        log = self._log
        while len(log) > mark:
            entry = log.pop()
            self._strings[entry.field].pop()
            del self._codes[entry.field][entry.value]

    def apply(self, entries: Iterable[Sequence[Any]]) -> int:
        """Add entries shipped from the origin; returns how many were new.

        Each entry is a :class:`DictionaryEntry` or any 3-item tuple or list
        ``(field, code, value)`` (as msgpack or JSON bring it back).
        Idempotent: an entry already present (same field, code and string) is
        skipped, so a redundant or repeated pull is harmless. Raises
        :class:`CorruptRecordError` for a malformed entry, a code that skips
        ahead, a code or string that conflicts with an existing entry, or a
        field beyond its bound; then every entry of this call is rolled back.
        """
        mark = len(self._log)
        added = 0
        try:
            for entry in entries:
                if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                    raise CorruptRecordError(f"bad dictionary entry {entry!r}")
                field, code, value = entry
                if type(code) is not int or type(value) is not str or type(field) is not str:
                    raise CorruptRecordError(f"bad dictionary entry {entry!r}")
                try:
                    strings, codes = self._table(field)
                except SchemaError as exc:
                    raise CorruptRecordError(f"bad dictionary entry {entry!r}: {exc}") from None
                if 0 <= code < len(strings) and strings[code] == value:
                    continue
                if code != len(strings) or value in codes or code >= self._max:
                    raise CorruptRecordError(
                        f"dictionary entry {entry!r} conflicts with the {len(strings)} "
                        f"entries of field {field!r}"
                    )
                strings.append(value)
                codes[value] = code
                self._log.append(DictionaryEntry(field, code, value))
                added += 1
        except BaseException:
            self.truncate(mark)
            raise
        return added

    def to_json(self) -> dict[str, Any]:
        """``{"max_entries_per_field": N, "fields": {"city": ["beijing", ...]}}``
        (strings in code order; fields without entries are left out)."""
        return {
            "max_entries_per_field": self._max,
            "fields": {name: list(s) for name, s in self._strings.items() if s},
        }

    @classmethod
    def from_json(cls, obj: object) -> Dictionary:
        """Rebuild a dictionary from :meth:`to_json` output.

        Raises :class:`CorruptRecordError` for a malformed object (wrong shape,
        duplicate strings in a field, more strings than the bound).
        """
        if not isinstance(obj, Mapping) or set(obj) != {"max_entries_per_field", "fields"}:
            raise CorruptRecordError("a dictionary is {'max_entries_per_field': N, 'fields': {}}")
        fields = obj["fields"]
        if not isinstance(fields, Mapping):
            raise CorruptRecordError("dictionary 'fields' must be an object")
        try:
            out = cls(obj["max_entries_per_field"])
        except CodecError as exc:
            raise CorruptRecordError(str(exc)) from None
        for name, strings in fields.items():
            if not isinstance(strings, list):
                raise CorruptRecordError(f"dictionary field {name!r} must be a list of strings")
            out.apply((name, code, s) for code, s in enumerate(strings))
        return out

    def _table(self, field: str) -> tuple[list[str], dict[str, int]]:
        """The live (strings, codes) of ``field``, created empty if needed.

        Codecs keep references to these objects: they are only ever mutated in
        place, never replaced.
        """
        strings = self._strings.get(field)
        if strings is None:
            check_name(field)
            strings = self._strings[field] = []
            self._codes[field] = {}
        return strings, self._codes[field]

    def _check_mark(self, mark: int) -> None:
        if type(mark) is not int or not 0 <= mark <= len(self._log):
            raise CodecError(f"dictionary mark {mark!r} is outside 0..{len(self._log)}")


# --- code generation ---------------------------------------------------------
#
# The per-field work of encode and decode is generated as straight-line Python
# once per codec: each field's value becomes a local variable with a one-line
# type check (the fast path); anything else (absent, None, an int for a float,
# a float32 to round, a new dictionary string, an error) goes to that field's
# slow-path function from _make_fixer. Field names are validated identifiers
# and are inserted with repr(); nothing else from the schema reaches the source.


class _Missing:
    """The sentinel for a field absent from a record."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()

_FLOAT32_LIMIT = repr(FLOAT32_MAX)


def _needs_fix(ftype: FieldType, var: str) -> str:
    """A Python condition, true when ``var`` must take the slow path.

    Int overflow below INT64_MIN is left to ``struct`` (it raises
    struct.error, which the encoder turns into FieldTypeError through
    ``pack_failed``); above INT64_MAX is checked here as well, so the fast
    path holds only ints that fit.
    """
    if ftype is FieldType.INT:
        return f"{var}.__class__ is not int or {var} > {INT64_MAX}"
    if ftype is FieldType.FLOAT32:
        return (
            f"{var}.__class__ is not float or {var} < -{_FLOAT32_LIMIT} or {var} > {_FLOAT32_LIMIT}"
        )
    cls = {
        FieldType.FLOAT: "float",
        FieldType.BOOL: "bool",
        FieldType.STR: "str",
        FieldType.BYTES: "bytes",
    }[ftype]
    return f"{var}.__class__ is not {cls}"


def _make_fixer(field: Field) -> Callable[[Any], Any]:
    """The slow path of one field: absent, null, conversions, errors."""
    name = field.name
    default = field.default
    nullable = field.nullable

    def fix(value: Any) -> Any:
        if value is _MISSING:
            if default is not None:
                return default
            if nullable:
                return None
            raise MissingFieldError(f"field {name!r} is required (no default, not nullable)")
        if value is None:
            if nullable:
                return None
            raise FieldTypeError(f"field {name!r} is not nullable, got None")
        return coerce_value(field, value)

    return fix


def _make_dict_fixer(field: Field, dictionary: Dictionary) -> Callable[[Any], Any]:
    """The slow path of a dictionary field: returns a code, the string itself
    (field full) or None; appends new strings to the dictionary."""
    name = field.name
    plain = _make_fixer(field)
    add = dictionary.add

    def fix(value: Any) -> Any:
        value = plain(value)
        if value is None:
            return None
        code = add(name, value)
        return value if code is None else code

    return fix


def _bad_code(name: str, code: object, size: int) -> None:
    raise CorruptRecordError(
        f"dictionary code {code!r} of field {name!r} is not in the dictionary ({size} entries)"
    )


class _Generator:
    """Writes the source of one typed codec's encode and decode functions."""

    def __init__(
        self,
        schemas: tuple[Schema, ...],
        dictionary: Dictionary,
        max_value_bytes: int,
        compress: bool,
    ) -> None:
        self.schemas = schemas
        self.latest = schemas[-1]
        self.fields = self.latest.fields
        self.dictionary = dictionary
        self.max_value_bytes = max_value_bytes
        self.compress = compress
        self.layouts = {schema.version: Layout(schema) for schema in schemas}
        self.ns: dict[str, Any] = {
            "Corrupt": CorruptRecordError,
            "DECODE_ERRORS": _DECODE_ERRORS,
            "unpackb": _unpackb,
            "compress_raw": _compress_raw,
            "log": dictionary._log,
            "truncate": dictionary.truncate,
            "StructError": struct.error,
            "pack": struct.pack,
            "packb": msgpack.Packer(use_bin_type=True, autoreset=True).pack,
            "H2Z": bytes([HEADER_FIXED_SNAPPY]),
            "read_ints": read_ints,
            "read_floats": read_floats,
            "read_bools": read_bools,
            "read_packed": read_packed,
        }
        for i, field in enumerate(self.fields):
            if field.dictionary:
                strings, codes = dictionary._table(field.name)
                self.ns[f"S{i}"] = strings
                self.ns[f"CODES{i}"] = codes
                self.ns[f"FIX{i}"] = _make_dict_fixer(field, dictionary)
            else:
                self.ns[f"FIX{i}"] = _make_fixer(field)
            self.ns[f"D{i}"] = field.default

    # --- encode

    def _check_lines(self) -> tuple[list[str], list[str]]:
        """Per-field fast-path checks, and the expression of each stored value."""
        out: list[str] = []
        exprs: list[str] = []
        for i, field in enumerate(self.fields):
            v = f"v{i}"
            if field.dictionary:
                out += [
                    "try:",
                    f"    c{i} = CODES{i}[{v}]",
                    "except (KeyError, TypeError):",
                    f"    c{i} = FIX{i}({v})",
                ]
                exprs.append(f"c{i}")
                continue
            exprs.append(v)
            guard = f"{v} is not None and " if field.nullable else ""
            if not field.is_list:
                test = _needs_fix(field.type, v)
                out += [
                    f"if {guard}({test}):" if guard else f"if {test}:",
                    f"    {v} = FIX{i}({v})",
                ]
                continue
            out += [
                f"if {guard}{v}.__class__ is not list:",
                f"    {v} = FIX{i}({v})",
                f"elif {v} is not None:" if guard else "else:",
                f"    for x in {v}:",
                f"        if {_needs_fix(field.type, 'x')}:",
                f"            {v} = FIX{i}({v})",
                "            break",
            ]
        return out, exprs

    def _pack_lines(self) -> list[str]:
        """Lines packing the checked values ``v<i>`` (``c<i>``: dictionary
        codes, strings or None) into ``value``, the fixed-layout record with
        its header byte (see :mod:`replicad.layout`)."""
        layout = self.layouts[self.latest.version]
        fields = self.fields
        out: list[str] = []

        def var(i: int) -> str:
            return f"c{i}" if fields[i].dictionary else f"v{i}"

        # the null bitmap, before dictionary values turn into codes
        nulls: list[str] = []
        for b in range(layout.null_bytes):
            terms = [
                f"({var(i)} is None) << {mask.bit_length() - 1}"
                for i, (byte, mask) in layout.null_bit.items()
                if byte == b
            ]
            out.append(f"n{b} = {' | '.join(terms)}")
            nulls.append(f"n{b}")
        if layout.dictionary:
            out.append("sp = []")
        for i in layout.dictionary:
            out += [f"if c{i}.__class__ is not int:", f"    c{i} = spill(c{i}, sp)"]
        # the bytes of the variable fields that hold no ints
        int_lists = set(layout.int_lists)
        for i in layout.variable:
            if i not in int_lists:
                out.append(f"b{i} = {self._var_expression(i, 2)}")
        # the int width: 4 bytes (code 2) unless some int needs 8 (code 3);
        # struct raises struct.error for an int that does not fit
        attempts = [2, 3] if layout.ints or layout.int_lists else [2]
        blocks: list[list[str]] = []
        for w in attempts:
            self.ns[f"PACK{w}"] = layout.structs[w].pack
            block = [f"b{i} = {self._var_expression(i, w)}" for i in layout.int_lists]
            previous: int | None = None
            for i in layout.variable:
                start = "" if previous is None else f"e{previous} + "
                block.append(f"e{i} = {start}len(b{i})")
                previous = i
            slots: list[str] = []
            for i, field in enumerate(fields):
                if field.dictionary:
                    slots.append(f"c{i}")
                elif i in layout.variable:
                    slots.append(f"e{i}")
                elif field.nullable:
                    slots.append(f"0 if v{i} is None else v{i}")
                else:
                    slots.append(f"v{i}")
            args = ", ".join([str(HEADER_FIXED), str(self.latest.version), str(w), *nulls, *slots])
            head = f"PACK{w}({args})"
            if layout.variable:
                parts = ", ".join([head, *(f"b{i}" for i in layout.variable)])
                block.append(f"value = b''.join(({parts}))")
            else:
                block.append(f"value = {head}")
            blocks.append(block)
        if len(blocks) == 1:
            out += blocks[0]
        else:
            out.append("try:")
            out += ["    " + line for line in blocks[0]]
            out.append("except StructError:")
            out += ["    " + line for line in blocks[1]]
        if layout.dictionary:
            out += ["if sp:", "    value += packb(sp)"]
        return out

    def _var_expression(self, i: int, width: int) -> str:
        """The expression of variable field ``i``'s bytes (ints of ``width``)."""
        field = self.fields[i]
        v = f"v{i}"
        if field.is_list:
            code = {
                FieldType.INT: INT_CHARS[width],
                FieldType.FLOAT: "d",
                FieldType.FLOAT32: "f",
            }.get(field.type)
            if code is not None:
                # a precompiled struct per length for short lists
                table = f"PL_{code}"
                self.ns[table] = LIST_PACK[code]
                expr = (
                    f"{table}[len({v})](*{v}) if len({v}) < {SHORT_LIST} "
                    f"else pack('<%d{code}' % len({v}), *{v})"
                )
            elif field.type is FieldType.BOOL:
                expr = f"bytes({v})"
            else:
                expr = f"packb({v})"
        elif field.type is FieldType.STR:
            expr = f"{v}.encode()"
        else:
            expr = v
        if field.nullable:
            return f"b'' if {v} is None else ({expr})"
        return expr

    def encode_source(self) -> str:
        latest = self.latest
        count = len(self.fields)
        names = latest.names
        name_set = frozenset(names)
        has_dict = any(f.dictionary for f in self.fields)
        fields = self.fields
        max_value_bytes = self.max_value_bytes

        def as_mapping(record: object) -> dict[Any, Any]:
            if not isinstance(record, Mapping):
                raise RecordError(f"a record must be a mapping, got {type(record).__name__}")
            return dict(record)

        def check_unknown(record: Mapping[Any, Any]) -> None:
            for key in record:
                if key not in name_set:
                    raise UnknownFieldError(
                        f"unknown field {key!r} (schema version {latest.version})"
                    )

        def fill(record: Mapping[str, Any]) -> tuple[Any, ...]:
            get = record.get
            return tuple([get(name, _MISSING) for name in names])

        def pack_failed(exc: Exception, values: tuple[Any, ...]) -> None:
            for field, value in zip(fields, values, strict=True):
                if value is not None and not field.dictionary:
                    coerce_value(field, value)  # raises FieldTypeError for the culprit
            raise RecordError(f"record cannot be packed: {exc}") from exc

        def too_large(size: int) -> None:
            raise ValueTooLargeError(
                f"encoded record of {size} bytes is larger than {max_value_bytes}"
            )

        self.ns.update(
            N=count,
            GET=operator.itemgetter(*names),
            as_mapping=as_mapping,
            check_unknown=check_unknown,
            fill=fill,
            pack_failed=pack_failed,
            too_large=too_large,
        )
        variables = ", ".join(f"v{i}" for i in range(count))
        checks, exprs = self._check_lines()
        stored = ", ".join(exprs)

        def spill(value: str | None, spills: list[str]) -> int:
            if value is None:
                return 0
            spills.append(value)
            return SPILL

        self.ns["spill"] = spill
        body = [
            *checks,
            "try:",
            *("    " + line for line in self._pack_lines()),
            "except (ValueError, TypeError, OverflowError, StructError) as exc:",
            f"    pack_failed(exc, ({stored},))",
            "n = len(value) - 1",
            f"if n > {max_value_bytes}:",
            "    too_large(n)",
        ]
        src = [
            "def encode(record):",
            "    if record.__class__ is not dict:",
            "        record = as_mapping(record)",
            "    if len(record) != N:",
            "        check_unknown(record)",
            "    try:",
            f"        ({variables},) = {'GET(record)' if count > 1 else '(GET(record),)'}",
            "    except KeyError:",
            "        check_unknown(record)",
            f"        ({variables},) = fill(record)",
        ]
        if has_dict:
            src += ["    mark = len(log)", "    try:"]
            src += ["        " + line for line in body]
            src += [
                "    except BaseException:",
                "        if len(log) != mark:",
                "            truncate(mark)",
                "        raise",
            ]
        else:
            src += ["    " + line for line in body]
        if self.compress:
            src += [
                f"    if n >= {FIXED_COMPRESS_MIN_BYTES}:",
                "        z = compress_raw(value[1:])",
                # compression_pays, inlined
                f"        if len(z) * {COMPRESSED_KEEP[1]} <= n * {COMPRESSED_KEEP[0]}:",
                "            return H2Z + z",
            ]
        src += ["    return value", ""]
        return "\n".join(src)

    # --- decode

    def _resolve(self, i: int, src: str, target: str) -> list[str]:
        """Lines storing the string of the dictionary value ``src`` of field i in
        ``target`` (a code, an inline string, or None when nullable)."""
        field = self.fields[i]
        none_ok = " and c is not None" if field.nullable else ""
        return [
            f"c = {src}",
            "if c.__class__ is int:",
            f"    if c < 0 or c >= len(S{i}):",
            f"        bad_code({field.name!r}, c, len(S{i}))",
            f"    {target} = S{i}[c]",
            f"elif c.__class__ is not str{none_ok}:",
            f"    bad_code({field.name!r}, c, len(S{i}))",
        ]

    def _dict_lines(self, schema: Schema) -> list[str]:
        """Build dict ``d`` from ``vals`` (a version-``schema`` array whose
        length is already checked)."""
        count = len(schema.fields)
        out = [
            f"(_, {', '.join(f'a{i}' for i in range(count))},) = vals",
            f"d = COPY{schema.version}()",
        ]
        for i, field in enumerate(schema.fields):
            if field.dictionary:
                out += self._resolve(i, f"a{i}", f"d[{field.name!r}]")
                out += ["else:", f"    d[{field.name!r}] = c"]
            else:
                out.append(f"d[{field.name!r}] = a{i}")
        for i in range(count, len(self.fields)):
            field = self.fields[i]
            if field.is_list and field.default is not None:
                out.append(f"d[{field.name!r}] = list(D{i})")
        return out

    def _list_lines(self, schema: Schema) -> list[str]:
        """Turn ``vals`` (a version-``schema`` array) into the latest value list."""
        count = len(schema.fields)
        out = ["del vals[0]"]
        for i, field in enumerate(schema.fields):
            if field.dictionary:
                out += self._resolve(i, f"vals[{i}]", f"vals[{i}]")
        tail = [
            f"list(D{i})" if f.is_list and f.default is not None else f"D{i}"
            for i, f in enumerate(self.fields[count:], start=count)
        ]
        if tail:
            out.append(f"vals += ({', '.join(tail)},)")
        return out

    def _templates(self) -> None:
        """``COPY<version>()``: a new dict of the latest fields, the fields
        added after ``version`` holding their defaults (lists: None, filled
        with a fresh copy by the decoder)."""
        for schema in self.schemas:
            template: dict[str, Any] = dict.fromkeys(self.latest.names)
            for field in self.fields[len(schema.fields) :]:
                template[field.name] = None if field.is_list else field.default
            self.ns[f"COPY{schema.version}"] = template.copy

    def decode_source(self) -> str:
        """Decoders of revision 1 (msgpack arrays): ``v1_decode`` and
        ``v1_decode_values``."""
        latest = self.latest
        fields = self.fields

        def bad_msgpack(exc: Exception) -> None:
            raise CorruptRecordError(f"bad msgpack payload: {exc}") from exc

        def old_version(vals: object, to_dict: bool) -> Any:
            if not isinstance(vals, list) or not vals:
                raise CorruptRecordError("a typed record is a non-empty msgpack array")
            version = vals[0]
            decoders = self.ns["DICT_DECODERS" if to_dict else "LIST_DECODERS"]
            if version.__class__ is not int or version not in decoders:
                known = ", ".join(str(s.version) for s in self.schemas)
                raise CorruptRecordError(f"unknown schema version {version!r} (known: {known})")
            expected = len(self.schemas[version - self.schemas[0].version].fields)
            if len(vals) != expected + 1:
                raise CorruptRecordError(
                    f"schema version {version} record has {len(vals) - 1} values, "
                    f"expected {expected}"
                )
            return decoders[version](vals)

        self.ns.update(bad_code=_bad_code, bad_msgpack=bad_msgpack, old_version=old_version)
        ind = "    "
        src: list[str] = []
        for schema in self.schemas:
            src.append(f"def dict_v{schema.version}(vals):")
            src += [ind + line for line in self._dict_lines(schema)]
            src += ["    return d", ""]
            src.append(f"def list_v{schema.version}(vals):")
            src += [ind + line for line in self._list_lines(schema)]
            src += ["    return vals", ""]
        prologue = [
            "    if not data:",
            "        raise Corrupt('empty value')",
            "    if data[0] == 16:",
            "        payload = data[1:]",
            "    else:",
            "        payload = payload_of(data)",
            "    try:",
            "        vals = unpackb(payload)",
            "    except DECODE_ERRORS as exc:",
            "        bad_msgpack(exc)",
            f"    if (vals.__class__ is not list or len(vals) != {len(fields) + 1} "
            f"or vals[0] != {latest.version} or vals[0].__class__ is not int):",
        ]
        src += ["def v1_decode(data):", *prologue, "        return old_version(vals, True)"]
        src += [ind + line for line in self._dict_lines(latest)]
        src += ["    return d", ""]
        src += ["def v1_decode_values(data):", *prologue, "        return old_version(vals, False)"]
        src += [ind + line for line in self._list_lines(latest)]
        src += ["    return vals", ""]
        return "\n".join(src)

    def _fixed_lines(self, schema: Schema, as_dict: bool) -> list[str]:
        """The body decoding a fixed-layout record of ``schema`` (``t`` is what
        the version's struct unpacked) to the latest schema's value list or
        dict: inlined in ``decode``/``decode_values`` for the latest version,
        ``fx<l|d>_v<version>(data, t)`` for older ones."""
        layout = self.layouts[schema.version]
        fields = schema.fields
        nulls = [f"n{b}" for b in range(layout.null_bytes)]
        slots = [f"a{i}" for i in range(len(fields))]
        out = [f"(_, _, w, {', '.join(nulls + slots)},) = t", f"B = BASE{schema.version}[w]"]
        variable = layout.variable
        if variable:
            out.append(f"end = B + a{variable[-1]}")
            if len(variable) > 1:
                chain = " <= ".join(f"a{i}" for i in variable)
                out += [
                    f"if not {chain}:",
                    "    raise LayoutError('variable field offsets decrease')",
                ]
        else:
            out.append("end = B")
        out += ["if len(data) != end:", f"    check_tail(data, end, t, {schema.version})"]
        exprs: list[str] = []
        previous: int | None = None
        for i, field in enumerate(fields):
            null = layout.null_bit.get(i)
            is_null = f"n{null[0]} & {null[1]}" if null is not None else ""
            if field.dictionary:
                lines = [
                    "try:",
                    f"    x{i} = S{i}[a{i}]",
                    "except IndexError:",
                    f"    x{i} = dict_slow(data, end, t, {schema.version}, {i})",
                ]
                if is_null:
                    out += [f"if {is_null}:", f"    x{i} = None", "else:"]
                    out += ["    " + line for line in lines]
                else:
                    out += lines
                exprs.append(f"x{i}")
                continue
            if i in variable:
                lo = "B" if previous is None else f"B + a{previous}"
                hi = f"B + a{i}"
                previous_var, previous = previous, i
                if field.type in (FieldType.INT, FieldType.FLOAT, FieldType.FLOAT32):
                    # a precompiled struct per length for short lists; the
                    # helper checks and reads the rest
                    if field.type is FieldType.INT:
                        shift, table, helper = "w", "UL_INT[w]", f"read_ints(data, {lo}, {hi}, w)"
                    else:
                        code = "d" if field.type is FieldType.FLOAT else "f"
                        shift = "3" if code == "d" else "2"
                        table = f"UL_{code}"
                        helper = f"read_floats(data, {lo}, {hi}, {code!r})"
                    span = f"a{i}" if previous_var is None else f"a{i} - a{previous_var}"
                    out += [
                        f"q = {span}",
                        f"k = q >> {shift}",
                        f"if k << {shift} == q and k < {SHORT_LIST}:",
                        f"    x{i} = list({table}[k](data, {lo}))",
                        "else:",
                        f"    x{i} = {helper}",
                    ]
                    if is_null:
                        out[-6:] = [f"if {is_null}:", f"    x{i} = None", "else:"] + [
                            "    " + line for line in out[-6:]
                        ]
                    exprs.append(f"x{i}")
                    continue
                if field.is_list:
                    expr = {
                        FieldType.BOOL: f"read_bools(data, {lo}, {hi})",
                        FieldType.STR: f"read_packed(data, {lo}, {hi}, str)",
                        FieldType.BYTES: f"read_packed(data, {lo}, {hi}, bytes)",
                    }[field.type]
                elif field.type is FieldType.STR:
                    expr = f"str(data[{lo}:{hi}], 'utf-8')"
                else:
                    expr = f"bytes(data[{lo}:{hi}])"
            else:
                expr = f"a{i}"
            exprs.append(f"None if {is_null} else {expr}" if is_null else expr)
        for i in range(len(fields), len(self.fields)):
            field = self.fields[i]
            exprs.append(f"list(D{i})" if field.is_list and field.default is not None else f"D{i}")
        if as_dict:
            # a copy of a template dict (keys in order, later fields' defaults
            # in place) filled by assignment beats a dict display of new keys
            out.append(f"d = COPY{schema.version}()")
            for i, (field, expr) in enumerate(zip(self.fields, exprs, strict=True)):
                if i < len(fields) or expr.startswith("list("):
                    out.append(f"d[{field.name!r}] = {expr}")
            out.append("return d")
        else:
            out.append(f"return [{', '.join(exprs)}]")
        return out

    def fixed_source(self) -> str:
        """Decoders of the fixed layout (revision 2): ``decode`` and
        ``decode_values``, the entry points, with a fast path for an
        uncompressed record of the latest schema version."""
        latest = self.latest.version
        layouts = self.layouts
        known = ", ".join(str(v) for v in layouts)
        ns = self.ns

        def check_tail(data: Any, end: int, t: tuple[Any, ...], version: int) -> None:
            if len(data) < end:
                raise LayoutError(
                    f"record of {len(data)} bytes is shorter than its offsets ({end})"
                )
            layout = layouts[version]
            spilled = sum(1 for i in layout.dictionary if t[layout.slot(i)] == SPILL)
            if spilled != len(read_spills(data, end)):
                raise LayoutError(f"{spilled} spilled dictionary strings, a tail that differs")

        def dict_slow(data: Any, end: int, t: tuple[Any, ...], version: int, index: int) -> str:
            layout = layouts[version]
            code = t[layout.slot(index)]
            name = layout.fields[index].name
            size = len(ns[f"S{index}"])
            if code != SPILL:
                _bad_code(name, code, size)
            ordinal = sum(1 for i in layout.dictionary if i < index and t[layout.slot(i)] == SPILL)
            spills = read_spills(data, end)
            if ordinal >= len(spills):
                raise LayoutError(f"field {name!r} is spilled but the spill tail is short")
            return spills[ordinal]

        def bad_layout(exc: Exception) -> None:
            raise CorruptRecordError(f"bad fixed-layout record: {exc}") from exc

        def other(data: Any, as_dict: bool) -> Any:
            """Everything but the fast path: compressed, another schema
            version, revision 1, malformed."""
            if not data:
                raise CorruptRecordError("empty value")
            head = data[0]
            if head == HEADER_FIXED_SNAPPY:
                data = bytes([HEADER_FIXED]) + bytes(ns["inflate"](data))
            elif head != HEADER_FIXED:
                # compiled on first use: only data written before the fixed
                # layout needs it (LIST_DECODERS is set last: a thread that
                # sees it finds the rest; two threads compiling is harmless)
                if "LIST_DECODERS" not in ns:
                    self._compile("decode_v1", self.decode_source())
                return ns["v1_decode" if as_dict else "v1_decode_values"](data)
            try:
                _, version, w = read_prefix(data)
            except LayoutError as exc:
                raise CorruptRecordError(str(exc)) from None
            if version not in layouts:
                raise CorruptRecordError(f"unknown schema version {version!r} (known: {known})")
            st = layouts[version].structs[w]
            if len(data) < st.size:
                raise CorruptRecordError(
                    f"schema version {version} record of {len(data)} bytes is shorter than "
                    f"its fixed part ({st.size})"
                )
            if version == latest:  # an inflated record: the entry point's fast path takes it
                return ns["decode" if as_dict else "decode_values"](data)
            kind = "d" if as_dict else "l"
            return ns[f"fx{kind}_v{version}"](data, st.unpack_from(data))

        self.ns.update(
            check_tail=check_tail,
            dict_slow=dict_slow,
            bad_layout=bad_layout,
            other=other,
            LayoutError=LayoutError,
            CorruptRecordError=CorruptRecordError,
            LAYOUT_ERRORS=(*_DECODE_ERRORS, struct.error),
            UNPACK=tuple(st.unpack_from for st in layouts[latest].structs),
            UL_INT=tuple(LIST_UNPACK[c] for c in INT_CHARS),
            UL_d=LIST_UNPACK["d"],
            UL_f=LIST_UNPACK["f"],
        )
        src: list[str] = []
        for version, layout in layouts.items():
            self.ns[f"BASE{version}"] = layout.base
            if version == latest:
                continue  # its body is inlined in the entry points below
            for kind, as_dict in (("d", True), ("l", False)):
                src += [f"def fx{kind}_v{version}(data, t):", "    try:"]
                src += ["        " + line for line in self._fixed_lines(layout.schema, as_dict)]
                src += [
                    "    except CorruptRecordError:",
                    "        raise",
                    "    except LAYOUT_ERRORS as exc:",
                    "        bad_layout(exc)",
                    "",
                ]
        # the entry points: the latest version's body inlined behind one check
        for name, as_dict in (("decode", True), ("decode_values", False)):
            src += [
                f"def {name}(data):",
                "    try:",
                "        t = UNPACK[data[3]](data)",
                "    except (IndexError, StructError, TypeError):",
                f"        return other(data, {as_dict})",
                f"    if t[0] != {HEADER_FIXED} or t[1] != {latest}:",
                f"        return other(data, {as_dict})",
                "    try:",
                *("        " + line for line in self._fixed_lines(layouts[latest].schema, as_dict)),
                "    except CorruptRecordError:",
                "        raise",
                "    except LAYOUT_ERRORS as exc:",
                "        bad_layout(exc)",
                "",
            ]
        return "\n".join(src)

    def _compile(self, name: str, source: str) -> None:
        self.ns[f"SOURCE_{name}"] = source
        exec(_compiled(source, f"<replicad.codec {name}>"), self.ns)
        if name == "decode_v1":
            versions = [s.version for s in self.schemas]
            self.ns["DICT_DECODERS"] = {v: self.ns[f"dict_v{v}"] for v in versions}
            self.ns["LIST_DECODERS"] = {v: self.ns[f"list_v{v}"] for v in versions}

    def build(self) -> dict[str, Any]:
        """Compile the encoder and the fixed-layout decoders; the namespace
        holds ``encode``, ``decode``, ``decode_values`` and the per-version
        decoders. Revision 1's decoders are compiled on the first revision-1
        (or unknown) value met: most codecs never see one."""
        self._templates()
        self._compile("encode", self.encode_source())
        self._compile("decode", self.fixed_source())
        self.ns["LAYOUTS"] = self.layouts
        return self.ns


@functools.lru_cache(maxsize=64)
def _compiled(source: str, filename: str) -> CodeType:
    """``source`` compiled, once: the generated source depends only on the
    schemas and settings (the dictionary is a name in the namespace), so a
    definition that only grew its dictionary -- every process builds a codec
    per definition -- skips the compiler (about 2 ms of a codec's 2.5)."""
    return compile(source, filename, "exec")


def _snappy_length(data: bytes | bytearray | memoryview) -> int:
    """The uncompressed length a raw Snappy block (after our header byte)
    claims, or -1 if its varint is truncated or longer than 5 bytes."""
    n = len(data)
    if n > 2:  # the usual value (under 16 KiB): one or two varint bytes, no loop
        b1 = data[1]
        if b1 < 0x80:
            return b1
        b2 = data[2]
        if b2 < 0x80:
            return (b1 & 0x7F) | (b2 << 7)
    result = 0
    shift = 0
    for i in range(1, min(n, 6)):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result
        shift += 7
    return -1


# --- the codec ---------------------------------------------------------------


class DatasetCodec:
    """Encodes and decodes one dataset's values (see the module doc for the format).

    ``schemas`` is every schema version of a typed dataset, oldest first
    (version 1, 2, ..., each an append-only evolution of the one before), or
    None for an opaque dataset. ``dictionary`` is the dataset's
    :class:`Dictionary` (a new empty one if omitted); the codec appends to it
    while encoding dictionary fields. ``max_value_bytes`` bounds uncompressed
    payloads; ``compress`` enables per-record Snappy on encode (decoding handles
    both either way).

    Raises :class:`SchemaError` for an empty or inconsistent schema list and
    :class:`CodecError` for a bad limit. Not thread-safe (encode mutates the
    dictionary); decoding never mutates anything.
    """

    encode: Callable[[Mapping[str, Any]], bytes]
    """``encode(record)``: the canonical value bytes of a typed record, under
    the latest schema.

    Absent fields get their default (None for nullable fields without one).
    Raises :class:`UnknownFieldError`, :class:`MissingFieldError`,
    :class:`FieldTypeError` (wrong type, None in a non-nullable field, a value
    out of range, a string that is not valid Unicode), :class:`RecordError`
    (not a mapping; an opaque dataset) or :class:`ValueTooLargeError`. After an
    error the dictionary is as it was before the call.

    (``encode``, ``decode`` and ``decode_values`` are functions generated for
    the codec's schemas and stored on the instance, which saves a method call
    on the hot path.)
    """

    decode: Callable[[bytes | bytearray | memoryview], dict[str, Any]]
    """``decode(data)``: a typed record as a new dict of the latest schema's
    fields.

    Old schema versions get the later fields' defaults (None for nullable
    fields without one); dictionary fields come back as strings. Raises
    :class:`CorruptRecordError` for anything that is not a record of a known
    schema version (and for every value of an opaque dataset).
    """

    field_getters: Mapping[str, Callable[[Any], Any]]
    """Field name -> a function reading that one field of a record's value
    bytes (latest schema) without decoding the rest, for every field but
    lists: one ``struct`` call for a scalar or dictionary field of an
    uncompressed fixed-layout record of the latest schema version (a slice
    more for ``str`` and ``bytes``), a full :attr:`decode_values` otherwise
    (compressed records, older versions and revisions). It returns what
    ``decode(data)[name]`` would; for a malformed record it raises what
    decoding raises, or returns the field when the bytes it reads are sound
    (it checks only those). Empty for an opaque dataset; read-only.
    """

    decode_values: Callable[[bytes | bytearray | memoryview], list[Any]]
    """``decode_values(data)``: a typed record's values as a new list in the
    latest schema's field order.

    The fast path for readers: index it with :meth:`field_index`. Same filling
    and errors as :attr:`decode`.
    """

    def __init__(
        self,
        schemas: Sequence[Schema] | None,
        dictionary: Dictionary | None = None,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        compress: bool = True,
    ) -> None:
        if type(max_value_bytes) is not int or max_value_bytes < 1:
            raise CodecError(f"max_value_bytes must be a positive int, got {max_value_bytes!r}")
        self._dictionary = dictionary if dictionary is not None else Dictionary()
        self._max_value_bytes = max_value_bytes
        self._compress = bool(compress)
        self.sources: dict[str, str] = {}
        """The generated source, by name (for debugging)."""
        if schemas is None:
            self._schemas: tuple[Schema, ...] = ()
            self._names: tuple[str, ...] = ()
            self._index: dict[str, int] = {}
            self.field_getters: Mapping[str, Callable[[Any], Any]] = {}
            self.encode = self._opaque_encode
            self.decode = self._opaque_decode
            self.decode_values = self._opaque_decode
            return
        if isinstance(schemas, Schema):
            raise SchemaError("pass the list of all schema versions, not one Schema")
        self._schemas = tuple(schemas)
        if not self._schemas:
            raise SchemaError("a typed dataset needs at least one schema")
        for schema in self._schemas:
            if not isinstance(schema, Schema):
                raise SchemaError(f"expected Schema objects, got {type(schema).__name__}")
        if self._schemas[0].version != 1:
            raise SchemaError(
                f"the schema list must start at version 1, got {self._schemas[0].version}"
            )
        for old, new in zip(self._schemas, self._schemas[1:], strict=False):
            Schema.check_evolution(old, new)
        self._names = self._schemas[-1].names
        self._index = {name: i for i, name in enumerate(self._names)}
        ns = _Generator(self._schemas, self._dictionary, max_value_bytes, self._compress).build()
        ns["payload_of"] = self._typed_payload
        ns["inflate"] = self.inflate
        self.encode = ns["encode"]
        self.decode = ns["decode"]
        self.decode_values = ns["decode_values"]
        self.sources = {"encode": ns["SOURCE_encode"], "decode": ns["SOURCE_decode"]}
        layout: Layout = ns["LAYOUTS"][self._schemas[-1].version]
        self.field_getters = {
            field.name: field_getter(
                layout,
                i,
                self._dictionary._table(field.name)[0] if field.dictionary else None,
                self._decoding_getter(i),
            )
            for i, field in enumerate(layout.fields)
            if not field.is_list
        }

    # --- properties

    @property
    def is_typed(self) -> bool:
        """True for a typed dataset, False for an opaque one."""
        return bool(self._schemas)

    @property
    def schema(self) -> Schema | None:
        """The latest schema (what :meth:`encode` writes), None if opaque."""
        return self._schemas[-1] if self._schemas else None

    @property
    def schemas(self) -> tuple[Schema, ...]:
        """Every schema version, oldest first (empty if opaque)."""
        return self._schemas

    @property
    def dictionary(self) -> Dictionary:
        """The dataset's dictionary (shared with codecs made by :meth:`with_schema`)."""
        return self._dictionary

    @property
    def max_value_bytes(self) -> int:
        """The bound of an uncompressed payload."""
        return self._max_value_bytes

    @property
    def compress(self) -> bool:
        """Whether encoding tries Snappy."""
        return self._compress

    @property
    def field_names(self) -> tuple[str, ...]:
        """The latest schema's field names: the order of :meth:`decode_values`."""
        return self._names

    @property
    def field_positions(self) -> Mapping[str, int]:
        """Field name -> position in :meth:`decode_values`'s list (latest
        schema); read-only, for hot paths that look fields up by name."""
        return self._index

    def field_getter(self, name: str) -> Callable[[Any], Any]:
        """The reader of one field: the one of :attr:`field_getters`, or for
        a list field a function decoding the record and returning that field.

        Raises :class:`UnknownFieldError` if the latest schema has no such field.
        """
        get = self.field_getters.get(name)
        if get is not None:
            return get
        return self._decoding_getter(self.field_index(name))

    def _decoding_getter(self, index: int) -> Callable[[Any], Any]:
        """A reader of field ``index`` that decodes the whole record."""
        decode_values = self.decode_values
        return lambda data: decode_values(data)[index]

    def field_index(self, name: str) -> int:
        """The position of field ``name`` in :meth:`decode_values`'s list.

        Raises :class:`UnknownFieldError` if the latest schema has no such field.
        """
        try:
            return self._index[name]
        except KeyError:
            raise UnknownFieldError(f"unknown field {name!r}") from None

    def with_schema(self, schema: Schema) -> DatasetCodec:
        """A codec for the next schema version; it still decodes every old one.

        The new codec shares this codec's dictionary and settings. Raises
        :class:`SchemaError` if ``schema`` is not an append-only evolution of
        the latest schema, or the dataset is opaque. ``self`` is unchanged.
        """
        if not self._schemas:
            raise SchemaError("an opaque dataset has no schema to evolve")
        Schema.check_evolution(self._schemas[-1], schema)
        return DatasetCodec(
            (*self._schemas, schema),
            self._dictionary,
            max_value_bytes=self._max_value_bytes,
            compress=self._compress,
        )

    # --- typed records (the encode/decode functions are generated in __init__)

    def _opaque_encode(self, _: object) -> Any:
        raise RecordError("this dataset is opaque: use encode_opaque(value)")

    def _opaque_decode(self, _: object) -> Any:
        raise CorruptRecordError("this dataset is opaque: use decode_opaque(data)")

    def _typed_payload(self, data: bytes | bytearray | memoryview) -> Any:
        """The msgpack payload of a typed value whose header is not 0x10."""
        head = data[0]
        if head == HEADER_TYPED_SNAPPY:
            return self.inflate(data)
        if head in (HEADER_OPAQUE, HEADER_OPAQUE_SNAPPY):
            raise CorruptRecordError("an opaque value where a typed record was expected")
        raise CorruptRecordError(f"unknown value header {head!r}")

    # --- opaque values

    def encode_opaque(self, value: bytes | bytearray | memoryview) -> bytes:
        """The value bytes of an opaque value (Snappy-compressed where it pays).

        Raises :class:`RecordError` if the dataset is typed or ``value`` is not
        bytes-like, :class:`ValueTooLargeError` if it is longer than
        ``max_value_bytes``.
        """
        if self._schemas:
            raise RecordError("this dataset is typed: use encode(record)")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise RecordError(f"an opaque value must be bytes, got {type(value).__name__}")
        if isinstance(value, memoryview):
            value = value.tobytes()
        n = len(value)
        if n > self._max_value_bytes:
            raise ValueTooLargeError(f"value of {n} bytes is larger than {self._max_value_bytes}")
        if self._compress and n >= COMPRESS_MIN_BYTES:
            z = _compress_raw(value)
            if compression_pays(len(z), n):
                return _H_OPAQUE_SNAPPY + z
        return _H_OPAQUE + value

    def decode_opaque(self, data: bytes | bytearray | memoryview) -> bytes:
        """An opaque value's bytes. Raises :class:`CorruptRecordError` for
        anything that is not a valid opaque value."""
        if not data:
            raise CorruptRecordError("empty value")
        head = data[0]
        if head == HEADER_OPAQUE:
            return bytes(data[1:])
        if head == HEADER_OPAQUE_SNAPPY:
            return bytes(self.inflate(data))
        if head in (HEADER_TYPED, HEADER_TYPED_SNAPPY, HEADER_FIXED, HEADER_FIXED_SNAPPY):
            raise CorruptRecordError("a typed record where an opaque value was expected")
        raise CorruptRecordError(f"unknown value header {head!r}")

    def inflate(self, data: bytes | bytearray | memoryview) -> Any:
        """Decompress the raw Snappy block after the header byte, bounded by
        ``max_value_bytes`` before anything is allocated; checked against
        the length the block claims. Returns a bytes-like buffer (cramjam's,
        not copied into ``bytes``: ``%b`` formatting, ``bytes()`` and
        ``len()`` take it). Raises :class:`CorruptRecordError`."""
        claimed = _snappy_length(data)
        if claimed < 0:
            raise CorruptRecordError("bad Snappy length prefix")
        if claimed > self._max_value_bytes:
            raise CorruptRecordError(
                f"Snappy block claims {claimed} bytes, more than {self._max_value_bytes}"
            )
        try:
            out = _decompress_raw(data[1:])
        except _DECODE_ERRORS as exc:
            raise CorruptRecordError(f"bad Snappy block: {exc}") from exc
        if len(out) != claimed:
            raise CorruptRecordError("Snappy block length mismatch")
        return out
