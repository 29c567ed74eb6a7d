"""The Redis-protocol socket of a real sidecar process, over real unix
sockets: every command family, pipelining, many concurrent clients, bad
RESP, redis-py and redis-cli as they are, HMGET consistency while the
sidecar applies diffs, and the limits and the socket file's life (mode,
group, a stale file replaced, a live one refused, max clients, idle
timeout, request size, a worker killed, SIGTERM removing the file).

One origin process serves every test; one sidecar serves the command tests
and a second, with tight limits, the limit tests.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lmdb
import msgpack
import pytest
import redis

from replicad.codec import DatasetCodec
from replicad.sample import seed_like_record, seed_like_schema
from tests.origin_proc import OriginProcess
from tests.procs import ROOT
from tests.sidecar_proc import SidecarProcess
from tests.test_sched import custom_slices_supported, slice_of

CODEC = DatasetCodec([seed_like_schema()])
RECORDS = 300
VER_KEYS = [b"k%04d" % i for i in range(1000)]
REDIS_CLI = shutil.which("redis-cli")


# --------------------------------------------------------------------- a client


class Resp:
    """A minimal RESP2/RESP3 client over one unix socket connection."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, *commands: list[bytes | str]) -> None:
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for a in args:
                data = a.encode() if isinstance(a, str) else a
                out += b"$%d\r\n%b\r\n" % (len(data), data)
        self.sock.sendall(out)

    def call(self, *args: bytes | str) -> Any:
        self.send(list(args))
        return self.read()

    def read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise EOFError("connection closed")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            return RuntimeError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"_":
            return None
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind in (b"*", b"%"):
            n = int(body)
            if n < 0:
                return None
            items = [self.read() for _ in range(n * (2 if kind == b"%" else 1))]
            return dict(zip(items[0::2], items[1::2], strict=True)) if kind == b"%" else items
        raise AssertionError(f"unexpected reply line {line!r}")

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False


def wait_socket(path: Path, sidecar: SidecarProcess, timeout: float = 20.0) -> None:
    """Until the socket answers PING (the health port may answer first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = Resp(path, timeout=2.0)
            try:
                if c.call("PING") == "PONG":
                    return
            finally:
                c.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer on {path}\n{sidecar.log_tail()}")
        time.sleep(0.05)


def expected(i: int) -> dict[str, Any]:
    doc: dict[str, Any] = CODEC.decode(CODEC.encode(seed_like_record(i)))
    return doc


def write(client: httpx.Client, dataset: str, upserts: dict[bytes, Any]) -> int:
    body = msgpack.packb({"upserts": upserts}, use_bin_type=True)
    r = client.post(
        f"/v1/datasets/{dataset}/batch",
        content=body,
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


# --------------------------------------------------------------------- fixtures


class Env:
    def __init__(self, origin: OriginProcess, client: httpx.Client, base: Path) -> None:
        self.origin = origin
        self.client = client
        self.base = base


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("resp")
    with (
        OriginProcess(base / "origin", durable=False, max_body_mb=8) as origin,
        httpx.Client(base_url=origin.base_url, timeout=60) as client,
    ):
        schema = seed_like_schema().to_json()
        assert client.post("/v1/datasets", json={"name": "up", "schema": schema}).is_success
        assert client.post("/v1/datasets", json={"name": "blobs", "opaque": True}).is_success
        assert client.post("/v1/datasets", json={"name": "ver", "opaque": True}).is_success
        write(client, "up", {b"user:%04d" % i: seed_like_record(i) for i in range(RECORDS)})
        write(client, "blobs", {b"b1": b"hello", b"b2": b"\x00\xff\r\n"})
        write(client, "ver", dict.fromkeys(VER_KEYS, b"1"))
        yield Env(origin, client, base)


@pytest.fixture(scope="module")
def served(env: Env) -> Iterator[tuple[SidecarProcess, Path]]:
    path = env.base / "s" / "redis.sock"
    extra = {"SIDECAR_SOCKET": str(path), "SIDECAR_SOCKET_WORKERS": "2"}
    with SidecarProcess(
        env.base / "s", env.origin.base_url, ["up", "blobs", "ver"], extra_env=extra
    ) as sidecar:
        sidecar.wait_ready()
        wait_socket(path, sidecar)
        yield sidecar, path


@pytest.fixture
def conn(served: tuple[SidecarProcess, Path]) -> Iterator[Resp]:
    c = Resp(served[1])
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------- commands


def test_every_command_family(served: tuple[SidecarProcess, Path], conn: Resp) -> None:
    sidecar, _ = served
    assert conn.call("PING") == "PONG"
    assert json.loads(conn.call("HGET", "up", "user:0042")) == expected(42)
    assert conn.call("HGET", "blobs", "b2") == b"\x00\xff\r\n"
    assert conn.call("HGET", "up", "nope") is None
    assert conn.call("HGET", "nosuch", "user:0042") is None
    many = conn.call("HMGET", "up", "user:0001", "nope", "user:0299")
    assert [None if m is None else json.loads(m) for m in many] == [
        expected(1),
        None,
        expected(299),
    ]
    assert conn.call("HEXISTS", "up", "user:0007") == 1
    assert conn.call("HEXISTS", "up", "user:9999") == 0
    assert conn.call("HLEN", "up") == RECORDS
    assert conn.call("HLEN", "nosuch") == 0
    assert conn.call("EXISTS", "up", "blobs", "nosuch") == 2
    assert conn.call("TYPE", "up") == "hash"
    assert json.loads(conn.call("HGETFIELDS", "up", "user:0042", "age")[0]) == expected(42)["age"]
    assert conn.call("HGETFIELDS", "up", "nope", "age") is None
    keys: list[bytes] = []
    cursor = b"0"
    while True:
        cursor, page = conn.call("HSCAN", "up", cursor, "COUNT", "64")
        keys += page[0::2]
        if cursor == b"0":
            break
    assert keys == [b"user:%04d" % i for i in range(RECORDS)]
    # the sync loop's state reaches the workers every 0.1 s (docs/reads.md):
    # wait, boundedly, until this worker has the ready state /readyz reported
    deadline = time.monotonic() + 10
    while True:
        info = conn.call("INFO", "replication").decode()
        if info.count(",ready=1") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    status = sidecar.status()["datasets"]
    for name in ("up", "blobs", "ver"):
        line = next(x for x in info.split("\r\n") if x.startswith(f"dataset_{name}:"))
        fields = dict(item.split("=") for item in line.split(":", 1)[1].split(","))
        assert int(fields["version"]) == status[name]["version"]
        assert fields["epoch"] == status[name]["epoch"] and fields["ready"] == "1"
        assert fields["lag_versions"] == "0"
    assert "sidecar_ready:1" in info
    # errors say what is wrong, and the connection carries on
    assert str(conn.call("HGET", "up")) == "ERR wrong number of arguments for 'hget' command"
    assert str(conn.call("NOPE", "x")).startswith("ERR unknown command 'NOPE'")
    assert str(conn.call("GET", "up")).startswith("WRONGTYPE")
    assert str(conn.call("HSET", "up", "a", "b")).startswith("READONLY")
    assert str(conn.call("HSCAN", "up", "zz")) == "ERR invalid cursor"
    assert conn.call("CONFIG", "GET", "maxclients") == [b"maxclients", b"10000"]
    assert conn.call("QUIT") == "OK"
    assert conn.closed_by_server()


def test_pipelining_keeps_order(conn: Resp) -> None:
    commands: list[list[bytes | str]] = []
    for i in range(3000):
        if i % 3 == 0:
            commands.append(["HEXISTS", "up", f"user:{i % 400:04d}"])
        else:
            commands.append(["HGET", "blobs", "b1" if i % 2 else "zz"])
    conn.send(*commands)  # one write of every command
    for i in range(3000):
        reply = conn.read()
        if i % 3 == 0:
            assert reply == (1 if i % 400 < RECORDS else 0), i
        else:
            assert reply == (b"hello" if i % 2 else None), i


def test_commands_in_pieces_among_other_connections(
    served: tuple[SidecarProcess, Path], conn: Resp
) -> None:
    """A command that arrives a few bytes at a time, while another connection
    of the same worker is read in between (the worker reads every connection
    into one reusable buffer), comes out whole."""
    others = [Resp(served[1]) for _ in range(3)]  # one shares conn's worker, at least
    try:
        wire = b"*3\r\n$4\r\nHGET\r\n$2\r\nup\r\n$9\r\nuser:0007\r\n" * 2
        for i in range(0, len(wire), 5):
            conn.sock.sendall(wire[i : i + 5])
            for other in others:
                assert other.call("HGET", "blobs", "b1") == b"hello"
        for _ in range(2):
            assert json.loads(conn.read()) == expected(7)
    finally:
        for other in others:
            other.close()


def test_a_client_that_does_not_read_its_replies(conn: Resp) -> None:
    """About 3 MB of replies pipelined before the client reads any: the
    server stops reading from it while its replies wait, then carries on."""
    commands: list[list[bytes | str]] = [
        ["HGET", "up", f"user:{i % RECORDS:04d}"] for i in range(6000)
    ]
    conn.send(*commands)
    time.sleep(0.5)
    for i in range(6000):
        assert json.loads(conn.read())["age"] == expected(i % RECORDS)["age"], i
    assert conn.call("PING") == "PONG"


def test_many_concurrent_clients(served: tuple[SidecarProcess, Path]) -> None:
    path = served[1]
    clients = [Resp(path) for _ in range(200)]
    try:
        for i, c in enumerate(clients):  # all open at once, each with a request in flight
            c.send(["HGET", "up", f"user:{i % RECORDS:04d}"])
        for i, c in enumerate(clients):
            assert json.loads(c.read()) == expected(i % RECORDS)
    finally:
        for c in clients:
            c.close()
    errors: list[BaseException] = []
    pool = redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=str(path))

    def work(t: int) -> None:
        try:
            r = redis.Redis(connection_pool=pool)
            for i in range(100):
                key = f"user:{(t * 100 + i) % RECORDS:04d}"
                assert json.loads(r.hget("up", key) or b"") == expected((t * 100 + i) % RECORDS)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.disconnect()
    assert not errors, errors[0]


def test_bad_resp_closes_that_connection_only(served: tuple[SidecarProcess, Path]) -> None:
    path = served[1]
    bystander = Resp(path)
    bad = Resp(path)
    try:
        assert bystander.call("PING") == "PONG"
        bad.sock.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nfoo\r\n*x\r\n")
        assert bad.read() == "PONG"  # what came before the fault is answered
        error = bad.read()
        assert isinstance(error, RuntimeError)
        assert str(error).startswith("ERR Protocol error: expected a bulk string")
        assert bad.closed_by_server()
        assert bystander.call("HLEN", "up") == RECORDS
    finally:
        bad.close()
        bystander.close()
    # an inline command (telnet style) is fine; a huge bulk length is not
    raw = Resp(path)
    try:
        raw.sock.sendall(b"PING\r\nHLEN up\r\n")
        assert raw.read() == "PONG" and raw.read() == RECORDS
        raw.sock.sendall(b"*1\r\n$999999999999\r\n")
        assert str(raw.read()).startswith("ERR Protocol error: bulk string of")
        assert raw.closed_by_server()
    finally:
        raw.close()


@pytest.mark.parametrize("protocol", [3, 2])
def test_redis_py_as_it_is(served: tuple[SidecarProcess, Path], protocol: int) -> None:
    """redis-py 8 speaks RESP3 by default (HELLO 3 on connect); both work."""
    r = redis.Redis(unix_socket_path=str(served[1]), protocol=protocol, client_name="py-test")
    try:
        assert r.ping() is True
        assert json.loads(r.hget("up", "user:0003") or b"") == expected(3)
        assert r.hget("up", "missing") is None
        got = r.hmget("up", ["user:0001", "missing"])
        assert json.loads(got[0] or b"") == expected(1) and got[1] is None
        assert r.hexists("up", "user:0001") is True
        assert r.hlen("up") == RECORDS
        assert r.exists("up", "ver", "nosuch") == 2
        assert r.client_getname() in ("py-test", b"py-test")
        keys = [k for k, _ in r.hscan_iter("up", match="user:01*", count=7)]
        assert sorted(keys) == [b"user:%04d" % i for i in range(100, 200)]
        assert len(list(r.hscan_iter("up", count=50, no_values=True))) == RECORDS
        info = r.info("replication")
        assert info["sidecar_ready"] == 1 and info["dataset_up"]["records"] == RECORDS
        assert r.info()["redis_version"] == "7.0.0"
        pipe = r.pipeline(transaction=False)
        for i in range(50):
            pipe.hget("up", f"user:{i:04d}")
        assert [json.loads(v) for v in pipe.execute()] == [expected(i) for i in range(50)]
        command: Any = r.execute_command  # untyped in redis-py
        fields = command("HGETFIELDS", "up", "user:0005", "city", "age")
        assert [json.loads(f) for f in fields] == [expected(5)["city"], expected(5)["age"]]
        with pytest.raises(redis.ReadOnlyError):  # redis-py knows Redis' READONLY
            r.hset("up", "k", "v")
        with pytest.raises(redis.ResponseError, match="no field"):
            command("HGETFIELDS", "up", "user:0005", "nope")
    finally:
        r.close()


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")
def test_redis_cli_as_it_is(served: tuple[SidecarProcess, Path]) -> None:
    assert REDIS_CLI is not None
    path = str(served[1])

    def cli(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [REDIS_CLI, "-s", path, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert json.loads(cli("HGET", "up", "user:0009")) == expected(9)
    assert cli("HLEN", "up").strip() == str(RECORDS)
    assert cli("-3", "HGET", "blobs", "b1").strip() == "hello"  # HELLO 3 first
    assert cli("--no-raw", "HGET", "up", "nope").strip() == "(nil)"
    assert "dataset_up:version=" in cli("INFO", "replication")
    assert sorted(cli("--scan").split()) == ["blobs", "up", "ver"]
    assert sorted(cli("--scan", "--pattern", "u*").split()) == ["up"]
    piped = cli(stdin="PING\nHEXISTS up user:0001\nHGET nosuch x\n")
    assert piped.split("\n")[:2] == ["PONG", "1"]
    assert "unknown command" in cli("FOO")


def test_hmget_is_consistent_while_diffs_apply(
    env: Env, served: tuple[SidecarProcess, Path]
) -> None:
    """Every batch at the origin rewrites all keys of ``ver`` to its version
    number; an HMGET of every key, taken while the sidecar applies them,
    must hold one version only."""
    path = served[1]
    stop = threading.Event()
    versions: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            v = 1  # the version the fixture wrote
            while not stop.is_set():
                v = write(env.client, "ver", dict.fromkeys(VER_KEYS, str(v + 1).encode()))
                versions.append(v)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: set[bytes] = set()
    c = Resp(path)
    try:
        deadline = time.monotonic() + 3.0
        reads = 0
        while time.monotonic() < deadline or len(seen) < 3:
            values = c.call("HMGET", "ver", *VER_KEYS)
            assert len(set(values)) == 1, sorted(set(values))[:3]
            seen.add(values[0])
            reads += 1
            assert time.monotonic() < deadline + 10, "the sidecar did not follow the writes"
    finally:
        stop.set()
        thread.join()
        c.close()
    assert not errors, errors[0]
    assert len(seen) >= 3 and reads > 10, (len(seen), reads)


def _held_txnids(mirror: Path, pid: int) -> list[str]:
    """The snapshots (transaction ids; "-": none) LMDB's reader table shows
    for process ``pid``, read as ``mdb_stat -r`` would."""
    import lmdb

    env = lmdb.open(str(mirror), readonly=True, lock=True, max_dbs=1, create=False)
    try:
        rows = env.readers().splitlines()[1:]
    finally:
        env.close()
    return [row.split()[2] for row in rows if row.split()[0] == str(pid)]


@contextlib.contextmanager
def _serving_one_dataset(
    env: Env, tmp_path: Path, name: str, first: dict[bytes, bytes], **settings: str
) -> Iterator[tuple[SidecarProcess, Path]]:
    """A new opaque dataset at the origin holding ``first``, and a sidecar
    of its own serving it on a socket (``settings``: more SIDECAR_* values)."""
    assert env.client.post("/v1/datasets", json={"name": name, "opaque": True}).is_success
    write(env.client, name, first)
    path = Path(f"/tmp/sidecar-{name}-{os.getpid()}.sock")  # short: AF_UNIX paths
    extra = {"SIDECAR_SOCKET": str(path), **settings}
    with SidecarProcess(tmp_path / "s", env.origin.base_url, [name], extra_env=extra) as sc:
        sc.wait_ready()
        wait_socket(path, sc)
        yield sc, path


def test_a_worker_keeps_its_snapshot_until_a_commit_or_its_age(env: Env, tmp_path: Path) -> None:
    """A worker keeps one read snapshot across requests while nothing is
    committed: a write is still seen at once (the commit ends it), and an
    idle worker lets it go after ``socket_view_max_age``."""
    settings = {"SIDECAR_SOCKET_WORKERS": "1", "SIDECAR_SOCKET_VIEW_MAX_AGE": "3"}
    with _serving_one_dataset(env, tmp_path, "held", {b"k": b"1"}, **settings) as (sc, path):
        c = Resp(path)
        try:
            info = c.call("INFO", "server").decode()
            pid = int(next(x for x in info.splitlines() if x.startswith("process_id:"))[11:])
            assert c.call("HGET", "held", "k") == b"1"
            # the reply is out and the worker still holds the snapshot (the
            # reply leaves before the turn ends, so the check after the write
            # below is the one that catches a worker letting it go)
            held = [t for t in _held_txnids(tmp_path / "s" / "mirror", pid) if t != "-"]
            assert len(held) == 1, held
            version = write(env.client, "held", {b"k": b"2"})
            sc.wait_version("held", version)
            # committed and visible: the worker still holds the old snapshot,
            # and the next request reads the commit all the same
            assert _held_txnids(tmp_path / "s" / "mirror", pid) == held
            assert c.call("HGET", "held", "k") == b"2"
            # idle: let go within its age (3 s) and a little
            deadline = time.monotonic() + 3 + 3
            while any(t != "-" for t in _held_txnids(tmp_path / "s" / "mirror", pid)):
                assert time.monotonic() < deadline, "an idle worker kept its snapshot"
                time.sleep(0.05)
            assert c.call("HGET", "held", "k") == b"2"
        finally:
            c.close()


class _FakeSnapshot:
    def __init__(self, log: list[str], n: int) -> None:
        self.log, self.n, self.current = log, n, True

    def is_current(self) -> bool:
        return self.current


def test_the_held_view_in_one_worker_turn_after_another() -> None:
    """The held view's rules, with a fake snapshot and clock: one snapshot
    for a whole turn, kept for later turns while current and young, let go
    when it is not, when it ages idle, and at once with ``max_age`` 0."""
    from contextlib import contextmanager

    from sidecar.resp_server import _HeldView

    log: list[str] = []
    now = [100.0]
    made: list[_FakeSnapshot] = []

    @contextmanager
    def begin() -> Iterator[Any]:
        snap = _FakeSnapshot(log, len(made))
        made.append(snap)
        log.append(f"begin {snap.n}")
        yield snap
        log.append(f"end {snap.n}")

    view = _HeldView(begin, lambda: now[0], max_age=0.05)
    first = view()
    made[0].current = False  # a commit mid-turn: the turn keeps its snapshot
    assert view() is first and log == ["begin 0"]
    view.turn_over()  # ... and lets it go as it ends
    assert log == ["begin 0", "end 0"] and view.deadline is None
    second = view()
    view.turn_over()  # current: kept
    assert log[-1] == "begin 1"
    made[1].current = False  # a commit between turns
    third = view()
    assert third is not second and log[-3:] == ["begin 1", "end 1", "begin 2"]
    view.turn_over()
    now[0] += 0.04
    assert view() is third  # current and young: kept
    view.turn_over()
    view.expire(now[0])
    assert view.deadline == pytest.approx(100.05)
    now[0] += 0.02
    view.expire(now[0])  # aged while idle: let go
    assert log[-1] == "end 2" and view.deadline is None
    fourth = view()
    view.turn_over()
    now[0] += 0.06
    assert view() is not fourth  # aged while busy: a new one on next use
    view.end()
    assert log[-3:] == ["end 3", "begin 4", "end 4"]
    strict = _HeldView(begin, lambda: now[0], max_age=0.0)
    strict()
    strict.turn_over()
    assert log[-1] == "end 5" and strict.deadline is None


def test_socket_reads_while_the_mirror_grows_its_map(env: Env, tmp_path: Path) -> None:
    """HGETs from two clients while the sidecar's mirror, started with a
    1 MiB map, grows it several times to take 6 MB of new values; the
    workers keep their snapshots between requests. Every reply is a whole
    value of some version, the new ones are read once synced, and nothing
    fails."""
    settings = {"SIDECAR_MAP_SIZE_MB": "1", "SIDECAR_MAX_MAP_SIZE_MB": "256"}
    with _serving_one_dataset(env, tmp_path, "grows", {b"probe": b"v1"}, **settings) as (sc, path):
        stop = threading.Event()
        seen: list[Any] = []
        errors: list[Any] = []

        def reader() -> None:
            c = Resp(path)
            try:
                while not stop.is_set():
                    value = c.call("HGET", "grows", "probe")
                    seen.append(value)
                    if value not in (b"v1", b"v2"):
                        errors.append(value)
            except BaseException as exc:
                errors.append(exc)
            finally:
                c.close()

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            version = 0
            for i in range(6):  # about 1 MB a batch, incompressible
                upserts = {b"big%04d" % (i * 100 + j): os.urandom(10_000) for j in range(100)}
                if i == 5:
                    upserts[b"probe"] = b"v2"
                version = write(env.client, "grows", upserts)
            sc.wait_version("grows", version)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert b"v1" in seen
        c = Resp(path)
        try:
            assert c.call("HGET", "grows", "probe") == b"v2"
            assert c.call("HLEN", "grows") == 601
            assert len(c.call("HGET", "grows", "big0599")) == 10_000
        finally:
            c.close()
        assert (tmp_path / "s" / "mirror" / "data.mdb").stat().st_size >= 6 << 20  # it grew


def test_the_view_age_setting() -> None:
    from replicad.errors import ConfigError
    from sidecar.config import load
    from sidecar.main import socket_settings_of

    env = {"SIDECAR_DATASETS": "a", "SIDECAR_SOCKET": "/tmp/x.sock"}
    settings = socket_settings_of(load(None, environ=env))
    assert settings is not None and settings.view_max_age == 0.05
    changed = load(None, environ={**env, "SIDECAR_SOCKET_VIEW_MAX_AGE": "0"})
    assert changed.socket_view_max_age == 0.0
    for bad in ("-1", "11", "nan"):
        with pytest.raises(ConfigError, match="socket_view_max_age"):
            load(None, environ={**env, "SIDECAR_SOCKET_VIEW_MAX_AGE": bad})


# --------------------------------------------------------------------- limits


def test_limits_and_the_socket_file(env: Env, tmp_path: Path) -> None:
    path = Path(f"/tmp/sidecar-resp-{os.getpid()}.sock")  # short: AF_UNIX paths
    group = grp.getgrnam("daemon").gr_gid if _has_group("daemon") else os.getgid()
    # a stale socket file: bound, then its process went away
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        Resp(path)
    extra = {
        "SIDECAR_SOCKET": str(path),
        "SIDECAR_SOCKET_MODE": "0640",
        "SIDECAR_SOCKET_GROUP": str(group),
        "SIDECAR_SOCKET_WORKERS": "2",
        "SIDECAR_SOCKET_MAX_CLIENTS": "4",
        "SIDECAR_SOCKET_IDLE_TIMEOUT": "1.0",
        "SIDECAR_SOCKET_MAX_REQUEST_BYTES": "2048",
    }
    sidecar = SidecarProcess(tmp_path / "lim", env.origin.base_url, ["blobs"], extra_env=extra)
    try:
        with sidecar:
            wait_socket(path, sidecar)
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert "replaced a stale socket file" in sidecar.log_tail(200)
            assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group

            # max clients, across both workers
            clients = [Resp(path) for _ in range(4)]
            assert all(c.call("PING") == "PONG" for c in clients)
            extra_client = Resp(path)
            assert str(extra_client.read()) == "ERR max number of clients reached"
            assert extra_client.closed_by_server()
            extra_client.close()
            clients.pop().close()
            deadline = time.monotonic() + 10
            while True:  # until the worker has noticed the close
                replacement = Resp(path)
                try:
                    reply = replacement.call("PING")
                except (OSError, EOFError) as exc:  # rejected and closed already
                    reply = exc
                if reply == "PONG":
                    break
                replacement.close()
                assert time.monotonic() < deadline, reply
                time.sleep(0.05)
            clients.append(replacement)
            info = _info(replacement.call("INFO", "clients", "stats"))
            assert info["connected_clients"] == "4" and info["maxclients"] == "4"
            assert int(info["rejected_connections"]) >= 1

            # idle timeout: an idle client is closed, a busy one is not
            busy, idle = clients[0], clients[1]
            for _ in range(10):
                time.sleep(0.2)
                assert busy.call("PING") == "PONG"
            assert idle.closed_by_server(timeout=3.0)
            for c in clients:
                c.close()

            # the request size limit
            big = Resp(path)
            big.send(["HMGET", "blobs", *[f"key-{i:05d}" for i in range(300)]])
            assert str(big.read()).startswith("ERR Protocol error: request larger than 2048")
            assert big.closed_by_server()
            big.close()

            # a killed worker is replaced; the socket keeps serving
            probe = Resp(path)
            pid = int(_info(probe.call("INFO", "server"))["process_id"])
            probe.close()
            if custom_slices_supported():  # workers ask for a short slice (sidecar/sched.py)
                assert slice_of(f"/proc/{pid}") == 100_000
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while "socket worker exited" not in sidecar.log_tail(200):
                assert time.monotonic() < deadline, sidecar.log_tail()
                time.sleep(0.05)
            for _ in range(6):  # both workers answer (the kernel spreads connections)
                c = Resp(path)
                assert c.call("HGET", "blobs", "b1") == b"hello"
                c.close()

            # SIGTERM: exit 0, the socket file removed
            assert sidecar.stop() == 0
            assert not path.exists()
    finally:
        if path.exists():
            path.unlink()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _info(reply: bytes) -> dict[str, str]:
    out = {}
    for line in reply.decode().split("\r\n"):
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    return out


def test_a_live_socket_or_a_file_is_not_replaced(
    env: Env, served: tuple[SidecarProcess, Path], tmp_path: Path
) -> None:
    live = served[1]
    not_a_socket = tmp_path / "plain-file"
    not_a_socket.write_text("keep me")
    base = dict(os.environ)
    base = {k: v for k, v in base.items() if not k.startswith("SIDECAR_")}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    for target, message in (
        (live, "another process is listening on it"),
        (not_a_socket, "the path exists and is not a socket"),
    ):
        run_env = {
            **base,
            "SIDECAR_ORIGIN": env.origin.base_url,
            "SIDECAR_DATASETS": "blobs",
            "SIDECAR_DATA": str(tmp_path / f"m-{target.name}"),
            "SIDECAR_SOCKET": str(target),
        }
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--log-format", "text"],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert message in done.stderr and str(target) in done.stderr, done.stderr
    assert not_a_socket.read_text() == "keep me"
    c = Resp(live)  # the live one still serves
    assert c.call("PING") == "PONG"
    c.close()


def test_a_json_view_serves_the_same_bytes_and_follows_writes(
    env: Env, tmp_path: Path, served: tuple[SidecarProcess, Path]
) -> None:
    """A sidecar keeping a JSON view of ``up`` (built in the background
    after its bootstrap) replies to HGET and HMGET with the bytes of a
    sidecar that renders, and a write reaches its view."""
    path = Path(f"/tmp/sidecar-json-{os.getpid()}.sock")  # short: AF_UNIX paths
    extra = {"SIDECAR_SOCKET": str(path), "SIDECAR_JSON_VIEWS": "up"}
    with SidecarProcess(tmp_path / "s", env.origin.base_url, ["up"], extra_env=extra) as sc:
        sc.wait_ready()
        sc.wait_until(lambda st: st["datasets"]["up"]["json_view"] == "built")
        wait_socket(path, sc)
        viewed, plain = Resp(path), Resp(served[1])
        try:
            keys: list[bytes | str] = [b"user:%04d" % i for i in range(0, RECORDS, 7)]
            keys.append(b"user:9999")
            for c in (viewed, plain):
                c.send(*[["HGET", "up", k] for k in keys], ["HMGET", "up", *keys])
            got = [viewed.read() for _ in range(len(keys) + 1)]
            assert got == [plain.read() for _ in range(len(keys) + 1)]
            assert json.loads(got[0]) == expected(0)
            # and the workers do read the view: a row changed behind the
            # sidecar's back (LMDB serializes writers across processes) is
            # what they answer
            env_ = lmdb.open(str(tmp_path / "s" / "mirror"), max_dbs=64, writemap=True)
            try:
                with env_.begin(write=True) as txn:
                    gen = msgpack.unpackb(txn.get(b"ds/up", db=env_.open_db(b"meta", txn=txn)))
                    view = env_.open_db(f"j/up/{gen['gen'] % 2}".encode(), txn=txn, create=False)
                    txn.put(b"user:0007", b'$12\r\n{"marked":1}\r\n', db=view)
            finally:
                env_.close()
            assert viewed.call("HGET", "up", "user:0007") == b'{"marked":1}'
            version = write(env.client, "up", {b"user:0000": seed_like_record(4242)})
            sc.wait_version("up", version)
            assert json.loads(viewed.call("HGET", "up", "user:0000")) == expected(4242)
            assert sc.status()["datasets"]["up"]["json_view"] == "built"
            # as it was, for the module's other tests
            served[0].wait_version(
                "up", write(env.client, "up", {b"user:0000": seed_like_record(0)})
            )
        finally:
            viewed.close()
            plain.close()
