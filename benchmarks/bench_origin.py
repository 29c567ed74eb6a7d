"""The origin's figures: ingest, start-up, diff serving, snapshot streaming.

Workload: seed-like user profiles (``replicad/sample.py``), 1,000,000 records
(``--quick``: 50,000) in a durable store (fsync on every commit) in a temporary
directory.

* ingest through the store (group commits of 10,000-record batches) and
  through the HTTP msgpack API of a real ``replicad serve`` process on
  loopback (10,000-record batches from 2 concurrent clients; the median of
  three runs, each on a new server);
* start-up of a store holding the records: with the Merkle tree saved at a
  clean shutdown, and after a crash (tree and leaf index rebuilt from the records);
* a diff of 1,000 changed keys served from the store (read transaction,
  version queue, record reads, response, frame encoding);
* the snapshot stream, frames included, in MB/s of frame bytes.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack

from benchmarks.common import Row
from benchmarks.procs import free_port
from replicad.frames import encode_frame
from replicad.messages import Cursor, DiffRequest, SnapshotRequest, to_wire
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore

BATCH = 10_000
HTTP_RUNS = 3
"""HTTP ingest runs (a fresh server and directory each); the row is their median."""


def _key(i: int) -> bytes:
    return b"user:%08d" % i


def _batches(n: int) -> list[dict[bytes, dict[str, object]]]:
    return [
        {_key(i): seed_like_record(i) for i in range(s, min(n, s + BATCH))}
        for s in range(0, n, BATCH)
    ]


def _ingest_store(path: Path, batches: list[dict[bytes, dict[str, object]]]) -> float:
    store = OriginStore(path, durable=True, map_size=4 << 30)
    store.create_dataset(DatasetSpec("up", seed_like_schema()))
    start = time.perf_counter()
    for b in batches:
        store.commit([WriteBatch("up", b)])
    elapsed = time.perf_counter() - start
    store.close()
    return sum(map(len, batches)) / elapsed


def _startup(path: Path, *, saved: bool) -> float:
    if not saved:  # simulate a crash: drop the saved trees
        import lmdb

        env = lmdb.open(str(path / "origin.lmdb"), max_dbs=4000)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.delete(b"tree/up", db=meta)
            txn.delete(b"clean", db=meta)  # no clean close: the leaf index is rebuilt too
        env.close()
    start = time.perf_counter()
    store = OriginStore(path, durable=True)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


def _diff_serving(path: Path, n: int) -> float:
    store = OriginStore(path, durable=True)
    since = store.info("up").cursor
    changed = {_key(i * (n // 1000)): seed_like_record(i + 7) for i in range(1000)}
    store.commit([WriteBatch("up", changed)])
    req = DiffRequest("up", Cursor(since.epoch, since.version))
    times = []
    for _ in range(15):
        start = time.perf_counter()
        resp = store.answer(req)
        encode_frame(*to_wire(resp))
        times.append(time.perf_counter() - start)
    store.close()
    return statistics.median(times)


def _snapshot_rate(path: Path) -> float:
    store = OriginStore(path, durable=True)
    rates = []
    for _ in range(3):
        total = 0
        start = time.perf_counter()
        for chunk in store.stream(SnapshotRequest("up", None, 5_000, True)):
            total += len(encode_frame(*to_wire(chunk)))
        rates.append(total / (time.perf_counter() - start) / 1e6)
    store.close()
    return statistics.median(rates)


def _ingest_http(path: Path, batches: list[dict[bytes, dict[str, object]]]) -> float | None:
    """Records/s through POST /v1/datasets/up/batch (msgpack), or None when
    the server cannot be started here."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "replicad.server",
            "--data",
            str(path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(200):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                return None
            schema = seed_like_schema().to_json()
            client.post("/v1/datasets", json={"name": "up", "schema": schema}).raise_for_status()
            bodies = [msgpack.packb({"upserts": b}, use_bin_type=True) for b in batches]
            work = iter(bodies)
            lock = threading.Lock()
            errors: list[str] = []

            def worker() -> None:
                with httpx.Client(base_url=base, timeout=120) as c:
                    while True:
                        with lock:
                            body = next(work, None)
                        if body is None:
                            return
                        r = c.post(
                            "/v1/datasets/up/batch",
                            content=body,
                            headers={"content-type": "application/msgpack"},
                        )
                        if r.status_code != 200:
                            errors.append(r.text)

            # the benchmark's own million records stay out of its collections:
            # a full one over them costs seconds of client time, not server time
            gc.collect()
            gc.freeze()
            start = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            gc.unfreeze()
            if errors:
                raise RuntimeError(errors[0])
            return sum(map(len, batches)) / elapsed
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rows(quick: bool) -> list[Row]:
    n = 50_000 if quick else 1_000_000
    batches = _batches(n)
    tmp = Path(tempfile.mkdtemp(prefix="replicad-bench-"))
    try:
        store_rate = _ingest_store(tmp / "store", batches)
        saved = _startup(tmp / "store", saved=True)
        rebuilt = _startup(tmp / "store", saved=False)
        diff_s = _diff_serving(tmp / "store", n)
        snap = _snapshot_rate(tmp / "store")
        half = batches[: max(1, len(batches) // 2)]
        rates = [_ingest_http(tmp / f"http{i}", half) for i in range(HTTP_RUNS)]
        http_rate = None if None in rates else statistics.median(r for r in rates if r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label = f"{n:,}"
    out = [
        Row(f"origin: ingest into the store, durable ({label} records)", store_rate, "records/s"),
        Row(
            f"origin: ingest via HTTP msgpack API, durable, 2 clients ({label} records / 2, "
            f"median of {HTTP_RUNS} runs)",
            http_rate if http_rate is not None else float("nan"),
            "records/s",
            target=">= 100,000 records/s",
            met=None if http_rate is None else http_rate >= 100_000,
        ),
        Row(f"origin: start-up with {label} records (saved tree)", saved, "s"),
        Row(
            f"origin: start-up with {label} records after a crash (tree and leaf index rebuilt)",
            rebuilt,
            "s",
            target="a few seconds",
        ),
        Row(
            f"origin: serve a diff of 1,000 changed keys of {label}",
            diff_s * 1e3,
            "ms",
            target="<= 5 ms",
            met=diff_s * 1e3 <= 5,
        ),
        Row(
            f"origin: snapshot stream of {label} records (frames)",
            snap,
            "MB/s",
            target=">= 100 MB/s",
            met=snap >= 100,
        ),
    ]
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for row in rows("--quick" in sys.argv):
        print(row)
