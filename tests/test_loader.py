"""Reading CSV and JSON-lines files for ``replicad load``."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.errors import BadRequestError
from replicad.loader import LoadError, batches, detect_format, iter_records, open_records
from replicad.schema import Schema

SCHEMA = Schema.from_json(
    {
        "version": 1,
        "fields": [
            {"name": "age", "type": "int"},
            {"name": "score", "type": "float32", "nullable": True},
            {"name": "ratio", "type": "float", "default": 0.5},
            {"name": "active", "type": "bool", "default": False},
            {"name": "city", "type": "str"},
            {"name": "avatar", "type": "bytes", "nullable": True},
            {"name": "tags", "type": "list<str>", "nullable": True},
            {"name": "weights", "type": "list<float>", "default": []},
            {"name": "blobs", "type": "list<bytes>", "nullable": True},
        ],
    }
)


def write(path: Path, text: str, *, gz: bool = False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def read(path: Path, schema: Schema | None = SCHEMA, **kw: Any) -> list[tuple[bytes, Any]]:
    return list(iter_records(path, schema=schema, **kw))


CSV_TEXT = (
    "key,age,score,ratio,active,city,avatar,tags,weights,blobs\n"
    'u1,31,1.5,0.25,true,Paris,AAE=,"[""a"", ""b""]","[1, 2.5]","[""AAE=""]"\n'
    "u2,-7,,,0,,,,,\n"
    'u3,0,nan,inf,TRUE,"with, comma",,[],[],\n'
)


def test_csv_converts_cells_to_the_field_types(tmp_path: Path) -> None:
    rows = read(write(tmp_path / "a.csv", CSV_TEXT))
    assert [k for k, _ in rows] == [b"u1", b"u2", b"u3"]
    first = rows[0][1]
    assert first == {
        "age": 31,
        "score": 1.5,
        "ratio": 0.25,
        "active": True,
        "city": "Paris",
        "avatar": b"\x00\x01",
        "tags": ["a", "b"],
        "weights": [1.0, 2.5],
        "blobs": [b"\x00\x01"],
    }
    assert isinstance(first["weights"][0], float)


def test_csv_empty_cells_mean_default_null_or_empty_string(tmp_path: Path) -> None:
    rows = dict(read(write(tmp_path / "a.csv", CSV_TEXT)))
    # ratio/weights have defaults (absent: the origin fills them in);
    # score/avatar/tags/blobs are nullable; city is a required str.
    assert rows[b"u2"] == {
        "age": -7,
        "active": False,
        "score": None,
        "city": "",
        "avatar": None,
        "tags": None,
        "blobs": None,
    }
    u3 = rows[b"u3"]
    assert math.isnan(u3["score"]) and u3["ratio"] == math.inf
    assert u3["city"] == "with, comma" and u3["tags"] == [] and u3["active"] is True


def test_gzip_is_recognised_by_its_bytes(tmp_path: Path) -> None:
    plain = repr(read(write(tmp_path / "a.csv", CSV_TEXT)))  # repr: nan != nan
    assert repr(read(write(tmp_path / "a.csv.gz", CSV_TEXT, gz=True))) == plain
    # a gzip file whose name does not say so still reads
    assert repr(read(write(tmp_path / "b.csv", CSV_TEXT, gz=True))) == plain


def test_csv_quoted_newlines_crlf_and_bom(tmp_path: Path) -> None:
    text = '\ufeffkey,age,city\r\nu1,1,"two\nlines"\r\n\r\nu2,2,x\r\n'
    assert read(write(tmp_path / "a.csv", text)) == [
        (b"u1", {"age": 1, "city": "two\nlines"}),
        (b"u2", {"age": 2, "city": "x"}),
    ]


def test_jsonl_records_and_gzip(tmp_path: Path) -> None:
    lines = [
        {"key": "u1", "age": 1, "city": "a", "avatar": {"base64": "AAE="}, "score": None},
        {"key": 42, "age": 2, "city": "b", "blobs": [{"base64": "/w=="}], "weights": [3]},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:1]) + "\n\n  \n" + json.dumps(lines[1])
    expected = [
        (b"u1", {"age": 1, "city": "a", "avatar": b"\x00\x01", "score": None}),
        (b"42", {"age": 2, "city": "b", "blobs": [b"\xff"], "weights": [3.0]}),
    ]
    assert read(write(tmp_path / "a.jsonl", text)) == expected
    assert read(write(tmp_path / "a.ndjson.gz", text, gz=True)) == expected


def test_custom_key_column_also_stored_when_it_is_a_field(tmp_path: Path) -> None:
    text = "city,age\nParis,3\n"
    assert read(write(tmp_path / "a.csv", text), key_column="city") == [
        (b"Paris", {"city": "Paris", "age": 3})
    ]
    text = '{"id": "x", "age": 1, "city": "c"}\n'
    assert read(write(tmp_path / "a.jsonl", text), key_column="id") == [
        (b"x", {"age": 1, "city": "c"})
    ]


def test_opaque_files_give_value_bytes(tmp_path: Path) -> None:
    assert read(write(tmp_path / "o.csv", "key,value\nk1,héllo\nk2,\n"), None) == [
        (b"k1", "héllo".encode()),
        (b"k2", b""),
    ]
    text = '{"key": "k1", "value": "v"}\n{"key": "k2", "value": {"base64": "AP8="}}\n'
    assert read(write(tmp_path / "o.jsonl", text), None) == [(b"k1", b"v"), (b"k2", b"\x00\xff")]


def test_format_detection_and_override(tmp_path: Path) -> None:
    assert detect_format("x.CSV") == "csv"
    assert detect_format("dir.v2/x.jsonl.gz") == "jsonl"
    assert detect_format("x.ndjson") == "jsonl"
    with pytest.raises(LoadError, match=r"x\.txt: cannot tell the format"):
        detect_format("x.txt")
    path = write(tmp_path / "data.txt", '{"key": "a", "age": 1, "city": "c"}\n')
    assert read(path, fmt="jsonl") == [(b"a", {"age": 1, "city": "c"})]
    with pytest.raises(LoadError, match="unknown format 'xml'"):
        open_records(path, fmt="xml")


def test_reader_counts_records_and_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", CSV_TEXT)
    with open_records(path, schema=SCHEMA) as reader:
        assert reader.size == len(CSV_TEXT.encode())
        assert len(list(reader)) == 3
        assert reader.records == 3
        assert reader.bytes_read == reader.size


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    assert read(write(tmp_path / "a.csv", "")) == []
    assert read(write(tmp_path / "a.csv", "key,age,city\n")) == []
    assert read(write(tmp_path / "a.jsonl", "\n\n")) == []


# --- error paths: each names the file, the line and the field ----------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("key,age,city\nu1,1,a\nu2,x,b\n", ":3:", "field 'age': expected an integer, got 'x'"),
        ("key,age,city,score\nu1,1,a,abc\n", ":2:", "field 'score': expected a number"),
        ("key,age,city,active\nu1,1,a,yes\n", ":2:", "field 'active': expected true/false/1/0"),
        ("key,age,city,avatar\nu1,1,a,!!\n", ":2:", "field 'avatar': not valid base64"),
        ("key,age,city,tags\nu1,1,a,[1\n", ":2:", "field 'tags': expected a JSON array"),
        ("key,age,city,tags\nu1,1,a,{}\n", ":2:", "field 'tags': expected a JSON array"),
        ("key,age,city,tags\nu1,1,a,[1]\n", ":2:", "field 'tags': expected str, got int"),
        ("key,age,city\nu1,,a\n", ":2:", "field 'age' is required but the cell is empty"),
        ("key,city\nu1,a\n", ":1:", "no column for the required field(s) ['age']"),
        ("key,age,city\nu1,99999999999999999999,a\n", ":2:", "outside the signed 64-bit"),
        ("key,age,city\nu1,1\n", ":2:", "expected 3 cells, got 2"),
        ("key,age,city\n,1,a\n", ":2:", "empty key in column 'key'"),
        ("id,age,city\nu1,1,a\n", ":1:", "no key column 'key' in the header"),
        ("key,age,city,bogus\n", ":1:", "unknown column(s) ['bogus']"),
        ("key,age,age,city\n", ":1:", "column 'age' appears twice"),
        ('key,age,city\nu1,1,"a\n', ":2:", "malformed CSV"),
    ],
)
def test_csv_errors_name_file_line_and_field(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(LoadError) as exc:
        read(path)
    message = str(exc.value)
    assert message.startswith(f"{path}{where}"), message
    assert what in message, message
    assert isinstance(exc.value, BadRequestError)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('{"key": "a", "age": 1, "city": "c"}\n{"key": "b", "age": 1,\n', ":2:", "not valid JSON"),
        ("[1, 2]\n", ":1:", "expected a JSON object, got list"),
        ('{"age": 1, "city": "c"}\n', ":1:", "no key column 'key'"),
        ('{"key": true, "age": 1, "city": "c"}\n', ":1:", "key 'key' must be a string"),
        ('{"key": "a", "age": "1", "city": "c"}\n', ":1:", "field 'age': expected int, got str"),
        ('{"key": "a", "age": null, "city": "c"}\n', ":1:", "field 'age' is not nullable"),
        ('{"key": "a", "age": 1}\n', ":1:", "field 'city' is required and missing"),
        ('{"key": "a", "age": 1, "city": "c", "x": 1}\n', ":1:", "unknown field(s) ['x']"),
        ('{"key": "a", "age": 1, "city": "c", "avatar": "AA=="}\n', ":1:", "expected bytes"),
        (
            '{"key": "a", "age": 1, "city": "c", "avatar": {"b64": "AA=="}}\n',
            ":1:",
            'bytes are written {"base64": "..."}',
        ),
        ('\n\n{"key": "a", "age": 1.5, "city": "c"}\n', ":3:", "field 'age': expected int"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(LoadError) as exc:
        read(path)
    message = str(exc.value)
    assert message.startswith(f"{path}{where}"), message
    assert what in message, message


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        ("o.csv", "key,val\n", "unknown column(s) ['val']"),
        ("o.csv", "key\n", "needs a 'value' column"),
        ("o.jsonl", '{"key": "a"}\n', "record needs a 'value'"),
        ("o.jsonl", '{"key": "a", "value": 3}\n', "'value' must be a string"),
        ("o.jsonl", '{"key": "a", "value": "v", "x": 1}\n', "unknown field(s) ['x']"),
    ],
)
def test_opaque_errors(tmp_path: Path, name: str, text: str, what: str) -> None:
    with pytest.raises(LoadError, match=r"o\.(csv|jsonl):\d+: ") as exc:
        read(write(tmp_path / name, text), None)
    assert what in str(exc.value)


def test_missing_unreadable_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"nope\.csv: cannot read: No such file"):
        read(tmp_path / "nope.csv")
    bad_gz = tmp_path / "bad.csv.gz"
    bad_gz.write_bytes(gzip.compress(CSV_TEXT.encode())[:40])
    with pytest.raises(LoadError, match=r"bad\.csv\.gz: cannot read"):
        read(bad_gz)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("key,age,city\nu1,1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(LoadError, match=r"latin\.csv: not UTF-8"):
        read(latin)


def test_records_before_an_error_were_valid(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "key,age,city\nu1,1,a\nu2,x,b\n")
    got: list[bytes] = []
    with pytest.raises(LoadError, match=":3:"):
        for key, _ in iter_records(path, schema=SCHEMA):
            got.append(key)
    assert got == [b"u1"]


# --- batching ----------------------------------------------------------------


def test_batches_chunk_in_order_and_keep_the_last_duplicate() -> None:
    records = [(b"a", 1), (b"b", 2), (b"a", 3), (b"c", 4), (b"d", 5)]
    assert list(batches(records, 2)) == [{b"a": 3, b"b": 2}, {b"c": 4, b"d": 5}]
    assert list(batches([], 3)) == []
    with pytest.raises(BadRequestError, match="batch size"):
        list(batches(records, 0))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=3), st.integers()), max_size=60),
    st.integers(1, 10),
)
def test_batches_cover_every_key_with_its_last_value(
    records: list[tuple[bytes, int]], size: int
) -> None:
    chunks = list(batches(records, size))
    assert all(1 <= len(c) <= size for c in chunks)
    merged: dict[bytes, int] = {}
    for chunk in chunks:
        merged.update(chunk)
    assert merged == dict(records)
