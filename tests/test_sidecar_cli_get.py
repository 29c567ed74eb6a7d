"""``sidecar get DATASET KEY [--data DIR]``: one record of a mirror, read
directly with the Reader, printed as JSON; exit 1 with a message for a miss
or an unknown dataset. The mirror is written by the real sync machinery."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from replicad.codec import DatasetCodec
from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType, Schema
from replicad.store import OriginStore
from sidecar import cli
from sidecar.mirror import Mirror
from tests.procs import ROOT


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


@pytest.fixture(scope="module")
def mirror_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror of a typed, an opaque and an odd dataset (closed again: the
    CLI opens it as another process would)."""
    tmp = tmp_path_factory.mktemp("get")
    origin = OriginStore(tmp / "origin", durable=False)
    odd = Schema(1, (Field("f", FieldType.FLOAT), Field("b", FieldType.BYTES)))
    origin.create_dataset(DatasetSpec("up", seed_like_schema()))
    origin.create_dataset(DatasetSpec("blobs", None))
    origin.create_dataset(DatasetSpec("odd", odd))
    ok(origin.commit([WriteBatch("up", {b"u%03d" % i: seed_like_record(i) for i in range(50)})])[0])
    blobs = {b"text": "caf\u00e9".encode(), b"bin": b"\xff\x00"}
    ok(origin.commit([WriteBatch("blobs", blobs)])[0])
    ok(origin.commit([WriteBatch("odd", {b"x": {"f": math.inf, "b": b"\x01"}})])[0])
    mirror = Mirror(tmp / "mirror", durable=False)
    for name in ("up", "blobs", "odd"):
        handle = mirror.ensure(name)
        sync = ReplicaSync(name, state=handle.state(), local=handle, rng=random.Random(1), now=0.0)
        driver = LoopbackDriver(sync, handle, origin)
        info = origin.info(name)
        sync.hint(Hint(name, info.cursor, info.digest), 0.0)
        driver.run(0.0)
    mirror.ensure("pending")  # registered, never synced
    mirror.close()
    origin.close()
    return tmp / "mirror"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["get", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_record_as_json(mirror_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "up", "u007", "--data", str(mirror_dir))
    codec = DatasetCodec([seed_like_schema()])
    assert code == 0 and err == ""
    assert json.loads(out) == codec.decode(codec.encode(seed_like_record(7)))
    code, out, _ = run(capsys, "blobs", "text", "--data", str(mirror_dir))
    assert code == 0 and json.loads(out) == "caf\u00e9"
    code, out, _ = run(capsys, "blobs", "bin", "--data", str(mirror_dir))
    assert code == 0 and json.loads(out) == {"base64": "/wA="}
    code, out, _ = run(capsys, "odd", "x", "--data", str(mirror_dir))
    assert code == 0 and json.loads(out) == {"f": "Infinity", "b": {"base64": "AQ=="}}


def test_misses_and_unknown_datasets_exit_1(
    mirror_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "up", "nope", "--data", str(mirror_dir))
    assert (code, out) == (1, "") and "up has no record 'nope'" in err
    code, out, err = run(capsys, "nosuch", "u007", "--data", str(mirror_dir))
    assert (code, out) == (1, "") and "has no dataset 'nosuch'" in err
    code, out, err = run(capsys, "pending", "u007", "--data", str(mirror_dir))
    assert (code, out) == (1, "") and "pending has no record" in err
    code, out, err = run(capsys, "up", "u007", "--data", str(mirror_dir.parent / "missing"))
    assert (code, out) == (1, "") and "cannot open the mirror" in err


def test_data_from_the_environment_as_a_process(mirror_dir: Path) -> None:
    """``python -m sidecar get`` with SIDECAR_DATA instead of --data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SIDECAR_DATA"] = str(mirror_dir)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "get", "up", "u001"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["age"] == seed_like_record(1)["age"]
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "get", "up", "missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == "sidecar: up has no record 'missing'"
