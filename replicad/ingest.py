"""Write bodies decoded and encoded outside the committer.

A large ``POST .../batch`` or ``.../replace`` body spends most of its CPU time
before the commit: msgpack or JSON decoding (about 4 us for a 27-field
record), the shape checks, and the record codec (about 2.5 us). In one
process those share the GIL with the committer, so the origin ingested about
half of what its store can commit. :func:`prepare_write` does that work in an
ingest worker process (:mod:`replicad.ingest_pool` runs it) and hands the
committer canonical bytes: what is left in the origin process is the
LMDB writes, the Merkle leaves and the version queue.

The result is the same as encoding in the committer, byte for byte:

* the worker encodes with the dataset's *committed* definition
  (:class:`~replicad.origin_types.EncodingBasis`), so every dictionary code it
  uses is one the origin has made durable and never takes back;
* a record that needs a string new to the dictionary (the worker may not
  hand out codes) or fails to encode is left for the committer, which adds
  the string or raises the record's error exactly as without a worker;
* the store refuses the pre-encoding if the schema evolved in the meantime
  (:class:`~replicad.errors.StaleEncodingError`), and the caller encodes
  the body again in process.

No I/O and no clock: a pure function of its arguments, plus a per-process
cache of codecs so that a worker builds a dataset's codec once per
definition revision.
"""

from __future__ import annotations

import gc
from typing import Any

import msgpack

from replicad.codec import DatasetCodec, Dictionary, check_key
from replicad.errors import ReplicadError
from replicad.http_body import decode_document, parse_batch, parse_replace
from replicad.origin_types import EncodingBasis, PreEncoded, WriteBatch
from replicad.schema import Schema

__all__ = ["codec_for", "pre_encode", "prepare_write"]

_CODECS: dict[str, tuple[int, bool, DatasetCodec]] = {}
"""Per dataset: (definition revision, compress, codec) of this process."""


def codec_for(basis: EncodingBasis) -> DatasetCodec:
    """The codec described by ``basis``, cached per dataset and revision."""
    cached = _CODECS.get(basis.dataset)
    if cached is not None and cached[0] == basis.meta_revision and cached[1] == basis.compress:
        return cached[2]
    doc = msgpack.unpackb(basis.definition, raw=False)
    schemas = [Schema.from_json(s) for s in doc.get("schemas", [])]
    codec = DatasetCodec(
        schemas or None,
        dictionary=Dictionary.from_json(doc["dictionary"]),
        max_value_bytes=int(doc["max_value_bytes"]),
        compress=basis.compress,
    )
    _CODECS[basis.dataset] = (basis.meta_revision, basis.compress, codec)
    return codec


def pre_encode(
    codec: DatasetCodec, upserts: dict[bytes, Any]
) -> tuple[dict[bytes, bytes | None], dict[bytes, Any]]:
    """``(records, left)``: every key of ``upserts`` in order, mapped to its
    canonical bytes or to None, and the records mapped to None (left to the
    committer: a new dictionary string, or an error to raise there).

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
            value = encode(record) if typed else encode_opaque(record)
        except ReplicadError:
            value = None
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
    typed = codec.schema is not None
    doc = decode_document(body, is_json)
    deletes: list[bytes] = []
    if replace:
        upserts = parse_replace(doc, typed, is_json)
    else:
        upserts, deletes = parse_batch(doc, typed, is_json)
    records, left = pre_encode(codec, upserts)
    return WriteBatch(
        basis.dataset,
        left,
        deletes,
        replace=replace,
        pre_encoded=PreEncoded(basis.meta_revision, len(codec.schemas), records),
    )
