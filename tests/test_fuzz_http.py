"""Fuzzing, bounded, of the origin's HTTP API bodies: JSON and msgpack write
batches and bulk replaces (typed and opaque datasets), dataset creation,
schema evolution, acks and sync frames, plus record keys, hint queries and
raw paths -- through the real app, service and store in process
(``fuzz/fuzz_http.py``, which the long runs use too).

The contract checked for every input (``docs/api.md``): a 2xx, or a
documented 4xx with its error code and the JSON error body; never a 500;
a rejected write changes nothing; an answer within 5 s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import fuzz_http
from replicad.frames import encode_frame

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _origin() -> Iterator[None]:
    yield
    fuzz_http.close()


def target(method: str, path: str, media: str | None) -> bytes:
    for i, t in enumerate(fuzz_http.TARGETS):
        if (t.method, t.path, t.media) == (method, path, media):
            return bytes([i])
    raise KeyError((method, path, media))


def body(value: Any, media: str) -> bytes | None:
    """``value`` encoded as ``media`` (None when it has no such encoding)."""
    try:
        if media == fuzz_http.JSON:
            return json.dumps(value, default=repr).encode()
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data
    except (OverflowError, ValueError, TypeError):
        return None


junk = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.lists(st.integers() | st.text(max_size=3), max_size=3)
)
keys = (
    st.text(max_size=8)
    | st.sampled_from(["k", "a", "", "x" * 508, "\ud800"])
    | st.binary(max_size=8)
)
field_values = {
    "age": st.integers(-(2**64), 2**64) | junk,
    "city": st.text(max_size=6) | junk,
    "pic": st.binary(max_size=8) | st.fixed_dictionaries({"base64": st.text(max_size=8)}) | junk,
    "tags": st.lists(st.text(max_size=4) | junk, max_size=3) | junk,
    "score": st.floats(width=32) | st.floats() | junk,
    "nope": junk,
}
typed_record = st.fixed_dictionaries({}, optional=field_values) | junk
opaque_value = st.text(max_size=8) | st.fixed_dictionaries({"base64": st.text(max_size=8)}) | junk
batch_extra = st.fixed_dictionaries({}, optional={"replace": junk, "bogus": junk})


def batch(records: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.fixed_dictionaries(
            {},
            optional={
                "upserts": st.dictionaries(keys, records, max_size=4) | junk,
                "deletes": st.lists(keys | junk, max_size=3) | junk,
            },
        )
        | junk
    )


@SETTINGS
@given(
    doc=batch(typed_record),
    media=st.sampled_from([fuzz_http.JSON, fuzz_http.MSGPACK]),
    replace=st.booleans(),
)
def test_typed_writes(doc: Any, media: str, replace: bool) -> None:
    if replace:
        doc = {"records": doc.get("upserts") if isinstance(doc, dict) else doc}
        method_path = ("POST", "/v1/datasets/fz_typed/replace")
        media = fuzz_http.JSON
    else:
        method_path = ("POST", "/v1/datasets/fz_typed/batch")
    raw = body(doc, media)
    if raw is not None:
        fuzz_http.one_input(target(*method_path, media) + raw)


@SETTINGS
@given(doc=batch(opaque_value), media=st.sampled_from([fuzz_http.JSON, fuzz_http.MSGPACK]))
def test_opaque_writes(doc: Any, media: str) -> None:
    raw = body(doc, media)
    if raw is not None:
        fuzz_http.one_input(target("POST", "/v1/datasets/fz_opaque/batch", media) + raw)


schema_field = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "age", "1x"]) | junk,
        "type": st.sampled_from(["int", "str", "bytes", "list<int>", "nope"]) | junk,
    },
    optional={
        "nullable": st.booleans() | junk,
        "default": junk,
        "dictionary": st.booleans() | junk,
    },
)
dataset_doc = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=10) | st.sampled_from(["fz_typed", "ok_1", "a/b", ""]) | junk,
        "schema": st.fixed_dictionaries({"fields": st.lists(schema_field, max_size=3)}) | junk,
        "opaque": st.booleans() | junk,
        "merkle": st.fixed_dictionaries(
            {}, optional={"fanout": st.integers(0, 300) | junk, "depth": st.integers(0, 30) | junk}
        )
        | junk,
        "queue": st.fixed_dictionaries(
            {},
            optional={
                "max_entries": st.integers(-1, 10**20) | junk,
                "policy": st.sampled_from(["halving", "oldest-first", "binary-counter", "x"])
                | junk,
            },
        )
        | junk,
        "max_value_bytes": st.integers(-1, 10**20) | junk,
        "compress": st.booleans() | junk,
        "extra": junk,
    },
)


@SETTINGS
@given(doc=dataset_doc | junk, media=st.sampled_from([fuzz_http.JSON, fuzz_http.MSGPACK]))
def test_dataset_creation(doc: Any, media: str) -> None:
    raw = body(doc, media)
    if raw is not None:
        fuzz_http.one_input(target("POST", "/v1/datasets", media) + raw)


@SETTINGS
@given(
    fields=st.lists(schema_field, max_size=7) | junk,
    version=st.none() | st.integers(-1, 4) | junk,
    media=st.sampled_from([fuzz_http.JSON, fuzz_http.MSGPACK]),
)
def test_schema_evolution(fields: Any, version: Any, media: str) -> None:
    doc: dict[str, Any] = {"fields": fields}
    if version is not None:
        doc["version"] = version
    raw = body(doc, media)
    if raw is not None:
        fuzz_http.one_input(target("PUT", "/v1/datasets/fz_typed/schema", media) + raw)


ack_doc = st.fixed_dictionaries(
    {},
    optional={
        "replica": st.text(max_size=6) | junk,
        "datasets": st.dictionaries(
            st.text(max_size=6) | st.integers(),
            st.fixed_dictionaries(
                {},
                optional={
                    "epoch": st.sampled_from(["00" * 16, "zz" * 16, "00"])
                    | st.binary(max_size=17)
                    | junk,
                    "version": st.integers(-1, 2**64) | junk,
                },
            )
            | junk,
            max_size=3,
        )
        | junk,
        "info": st.dictionaries(st.text(max_size=4), junk, max_size=3) | junk,
    },
)


@SETTINGS
@given(doc=ack_doc | junk, media=st.sampled_from([fuzz_http.JSON, fuzz_http.MSGPACK]))
def test_acks(doc: Any, media: str) -> None:
    raw = body(doc, media)
    if raw is not None:
        fuzz_http.one_input(target("POST", "/v1/ack", media) + raw)


@SETTINGS
@given(kind=st.integers(0, 13), fields=st.lists(junk | st.lists(junk, max_size=3), max_size=6))
def test_sync_frames(kind: int, fields: list[Any]) -> None:
    try:
        frame = encode_frame(kind, fields)
    except Exception:  # an unpackable body is not an input
        return
    fuzz_http.one_input(target("POST", "/v1/sync", "application/x-replicad-frame") + frame)


@SETTINGS
@given(which=st.integers(0, len(fuzz_http.TARGETS) - 1), data=st.binary(max_size=200))
def test_any_endpoint_random_bytes(which: int, data: bytes) -> None:
    fuzz_http.one_input(bytes([which]) + data)


def test_every_seed_is_answered() -> None:
    for data in fuzz_http.SEEDS:
        fuzz_http.one_input(data)
