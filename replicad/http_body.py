"""Request bodies of the origin's HTTP API: decoding and shape checks.

Pure functions over bytes and decoded documents, shared by the HTTP app
(:mod:`replicad.http_app`) and the ingest workers (:mod:`replicad.ingest`),
which run them in other processes. Every rejection is an :class:`HttpError`
whose message says what is wrong; nothing here touches the store.

Shapes (``docs/api.md``): keys are strings (their UTF-8 bytes) or, in
msgpack, bin; typed records are objects of field -> value; opaque values are
strings or, in JSON, ``{"base64": ...}`` and, in msgpack, bin.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

import msgpack
import msgspec

__all__ = [
    "HttpError",
    "check_object",
    "decode_document",
    "decode_write_document",
    "key_text",
    "parse_batch",
    "parse_replace",
    "parse_write",
    "unwrap_json",
]


class HttpError(Exception):
    """An HTTP error answer decided by the app itself (400, 415, 413, ...).

    Local to the HTTP adapter: the service's errors are :mod:`replicad.errors`
    types, mapped by :func:`replicad.http_app.error_response`.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable, so that an ingest worker can raise it across processes
        return (HttpError, (self.status, self.code, self.message, self.headers))


_MSGPACK = msgspec.msgpack.Decoder()
"""Write bodies in msgpack: msgspec decodes a seed-like record in 1.6 us
against msgpack-python's 2.9 (it reuses the strings of repeated field names
instead of allocating them per record), to the same values; ext types
become ``msgspec.msgpack.Ext`` (or ``datetime``), which no field accepts."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, "bad_request", f"malformed JSON: {exc}") from None


def decode_document(body: bytes, is_json: bool) -> Any:
    """The JSON or msgpack document in ``body``; 400 if it is malformed."""
    if is_json:
        return _json(body)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise HttpError(400, "bad_request", f"malformed msgpack: {exc}") from None


def decode_write_document(body: bytes, is_json: bool) -> Any:
    """A write batch or bulk replace body (:func:`decode_document`, faster
    for msgpack); 400 if it is malformed."""
    if is_json:
        return _json(body)
    try:
        return _MSGPACK.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise HttpError(400, "bad_request", f"malformed msgpack: {exc}") from None


def key_text(key: bytes) -> Any:
    """A key as an answer or message shows it: its text, or base64 if it
    is not UTF-8."""
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(key).decode("ascii")}


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, "bad_request", f"{what}: base64 must be a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "bad_request", f"{what}: invalid base64") from None


def _is_b64_wrapper(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "base64" in value


def unwrap_json(value: Any, what: str) -> Any:
    """JSON field values: ``{"base64": s}`` -> bytes, in lists too."""
    if _is_b64_wrapper(value):
        return _b64(value["base64"], what)
    if isinstance(value, list):
        return [unwrap_json(v, what) for v in value]
    return value


def utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; 400 naming ``what`` if it has lone surrogates."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(400, "bad_request", f"{what} is not valid Unicode") from None


def check_object(value: Any, what: str, allowed: Iterable[str] | None = None) -> dict[Any, Any]:
    """``value`` if it is an object with no key outside ``allowed``; else 400."""
    if not isinstance(value, dict):
        raise HttpError(400, "bad_request", f"{what} must be an object")
    if allowed is not None:
        unknown = sorted(str(k) for k in value if k not in set(allowed))
        if unknown:
            raise HttpError(400, "bad_request", f"{what}: unknown keys {unknown}")
    return value


def body_key(raw: Any, is_json: bool) -> bytes:
    """A key from a body: a string (its UTF-8 bytes) or, in msgpack, bin."""
    if isinstance(raw, str):
        return utf8(raw, "a key")
    if not is_json and isinstance(raw, bytes):
        return raw
    kind = "strings" if is_json else "strings or bin"
    raise HttpError(400, "bad_request", f"keys must be {kind}, got {type(raw).__name__}")


def parse_records(raw: Any, typed: bool, is_json: bool, what: str) -> dict[bytes, Any]:
    """``{key: record}`` with keys as bytes and records ready for the service:
    typed records as dicts (JSON ``{"base64": ...}`` unwrapped to bytes),
    opaque values as bytes."""
    if not isinstance(raw, dict):
        raise HttpError(400, "bad_request", f"{what} must be an object of key -> record")
    out: dict[bytes, Any] = {}
    for raw_key, value in raw.items():
        key = raw_key if type(raw_key) is bytes and not is_json else body_key(raw_key, is_json)
        if key in out:
            raise HttpError(400, "bad_request", f"{what}: key {key_text(key)!r} appears twice")
        if typed:
            if type(value) is dict:
                if is_json:
                    label = f"key {key_text(key)!r}"
                    try:
                        out[key] = {
                            f: unwrap_json(v, f"{label} field {f!r}") for f, v in value.items()
                        }
                    except RecursionError:
                        raise HttpError(400, "bad_request", f"{label}: nested too deeply") from None
                else:
                    out[key] = value
            else:
                raise HttpError(
                    400, "bad_request", f"key {key_text(key)!r}: a record must be an object"
                )
        elif isinstance(value, str):
            out[key] = utf8(value, f"key {key_text(key)!r}: the value")
        elif is_json and _is_b64_wrapper(value):
            out[key] = _b64(value["base64"], f"key {key_text(key)!r}")
        elif not is_json and isinstance(value, bytes):
            out[key] = value
        else:
            shape = 'a string or {"base64": ...}' if is_json else "bin or a string"
            raise HttpError(
                400, "bad_request", f"key {key_text(key)!r}: an opaque value must be {shape}"
            )
    return out


def parse_batch(doc: Any, typed: bool, is_json: bool) -> tuple[dict[bytes, Any], list[bytes]]:
    """The upserts and deletes of a ``POST .../batch`` document."""
    doc = check_object(doc, "batch", ("upserts", "deletes"))
    upserts = parse_records(doc.get("upserts", {}), typed, is_json, "upserts")
    deletes_raw = doc.get("deletes", [])
    if not isinstance(deletes_raw, list):
        raise HttpError(400, "bad_request", "deletes must be an array of keys")
    deletes = [body_key(k, is_json) for k in deletes_raw]
    both = set(deletes).intersection(upserts)
    if both:
        sample = key_text(min(both))
        raise HttpError(
            400, "bad_request", f"{len(both)} key(s) both upserted and deleted, e.g. {sample!r}"
        )
    return upserts, deletes


def parse_replace(doc: Any, typed: bool, is_json: bool) -> dict[bytes, Any]:
    """The records of a ``POST .../replace`` document (the whole dataset)."""
    doc = check_object(doc, "replace", ("records",))
    if "records" not in doc:
        raise HttpError(400, "bad_request", "replace needs 'records'")
    return parse_records(doc["records"], typed, is_json, "records")


def parse_write(
    body: bytes, is_json: bool, typed: bool, replace: bool
) -> tuple[dict[bytes, Any], list[bytes]]:
    """The upserts and deletes of a ``batch`` body (with ``replace``: the
    records of a ``replace`` body, and no deletes), decoded
    (:func:`decode_write_document`) and checked; 400 for anything wrong."""
    doc = decode_write_document(body, is_json)
    if replace:
        return parse_replace(doc, typed, is_json), []
    return parse_batch(doc, typed, is_json)
