"""Reads through the sidecar's Redis-protocol socket, against redis-server.

Everything runs as real processes in one temporary directory: an origin
(``python -m replicad.server``, at ``nice 19``: on a real host it is another
machine, and here it must not take the CPU the sidecar and its readers
would have there), a sidecar (``python -m sidecar run
--socket``, its default ``socket_workers``) and, as the anchor, a
``redis-server`` on a unix socket with persistence off. Records are the
seed-like user profiles (``replicad/sample.py``), record ``i`` at key
``user:%012d`` -- the keys ``redis-benchmark -r N ... user:__rand_int__``
asks for. The anchor holds, in one hash per dataset, exactly the bytes our
``HGET`` answers: each record's JSON (about 500 bytes).

* **Throughput**: ``redis-benchmark -s SOCKET -c 50 -n N [-P 16] -q`` of
  the same command against both servers (N 50,000, with ``-P 16``
  800,000), alternating, median of 3 runs
  (``--quick``: 1). Three commands: ``HGET user_profile`` of one hot key
  (the sidecar serves it from its render cache: the protocol path alone),
  of random keys over the whole dataset (almost every read decodes the
  record and renders its JSON), and ``HGET profile_json`` of random keys,
  an opaque dataset holding the same JSON as its values (no rendering:
  the value is the stored bytes), and ``HGET profile_view`` of random keys:
  the typed records again, in a dataset the sidecar keeps a JSON view of
  (``json_views``: the replies stored beside the records at apply time).
  The anchor answers all four from a hash of the JSON strings. With each
  run, the CPU the servers used per request (the sidecar's socket workers,
  its children, and redis-server: user + system time from ``/proc/PID/stat``
  around the run), median of the runs: where Python's cost per request
  shows, with the load generator's share of the two cores left out.
* **Reads while a diff applies**: a probe process sends ``HGET`` of random
  keys at 1,000/s on one connection and stamps each round trip
  (CLOCK_MONOTONIC, shared by every process of the host). p99 of the
  round trips in the 3 s before a write of 100,000 records at the origin
  (``--quick``: 20,000), against p99 from that write's acknowledgement until
  the mirror holds its version (``Reader.wait_for``, as an app reads its
  own writes; the sidecar pulls the diff and applies it meanwhile). A
  second probe does the same against redis-server at the same time: how
  much the machine itself (2 shared cores here) degrades a read's tail
  while the sync works.
  Median of 3 rounds (``--quick``: 1). Then the same with reads and the
  diff on ``profile_view``, whose apply also renders each record into the
  JSON view (about 2.7 times as long).

Without ``redis-server`` or ``redis-benchmark`` the throughput rows are
NaN and say why; the latency rows need neither.

``python -m benchmarks.bench_reads --probe SOCKET DATASET KEYS RATE
STOPFILE OUT`` is the probe process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack

from benchmarks.common import Row
from benchmarks.procs import Proc, free_port, wait
from replicad.codec import DatasetCodec
from replicad.sample import seed_like_record, seed_like_schema
from sidecar import Reader

TYPED = "user_profile"
OPAQUE = "profile_json"
VIEWED = "profile_view"
"""The typed records again, in a dataset the sidecar keeps a JSON view of."""
CLIENTS = 50
LOAD_BATCH = 10_000
PROBE_RATE = 1000.0
IDLE_SECONDS = 3.0
MISSING = "redis-server or redis-benchmark not installed (apt-get install redis-server)"


def _key(i: int) -> bytes:
    return b"user:%012d" % i


def _json(i: int, codec: DatasetCodec) -> bytes:
    """Record ``i`` as the sidecar's HGET renders it."""
    from sidecar.json_render import to_json

    return to_json(codec.decode(codec.encode(seed_like_record(i))))


# ---------------------------------------------------------------- processes


def _pings(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    return check


@dataclass
class _Setup:
    origin: str
    health: str
    socket: Path
    redis_socket: Path | None
    mirror: Path
    sidecar_pid: int = 0
    """The sidecar process (its children are the socket workers)."""
    redis_pid: int = 0


def _start(stack: contextlib.ExitStack, tmp: Path, n: int, have_redis: bool) -> _Setup:
    """The origin with ``n`` records in both datasets, a ready sidecar with
    its socket, and (if installed) a redis-server holding the same JSON."""
    port = free_port()
    # nice 19: on a real host the origin is another machine; here it must not
    # take the CPU the sidecar and its readers would have there
    origin_cmd = [
        "nice", "-n", "19",
        sys.executable, "-m", "replicad.server", "--data", str(tmp / "origin"),
        "--listen", f"127.0.0.1:{port}", "--no-durable", "--log-format", "json",
    ]  # fmt: skip
    origin = Proc(origin_cmd, tmp / "origin.log")
    stack.callback(origin.stop)
    url = f"http://127.0.0.1:{port}"
    wait("origin", origin, lambda: httpx.get(url + "/healthz").status_code == 200, 30)
    codec = DatasetCodec([seed_like_schema()])
    with httpx.Client(base_url=url, timeout=300) as client:
        schema = seed_like_schema().to_json()
        client.post("/v1/datasets", json={"name": TYPED, "schema": schema}).raise_for_status()
        client.post("/v1/datasets", json={"name": OPAQUE, "opaque": True}).raise_for_status()
        client.post("/v1/datasets", json={"name": VIEWED, "schema": schema}).raise_for_status()
        for s in range(0, n, LOAD_BATCH):
            span = range(s, min(n, s + LOAD_BATCH))
            _post(client, TYPED, {_key(i): seed_like_record(i) for i in span})
            _post(client, VIEWED, {_key(i): seed_like_record(i) for i in span})
            _post(client, OPAQUE, {_key(i): _json(i, codec) for i in span})
    sock, mirror = tmp / "sidecar.sock", tmp / "mirror"
    hport = free_port()
    sidecar_cmd = [
        sys.executable, "-m", "sidecar", "run", "--origin", url,
        "--datasets", f"{TYPED},{OPAQUE},{VIEWED}", "--json-views", VIEWED, "--data", str(mirror),
        "--health", f"127.0.0.1:{hport}", "--socket", str(sock), "--log-format", "json",
    ]  # fmt: skip
    sidecar = Proc(sidecar_cmd, tmp / "sidecar.log")
    stack.callback(sidecar.stop)
    health = f"http://127.0.0.1:{hport}"
    wait("sidecar", sidecar, lambda: httpx.get(health + "/readyz").status_code == 200, 600)
    wait("sidecar socket", sidecar, _pings(sock), 30)
    wait("sidecar JSON view", sidecar, lambda: _view_built(health), 600)
    redis_sock = None
    redis_proc = None
    if have_redis:
        redis_sock = tmp / "redis.sock"
        redis_cmd = [
            "redis-server", "--port", "0", "--unixsocket", str(redis_sock),
            "--save", "", "--appendonly", "no", "--dir", str(tmp),
        ]  # fmt: skip
        redis_proc = Proc(redis_cmd, tmp / "redis.log")
        stack.callback(redis_proc.stop)
        wait("redis-server", redis_proc, _pings(redis_sock), 30)
        _load_redis(redis_sock, n, codec)
    return _Setup(
        url, health, sock, redis_sock, mirror, sidecar.pid, redis_proc.pid if redis_proc else 0
    )


def _view_built(health: str) -> bool:
    doc = httpx.get(health + "/status").json()
    return bool(doc["datasets"][VIEWED]["json_view"] == "built")


def _post(client: httpx.Client, dataset: str, upserts: dict[bytes, Any]) -> int:
    r = client.post(
        f"/v1/datasets/{dataset}/batch",
        content=msgpack.packb({"upserts": upserts}, use_bin_type=True),
        headers={"content-type": "application/msgpack"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"write failed: {r.status_code} {r.text[:200]}")
    version: int = r.json()["version"]
    return version


def _load_redis(path: Path, n: int, codec: DatasetCodec) -> None:
    """HSET every record's JSON into both hashes (raw RESP, pipelined)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        for start in range(0, n, 1000):
            out = bytearray()
            for i in range(start, min(n, start + 1000)):
                value = _json(i, codec)
                for name in (TYPED.encode(), OPAQUE.encode(), VIEWED.encode()):
                    out += _command([b"HSET", name, _key(i), value])
            s.sendall(out)
            want = 3 * (min(n, start + 1000) - start)
            got = b""
            while got.count(b"\r\n") < want:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("redis-server closed the connection")
                got += chunk


def _command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


# ---------------------------------------------------------------- throughput


def _redis_benchmark(path: Path, requests: int, pipeline: int, command: list[str]) -> float:
    """Requests/s that ``redis-benchmark`` reports."""
    cmd = [
        "redis-benchmark", "-s", str(path), "-c", str(CLIENTS), "-n", str(requests),
        "-P", str(pipeline), "-q", *command,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    text = done.stdout.replace("\r", "\n")
    for line in reversed(text.splitlines()):
        if "requests per second" in line:
            return float(line.split(":")[-1].split("requests per second")[0].strip())
    raise RuntimeError(f"redis-benchmark failed: {done.stdout[-300:]} {done.stderr[-300:]}")


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far (/proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the sidecar's socket workers)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _timed_benchmark(
    path: Path, pids: list[int], requests: int, pipeline: int, command: list[str]
) -> tuple[float, float]:
    """``redis-benchmark``'s requests/s, and the server processes' CPU per
    request (us; NaN where /proc cannot tell)."""
    try:
        before = _cpu(pids) if pids else math.nan
    except OSError:
        before = math.nan
    rate = _redis_benchmark(path, requests, pipeline, command)
    if math.isnan(before):
        return rate, before
    return rate, (_cpu(pids) - before) / requests * 1e6


@dataclass(frozen=True)
class _Case:
    name: str
    ours: list[str]
    anchor: list[str]


def _throughput(setup: _Setup, n: int, quick: bool) -> list[Row]:
    hot = _key(42).decode()
    rand = ["-r", str(n)]
    cases = [
        _Case(
            "HGET user_profile <one hot key> (JSON from the render cache)",
            ["HGET", TYPED, hot],
            ["HGET", TYPED, hot],
        ),
        _Case(
            f"HGET user_profile <random key of {n:,}> (JSON rendered per read)",
            [*rand, "HGET", TYPED, "user:__rand_int__"],
            [*rand, "HGET", TYPED, "user:__rand_int__"],
        ),
        _Case(
            f"HGET profile_json <random key of {n:,}> (opaque: the stored JSON bytes)",
            [*rand, "HGET", OPAQUE, "user:__rand_int__"],
            [*rand, "HGET", OPAQUE, "user:__rand_int__"],
        ),
        _Case(
            f"HGET profile_view <random key of {n:,}> (typed, JSON view: stored replies)",
            [*rand, "HGET", VIEWED, "user:__rand_int__"],
            [*rand, "HGET", VIEWED, "user:__rand_int__"],
        ),
    ]
    runs = 1 if quick else 3
    out: list[Row] = []
    cpu_rows: list[Row] = []
    try:
        workers = _children(setup.sidecar_pid)
    except OSError:  # no /proc: the CPU rows are NaN
        workers = []
    for pipeline in (1, 16):
        # -P 16: 800,000 requests, about a second or more for both servers
        # (200,000 took redis-server 0.2-0.3 s: too short a run to be steady)
        requests = (10_000 if quick else 50_000) * (16 if pipeline > 1 else 1)
        for case in cases:
            ours: list[float] = []
            anchor: list[float] = []
            cpu_ours: list[float] = []
            cpu_anchor: list[float] = []
            for _ in range(runs):
                rate, cpu = _timed_benchmark(setup.socket, workers, requests, pipeline, case.ours)
                ours.append(rate)
                cpu_ours.append(cpu)
                if setup.redis_socket is not None:
                    rate, cpu = _timed_benchmark(
                        setup.redis_socket, [setup.redis_pid], requests, pipeline, case.anchor
                    )
                    anchor.append(rate)
                    cpu_anchor.append(cpu)
            value = statistics.median(ours)
            ref = statistics.median(anchor) if anchor else float("nan")
            p = f" -P {pipeline}" if pipeline > 1 else ""
            cpu_rows.append(
                Row(
                    f"reads: server CPU per request, {case.name}; -c {CLIENTS}{p} "
                    f"(the socket workers' /proc times, median of {runs})",
                    statistics.median(cpu_ours),
                    "us",
                    anchor=statistics.median(cpu_anchor) if cpu_anchor else float("nan"),
                    anchor_name="redis-server's, the same load",
                )
            )
            out.append(
                Row(
                    f"reads: {case.name}; redis-benchmark -s -c {CLIENTS}{p} (median of {runs})",
                    value,
                    "requests/s",
                    anchor=ref,
                    anchor_name="redis-server, HGET of a hash of the same JSON",
                    target="ratio >= 0.5",
                    met=None if not anchor else value / ref >= 0.5,
                )
            )
    return out + cpu_rows


def _missing_throughput() -> list[Row]:
    nan = float("nan")
    return [
        Row(f"reads: HGET throughput{' -P 16' if p > 1 else ''}", nan, "requests/s", nan, MISSING)
        for p in (1, 16)
    ]


# ---------------------------------------------------------------- latency


def _probe_main(argv: Sequence[str]) -> int:
    """Send HGET of random keys at RATE/s on one connection until STOPFILE
    exists (300 s at most); then write [[start monotonic_ns, round trip
    ns], ...] to OUT (JSON). OUT.ready appears once connected."""
    path, dataset, keys, rate, stopfile, out = argv
    n, period = int(keys), 1.0 / float(rate)
    stop = Path(stopfile)
    rng = random.Random(7)
    samples: list[tuple[int, int]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        Path(out + ".ready").touch()
        end = time.monotonic() + 300
        next_at = time.monotonic()
        while time.monotonic() < end and (len(samples) % 100 or not stop.exists()):
            request = _command([b"HGET", dataset.encode(), _key(rng.randrange(n))])
            began = time.monotonic_ns()
            s.sendall(request)
            _read_bulk(s)
            samples.append((began, time.monotonic_ns() - began))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()
    Path(out).write_text(json.dumps(samples))
    return 0


def _read_bulk(s: socket.socket) -> bytes:
    data = s.recv(1 << 16)
    if not data.startswith(b"$"):
        raise RuntimeError(f"unexpected reply {data[:80]!r}")
    size = int(data[1 : data.index(b"\r\n")])
    need = data.index(b"\r\n") + 2 + max(size, 0) + (2 if size >= 0 else 0)
    while len(data) < need:
        chunk = s.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the sidecar closed the connection")
        data += chunk
    return data


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


@dataclass
class _Round:
    idle: dict[str, list[float]]
    """Round trips (ms) in the idle window, per server probed."""
    busy: dict[str, list[float]]
    """Round trips (ms) while the sidecar synced the diff, per server."""
    window: float


def _latency_round(
    tmp: Path, setup: _Setup, n: int, diff: int, round_no: int, *, dataset: str
) -> _Round:
    """Probe our socket (and redis-server's, at the same time) with reads
    of ``dataset`` while idle, then while the sidecar syncs a diff of
    ``diff`` records of it."""
    targets = {"sidecar": setup.socket}
    if setup.redis_socket is not None:
        targets["redis"] = setup.redis_socket
    stopfile = tmp / f"stop-{dataset}{round_no}"
    outs = {name: tmp / f"probe-{name}-{dataset}{round_no}.json" for name in targets}
    probes = []
    reader = Reader(setup.mirror)
    try:
        for name, path in targets.items():
            cmd = [
                sys.executable, "-m", "benchmarks.bench_reads", "--probe", str(path), dataset,
                str(n), str(PROBE_RATE), str(stopfile), str(outs[name]),
            ]  # fmt: skip
            probes.append(Proc(cmd, tmp / f"probe-{name}-{dataset}{round_no}.log"))
        for name, probe in zip(targets, probes, strict=True):
            wait("probe", probe, Path(str(outs[name]) + ".ready").exists, 30)
        idle_from = time.monotonic_ns() + 500_000_000
        time.sleep(IDLE_SECONDS)
        idle_to = time.monotonic_ns()
        # a diff of `diff` records: each key gets another record
        offset = 1 + round_no
        upserts = {_key(i): seed_like_record((i + offset * 7919) % n) for i in range(diff)}
        with httpx.Client(base_url=setup.origin, timeout=300) as client:
            version = _post(client, dataset, upserts)
        acked = time.monotonic_ns()
        # read-your-writes as an app does it: a mirror read every 5 ms (an
        # HTTP request to the health server every 10 ms loaded the machine
        # the probe measures: docs/benchmarks.md, session 9)
        if not reader.wait_for(dataset, version, 300):
            raise RuntimeError(f"the mirror did not reach version {version} in 300 s")
        visible = time.monotonic_ns()
        time.sleep(0.3)
        stopfile.touch()
        for probe in probes:
            probe.popen.wait(30)
    finally:
        reader.close()
        for probe in probes:
            probe.stop()
    idle: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}
    for name, out in outs.items():
        samples = json.loads(out.read_text()) if out.exists() else []
        idle[name] = [lat / 1e6 for t, lat in samples if idle_from <= t < idle_to]
        busy[name] = [lat / 1e6 for t, lat in samples if acked <= t < visible]
    return _Round(idle, busy, (visible - acked) / 1e9)


def _median_of(
    rounds: list[_Round], which: str, name: str, stat: Callable[[list[float]], float]
) -> float:
    values = [stat(getattr(r, which).get(name, [])) for r in rounds]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _latency(
    tmp: Path, setup: _Setup, n: int, quick: bool, *, dataset: str = TYPED, tag: str = ""
) -> list[Row]:
    diff = min(n, 20_000 if quick else 100_000)
    rounds = [
        _latency_round(tmp, setup, n, diff, k, dataset=dataset) for k in range(1 if quick else 3)
    ]
    idle = _median_of(rounds, "idle", "sidecar", _p99)
    busy = _median_of(rounds, "busy", "sidecar", _p99)
    window = statistics.median(r.window for r in rounds)
    load = (
        f"HGET of random keys, {PROBE_RATE:,.0f}/s on one connection to each server, "
        f"median of {len(rounds)}"
    )
    during = f"while the sidecar syncs a {diff:,}-record diff{tag} (ack -> visible, {window:.1f} s)"
    redis_name = "redis-server, the same probe" if setup.redis_socket else MISSING
    return [
        Row(
            f"reads: socket HGET round trip p99, idle{tag and ' (JSON view)'} ({load})",
            idle,
            "ms",
            anchor=_median_of(rounds, "idle", "redis", _p99),
            anchor_name=redis_name,
        ),
        Row(
            f"reads: socket HGET round trip p99 {during}",
            busy,
            "ms",
            anchor=idle,
            anchor_name="the sidecar's p99, idle",
            target="ratio <= 2",
            met=busy / idle <= 2 if not (math.isnan(idle) or math.isnan(busy)) else None,
        ),
        Row(
            f"reads: redis-server HGET round trip p99 {during} (context: the machine)",
            _median_of(rounds, "busy", "redis", _p99),
            "ms",
            anchor=_median_of(rounds, "idle", "redis", _p99),
            anchor_name="redis-server's p99, idle" if setup.redis_socket else MISSING,
        ),
        Row(
            f"reads: socket HGET round trip p50 {during}",
            _median_of(rounds, "busy", "sidecar", _p50),
            "ms",
            anchor=_median_of(rounds, "idle", "sidecar", _p50),
            anchor_name="the sidecar's p50, idle",
        ),
    ]


# ---------------------------------------------------------------- rows


def rows(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    have_redis = shutil.which("redis-server") is not None and (
        shutil.which("redis-benchmark") is not None
    )
    tmp = Path(tempfile.mkdtemp(prefix="replicad-bench-reads-"))
    try:
        with contextlib.ExitStack() as stack:
            setup = _start(stack, tmp, n, have_redis)
            out = _throughput(setup, n, quick) if have_redis else _missing_throughput()
            out += _latency(tmp, setup, n, quick)
            # the same with the JSON view: each record of the diff is
            # rendered in the apply, which takes about 2.7 times as long
            out += _latency(
                tmp, setup, n, quick, dataset=VIEWED, tag=" of a dataset with a JSON view"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        sys.exit(_probe_main(sys.argv[2:]))
    for row in rows("--quick" in sys.argv):
        print(row)
