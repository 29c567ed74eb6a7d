"""Write bodies decoded and encoded outside the committer.

A large ``POST .../batch`` or ``.../replace`` body spends most of its CPU time
before the commit: decoding (msgpack-python took 2.9 us for a 27-field
record, msgspec 1.6), the shape checks, and the record codec (about 2.8 us).
In one process those share the GIL with the committer, so the origin
ingested about half of what its store can commit. :func:`prepare_write`
does that work in an ingest worker process (:mod:`replicad.ingest_pool` runs
it) and hands the committer canonical bytes: what is left in the origin
process is the LMDB writes, the Merkle leaves and the version queue.

The result is the same as encoding in the committer, byte for byte:

* the worker encodes with the dataset's *committed* definition
  (:class:`~replicad.origin_types.EncodingBasis`), so every dictionary code it
  uses is one the origin has made durable and never takes back;
* a record that needs a string new to the dictionary (the worker may not
  hand out codes) is left for the committer, which adds the string; one
  that fails to encode travels back as its error
  (:class:`~replicad.origin_types.EncodeFailure`), which the committer
  raises when it reaches it, so the first failing record in body order
  fails the batch, as without a worker;
* the store refuses the pre-encoding if the schema evolved in the meantime
  (:class:`~replicad.errors.StaleEncodingError`), and the caller encodes
  the body again in process (so does a worker running other code than the
  origin: :mod:`replicad.ingest_pool` checks that).

Deeply nested bodies (hundreds of levels) are refused with 400 on both
paths, but where the recursion limit strikes depends on the stack depth of
the process, so the message may differ.

No I/O, no clock; a per-process cache of codecs (:func:`codec_for`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import msgpack

from replicad.codec import DatasetCodec, Dictionary, check_key
from replicad.errors import CorruptRecordError, ReplicadError
from replicad.http_body import parse_write
from replicad.origin_types import EncodeFailure, EncodingBasis, PreEncoded, WriteBatch
from replicad.schema import Schema

__all__ = ["codec_for", "pre_encode", "prepare_write"]


@dataclass
class _Cached:
    revision: int
    definition: bytes
    compress: bool
    schemas: list[Any]
    max_value_bytes: int
    codec: DatasetCodec


_CODECS: dict[tuple[str, str], _Cached] = {}
"""Per (store, dataset): the codec this process built, and what from."""


def codec_for(basis: EncodingBasis) -> DatasetCodec:
    """The codec described by ``basis``, cached per store and dataset.

    A newer revision that only added dictionary strings (every commit that
    brings new strings makes one) extends the cached codec in place instead
    of building another: building takes 0.4 s with three full dictionaries,
    adding a batch's new strings a few milliseconds. An older revision of
    the same store reuses the newer codec: the codes it has beyond the older
    definition are committed ones, which the committer would use too (and a
    schema evolved since makes the store refuse the bytes).
    """
    key = (basis.store, basis.dataset)
    cached = _CODECS.get(key)
    if (
        cached is not None
        and cached.compress == basis.compress
        and (cached.definition == basis.definition or cached.revision > basis.meta_revision)
    ):
        return cached.codec
    doc = msgpack.unpackb(basis.definition, raw=False)
    if cached is not None and _extend(cached, doc, basis.compress):
        cached.revision = basis.meta_revision
        cached.definition = basis.definition
        return cached.codec
    schemas = [Schema.from_json(s) for s in doc.get("schemas", [])]
    codec = DatasetCodec(
        schemas or None,
        dictionary=Dictionary.from_json(doc["dictionary"]),
        max_value_bytes=int(doc["max_value_bytes"]),
        compress=basis.compress,
    )
    _CODECS[key] = _Cached(
        basis.meta_revision,
        basis.definition,
        basis.compress,
        doc.get("schemas", []),
        int(doc["max_value_bytes"]),
        codec,
    )
    return codec


def _extend(cached: _Cached, doc: dict[str, Any], compress: bool) -> bool:
    """Add to ``cached``'s dictionary the strings ``doc`` has beyond it;
    False (nothing changed) unless everything else is the same, every
    string the cache holds is at the same code in ``doc``, and the result
    holds exactly ``doc``'s dictionary."""
    dictionary = cached.codec.dictionary
    shipped = doc["dictionary"]
    if (
        cached.compress != compress
        or cached.schemas != doc.get("schemas", [])
        or cached.max_value_bytes != int(doc["max_value_bytes"])
        or dictionary.max_entries_per_field != shipped["max_entries_per_field"]
    ):
        return False
    fields: dict[str, list[str]] = shipped["fields"]
    if dictionary.size > sum(map(len, fields.values())):
        return False
    new: list[tuple[str, int, str]] = []
    for name, strings in fields.items():
        have = dictionary.strings(name)
        if len(have) > len(strings) or list(have) != strings[: len(have)]:
            return False
        new.extend((name, code, strings[code]) for code in range(len(have), len(strings)))
    mark = dictionary.size
    try:
        dictionary.apply(new)
    except CorruptRecordError:  # pragma: no cover - the checks above rule it out
        return False
    if dictionary.size != sum(map(len, fields.values())):  # a field only the cache has
        dictionary.truncate(mark)
        return False
    return True


def pre_encode(
    codec: DatasetCodec, upserts: dict[bytes, Any]
) -> tuple[dict[bytes, bytes | None], dict[bytes, Any]]:
    """``(records, left)``: every key of ``upserts`` in order, mapped to its
    canonical bytes or to None, and what the None keys stand for, left to
    the committer: the record itself when it needs a string new to the
    dictionary, an :class:`~replicad.origin_types.EncodeFailure` when it
    failed to encode (the committer raises that error in its turn).

    ``codec``'s dictionary is left as it was.
    """
    dictionary = codec.dictionary
    mark = dictionary.size
    typed = codec.schema is not None
    encode = codec.encode
    encode_opaque = codec.encode_opaque
    records: dict[bytes, bytes | None] = {}
    left: dict[bytes, Any] = {}
    for key, record in upserts.items():
        try:
            check_key(key)
            value: bytes | None = encode(record) if typed else encode_opaque(record)
        except ReplicadError as exc:
            value = None
            record = EncodeFailure(exc)  # noqa: PLW2901 - what travels back instead
        if dictionary.size != mark:
            dictionary.truncate(mark)
            value = None
        records[key] = value
        if value is None:
            left[key] = record
    return records, left


def prepare_write(basis: EncodingBasis, body: bytes, is_json: bool, replace: bool) -> WriteBatch:
    """The write batch of a ``batch`` (or, with ``replace``, ``replace``)
    body, its records pre-encoded with ``basis``.

    Raises :class:`~replicad.http_body.HttpError` (400) for a malformed body
    or a wrong shape, with the message the in-process path gives.

    Cyclic garbage collection is off meanwhile: the decoded document is
    hundreds of thousands of containers, none in a cycle, and freed by
    reference counting before collection is back on, so the collections it
    would have triggered (full ones among them) are never needed.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        return _prepare_write(basis, body, is_json, replace)
    finally:
        if was:
            gc.enable()


def _prepare_write(basis: EncodingBasis, body: bytes, is_json: bool, replace: bool) -> WriteBatch:
    codec = codec_for(basis)
    upserts, deletes = parse_write(body, is_json, codec.schema is not None, replace)
    records, left = pre_encode(codec, upserts)
    return WriteBatch(
        basis.dataset,
        left,
        deletes,
        replace=replace,
        pre_encoded=PreEncoded(basis.meta_revision, len(codec.schemas), records),
    )
