"""The running origin against its own OpenAPI document, with schemathesis.

Schemathesis (its CLI, in a subprocess, bounded: 5 examples per operation, a
fixed seed, one worker, a hard timeout) generates valid and invalid requests
for every documented operation and checks every answer: no 5xx, only
documented status codes, content types, headers and response schemas, invalid
data rejected, 405 for undocumented methods, 401 without a token.

Excluded, and why:

* ``GET /v1/hints`` -- an endless event stream (tests/test_http_api.py
  covers it);
* the ``positive_data_acceptance`` check -- the document cannot express every
  rule the server enforces (a record must fit the dataset's own schema, a
  field default must fit its type, a frame must carry a real request), so
  some schema-valid requests are rightly refused with a documented 4xx.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from replicad.http_app import ROUTES
from replicad.openapi import build
from tests.origin_proc import OriginProcess

WRITE = "st-write-token"
READ = "st-read-token"
SEED = int(os.environ.get("REPLICAD_ST_SEED", "20261123"))

HOOKS = """
import msgpack
import schemathesis

schemathesis.serializer.alias("application/x-replicad-frame", "application/octet-stream")


def _carryable(value):
    # msgpack has no integers beyond 64 bits: send such a generated int as
    # its decimal string (the server must still reject it with a 4xx)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
        return str(value)
    if isinstance(value, list):
        return [_carryable(v) for v in value]
    if isinstance(value, dict):
        return {_carryable(k): _carryable(v) for k, v in value.items()}
    return value


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx, value):
    return msgpack.packb(_carryable(value), use_bin_type=True)
"""

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
        "ignored_auth",
        "use_after_free",
        "ensure_resource_availability",
    ]
)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    with OriginProcess(
        tmp_path_factory.mktemp("st-origin"),
        write_tokens=[WRITE],
        read_tokens=[READ],
        durable=False,
    ) as proc:
        with httpx.Client(
            base_url=proc.base_url, headers={"authorization": f"Bearer {WRITE}"}
        ) as client:
            # Something for the generated requests to find.
            schema = {"fields": [{"name": "age", "type": "int", "nullable": True}]}
            assert client.post("/v1/datasets", json={"name": "u", "schema": schema}).is_success
            assert client.post("/v1/datasets", json={"name": "o", "opaque": True}).is_success
            batch = {"upserts": {"k": {"age": 1}}}
            assert client.post("/v1/datasets/u/batch", json=batch).is_success
        yield proc


def test_document_lists_every_route_and_is_served(origin: OriginProcess) -> None:
    served = httpx.get(origin.base_url + "/openapi.json").json()
    assert served == build()
    assert served["openapi"] == "3.1.0"
    for route in ROUTES:
        item = served["paths"][route.template]
        assert {m.upper() for m in item if m != "parameters"} == set(route.methods)
        for method in route.methods:
            operation = item[method.lower()]
            assert "responses" in operation and operation["operationId"]
            open_route = route.methods[method][0] == "open"
            assert (operation.get("security") == []) is open_route, route.template


def test_schemathesis_against_the_running_server(origin: OriginProcess, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    assert st.exists(), "schemathesis is a dev dependency: pip install -e '.[dev]'"
    (tmp_path / "st_hooks.py").write_text(HOOKS)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    env["SCHEMATHESIS_HOOKS"] = "st_hooks"
    env["NO_COLOR"] = "1"
    cmd = [
        str(st),
        "run",
        origin.base_url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {WRITE}",
        "--max-examples",
        "5",
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "5",
        "--exclude-path",
        "/v1/hints",
        "--checks",
        CHECKS,
    ]
    try:
        done = subprocess.run(
            cmd,
            check=False,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran over 90 s:\n{exc.stdout!s}"[-6000:])
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis (seed {SEED}) failed:\n{output[-8000:]}"
    assert "Serialization not possible" not in output
    assert "Test cases:" in output
