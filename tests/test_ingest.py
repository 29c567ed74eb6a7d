"""Write bodies decoded and encoded by ingest workers (``replicad/ingest.py``,
``replicad/ingest_pool.py``): the same bytes, the same errors and the same
dataset as encoding in the committer; and real worker processes behind a
real origin, which survive a killed worker and never outlive the origin."""

from __future__ import annotations

import gc
import json
import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio_parallel

from replicad.codec import DEFAULT_DICTIONARY_ENTRIES
from replicad.errors import (
    BadRequestError,
    FieldTypeError,
    ReplicadError,
    StaleEncodingError,
    UnknownFieldError,
)
from replicad.http_app import OriginApp
from replicad.http_body import HttpError, parse_batch, parse_write
from replicad.ingest import codec_for, prepare_write
from replicad.ingest_pool import IngestPool, open_ingest_pool
from replicad.origin_types import (
    DatasetSpec,
    EncodeFailure,
    EncodingBasis,
    PreEncoded,
    WriteBatch,
    WriteResult,
)
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType
from replicad.service import OriginService
from replicad.store import OriginStore
from tests.origin_proc import OriginProcess

SCHEMA = seed_like_schema()


def key(i: int) -> bytes:
    return b"user:%06d" % i


def records(start: int, n: int, *, new_cities: int = 0) -> dict[bytes, dict[str, Any]]:
    """Seed-like records; the first ``new_cities`` get a city the dictionary
    has never seen (so a worker must leave them to the committer)."""
    out = {key(i): seed_like_record(i) for i in range(start, start + n)}
    for j, rec in enumerate(out.values()):
        if j >= new_cities:
            break
        rec["city"] = f"new-city-{start}-{j}"
    return out


def body(upserts: dict[bytes, Any], deletes: list[bytes] | None = None) -> bytes:
    doc: dict[str, Any] = {"upserts": upserts}
    if deletes:
        doc["deletes"] = deletes
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def ok(result: WriteResult | ReplicadError) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


def same(a: WriteResult | ReplicadError, b: WriteResult | ReplicadError) -> bool:
    """The same outcome in two stores (whose epochs differ)."""
    x, y = ok(a), ok(b)
    return (x.cursor.version, x.digest, x.upserted, x.deleted, x.unchanged) == (
        y.cursor.version,
        y.digest,
        y.upserted,
        y.deleted,
        y.unchanged,
    )


def answer(resp: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = resp.json()
    doc.pop("epoch", None)
    return doc


def open_store(path: Path, schema: Any = SCHEMA) -> OriginStore:
    store = OriginStore(path, durable=False, map_size=64 << 20)
    store.create_dataset(DatasetSpec("up", schema))
    return store


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[OriginStore, OriginStore]]:
    """Two stores given the same writes: ``plain`` encodes in the committer,
    ``pre`` commits what :func:`prepare_write` made."""
    plain, pre = open_store(tmp_path / "plain"), open_store(tmp_path / "pre")
    yield plain, pre
    plain.close()
    pre.close()


def write_both(
    plain: OriginStore, pre: OriginStore, raw: bytes, *, replace: bool = False
) -> tuple[WriteResult | ReplicadError, WriteResult | ReplicadError, WriteBatch]:
    upserts, deletes = parse_write(raw, False, True, replace)
    batch = WriteBatch("up", upserts, deletes, replace=replace)
    prepared = prepare_write(pre.encoding_basis("up"), raw, False, replace)
    return plain.commit([batch])[0], pre.commit([prepared])[0], prepared


def assert_same(plain: OriginStore, pre: OriginStore, keys: list[bytes]) -> None:
    assert plain.info("up").digest == pre.info("up").digest
    assert plain.info("up").cursor.version == pre.info("up").cursor.version
    assert plain.codec("up").dictionary.to_json() == pre.codec("up").dictionary.to_json()
    for k in keys:
        assert plain.get("up", k)[0] == pre.get("up", k)[0], k


# ------------------------------------------------------------- same bytes


def test_pre_encoded_batches_give_the_same_dataset(
    pair: tuple[OriginStore, OriginStore],
) -> None:
    plain, pre = pair
    first = records(0, 500)
    a, b, prepared = write_both(plain, pre, body(first))
    assert same(a, b)
    assert prepared.pre_encoded is not None
    # the empty dictionary of a new dataset: records with strings are left
    assert len(prepared.upserts) == len(first)

    # now the dictionary knows the cities: only the 7 new ones are left
    second = records(400, 600, new_cities=7)
    a, b, prepared = write_both(plain, pre, body(second, deletes=[key(3), key(4)]))
    assert same(a, b)
    assert prepared.pre_encoded is not None
    assert list(prepared.upserts) == list(second)[:7]
    assert list(prepared.pre_encoded.records) == list(second)  # body order kept
    # keys 400..499 were written before: 93 the same, 7 with a new city
    assert (ok(b).upserted, ok(b).unchanged, ok(b).deleted) == (507, 93, 2)
    assert_same(plain, pre, [key(i) for i in range(1000)])

    # a replace batch: the whole dataset, changed keys only published
    whole = records(0, 300)
    whole[key(5)]["age"] = 99
    raw = msgpack.packb({"records": whole}, use_bin_type=True)
    a, b, _ = write_both(plain, pre, raw, replace=True)
    assert same(a, b)
    assert_same(plain, pre, [key(i) for i in range(1000)])


def test_an_older_definition_still_encodes_validly(
    pair: tuple[OriginStore, OriginStore],
) -> None:
    """Codes only ever get added: an encoding made before other writes grew
    the dictionary (a newer definition revision) is still the canonical one."""
    plain, pre = pair
    ok(plain.commit([WriteBatch("up", records(0, 50))])[0])
    ok(pre.commit([WriteBatch("up", records(0, 50))])[0])
    basis = pre.encoding_basis("up")
    raw = body(records(100, 50))
    prepared = prepare_write(basis, raw, False, False)
    grow = WriteBatch("up", records(200, 5, new_cities=5))
    ok(plain.commit([grow])[0])
    ok(pre.commit([grow])[0])
    assert pre.encoding_basis("up").meta_revision > basis.meta_revision
    a = plain.commit([WriteBatch("up", records(100, 50))])[0]
    b = pre.commit([prepared])[0]
    assert same(a, b)
    assert_same(plain, pre, [key(i) for i in range(300)])


def test_the_worker_codec_keeps_the_committed_dictionary(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        ok(store.commit([WriteBatch("up", records(0, 300))])[0])  # every city known
        basis = store.encoding_basis("up")
        before = codec_for(basis).dictionary.to_json()
        prepared = prepare_write(basis, body(records(500, 20, new_cities=10)), False, False)
        assert len(prepared.upserts) == 10
        assert codec_for(basis).dictionary.to_json() == before
        assert codec_for(basis) is codec_for(basis)  # cached per revision
    finally:
        store.close()


def test_opaque_datasets_and_json_bodies(tmp_path: Path) -> None:
    stores = []
    for name in ("plain", "pre"):
        s = OriginStore(tmp_path / name, durable=False, map_size=16 << 20)
        s.create_dataset(DatasetSpec("up", None, compress=True))
        stores.append(s)
    plain, pre = stores
    try:
        doc = {
            "upserts": {
                "a": "text value " * 40,  # long enough to be compressed
                "b": {"base64": "AAEC/w=="},
                "é": "",
            },
            "deletes": ["gone"],
        }
        raw = json.dumps(doc).encode()
        upserts, deletes = parse_write(raw, True, False, False)
        prepared = prepare_write(pre.encoding_basis("up"), raw, True, False)
        assert prepared.upserts == {}  # opaque values never wait for a dictionary
        assert same(
            plain.commit([WriteBatch("up", upserts, deletes)])[0], pre.commit([prepared])[0]
        )
        for k in (b"a", b"b", "é".encode()):
            assert plain.get("up", k)[0] == pre.get("up", k)[0]
        assert pre.get("up", b"b")[0] is not None
    finally:
        plain.close()
        pre.close()


def test_a_full_dictionary_field_spills_the_same_on_both_paths(
    pair: tuple[OriginStore, OriginStore],
) -> None:
    """Strings of a full field are stored inline. Full when the worker
    encodes: it spills them itself; full only by the commit (the worker's
    definition had room): it leaves the record and the committer spills."""
    plain, pre = pair
    cities = DEFAULT_DICTIONARY_ENTRIES
    fill = records(0, 300)  # the sample's 14 cities
    for i in range(cities - 16):  # all but two places taken
        fill[key(1000 + i)] = rec = seed_like_record(i)
        rec["city"] = f"c{i}"
    items = list(fill.items())
    for store in pair:
        for start in range(0, len(items), 20_000):
            ok(store.commit([WriteBatch("up", dict(items[start : start + 20_000]))])[0])
    room = cities - len(pre.codec("up").dictionary.strings("city"))
    assert room == 2
    basis = pre.encoding_basis("up")  # the field has room in this definition
    late = records(100_000, 10)
    late[key(100_000)]["city"] = "brand-new"
    prepared = prepare_write(basis, body(late), False, False)
    assert list(prepared.upserts) == [key(100_000)]
    # another writer fills the field before this batch commits
    top = {key(200_000 + i): seed_like_record(i) for i in range(room)}
    for i, rec in enumerate(top.values()):
        rec["city"] = f"top{i}"
    for store in pair:
        ok(store.commit([WriteBatch("up", top)])[0])
        assert store.codec("up").dictionary.is_full("city")
    a = plain.commit([WriteBatch("up", records(100_000, 10) | {key(100_000): late[key(100_000)]})])[
        0
    ]
    assert same(a, pre.commit([prepared])[0])
    # full in the worker's definition too: it spills without leaving anything
    spilled = records(300_000, 5, new_cities=5)
    a, b, prepared = write_both(plain, pre, body(spilled))
    assert same(a, b) and prepared.upserts == {}
    assert_same(plain, pre, [*fill, *top, *late, *spilled])


def test_codecs_are_cached_per_store_and_extended_in_place(tmp_path: Path) -> None:
    one, two = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    try:
        ok(one.commit([WriteBatch("up", records(0, 300))])[0])
        ok(two.commit([WriteBatch("up", records(0, 1, new_cities=1))])[0])
        codec = codec_for(one.encoding_basis("up"))
        other = codec_for(two.encoding_basis("up"))
        assert codec is not other  # same dataset name, other store
        assert other.dictionary.to_json() == two.codec("up").dictionary.to_json()
        ok(one.commit([WriteBatch("up", records(400, 10, new_cities=4))])[0])
        grown = one.encoding_basis("up")
        assert codec_for(grown) is codec  # extended, not rebuilt
        assert codec.dictionary.to_json() == one.codec("up").dictionary.to_json()
        evolved = SCHEMA.evolve([Field("score", FieldType.FLOAT, nullable=True)])
        one.evolve_schema("up", evolved)
        rebuilt = codec_for(one.encoding_basis("up"))
        assert rebuilt is not codec and rebuilt.schema == evolved
    finally:
        one.close()
        two.close()


def test_a_cached_codec_is_extended_only_by_a_definition_that_extends_it(
    tmp_path: Path,
) -> None:
    """Definitions crafted around one cached codec: only the one that keeps
    every cached string at its code and adds others extends it in place;
    every other gets a codec built from scratch, holding exactly its own
    dictionary; an older revision reuses the newer codec."""
    store = open_store(tmp_path / "s")
    try:
        ok(store.commit([WriteBatch("up", records(0, 300))])[0])
        real = store.encoding_basis("up")
    finally:
        store.close()
    doc = msgpack.unpackb(real.definition, raw=False)
    cities = doc["dictionary"]["fields"]["city"]
    revision = iter(range(10, 100))

    def basis(city: list[str]) -> EncodingBasis:
        d = json.loads(json.dumps(doc))
        d["dictionary"]["fields"]["city"] = city
        definition = msgpack.packb(d, use_bin_type=True)
        return EncodingBasis("crafted", "up", next(revision), definition, True)

    def exact(codec: Any, b: EncodingBasis) -> bool:
        shipped = msgpack.unpackb(b.definition, raw=False)["dictionary"]
        return bool(codec.dictionary.to_json() == shipped)

    first = basis(cities)
    codec = codec_for(first)
    grown = basis([*cities, "new-1", "new-2"])
    assert codec_for(grown) is codec and exact(codec, grown)
    assert codec_for(first) is codec  # an older revision: the newer codec
    for wrong in (
        basis(["other", *cities[1:], "new-1", "new-2", "new-3"]),  # a code changed
        basis([*cities, "new-x", "new-2", "new-3"]),  # a later code changed
        basis(cities[:-1]),  # shrank
    ):
        rebuilt = codec_for(wrong)
        assert rebuilt is not codec and exact(rebuilt, wrong)
        codec = rebuilt
    # a field only the cache has (the sizes would add up without it)
    start = basis(cities)
    codec = codec_for(start)
    d = msgpack.unpackb(start.definition, raw=False)
    dropped = d["dictionary"]["fields"].pop("os")
    d["dictionary"]["fields"]["city"] = [*cities, *(f"pad-{i}" for i in range(len(dropped)))]
    without = EncodingBasis("crafted", "up", next(revision), msgpack.packb(d), True)
    rebuilt = codec_for(without)
    assert rebuilt is not codec and exact(rebuilt, without)


def test_a_bad_record_fails_the_batch_with_the_same_error(
    pair: tuple[OriginStore, OriginStore],
) -> None:
    plain, pre = pair
    ok(plain.commit([WriteBatch("up", records(0, 300))])[0])  # every city known
    ok(pre.commit([WriteBatch("up", records(0, 300))])[0])
    bad = records(1000, 40)
    list(bad.values())[12]["age"] = "old"  # the first bad record...
    list(bad.values())[30]["colour"] = "red"  # ...and a later one
    a, b, prepared = write_both(plain, pre, body(bad))
    assert isinstance(a, FieldTypeError) and isinstance(b, FieldTypeError)
    assert str(a) == str(b)
    assert list(prepared.upserts) == [list(bad)[12], list(bad)[30]]
    assert pre.info("up").cursor.version == plain.info("up").cursor.version == 1
    assert pre.get("up", key(1000))[0] is None
    # the later error alone, also the same
    del bad[list(bad)[12]]
    a, b, _ = write_both(plain, pre, body(bad))
    assert isinstance(a, UnknownFieldError) and str(a) == str(b)


def test_a_failed_record_travels_back_as_its_error(tmp_path: Path) -> None:
    """A record the worker cannot encode is not shipped back (a deeply
    nested one could not even be pickled); its error is, and the committer
    raises it in its turn."""
    store = open_store(tmp_path / "s")
    try:
        deep: Any = 1
        for _ in range(900):
            deep = [deep]
        bad = records(0, 5)
        list(bad.values())[2]["tags"] = deep
        prepared = prepare_write(store.encoding_basis("up"), body(bad), False, False)
        failure = prepared.upserts[key(2)]
        assert isinstance(failure, EncodeFailure)
        assert isinstance(failure.error, FieldTypeError)
        again = pickle.loads(pickle.dumps(prepared))  # what crosses the pipe
        result = store.commit([again])[0]
        assert isinstance(result, FieldTypeError) and str(result) == str(failure.error)
        assert store.info("up").cursor.version == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2]),
        msgpack.packb({"upserts": [1]}),
        msgpack.packb({"upserts": {}, "extra": 1}),
        msgpack.packb({"upserts": {b"k": 5}}),
        msgpack.packb({"upserts": {5: {}}}),
        msgpack.packb({"upserts": {b"k": {"age": 1}}, "deletes": [b"k"]}, use_bin_type=True),
        msgpack.packb({"deletes": "k"}),
    ],
)
def test_malformed_bodies_get_the_in_process_message(tmp_path: Path, raw: bytes) -> None:
    store = open_store(tmp_path / "s")
    try:
        with pytest.raises(HttpError) as in_process:
            parse_write(raw, False, True, False)
        with pytest.raises(HttpError) as in_worker:
            prepare_write(store.encoding_basis("up"), raw, False, False)
        assert in_worker.value.status == in_process.value.status == 400
        assert in_worker.value.message == in_process.value.message
        again = pickle.loads(pickle.dumps(in_worker.value))  # crosses processes
        assert (again.status, again.code, again.message) == (400, "bad_request", again.message)
        assert again.message == in_process.value.message
    finally:
        store.close()


def test_an_evolved_schema_makes_the_encoding_stale(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        ok(store.commit([WriteBatch("up", records(0, 10))])[0])
        prepared = prepare_write(store.encoding_basis("up"), body(records(20, 10)), False, False)
        evolved = SCHEMA.evolve([Field("score", FieldType.FLOAT, nullable=True)])
        store.evolve_schema("up", evolved)
        result = store.commit([prepared])[0]
        assert isinstance(result, StaleEncodingError)
        assert "schema version 1" in str(result)
        assert store.info("up").cursor.version == 1
        assert store.get("up", key(20))[0] is None
    finally:
        store.close()


def test_pre_encoded_records_must_match_the_upserts(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        basis = store.encoding_basis("up")
        missing = PreEncoded(basis.meta_revision, 1, {b"k": None})  # never filled in
        result = store.commit([WriteBatch("up", {}, (), pre_encoded=missing)])[0]
        assert isinstance(result, BadRequestError)
        extra = PreEncoded(basis.meta_revision, 1, {})
        result = store.commit(
            [WriteBatch("up", {b"k": seed_like_record(1)}, (), pre_encoded=extra)]
        )[0]
        assert isinstance(result, BadRequestError)
        assert store.info("up").cursor.version == 0
    finally:
        store.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collection_is_left_as_it_was(tmp_path: Path, enabled: bool) -> None:
    store = open_store(tmp_path / "s")
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        prepare_write(store.encoding_basis("up"), body(records(0, 5)), False, False)
        assert gc.isenabled() is enabled
        (gc.enable if enabled else gc.disable)()
        with pytest.raises(HttpError):
            prepare_write(store.encoding_basis("up"), b"\xc1", False, False)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
        store.close()


async def test_a_schema_evolved_during_the_encoding_is_encoded_again(tmp_path: Path) -> None:
    """The worker encodes with schema version 1; the schema evolves before
    the commit; the store refuses the stale bytes and the app encodes the
    body again in process (the write succeeds, at version 2)."""
    store = OriginStore(tmp_path / "s", durable=False, map_size=64 << 20)
    service = OriginService(store)
    evolved = SCHEMA.evolve([Field("score", FieldType.FLOAT, nullable=True)])

    class EvolvingPool(IngestPool):
        async def prepare(
            self, basis: EncodingBasis, body: bytes, is_json: bool, replace: bool
        ) -> WriteBatch | None:
            batch = await super().prepare(basis, body, is_json, replace)
            await service.evolve_schema("up", evolved)
            return batch

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await service.create_dataset(DatasetSpec("up", SCHEMA))
            ok(await service.write(WriteBatch("up", records(0, 300))))
            async with trio_parallel.open_worker_context() as context:
                app = OriginApp(service, ingest=EvolvingPool(context, 1, 1))
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    resp = await client.post(
                        "/v1/datasets/up/batch",
                        content=body(records(1000, 50)),
                        headers={"content-type": "application/msgpack"},
                    )
            nursery.cancel_scope.cancel()
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == 2
        metrics = service.registry.render()
        assert 'replicad_ingest_jobs_total{outcome="fallback"} 1' in metrics
        raw, _ = store.get("up", key(1000))
        assert raw == store.codec("up").encode(records(1000, 1)[key(1000)])  # version 2
        assert store.codec("up").schema == evolved
    finally:
        service.close()


async def test_workers_that_cannot_start_leave_every_body_to_the_origin(tmp_path: Path) -> None:
    """A process limit (EAGAIN) when a worker starts: warming up logs it,
    a job falls back; neither takes the origin down."""

    class NoProcesses:
        async def run_sync(self, *args: Any, **kwargs: Any) -> Any:
            raise BlockingIOError(11, "Resource temporarily unavailable")

    pool = IngestPool(NoProcesses(), 2, 1)
    await pool.warm()
    store = open_store(tmp_path / "s")
    try:
        assert await pool.prepare(store.encoding_basis("up"), b"\x80", False, False) is None
    finally:
        store.close()


async def test_a_pool_whose_workers_run_other_code_stops_using_them(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        async with trio_parallel.open_worker_context() as context:
            pool = IngestPool(context, 1, 1, tag="an older origin")
            raw = body(records(0, 5))
            assert pool.wants(raw)
            assert await pool.prepare(store.encoding_basis("up"), raw, False, False) is None
            assert pool.disabled and not pool.wants(raw)
    finally:
        store.close()


async def test_shutdown_keeps_the_error_the_server_leaves_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker killed under the pool makes its shutdown fail: a warning
    when the block ends normally; when it ends with an error, that error is
    the one that comes out."""

    async def kill_the_workers(pool: IngestPool | None) -> None:
        assert pool is not None
        await pool.warm()
        killed = workers(os.getpid())
        assert killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda p=pid: not alive(p))

    with caplog.at_level("WARNING", logger="replicad.ingest"):
        async with open_ingest_pool(1, 1) as pool:
            await kill_the_workers(pool)
    assert "ended abnormally at shutdown" in caplog.text
    caplog.clear()
    with pytest.raises(ValueError, match="the server's own error"):
        async with open_ingest_pool(1, 1) as pool:
            await kill_the_workers(pool)
            raise ValueError("the server's own error")
    assert "ended abnormally at shutdown" in caplog.text


def test_json_records_nested_too_deeply_are_a_400() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    doc = {"upserts": {"k": {"tags": deep}}}  # as json.loads would give it
    with pytest.raises(HttpError) as err:
        parse_batch(doc, True, True)
    assert err.value.status == 400 and "nested too deeply" in err.value.message


# ------------------------------------------------------------- real processes


def workers(pid: int) -> list[int]:
    """The live worker processes of the origin ``pid`` (from /proc; its
    other child is multiprocessing's resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def ingest_jobs(client: httpx.Client, outcome: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f'replicad_ingest_jobs_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def post_batch(client: httpx.Client, raw: bytes) -> httpx.Response:
    return client.post(
        "/v1/datasets/up/batch", content=raw, headers={"content-type": "application/msgpack"}
    )


@pytest.fixture
def origins(tmp_path: Path) -> Iterator[tuple[OriginProcess, OriginProcess]]:
    """An origin sending every body of 1 KiB or more to a worker, and one
    without workers."""
    with (
        OriginProcess(
            tmp_path / "workers",
            max_body_mb=16,
            extra_config="ingest_workers = 1\ningest_offload_kb = 1",
        ) as pooled,
        OriginProcess(tmp_path / "none", max_body_mb=8, extra_config="ingest_workers = 0") as solo,
    ):
        for origin in (pooled, solo):
            httpx.post(
                origin.base_url + "/v1/datasets",
                json={"name": "up", "schema": SCHEMA.to_json()},
            ).raise_for_status()
        yield pooled, solo


def test_an_origin_with_workers_commits_what_one_without_does(
    origins: tuple[OriginProcess, OriginProcess],
) -> None:
    pooled, solo = origins
    with (
        httpx.Client(base_url=pooled.base_url, timeout=60) as p,
        httpx.Client(base_url=solo.base_url, timeout=60) as s,
    ):
        # two bodies of ~700 KB for the worker, one of ~350 bytes kept in process
        batches = [records(0, 2000), records(1500, 2000, new_cities=3), records(4000, 1)]
        for batch in batches:
            raw = body(batch, deletes=[key(1), key(999_999)] if len(batch) == 1 else None)
            a, b = post_batch(p, raw), post_batch(s, raw)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert answer(a) == answer(b)
        assert ingest_jobs(p, "committed") == 2
        assert ingest_jobs(s, "committed") == 0
        assert len(workers(pooled.proc_pid)) == 1  # the one worker
        assert workers(solo.proc_pid) == []

        bad = records(9000, 2000)
        list(bad.values())[1500]["age"] = "old"
        for raw in (body(bad), b"\xc1" * 5000, msgpack.packb({"upserts": [0] * 3000})):
            a, b = post_batch(p, raw), post_batch(s, raw)
            assert a.status_code == b.status_code == 400
            assert a.json() == b.json()
        assert ingest_jobs(p, "rejected") == 3
        for client in (p, s):
            info = client.get("/v1/datasets/up").json()
            assert info["version"] == 3
        assert (
            p.get("/v1/datasets/up").json()["digest"] == s.get("/v1/datasets/up").json()["digest"]
        )


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_worker_killed_mid_job_costs_no_write_and_workers_end_with_the_origin(
    origins: tuple[OriginProcess, OriginProcess],
) -> None:
    import threading

    pooled, _ = origins
    with httpx.Client(base_url=pooled.base_url, timeout=60) as p:
        big = body(records(0, 15_000))  # about 5 MB: a worker needs ~0.1 s
        killed_mid_job = False
        tries = 0
        while tries < 5:
            tries += 1
            (worker,) = workers(pooled.proc_pid)
            before = cpu_ticks(worker)
            answers: list[httpx.Response] = []
            poster = threading.Thread(target=lambda out=answers: out.append(post_batch(p, big)))
            poster.start()
            busy = wait_until(lambda w=worker, b=before: cpu_ticks(w) >= b + 2, timeout=10)
            if busy and not answers:
                os.kill(worker, signal.SIGKILL)
            poster.join()
            assert answers[0].status_code == 200, answers[0].text
            if ingest_jobs(p, "fallback") == 1:
                killed_mid_job = True
                break
            assert wait_until(lambda: len(workers(pooled.proc_pid)) == 1)
        assert killed_mid_job, "the worker always finished before it could be killed"
        assert p.get("/v1/datasets/up").json()["version"] == tries
        assert p.get("/v1/datasets/up").json()["records"] == 15_000
        r = post_batch(p, body(records(20_000, 1000)))  # a new worker takes it
        assert r.status_code == 200, r.text
        assert ingest_jobs(p, "committed") == tries
        assert wait_until(lambda: len(workers(pooled.proc_pid)) == 1)
        (new_worker,) = workers(pooled.proc_pid)
    pooled.kill9()  # no shutdown work at all: the worker must notice alone
    assert wait_until(lambda: not alive(new_worker), timeout=20)


def test_json_and_replace_bodies_through_a_worker(
    origins: tuple[OriginProcess, OriginProcess],
) -> None:
    pooled, solo = origins
    doc = {
        "upserts": {
            f"user:{i}": {**seed_like_record(i), "city": f"json-{i % 3}"} for i in range(40)
        },
        "deletes": ["user:999"],
    }
    whole = msgpack.packb(
        {"records": records(0, 30) | {b"user:new": seed_like_record(5)}}, use_bin_type=True
    )
    with (
        httpx.Client(base_url=pooled.base_url, timeout=60) as p,
        httpx.Client(base_url=solo.base_url, timeout=60) as s,
    ):
        for client in (p, s):
            r = client.post("/v1/datasets/up/batch", json=doc)
            assert r.status_code == 200, r.text
            r = client.post(
                "/v1/datasets/up/replace",
                content=whole,
                headers={"content-type": "application/msgpack"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["deleted"] == 40  # the JSON batch's keys
        assert ingest_jobs(p, "committed") == 2
        x, y = p.get("/v1/datasets/up").json(), s.get("/v1/datasets/up").json()
        assert (x["version"], x["records"], x["digest"]) == (
            y["version"],
            y["records"],
            y["digest"],
        )


def test_a_graceful_stop_ends_the_workers(
    origins: tuple[OriginProcess, OriginProcess],
) -> None:
    pooled, _ = origins
    with httpx.Client(base_url=pooled.base_url, timeout=60) as p:
        assert post_batch(p, body(records(0, 1000))).status_code == 200
        (worker,) = workers(pooled.proc_pid)
    assert pooled.stop() == 0
    assert wait_until(lambda: not alive(worker), timeout=10)


def test_mutated_bodies_get_the_same_answer_with_and_without_workers(
    origins: tuple[OriginProcess, OriginProcess],
) -> None:
    """A differential fuzz of the worker path: valid bodies with a few bytes
    changed, sent to both origins, get the same status and the same answer
    (an error's message, or a commit that leaves both datasets equal)."""
    import random

    pooled, solo = origins
    rng = random.Random(20261206)
    base = body(records(0, 60, new_cities=2), deletes=[key(500)])
    statuses = set()
    with (
        httpx.Client(base_url=pooled.base_url, timeout=60) as p,
        httpx.Client(base_url=solo.base_url, timeout=60) as s,
    ):
        for _ in range(40):
            raw = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            a, b = post_batch(p, bytes(raw)), post_batch(s, bytes(raw))
            assert a.status_code == b.status_code, (a.text, b.text)
            assert answer(a) == answer(b)
            assert a.status_code in (200, 400), a.text
            statuses.add(a.status_code)
        committed, rejected = ingest_jobs(p, "committed"), ingest_jobs(p, "rejected")
        assert committed + rejected == 40 and ingest_jobs(p, "fallback") == 0
        x, y = p.get("/v1/datasets/up").json(), s.get("/v1/datasets/up").json()
        assert (x["version"], x["digest"]) == (y["version"], y["digest"])
    assert statuses == {200, 400}  # both kinds of outcome were exercised
