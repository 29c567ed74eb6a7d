"""Schemas of typed datasets: ordered, typed fields that only ever grow.

Theory of operation
-------------------
A typed dataset stores every record as a list of values in its schema's field
order, so field names live once in the schema and never in a record (see
:mod:`replicad.codec`). A :class:`Schema` is a version number and a tuple of
:class:`Field` objects. Schemas evolve only by appending fields: version
``n + 1`` holds version ``n``'s fields unchanged, in the same order, followed by
at least one new field that is nullable or has a default (records written under
``n`` lack it, and readers fill it in). Nothing is ever rewritten.

Every check happens at construction: a :class:`Field` or :class:`Schema` that
exists is valid, and a field's ``default`` is already normalized to what the
codec would store (an ``int`` default of a float field becomes a ``float``, a
``float32`` default is rounded to single precision, a list default becomes a
tuple, a ``bytearray`` becomes ``bytes``).

Value rules (shared by defaults here and records in the codec):

* ``int``: an ``int`` (or any ``numbers.Integral``, e.g. a NumPy integer),
  not ``bool``, in the signed 64-bit range.
* ``float``: a ``float`` (or any ``numbers.Real``), or an ``int`` converted to
  ``float`` (so ``1`` and ``1.0`` encode the same); not ``bool``.
* ``float32``: as ``float``, then rounded to IEEE single precision; finite
  values beyond the float32 range are rejected (infinities and NaN pass).
* ``bool``: ``True`` or ``False`` only.
* ``str``: a ``str`` that is valid Unicode (encodable as UTF-8).
* ``bytes``: ``bytes``, ``bytearray`` or ``memoryview`` (stored as bytes).
* ``list<T>``: a ``list`` or ``tuple`` of non-null ``T`` values. The list itself
  may be null when the field is nullable; its elements never are.

JSON shape (:meth:`Schema.to_json` / :meth:`Schema.from_json`)::

    {"version": 2,
     "fields": [
       {"name": "age",  "type": "int",       "nullable": false, "default": 0},
       {"name": "city", "type": "str",       "nullable": false, "default": null,
        "dictionary": true},
       {"name": "tags", "type": "list<int>", "nullable": true,  "default": null}
     ]}

``type`` is one of ``int``, ``float``, ``float32``, ``bool``, ``str``,
``bytes``, or ``list<T>`` of one of them. ``nullable`` (default ``false``),
``default`` (``null`` or absent: no default) and ``dictionary`` (default
``false``; written only when true) are optional on input. Defaults of ``bytes``
fields (and the elements of ``list<bytes>`` defaults) are base64 strings in
JSON. Unknown keys are rejected.
"""

from __future__ import annotations

import base64
import binascii
import enum
import numbers
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from replicad.errors import FieldTypeError, SchemaError

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
FLOAT32_MAX: float = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
"""The largest finite IEEE single-precision value (about 3.4028e38)."""

MAX_SCHEMA_VERSION = 65_535
"""The last schema version: records store their version in two bytes."""

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_F32 = struct.Struct("<f")


class FieldType(enum.StrEnum):
    """The scalar type of a field (a list field is a list of one of these)."""

    INT = "int"
    FLOAT = "float"
    FLOAT32 = "float32"
    BOOL = "bool"
    STR = "str"
    BYTES = "bytes"


_TYPE_NAMES: dict[str, tuple[FieldType, bool]] = {}
for _t in FieldType:
    _TYPE_NAMES[_t.value] = (_t, False)
    _TYPE_NAMES[f"list<{_t.value}>"] = (_t, True)


def parse_type(spelling: str) -> tuple[FieldType, bool]:
    """``"int"`` -> ``(FieldType.INT, False)``, ``"list<str>"`` -> ``(FieldType.STR, True)``.

    Raises :class:`SchemaError` for any other spelling.
    """
    try:
        return _TYPE_NAMES[spelling]
    except (KeyError, TypeError):
        raise SchemaError(
            f"unknown field type {spelling!r}; expected one of {sorted(_TYPE_NAMES)}"
        ) from None


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid field name, else raise :class:`SchemaError`.

    A valid name is 1 to 64 characters of ``[A-Za-z0-9_]`` and does not start
    with a digit.
    """
    if not isinstance(name, str) or not name:
        raise SchemaError(f"a field name must be a non-empty string, got {name!r}")
    if _NAME_RE.fullmatch(name) is None:
        raise SchemaError(
            f"invalid field name {name!r}: use 1-{MAX_NAME_LENGTH} characters of "
            "[A-Za-z0-9_], not starting with a digit"
        )
    return name


def _type_error(name: str, expected: str, value: object) -> FieldTypeError:
    return FieldTypeError(f"field {name!r}: expected {expected}, got {type(value).__name__}")


def coerce_scalar(name: str, ftype: FieldType, value: object) -> object:
    """Normalize one non-null scalar ``value`` for a field of type ``ftype``.

    Returns the value the codec stores (see the module's value rules). Raises
    :class:`FieldTypeError` naming field ``name`` when the value does not fit;
    ``None`` never fits here (nullability is the caller's business).
    """
    cls = type(value)
    if ftype is FieldType.INT:
        if cls is bool or not isinstance(value, numbers.Integral):
            raise _type_error(name, "int", value)
        integer = int(value)
        if not INT64_MIN <= integer <= INT64_MAX:
            raise FieldTypeError(
                f"field {name!r}: int {integer} is outside the signed 64-bit range"
            )
        return integer
    if ftype is FieldType.FLOAT or ftype is FieldType.FLOAT32:
        if cls is bool or not isinstance(value, numbers.Real):
            raise _type_error(name, str(ftype.value), value)
        try:
            number = float(value)
        except OverflowError:
            raise FieldTypeError(f"field {name!r}: {value!r} is too large for a float") from None
        if ftype is FieldType.FLOAT32:
            try:
                return _F32.unpack(_F32.pack(number))[0]
            except OverflowError:
                raise FieldTypeError(
                    f"field {name!r}: {number!r} is outside the float32 range"
                ) from None
        return number
    if ftype is FieldType.BOOL:
        if cls is not bool:
            raise _type_error(name, "bool", value)
        return value
    if ftype is FieldType.STR:
        if not isinstance(value, str):
            raise _type_error(name, "str", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldTypeError(f"field {name!r}: string is not valid Unicode") from None
        return str(value)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _type_error(name, "bytes", value)
    return bytes(value)


def coerce_value(field: Field, value: object) -> object:
    """Normalize a non-null ``value`` for ``field`` (a list for list fields).

    Raises :class:`FieldTypeError` when it does not fit (including ``None``
    inside a list).
    """
    if not field.is_list:
        if value is None:
            raise FieldTypeError(f"field {field.name!r} is not nullable, got None")
        return coerce_scalar(field.name, field.type, value)
    if not isinstance(value, (list, tuple)):
        raise _type_error(field.name, f"list<{field.type.value}>", value)
    out = []
    for item in value:
        if item is None:
            raise FieldTypeError(f"field {field.name!r}: list elements cannot be null")
        out.append(coerce_scalar(field.name, field.type, item))
    return out


@dataclass(frozen=True)
class Field:
    """One field of a schema.

    ``default`` of ``None`` means "no default": a field that is neither nullable
    nor has a default is required in every record. ``dictionary`` (``str``
    fields only) marks a low-cardinality field the codec stores as small integer
    codes. Construction raises :class:`SchemaError` for an invalid name, type,
    flag or default; a valid default is stored normalized (see the module doc).
    """

    name: str
    type: FieldType
    is_list: bool = False
    nullable: bool = False
    default: object = None
    dictionary: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        ftype = self.type
        if not isinstance(ftype, FieldType):
            try:
                ftype = FieldType(ftype)
            except ValueError:
                raise SchemaError(f"field {self.name!r}: unknown field type {ftype!r}") from None
            object.__setattr__(self, "type", ftype)
        for flag in ("is_list", "nullable", "dictionary"):
            if type(getattr(self, flag)) is not bool:
                raise SchemaError(f"field {self.name!r}: {flag} must be a bool")
        if self.dictionary and (self.type is not FieldType.STR or self.is_list):
            raise SchemaError(
                f"field {self.name!r}: dictionary encoding is only for str fields, "
                f"not {self.type_name}"
            )
        if self.default is not None:
            try:
                normalized = coerce_value(self, self.default)
            except FieldTypeError as exc:
                raise SchemaError(f"bad default: {exc}") from None
            if isinstance(normalized, list):
                normalized = tuple(normalized)
            object.__setattr__(self, "default", normalized)

    @property
    def type_name(self) -> str:
        """The JSON spelling of the type: ``"int"``, ``"list<str>"``, ..."""
        return f"list<{self.type.value}>" if self.is_list else self.type.value

    @property
    def required(self) -> bool:
        """True when records must carry the field (not nullable, no default)."""
        return not self.nullable and self.default is None

    def to_json(self) -> dict[str, Any]:
        """This field as a JSON-able dict (see the module doc for the shape)."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type_name,
            "nullable": self.nullable,
            "default": _default_to_json(self.type, self.default),
        }
        if self.dictionary:
            out["dictionary"] = True
        return out

    @classmethod
    def from_json(cls, obj: object) -> Field:
        """Build a field from its JSON shape; raises :class:`SchemaError` if malformed."""
        if not isinstance(obj, Mapping):
            raise SchemaError(f"a field must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"name", "type", "nullable", "default", "dictionary"}
        if unknown:
            raise SchemaError(
                f"field {obj.get('name')!r}: unknown keys {sorted(map(str, unknown))}"
            )
        if "name" not in obj or "type" not in obj:
            raise SchemaError(f"a field needs 'name' and 'type', got keys {sorted(obj)}")
        name = check_name(obj["name"])
        ftype, is_list = parse_type(obj["type"])
        default = _default_from_json(name, ftype, is_list, obj.get("default"))
        return cls(
            name,
            ftype,
            is_list=is_list,
            nullable=obj.get("nullable", False),
            default=default,
            dictionary=obj.get("dictionary", False),
        )


def _default_to_json(ftype: FieldType, default: object) -> object:
    if default is None:
        return None
    if ftype is FieldType.BYTES:
        if isinstance(default, tuple):
            return [base64.b64encode(b).decode("ascii") for b in default]
        assert isinstance(default, bytes)
        return base64.b64encode(default).decode("ascii")
    if isinstance(default, tuple):
        return list(default)
    return default


def _default_from_json(name: str, ftype: FieldType, is_list: bool, raw: object) -> object:
    if raw is None or ftype is not FieldType.BYTES:
        return raw

    def unb64(item: object) -> bytes:
        if not isinstance(item, str):
            raise SchemaError(f"field {name!r}: a bytes default is a base64 string in JSON")
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise SchemaError(f"field {name!r}: default is not valid base64") from None

    if is_list:
        if not isinstance(raw, list):
            raise SchemaError(f"field {name!r}: a list<bytes> default is a JSON array")
        return [unb64(item) for item in raw]
    return unb64(raw)


@dataclass(frozen=True)
class Schema:
    """A version of a dataset's schema: ``version`` (1, 2, ...) and its fields.

    Construction raises :class:`SchemaError` for a version that is not an int
    in 1..65535 (records store it in two bytes), no fields, a
    non-:class:`Field` entry or duplicate names. ``fields`` may be given as
    any sequence; it is stored as a tuple.
    """

    version: int
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        if type(self.version) is not int or not 1 <= self.version <= MAX_SCHEMA_VERSION:
            raise SchemaError(
                f"schema version must be an int in 1..{MAX_SCHEMA_VERSION}, got {self.version!r}"
            )
        if isinstance(self.fields, (str, bytes)) or not isinstance(self.fields, Sequence):
            raise SchemaError("schema fields must be a sequence of Field")
        fields = tuple(self.fields)
        if not fields:
            raise SchemaError("a schema needs at least one field")
        seen: set[str] = set()
        for field in fields:
            if not isinstance(field, Field):
                raise SchemaError(
                    f"schema fields must be Field objects, got {type(field).__name__}"
                )
            if field.name in seen:
                raise SchemaError(f"duplicate field name {field.name!r}")
            seen.add(field.name)
        object.__setattr__(self, "fields", fields)

    @property
    def names(self) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in self.fields)

    def index(self, name: str) -> int:
        """The position of field ``name``; raises :class:`SchemaError` if absent."""
        for i, field in enumerate(self.fields):
            if field.name == name:
                return i
        raise SchemaError(f"schema version {self.version} has no field {name!r}")

    def to_json(self) -> dict[str, Any]:
        """This schema as a JSON-able dict (see the module doc for the shape)."""
        return {"version": self.version, "fields": [f.to_json() for f in self.fields]}

    @classmethod
    def from_json(cls, obj: object) -> Schema:
        """Build a schema from its JSON shape (already parsed, e.g. by ``json.loads``).

        Raises :class:`SchemaError` for any malformed or invalid input.
        """
        if not isinstance(obj, Mapping):
            raise SchemaError(f"a schema must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"version", "fields"}
        if unknown:
            raise SchemaError(f"schema: unknown keys {sorted(map(str, unknown))}")
        if "version" not in obj or "fields" not in obj:
            raise SchemaError("a schema needs 'version' and 'fields'")
        fields = obj["fields"]
        if not isinstance(fields, list):
            raise SchemaError("schema 'fields' must be a JSON array")
        return cls(obj["version"], tuple(Field.from_json(f) for f in fields))

    def evolve(self, new_fields: Iterable[Field]) -> Schema:
        """The next version: these fields plus ``new_fields`` appended.

        Raises :class:`SchemaError` when nothing is added, a name repeats, or a
        new field is required (old records lack it, so it must be nullable or
        have a default). ``self`` is unchanged.
        """
        new = Schema(self.version + 1, self.fields + tuple(new_fields))
        Schema.check_evolution(self, new)
        return new

    @staticmethod
    def check_evolution(old: Schema, new: Schema) -> None:
        """Check that ``new`` is an append-only evolution of ``old``.

        That is: ``new.version == old.version + 1``; ``old``'s fields appear
        first in ``new``, identical (name, type, nullability, default,
        dictionary) and in the same order; at least one field is added; and
        every added field is nullable or has a default. Raises
        :class:`SchemaError` saying what is wrong otherwise.
        """
        if new.version != old.version + 1:
            raise SchemaError(
                f"schema version must go from {old.version} to {old.version + 1}, got {new.version}"
            )
        new_pos = {f.name: i for i, f in enumerate(new.fields)}
        for i, was in enumerate(old.fields):
            if was.name not in new_pos:
                raise SchemaError(f"field {was.name!r} was removed (fields are append-only)")
            if new_pos[was.name] != i:
                raise SchemaError(
                    f"field {was.name!r} moved from position {i} to {new_pos[was.name]} "
                    "(fields keep their order)"
                )
            now = new.fields[i]
            if now.type_name != was.type_name:
                raise SchemaError(
                    f"field {was.name!r} changed type from {was.type_name} to {now.type_name}"
                )
            for attr in ("nullable", "default", "dictionary"):
                before, after = getattr(was, attr), getattr(now, attr)
                # repr() compares floats bit-exactly enough: NaN equals NaN, -0.0 != 0.0.
                if type(before) is not type(after) or repr(before) != repr(after):
                    raise SchemaError(
                        f"field {was.name!r} changed {attr} from {before!r} to {after!r}"
                    )
        added = new.fields[len(old.fields) :]
        if not added:
            raise SchemaError(f"schema version {new.version} adds no field")
        for field in added:
            if field.required:
                raise SchemaError(
                    f"new field {field.name!r} must be nullable or have a default "
                    "(records written before it lack it)"
                )
