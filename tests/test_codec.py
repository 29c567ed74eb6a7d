"""The record codec and schemas: round trips, canonical bytes, evolution, and
every error path (bad bytes are CorruptRecordError, never another exception)."""

from __future__ import annotations

import contextlib
import fractions
import functools
import json
import math
import random
import struct
import types
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import cramjam
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from replicad.codec import (
    COMPRESS_MIN_BYTES,
    HEADER_OPAQUE,
    HEADER_OPAQUE_SNAPPY,
    HEADER_TYPED,
    HEADER_TYPED_SNAPPY,
    MAX_KEY_BYTES,
    DatasetCodec,
    Dictionary,
    DictionaryEntry,
    _snappy_length,
    check_key,
)
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
    FIXED_COMPRESS_MIN_BYTES,
    HEADER_FIXED,
    HEADER_FIXED_SNAPPY,
    compression_pays,
)
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import FLOAT32_MAX, INT64_MAX, INT64_MIN, Field, FieldType, Schema

INT, F, F32, B, S, Y = (
    FieldType.INT,
    FieldType.FLOAT,
    FieldType.FLOAT32,
    FieldType.BOOL,
    FieldType.STR,
    FieldType.BYTES,
)


def untyped(x: object) -> Any:
    """Pass a deliberately ill-typed argument past mypy."""
    return x


# --- strategies --------------------------------------------------------------

names_st = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,12}\Z")


def scalar_st(ftype: FieldType) -> st.SearchStrategy[Any]:
    if ftype is INT:
        return st.integers(INT64_MIN, INT64_MAX)
    if ftype is F:
        return st.floats(allow_nan=False) | st.integers(-(2**60), 2**60)
    if ftype is F32:
        return (
            st.floats(-FLOAT32_MAX, FLOAT32_MAX)
            | st.floats(width=32, allow_nan=False)
            | st.integers(-(2**30), 2**30)
        )
    if ftype is B:
        return st.booleans()
    if ftype is S:
        return st.text(max_size=12) | st.sampled_from(["beijing", "shanghai", "x" * 150])
    return st.binary(max_size=12) | st.just(b"\x00" * 200)


def value_st(field: Field) -> st.SearchStrategy[Any]:
    inner = scalar_st(field.type)
    return st.lists(inner, max_size=4) if field.is_list else inner


@st.composite
def field_st(draw: st.DrawFn, name: str, optional: bool = False) -> Field:
    ftype = draw(st.sampled_from(list(FieldType)))
    is_list = draw(st.booleans())
    dictionary = ftype is S and not is_list and draw(st.booleans())
    nullable = draw(st.booleans())
    probe = Field(name, ftype, is_list=is_list)
    default = draw(st.none() | value_st(probe))
    if optional and not nullable and default is None:
        nullable = True
    return Field(
        name, ftype, is_list=is_list, nullable=nullable, default=default, dictionary=dictionary
    )


@st.composite
def schema_st(draw: st.DrawFn, max_fields: int = 20) -> Schema:
    names = draw(st.lists(names_st, min_size=1, max_size=max_fields, unique=True))
    return Schema(1, tuple(draw(field_st(n)) for n in names))


@st.composite
def record_st(draw: st.DrawFn, schema: Schema) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for field in schema.fields:
        if not field.required and draw(st.integers(0, 3)) == 0:
            continue
        if field.nullable and draw(st.integers(0, 3)) == 0:
            record[field.name] = None
        else:
            record[field.name] = draw(value_st(field))
    return record


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", float(x)))[0])


def expected_scalar(ftype: FieldType, x: Any) -> Any:
    if ftype is F:
        return float(x)
    if ftype is F32:
        return f32(x)
    return x


def expected(schema: Schema, record: dict[str, Any]) -> dict[str, Any]:
    """What decode must return: values normalized, absent fields defaulted."""
    out: dict[str, Any] = {}
    for field in schema.fields:
        if field.name in record:
            value = record[field.name]
            if value is not None and field.is_list:
                value = [expected_scalar(field.type, x) for x in value]
            elif value is not None:
                value = expected_scalar(field.type, value)
        else:
            value = field.default
            if isinstance(value, tuple):
                value = list(value)
        out[field.name] = value
    return out


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- round trips and canonical bytes -----------------------------------------


@SETTINGS
@given(data=st.data(), schema=schema_st(), compress=st.booleans())
def test_typed_round_trip_and_canonical(
    data: st.DataObject, schema: Schema, compress: bool
) -> None:
    codec = DatasetCodec([schema], compress=compress)
    record = data.draw(record_st(schema))
    encoded = codec.encode(record)
    want = expected(schema, record)
    assert codec.decode(encoded) == want
    assert codec.decode_values(encoded) == [want[n] for n in schema.names]
    for name in schema.names:
        assert codec.decode_values(encoded)[codec.field_index(name)] == want[name]
    assert codec.encode(record) == encoded
    assert codec.encode(codec.decode(encoded)) == encoded
    # Same dictionary state (a fresh one, same additions) -> same bytes.
    assert DatasetCodec([schema], compress=compress).encode(record) == encoded
    assert encoded[0] in (HEADER_FIXED, HEADER_FIXED_SNAPPY)
    if not compress:
        assert encoded[0] == HEADER_FIXED
    # Bytes-like input decodes the same.
    assert codec.decode(memoryview(encoded)) == want
    assert codec.decode(bytearray(encoded)) == want
    # One-field reads agree with decoding, from bytes and from a zero-copy view.
    for name in schema.names:
        get = codec.field_getter(name)
        assert get(encoded) == want[name]
        assert get(memoryview(encoded)) == want[name]


@SETTINGS
@given(
    data=st.data(),
    schema=schema_st(max_fields=8),
    extra=st.lists(names_st, min_size=1, max_size=4, unique=True),
)
def test_old_versions_decode_with_defaults(
    data: st.DataObject, schema: Schema, extra: list[str]
) -> None:
    assume(not set(extra) & set(schema.names))
    new_fields = [data.draw(field_st(n, optional=True)) for n in extra]
    v2 = schema.evolve(new_fields)
    assert v2.version == 2
    old = DatasetCodec([schema])
    new = old.with_schema(v2)
    assert new.dictionary is old.dictionary
    record = data.draw(record_st(schema))
    encoded_v1 = old.encode(record)
    want = expected(v2, record)
    assert new.decode(encoded_v1) == want
    assert new.decode_values(encoded_v1) == [want[n] for n in v2.names]
    # A v2 record with the new fields present decodes too, and is canonical.
    record2 = data.draw(record_st(v2))
    encoded_v2 = new.encode(record2)
    assert new.decode(encoded_v2) == expected(v2, record2)
    assert new.encode(new.decode(encoded_v2)) == encoded_v2
    # The old codec does not know version 2.
    with pytest.raises(CorruptRecordError, match="unknown schema version"):
        old.decode(encoded_v2)


@SETTINGS
@given(
    value=st.binary(max_size=600) | st.builds(lambda n: b"ab" * n, st.integers(0, 400)),
    compress=st.booleans(),
)
def test_opaque_round_trip(value: bytes, compress: bool) -> None:
    codec = DatasetCodec(None, compress=compress)
    encoded = codec.encode_opaque(value)
    assert codec.decode_opaque(encoded) == value
    assert codec.encode_opaque(bytearray(value)) == encoded
    assert codec.encode_opaque(memoryview(value)) == encoded
    compressible = len(cramjam.snappy.compress_raw(value)) * 8 <= len(value) * 7
    if compress and len(value) >= COMPRESS_MIN_BYTES and compressible:
        assert encoded[0] == HEADER_OPAQUE_SNAPPY
        assert len(encoded) < len(value)
    else:
        assert encoded == bytes([HEADER_OPAQUE]) + value


def test_compressed_payload_is_standard_raw_snappy() -> None:
    schema = Schema(1, (Field("text", S),))
    codec = DatasetCodec([schema])
    encoded = codec.encode({"text": "feature " * 40})
    assert encoded[0] == HEADER_FIXED_SNAPPY
    payload = bytes(cramjam.snappy.decompress_raw(encoded[1:]))
    # version 1, int width code 2, the str's end offset, the var area
    assert payload == struct.pack("<HBI", 1, 2, 320) + b"feature " * 40


def test_short_payloads_are_never_compressed() -> None:
    schema = Schema(1, (Field("text", S),))
    codec = DatasetCodec([schema])
    short = FIXED_COMPRESS_MIN_BYTES - 8  # payload: 7 bytes of prefix and slot + text
    assert codec.encode({"text": "a" * short})[0] == HEADER_FIXED
    assert codec.encode({"text": "a" * (short + 1)})[0] == HEADER_FIXED_SNAPPY


def _savings_sweep() -> Iterator[bytes]:
    """Values of 380-420 bytes whose Snappy block saves from nothing to about
    a third: random bytes, then a growing run of zeros (Snappy's output
    grows in steps, so the lengths vary too, to land in every narrow band)."""
    rng = random.Random(7)
    for zeros in range(160):
        for size in range(380, 421, 5):
            yield rng.randbytes(size - zeros) + bytes(zeros)


def test_compression_is_kept_only_when_it_saves_an_eighth() -> None:
    schema = Schema(1, (Field("blob", Y),))
    typed, raw_typed = DatasetCodec([schema]), DatasetCodec([schema], compress=False)
    opaque = DatasetCodec(None)
    between = {HEADER_FIXED_SNAPPY: 0, HEADER_OPAQUE_SNAPPY: 0}  # saved 10-12.5 %: raw now
    for value in _savings_sweep():
        for encoded, payload, header in (
            (
                typed.encode({"blob": value}),
                raw_typed.encode({"blob": value})[1:],
                HEADER_FIXED_SNAPPY,
            ),
            (opaque.encode_opaque(value), value, HEADER_OPAQUE_SNAPPY),
        ):
            z = len(cramjam.snappy.compress_raw(payload))
            pays = z * 8 <= len(payload) * 7
            assert compression_pays(z, len(payload)) == pays
            if pays:
                assert encoded[0] == header and len(encoded) == 1 + z
            else:
                assert encoded[0] == header - 1 and encoded[1:] == payload
                between[header] += z * 10 <= len(payload) * 9
    # the sweep reaches the band the old rule (10 %) compressed, for both kinds
    assert min(between.values()) >= 10, between


def test_int_for_float_is_converted_and_canonical() -> None:
    schema = Schema(1, (Field("x", F), Field("y", F32), Field("z", F, is_list=True)))
    codec = DatasetCodec([schema])
    a = codec.encode({"x": 1, "y": 2, "z": [3, 4.5]})
    assert a == codec.encode({"x": 1.0, "y": 2.0, "z": [3.0, 4.5]})
    assert codec.decode(a) == {"x": 1.0, "y": 2.0, "z": [3.0, 4.5]}
    assert type(codec.decode(a)["x"]) is float


def test_float32_is_stored_in_four_bytes_and_rounded() -> None:
    schema = Schema(1, (Field("x", F32),))
    codec = DatasetCodec([schema])
    encoded = codec.encode({"x": 0.1})
    assert encoded == bytes([HEADER_FIXED]) + struct.pack("<HBf", 1, 2, 0.1)
    assert len(encoded) == 1 + 2 + 1 + 4
    assert codec.decode(encoded)["x"] == f32(0.1) != 0.1


def test_mixed_float_precisions_in_any_order() -> None:
    fields = [Field("a", F), Field("b", F32), Field("c", INT), Field("d", F)]
    fields += [Field(f"e{i}", F32 if i % 3 else F) for i in range(20)]
    fields += [Field("l32", F32, is_list=True), Field("l64", F, is_list=True)]
    schema = Schema(1, tuple(fields))
    codec = DatasetCodec([schema], compress=False)
    record = {f.name: ([0.1, 2.5] if f.is_list else (7 if f.type is INT else 0.1)) for f in fields}
    encoded = codec.encode(record)
    values = codec.decode_values(encoded)
    for field, value in zip(fields, values, strict=True):
        want = f32(0.1) if field.type is F32 else 0.1
        if field.is_list:
            assert value == [want, 2.5]
        elif field.type is not INT:
            assert value == want
    # float32 values take 4 bytes, float64 8, the int 4: the exact size.
    scalar32 = sum(1 for f in fields if f.type is F32 and not f.is_list)
    scalar64 = sum(1 for f in fields if f.type is F and not f.is_list)
    prefix, slots = 2 + 1, scalar32 * 4 + scalar64 * 8 + 4 + 4 + 4
    size = prefix + slots + 2 * 4 + 2 * 8
    assert len(encoded) == 1 + size


def test_nan_and_infinities_round_trip() -> None:
    schema = Schema(1, (Field("a", F), Field("b", F32), Field("c", F32, is_list=True)))
    codec = DatasetCodec([schema])
    out = codec.decode(codec.encode({"a": math.nan, "b": math.nan, "c": [math.inf, -math.inf]}))
    assert math.isnan(out["a"]) and math.isnan(out["b"])
    assert out["c"] == [math.inf, -math.inf]


def test_single_field_schema_and_non_dict_mappings() -> None:
    codec = DatasetCodec([Schema(1, (Field("only", INT, default=5),))])
    assert codec.decode(codec.encode({"only": 3})) == {"only": 3}
    assert codec.decode(codec.encode({})) == {"only": 5}
    proxy = types.MappingProxyType({"only": 4})
    assert codec.decode(codec.encode(proxy)) == {"only": 4}
    dd: defaultdict[str, int] = defaultdict(int)
    assert codec.decode(codec.encode(dd)) == {"only": 5}
    assert dict(dd) == {}  # the caller's record is not touched


def test_str_and_int_subclasses_are_normalized() -> None:
    class MyStr(str):
        pass

    class MyFloat(float):
        pass

    class MyInt(int):
        pass

    schema = Schema(
        1, (Field("s", S), Field("d", S, dictionary=True), Field("f", F), Field("i", INT))
    )
    codec = DatasetCodec([schema])
    a = codec.encode({"s": MyStr("x"), "d": MyStr("y"), "f": MyFloat(1.5), "i": MyInt(3)})
    assert a == codec.encode({"s": "x", "d": "y", "f": 1.5, "i": 3})
    # Any numbers.Real is accepted for a float (e.g. a Fraction, a NumPy float).
    assert a == codec.encode({"s": "x", "d": "y", "f": fractions.Fraction(3, 2), "i": 3})
    with pytest.raises(FieldTypeError):
        codec.encode({"s": "x", "d": "y", "f": 1.5, "i": fractions.Fraction(3, 1)})


# --- the seed-like sample ----------------------------------------------------


def test_seed_like_sample_is_deterministic_and_compact() -> None:
    schema = seed_like_schema()
    assert 25 <= len(schema.fields) <= 32
    assert seed_like_record(7) == seed_like_record(7)
    assert seed_like_record(7) != seed_like_record(8)
    codec = DatasetCodec([schema])
    ours = json_total = 0
    for i in range(300):
        record = seed_like_record(i)
        assert set(record) == set(schema.names)
        encoded = codec.encode(record)
        assert codec.decode(encoded) == expected(schema, record)
        ours += len(encoded)
        json_total += len(json.dumps(record, separators=(",", ":")))
    assert 300 <= json_total / 300 <= 420
    assert ours / json_total <= 0.4
    assert codec.dictionary.size > 0


# --- keys --------------------------------------------------------------------


def test_keys() -> None:
    assert MAX_KEY_BYTES == 507  # LMDB's 511, less the 4-byte leaf prefix
    assert check_key(b"k" * 507) == b"k" * 507
    with pytest.raises(KeyTooLongError):
        check_key(b"k" * 508)
    with pytest.raises(InvalidKeyError, match="empty"):
        check_key(b"")
    with pytest.raises(InvalidKeyError, match="bytes"):
        check_key("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        check_key(bytearray(b"k"))  # type: ignore[arg-type]
    assert issubclass(KeyTooLongError, InvalidKeyError)


# --- record errors -----------------------------------------------------------

ERR_SCHEMA = Schema(
    1,
    (
        Field("i", INT),
        Field("f", F),
        Field("g", F32, nullable=True),
        Field("b", B, default=False),
        Field("s", S, default=""),
        Field("y", Y, nullable=True),
        Field("li", INT, is_list=True, default=()),
        Field("ls", S, is_list=True, nullable=True),
        Field("city", S, dictionary=True, default="none"),
    ),
)
GOOD = {"i": 1, "f": 1.5}


@pytest.mark.parametrize(
    ("patch", "error", "match"),
    [
        ({"i": True}, FieldTypeError, "expected int, got bool"),
        ({"i": 1.0}, FieldTypeError, "expected int"),
        ({"i": "1"}, FieldTypeError, "expected int"),
        ({"i": INT64_MAX + 1}, FieldTypeError, "64-bit"),
        ({"i": INT64_MIN - 1}, FieldTypeError, "64-bit"),
        ({"i": None}, FieldTypeError, "not nullable"),
        ({"f": True}, FieldTypeError, "got bool"),
        ({"f": "1.5"}, FieldTypeError, "expected float"),
        ({"f": 10**400}, FieldTypeError, "too large"),
        ({"g": 1e39}, FieldTypeError, "float32 range"),
        ({"g": -1e39}, FieldTypeError, "float32 range"),
        ({"b": 1}, FieldTypeError, "expected bool"),
        ({"b": None}, FieldTypeError, "not nullable"),
        ({"s": b"x"}, FieldTypeError, "expected str"),
        ({"s": "bad \ud800 surrogate"}, FieldTypeError, "not valid Unicode"),
        ({"y": "text"}, FieldTypeError, "expected bytes"),
        ({"li": [1, True]}, FieldTypeError, "expected int, got bool"),
        ({"li": [1, None]}, FieldTypeError, "cannot be null"),
        ({"li": [INT64_MIN - 1]}, FieldTypeError, "64-bit"),
        ({"li": 5}, FieldTypeError, "expected list<int>"),
        ({"li": None}, FieldTypeError, "not nullable"),
        ({"ls": ["a", "\udfff"]}, FieldTypeError, "not valid Unicode"),
        ({"ls": ["a", 1]}, FieldTypeError, "expected str"),
        ({"city": 3}, FieldTypeError, "expected str"),
        ({"city": ["beijing"]}, FieldTypeError, "expected str"),
        ({"city": "\ud800"}, FieldTypeError, "not valid Unicode"),
        ({"city": None}, FieldTypeError, "not nullable"),
        ({"extra": 1}, UnknownFieldError, "unknown field 'extra'"),
        ({7: 1}, UnknownFieldError, "unknown field 7"),
    ],
)
def test_record_errors(patch: dict[Any, Any], error: type[Exception], match: str) -> None:
    codec = DatasetCodec([ERR_SCHEMA])
    with pytest.raises(error, match=match):
        codec.encode({**GOOD, **patch})
    assert codec.dictionary.size == 0


def test_missing_and_unknown_fields() -> None:
    codec = DatasetCodec([ERR_SCHEMA])
    with pytest.raises(MissingFieldError, match="'i' is required"):
        codec.encode({"f": 1.0})
    # As many keys as fields, but one is unknown and one missing.
    record: dict[str, Any] = {
        **GOOD,
        "g": None,
        "b": True,
        "s": "",
        "y": None,
        "li": [],
        "ls": None,
        "bogus": 1,
    }
    assert len(record) == len(ERR_SCHEMA.fields)
    with pytest.raises(UnknownFieldError, match="bogus"):
        codec.encode(record)
    with pytest.raises(RecordError, match="mapping"):
        codec.encode([("i", 1)])  # type: ignore[arg-type]


def test_errors_roll_back_dictionary_additions() -> None:
    codec = DatasetCodec([ERR_SCHEMA], max_value_bytes=64)
    codec.encode({**GOOD, "city": "beijing"})
    mark = codec.dictionary.size
    with pytest.raises(ValueTooLargeError):
        codec.encode({**GOOD, "city": "shanghai", "s": "x" * 100})
    assert codec.dictionary.size == mark
    assert codec.dictionary.code("city", "shanghai") is None
    schema = Schema(1, (Field("city", S, dictionary=True), Field("n", INT)))
    codec2 = DatasetCodec([schema])
    with pytest.raises(FieldTypeError):
        codec2.encode({"city": "wuhan", "n": "not an int"})
    assert codec2.dictionary.size == 0


def test_value_too_large() -> None:
    codec = DatasetCodec([Schema(1, (Field("s", S),))], max_value_bytes=100)
    codec.encode({"s": "x" * 90})
    with pytest.raises(ValueTooLargeError):
        codec.encode({"s": "x" * 100})
    opaque = DatasetCodec(None, max_value_bytes=100)
    assert opaque.decode_opaque(opaque.encode_opaque(b"x" * 100)) == b"x" * 100
    with pytest.raises(ValueTooLargeError):
        opaque.encode_opaque(b"x" * 101)


def test_wrong_kind_of_dataset() -> None:
    typed = DatasetCodec([ERR_SCHEMA])
    opaque = DatasetCodec(None)
    assert not opaque.is_typed and opaque.schema is None and opaque.field_names == ()
    with pytest.raises(RecordError, match="opaque"):
        opaque.encode({"i": 1})
    with pytest.raises(RecordError, match="typed"):
        typed.encode_opaque(b"x")
    with pytest.raises(RecordError, match="bytes"):
        opaque.encode_opaque("text")  # type: ignore[arg-type]
    with pytest.raises(CorruptRecordError, match="opaque"):
        opaque.decode(opaque.encode_opaque(b"x"))
    with pytest.raises(CorruptRecordError, match="opaque"):
        opaque.decode_values(opaque.encode_opaque(b"x"))
    with pytest.raises(CorruptRecordError, match="opaque value where a typed"):
        typed.decode(opaque.encode_opaque(b"x"))
    with pytest.raises(CorruptRecordError, match="typed record where an opaque"):
        opaque.decode_opaque(typed.encode(GOOD))


def test_field_index() -> None:
    codec = DatasetCodec([ERR_SCHEMA])
    assert codec.field_index("f") == 1
    assert codec.field_names == ERR_SCHEMA.names
    with pytest.raises(UnknownFieldError):
        codec.field_index("nope")


# --- corrupt bytes -----------------------------------------------------------


def _decoders(codec: DatasetCodec) -> list[Any]:
    return [codec.decode, codec.decode_values]


def _field_reads(codec: DatasetCodec, blob: bytes) -> None:
    """Every one-field read of ``blob`` returns or raises CorruptRecordError."""
    for get in codec.field_getters.values():
        with contextlib.suppress(CorruptRecordError):
            get(blob)


OPAQUE = DatasetCodec(None)


@functools.cache
def _valid_values() -> list[tuple[DatasetCodec, bytes]]:
    seed = DatasetCodec([seed_like_schema()])
    text = DatasetCodec([Schema(1, (Field("t", S), Field("n", INT)))])
    return [
        (seed, seed.encode(seed_like_record(1))),
        (text, text.encode({"t": "feature " * 30, "n": 3})),
    ]


def test_every_truncation_is_corrupt() -> None:
    for codec, value in _valid_values():
        for cut in range(len(value)):
            for decode in _decoders(codec):
                with pytest.raises(CorruptRecordError):
                    decode(value[:cut])
            _field_reads(codec, value[:cut])
    opaque = DatasetCodec(None)
    for value in (opaque.encode_opaque(b"v" * 300), opaque.encode_opaque(b"short")):
        for cut in range(len(value)):
            with contextlib.suppress(CorruptRecordError):
                assert isinstance(opaque.decode_opaque(value[:cut]), bytes)


@settings(max_examples=400, deadline=None)
@given(which=st.integers(0, 1), data=st.data())
def test_random_corruption_is_corrupt_or_decodes(which: int, data: st.DataObject) -> None:
    codec, value = _valid_values()[which]
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(value) - 1), st.integers(1, 255)), max_size=3)
    )
    damaged = bytearray(value)
    for pos, xor in flips:
        damaged[pos] ^= xor
    for decode in _decoders(codec):
        with contextlib.suppress(CorruptRecordError):
            decode(bytes(damaged))
    _field_reads(codec, bytes(damaged))


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=64),
    head=st.sampled_from([0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x00, 0xFF]),
)
def test_arbitrary_bytes_are_corrupt_or_decode(data: bytes, head: int) -> None:
    codec, _ = _valid_values()[0]
    opaque = OPAQUE
    blob = bytes([head]) + data
    for decode in [*_decoders(codec), opaque.decode_opaque]:
        with contextlib.suppress(CorruptRecordError):
            decode(blob)
    _field_reads(codec, blob)


def _typed(values: list[Any]) -> bytes:
    return bytes([HEADER_TYPED]) + bytes(msgpack.packb(values, use_bin_type=True))


def test_structural_corruption() -> None:
    schema = Schema(1, (Field("city", S, dictionary=True), Field("n", INT)))
    codec = DatasetCodec([schema])
    assert codec.decode(codec.encode({"city": "beijing", "n": 1})) == {"city": "beijing", "n": 1}
    cases = {
        b"": "empty",
        b"\x30" + msgpack.packb([1, 0, 1]): "unknown value header",
        _typed([99, 0, 1]): "unknown schema version 99",
        _typed([True, 0, 1]): "unknown schema version True",
        _typed(["1", 0, 1]): "unknown schema version",
        _typed([[1], 0, 1]): "unknown schema version",
        _typed([1, 0]): "has 1 values, expected 2",
        _typed([1, 0, 1, 2]): "has 3 values, expected 2",
        _typed([]): "non-empty msgpack array",
        _typed({"a": 1}): "non-empty msgpack array",  # type: ignore[arg-type]
        _typed(5): "non-empty msgpack array",  # type: ignore[arg-type]
        _typed([1, 1, 1]): "dictionary code 1 of field 'city'",
        _typed([1, -1, 1]): "dictionary code -1",
        _typed([1, 0.0, 1]): "dictionary code 0.0",
        _typed([1, None, 1]): "dictionary code None",
        _typed([1, False, 1]): "dictionary code False",
        bytes([HEADER_TYPED]) + msgpack.packb([1, 0, 1]) + b"\x00": "msgpack",
        bytes([HEADER_TYPED, 0xC1]): "msgpack",
    }
    for blob, match in cases.items():
        for decode in _decoders(codec):
            with pytest.raises(CorruptRecordError, match=match):
                decode(blob)
    # An inline string (dictionary was full when written) is accepted.
    assert codec.decode(_typed([1, "wuhan", 1])) == {"city": "wuhan", "n": 1}


def _fixed(version: int, width: int, fmt: str, *slots: Any) -> bytes:
    return bytes([HEADER_FIXED]) + struct.pack("<HB" + fmt, version, width, *slots)


def test_fixed_layout_nulls_and_lists() -> None:
    schema = Schema(
        1,
        (
            Field("a", S),
            Field("b", S, nullable=True),
            Field("c", S),
            Field("x", F, nullable=True),
            Field("tags", INT, is_list=True, nullable=True),
        ),
    )
    codec = DatasetCodec([schema])
    value = codec.encode({"a": "hello", "b": None, "c": "xy", "x": None, "tags": None})
    # bits 0, 1, 2 of the null byte: b, x, tags; b's and tags' spans are empty
    # (their slots repeat the end before), x's slot is zero
    assert value == _fixed(1, 2, "BIIIdI", 0b111, 5, 5, 7, 0.0, 7) + b"helloxy"
    assert codec.decode(value) == {"a": "hello", "b": None, "c": "xy", "x": None, "tags": None}
    # lists have no one-read path: field_getter decodes, field_getters omits them
    assert "tags" not in codec.field_getters and set(codec.field_getters) == {"a", "b", "c", "x"}
    full = codec.encode({"a": "", "b": "q", "c": "", "x": 1.5, "tags": [1, -2]})
    assert codec.field_getter("tags")(full) == [1, -2]
    assert [codec.field_getters[n](full) for n in "abcx"] == ["", "q", "", 1.5]


def test_fixed_layout_structural_corruption() -> None:
    schema = Schema(
        1,
        (
            Field("city", S, dictionary=True),
            Field("n", INT),
            Field("name", S),
            Field("tags", INT, is_list=True),
        ),
    )
    codec = DatasetCodec([schema])
    good = codec.encode({"city": "beijing", "n": 1, "name": "ab", "tags": [3]})
    tail = b"ab" + struct.pack("<i", 3)
    assert good == _fixed(1, 2, "IiII", 0, 1, 2, 6) + tail
    # readers take every width; this writer uses 4 bytes unless 8 are needed
    assert codec.decode(_fixed(1, 0, "IbII", 0, 1, 2, 3) + b"ab\x03") == codec.decode(good)
    big = codec.encode({"city": "beijing", "n": 1 << 40, "name": "", "tags": [3]})
    assert big == _fixed(1, 3, "IqII", 0, 1 << 40, 0, 8) + struct.pack("<q", 3)
    in_list = codec.encode({"city": "beijing", "n": 1, "name": "", "tags": [-(1 << 63)]})
    assert in_list[3] == 3 and codec.decode(in_list)["tags"] == [-(1 << 63)]
    cases = {
        _fixed(1, 4, "IiII", 0, 1, 2, 6) + tail: "unknown int width code 4",
        _fixed(7, 2, "IiII", 0, 1, 2, 6) + tail: "unknown schema version 7",
        bytes([HEADER_FIXED, 1, 0]): "no room for its prefix",
        _fixed(1, 2, "Ii", 0, 1): "shorter than its fixed part",
        _fixed(1, 2, "IiII", 5, 1, 2, 6) + tail: "dictionary code 5 of field 'city'",
        _fixed(1, 2, "IiII", 0, 1, 2, 9) + tail: "shorter than its offsets",
        _fixed(1, 2, "IiII", 0, 1, 3, 2) + tail: "offsets decrease",
        _fixed(1, 2, "IiII", 0, 1, 2, 6) + tail + b"\x00": "spill",
        _fixed(1, 2, "IiII", 0xFFFFFFFF, 1, 2, 6) + tail: "spill",
        _fixed(1, 2, "IiII", 0, 1, 2, 6) + b"\xff\xfe" + tail[2:]: "utf-8",
        _fixed(1, 2, "IiII", 0, 1, 2, 5) + tail[:5]: "not a multiple of 4",
        _fixed(1, 1, "IhII", 0, 1, 2, 3) + b"ab\x03": "not a multiple of 2",
    }
    for blob, match in cases.items():
        for decode in _decoders(codec):
            with pytest.raises(CorruptRecordError, match=match):
                decode(blob)
        # one-field reads (list fields included) return or raise CorruptRecordError,
        # never another exception
        for name in schema.names:
            with contextlib.suppress(CorruptRecordError):
                codec.field_getter(name)(blob)
    # revision 1 records (written before the fixed layout) still decode
    old = _typed([1, 0, 1, "ab", [3]])
    assert codec.decode(old) == codec.decode(good)
    assert [codec.field_getter(n)(old) for n in schema.names] == codec.decode_values(good)


@given(st.binary(max_size=8))
def test_the_snappy_length_prefix_is_read_as_a_varint_of_at_most_five_bytes(data: bytes) -> None:
    """``_snappy_length`` (with its fast path for one- and two-byte
    lengths) reads the varint after the header byte like a plain loop."""
    want = -1
    result = shift = 0
    for byte in data[1:6]:
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            want = result
            break
        shift += 7
    assert _snappy_length(data) == want


def test_snappy_is_bounded_and_checked() -> None:
    codec = DatasetCodec([Schema(1, (Field("t", S),))], max_value_bytes=1000)
    opaque = DatasetCodec(None, max_value_bytes=1000)
    huge = bytes([0x80, 0x80, 0x80, 0x80, 0x01])  # claims 2**28 bytes
    too_long_varint = bytes([0x80] * 6)
    for head, decode in (
        (HEADER_TYPED_SNAPPY, codec.decode),
        (HEADER_TYPED_SNAPPY, codec.decode_values),
        (HEADER_OPAQUE_SNAPPY, opaque.decode_opaque),
    ):
        with pytest.raises(CorruptRecordError, match="more than 1000"):
            decode(bytes([head]) + huge + b"\x00" * 10)
        with pytest.raises(CorruptRecordError, match="length prefix"):
            decode(bytes([head]) + too_long_varint)
        with pytest.raises(CorruptRecordError, match="length prefix"):
            decode(bytes([head]))
        with pytest.raises(CorruptRecordError, match="Snappy"):
            decode(bytes([head, 10]) + b"\xff\xff\xff")
    # A block claiming <= max but produced by a bigger writer is still bounded.
    big = bytes(cramjam.snappy.compress_raw(b"z" * 5000))
    with pytest.raises(CorruptRecordError, match="more than 1000"):
        opaque.decode_opaque(bytes([HEADER_OPAQUE_SNAPPY]) + big)


# --- dictionary --------------------------------------------------------------


def test_dictionary_overflow_falls_back_to_inline_strings() -> None:
    schema = Schema(1, (Field("city", S, dictionary=True), Field("n", INT)))
    dictionary = Dictionary(max_entries_per_field=2)
    codec = DatasetCodec([schema], dictionary)
    a = codec.encode({"city": "a", "n": 1})
    codec.encode({"city": "b", "n": 1})
    assert dictionary.is_full("city")
    c = codec.encode({"city": "c-overflow", "n": 1})
    assert dictionary.size == 2 and dictionary.add("city", "c-overflow") is None
    assert b"c-overflow" in c
    assert codec.decode(c) == {"city": "c-overflow", "n": 1}
    assert codec.encode(codec.decode(c)) == c
    assert codec.encode({"city": "a", "n": 1}) == a
    # header, version 1, width code 2, city code 0, n = 1
    assert a == bytes([HEADER_FIXED]) + struct.pack("<HBIi", 1, 2, 0, 1)
    # the full dictionary's string: code 0xFFFFFFFF and a msgpack spill tail
    assert c == bytes([HEADER_FIXED]) + struct.pack("<HBIi", 1, 2, 0xFFFFFFFF, 1) + msgpack.packb(
        ["c-overflow"]
    )
    assert codec.field_getter("city")(c) == "c-overflow"


def test_dictionary_marks_entries_and_rollback() -> None:
    schema = Schema(1, (Field("city", S, dictionary=True), Field("os", S, dictionary=True)))
    codec = DatasetCodec([schema])
    d = codec.dictionary
    mark = d.size
    assert mark == 0
    codec.encode({"city": "beijing", "os": "ios"})
    codec.encode({"city": "wuhan", "os": "ios"})
    assert d.entries_since(mark) == [
        DictionaryEntry("city", 0, "beijing"),
        DictionaryEntry("os", 0, "ios"),
        DictionaryEntry("city", 1, "wuhan"),
    ]
    assert d.entries_since(3) == []
    assert d.strings("city") == ("beijing", "wuhan")
    assert d.value("city", 1) == "wuhan"
    d.truncate(1)
    assert d.size == 1 and d.strings("os") == () and d.code("city", "wuhan") is None
    with pytest.raises(CodecError):
        d.entries_since(5)
    with pytest.raises(CodecError):
        d.truncate(-1)
    with pytest.raises(CorruptRecordError):
        d.value("city", 1)


def test_dictionary_apply_is_idempotent_and_checked() -> None:
    origin = DatasetCodec([seed_like_schema()])
    for i in range(50):
        origin.encode(seed_like_record(i))
    entries = origin.dictionary.entries_since(0)
    replica_dict = Dictionary()
    assert replica_dict.apply(entries[:5]) == 5
    # Entries survive a msgpack round trip (they come back as lists).
    shipped = msgpack.unpackb(msgpack.packb(entries))
    assert Dictionary().apply(shipped) == len(entries)
    assert replica_dict.apply(entries) == len(entries) - 5
    assert replica_dict.apply(entries) == 0
    replica = DatasetCodec([seed_like_schema()], replica_dict)
    value = origin.encode(seed_like_record(3))
    assert replica.decode(value) == origin.decode(value)
    size = replica_dict.size
    for bad in (
        [("city", 0, "not-the-same")],  # conflicts with code 0
        [("city", 999, "gap")],  # skips ahead
        [("city", len(replica_dict.strings("city")), replica_dict.strings("city")[0])],  # dup
        [("city", "0", "x")],
        [("bad name!", 0, "x")],
        ["not a tuple"],
        [("new_field", 0, "ok"), ("new_field", 0, "conflict")],  # rolled back whole
    ):
        with pytest.raises(CorruptRecordError):
            replica_dict.apply(bad)
        assert replica_dict.size == size
    small = Dictionary(max_entries_per_field=1)
    with pytest.raises(CorruptRecordError):
        small.apply([("f", 0, "a"), ("f", 1, "b")])


def test_dictionary_json_round_trip_and_errors() -> None:
    codec = DatasetCodec([seed_like_schema()])
    for i in range(30):
        codec.encode(seed_like_record(i))
    d = codec.dictionary
    again = Dictionary.from_json(json.loads(json.dumps(d.to_json())))
    assert again.to_json() == d.to_json() and again.size == d.size
    for name in ("city", "gender", "os"):
        assert again.strings(name) == d.strings(name)
    bad: object
    for bad in (
        [],
        {"fields": {}},
        {"max_entries_per_field": 0, "fields": {}},
        {"max_entries_per_field": 4, "fields": []},
        {"max_entries_per_field": 4, "fields": {"a": "str"}},
        {"max_entries_per_field": 4, "fields": {"a": ["x", "x"]}},
        {"max_entries_per_field": 1, "fields": {"a": ["x", "y"]}},
        {"max_entries_per_field": 4, "fields": {"a": [1]}},
    ):
        with pytest.raises(CorruptRecordError):
            Dictionary.from_json(bad)
    with pytest.raises(CodecError):
        Dictionary(0)
    with pytest.raises(CodecError, match=r"1\.\.4294967294"):
        Dictionary(0xFFFFFFFF)  # a code must never be the spill marker
    with pytest.raises(FieldTypeError):
        Dictionary().add("f", "\ud800")


# --- codec construction ------------------------------------------------------


def test_codec_construction_errors() -> None:
    v1 = Schema(1, (Field("a", INT),))
    v2 = v1.evolve([Field("b", INT, default=0)])
    assert DatasetCodec([v1, v2]).schema == v2
    with pytest.raises(SchemaError):
        DatasetCodec([])
    with pytest.raises(SchemaError, match="start at version 1"):
        DatasetCodec([v2])
    with pytest.raises(SchemaError):
        DatasetCodec([v2, v1])
    with pytest.raises(SchemaError, match="list of all schema versions"):
        DatasetCodec(v1)  # type: ignore[arg-type]
    with pytest.raises(SchemaError):
        DatasetCodec(["nope"])  # type: ignore[list-item]
    with pytest.raises(CodecError):
        DatasetCodec([v1], max_value_bytes=0)
    with pytest.raises(SchemaError):
        DatasetCodec([v1]).with_schema(v1)
    with pytest.raises(SchemaError):
        DatasetCodec(None).with_schema(v1)
    codec = DatasetCodec([v1, v2], max_value_bytes=500, compress=False)
    assert codec.is_typed and codec.schemas == (v1, v2)
    assert codec.max_value_bytes == 500 and codec.compress is False
    assert "def encode" in codec.sources["encode"]


# --- schemas -----------------------------------------------------------------


@SETTINGS
@given(schema=schema_st())
def test_schema_json_round_trip(schema: Schema) -> None:
    text = json.dumps(schema.to_json())
    assert Schema.from_json(json.loads(text)) == schema


def test_schema_json_shape() -> None:
    schema = Schema(
        1,
        (
            Field("age", INT, default=0),
            Field("city", S, dictionary=True),
            Field("tags", INT, is_list=True, nullable=True),
            Field("blob", Y, default=b"\x00\x01"),
            Field("w", F32, default=0.1),
        ),
    )
    obj = schema.to_json()
    assert obj["fields"][0] == {"name": "age", "type": "int", "nullable": False, "default": 0}
    assert obj["fields"][1]["dictionary"] is True
    assert obj["fields"][2]["type"] == "list<int>"
    assert obj["fields"][3]["default"] == "AAE="
    assert obj["fields"][4]["default"] == f32(0.1)
    minimal = Schema.from_json({"version": 1, "fields": [{"name": "x", "type": "list<str>"}]})
    assert minimal.fields[0] == Field("x", S, is_list=True)


def test_field_defaults_are_normalized() -> None:
    assert Field("x", F, default=1).default == 1.0
    assert type(Field("x", F, default=1).default) is float
    assert Field("x", F32, default=0.1).default == f32(0.1)
    assert Field("x", INT, is_list=True, default=[1, 2]).default == (1, 2)
    assert Field("x", Y, default=bytearray(b"ab")).default == b"ab"
    assert Field("x", "int").type is INT  # type: ignore[arg-type]
    assert Field("x", INT).required and not Field("x", INT, default=0).required


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Field("", INT), "non-empty"),
        (lambda: Field("1abc", INT), "invalid field name"),
        (lambda: Field("a-b", INT), "invalid field name"),
        (lambda: Field("a" * 65, INT), "invalid field name"),
        (lambda: Field("é", INT), "invalid field name"),
        (lambda: Field("a\n", INT), "invalid field name"),
        (lambda: Field(untyped(5), INT), "non-empty string"),
        (lambda: Field("a", untyped("integer")), "unknown field type"),
        (lambda: Field("a", INT, nullable=untyped(1)), "nullable must be a bool"),
        (lambda: Field("a", INT, dictionary=True), "only for str"),
        (lambda: Field("a", S, is_list=True, dictionary=True), "only for str"),
        (lambda: Field("a", INT, default="0"), "bad default"),
        (lambda: Field("a", INT, default=True), "bad default"),
        (lambda: Field("a", F32, default=1e39), "bad default"),
        (lambda: Field("a", INT, is_list=True, default=[1, None]), "bad default"),
        (lambda: Schema(0, (Field("a", INT),)), "version"),
        (lambda: Schema(65_536, (Field("a", INT),)), r"1\.\.65535"),
        (lambda: Schema(True, (Field("a", INT),)), "version"),
        (lambda: Schema(1, ()), "at least one field"),
        (lambda: Schema(1, untyped("ab")), "sequence"),
        (lambda: Schema(1, untyped(("a",))), "Field objects"),
        (lambda: Schema(1, (Field("a", INT), Field("a", S))), "duplicate"),
        (lambda: Schema.from_json([]), "JSON object"),
        (lambda: Schema.from_json({"version": 1}), "needs"),
        (lambda: Schema.from_json({"version": 1, "fields": [], "x": 1}), "unknown keys"),
        (lambda: Schema.from_json({"version": 1, "fields": {}}), "array"),
        (lambda: Schema.from_json({"version": 1, "fields": [[]]}), "JSON object"),
        (lambda: Schema.from_json({"version": 1, "fields": [{"name": "a"}]}), "needs"),
        (
            lambda: Schema.from_json({"version": 1, "fields": [{"name": "a", "type": "map"}]}),
            "unknown field type",
        ),
        (
            lambda: Schema.from_json(
                {"version": 1, "fields": [{"name": "a", "type": "list<list<int>>"}]}
            ),
            "unknown field type",
        ),
        (
            lambda: Schema.from_json(
                {"version": 1, "fields": [{"name": "a", "type": "int", "extra": 1}]}
            ),
            "unknown keys",
        ),
        (
            lambda: Schema.from_json(
                {"version": 1, "fields": [{"name": "a", "type": "bytes", "default": "!!"}]}
            ),
            "base64",
        ),
        (
            lambda: Schema.from_json(
                {"version": 1, "fields": [{"name": "a", "type": "bytes", "default": 5}]}
            ),
            "base64",
        ),
        (
            lambda: Schema.from_json(
                {"version": 1, "fields": [{"name": "a", "type": "list<bytes>", "default": "x"}]}
            ),
            "JSON array",
        ),
    ],
)
def test_schema_errors(build: Any, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        build()


V1 = Schema(1, (Field("a", INT), Field("b", S, default="x"), Field("c", F, nullable=True)))


@pytest.mark.parametrize(
    ("new_fields", "match"),
    [
        ((Field("a", INT), Field("b", S, default="x")), "'c' was removed"),
        ((Field("a", INT), Field("c", F, nullable=True), Field("b", S, default="x")), "moved"),
        ((Field("a", F), Field("b", S, default="x"), Field("c", F, nullable=True)), "type"),
        ((Field("a", INT, nullable=True), *V1.fields[1:]), "changed nullable"),
        ((Field("a", INT), Field("b", S, default="y"), V1.fields[2]), "changed default"),
        ((V1.fields[0], Field("b", S, default="x", dictionary=True), V1.fields[2]), "dictionary"),
        (V1.fields, "adds no field"),
        ((*V1.fields, Field("d", INT)), "must be nullable or have a default"),
    ],
)
def test_check_evolution_errors(new_fields: tuple[Field, ...], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        Schema.check_evolution(V1, Schema(2, new_fields))


def test_evolve() -> None:
    v2 = V1.evolve([Field("d", INT, default=0), Field("e", S, nullable=True)])
    assert v2.version == 2 and v2.names == ("a", "b", "c", "d", "e")
    Schema.check_evolution(V1, v2)
    with pytest.raises(SchemaError, match="go from 1 to 2"):
        Schema.check_evolution(V1, Schema(3, v2.fields))
    with pytest.raises(SchemaError, match="adds no field"):
        V1.evolve([])
    with pytest.raises(SchemaError, match="duplicate"):
        V1.evolve([Field("a", INT, default=0)])
    with pytest.raises(SchemaError, match="must be nullable"):
        V1.evolve([Field("d", INT)])
    assert V1.index("c") == 2
    with pytest.raises(SchemaError):
        V1.index("zz")
    nan_default = Schema(1, (Field("x", F, default=math.nan),))
    Schema.check_evolution(nan_default, nan_default.evolve([Field("y", INT, nullable=True)]))
