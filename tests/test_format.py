"""docs/FORMAT.md is enough to read a mirror: a decoder written from the
document alone (lmdb, msgpack, raw Snappy, xxhash -- none of the project's
codec), and ``mdb_dump`` (a C tool from lmdb-utils), read a mirror the real
sidecar code wrote, and agree with the origin."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import cramjam
import lmdb
import msgpack
import pytest
import xxhash

from replicad.codec import DatasetCodec
from replicad.loopback import LoopbackDriver
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.replica import ReplicaSync
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType, Schema
from replicad.store import OriginStore
from sidecar.json_render import RENDERING
from sidecar.mirror import Mirror

# --- an independent reader, from docs/FORMAT.md only -------------------------


_SCALAR = {"float": ("d", 8), "float32": ("f", 4), "bool": ("?", 1)}


def fmt_fixed(payload: bytes, definition: dict[str, Any]) -> tuple[int, list[Any]]:
    """A fixed-layout payload (header 0x20/0x21) as (version, field values)."""
    version, width = struct.unpack_from("<HB", payload)
    fields = {s["version"]: s for s in definition["schemas"]}[version]["fields"]
    nullable = [f["name"] for f in fields if f.get("nullable")]
    nb = (len(nullable) + 7) // 8
    nulls = payload[3 : 3 + nb]
    pos = 3 + nb
    int_size = 1 << width
    int_code = "bhiq"[width]
    slots: list[Any] = []
    ends: list[int] = []  # the variable fields' end offsets
    for f in fields:
        variable = f["type"].startswith("list<") or (
            f["type"] in ("str", "bytes") and not f.get("dictionary")
        )
        if variable or f.get("dictionary"):
            code, size = "I", 4
        elif f["type"] == "int":
            code, size = int_code, int_size
        else:
            code, size = _SCALAR[f["type"]]
        slots.append(struct.unpack_from("<" + code, payload, pos)[0])
        if variable:
            ends.append(slots[-1])
        pos += size
    var_start = pos
    tail_start = var_start + (ends[-1] if ends else 0)
    spills = iter(msgpack.unpackb(payload[tail_start:]) if len(payload) > tail_start else [])
    values: list[Any] = []
    start = 0
    for f, slot in zip(fields, slots, strict=True):
        name, ftype = f["name"], f["type"]
        if name in nullable:
            j = nullable.index(name)
            is_null = bool(nulls[j // 8] >> (j % 8) & 1)
        else:
            is_null = False
        if f.get("dictionary"):
            strings = definition["dictionary"]["fields"][name]
            values.append(
                None if is_null else next(spills) if slot == 0xFFFFFFFF else strings[slot]
            )
        elif ftype.startswith("list<") or ftype in ("str", "bytes"):
            span = payload[var_start + start : var_start + slot]
            start = slot
            item = ftype[5:-1] if ftype.startswith("list<") else None
            if is_null:
                values.append(None)
            elif item is None:
                values.append(span.decode() if ftype == "str" else span)
            elif item == "int":
                values.append(list(struct.unpack(f"<{len(span) // int_size}{int_code}", span)))
            elif item in ("float", "float32"):
                code, size = _SCALAR[item]
                values.append(list(struct.unpack(f"<{len(span) // size}{code}", span)))
            elif item == "bool":
                values.append([b == 1 for b in span])
            else:
                values.append(msgpack.unpackb(span))
        else:
            values.append(None if is_null else slot)
    return version, values


def fmt_decode(value: bytes, definition: dict[str, Any]) -> Any:
    header, payload = value[0], value[1:]
    if header not in (0x10, 0x11, 0x12, 0x13, 0x20, 0x21):
        raise ValueError(f"bad header {header:#x}")
    if header & 1:
        payload = bytes(cramjam.snappy.decompress_raw(payload))
    if header & 2:
        return payload  # opaque
    schemas = {s["version"]: s for s in definition["schemas"]}
    latest = definition["schemas"][-1]
    if header & 0x20:
        version, values = fmt_fixed(payload, definition)
        fields = schemas[version]["fields"]
        record = {f["name"]: v for f, v in zip(fields, values, strict=True)}
    else:  # revision 1: a msgpack array
        items = msgpack.unpackb(payload, raw=False)
        version, stored_values = items[0], items[1:]
        fields = schemas[version]["fields"]
        record = {}
        for field, stored in zip(fields, stored_values, strict=True):
            value = stored
            if field.get("dictionary") and isinstance(stored, int):
                value = definition["dictionary"]["fields"][field["name"]][stored]
            record[field["name"]] = value
    for field in latest["fields"][len(fields) :]:
        record[field["name"]] = field.get("default")
    return record


def fmt_read_all(path: Path, dataset: str) -> tuple[dict[str, Any], dict[bytes, Any]]:
    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=2001, create=False)
    try:
        meta = env.open_db(b"meta", create=False)
        slots = [env.open_db(f"d/{dataset}/{i}".encode(), create=False) for i in (0, 1)]
        with env.begin() as txn:
            doc = msgpack.unpackb(txn.get(b"ds/" + dataset.encode(), db=meta), raw=False)
            definition = msgpack.unpackb(doc["definition"], raw=False)
            db = slots[doc["gen"] % 2]
            records = {bytes(k): fmt_decode(bytes(v), definition) for k, v in txn.cursor(db=db)}
        return doc, records
    finally:
        env.close()


def fmt_digest(records: dict[bytes, bytes]) -> tuple[int, int]:
    xor = 0
    for k, v in records.items():
        xor ^= xxhash.xxh3_128_intdigest(k + v, len(k))
    return len(records), xor


# --- the mirror under test ------------------------------------------------------


@pytest.fixture
def mirror_dir(tmp_path: Path) -> tuple[Path, OriginStore]:
    origin = OriginStore(tmp_path / "origin", durable=False)
    origin.create_dataset(DatasetSpec("up", seed_like_schema()))
    origin.create_dataset(DatasetSpec("blobs", None))
    origin.commit([WriteBatch("up", {b"u%03d" % i: seed_like_record(i) for i in range(150)})])
    origin.commit([WriteBatch("blobs", {b"a": b"x" * 300, b"b": b"\x00\xff"})])  # 'a' compresses
    # a schema evolution: old records decode with the new field's default
    v2 = Schema(2, (*seed_like_schema().fields, Field("segment", FieldType.STR, default="none")))
    origin.evolve_schema("up", v2)
    rec = dict(seed_like_record(7), segment="vip")
    origin.commit([WriteBatch("up", {b"u007": rec}, [b"u008"])])
    mirror = Mirror(tmp_path / "mirror", durable=False)
    for name in ("up", "blobs"):
        handle = mirror.ensure(name)
        sync = ReplicaSync(name, state=handle.state(), local=handle, rng=random.Random(1), now=0.0)
        LoopbackDriver(sync, handle, origin).run(0.0)
    mirror.close()
    return tmp_path / "mirror", origin


def origin_raw(origin: OriginStore, name: str) -> dict[bytes, bytes]:
    with origin.view(name) as view:
        return dict(view.scan(None, 10**9)[0])


def test_the_document_is_enough_to_read_the_mirror(mirror_dir: tuple[Path, OriginStore]) -> None:
    path, origin = mirror_dir
    doc, records = fmt_read_all(path, "up")
    info = origin.info("up")
    assert (bytes(doc["epoch"]), doc["version"]) == (info.cursor.epoch, info.cursor.version)
    codec = origin.codec("up")
    raw = origin_raw(origin, "up")
    assert set(records) == set(raw)
    assert records == {k: codec.decode(v) for k, v in raw.items()}
    assert records[b"u007"]["segment"] == "vip" and records[b"u001"]["segment"] == "none"
    assert fmt_digest(raw) == (info.digest.count, info.digest.xor)
    _, blobs = fmt_read_all(path, "blobs")
    assert blobs == {b"a": b"x" * 300, b"b": b"\x00\xff"}
    assert DatasetCodec(None).encode_opaque(b"x" * 300)[0] == 0x13  # the Snappy path was taken


def _mdb_dump(path: Path, subdb: str) -> dict[bytes, bytes]:
    out = subprocess.run(
        ["mdb_dump", "-s", subdb, str(path)], check=True, capture_output=True, text=True
    ).stdout
    lines = out.splitlines()
    body = lines[lines.index("HEADER=END") + 1 : lines.index("DATA=END")]
    pairs = [bytes.fromhex(line.strip()) for line in body]
    return dict(zip(pairs[0::2], pairs[1::2], strict=True))


@pytest.mark.skipif(
    shutil.which("mdb_dump") is None, reason="mdb_dump not installed (apt-get install lmdb-utils)"
)
def test_mdb_dump_reads_the_same_mirror(mirror_dir: tuple[Path, OriginStore]) -> None:
    path, origin = mirror_dir
    meta = _mdb_dump(path, "meta")
    doc = msgpack.unpackb(meta[b"ds/up"], raw=False)
    records = _mdb_dump(path, f"d/up/{doc['gen'] % 2}")
    assert records == origin_raw(origin, "up")
    definition = msgpack.unpackb(doc["definition"], raw=False)
    codec = origin.codec("up")
    assert {k: fmt_decode(v, definition) for k, v in records.items()} == {
        k: codec.decode(v) for k, v in records.items()
    }


@pytest.mark.skipif(
    shutil.which("mdb_dump") is None, reason="mdb_dump not installed (apt-get install lmdb-utils)"
)
def test_mdb_dump_reads_the_json_view(mirror_dir: tuple[Path, OriginStore]) -> None:
    """The JSON view as the document describes it: per key, a RESP bulk
    string of the record's JSON; ``json`` in the dataset record says it is
    built."""
    path, origin = mirror_dir
    mirror = Mirror(path, durable=False, json_views=["up"])
    while mirror.json_step("up"):
        pass
    mirror.close()
    meta = _mdb_dump(path, "meta")
    doc = msgpack.unpackb(meta[b"ds/up"], raw=False)
    assert doc["json"] == {"from": None, "rendering": RENDERING}
    rows = _mdb_dump(path, f"j/up/{doc['gen'] % 2}")
    codec = origin.codec("up")
    raw = origin_raw(origin, "up")
    assert set(rows) == set(raw)
    for key, row in rows.items():
        head, _, rest = row.partition(b"\r\n")
        assert head[:1] == b"$" and rest.endswith(b"\r\n")
        text = rest[:-2]
        assert int(head[1:]) == len(text)
        assert json.loads(text) == codec.decode(raw[key]), key
    assert msgpack.unpackb(meta[b"ds/blobs"], raw=False)["json"] is None
