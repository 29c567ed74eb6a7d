"""Benchmarks of the record codec on seed-like user profiles.

Figures, over a batch of distinct seed-like records (``replicad.sample``; 27
features: ints, floats, float32s, short strings, three dictionary-encoded
strings, bools, a small int list; about 400 characters of compact JSON):

* encoded size per record against ``json.dumps(record, separators=(",", ":"))``;
* ``encode``, ``decode`` (to a dict), ``decode_values`` (the reader's list) and
  ``encode`` + ``decode`` per record, in microseconds, with ``json.dumps`` /
  ``json.loads`` of the same records as anchors;
* building a codec for a definition whose dictionary grew (every reader,
  socket worker and the mirror's JSON view build one per definition; the
  generated code is compiled once per schema list), against building it with
  the compiled code forgotten first (a schema list never seen);
* reading an opaque value that holds a record's JSON (about 500 bytes, what
  ``HGET profile_json`` serves in ``bench_reads``) stored as is, against the
  same value stored Snappy-compressed (Snappy saves about a tenth of such
  values, less than the eighth the encoder asks for since session 12, so
  it stores most of them as is: ``replicad.layout.compression_pays``).

Times are per record over a loop through the batch (the loop's own overhead,
a few tens of nanoseconds, is included), median of several runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import cramjam

from benchmarks.common import Row, median_time
from replicad import codec as codec_module
from replicad.codec import HEADER_OPAQUE, HEADER_OPAQUE_SNAPPY, DatasetCodec, Dictionary
from replicad.sample import seed_like_record, seed_like_schema
from sidecar.json_render import to_json

_US = 1e6


def _per_record(
    fn: Callable[[Any], object], items: list[Any], *, number: int, repeat: int
) -> float:
    """Median microseconds per call of ``fn`` over ``items``."""

    def batch() -> None:
        for item in items:
            fn(item)

    return median_time(batch, number=number, repeat=repeat) / len(items) * _US


def rows(quick: bool) -> list[Row]:
    """The codec's figures; ``quick`` uses fewer records and runs."""
    count, number, repeat = (100, 20, 3) if quick else (1_000, 100, 7)
    codec = DatasetCodec([seed_like_schema()])
    records = [seed_like_record(i) for i in range(count)]
    encoded = [codec.encode(r) for r in records]
    texts = [json.dumps(r, separators=(",", ":")) for r in records]

    ours = sum(map(len, encoded)) / count
    theirs = sum(len(t.encode()) for t in texts) / count
    compact = json.JSONEncoder(separators=(",", ":")).encode
    loads = json.loads
    encode = codec.encode
    decode = codec.decode
    decode_values = codec.decode_values

    def round_trip(record: dict[str, Any]) -> None:
        decode(encode(record))

    def lazy_round_trip(record: dict[str, Any]) -> None:
        decode_values(encode(record))

    def json_round_trip(record: dict[str, Any]) -> None:
        loads(compact(record))

    schemas = [seed_like_schema()]
    opaque = DatasetCodec(None, compress=False)
    jsons = [to_json(decode(e)) for e in encoded]
    stored_raw = [opaque.encode_opaque(j) for j in jsons]
    stored_snappy = [
        bytes([HEADER_OPAQUE_SNAPPY]) + bytes(cramjam.snappy.compress_raw(j)) for j in jsons
    ]
    # the two sets differ in nothing but the compression
    assert all(v[0] == HEADER_OPAQUE for v in stored_raw)
    assert [opaque.decode_opaque(v) for v in stored_snappy] == jsons
    saved = 1 - sum(map(len, stored_snappy)) / sum(map(len, stored_raw))

    def build() -> None:
        DatasetCodec(schemas, Dictionary())

    def build_compiling() -> None:
        codec_module._compiled.cache_clear()
        DatasetCodec(schemas, Dictionary())

    t = {
        "build": median_time(build, number=number // 10 or 1, repeat=repeat) * _US,
        "build_compiling": median_time(build_compiling, number=number // 10 or 1, repeat=repeat)
        * _US,
        "encode": _per_record(encode, records, number=number, repeat=repeat),
        "dumps": _per_record(compact, records, number=number, repeat=repeat),
        "decode": _per_record(decode, encoded, number=number, repeat=repeat),
        "decode_values": _per_record(decode_values, encoded, number=number, repeat=repeat),
        "loads": _per_record(loads, texts, number=number, repeat=repeat),
        "field": _per_record(codec.field_getter("ctr_7d"), encoded, number=number, repeat=repeat),
        "dict_field": _per_record(
            codec.field_getter("city"), encoded, number=number, repeat=repeat
        ),
        "both": _per_record(round_trip, records, number=number, repeat=repeat),
        "lazy_both": _per_record(lazy_round_trip, records, number=number, repeat=repeat),
        "json_both": _per_record(json_round_trip, records, number=number, repeat=repeat),
        "opaque_raw": _per_record(opaque.decode_opaque, stored_raw, number=number, repeat=repeat),
        "opaque_snappy": _per_record(
            opaque.decode_opaque, stored_snappy, number=number, repeat=repeat
        ),
    }
    return [
        Row(
            "codec: encoded bytes per seed-like record",
            ours,
            "bytes",
            anchor=theirs,
            anchor_name="compact JSON",
            target="ratio <= 0.4",
            met=ours / theirs <= 0.4,
        ),
        Row("codec: encode", t["encode"], "us", t["dumps"], "json.dumps"),
        Row("codec: decode (to dict)", t["decode"], "us", t["loads"], "json.loads"),
        Row(
            "codec: decode_values (list)",
            t["decode_values"],
            "us",
            t["loads"],
            "json.loads",
            target="<= 1.5 us",
            met=t["decode_values"] <= 1.5,
        ),
        Row(
            "codec: one float32 field (field_getters, no decode)",
            t["field"],
            "us",
            t["decode_values"],
            "decode_values",
        ),
        Row(
            "codec: one dictionary field (field_getters)",
            t["dict_field"],
            "us",
            t["decode_values"],
            "decode_values",
        ),
        Row(
            "codec: encode + decode",
            t["both"],
            "us",
            t["json_both"],
            "json dumps + loads",
            target="<= 5 us",
            met=t["both"] <= 5.0,
        ),
        Row(
            "codec: encode + decode_values (the readers' lazy path)",
            t["lazy_both"],
            "us",
            t["json_both"],
            "json dumps + loads",
            target="<= 5 us",
            met=t["lazy_both"] <= 5.0,
        ),
        Row(
            "codec: a new codec, same schemas (a definition whose dictionary grew)",
            t["build"],
            "us",
            t["build_compiling"],
            "the same with its generated code compiled",
        ),
        Row(
            f"codec: read an opaque value of {sum(map(len, stored_raw)) / count:.0f} bytes"
            " (a record's JSON) stored as is (decode_opaque)",
            t["opaque_raw"],
            "us",
            t["opaque_snappy"],
            f"the same stored Snappy-compressed ({saved:.0%} smaller)",
        ),
    ]


if __name__ == "__main__":
    import sys

    for row in rows("--quick" in sys.argv):
        ratio = f"  ratio {row.ratio:.3f}" if row.ratio is not None else ""
        print(
            f"{row.figure:44} {row.value:9.3f} {row.unit:5}"
            f"  {row.anchor_name} {row.anchor or 0:.3f}{ratio}  {row.target} "
            f"{'' if row.met is None else ('met' if row.met else 'NOT MET')}"
        )
