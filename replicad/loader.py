"""Reading records from CSV and JSON-lines files, for ``replicad load``.

Theory of operation
-------------------
:func:`open_records` opens a file and yields ``(key bytes, record)`` pairs,
ready for :meth:`replicad.client.OriginClient.write`: a ``dict`` of field values
for a typed dataset (a :class:`~replicad.schema.Schema`), the value ``bytes``
for an opaque one (``schema=None``). Every record is checked against the schema
here, so a bad line is reported with its file, line and field before anything
is sent (the origin checks again; this is for the message). The reader keeps
the number of file bytes consumed, for a progress bar.

Formats (``fmt``, or from the file name):

* ``csv`` (``.csv``): a header line naming the columns, one of them the key
  column. Cells are text and are converted to the field's type:

  - ``int``: a decimal integer; ``float``/``float32``: a decimal number,
    ``nan`` or ``inf``; ``bool``: ``true``/``false``/``1``/``0`` (any case);
    ``str``: the text as is; ``bytes``: base64;
  - ``list<T>``: a JSON array in the cell (``"[1, 2, 3]"``; bytes elements
    as base64 strings);
  - an empty cell is "no value": the field's default if it has one, else
    null if it is nullable, else (a required ``str`` field) the empty string;
    for any other required field it is an error.

  An opaque dataset's file has the columns ``key`` (or the key column) and
  ``value``; the value is the cell's UTF-8 bytes.
* ``jsonl`` (``.jsonl``, ``.ndjson``): one JSON object per line holding the
  key column and the fields (JSON types; ``bytes`` as ``{"base64": "..."}``,
  null for null). Blank lines are skipped. An opaque dataset's ``value`` is a
  string (its UTF-8 bytes) or ``{"base64": "..."}``.

Either may be gzip-compressed (``.gz``; recognised by its magic bytes whatever
the name). Keys are the key column's text as UTF-8 (a JSON integer key is
written in decimal). Text is UTF-8 (a BOM is skipped).

Every problem raises :class:`LoadError` (a :class:`BadRequestError`), whose
message names the file, the line and, where it applies, the field. Records
yielded before the error were valid; nothing is retained.
"""

from __future__ import annotations

import base64
import binascii
import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from replicad.errors import BadRequestError, FieldTypeError
from replicad.schema import (
    INT64_MAX,
    INT64_MIN,
    Field,
    FieldType,
    Schema,
    coerce_scalar,
    coerce_value,
)

__all__ = [
    "FORMATS",
    "LoadError",
    "RecordReader",
    "batches",
    "detect_format",
    "iter_records",
    "open_records",
]

FORMATS = ("csv", "jsonl")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_GZIP_MAGIC = b"\x1f\x8b"
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_OPAQUE_FIELD = "value"


class LoadError(BadRequestError):
    """A data file cannot be read as records of the dataset: it is missing or
    unreadable, not valid CSV/JSON lines/gzip/UTF-8, lacks the key column, or
    a line holds a value that does not fit its field. The message names the
    file, the line (1-based) and the field."""


def detect_format(path: str | Path) -> str:
    """``"csv"`` or ``"jsonl"`` from the file name (a ``.gz`` suffix is looked
    through). LoadError if the name says neither."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise LoadError(
            f"{path}: cannot tell the format from the name; use .csv, .jsonl or .ndjson "
            "(optionally .gz), or say --format csv|jsonl"
        )
    return fmt


# --- value conversion --------------------------------------------------------


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise FieldTypeError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldTypeError(f"{what}: not valid base64") from None


def _json_bytes(value: object, what: str) -> object:
    """``{"base64": s}`` -> bytes; anything else unchanged (coercion judges it)."""
    if isinstance(value, dict):
        if set(value) != {"base64"}:
            raise FieldTypeError(f'{what}: bytes are written {{"base64": "..."}}')
        return _b64(value["base64"], what)
    return value


def _parse_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FieldTypeError(f"{name}: expected an integer, got {text!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise FieldTypeError(f"{name}: int {value} is outside the signed 64-bit range")
    return value


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FieldTypeError(f"{name}: expected a number, got {text!r}") from None


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise FieldTypeError(f"{name}: expected true/false/1/0, got {text!r}")


def _cell_converter(field: Field) -> Callable[[str], object]:
    """A function from a non-empty CSV cell to the value the codec stores for
    ``field`` (built once per file: the per-cell work is one call). Raises
    FieldTypeError naming the field."""
    name = f"field {field.name!r}"
    t = field.type
    if field.is_list:

        def list_cell(text: str) -> object:
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if not isinstance(items, list):
                raise FieldTypeError(
                    f"{name}: expected a JSON array for {field.type_name}, got {text!r}"
                )
            if t is FieldType.BYTES:
                items = [_b64(item, name) for item in items]
            return coerce_value(field, items)

        return list_cell
    if t is FieldType.INT:
        return lambda text: _parse_int(name, text)
    if t is FieldType.FLOAT:
        return lambda text: _parse_float(name, text)
    if t is FieldType.FLOAT32:
        return lambda text: coerce_scalar(field.name, t, _parse_float(name, text))
    if t is FieldType.BOOL:
        return lambda text: _parse_bool(name, text)
    if t is FieldType.BYTES:
        return lambda text: _b64(text.strip(), name)
    return str  # a str cell is already valid Unicode (decoded from UTF-8)


def _json_value(field: Field, value: object) -> object:
    if field.type is FieldType.BYTES:
        what = f"field {field.name!r}"
        if field.is_list and isinstance(value, list):
            return [_json_bytes(item, what) for item in value]
        return _json_bytes(value, what)
    return value


def _empty(field: Field, record: dict[str, Any]) -> None:
    """An empty CSV cell: default, null, empty string, or an error."""
    if field.default is not None:
        return  # absent: the origin fills the default in
    if field.nullable:
        record[field.name] = None
    elif field.type is FieldType.STR and not field.is_list:
        record[field.name] = ""
    else:
        raise FieldTypeError(f"field {field.name!r} is required but the cell is empty")


_EXACT: dict[FieldType, type] = {
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.FLOAT32: float,
    FieldType.STR: str,
    FieldType.BOOL: bool,
    FieldType.BYTES: bytes,
}


def _finish(schema: Schema, record: dict[str, Any]) -> dict[str, Any]:
    """Check and normalize a JSON-lines record in place: nulls only where
    nullable, values coerced to their field types, required fields present.
    A scalar already of its field's exact Python type skips the coercion
    (the origin still range-checks it); anything else is coerced here, so
    errors can name the file and line."""
    for field in schema.fields:
        if field.name in record:
            value = record[field.name]
            if value is None:
                if not field.nullable:
                    raise FieldTypeError(f"field {field.name!r} is not nullable, got null")
                continue
            if not field.is_list and value.__class__ is _EXACT[field.type]:
                continue
            record[field.name] = coerce_value(field, value)
        elif field.required:
            raise FieldTypeError(f"field {field.name!r} is required and missing")
    return record


# --- the reader --------------------------------------------------------------


class RecordReader:
    """Iterates over the records of one open file (see :func:`open_records`).

    ``bytes_read`` counts the file's bytes consumed so far (compressed bytes
    for a gzip file; it advances in buffer-sized steps) and ``size`` is the
    file's size, for progress. ``records`` counts records yielded. Use as a
    context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fmt: str | None = None,
        key_column: str = "key",
        schema: Schema | None = None,
    ) -> None:
        self.path = Path(path)
        self.fmt = fmt if fmt is not None else detect_format(path)
        if self.fmt not in FORMATS:
            raise LoadError(f"{path}: unknown format {self.fmt!r}; expected csv or jsonl")
        self.key_column = key_column
        self.schema = schema
        self.records = 0
        self._fields = {} if schema is None else {f.name: f for f in schema.fields}
        try:
            self._raw: io.BufferedReader = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            self.size = os.fstat(self._raw.fileno()).st_size
            compressed = self._raw.read(2) == _GZIP_MAGIC
            self._raw.seek(0)
        except OSError as exc:
            raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        self._text: TextIO
        if compressed:
            unzipped = gzip.GzipFile(fileobj=self._raw, mode="rb")
            self._text = io.TextIOWrapper(unzipped, encoding="utf-8-sig", newline="")
        else:
            self._text = io.TextIOWrapper(self._raw, encoding="utf-8-sig", newline="")

    @property
    def bytes_read(self) -> int:
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return self.size

    def close(self) -> None:
        self._text.close()
        self._raw.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[bytes, Any]]:
        rows = self._csv() if self.fmt == "csv" else self._jsonl()
        try:
            for pair in rows:
                self.records += 1
                yield pair
        except (OSError, EOFError, zlib.error) as exc:
            raise LoadError(f"{self.path}: cannot read: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise LoadError(f"{self.path}: not UTF-8 text ({exc.reason})") from exc

    def _error(self, line: int, message: str) -> LoadError:
        return LoadError(f"{self.path}:{line}: {message}")

    # ------------------------------------------------------------ CSV

    def _csv(self) -> Iterator[tuple[bytes, Any]]:
        reader = csv.reader(self._text, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = self._csv_header(header)
            convert = self._csv_converter(columns)
            width = len(columns)
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != width:
                    raise self._error(line, f"expected {width} cells, got {len(row)}")
                try:
                    yield convert(row)
                except (FieldTypeError, BadRequestError) as exc:
                    raise self._error(line, str(exc)) from None
        except csv.Error as exc:
            raise self._error(reader.line_num, f"malformed CSV: {exc}") from exc

    def _csv_header(self, header: list[str]) -> list[str]:
        columns = [c.strip() for c in header]
        seen: set[str] = set()
        for column in columns:
            if column in seen:
                raise self._error(1, f"column {column!r} appears twice in the header")
            seen.add(column)
        if self.key_column not in seen:
            raise self._error(
                1, f"no key column {self.key_column!r} in the header (columns: {columns})"
            )
        allowed = set(self._fields) if self.schema is not None else {_OPAQUE_FIELD}
        unknown = [c for c in columns if c not in allowed and c != self.key_column]
        if unknown:
            what = "fields of the schema" if self.schema is not None else "'value'"
            raise self._error(1, f"unknown column(s) {unknown}; expected the key column and {what}")
        if self.schema is not None:
            absent = [f.name for f in self.schema.fields if f.required and f.name not in seen]
            if absent:
                raise self._error(1, f"no column for the required field(s) {absent}")
        if self.schema is None and (_OPAQUE_FIELD not in seen or self.key_column == _OPAQUE_FIELD):
            raise self._error(1, "an opaque dataset's file needs a 'value' column")
        return columns

    def _csv_converter(self, columns: list[str]) -> Callable[[list[str]], tuple[bytes, Any]]:
        key_at = columns.index(self.key_column)
        schema = self.schema
        if schema is None:
            value_at = columns.index(_OPAQUE_FIELD)

            def opaque(row: list[str]) -> tuple[bytes, Any]:
                return self._key(row[key_at]), row[value_at].encode("utf-8")

            return opaque

        # The key column is also stored as a field when the schema has one of that name.
        plan = [
            (i, self._fields[c], self._fields[c].name, _cell_converter(self._fields[c]))
            for i, c in enumerate(columns)
            if c in self._fields
        ]
        key = self._key

        def typed(row: list[str]) -> tuple[bytes, Any]:
            record: dict[str, Any] = {}
            for i, field, name, convert in plan:
                cell = row[i]
                if cell:
                    record[name] = convert(cell)
                else:
                    _empty(field, record)
            return key(row[key_at]), record

        return typed

    # ------------------------------------------------------------ JSON lines

    def _jsonl(self) -> Iterator[tuple[bytes, Any]]:
        for line_no, line in enumerate(self._text, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise self._error(line_no, f"not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise self._error(line_no, f"expected a JSON object, got {type(doc).__name__}")
            try:
                yield self._json_record(doc)
            except (FieldTypeError, BadRequestError) as exc:
                raise self._error(line_no, str(exc)) from None

    def _json_record(self, doc: dict[str, Any]) -> tuple[bytes, Any]:
        if self.key_column not in doc:
            raise BadRequestError(f"no key column {self.key_column!r}")
        raw_key = doc[self.key_column]
        if self.key_column not in self._fields:
            del doc[self.key_column]  # not a field: only the key
        if isinstance(raw_key, int) and not isinstance(raw_key, bool):
            raw_key = str(raw_key)
        if not isinstance(raw_key, str):
            raise BadRequestError(
                f"key {self.key_column!r} must be a string, got {type(raw_key).__name__}"
            )
        key = self._key(raw_key)
        schema = self.schema
        if schema is None:
            unknown = sorted(set(doc) - {_OPAQUE_FIELD})
            if unknown:
                raise BadRequestError(f"unknown field(s) {unknown}; expected 'value'")
            if _OPAQUE_FIELD not in doc:
                raise BadRequestError("an opaque dataset's record needs a 'value'")
            value = _json_bytes(doc[_OPAQUE_FIELD], "value")
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, bytes):
                raise BadRequestError(
                    f"'value' must be a string or {{\"base64\": ...}}, got {type(value).__name__}"
                )
            return key, value
        unknown = sorted(set(doc) - set(self._fields))
        if unknown:
            raise BadRequestError(f"unknown field(s) {unknown} (not in schema v{schema.version})")
        record = {name: _json_value(self._fields[name], value) for name, value in doc.items()}
        return key, _finish(schema, record)

    def _key(self, text: str) -> bytes:
        key = text.encode("utf-8")
        if not key:
            raise BadRequestError(f"empty key in column {self.key_column!r}")
        return key


def open_records(
    path: str | Path,
    *,
    fmt: str | None = None,
    key_column: str = "key",
    schema: Schema | None = None,
) -> RecordReader:
    """Open ``path`` for reading records (see the module docstring). Raises
    LoadError at once if the file cannot be opened or the format is unknown;
    header problems are raised when iteration starts."""
    return RecordReader(path, fmt=fmt, key_column=key_column, schema=schema)


def iter_records(
    path: str | Path,
    *,
    fmt: str | None = None,
    key_column: str = "key",
    schema: Schema | None = None,
) -> Iterator[tuple[bytes, Any]]:
    """Yield ``(key, record)`` from ``path`` and close it at the end (or when
    the generator is closed). Raises LoadError naming the file and line."""
    with open_records(path, fmt=fmt, key_column=key_column, schema=schema) as reader:
        yield from reader


def batches(records: Iterable[tuple[bytes, Any]], size: int = 10_000) -> Iterator[dict[bytes, Any]]:
    """Group ``records`` into dicts of at most ``size`` distinct keys, in order
    (a key repeated within a batch keeps its last record, as the file's later
    line wins). Raises BadRequestError if ``size`` < 1."""
    if size < 1:
        raise BadRequestError(f"batch size must be >= 1, got {size}")
    batch: dict[bytes, Any] = {}
    for key, record in records:
        if len(batch) >= size and key not in batch:
            yield batch
            batch = {}
        batch[key] = record
    if batch:
        yield batch
