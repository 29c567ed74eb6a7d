"""Chaos trials of real processes: an origin, three sidecars (one behind a
relay), reader processes, concurrent writers, kill -9 and network faults.

Run::

    python -m tests.chaos --trials 100            # seeds 1..100
    python -m tests.chaos --seed 1234 --trials 1  # replay one trial
    python -m tests.chaos --trials 5 --seconds 20 --keep   # longer, keep files

``tests/test_chaos.py`` runs a few short trials in the suite.

One trial
---------
::

    writers ──HTTP──▶ origin ◀── proxy A ◀── sidecar S1   (+ reader process)
                                         ◀── sidecar S2   (sometimes wiped)
                                         ◀── relay R      (+ reader process)
                      relay R ◀── proxy B ◀── sidecar S3   (+ reader process)

* The **origin** runs with fsync on and a 1 MiB initial map (so it grows
  while the trial runs); the sidecars too. Three datasets: ``blobs`` (opaque,
  incompressible values up to 12 KiB, a short version queue so lagging
  replicas fall back to Merkle repair), ``typed`` (a schema with a
  dictionary-encoded field whose dictionary keeps growing, so pushes carry
  new definitions) and ``bulk`` (bulk replaces, ``POST .../replace``, mixed
  with batches).
* **Writers** (five threads, HTTP straight to the origin, msgpack and JSON
  bodies) each own a part of the key space and a log key holding the
  sequence number of their last batch. A batch answered 200 is
  *acknowledged*; one whose connection broke after it was sent is *in
  doubt* and is settled once the origin is back by reading the writer's log
  key (the origin is the only judge, and a batch is atomic). A batch whose
  connection was refused was never sent.
* **Faults**, drawn from the trial's seed: kill -9 of a sidecar (at once,
  while it applies a batch -- a worker thread busy, read from /proc -- or,
  for S2, during a fresh bootstrap), of the relay, and of the origin (its
  writers are mid-commit nearly always; every fifth time it is killed while
  writers are paused, so the kill lands elsewhere); each restarted after a
  random pause. The TCP proxies (threads, in this process) strike a share
  of the live connections and of new ones: drop them (a blackhole: nothing
  is forwarded, the client must time out), delay them, cut them (FIN) or
  reset them (RST) after a random number of bytes, or refuse them; or they
  partition (every connection stalls, then resumes).
* **Healing**: faults stop, every process runs, writers stop; each sidecar
  must reach the origin's cursor within the convergence timeout.

Checks (any failure prints the seed and the command that replays it):

1. **Durability**: replaying every writer's committed batches (acknowledged,
   or in doubt and found committed) gives exactly the origin's content, read
   through ``POST /v1/sync`` (a one-chunk snapshot, decoded with the
   dataset's own definition).
2. **Convergence**: every mirror (read with :class:`sidecar.reader.Reader`)
   holds the origin's cursor and exactly its records, byte for byte; the
   sidecars keep a JSON view of ``typed`` (``json_views``), which must be
   built and hold, for every record and no other key, the record's reply.
3. **No torn reads**: the reader processes (``tests/chaos_reader.py``) saw,
   under every cursor, one digest only -- the one the origin acknowledged for
   that version when it is known (a version whose batch was in doubt has no
   known digest: it is checked for uniqueness only) -- both in snapshots and
   through ``Reader.get_many``'s cached-transaction fast path; no
   ``get_many`` answer mixed cursors; no cursor went backwards.

Randomness: the schedule (faults, their moments, pauses, every batch's
content) comes from the seed; the interleaving of processes does not, so a
replay repeats the same faults, not the same microsecond timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgpack

from replicad.frames import FrameDecoder, encode_frame
from replicad.merkle import EMPTY_DIGEST, Digest, entry_hash
from replicad.messages import SnapshotChunk, SnapshotRequest, from_wire, to_wire
from sidecar.json_render import JsonRenderer, bulk
from sidecar.reader import Reader, codec_from_definition
from tests.origin_proc import OriginProcess, free_port
from tests.procs import ROOT
from tests.sidecar_proc import SidecarProcess

FRAME = "application/x-replicad-frame"
DATASETS = ("blobs", "typed", "bulk")
TYPED_SCHEMA: dict[str, Any] = {
    "fields": [
        {"name": "seq", "type": "int"},
        {"name": "w", "type": "int"},
        {"name": "city", "type": "str", "dictionary": True},
        {"name": "score", "type": "int", "nullable": True},
        {"name": "tags", "type": "list<str>", "nullable": True},
        {"name": "blob", "type": "bytes", "nullable": True},
    ]
}
BLOB_WRITERS = 3
KEYS_PER_WRITER = 120
BULK_KEYS = 200
SIDECAR_ENV = {
    "SIDECAR_MAP_SIZE_MB": "1",
    "SIDECAR_MAX_MAP_SIZE_MB": "512",
    "SIDECAR_REQUEST_TIMEOUT": "3",
    "SIDECAR_ACK_INTERVAL": "1",
    "SIDECAR_JSON_VIEWS": "typed",  # kept through every crash (check 2)
}


class ChaosFailureError(AssertionError):
    """A trial's check failed; the message names the seed and the replay command."""


def replay_command(seed: int, seconds: float) -> str:
    return f"python -m tests.chaos --seed {seed} --trials 1 --seconds {seconds:g}"


# --------------------------------------------------------------------- processes


class PatientSidecar(SidecarProcess):
    """A sidecar process given a minute to come up (a loaded test machine
    needs more than the fixture's 15 s)."""

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout=timeout)


def apply_in_progress(pid: int) -> bool:
    """True while a worker thread of the process runs (R) or waits on the
    disk (D): for a sidecar, an Apply in an LMDB write transaction."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        if task.name == str(pid):
            continue
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("R", "D"):
            return True
    return False


# --------------------------------------------------------------------- the proxy


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(frozen=True)
class Fault:
    mode: str  # pass, blackhole, delay, cut, reset, refuse
    delay: float = 0.0
    budget: int = 0


@dataclass
class _Link:
    """One proxied connection and the fault it currently suffers."""

    client: socket.socket
    fault: Fault
    upstream: socket.socket | None = None
    forwarded: int = 0
    """Bytes forwarded since the fault was set (a cut's budget counts from there)."""


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that injects faults into the connections it
    forwards to ``upstream_port``. :meth:`strike` gives a share of the live
    connections a fault at once (clients keep their connections alive, so
    most traffic never opens a new one) and the same share of new ones until
    :meth:`heal`; ``partitioned`` stalls every connection, new and old, until
    it is cleared. Faults are drawn from ``rng``. One thread per connection;
    every loop wakes at least every 0.1 s to check :meth:`close`, and a
    connection lives at most ``max_seconds``."""

    MODES = ("blackhole", "delay", "cut", "reset", "refuse")

    def __init__(
        self, name: str, upstream_port: int, rng: random.Random, *, max_seconds: float = 600.0
    ) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.rng = rng
        self.max_seconds = max_seconds
        self.rate = 0.0
        self.partitioned = False
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"proxy-{name}")
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def strike(self, rate: float) -> int:
        """Fault ``rate`` of the live connections now, and of new ones from
        now on. Returns how many live connections were hit."""
        hit = 0
        with self._lock:
            self.rate = rate
            for link in self._links:
                if link.fault.mode == "pass" and self.rng.random() < rate:
                    link.fault = self._draw_locked()
                    link.forwarded = 0
                    hit += 1
        return hit

    def heal(self) -> None:
        """No faults for new connections, and no partition. Connections
        already blackholed stay so (their clients time out, as on a network)."""
        with self._lock:
            self.rate = 0.0
            self.partitioned = False

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = [s for link in self._links for s in (link.client, link.upstream) if s]
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def _draw_locked(self) -> Fault:
        mode = self.rng.choice(self.MODES)
        self.injected[mode] += 1
        return Fault(mode, self.rng.uniform(0.01, 0.25), self.rng.randrange(0, 40_000))

    def _draw(self) -> Fault:
        with self._lock:
            if self.rng.random() >= self.rate:
                return Fault("pass")
            return self._draw_locked()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            link = _Link(client, self._draw())
            t = threading.Thread(target=self._serve, args=(link,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _serve(self, link: _Link) -> None:
        if link.fault.mode == "refuse":
            _reset(link.client)
            return
        with self._lock:
            self._links.append(link)
        deadline = time.monotonic() + self.max_seconds
        try:
            while self.partitioned and not self._stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                _reset(link.client)
                return
            upstream.settimeout(10)
            link.client.settimeout(10)
            link.upstream = upstream
            self._pump(link, deadline)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.remove(link)
            for s in (link.client, link.upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _pump(self, link: _Link, deadline: float) -> None:
        client, upstream = link.client, link.upstream
        assert upstream is not None
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.partitioned:
                time.sleep(0.05)
                continue
            fault = link.fault
            if fault.mode == "refuse":  # struck while open: reset now
                _reset(client)
                _reset(upstream)
                return
            readable, _, _ = select.select([client, upstream], [], [], 0.1)
            for src in readable:
                dst = upstream if src is client else client
                data = src.recv(65536)
                if not data:
                    return
                if fault.mode == "blackhole":
                    continue
                if fault.mode == "delay":
                    time.sleep(fault.delay)
                if fault.mode in ("cut", "reset") and link.forwarded + len(data) > fault.budget:
                    head = data[: fault.budget - link.forwarded]
                    if head:
                        dst.sendall(head)
                    if fault.mode == "reset":
                        _reset(client)
                        _reset(upstream)
                    return
                dst.sendall(data)
                link.forwarded += len(data)


# --------------------------------------------------------------------- writers


@dataclass
class Op:
    """One write batch as a writer sent it, and what became of it."""

    seq: int
    kind: str  # "batch" or "replace"
    upserts: dict[bytes, Any]
    deletes: list[bytes]
    state: str = "new"  # acked, not_sent, in_doubt, committed, absent, rejected
    result: dict[str, Any] | None = None
    detail: str = ""


def blob_key(writer: int, i: int) -> bytes:
    return b"w%d-%04d" % (writer, i)


def log_key(writer: int) -> bytes:
    return b"log-%d" % writer


def universe(dataset: str) -> list[bytes]:
    """Every key a writer of ``dataset`` may write."""
    if dataset == "blobs":
        keys = [blob_key(w, i) for w in range(BLOB_WRITERS) for i in range(KEYS_PER_WRITER)]
        return keys + [log_key(w) for w in range(BLOB_WRITERS)]
    if dataset == "typed":
        return [blob_key(9, i) for i in range(KEYS_PER_WRITER)] + [log_key(9)]
    return [b"bulk-%04d" % i for i in range(BULK_KEYS)] + [log_key(7)]


class Writer(threading.Thread):
    """Writes one dataset's part of the key space until stopped or paused.
    Every batch also sets the writer's log key to its sequence number."""

    def __init__(self, trial: Trial, dataset: str, index: int, rng: random.Random) -> None:
        super().__init__(name=f"writer-{dataset}-{index}", daemon=True)
        self.trial = trial
        self.dataset = dataset
        self.index = index
        self.rng = rng
        self.ops: list[Op] = []
        self.error: str | None = None

    # --- the batches

    def _keys(self) -> list[bytes]:
        if self.dataset == "bulk":
            return [b"bulk-%04d" % i for i in range(BULK_KEYS)]
        return [blob_key(self.index, i) for i in range(KEYS_PER_WRITER)]

    def _value(self, seq: int) -> Any:
        rng = self.rng
        if self.dataset == "blobs":
            return rng.randbytes(rng.choice((64, 700, 3000, 12_000)))
        if self.dataset == "bulk":
            return f"{seq}:{rng.getrandbits(40):x}".encode()
        cities = 4 + seq // 2  # the dictionary keeps growing
        return {
            "seq": seq,
            "w": self.index,
            "city": f"city-{rng.randrange(cities)}",
            "score": rng.choice((None, rng.randrange(-(10**9), 10**9))),
            "tags": rng.choice((None, [], [f"t{rng.randrange(50)}" for _ in range(3)])),
            "blob": rng.choice((None, rng.randbytes(rng.randrange(0, 300)))),
        }

    def _log_value(self, seq: int) -> Any:
        if self.dataset == "typed":
            return {
                "seq": seq,
                "w": self.index,
                "city": "log",
                "score": None,
                "tags": None,
                "blob": None,
            }
        return b"%d" % seq

    def _make(self, seq: int) -> Op:
        rng = self.rng
        keys = self._keys()
        if self.dataset == "bulk" and rng.random() < 0.3:
            chosen = rng.sample(keys, rng.randrange(len(keys) // 3, len(keys)))
            upserts = {k: self._value(seq) for k in chosen}
            upserts[log_key(self.index)] = self._log_value(seq)
            return Op(seq, "replace", upserts, [])
        chosen = rng.sample(keys, rng.randrange(1, 25))
        cut = rng.randrange(0, max(1, len(chosen) // 4))
        deletes, ups = chosen[:cut], chosen[cut:]
        upserts = {k: self._value(seq) for k in ups}
        upserts[log_key(self.index)] = self._log_value(seq)
        return Op(seq, "batch", upserts, deletes)

    def _request(self, op: Op) -> tuple[str, bytes, dict[str, str]]:
        path = f"/v1/datasets/{self.dataset}/{op.kind}"
        if self.dataset == "bulk":  # JSON: opaque values as strings
            if op.kind == "replace":
                doc: dict[str, Any] = {
                    "records": {k.decode(): v.decode() for k, v in op.upserts.items()}
                }
            else:
                doc = {
                    "upserts": {k.decode(): v.decode() for k, v in op.upserts.items()},
                    "deletes": [k.decode() for k in op.deletes],
                }
            return path, json.dumps(doc).encode(), {"content-type": "application/json"}
        body = msgpack.packb({"upserts": op.upserts, "deletes": op.deletes}, use_bin_type=True)
        return path, body, {"content-type": "application/msgpack"}

    # --- the loop

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # reported by the trial, never swallowed
            self.error = f"{type(exc).__name__}: {exc}"

    def _loop(self) -> None:
        trial = self.trial
        seq = 0
        with httpx.Client(timeout=30.0) as client:
            while not trial.stop_writers.is_set() and len(self.ops) < 5000:
                trial.writers_may_run.wait(1.0)
                if not trial.writers_may_run.is_set():
                    continue
                seq += 1
                op = self._make(seq)
                self.ops.append(op)
                path, body, headers = self._request(op)
                try:
                    resp = client.post(trial.origin.base_url + path, content=body, headers=headers)
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    op.state = "not_sent"
                    time.sleep(0.05)
                    continue
                except httpx.TransportError as exc:
                    op.state, op.detail = "in_doubt", type(exc).__name__
                    self._settle(client, op)
                    continue
                if resp.status_code == 200:
                    op.state, op.result = "acked", resp.json()
                else:
                    op.state, op.detail = "rejected", f"{resp.status_code} {resp.text[:200]}"
                    if resp.status_code != 507:
                        raise RuntimeError(f"batch {seq} rejected: {op.detail}")
                time.sleep(self.rng.uniform(0.0, 0.03))

    def _settle(self, client: httpx.Client, op: Op) -> None:
        """Was the in-doubt ``op`` committed? The log key says (it is only
        ever set by this writer, to the sequence number of its batch)."""
        url = (
            f"{self.trial.origin.base_url}/v1/datasets/{self.dataset}/records/"
            + log_key(self.index).decode()
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                resp = client.get(url)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if resp.status_code == 404:
                op.state = "absent"
                return
            if resp.status_code != 200:
                time.sleep(0.1)
                continue
            doc = resp.json()
            seq = int(doc["record"]["seq"]) if "record" in doc else int(doc["value"])
            op.state = "committed" if seq == op.seq else "absent"
            return
        raise RuntimeError(f"could not settle batch {op.seq}: the origin stayed away")

    def committed(self) -> list[Op]:
        return [op for op in self.ops if op.state in ("acked", "committed")]


def replay(writers: list[Writer]) -> dict[bytes, Any]:
    """The content the committed batches of ``writers`` (one dataset, disjoint
    key spaces) must have left."""
    state: dict[bytes, Any] = {}
    for w in writers:
        mine: dict[bytes, Any] = {}
        for op in w.committed():
            if op.kind == "replace":
                mine = dict(op.upserts)
            else:
                for k in op.deletes:
                    mine.pop(k, None)
                mine.update(op.upserts)
        state.update(mine)
    return state


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (decoded records use either)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------- one trial


def _tail(path: Path, lines: int = 12) -> str:
    """The last log lines that say something (not one line per request)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    noise = ('"logger": "httpx"', '"msg": "request"')
    return "\n".join([x for x in text if not any(n in x for n in noise)][-lines:])


@dataclass
class Node:
    """A sidecar of the trial, its reader process, and how to reach it."""

    name: str
    proc: SidecarProcess
    reader: subprocess.Popen[str] | None = None
    kills: int = 0


@dataclass
class TrialResult:
    seed: int
    seconds: float
    events: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    proxy_faults: Counter[str] = field(default_factory=Counter)
    observations: int = 0
    verified: int = 0
    converge_seconds: float = 0.0
    elapsed: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        ev = ",".join(f"{k}={v}" for k, v in sorted(self.events.items()))
        wr = ",".join(f"{k}={v}" for k, v in sorted(self.writes.items()))
        px = ",".join(f"{k}={v}" for k, v in sorted(self.proxy_faults.items()))
        return (
            f"seed={self.seed} ok in {self.elapsed:.1f}s; faults[{ev}] proxy[{px}] "
            f"writes[{wr}] reads: {self.observations} cursors seen, {self.verified} "
            f"checked against acknowledged digests; converged {self.converge_seconds:.1f}s "
            "after healing; phases " + " ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        )


class Trial:
    """One chaos trial; :meth:`run` returns a TrialResult or raises ChaosFailureError."""

    def __init__(
        self,
        seed: int,
        workdir: Path,
        *,
        seconds: float = 8.0,
        converge_timeout: float = 90.0,
    ) -> None:
        self.seed = seed
        self.workdir = workdir
        self.seconds = seconds
        self.converge_timeout = converge_timeout
        self.rng = random.Random(f"{seed}/schedule")
        self.result = TrialResult(seed, seconds)
        self.timeline: list[str] = []
        self.t0 = time.monotonic()
        self.stop_writers = threading.Event()
        self.writers_may_run = threading.Event()
        self.writers_may_run.set()
        self.origin = OriginProcess(
            workdir / "origin",
            durable=True,
            max_body_mb=16,
            # every body of 1 KiB or more goes through an ingest worker (which
            # is killed with the origin), smaller ones are decoded in process
            extra_config="map_size_mb = 1\nmax_map_size_mb = 512\ngroup_commit_max = 64\n"
            "ingest_workers = 1\ningest_offload_kb = 1",
            start_timeout=60.0,
        )
        self.proxies: list[FaultProxy] = []
        self.nodes: dict[str, Node] = {}
        self.writers: list[Writer] = []
        self.stopfile = workdir / "stop-readers"
        self.relay_port = free_port()
        self._lock = threading.Lock()
        self.busy: set[str] = set()
        self.actions: list[threading.Thread] = []
        self.action_errors: list[str] = []

    # --- bookkeeping

    def event(self, what: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def fail(self, message: str) -> ChaosFailureError:
        tails = [f"--- origin log\n{_tail(self.origin.log_path)}"]
        for node in self.nodes.values():
            tails.append(f"--- {node.name} log\n{_tail(node.proc.log_path)}")
        return ChaosFailureError(
            f"chaos trial failed (seed {self.seed}): {message}\n"
            f"replay: {replay_command(self.seed, self.seconds)}\n"
            "--- timeline (last 40 events)\n"
            + "\n".join(self.timeline[-40:])
            + "\n"
            + "\n".join(tails)
        )

    # --- set-up

    def _create_datasets(self) -> None:
        bodies: list[dict[str, Any]] = [
            {"name": "blobs", "opaque": True, "compress": False, "queue": {"max_entries": 16}},
            {"name": "typed", "schema": TYPED_SCHEMA},
            {"name": "bulk", "opaque": True},
        ]
        for body in bodies:
            resp = httpx.post(self.origin.base_url + "/v1/datasets", json=body, timeout=30)
            if resp.status_code != 201:
                raise self.fail(f"cannot create {body['name']}: {resp.text}")

    def _sidecar(self, name: str, origin_url: str, *, relay: bool = False) -> SidecarProcess:
        env = dict(SIDECAR_ENV)
        if relay:
            env["SIDECAR_SERVE_SYNC"] = f"127.0.0.1:{self.relay_port}"
        return PatientSidecar(
            self.workdir / name, origin_url, list(DATASETS), poll_interval=0.5, extra_env=env
        )

    def _start_reader(self, node: Node) -> None:
        specs = []
        for ds in DATASETS:
            path = self.workdir / f"keys-{ds}.txt"
            specs.append(f"{ds}={path}")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        node.reader = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos_reader",
                str(node.proc.data),
                str(self.stopfile),
                *specs,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _start_node(self, node: Node) -> None:
        node.proc.workdir.mkdir(parents=True, exist_ok=True)
        node.proc.start(timeout=60.0)

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for ds in DATASETS:
            (self.workdir / f"keys-{ds}.txt").write_text("\n".join(k.hex() for k in universe(ds)))
        self.origin.__enter__()
        self._create_datasets()
        front = FaultProxy("A", self.origin.port, random.Random(f"{self.seed}/proxyA"))
        back = FaultProxy("B", self.relay_port, random.Random(f"{self.seed}/proxyB"))
        self.proxies = [front, back]
        self.writers = [
            Writer(self, "blobs", i, random.Random(f"{self.seed}/blobs{i}"))
            for i in range(BLOB_WRITERS)
        ]
        self.writers.append(Writer(self, "typed", 9, random.Random(f"{self.seed}/typed")))
        self.writers.append(Writer(self, "bulk", 7, random.Random(f"{self.seed}/bulk")))
        for w in self.writers:
            w.start()
        time.sleep(0.5)  # some data before the first bootstrap
        self.nodes = {
            "s1": Node("s1", self._sidecar("s1", front.url)),
            "s2": Node("s2", self._sidecar("s2", front.url)),
            "relay": Node("relay", self._sidecar("relay", front.url, relay=True)),
            "s3": Node("s3", self._sidecar("s3", back.url)),
        }
        for name, node in self.nodes.items():
            if name != "s2":  # s2 is wiped now and then: no reader follows it
                self._start_reader(node)
            self._spawn(name, partial(self._start_node, node))
        for t in self.actions:
            t.join(120)
        if self.action_errors:
            raise self.fail(f"a sidecar did not start: {self.action_errors}")
        self.event("all processes up")

    # --- faults

    def _spawn(self, target: str, action: Callable[[], None]) -> None:
        """Run a fault in its own thread (restarts take seconds), one at a
        time per target."""

        def guarded() -> None:
            try:
                action()
            except BaseException as exc:
                self.action_errors.append(f"{target}: {exc}")
            finally:
                with self._lock:
                    self.busy.discard(target)

        with self._lock:
            self.busy.add(target)
        t = threading.Thread(target=guarded, name=f"fault-{target}", daemon=True)
        self.actions.append(t)
        t.start()

    def _idle(self, targets: list[str]) -> list[str]:
        with self._lock:
            return [t for t in targets if t not in self.busy]

    def _kill_node(self, node: Node, moment: str, pause: float, head_start: float) -> None:
        proc = node.proc
        if moment == "bootstrap":
            proc.kill9()
            shutil.rmtree(proc.data, ignore_errors=True)
            self._start_node(node)
            time.sleep(head_start)
        elif moment == "apply" and proc.proc is not None:
            pid = proc.proc.pid
            deadline = time.monotonic() + head_start + 0.2
            while time.monotonic() < deadline and not apply_in_progress(pid):
                time.sleep(0.002)
            if time.monotonic() >= deadline:
                moment = "apply-missed"
        proc.kill9()
        node.kills += 1
        self.result.events[f"kill-{node.name}-{moment}"] += 1
        self.event(f"kill -9 {node.name} ({moment})")
        time.sleep(pause)
        self._start_node(node)
        self.event(f"{node.name} restarted")

    def _kill_origin(self, paused: bool, pause: float) -> None:
        if paused:  # writers idle: the kill lands between commits
            self.writers_may_run.clear()
            time.sleep(0.2)
        self.origin.kill9()
        self.result.events["kill-origin" + ("-idle" if paused else "-writing")] += 1
        self.event("kill -9 origin" + (" (writers paused)" if paused else ""))
        time.sleep(pause)
        try:
            self.origin.start(same_port=True)
        finally:
            self.writers_may_run.set()
        self.event("origin restarted")

    def _partition(self, proxy: FaultProxy, span: float) -> None:
        proxy.partitioned = True
        self.result.events[f"partition-{proxy.name}"] += 1
        self.event(f"partition at proxy {proxy.name} for {span:.1f}s")
        time.sleep(span)
        proxy.partitioned = False
        self.event(f"partition at proxy {proxy.name} over")

    def chaos(self) -> None:
        """Draw faults from the schedule's random source until the chaos
        phase ends (every draw happens here, in one thread, in order)."""
        rng = self.rng
        end = time.monotonic() + self.seconds
        steps = 0
        while time.monotonic() < end and steps < 1000:
            steps += 1
            roll = rng.random()
            if roll < 0.40:
                names = self._idle(list(self.nodes))
                name = rng.choice(names) if names else None
                moment = rng.choice(("now", "apply", "apply"))
                if name == "s2" and rng.random() < 0.4:
                    moment = "bootstrap"
                pause, head_start = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.2)
                if name is not None:
                    node = self.nodes[name]
                    self._spawn(name, partial(self._kill_node, node, moment, pause, head_start))
            elif roll < 0.55:
                paused, pause = rng.random() < 0.2, rng.uniform(0.0, 1.0)
                if self._idle(["origin"]):
                    self._spawn("origin", partial(self._kill_origin, paused, pause))
            elif roll < 0.85:
                proxy = rng.choice(self.proxies)
                if rng.random() < 0.3:
                    span = rng.uniform(0.3, 2.5)
                    if self._idle([f"proxy-{proxy.name}"]):
                        self._spawn(f"proxy-{proxy.name}", partial(self._partition, proxy, span))
                else:
                    rate = rng.choice((0.2, 0.5, 0.9))
                    hit = proxy.strike(rate)
                    self.result.events[f"faulty-{proxy.name}"] += 1
                    self.event(
                        f"proxy {proxy.name}: faults on {rate:.0%} of connections ({hit} live hit)"
                    )
            else:
                for p in self.proxies:
                    p.heal()
                self.event("calm")
            for w in self.writers:
                if w.error:
                    raise self.fail(f"{w.name}: {w.error}")
            if self.action_errors:
                raise self.fail(f"a fault action failed: {self.action_errors}")
            time.sleep(rng.uniform(0.05, 0.5))

    # --- healing and checks

    def heal(self) -> None:
        for p in self.proxies:
            p.heal()
        for t in self.actions:
            t.join(120)
            if t.is_alive():
                raise self.fail(f"{t.name} did not finish")
        if self.action_errors:
            raise self.fail(f"a fault action failed: {self.action_errors}")
        self.event("healed; writers stop")
        self.stop_writers.set()
        self.writers_may_run.set()
        for w in self.writers:
            w.join(90)
            if w.is_alive():
                raise self.fail(f"{w.name} did not stop")
            if w.error:
                raise self.fail(f"{w.name}: {w.error}")
        start = time.monotonic()
        target = {ds: self._origin_info(ds) for ds in DATASETS}

        def caught_up(status: dict[str, Any]) -> bool:
            for ds, info in target.items():
                mine = status["datasets"][ds]
                if mine["epoch"] != info["epoch"] or mine["version"] != info["version"]:
                    return False
            return bool(status["datasets"]["typed"]["json_view"] == "built")

        deadline = start + self.converge_timeout
        for node in self.nodes.values():
            left = max(1.0, deadline - time.monotonic())
            try:
                node.proc.wait_until(caught_up, timeout=left)
            except AssertionError as exc:
                raise self.fail(
                    f"{node.name} did not converge in time: {str(exc)[:2000]}"
                ) from None
        self.result.converge_seconds = time.monotonic() - start
        self.event(f"converged in {self.result.converge_seconds:.1f}s")

    def _origin_info(self, ds: str) -> dict[str, Any]:
        resp = httpx.get(f"{self.origin.base_url}/v1/datasets/{ds}", timeout=30)
        if resp.status_code != 200:
            raise self.fail(f"dataset {ds}: {resp.status_code} {resp.text}")
        doc: dict[str, Any] = resp.json()
        return doc

    def origin_snapshot(self, ds: str) -> SnapshotChunk:
        """Every record of ``ds`` in one consistent chunk, through the sync API."""
        body = encode_frame(*to_wire(SnapshotRequest(ds, None, 10_000_000, False)))
        resp = httpx.post(
            self.origin.base_url + "/v1/sync",
            content=body,
            headers={"content-type": FRAME},
            timeout=60,
        )
        if resp.status_code != 200:
            raise self.fail(f"snapshot of {ds}: {resp.status_code} {resp.text[:300]}")
        decoder = FrameDecoder()
        decoder.receive_data(resp.content)
        frame = decoder.next_frame()
        decoder.close()
        if frame is None:
            raise self.fail(f"snapshot of {ds}: no frame")
        chunk = from_wire(frame.kind, frame.body)
        if not isinstance(chunk, SnapshotChunk) or chunk.next_after is not None:
            raise self.fail(f"snapshot of {ds}: not one whole chunk")
        return chunk

    def _check_json_view(
        self, name: str, snap: Any, chunk: SnapshotChunk, records: dict[bytes, bytes]
    ) -> None:
        """Every row of the JSON view is its record's reply (a row may be
        missing while the view is rebuilt), and no key without a record has
        one; caught up, the view is built: every record has its row."""
        fetch = snap.json_fetcher("typed")
        if fetch is None or chunk.meta is None:
            raise self.fail(f"{name}/typed: no JSON view")
        render = JsonRenderer(codec_from_definition(chunk.meta.body))
        for key in set(universe("typed")) | set(records):
            row = fetch(key)
            if row is None:
                if key in records:
                    raise self.fail(f"{name}/typed: the built JSON view has no row for {key!r}")
                continue
            if key not in records:
                raise self.fail(f"{name}/typed: a JSON view row for {key!r}, which has no record")
            if row != bulk(render(records[key])):
                raise self.fail(
                    f"{name}/typed: the JSON view's row for {key!r} is not its record's"
                )

    def check(self) -> None:
        acked: dict[str, Digest] = {}
        for w in self.writers:
            for op in w.ops:
                self.result.writes[op.state] += 1
                if op.state == "acked" and op.result is not None:
                    r = op.result
                    acked[f"{w.dataset} {r['epoch']} {r['version']}"] = Digest.from_bytes(
                        bytes.fromhex(r["digest"])
                    )
        origin: dict[str, SnapshotChunk] = {}
        for ds in DATASETS:
            chunk = self.origin_snapshot(ds)
            origin[ds] = chunk
            info = self._origin_info(ds)
            if (chunk.cursor.epoch.hex(), chunk.cursor.version) != (info["epoch"], info["version"]):
                raise self.fail(f"{ds}: the origin moved after the writers stopped")
            acked[f"{ds} {info['epoch']} {info['version']}"] = chunk.digest
            acked[f"{ds} {info['epoch']} 0"] = EMPTY_DIGEST
            xor = 0
            for k, v in chunk.records:
                xor ^= entry_hash(k, v)
            if Digest(len(chunk.records), xor) != chunk.digest:
                raise self.fail(f"{ds}: the origin's digest does not match its records")
            # 1. durability: the committed batches replayed give the origin's content
            expected = replay([w for w in self.writers if w.dataset == ds])
            if chunk.meta is None:
                raise self.fail(f"{ds}: the first snapshot chunk has no definition")
            codec = codec_from_definition(chunk.meta.body)
            got: dict[bytes, Any] = {}
            for k, v in chunk.records:
                got[k] = _plain(codec.decode(v)) if codec.is_typed else codec.decode_opaque(v)
            expected = {k: _plain(v) for k, v in expected.items()}
            if got != expected:
                missing = sorted(set(expected) - set(got))[:5]
                extra = sorted(set(got) - set(expected))[:5]
                differ = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:5]
                raise self.fail(
                    f"{ds}: the origin's content is not the replay of the committed batches: "
                    f"missing {missing}, unexpected {extra}, different {differ}"
                )
            max_acked = max(
                (
                    op.result["version"]
                    for w in self.writers
                    if w.dataset == ds
                    for op in w.ops
                    if op.state == "acked"
                    and op.result is not None
                    and op.result["epoch"] == info["epoch"]
                ),
                default=0,
            )
            if info["version"] < max_acked:
                raise self.fail(f"{ds}: version {info['version']} < acknowledged {max_acked}")
        # 2. convergence: every mirror holds the origin's cursor and records
        for node in self.nodes.values():
            with Reader(node.proc.data) as reader, reader.snapshot() as snap:
                for ds in DATASETS:
                    cursor = snap.version(ds)
                    if cursor != origin[ds].cursor:
                        raise self.fail(
                            f"{node.name}/{ds}: at {cursor}, origin at {origin[ds].cursor}"
                        )
                    keys = snap.keys(ds, limit=10**9)
                    mine = [(k, bytes(snap.raw(ds, k) or b"")) for k in keys]
                    if mine != sorted(origin[ds].records):
                        raise self.fail(f"{node.name}/{ds}: content differs from the origin's")
                    if ds == "typed":
                        self._check_json_view(node.name, snap, origin[ds], dict(mine))
        # 3. readers: one digest per cursor, the acknowledged one when known
        self.stopfile.touch()
        for node in self.nodes.values():
            if node.reader is None:
                continue
            try:
                out, err = node.reader.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                raise self.fail(f"reader of {node.name} did not stop") from None
            if node.reader.returncode != 0:
                raise self.fail(f"reader of {node.name} failed: {err[-2000:]}")
            report = json.loads(out)
            if report["mixed_cursors"] or report["regressions"]:
                raise self.fail(
                    f"reader of {node.name}: {report['mixed_cursors']} {report['regressions']}"
                )
            if report["rounds"] < 10 or not report["observations"]:
                raise self.fail(f"reader of {node.name} read too little: {report}")
            unexpected = set(report["errors"]) - {"UnknownDatasetError", "StorageError"}
            if unexpected:
                raise self.fail(
                    f"reader of {node.name} met {report['errors']}: {report['first_error']}"
                )
            for where, digests in report["observations"].items():
                self.result.observations += 1
                if len(digests) != 1:
                    raise self.fail(f"reader of {node.name}: torn read at {where}: {digests}")
                want = acked.get(where)
                if want is not None:
                    self.result.verified += 1
                    (seen,) = digests
                    if seen != want.hex():
                        raise self.fail(
                            f"reader of {node.name}: at {where} saw digest {seen}, "
                            f"the origin acknowledged {want.hex()}"
                        )

    def close(self) -> None:
        self.stop_writers.set()
        self.writers_may_run.set()
        self.stopfile.touch()
        for t in self.actions:
            t.join(120)
        stoppers = [
            threading.Thread(target=node.proc.stop, daemon=True) for node in self.nodes.values()
        ]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(30)
        for node in self.nodes.values():
            if node.reader is not None and node.reader.poll() is None:
                try:
                    node.reader.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    node.reader.kill()
                    node.reader.communicate()
        for p in self.proxies:
            self.result.proxy_faults.update(p.injected)
            p.close()
        with contextlib.suppress(Exception):
            self.origin.stop()
        for w in self.writers:
            w.join(30)

    def run(self) -> TrialResult:
        phases = self.result.phases
        try:
            for name, step in (
                ("setup", self.setup),
                ("chaos", self.chaos),
                ("heal", self.heal),
                ("check", self.check),
            ):
                began = time.monotonic()
                step()
                phases[name] = time.monotonic() - began
        finally:
            began = time.monotonic()
            self.close()
            phases["teardown"] = time.monotonic() - began
        self.result.elapsed = time.monotonic() - self.t0
        return self.result


def run_trial(
    seed: int,
    *,
    seconds: float = 8.0,
    converge_timeout: float = 90.0,
    root: Path | None = None,
    keep: bool = False,
) -> TrialResult:
    """One trial in a fresh directory (under ``root``, else a temporary
    one), removed afterwards unless ``keep`` (or the trial failed and
    ``keep``)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-", dir=root))
    try:
        return Trial(seed, workdir, seconds=seconds, converge_timeout=converge_timeout).run()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _no_proxy_env() -> Iterator[None]:
    """httpx honours HTTP(S)_PROXY: loopback traffic must not go to one."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    try:
        yield
    finally:
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the first trial (then +1 each)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="chaos phase of each trial")
    parser.add_argument("--converge-timeout", type=float, default=90.0)
    parser.add_argument("--keep", action="store_true", help="keep each trial's files")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="start no trial after this long"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every trial stops its processes
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    passed = failed = 0
    started = time.monotonic()
    with _no_proxy_env():
        for seed in range(args.seed, args.seed + args.trials):
            if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
                print(f"time budget of {args.max_minutes:g} min spent: stopping", flush=True)
                break
            try:
                result = run_trial(
                    seed,
                    seconds=args.seconds,
                    converge_timeout=args.converge_timeout,
                    keep=args.keep,
                )
            except ChaosFailureError as exc:
                failed += 1
                print(f"FAILED {exc}", flush=True)
                if args.stop_on_failure:
                    break
                continue
            passed += 1
            print(result.line(), flush=True)
    print(f"chaos: {passed} passed, {failed} failed in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
