"""A typed record's JSON, as the socket serves it and the mirror's JSON view
stores it (sans-IO: bytes in, bytes out).

:func:`to_json` is the reference: strict JSON, bytes as ``{"base64": ...}``,
NaN and infinities as the strings the origin's HTTP API uses.
:class:`JsonRenderer` gives the same bytes for a stored record, faster.
:func:`bulk` frames a rendering as a RESP bulk string (the same in RESP2 and
RESP3), which is what the mirror's JSON view stores per key
(docs/FORMAT.md), and :func:`renders_alike` says whether records rendered
under one dataset definition render the same under another.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from replicad.codec import DatasetCodec
from replicad.schema import FieldType


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as the strings the HTTP API uses."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
)


def _nonfinite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinity (in lists and dicts too)."""
    items: Iterable[Any]
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return isinstance(value, float) and value - value != 0.0
    for v in items:
        t = type(v)
        if t is float:
            if v - v != 0.0:  # NaN - NaN and inf - inf are NaN
                return True
        elif (t is list or t is dict or t is tuple) and _nonfinite(v):
            return True
    return False


try:  # optional: a C encoder ten times faster than the standard library's
    _orjson: Any = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


RENDERING = "1 " + (f"orjson {_orjson.__version__}" if _orjson is not None else "json")
"""What produced a rendering: this module's revision (raised when its output
changes) and the encoder. Stored JSON (the mirror's JSON view) made by
another is rendered again: the same values, maybe other bytes."""


def to_json(value: Any) -> bytes:
    """Strict JSON (UTF-8) of a record or field value: bytes as
    ``{"base64": ...}``, NaN and infinities as strings. Uses orjson when it
    is installed (the same JSON values, the same key order; numbers may be
    spelled differently, e.g. ``0.00001`` for ``1e-05``)."""
    if _orjson is not None:
        try:
            out: bytes = _orjson.dumps(value, default=_json_default)
        except TypeError:  # e.g. an int beyond 64 bits
            pass
        else:
            # orjson writes NaN and infinities as null
            if b"null" not in out or not _nonfinite(value):
                return out
    try:
        return _ENCODER.encode(value).encode()
    except ValueError:  # a non-finite float
        return _ENCODER.encode(_finite(value)).encode()


_FLOAT_TYPES = (FieldType.FLOAT, FieldType.FLOAT32)


class JsonRenderer:
    """A typed record's JSON, as :func:`to_json` of its decoded dict gives it,
    by the fastest way that gives the same: orjson on the decoded dict, whose
    bytes are to_json's unless a float is NaN or infinite (orjson writes
    those as null). A record whose float fields sum to a finite number has
    none (one C-level sum; an overflowing sum only sends the record down the
    slower check). Otherwise, or when float lists exist: one check that every
    ``null`` orjson wrote is a field that is None (a string holding "null"
    also sends the record to :func:`to_json`, which is merely slower)."""

    __slots__ = ("decode", "floats", "key_nulls")

    def __init__(self, codec: DatasetCodec) -> None:
        self.decode = codec.decode
        # "null" inside field names, which every rendering holds
        self.key_nulls = sum(name.count("null") for name in codec.field_names)
        # the float fields' values (None: float lists exist, the null check
        # decides); itemgetter of one name gives the value, not a tuple
        floats = [f for f in codec.schema.fields if f.type in _FLOAT_TYPES] if codec.schema else []
        names = [f.name for f in floats]
        self.floats: Callable[[Any], Any] | None = None
        if not any(f.is_list for f in floats):
            self.floats = operator.itemgetter(*names, *names[:1]) if names else _no_floats

    def __call__(self, raw: bytes | memoryview) -> bytes:
        value = self.decode(raw)
        if _orjson is not None:
            try:
                out: bytes = _orjson.dumps(value, default=_json_default)
            except TypeError:  # e.g. an int beyond 64 bits
                return to_json(value)
            floats = self.floats
            if floats is not None:
                total = sum(filter(None, floats(value)))  # None (and 0.0) left out
                if total - total == 0.0:  # NaN or an infinity makes it NaN
                    return out
            if b"null" not in out:
                return out
            if out.count(b"null") == self.key_nulls + list(value.values()).count(None):
                return out
        return to_json(value)


def _no_floats(value: Any) -> tuple[()]:
    return ()


def bulk(text: bytes) -> bytes:
    """``text`` as a RESP bulk string: ``$<length>`` CR LF, the bytes, CR LF."""
    return b"$%d\r\n%b\r\n" % (len(text), text)


def renders_alike(
    old: bytes | None, old_epoch: bytes | None, new: bytes | None, new_epoch: bytes | None
) -> bool:
    """Whether every record renders the same JSON under dataset definition
    ``new`` (at origin epoch ``new_epoch``) as under ``old``: the same epoch
    and schemas, and each dictionary field's strings only appended to (a
    record's codes keep their strings). A definition change within one epoch
    usually only grows the dictionary; a new epoch may bring anything."""
    if old is None or new is None or old_epoch is None or old_epoch != new_epoch:
        return old == new and old_epoch == new_epoch
    if old == new:
        return True
    a, b = msgpack.unpackb(old, raw=False), msgpack.unpackb(new, raw=False)
    if a.get("schemas") != b.get("schemas"):
        return False
    old_fields = (a.get("dictionary") or {}).get("fields") or {}
    new_fields = (b.get("dictionary") or {}).get("fields") or {}
    return all(
        new_fields.get(name, [])[: len(strings)] == strings for name, strings in old_fields.items()
    )
