"""The sidecar as a real process against a real origin process, with real
reader processes: propagation, kill -9 at bad moments, lost hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack

from replicad.sample import seed_like_record, seed_like_schema
from sidecar import Reader
from tests.origin_proc import OriginProcess
from tests.procs import ROOT
from tests.sidecar_proc import SidecarProcess


def write(
    client: httpx.Client,
    dataset: str,
    upserts: dict[bytes, object],
    deletes: list[bytes] | None = None,
) -> int:
    body = msgpack.packb({"upserts": upserts, "deletes": deletes or []}, use_bin_type=True)
    r = client.post(
        f"/v1/datasets/{dataset}/batch",
        content=body,
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


def origin_records(client: httpx.Client, dataset: str) -> dict[str, object]:
    info = client.get(f"/v1/datasets/{dataset}").json()
    return dict(info)


def test_writes_and_deletes_reach_the_mirror(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        assert (
            client.post(
                "/v1/datasets", json={"name": "up", "schema": seed_like_schema().to_json()}
            ).status_code
            == 201
        )
        write(client, "up", {b"u%04d" % i: seed_like_record(i) for i in range(2000)})
        with SidecarProcess(tmp_path / "sidecar", origin.base_url, ["up"]) as sidecar:
            st = sidecar.wait_ready()
            assert st["datasets"]["up"]["records"] == 2000
            v = write(
                client,
                "up",
                {b"u0001": seed_like_record(77), b"new": seed_like_record(5)},
                [b"u0002"],
            )
            sidecar.wait_version("up", v, timeout=10)
            with Reader(sidecar.data) as reader:
                rec = reader.get("up", b"u0001")
                assert rec is not None and rec["age"] == seed_like_record(77)["age"]
                assert reader.get("up", b"u0002") is None
                assert reader.get("up", b"new") is not None
                assert reader.version("up").version == v  # type: ignore[union-attr]
            info = client.get("/v1/datasets/up").json()
            st = sidecar.status()["datasets"]["up"]
            assert st["records"] == info["records"] and st["lag"] == 0
            # the origin's fleet view shows this sidecar (acks every 10 s by default,
            # so only check the endpoint answers)
            assert client.get("/v1/fleet").status_code == 200
            metrics = httpx.get(sidecar.health_url + "/metrics").text
            assert 'sidecar_lag_versions{dataset="up"} 0' in metrics
            assert httpx.get(sidecar.health_url + "/readyz").status_code == 200


def test_kill9_during_bootstrap_and_apply_never_shows_a_torn_version(tmp_path: Path) -> None:
    keys = 20_000
    with (
        OriginProcess(tmp_path / "origin", durable=False, max_body_mb=16) as origin,
        httpx.Client(base_url=origin.base_url, timeout=60) as client,
    ):
        assert client.post("/v1/datasets", json={"name": "torn", "opaque": True}).status_code == 201

        def rewrite_all(n: int) -> int:
            # version n+1 rewrites every key to the version number it will get
            return write(client, "torn", {b"k%06d" % i: str(n + 1).encode() for i in range(keys)})

        version = 0
        for _ in range(3):
            version = rewrite_all(version)
        sidecar = SidecarProcess(tmp_path / "sidecar", origin.base_url, ["torn"], poll_interval=0.5)
        sidecar.workdir.mkdir(parents=True)
        stop = tmp_path / "stop-probe"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        probe = subprocess.Popen(
            [sys.executable, "-m", "tests.reader_probe", str(sidecar.data), "torn", str(stop)],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            sidecar.start()
            time.sleep(0.15)  # mid-bootstrap
            sidecar.kill9()
            sidecar.start()
            sidecar.wait_version("torn", version, timeout=30)
            for _ in range(3):  # large diffs (20,000 records each), killed mid-apply
                version = rewrite_all(version)
                time.sleep(0.05)
                sidecar.kill9()
                sidecar.start()
                sidecar.wait_version("torn", version, timeout=30)
            st = sidecar.status()
            assert st["datasets"]["torn"]["digest_mismatches"] == 0
            time.sleep(0.5)  # let the probe read the last version too
            stop.touch()
            out, _ = probe.communicate(timeout=30)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
            sidecar.close()
        report = json.loads(out)
        assert report["torn"] == [], report
        # it saw the bootstrap's version and the three later ones, never a mix
        assert report["snapshots"] > 10 and report["versions"] >= 4, report


def test_without_hints_the_safety_poll_keeps_up(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        assert client.post("/v1/datasets", json={"name": "b", "opaque": True}).status_code == 201
        with SidecarProcess(
            tmp_path / "sidecar", origin.base_url, ["b"], poll_interval=0.3, hints=False
        ) as sidecar:
            sidecar.wait_ready()
            v = write(client, "b", {b"x": b"1"})
            start = time.monotonic()
            sidecar.wait_version("b", v, timeout=10)
            assert time.monotonic() - start < 5
            with Reader(sidecar.data) as reader:
                rec = reader.get("b", b"x")
                assert rec is not None and rec.value == b"1"


def test_origin_restarting_without_history_is_repaired_with_merkle(tmp_path: Path) -> None:
    import lmdb

    with (
        OriginProcess(tmp_path / "origin", durable=True, max_body_mb=16) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        assert (
            client.post(
                "/v1/datasets", json={"name": "up", "schema": seed_like_schema().to_json()}
            ).status_code
            == 201
        )
        write(client, "up", {b"u%05d" % i: seed_like_record(i) for i in range(5000)})
        with SidecarProcess(
            tmp_path / "sidecar", origin.base_url, ["up"], poll_interval=0.3
        ) as sidecar:
            sidecar.wait_ready()
            epoch_before = sidecar.status()["datasets"]["up"]["epoch"]
            applied_before = sidecar.status()["datasets"]["up"]["records_applied"]
            # the origin goes down; its version queue is lost (a restore from a
            # backup of the records only, say); three records change meanwhile
            assert origin.stop() == 0
            env = lmdb.open(str(origin.data / "origin.lmdb"), max_dbs=4000)
            with env.begin(write=True) as txn:
                txn.drop(env.open_db(b"q/up", txn=txn), delete=False)
                txn.put(b"\xff" * 8, b"not an entry", db=env.open_db(b"q/up", txn=txn))
            env.close()
            origin.start(same_port=True)
            v = write(
                client,
                "up",
                {b"u00001": seed_like_record(101), b"u00002": seed_like_record(102)},
                [b"u00003"],
            )
            info = client.get("/v1/datasets/up").json()
            assert info["epoch"] != epoch_before  # history lost: a new epoch
            st = sidecar.wait_until(
                lambda s: (
                    s["datasets"]["up"]["epoch"] == info["epoch"]
                    and s["datasets"]["up"]["version"] >= v
                ),
                timeout=20,
            )["datasets"]["up"]
            # bootstrapped once with a snapshot; repaired once with Merkle, not a reload
            assert st["syncs"]["snapshot"] == 1 and st["syncs"]["merkle"] == 1
            assert st["records_applied"] - applied_before == 3  # only the differences
            assert st["records"] == info["records"] and st["digest_mismatches"] == 0
