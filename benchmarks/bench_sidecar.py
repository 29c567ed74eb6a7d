"""The sidecar's figures: propagation latency, bootstrap time, resident memory.

Everything runs as real processes on 127.0.0.1: ``python -m replicad.server``
(a durable origin: fsync on every commit) and ``python -m sidecar run`` (a
durable mirror: fsync on every apply), each with its log in a temporary
directory removed at the end; the mirrors live on /dev/shm when the machine
has it (a memory-backed volume, as docs/deploy.md recommends for the pod),
the origin's data on disk. Records are seed-like user profiles
(``replicad/sample.py``); to keep the client side of a multi-million-record
load cheap, key ``user:%08d`` of ``i`` holds ``seed_like_record(i % 100,000)``
(100,000 distinct records, every key distinct).

* **Propagation**: an origin and 4 sidecars on one dataset (10,000 records
  preloaded), and one reader process per mirror polling
  ``sidecar.reader.Reader.version`` (sleeping 0.2 ms between polls: four
  tight loops would take both cores from the processes measured). Three
  write phases of 10 s each (``--quick``: 2 s): 1,000 single-record
  writes/s offered by 64 threads sharing one
  :class:`~replicad.writer.BatchingWriter` (each thread blocks until its
  write is acknowledged; concurrent writes share a request: the target
  rows), the same rate offered by 4 threads sending one HTTP request per
  write (one durable write per round trip cannot reach 1,000/s here), then a
  light 20/s from one thread, one request each. Each write's acknowledgement
  and each version's first sighting are stamped with ``time.monotonic_ns()``
  (CLOCK_MONOTONIC, one clock for every process of the host); a version
  counts as seen when a poll sees it or a later one. Latency = seen -
  acknowledged over every (write, sidecar) pair, an upper bound by at most
  one poll period.
* **Bootstrap**: an origin holding 1,000,000 records (``--quick``: 50,000),
  loaded by msgpack batches of 10,000; time from starting a fresh sidecar
  process to its ``/readyz`` answering 200, median of 3. Anchor: a Redis
  replica's full sync of the same keys and encoded values (``REPLICAOF``
  until the link is up, the sync done and ``DBSIZE`` complete), same machine,
  same run; NaN when ``redis-server`` is not installed.
* **Memory**: the sidecar's ``/proc/PID/status`` once ready and its leaf
  index built, at 1,000,000 and 5,000,000 records (``--quick``: 50,000 and
  100,000). ``RssAnon`` is its private memory, the target's measure: the
  heap, which must stay flat in the dataset's size. ``VmRSS`` adds the
  pages of the mirror's memory map the process has touched, which are the
  data itself (shared, file-backed, reclaimable page cache that every
  reader process maps too): context, not the target.
* **Context**: the CPU that processes outside these benchmarks used meanwhile
  (the machine may be shared; the latencies are sensitive to it).

``python -m benchmarks.bench_sidecar --probe MIRROR DATASET STOPFILE OUT
POLL`` is the reader process of the propagation benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack

from benchmarks.common import Row
from benchmarks.procs import Proc, free_port, wait
from replicad.client import OriginClient
from replicad.codec import DatasetCodec
from replicad.errors import ReplicadError
from replicad.sample import seed_like_record, seed_like_schema

DATASET = "up"
POOL = 100_000
"""Distinct records: key i holds record i % POOL."""
LOAD_BATCH = 10_000
SIDECARS = 4
WRITE_RATE = 1_000
WRITERS = 64
"""Threads writing through one shared BatchingWriter (each blocks until its
write is acknowledged, as a request handler of an application would): their
concurrent writes share requests."""
REQUEST_WRITERS = 4
"""Threads of the one-request-per-write phase: one durable single-record write
per round trip cannot reach 1,000/s here; several let the origin's group
commit share fsyncs."""
PROBE_POLL = 0.0002
"""Seconds a reader process sleeps between polls (0: a tight loop, which on 2
cores takes the CPU the origin and sidecars need)."""
REDIS_MISSING = "redis-server not installed (apt-get install redis-server)"


def _key(i: int) -> bytes:
    return b"user:%08d" % i


class _Pool:
    """The distinct records, generated once (about 3 s) and shared by every
    figure: the origin loads them, Redis gets their encoded bytes."""

    def __init__(self, size: int) -> None:
        self.records = [seed_like_record(i) for i in range(size)]
        self._encoded: list[bytes] | None = None

    def record(self, i: int) -> dict[str, Any]:
        return self.records[i % len(self.records)]

    def encoded(self, i: int) -> bytes:
        if self._encoded is None:
            codec = DatasetCodec([seed_like_schema()])
            self._encoded = [codec.encode(r) for r in self.records]
        return self._encoded[i % len(self._encoded)]


# ---------------------------------------------------------------- processes


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == 200


@dataclass
class _Origin:
    proc: Proc
    url: str


def _start_origin(stack: contextlib.ExitStack, workdir: Path) -> _Origin:
    workdir.mkdir(parents=True)
    port = free_port()
    cmd = [
        sys.executable, "-m", "replicad.server",
        "--data", str(workdir / "data"),
        "--listen", f"127.0.0.1:{port}",
        "--log-format", "json",
    ]  # fmt: skip
    proc = Proc(cmd, workdir / "origin.log")
    stack.callback(proc.stop)
    url = f"http://127.0.0.1:{port}"
    wait("origin", proc, _http_ok(url + "/healthz"), 30.0)
    schema = seed_like_schema().to_json()
    r = httpx.post(url + "/v1/datasets", json={"name": DATASET, "schema": schema}, timeout=30)
    r.raise_for_status()
    return _Origin(proc, url)


@dataclass
class _Sidecar:
    proc: Proc
    health: str
    mirror: Path


def _mirror_dir(workdir: Path) -> Path:
    """Where a sidecar keeps its mirror: on a memory-backed filesystem when
    the machine has one (/dev/shm), as docs/deploy.md recommends (an
    emptyDir with medium Memory); else beside its log. The caller removes it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"replicad-bench-{workdir.name}-", dir=shm))
    return workdir / "mirror"


def _start_sidecar(workdir: Path, origin: str) -> _Sidecar:
    """Start a sidecar process (the caller stops it and removes its mirror,
    ``_Sidecar.mirror``); returns at once."""
    workdir.mkdir(parents=True)
    mirror = _mirror_dir(workdir)
    port = free_port()
    cmd = [
        sys.executable, "-m", "sidecar", "run",
        "--origin", origin,
        "--datasets", DATASET,
        "--data", str(mirror),
        "--health", f"127.0.0.1:{port}",
        "--replica-id", workdir.name,
        "--log-format", "json",
    ]  # fmt: skip
    proc = Proc(cmd, workdir / "sidecar.log")
    return _Sidecar(proc, f"http://127.0.0.1:{port}", mirror)


def _post(client: httpx.Client, body: bytes) -> int:
    r = client.post(
        f"/v1/datasets/{DATASET}/batch",
        content=body,
        headers={"content-type": "application/msgpack"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"write failed: {r.status_code} {r.text[:200]}")
    version: int = r.json()["version"]
    return version


def _load(origin: str, pool: _Pool, start: int, stop: int) -> float:
    """Upsert keys [start, stop) in msgpack batches of LOAD_BATCH from 2
    client threads; returns records/s."""
    spans = iter(range(start, stop, LOAD_BATCH))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with httpx.Client(base_url=origin, timeout=300) as client:
                while not errors:
                    with lock:
                        s = next(spans, None)
                    if s is None:
                        return
                    batch = {_key(i): pool.record(i) for i in range(s, min(stop, s + LOAD_BATCH))}
                    _post(client, msgpack.packb({"upserts": batch}, use_bin_type=True))
        except BaseException as exc:
            errors.append(exc)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return (stop - start) / (time.perf_counter() - began)


def _status(proc: Path) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    for line in proc.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(rest.split()[0]) * 1024
    return out


# ---------------------------------------------------------------- propagation


def _probe_main(argv: Sequence[str]) -> int:
    """A reader process: poll the mirror's version of DATASET until STOPFILE
    exists (300 s at most); write every change as [monotonic_ns, version]
    to OUT (JSON). OUT.ready appears once the reader has read a version."""
    from sidecar.reader import Reader

    mirror, dataset = argv[0], argv[1]
    stopfile, out, poll = Path(argv[2]), Path(argv[3]), float(argv[4])
    deadline = time.monotonic() + 300.0
    reader = None
    while reader is None:
        try:
            reader = Reader(mirror)
        except ReplicadError:
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.01)
    now = time.monotonic_ns
    version = reader.version
    changes: list[tuple[int, int]] = []
    last = -2
    n = 0
    began = now()
    with reader:
        while True:
            seen = now()  # when this poll began
            cursor = version(dataset)
            v = -1 if cursor is None else cursor.version
            if v != last:
                changes.append((seen, v))
                if last == -2:
                    Path(str(out) + ".ready").touch()
                last = v
            n += 1
            if n % 512 == 0 and (stopfile.exists() or time.monotonic() > deadline):
                break
            if poll:
                time.sleep(poll)
    out.write_text(json.dumps({"changes": changes, "polls": n, "ns": now() - began}))
    return 0


@dataclass
class _Propagation:
    p50_ms: float
    p99_ms: float
    max_ms: float
    rate: float
    writes: int
    pairs: int
    early: float
    """Fraction of pairs visible before the writer had its acknowledgement."""
    poll_us: float
    """Mean time between two polls of one reader process."""


class _StampingClient(OriginClient):
    """Notes when each write's answer arrived (``answered[version]``): the
    writes of a batch are acknowledged then, however late their threads
    wake up to see it."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        super().__init__(base_url, timeout=timeout)
        self.answered: dict[int, int] = {}

    def write(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = super().write(*args, **kwargs)
        self.answered[int(result["version"])] = time.monotonic_ns()
        return result


def _write_paced(
    origin: str,
    writes: list[tuple[bytes, dict[str, Any]]],
    rate: float,
    writers: int,
    *,
    batching: bool,
) -> tuple[list[tuple[int, int]], float]:
    """Send ``writes`` (key, record) from ``writers`` threads, write i no
    earlier than ``i / rate`` s after the start and none after ``len(writes)
    / rate`` s (what the writers could not send by then is dropped); returns
    (version, ack monotonic_ns) per write and the achieved writes/s.

    Each write is its own request (``batching`` False: a single-record
    msgpack batch, packed before the clock starts) or goes through one
    :class:`~replicad.writer.BatchingWriter` shared by the threads."""
    lock = threading.Lock()
    counter = iter(range(len(writes)))
    acks: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    bodies = (
        [msgpack.packb({"upserts": {k: r}}, use_bin_type=True) for k, r in writes]
        if not batching
        else []
    )
    shared = _StampingClient(origin, timeout=30) if batching else None
    writer = shared.writer(DATASET) if shared is not None else None
    start = time.monotonic() + 0.1
    end = start + len(writes) / rate

    def worker() -> None:
        try:
            with httpx.Client(base_url=origin, timeout=30) as client:
                while not errors:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    now = time.monotonic()
                    if now >= end:  # the writers fell behind: stop on time
                        return
                    delay = start + i / rate - now
                    if delay > 0:
                        time.sleep(delay)
                    if shared is not None and writer is not None:
                        version = writer.upsert(*writes[i]).version
                        acked = shared.answered[version]  # not when this thread woke
                    else:
                        version = _post(client, bodies[i])
                        acked = time.monotonic_ns()
                    acks.append((version, acked))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if shared is not None:
            shared.close()
    if errors:
        raise errors[0]
    return acks, len(acks) / (max(end, time.monotonic()) - start)


def _first_visible(changes: list[tuple[int, int]], versions: list[int]) -> list[int | None]:
    """For each version (ascending), the first time the reader saw it or a
    later one."""
    out: list[int | None] = []
    j = 0
    for v in versions:
        while j < len(changes) and changes[j][1] < v:
            j += 1
        out.append(changes[j][0] if j < len(changes) else None)
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _propagation(
    tmp: Path, pool: _Pool, seconds: float, phases: Sequence[tuple[float, int, bool]]
) -> list[_Propagation]:
    """One origin, SIDECARS sidecars and a reader process per mirror; one
    write phase of ``seconds`` per (rate, writer threads, batching) in
    ``phases`` (see :func:`_write_paced`)."""
    preload = 10_000
    with contextlib.ExitStack() as stack:
        origin = _start_origin(stack, tmp / "origin")
        _load(origin.url, pool, 0, preload)
        sidecars: list[_Sidecar] = []
        for k in range(SIDECARS):
            sc = _start_sidecar(tmp / f"sidecar{k}", origin.url)
            stack.callback(shutil.rmtree, sc.mirror, True)
            stack.callback(sc.proc.stop)
            sidecars.append(sc)
        for k, sc in enumerate(sidecars):
            wait(f"sidecar {k}", sc.proc, _http_ok(sc.health + "/readyz"), 60.0)
        stopfile = tmp / "stop"
        outs = [tmp / f"probe{k}.json" for k in range(SIDECARS)]
        probes = []
        for k, sc in enumerate(sidecars):
            cmd = [
                sys.executable, "-m", "benchmarks.bench_sidecar", "--probe",
                str(sc.mirror), DATASET, str(stopfile), str(outs[k]), str(PROBE_POLL),
            ]  # fmt: skip
            probe = Proc(cmd, tmp / f"probe{k}.log")
            stack.callback(probe.stop)
            probes.append(probe)
        for k, probe in enumerate(probes):
            ready = Path(str(outs[k]) + ".ready")
            wait(f"reader {k}", probe, ready.exists, 30.0)
        phase_acks: list[tuple[list[tuple[int, int]], float]] = []
        j = 0
        for rate, writers, batching in phases:
            # single-record writes over the preloaded keys, in a fixed order
            writes = []
            for _ in range(int(rate * seconds)):
                writes.append((_key(j % preload), pool.record(j + preload)))
                j += 1
            acks, achieved = _write_paced(origin.url, writes, rate, writers, batching=batching)
            phase_acks.append((sorted(acks), achieved))
            last = max((v for v, _ in acks), default=0)
            for k, sc in enumerate(sidecars):
                wait(f"sidecar {k} catching up", sc.proc, _reached(sc, last), 30.0)
            time.sleep(0.2)
        stopfile.touch()
        deadline = time.monotonic() + 30
        for probe in probes:
            probe.popen.wait(max(0.1, deadline - time.monotonic()))
        docs = [json.loads(out.read_text()) for out in outs]
    poll_us = statistics.mean(d["ns"] / max(1, d["polls"]) / 1e3 for d in docs)
    results = []
    for acks, achieved in phase_acks:
        versions = [v for v, _ in acks]
        latencies: list[float] = []
        early = 0
        for doc in docs:
            changes = [(int(t), int(v)) for t, v in doc["changes"]]
            for (_, acked), seen in zip(acks, _first_visible(changes, versions), strict=True):
                if seen is None:
                    raise RuntimeError("a reader never saw an acknowledged version")
                lat = (seen - acked) / 1e6
                early += lat < 0
                latencies.append(max(0.0, lat))
        latencies.sort()
        if not latencies:
            raise RuntimeError(f"no write was acknowledged in the {achieved:.0f}/s phase")
        results.append(
            _Propagation(
                p50_ms=_percentile(latencies, 0.50),
                p99_ms=_percentile(latencies, 0.99),
                max_ms=latencies[-1],
                rate=achieved,
                writes=len(acks),
                pairs=len(latencies),
                early=early / len(latencies),
                poll_us=poll_us,
            )
        )
    return results


def _reached(sc: _Sidecar, version: int) -> Callable[[], bool]:
    """A check that the sidecar's mirror holds ``version`` or later."""

    def check() -> bool:
        doc = httpx.get(sc.health + "/status", timeout=2).json()
        return int(doc["datasets"][DATASET]["version"] or 0) >= version

    return check


# ---------------------------------------------------------------- bootstrap


@dataclass
class _Bootstrap:
    seconds: float
    index_seconds: float
    """From ready to the leaf index built in the background (the sidecar's
    steady state)."""
    memory: dict[str, int]
    """/proc status figures of the sidecar once its leaf index is built (bytes)."""
    errors: int
    """Failed sync requests on the way (each one is retried)."""


def _bootstrap(tmp: Path, origin: str, n: int, name: str) -> _Bootstrap:
    """Start a fresh sidecar, time it to /readyz 200 and then to its leaf
    index built, read its memory, check it holds ``n`` records, stop it and
    remove its mirror."""
    workdir = tmp / name
    began = time.perf_counter()
    sc = _start_sidecar(workdir, origin)
    try:
        # /readyz every 50 ms: each poll costs the sidecar a little CPU
        wait("bootstrapping sidecar", sc.proc, _http_ok(sc.health + "/readyz"), 900.0, 0.05)
        seconds = time.perf_counter() - began
        wait("the leaf index", sc.proc, lambda: bool(_dataset_status(sc)["leaf_index_complete"]),
             900.0, 0.05)  # fmt: skip
        index_seconds = time.perf_counter() - began - seconds
        memory = _status(Path(f"/proc/{sc.proc.pid}/status"))
        status = _dataset_status(sc)
        if status["records"] != n:
            raise RuntimeError(f"the sidecar holds {status['records']} records, not {n}")
    finally:
        sc.proc.stop()
        shutil.rmtree(sc.mirror, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return _Bootstrap(seconds, index_seconds, memory, int(status["errors"]))


def _dataset_status(sc: _Sidecar) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(sc.health + "/status", timeout=10).json()
    return doc["datasets"][DATASET]  # type: ignore[no-any-return]


@dataclass
class _RedisSync:
    seconds: list[float]
    replica_rss: int


def _redis_server(stack: contextlib.ExitStack, workdir: Path, *extra: str) -> tuple[Proc, Any]:
    import redis

    workdir.mkdir(parents=True)
    port = free_port()
    cmd = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--daemonize", "no",
        *extra,
    ]  # fmt: skip
    proc = Proc(cmd, workdir / "redis.log")
    stack.callback(proc.stop)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    stack.callback(client.close)
    wait("redis-server", proc, lambda: bool(client.ping()), 15.0)
    return proc, client


def _redis_sync(tmp: Path, pool: _Pool, n: int, runs: int) -> _RedisSync:
    """Load ``n`` keys into a Redis primary (pipelines of LOAD_BATCH SETs),
    then time ``runs`` fresh replicas' full syncs."""
    times: list[float] = []
    rss = 0
    with contextlib.ExitStack() as stack:
        # no 5 s wait for more replicas before a diskless sync begins
        _, primary = _redis_server(stack, tmp / "redis-primary", "--repl-diskless-sync-delay", "0")
        port = primary.connection_pool.connection_kwargs["port"]
        for s in range(0, n, LOAD_BATCH):
            pipe = primary.pipeline(transaction=False)
            for i in range(s, min(n, s + LOAD_BATCH)):
                pipe.set(_key(i), pool.encoded(i))
            pipe.execute()
        if primary.dbsize() != n:
            raise RuntimeError(f"redis primary holds {primary.dbsize()} keys, not {n}")
        for run in range(runs):
            with contextlib.ExitStack() as replica_stack:
                proc, replica = _redis_server(replica_stack, tmp / f"redis-replica{run}")
                began = time.perf_counter()
                replica.replicaof("127.0.0.1", port)
                deadline = began + 600
                while True:
                    info = replica.info("replication")
                    if (
                        info.get("master_link_status") == "up"
                        and info.get("master_sync_in_progress") == 0
                        and replica.dbsize() == n
                    ):
                        break
                    if time.perf_counter() > deadline or not proc.alive():
                        raise RuntimeError(f"redis replica did not sync:\n{proc.tail()}")
                    time.sleep(0.005)
                times.append(time.perf_counter() - began)
                rss = _status(Path(f"/proc/{proc.pid}/status"))["VmRSS"]
            shutil.rmtree(tmp / f"redis-replica{run}", ignore_errors=True)
    return _RedisSync(times, rss)


# ---------------------------------------------------------------- rows

LIGHT_RATE = 20
"""Writes/s of the light-load propagation phase (one writer)."""


def _mb(n: float) -> float:
    return n / (1 << 20)


def rows(quick: bool) -> list[Row]:
    n1 = 50_000 if quick else 1_000_000
    n2 = 100_000 if quick else 5_000_000
    seconds = 2.0 if quick else 10.0
    runs = 3
    have_redis = shutil.which("redis-server") is not None
    cpu_before = _cpu_times()
    pool = _Pool(min(POOL, n1))
    tmp = Path(tempfile.mkdtemp(prefix="replicad-bench-sidecar-"))
    try:
        heavy, per_request, light = _propagation(
            tmp / "propagation",
            pool,
            seconds,
            [
                (WRITE_RATE, WRITERS, True),
                (WRITE_RATE, REQUEST_WRITERS, False),
                (LIGHT_RATE, 1, False),
            ],
        )
        with contextlib.ExitStack() as stack:
            origin = _start_origin(stack, tmp / "origin")
            _load(origin.url, pool, 0, n1)
            boots = [_bootstrap(tmp, origin.url, n1, f"boot{k}") for k in range(runs)]
            redis = _redis_sync(tmp / "redis", pool, n1, runs) if have_redis else None
            _load(origin.url, pool, n1, n2)
            big = _bootstrap(tmp, origin.url, n2, "boot-big")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = _rows(
        n1=n1,
        n2=n2,
        seconds=seconds,
        heavy=heavy,
        per_request=per_request,
        light=light,
        boots=boots,
        big=big,
        redis=redis,
    )
    cpu_after = _cpu_times()
    machine = cpu_after[0] - cpu_before[0]
    wall = cpu_after[2] - cpu_before[2]
    others = max(0.0, machine - (cpu_after[1] - cpu_before[1]))
    out.append(
        Row(
            "context: CPU used by processes outside these benchmarks during them "
            "(other work sharing the machine)",
            100 * others / (wall * (os.cpu_count() or 1)),
            "% of all cores",
        )
    )
    return out


def _cpu_times() -> tuple[float, float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this
    process and its reaped children, wall seconds)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    mine = t.user + t.system + t.children_user + t.children_system
    return busy, mine, time.monotonic()


def _rows(
    *,
    n1: int,
    n2: int,
    seconds: float,
    heavy: _Propagation,
    per_request: _Propagation,
    light: _Propagation,
    boots: list[_Bootstrap],
    big: _Bootstrap,
    redis: _RedisSync | None,
) -> list[Row]:
    nan = float("nan")
    to = f"ack -> visible in {SIDECARS} mirrors"
    heavy_load = (
        f"{WRITE_RATE:,} single-record writes/s offered by {WRITERS} threads through one "
        f"BatchingWriter, {heavy.rate:,.0f}/s achieved, {seconds:g} s; readers poll every "
        f"{heavy.poll_us / 1e3:.1f} ms"
    )
    request_load = (
        f"{WRITE_RATE:,} writes/s offered by {REQUEST_WRITERS} threads, one request each, "
        f"{per_request.rate:,.0f}/s achieved, {seconds:g} s"
    )
    light_load = f"{LIGHT_RATE} writes/s from 1 thread, {seconds:g} s"
    at_rate = heavy.rate >= WRITE_RATE * 0.95
    boot_s = statistics.median(b.seconds for b in boots)
    rss = _mb(statistics.median(b.memory["VmRSS"] for b in boots))
    anon = _mb(statistics.median(b.memory["RssAnon"] for b in boots))
    if redis is not None:
        redis_s = statistics.median(redis.seconds)
        redis_name = f"Redis replica full sync (REPLICAOF), median of {len(redis.seconds)}"
        redis_rss = _mb(redis.replica_rss)
        rss_name = "Redis replica VmRSS, same records"
    else:
        redis_s = redis_rss = nan
        redis_name = rss_name = REDIS_MISSING
    n1s, n2s = f"{n1:,}", f"{n2:,}"
    boot_errors = sum(b.errors for b in boots)

    def retried(errors: int) -> str:
        return f"; {errors} failed sync request(s) retried" if errors else ""

    return [
        Row(
            f"sidecar: propagation p50, {to} ({heavy_load})",
            heavy.p50_ms,
            "ms",
            target="<= 2 ms at 1,000 writes/s",
            met=heavy.p50_ms <= 2 and at_rate,
        ),
        Row(
            f"sidecar: propagation p99, {to} ({heavy_load})",
            heavy.p99_ms,
            "ms",
            target="<= 10 ms at 1,000 writes/s",
            met=heavy.p99_ms <= 10 and at_rate,
        ),
        Row(
            f"sidecar: write rate achieved, single-record durable writes from {WRITERS} "
            f"threads through one BatchingWriter, {SIDECARS} sidecars following",
            heavy.rate,
            "writes/s",
            target=f">= {WRITE_RATE:,} writes/s",
            met=at_rate,
        ),
        Row(f"sidecar: propagation p50, {to} ({request_load})", per_request.p50_ms, "ms"),
        Row(f"sidecar: propagation p99, {to} ({request_load})", per_request.p99_ms, "ms"),
        Row(
            f"sidecar: write rate achieved, one request per write from {REQUEST_WRITERS} "
            f"threads, {SIDECARS} sidecars following",
            per_request.rate,
            "writes/s",
        ),
        Row(f"sidecar: propagation p50, {to} ({light_load})", light.p50_ms, "ms"),
        Row(f"sidecar: propagation p99, {to} ({light_load})", light.p99_ms, "ms"),
        Row(
            f"sidecar: bootstrap of {n1s} records, process start to /readyz 200 "
            f"(median of {len(boots)}{retried(boot_errors)})",
            boot_s,
            "s",
            anchor=redis_s,
            anchor_name=redis_name,
            target="ratio <= 1 (aim 0.5)",
            met=None if redis is None else boot_s / redis_s <= 1,
        ),
        Row(
            f"sidecar: then the leaf index (for Merkle repair) built in the background, "
            f"/readyz 200 to complete, {n1s} records",
            statistics.median(b.index_seconds for b in boots),
            "s",
        ),
        Row(
            f"sidecar: bootstrap throughput, {n1s} records",
            n1 / boot_s,
            "records/s",
            anchor=n1 / redis_s,
            anchor_name="Redis replica full sync" if redis is not None else REDIS_MISSING,
        ),
        Row(
            f"sidecar: resident memory (VmRSS) after bootstrap and the leaf index, {n1s} "
            "records (context: includes the touched pages of the mirror's map, i.e. the data)",
            rss,
            "MB",
            anchor=redis_rss,
            anchor_name=rss_name,
        ),
        Row(
            f"sidecar: private memory (RssAnon: VmRSS less mapped files), {n1s} records",
            anon,
            "MB",
            target="<= 100 MB",
            met=anon <= 100,
        ),
        Row(
            f"sidecar: resident memory (VmRSS) after bootstrap, {n2s} records (context, as above)",
            _mb(big.memory["VmRSS"]),
            "MB",
        ),
        Row(
            f"sidecar: private memory (RssAnon), {n2s} records",
            _mb(big.memory["RssAnon"]),
            "MB",
            target="<= 100 MB",
            met=_mb(big.memory["RssAnon"]) <= 100,
        ),
        Row(
            f"sidecar: bootstrap of {n2s} records, process start to /readyz 200"
            f"{retried(big.errors)}",
            big.seconds,
            "s",
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        sys.exit(_probe_main(sys.argv[2:]))
    for row in rows("--quick" in sys.argv):
        print(row)
