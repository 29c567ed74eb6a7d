"""Local reads through ``sidecar.Reader`` against a mirror of seed-like records.

Figures (issue 5's targets):

- ``Reader.get`` with decoding (one field read, which decodes the record):
  median per call; target at most 2 us. Anchor: one raw LMDB ``txn.get`` of
  the same keys inside an open transaction (the floor any reader pays).
- ``Reader.get`` without touching a field (lazy record), same anchor.
- ``get_many`` of 1,000 keys (one transaction): target at most 1 ms.
- Per key against redis-py ``GET`` of the same stored bytes from a
  redis-server on a unix socket, started by this benchmark: target at least
  40 times faster (ratio = Reader time / redis-py time <= 1/40).

The mirror is built with the real sync machinery (origin store -> loopback
-> LMDB mirror) and closed before the reader opens it, as an app process
would; keys are drawn at random (seeded), so lookups walk the B-tree cold
and warm alike. Run alone: ``python -m benchmarks.bench_reader [--quick]``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, median_time
from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.replica import ReplicaSync
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore
from sidecar.mirror import Mirror
from sidecar.reader import Reader

DATASET = "user_profile"


def _key(i: int) -> bytes:
    return b"user:%08d" % i


def build_mirror(workdir: Path, n: int) -> Path:
    """An origin store with ``n`` seed-like records, synced into a mirror at
    ``workdir/mirror`` (closed on return)."""
    origin = OriginStore(workdir / "origin", durable=False)
    mirror = Mirror(workdir / "mirror", durable=False, map_size=1 << 30)
    try:
        origin.create_dataset(DatasetSpec(DATASET, seed_like_schema()))
        step = 20_000
        for start in range(0, n, step):
            batch = {_key(i): seed_like_record(i) for i in range(start, min(n, start + step))}
            origin.commit([WriteBatch(DATASET, batch)])
        handle = mirror.ensure(DATASET)
        sync = ReplicaSync(
            DATASET, state=handle.state(), local=handle, rng=random.Random(1), now=0.0
        )
        driver = LoopbackDriver(sync, handle, origin)
        info = origin.info(DATASET)
        sync.hint(Hint(DATASET, info.cursor, info.digest), 0.0)
        driver.run(0.0)
        if mirror.cursor(DATASET) != info.cursor:
            raise RuntimeError("the mirror did not converge")
    finally:
        mirror.close()
        origin.close()
    return workdir / "mirror"


@contextlib.contextmanager
def _redis_on_socket(workdir: Path) -> Any:
    import redis

    sock = workdir / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(sock))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def rows(quick: bool) -> list[Row]:
    n = 50_000 if quick else 1_000_000
    number = 20_000 if quick else 200_000
    repeat = 5 if quick else 9
    rng = random.Random(5)
    keys = [_key(rng.randrange(n)) for _ in range(1000)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    out: list[Row] = []
    try:
        path = build_mirror(tmp, n)
        with Reader(path) as reader:
            out += _reader_rows(reader, keys, n, number, repeat)
            if shutil.which("redis-server") is None:
                out.append(Row("redis-py GET per key (no redis-server on PATH)", 0.0, "us"))
            else:
                out += _redis_rows(reader, tmp, keys, number // 10, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reader_rows(reader: Reader, keys: list[bytes], n: int, number: int, repeat: int) -> list[Row]:
    # the anchor: raw lookups in one open transaction of the same environment
    first = reader.get(DATASET, keys[0])
    assert first is not None
    env = reader._env
    db = reader._cache[DATASET].db
    it = itertools.cycle(keys)

    with env.begin() as txn:
        get = txn.get
        floor = median_time(lambda: get(next(it), None, db), number=number, repeat=repeat)
    lazy = median_time(lambda: reader.get(DATASET, next(it)), number=number, repeat=repeat)

    def decoded() -> object:
        rec = reader.get(DATASET, next(it))
        assert rec is not None
        return rec["ctr_7d"]

    with_decoding = median_time(decoded, number=number, repeat=repeat)
    many = median_time(lambda: reader.get_many(DATASET, keys), number=max(20, number // 2000))

    def many_decoded() -> object:
        return [r["ctr_7d"] for r in reader.get_many(DATASET, keys) if r is not None]

    many_dec = median_time(many_decoded, number=max(20, number // 2000))
    us = 1e6
    label = f"{n:,} seed-like records"
    return [
        Row(
            f"Reader.get with decoding (one field), {label}",
            with_decoding * us,
            "us",
            floor * us,
            "raw LMDB txn.get",
            "<= 2 us",
            with_decoding * us <= 2,
        ),
        Row(
            f"Reader.get, lazy record (no field read), {label}",
            lazy * us,
            "us",
            floor * us,
            "raw LMDB txn.get",
        ),
        Row(
            "Reader.get_many, 1,000 keys, one transaction",
            many * 1e3,
            "ms",
            floor * 1000 * 1e3,
            "1,000 raw txn.get",
            "<= 1 ms",
            many * 1e3 <= 1,
        ),
        Row("Reader.get_many, 1,000 keys, one field read each", many_dec * 1e3, "ms"),
    ]


def _redis_rows(
    reader: Reader, tmp: Path, keys: list[bytes], number: int, repeat: int
) -> list[Row]:
    with _redis_on_socket(tmp) as client:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            rec = reader.get(DATASET, key)
            assert rec is not None
            pipe.set(key, rec.raw)
        pipe.execute()
        it = itertools.cycle(keys)
        remote = median_time(lambda: client.get(next(it)), number=number, repeat=repeat)

        def decoded() -> object:
            rec = reader.get(DATASET, next(it))
            assert rec is not None
            return rec["ctr_7d"]

        local = median_time(decoded, number=number * 10, repeat=repeat)
    ratio = local / remote
    return [
        Row(
            "Reader.get with decoding vs redis-py GET (raw bytes, unix socket), per key",
            local * 1e6,
            "us",
            remote * 1e6,
            "redis-py GET",
            ">= 40x faster (ratio <= 0.025)",
            ratio <= 1 / 40,
        )
    ]


if __name__ == "__main__":
    from benchmarks.__main__ import render

    print(render(rows("--quick" in sys.argv)))
