"""Exhaustion, with real processes: a full map and a full disk at the origin
and at the sidecar, oversized requests, slow and idle connections
(slowloris) on the origin's HTTP port, and a flood of clients on the
sidecar's Redis-protocol socket.

What must hold each time: a clear error (507 ``storage_full`` at the origin,
a logged and reported apply failure at the sidecar), nothing half-written
(the origin keeps exactly its acknowledged writes, the mirror keeps its last
whole version), recovery once space returns (a restart with a larger map
maximum, or the disk freed), and service for every other client meanwhile.

Disk-full tests mount a small tmpfs and are skipped where that is not
allowed (not root, or no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio

from replicad.http_app import OriginApp
from replicad.merkle import Digest, entry_hash
from sidecar.reader import Reader
from tests.chaos import PatientSidecar
from tests.origin_proc import OriginProcess

OPAQUE = b"\x12"  # header of an uncompressed opaque value (docs/FORMAT.md)


# --------------------------------------------------------------------- helpers


def post_batch(client: httpx.Client, dataset: str, upserts: dict[bytes, bytes]) -> httpx.Response:
    body = msgpack.packb({"upserts": upserts}, use_bin_type=True)
    return client.post(
        f"/v1/datasets/{dataset}/batch",
        content=body,
        headers={"content-type": "application/msgpack"},
    )


def create_blobs(client: httpx.Client, name: str = "blobs") -> None:
    resp = client.post("/v1/datasets", json={"name": name, "opaque": True, "compress": False})
    assert resp.status_code == 201, resp.text


def fill_until_507(
    client: httpx.Client, rng: random.Random, *, batch_bytes: int, limit: int = 400
) -> tuple[dict[bytes, bytes], httpx.Response]:
    """Write random incompressible batches until the origin answers 507;
    return what was acknowledged and the 507 answer."""
    acked: dict[bytes, bytes] = {}
    for i in range(limit):
        batch = {b"b%05d-%d" % (i, j): rng.randbytes(batch_bytes // 4) for j in range(4)}
        resp = post_batch(client, "blobs", batch)
        if resp.status_code == 507:
            return acked, resp
        assert resp.status_code == 200, resp.text
        acked.update(batch)
    raise AssertionError(f"{limit} batches and the store never filled")


def origin_records(client: httpx.Client, dataset: str) -> dict[bytes, bytes]:
    """Every record, through the sync API (raw stored bytes)."""
    from replicad.frames import FrameDecoder, encode_frame
    from replicad.messages import SnapshotChunk, SnapshotRequest, from_wire, to_wire

    resp = client.post(
        "/v1/sync",
        content=encode_frame(*to_wire(SnapshotRequest(dataset, None, 10_000_000, False))),
        headers={"content-type": "application/x-replicad-frame"},
    )
    assert resp.status_code == 200, resp.text
    decoder = FrameDecoder()
    decoder.receive_data(resp.content)
    frame = decoder.next_frame()
    assert frame is not None
    chunk = from_wire(frame.kind, frame.body)
    assert isinstance(chunk, SnapshotChunk) and chunk.next_after is None
    return dict(chunk.records)


def digest_of(records: dict[bytes, bytes]) -> str:
    xor = 0
    for k, v in records.items():
        xor ^= entry_hash(k, v)
    return Digest(len(records), xor).hex()


def info(client: httpx.Client, dataset: str = "blobs") -> dict[str, Any]:
    resp = client.get(f"/v1/datasets/{dataset}")
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def mirror_state(path: Path, dataset: str) -> tuple[int | None, dict[bytes, bytes]]:
    """The mirror's version and records, read in one snapshot."""
    with Reader(path) as reader, reader.snapshot() as snap:
        cursor = snap.version(dataset)
        keys = snap.keys(dataset, limit=10**9)
        records = {k: bytes(snap.raw(dataset, k) or b"") for k in keys}
    return (None if cursor is None else cursor.version), records


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` KiB mounted at ``path`` (skip the test where
    mounting is not allowed); unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def resize_tmpfs(path: Path, size_kb: int) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size_kb}k", str(path)], check=True, capture_output=True
    )


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# --------------------------------------------------------------------- the origin


def test_origin_full_map_is_507_writes_nothing_and_a_larger_max_recovers(tmp_path: Path) -> None:
    rng = random.Random(7)
    origin = OriginProcess(
        tmp_path / "origin",
        start_timeout=60,
        durable=True,
        max_body_mb=4,
        extra_config="map_size_mb = 1\nmax_map_size_mb = 2",
    )
    with origin, httpx.Client(base_url=origin.base_url, timeout=30) as client:
        create_blobs(client)
        acked, full = fill_until_507(client, rng, batch_bytes=120_000)
        assert full.json()["error"]["code"] == "storage_full"
        assert "full" in full.json()["error"]["message"]
        before = info(client)
        # nothing of the refused batch, everything acknowledged, byte for byte
        records = origin_records(client, "blobs")
        assert {k: v[1:] for k, v in records.items()} == acked
        assert before["digest"] == digest_of(records)
        # still serving: health, reads, a refused write again (no hang, no crash)
        assert client.get("/healthz").status_code == 200
        key = next(iter(acked))
        assert client.get(f"/v1/datasets/blobs/records/{key.decode()}").status_code == 200
        assert post_batch(client, "blobs", {b"again": rng.randbytes(300_000)}).status_code == 507
        assert info(client)["version"] == before["version"]

        # a graceful stop on a full map, then a larger maximum
        assert origin.stop() == 0, origin.log_tail()
        origin.extra_config = "map_size_mb = 1\nmax_map_size_mb = 64"
        origin.start(same_port=True)
        after = info(client)
        assert (after["epoch"], after["version"], after["digest"]) == (
            before["epoch"],
            before["version"],
            before["digest"],
        )
        resp = post_batch(client, "blobs", {b"big": rng.randbytes(1_000_000)})
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == before["version"] + 1
        # the refusals were answers, not crashes: nothing logged as an error
        errors = [d for d in json_lines(origin.log_path) if d["level"] in ("error", "critical")]
        assert not errors, errors


def test_origin_full_disk_is_507_and_recovers_when_space_returns(tmp_path: Path) -> None:
    rng = random.Random(8)
    with tmpfs(tmp_path / "disk", 4096) as disk:
        origin = OriginProcess(
            disk / "origin",
            start_timeout=60,
            durable=True,
            max_body_mb=4,
            extra_config="map_size_mb = 1\nmax_map_size_mb = 256",
        )
        origin.log_path = tmp_path / "origin.log"  # the log must not fill the disk
        try:
            origin.__enter__()
            with httpx.Client(base_url=origin.base_url, timeout=30) as client:
                create_blobs(client)
                acked, full = fill_until_507(client, rng, batch_bytes=200_000)
                assert full.json()["error"]["code"] == "storage_full", full.text
                assert client.get("/healthz").status_code == 200
                before = info(client)
                records = origin_records(client, "blobs")
                assert {k: v[1:] for k, v in records.items()} == acked
                assert before["digest"] == digest_of(records)

                # space returns; a restart (the store refuses writes after a
                # commit it could not finish) and writes go on
                resize_tmpfs(disk, 65536)
                origin.kill9()
                origin.start(same_port=True)
                after = info(client)
                assert (after["version"], after["digest"]) == (before["version"], before["digest"])
                later = rng.randbytes(500_000)
                resp = post_batch(client, "blobs", {b"later": later})
                assert resp.status_code == 200, resp.text
                assert origin_records(client, "blobs")[b"later"] == OPAQUE + later
        finally:
            origin.close()


# --------------------------------------------------------------------- the sidecar


def _fill_mirror(
    tmp_path: Path,
    *,
    map_env: dict[str, str],
    disk: Path | None,
    make_room: Callable[[], dict[str, str]],
    expect_error: str,
) -> None:
    """Shared by the map and disk variants: the mirror holds version V1, the
    origin grows past what the mirror can hold, the sidecar reports it and
    keeps V1 whole; restarted with room, it converges."""
    rng = random.Random(9)
    with (
        OriginProcess(
            tmp_path / "origin", durable=False, max_body_mb=8, start_timeout=60
        ) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        create_blobs(client)
        first = {b"a%03d" % i: rng.randbytes(10_000) for i in range(30)}
        assert post_batch(client, "blobs", first).status_code == 200
        v1 = info(client)["version"]
        workdir = (disk or tmp_path) / "sidecar"
        sidecar = PatientSidecar(
            workdir, origin.base_url, ["blobs"], poll_interval=0.3, extra_env=map_env
        )
        sidecar.log_path = tmp_path / "sidecar.log"
        with sidecar:
            sidecar.wait_version("blobs", v1)
            for i in range(12):  # 3.6 MB more than the mirror can hold
                more = {b"b%03d-%d" % (i, j): rng.randbytes(100_000) for j in range(3)}
                assert post_batch(client, "blobs", more).status_code == 200
            latest = info(client)
            st = sidecar.wait_until(
                lambda s: "apply failed" in str(s["datasets"]["blobs"]["last_error"]),
                timeout=30,
            )["datasets"]["blobs"]
            # a full map says so; a full disk reaches LMDB as a short write,
            # which it reports as EIO ("Input/output error")
            assert any(word in st["last_error"] for word in (expect_error, "Input/output error")), (
                st["last_error"]
            )
            assert st["version"] < latest["version"] and st["digest_mismatches"] == 0
            assert httpx.get(sidecar.health_url + "/healthz").status_code == 200
            failures = [d for d in json_lines(sidecar.log_path) if d["msg"] == "apply failed"]
            assert failures and all(d["dataset"] == "blobs" for d in failures), failures[:3]
            # the mirror is whole: one version of the origin, exactly
            version, records = mirror_state(sidecar.data, "blobs")
            assert version == st["version"] and version is not None
            if version == v1:
                assert {k: v[1:] for k, v in records.items()} == first
            sidecar.stop()
            # room again: the same mirror, restarted, catches up
            sidecar.extra_env = make_room()
            sidecar.start()
            sidecar.wait_version("blobs", latest["version"], timeout=60)
            version, records = mirror_state(sidecar.data, "blobs")
            assert version == latest["version"]
            assert records == origin_records(client, "blobs")


def test_sidecar_full_map_keeps_its_last_whole_version_and_recovers(tmp_path: Path) -> None:
    small = {"SIDECAR_MAP_SIZE_MB": "1", "SIDECAR_MAX_MAP_SIZE_MB": "2"}
    large = {"SIDECAR_MAP_SIZE_MB": "1", "SIDECAR_MAX_MAP_SIZE_MB": "64"}
    _fill_mirror(
        tmp_path,
        map_env=small,
        disk=None,
        make_room=lambda: large,
        expect_error="mirror full at its maximum map size",
    )


def test_sidecar_full_disk_keeps_its_last_whole_version_and_recovers(tmp_path: Path) -> None:
    env = {"SIDECAR_MAP_SIZE_MB": "1", "SIDECAR_MAX_MAP_SIZE_MB": "256"}
    with tmpfs(tmp_path / "disk", 2048) as disk:

        def make_room() -> dict[str, str]:
            resize_tmpfs(disk, 65536)
            return env

        _fill_mirror(
            tmp_path,
            map_env=env,
            disk=disk,
            make_room=make_room,
            expect_error="No space left on device",
        )


# --------------------------------------------------------------------- oversized requests


def _raw_exchange(port: int, data: bytes, *, read_for: float = 5.0) -> bytes:
    """Send ``data`` (ignoring a server that closes early) and read what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        out = b""
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_oversized_requests_are_refused_early_and_the_origin_stays_up(tmp_path: Path) -> None:
    with (
        OriginProcess(
            tmp_path / "origin", durable=False, max_body_mb=1, start_timeout=60
        ) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        create_blobs(client)
        port = origin.port
        # a declared length far above the limit: 413 before any body byte
        start = time.monotonic()
        answer = _raw_exchange(
            port,
            b"POST /v1/datasets/blobs/batch HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - start < 5
        # a chunked body that never ends: 413 once it passes the limit, not buffered
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/datasets/blobs/batch HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            answer = b""
            with contextlib.suppress(OSError):
                for _ in range(64):  # 4 MiB offered against a 1 MiB limit
                    sock.sendall(chunk)
            with contextlib.suppress(OSError):
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # a 64 KiB header and a 64 KiB path: refused by the HTTP layer
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
            b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            answer = _raw_exchange(port, request)
            assert answer == b"" or answer[9:10] == b"4", answer[:200]
        # a frame declaring 4 GiB on /v1/sync
        frame = b"RF\x00\x01\xff\xff\xff\xff" + b"\x00" * 8 + b"x" * 100
        resp = client.post(
            "/v1/sync", content=frame, headers={"content-type": "application/x-replicad-frame"}
        )
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "bad_frame"
        # and all the while, everyone else is served
        assert client.get("/healthz").status_code == 200
        assert post_batch(client, "blobs", {b"k": b"v"}).status_code == 200


# --------------------------------------------------------------------- slow clients


def test_slowloris_is_bounded_and_everyone_else_is_served(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False, start_timeout=60) as origin,
        httpx.Client(base_url=origin.base_url, timeout=10) as client,
    ):
        create_blobs(client)
        kinds = {
            "idle": b"",
            "partial headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            "dribble": b"G",
            "slow body": b"POST /v1/datasets/blobs/batch HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        }
        slow: dict[str, list[socket.socket]] = {k: [] for k in kinds}
        try:
            for kind, first in kinds.items():
                for _ in range(40):
                    sock = socket.create_connection(("127.0.0.1", origin.port), timeout=5)
                    if first:
                        sock.sendall(first)
                    slow[kind].append(sock)
            # 160 slow connections: others are served, quickly, meanwhile
            worst = 0.0
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < 6.5:
                t = time.monotonic()
                assert client.get("/healthz").status_code == 200
                assert post_batch(client, "blobs", {b"k%d" % n: b"v"}).status_code == 200
                worst = max(worst, time.monotonic() - t)
                n += 1
                for sock in slow["dribble"]:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"E")
                time.sleep(0.1)
            assert worst < 3.0, worst
            # the server closed every connection that never completed its
            # headers (hypercorn's 5 s timeout), dribbling ones included
            for kind in ("idle", "partial headers", "dribble"):
                for sock in slow[kind]:
                    sock.settimeout(3)
                    try:
                        data = sock.recv(1024)
                    except ConnectionResetError:
                        data = b""
                    assert data == b"" or data.startswith(b"HTTP/1.1 4"), (kind, data[:100])
        finally:
            for socks in slow.values():
                for sock in socks:
                    sock.close()
        assert client.get("/healthz").status_code == 200


class _FakeService:
    """Just enough of OriginService for a body that never arrives."""

    def __init__(self) -> None:
        from replicad.metrics import Registry

        self.registry = Registry()
        self.clock = time.time


async def test_a_stalled_body_is_408_and_the_connection_closed() -> None:
    app = OriginApp(_FakeService(), body_timeout=0.2)  # type: ignore[arg-type]
    sent: list[MutableMapping[str, Any]] = []
    first = True

    async def receive() -> MutableMapping[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"{", "more_body": True}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/datasets",
        "raw_path": b"/v1/datasets",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
    }
    with trio.fail_after(5):
        await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "timeout"


# --------------------------------------------------------------------- the RESP socket


def _resp_socket_works(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(str(path))
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
        time.sleep(0.1)
    return False


def test_a_flood_of_socket_clients_is_bounded_and_the_rest_are_served(tmp_path: Path) -> None:
    path = Path(f"/tmp/sidecar-exh-{os.getpid()}.sock")  # AF_UNIX paths are short
    with (
        OriginProcess(tmp_path / "origin", durable=False, start_timeout=60) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        create_blobs(client)
        assert post_batch(client, "blobs", {b"k": b"hello"}).status_code == 200
        extra = {
            "SIDECAR_SOCKET": str(path),
            "SIDECAR_SOCKET_WORKERS": "2",
            "SIDECAR_SOCKET_MAX_CLIENTS": "32",
            "SIDECAR_SOCKET_IDLE_TIMEOUT": "2",
            "SIDECAR_SOCKET_MAX_REQUEST_BYTES": "4096",
        }
        with contextlib.ExitStack() as socks:

            def unix() -> socket.socket:
                sock = socks.enter_context(socket.socket(socket.AF_UNIX))
                sock.settimeout(6)
                return sock

            sc = socks.enter_context(
                PatientSidecar(tmp_path / "s", origin.base_url, ["blobs"], extra_env=extra)
            )
            socks.callback(lambda: path.unlink(missing_ok=True))
            sc.wait_ready()
            if not _resp_socket_works(path):
                pytest.skip("the sidecar's RESP socket is not serving here yet")
            # 300 connections at once, most of them over the limit
            flood: list[socket.socket] = []
            for _ in range(300):
                s = unix()
                try:
                    s.connect(str(path))
                except OSError:
                    continue
                flood.append(s)
            refused = 0
            for s in flood:
                with contextlib.suppress(OSError):  # a refused one may be closed already
                    s.sendall(b"PING\r\n")
            served = 0
            for s in flood:
                try:
                    reply = s.recv(128)
                except OSError:
                    reply = b""
                if reply.startswith(b"+PONG"):
                    served += 1
                else:  # told why, then closed (or reset before it could read)
                    assert reply == b"" or b"max number of clients" in reply, reply
                    refused += 1
            assert 0 < served <= 32 and served + refused == len(flood), (served, refused)
            for s in flood:
                s.close()
            time.sleep(0.3)
            # slow clients holding a slot with half a command: refused (a bulk
            # over the request limit) or closed by the idle timeout
            trickle, hog, good = unix(), unix(), unix()
            trickle.connect(str(path))
            trickle.sendall(b"*3\r\n$4\r\nHGET\r\n$5\r\nblobs\r\n$99999\r\n")
            hog.connect(str(path))
            hog.sendall(b"*2\r\n$4\r\nECHO\r\n$4000\r\n" + b"x" * 3000)
            good.connect(str(path))
            for _ in range(20):
                good.sendall(b"*3\r\n$4\r\nHGET\r\n$5\r\nblobs\r\n$1\r\nk\r\n")
                assert good.recv(64) == b"$5\r\nhello\r\n"
            for s in (trickle, hog):
                try:
                    data = s.recv(256)
                except OSError:
                    data = b""
                assert data == b"" or data.startswith(b"-ERR"), data
            late = unix()  # (good itself was idle meanwhile: closed by now)
            late.connect(str(path))
            late.sendall(b"PING\r\n")
            assert late.recv(64).startswith(b"+PONG")


# --------------------------------------------------------------------- retries


def test_a_mirror_that_cannot_apply_backs_off(tmp_path: Path) -> None:
    from replicad.loopback import LoopbackDriver
    from replicad.memory import MemoryMirror
    from replicad.messages import Hint
    from replicad.origin_types import DatasetSpec, WriteBatch
    from replicad.replica import Apply, ReplicaSync, Send, Wait
    from replicad.store import OriginStore

    store = OriginStore(tmp_path / "o", durable=False)
    try:
        store.create_dataset(DatasetSpec("blobs", None))
        store.commit([WriteBatch("blobs", {b"a": b"1"})])
        mirror = MemoryMirror()
        sync = ReplicaSync(
            "blobs", state=mirror.state(), local=mirror, rng=random.Random(1), now=0.0
        )
        LoopbackDriver(sync, mirror, store).run(0.0)
        store.commit([WriteBatch("blobs", {b"b": b"2" * 100_000})])
        info_now = store.info("blobs")
        sync.hint(Hint("blobs", info_now.cursor, info_now.digest), 1.0)
        # the disk is full from now on: every Apply fails
        now, pulls = 1.0, 0
        while now < 31.0:
            action = sync.next_action(now)
            if isinstance(action, Wait):
                now = action.deadline if action.deadline is not None else now + 1.0
            elif isinstance(action, Apply):
                sync.apply_failed("mirror write failed: no space left on device", now)
            else:
                assert isinstance(action, Send)
                pulls += 1
                sync.response(store.answer(action.request), now)
        # exponential backoff from 50 ms to the 30 s cap allows about ten
        assert pulls <= 20, f"{pulls} pulls of the same diff in 30 s"
    finally:
        store.close()
