"""The zero-copy reader over a mirror kept by the real sync machinery."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from replicad.codec import DatasetCodec
from replicad.errors import StorageError, UnknownDatasetError
from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync, SyncConfig
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore
from sidecar import Reader, StaleDataError
from sidecar.mirror import Mirror
from tests.procs import run_python


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


class Setup:
    def __init__(self, tmp: Path, *, map_size: int = 1 << 30) -> None:
        self.origin = OriginStore(tmp / "origin", durable=False)
        self.origin.create_dataset(DatasetSpec("up", seed_like_schema()))
        self.origin.create_dataset(DatasetSpec("blobs", None))
        ok(
            self.origin.commit(
                [WriteBatch("up", {b"u%03d" % i: seed_like_record(i) for i in range(200)})]
            )[0]
        )
        ok(self.origin.commit([WriteBatch("blobs", {b"b1": b"hello", b"b2": b"\x00\x01"})])[0])
        self.mirror = Mirror(tmp / "mirror", durable=False, map_size=map_size)
        self.drivers = {}
        for name in ("up", "blobs"):
            handle = self.mirror.ensure(name)
            sync = ReplicaSync(
                name,
                state=handle.state(),
                local=handle,
                rng=random.Random(1),
                now=0.0,
                config=SyncConfig(snapshot_chunk=64),
            )
            self.drivers[name] = LoopbackDriver(sync, handle, self.origin)
        self.sync()

    def sync(self, now: float = 0.0) -> None:
        for name, driver in self.drivers.items():
            info = self.origin.info(name)
            driver.sync.hint(Hint(name, info.cursor, info.digest), now)
            driver.run(now)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_get_fields_and_consistent_batches(setup: Setup, tmp_path: Path) -> None:
    with Reader.over(setup.mirror) as reader:
        rec = reader.get("up", b"u007")
        assert rec is not None
        expected = seed_like_record(7)
        codec = DatasetCodec([seed_like_schema()])
        want = codec.decode(codec.encode(expected))  # float32 rounding
        # one-field reads of an undecoded record (the fixed layout), every field
        fresh = reader.get("up", b"u007")
        assert fresh is not None
        assert {name: fresh[name] for name in want} == want
        tags = fresh["tags"]  # a list: decoded once, kept
        assert fresh["tags"] is tags and tags == want["tags"]
        assert rec.to_dict() == want
        assert rec["age"] == expected["age"] and rec["city"] == expected["city"]
        assert rec[0] == rec.values[0]
        assert rec.get("no_such_field", 42) == 42
        with pytest.raises(KeyError):
            rec["no_such_field"]
        assert rec.cursor == setup.origin.info("up").cursor
        assert reader.get("up", b"missing") is None
        many = reader.get_many("up", [b"u001", b"nope", b"u199"])
        assert [r is not None for r in many] == [True, False, True]
        assert reader.version("up") == setup.origin.info("up").cursor
        assert sorted(reader.datasets()) == ["blobs", "up"]
        blob = reader.get("blobs", b"b2")
        assert blob is not None and blob.value == b"\x00\x01"
        with reader.snapshot() as snap:
            raw = snap.raw("up", b"u007")
            assert raw is not None and bytes(raw) == rec.raw
            # zero-copy: a view of the memory map, not of a bytes copy
            assert raw.readonly and not isinstance(raw.obj, bytes | bytearray)
            kept = snap.get("up", b"u007")
            kept_many = snap.get_many("up", iter([b"u008", b"", b"u009"]))
            # a key no record can have (empty) is a miss on every path
            assert snap.get("up", b"") is None and snap.raw("up", b"") is None
            assert snap.count("up") == 200
            assert snap.keys("up", b"u19", limit=3) == [b"u190", b"u191", b"u192"]
            assert snap.version("up") == rec.cursor
            fetched = snap.fetcher("up")  # get's parts, once for many keys
            assert fetched is not None
            get, codec, cursor = fetched
            stored = get(b"u007")
            assert stored is not None
            assert (bytes(stored), cursor) == (rec.raw, rec.cursor)
            assert codec.decode(stored) == rec.to_dict()
            assert get(b"missing") is None
            with pytest.raises(UnknownDatasetError):
                snap.fetcher("nope")
        with pytest.raises(UnknownDatasetError):
            reader.get("nope", b"x")
        with reader.snapshot(buffers=False) as copies:  # what the socket workers read with
            raw = copies.raw("up", b"u007")
            assert raw is not None and isinstance(raw.obj, bytes) and bytes(raw) == rec.raw
            fetched = copies.fetcher("up")
            assert fetched is not None and isinstance(fetched[0](b"u007"), bytes)
            copied = copies.get_many("up", [b"u008"])[0]
            assert copied is not None and isinstance(copied.raw, bytes)
        # records read in a snapshot hold their own bytes after it ended
        assert kept is not None and isinstance(kept.raw, bytes) and kept.to_dict() == rec.to_dict()
        assert kept_many[1] is None
        fresh8 = reader.get("up", b"u008")
        assert kept_many[0] is not None and fresh8 is not None
        assert isinstance(kept_many[0].raw, bytes) and kept_many[0].raw == fresh8.raw
        assert reader.get("up", b"") is None
        assert [r is None for r in reader.get_many("up", [b"", b"u001"])] == [True, False]


def test_reader_follows_new_versions_and_generations(setup: Setup, tmp_path: Path) -> None:
    with Reader.over(setup.mirror) as reader:
        before = reader.version("up")
        ok(setup.origin.commit([WriteBatch("up", {b"u001": seed_like_record(500)})])[0])
        setup.sync(1.0)
        rec = reader.get("up", b"u001")
        assert rec is not None and rec["age"] == seed_like_record(500)["age"]
        assert reader.version("up") != before
        # a re-snapshot flips the generation; the reader follows it
        setup.origin.reset_history("up")
        new = {b"z%03d" % i: seed_like_record(i) for i in range(5)}
        ok(setup.origin.commit([WriteBatch("up", new, replace=True)])[0])
        setup.sync(2.0)
        assert reader.get("up", b"u001") is None
        assert reader.get("up", b"z001") is not None
        assert reader.wait_for("up", setup.origin.info("up").cursor.version, timeout=0.1)
        assert not reader.wait_for("up", 10**9, timeout=0.05)


def test_staleness_flag_and_refusal(setup: Setup, tmp_path: Path) -> None:
    now = [10**10]
    with Reader.over(setup.mirror, max_staleness=5.0, clock=lambda: now[0]) as reader:
        rec = reader.get("up", b"u001")
        assert rec is not None and rec.stale
    with (
        Reader.over(setup.mirror, max_staleness=5.0, refuse_stale=True, clock=lambda: now[0]) as r,
        pytest.raises(StaleDataError),
    ):
        r.get("up", b"u001")
    with (
        Reader.over(setup.mirror, max_staleness=5.0, refuse_stale=True, clock=lambda: now[0]) as r,
        r.snapshot() as snap,
    ):
        fetched = snap.fetcher("up")  # as lookup: absent is None, present refused
        assert fetched is not None
        assert fetched[0](b"missing") is None and snap.get("up", b"missing") is None
        with pytest.raises(StaleDataError):
            fetched[0](b"u001")
    with Reader.over(setup.mirror, max_staleness=1e12) as reader:
        rec = reader.get("up", b"u001")
        assert rec is not None and not rec.stale


def test_missing_mirror_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open the mirror"):
        Reader(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    ("reader_map", "resizes_expected"),
    [(None, 0), (1 << 20, 1)],  # default: maps ahead, never resizes; small: adopts the growth
)
def test_a_reader_process_survives_map_growth(
    tmp_path: Path, reader_map: int | None, resizes_expected: int
) -> None:
    setup = Setup(tmp_path, map_size=256 << 10)
    option = "" if reader_map is None else f", map_size={reader_map}"
    script = textwrap.dedent(
        f"""
        import sys, time
        from sidecar.reader import Reader
        r = Reader({str(tmp_path / "mirror")!r}{option})
        print(r.version("blobs").version, flush=True)
        sys.stdin.readline()
        rec = r.get("blobs", b"big059")
        print(r.version("blobs").version, len(rec.value), r.resizes, flush=True)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            first = int(proc.stdout.readline())
            # grow the writer's map from 256 KiB past 10 MiB while the
            # reader is open
            rng = random.Random(9)
            for i in range(60):
                ok(
                    setup.origin.commit(
                        [WriteBatch("blobs", {b"big%03d" % i: rng.randbytes(250_000)})]
                    )[0]
                )
            setup.sync(5.0)
            out, _ = proc.communicate("go\n", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        version, size, resizes = out.split()
        assert int(version) > first and int(size) == 250_000
        assert int(resizes) == resizes_expected
        assert proc.returncode == 0


def test_a_snapshot_never_uses_handles_opened_after_it_began(setup: Setup) -> None:
    """LMDB refuses a database handle in a transaction that began before
    the handle was opened: a snapshot that meets a dataset whose handles
    another snapshot opened meanwhile says it appeared after it began (or,
    having read nothing yet, begins again) instead of an LMDB error."""
    with Reader.over(setup.mirror) as reader:
        setup.mirror.ensure("late")  # exists before the snapshots below
        with reader.snapshot() as older:
            assert older.version("up") is not None
            with reader.snapshot() as newer:
                assert newer.raw("late", b"k") is None  # opens its handles
            with pytest.raises(UnknownDatasetError, match="appeared after"):
                older.raw("late", b"k")
        with reader.snapshot() as fresh:
            assert fresh.raw("late", b"k") is None


def test_a_threads_cached_transaction_never_uses_handles_opened_after_it_began(
    setup: Setup, tmp_path: Path
) -> None:
    """``Reader.get`` reuses one transaction per thread: a dataset whose
    handles another thread opened after that transaction began is read in
    a new one, not with handles LMDB refuses there."""
    setup.mirror.close()
    path = tmp_path / "mirror"
    reader = Reader(path)
    # a dataset the reader has not met: registered by a sidecar process
    script = "import sys; from sidecar.mirror import Mirror; Mirror(sys.argv[1]).ensure('late')"
    run_python(script, str(path))
    step = threading.Event()
    done = threading.Event()
    seen: list[object] = []

    def thread_a() -> None:
        try:
            assert reader.get("up", b"u001") is not None  # its transaction begins
            step.set()
            done.wait(10)
            seen.append(reader.get("late", b"k"))  # late's handles are newer
        except BaseException as exc:
            seen.append(exc)

    a = threading.Thread(target=thread_a)
    a.start()
    try:
        assert step.wait(10)
        assert reader.get("late", b"k") is None  # this thread opens late's handles
    finally:
        done.set()
        a.join(10)
        reader.close()
    assert seen == [None]
