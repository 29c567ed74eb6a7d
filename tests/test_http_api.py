"""The origin's HTTP API (docs/api.md), against real server processes.

Most tests share one server (module fixture ``origin``: write and read
tokens, a 1 MiB body limit, short SSE pings, no fsync); durability tests start
their own (fsync on) and kill it. A few unit checks at the end run the ASGI
app in process over a fake service, for errors a real store cannot be made to
raise on demand (500, 507) and for auth turned off.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio

from replicad.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    CorruptRecordError,
    DatasetExistsError,
    FieldTypeError,
    FrameChecksumError,
    InvalidKeyError,
    KeyTooLongError,
    MapFullError,
    MerkleError,
    MissingFieldError,
    ProtocolError,
    SchemaError,
    StorageError,
    UnknownDatasetError,
    UnknownFieldError,
    ValueTooLargeError,
)
from replicad.frames import FrameDecoder, encode_frame
from replicad.http_app import ROUTES, OriginApp, error_response
from replicad.hub import HintHub
from replicad.merkle import EMPTY_DIGEST, Digest, LeafQuery, NodeQuery, entry_hash
from replicad.messages import (
    Cursor,
    CursorUnservable,
    DiffRequest,
    DiffResponse,
    Hint,
    MerkleLeavesRequest,
    MerkleLeavesResponse,
    MerkleNodesRequest,
    MerkleNodesResponse,
    Message,
    SnapshotChunk,
    SnapshotRequest,
    from_wire,
    to_wire,
)
from replicad.metrics import Registry
from tests.origin_proc import OriginProcess

WRITE = "write-secret-7f3a9c"
READ = "read-secret-2b8e41"
FRAME = "application/x-replicad-frame"

TYPED_SCHEMA = {
    "fields": [
        {"name": "age", "type": "int"},
        {"name": "city", "type": "str", "dictionary": True, "nullable": True},
        {"name": "pic", "type": "bytes", "nullable": True},
        {"name": "tags", "type": "list<bytes>", "nullable": True},
    ]
}

_counter = iter(range(1_000_000))


def unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    with OriginProcess(
        tmp_path_factory.mktemp("origin"),
        write_tokens=[WRITE],
        read_tokens=[READ],
        max_body_mb=1,
        durable=False,
        ping_interval=0.3,
    ) as proc:
        yield proc


def _client(base_url: str, token: str | None) -> httpx.Client:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.Client(base_url=base_url, headers=headers, timeout=10.0)


@pytest.fixture
def w(origin: OriginProcess) -> Iterator[httpx.Client]:
    with _client(origin.base_url, WRITE) as client:
        yield client


@pytest.fixture
def r(origin: OriginProcess) -> Iterator[httpx.Client]:
    with _client(origin.base_url, READ) as client:
        yield client


@pytest.fixture
def anon(origin: OriginProcess) -> Iterator[httpx.Client]:
    with _client(origin.base_url, None) as client:
        yield client


def make_typed(w: httpx.Client, **extra: Any) -> str:
    name = unique("typed")
    resp = w.post("/v1/datasets", json={"name": name, "schema": TYPED_SCHEMA, **extra})
    assert resp.status_code == 201, resp.text
    return name


def make_opaque(w: httpx.Client, **extra: Any) -> str:
    name = unique("opaque")
    resp = w.post("/v1/datasets", json={"name": name, "opaque": True, **extra})
    assert resp.status_code == 201, resp.text
    return name


def error_code(resp: httpx.Response) -> str:
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    code: str = body["error"]["code"]
    return code


def version(client: httpx.Client, name: str) -> int:
    resp = client.get(f"/v1/datasets/{name}")
    assert resp.status_code == 200, resp.text
    v: int = resp.json()["version"]
    return v


def record_url(name: str, key: bytes) -> str:
    return f"/v1/datasets/{name}/records/{urllib.parse.quote(key, safe='')}"


def sync(client: httpx.Client, msg: Message) -> list[Message]:
    resp = client.post(
        "/v1/sync", content=encode_frame(*to_wire(msg)), headers={"content-type": FRAME}
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == FRAME
    decoder = FrameDecoder()
    decoder.receive_data(resp.content)
    out = [from_wire(f.kind, f.body) for f in decoder.frames()]
    decoder.close()
    return out


def cursor_of(client: httpx.Client, name: str) -> Cursor:
    info = client.get(f"/v1/datasets/{name}").json()
    return Cursor(bytes.fromhex(info["epoch"]), info["version"])


# ------------------------------------------------------------------ operations


def test_open_endpoints_need_no_token(anon: httpx.Client, w: httpx.Client) -> None:
    make_opaque(w)
    health = anon.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["datasets"] >= 1
    metrics = anon.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'replicad_http_requests_total{route="/healthz",method="GET",status="200"}' in (
        metrics.text
    )
    assert "replicad_http_request_duration_seconds_bucket" in metrics.text
    assert "replicad_dataset_version" in metrics.text
    doc = anon.get("/openapi.json")
    assert doc.status_code == 200 and doc.json()["openapi"] == "3.1.0"


def test_unknown_route_and_method(anon: httpx.Client, w: httpx.Client) -> None:
    resp = anon.get("/nope")
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    resp = w.delete("/v1/datasets")
    assert resp.status_code == 405 and error_code(resp) == "method_not_allowed"
    assert resp.headers["allow"] == "GET, POST"


# ------------------------------------------------------------------ auth


def _frame_body() -> bytes:
    return encode_frame(*to_wire(SnapshotRequest("nope-such-dataset", None, 10, False)))


ENDPOINTS: list[tuple[str, str, str, dict[str, Any]]] = [
    # (access, method, path, request kwargs)
    ("read", "GET", "/v1/datasets", {}),
    ("read", "GET", "/v1/datasets/authds", {}),
    ("read", "GET", "/v1/datasets/authds/records/k", {}),
    ("read", "GET", "/v1/fleet", {}),
    ("read", "POST", "/v1/ack", {"json": {"replica": "auth-probe"}}),
    (
        "read",
        "POST",
        "/v1/sync",
        {"content": _frame_body(), "headers": {"content-type": FRAME}},
    ),
    ("read", "GET", "/v1/hints?datasets=nope-such-dataset", {}),
    ("write", "POST", "/v1/datasets", {"json": {"name": "authds2", "opaque": True}}),
    ("write", "PUT", "/v1/datasets/authds/schema", {"json": {"fields": []}}),
    ("write", "POST", "/v1/datasets/authds/reset-history", {}),
    ("write", "POST", "/v1/datasets/authds/batch", {"json": {}}),
    ("write", "POST", "/v1/datasets/authds/replace", {"json": {"records": {}}}),
]


def test_auth_matrix(origin: OriginProcess) -> None:
    with _client(origin.base_url, WRITE) as w:
        w.post("/v1/datasets", json={"name": "authds", "opaque": True})
    clients = {
        "none": _client(origin.base_url, None),
        "unknown": _client(origin.base_url, "not-a-token"),
        "read": _client(origin.base_url, READ),
        "write": _client(origin.base_url, WRITE),
    }
    basic = httpx.Client(
        base_url=origin.base_url, headers={"authorization": f"Basic {WRITE}"}, timeout=10
    )
    try:
        for access, method, path, kwargs in ENDPOINTS:
            for who in ("none", "unknown"):
                resp = clients[who].request(method, path, **kwargs)
                assert resp.status_code == 401, (who, method, path, resp.text)
                assert error_code(resp) == "unauthorized"
                assert resp.headers["www-authenticate"].startswith("Bearer")
            resp = basic.request(method, path, **kwargs)
            assert resp.status_code == 401, (method, path)
            resp = clients["read"].request(method, path, **kwargs)
            if access == "write":
                assert resp.status_code == 403, (method, path, resp.text)
                assert error_code(resp) == "forbidden"
            else:
                assert resp.status_code not in (401, 403), (method, path, resp.text)
            resp = clients["write"].request(method, path, **kwargs)
            assert resp.status_code not in (401, 403), (method, path, resp.text)
    finally:
        for c in clients.values():
            c.close()
        basic.close()


def test_bearer_scheme_is_case_insensitive(origin: OriginProcess) -> None:
    resp = httpx.get(
        origin.base_url + "/v1/datasets", headers={"authorization": f"bearer {READ}"}, timeout=10
    )
    assert resp.status_code == 200


# ------------------------------------------------------------------ datasets


def test_dataset_lifecycle(w: httpx.Client, r: httpx.Client) -> None:
    name = unique("life")
    resp = w.post(
        "/v1/datasets",
        json={
            "name": name,
            "schema": TYPED_SCHEMA,
            "merkle": {"fanout": 4, "depth": 3},
            "queue": {"max_entries": 64, "policy": "halving"},
            "max_value_bytes": 4096,
            "compress": False,
        },
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["location"] == f"/v1/datasets/{name}"
    info = resp.json()
    assert info["name"] == name and info["kind"] == "typed" and info["version"] == 0
    assert info["merkle"] == {"fanout": 4, "depth": 3}
    assert info["queue"]["max_entries"] == 64 and info["queue"]["policy"] == "halving"
    assert info["max_value_bytes"] == 4096
    assert info["schema"]["version"] == 1 and len(info["schema"]["fields"]) == 4
    assert len(info["epoch"]) == 32

    listed = {d["name"]: d for d in r.get("/v1/datasets").json()["datasets"]}
    assert name in listed and "schema" not in listed[name]
    assert r.get(f"/v1/datasets/{name}").json()["schema"] == info["schema"]

    again = w.post("/v1/datasets", json={"name": name, "opaque": True})
    assert again.status_code == 409 and error_code(again) == "exists"

    new_fields = [*TYPED_SCHEMA["fields"], {"name": "score", "type": "float", "default": 0.5}]
    evolved = w.put(f"/v1/datasets/{name}/schema", json={"fields": new_fields})
    assert evolved.status_code == 200, evolved.text
    assert evolved.json()["schema"]["version"] == 2
    assert evolved.json()["meta_revision"] > info["meta_revision"]

    required = [*new_fields, {"name": "must", "type": "int"}]
    bad = w.put(f"/v1/datasets/{name}/schema", json={"fields": required})
    assert bad.status_code == 400 and error_code(bad) == "schema_error"
    dropped = w.put(f"/v1/datasets/{name}/schema", json={"fields": new_fields[:1]})
    assert dropped.status_code == 400 and error_code(dropped) == "schema_error"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "bad name!", "opaque": True}, 400, "bad_request"),
        ({"opaque": True}, 400, "bad_request"),
        ({"name": "x1", "opaque": True, "schema": TYPED_SCHEMA}, 400, "bad_request"),
        ({"name": "x2"}, 400, "bad_request"),
        ({"name": "x3", "opaque": True, "color": "red"}, 400, "bad_request"),
        (
            {"name": "x4", "schema": {"fields": [{"name": "a", "type": "complex"}]}},
            400,
            "schema_error",
        ),
        ({"name": "x5", "schema": {"fields": []}}, 400, "schema_error"),
        ({"name": "x6", "opaque": True, "merkle": {"fanout": 3, "depth": 2}}, 400, "bad_request"),
        ({"name": "x7", "opaque": True, "queue": {"policy": "random"}}, 400, "bad_request"),
        ({"name": "x8", "opaque": True, "max_value_bytes": 0}, 400, "bad_request"),
        ([1, 2], 400, "bad_request"),
    ],
)
def test_create_dataset_rejections(w: httpx.Client, body: Any, status: int, code: str) -> None:
    resp = w.post("/v1/datasets", json=body)
    assert resp.status_code == status, resp.text
    assert error_code(resp) == code


def test_unknown_dataset_is_404_everywhere(w: httpx.Client) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/datasets/missing", {}),
        ("PUT", "/v1/datasets/missing/schema", {"json": TYPED_SCHEMA}),
        ("POST", "/v1/datasets/missing/reset-history", {}),
        ("POST", "/v1/datasets/missing/batch", {"json": {"upserts": {"a": "b"}}}),
        ("POST", "/v1/datasets/missing/replace", {"json": {"records": {}}}),
        ("GET", "/v1/datasets/missing/records/a", {}),
        ("GET", "/v1/hints?datasets=missing", {}),
    ]
    for method, path, kwargs in cases:
        resp = w.request(method, path, **kwargs)
        assert resp.status_code == 404, (method, path, resp.text)
        assert error_code(resp) == "not_found"


# ------------------------------------------------------------------ writes and reads


def test_typed_batch_json_and_read_back(w: httpx.Client, r: httpx.Client) -> None:
    name = make_typed(w)
    pic = bytes(range(256))
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        json={
            "upserts": {
                "user:1": {
                    "age": 31,
                    "city": "paris",
                    "pic": {"base64": base64.b64encode(pic).decode()},
                    "tags": [{"base64": "AAE="}, {"base64": ""}],
                },
                "a/b c?d": {"age": 2},
                "用户": {"age": 3},
            }
        },
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["dataset"] == name and result["version"] == 1
    assert result["upserted"] == 3 and result["deleted"] == 0 and result["unchanged"] == 0
    got = r.get(record_url(name, b"user:1"))
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["key"] == "user:1" and body["version"] == 1
    assert body["record"]["age"] == 31 and body["record"]["city"] == "paris"
    assert base64.b64decode(body["record"]["pic"]["base64"]) == pic
    assert body["record"]["tags"] == [{"base64": "AAE="}, {"base64": ""}]
    assert r.get(record_url(name, b"a/b c?d")).json()["record"]["age"] == 2
    assert r.get(record_url(name, "用户".encode())).json()["key"] == "用户"
    missing = r.get(record_url(name, b"nobody"))
    assert missing.status_code == 404 and error_code(missing) == "not_found"

    resp = w.post(f"/v1/datasets/{name}/batch", json={"deletes": ["user:1", "never-was"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == 2
    assert r.get(record_url(name, b"user:1")).status_code == 404


def test_msgpack_batch_with_binary_keys(w: httpx.Client, r: httpx.Client) -> None:
    name = make_typed(w)
    key = b"\xff\x00bin/key"
    body = msgpack.packb(
        {"upserts": {key: {"age": 7, "pic": b"\x00\x01"}, "text-key": {"age": 8}}},
        use_bin_type=True,
    )
    resp = w.post(
        f"/v1/datasets/{name}/batch", content=body, headers={"content-type": "application/msgpack"}
    )
    assert resp.status_code == 200, resp.text
    got = r.get(record_url(name, key)).json()
    assert got["key"] == {"base64": base64.b64encode(key).decode()}
    assert got["record"]["age"] == 7 and got["record"]["pic"] == {"base64": "AAE="}
    assert r.get(record_url(name, b"text-key")).json()["record"]["age"] == 8
    body = msgpack.packb({"deletes": [key]}, use_bin_type=True)
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        content=body,
        headers={"content-type": "application/x-msgpack"},
    )
    assert resp.status_code == 200 and resp.json()["deleted"] == 1


def test_opaque_values(w: httpx.Client, r: httpx.Client) -> None:
    name = make_opaque(w)
    blob = b"\x89PNG\xff\xfe"
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        json={
            "upserts": {"t": "héllo", "b": {"base64": base64.b64encode(blob).decode()}},
        },
    )
    assert resp.status_code == 200, resp.text
    assert r.get(record_url(name, b"t")).json() == {"key": "t", "version": 1, "value": "héllo"}
    assert r.get(record_url(name, b"b")).json()["value"] == {
        "base64": base64.b64encode(blob).decode()
    }
    packed = msgpack.packb({"upserts": {b"m": blob}}, use_bin_type=True)
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        content=packed,
        headers={"content-type": "application/msgpack"},
    )
    assert resp.status_code == 200
    assert (
        r.get(record_url(name, b"m")).json()["value"]["base64"] == base64.b64encode(blob).decode()
    )
    bad = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"n": 5}})
    assert bad.status_code == 400 and error_code(bad) == "bad_request"


def test_replace_publishes_only_changes(w: httpx.Client, r: httpx.Client) -> None:
    name = make_opaque(w)
    w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"a": "1", "b": "2", "c": "3"}})
    resp = w.post(f"/v1/datasets/{name}/replace", json={"records": {"a": "1", "b": "20"}})
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["version"] == 2
    assert (result["upserted"], result["deleted"], result["unchanged"]) == (1, 1, 1)
    assert r.get(record_url(name, b"c")).status_code == 404
    assert r.get(record_url(name, b"b")).json()["value"] == "20"
    bad = w.post(f"/v1/datasets/{name}/replace", json={"upserts": {}})
    assert bad.status_code == 400 and error_code(bad) == "bad_request"


@pytest.mark.parametrize(
    "bad_record",
    [
        {"age": "thirty"},  # wrong type
        {"age": 1, "height": 2},  # unknown field
        {"city": "x"},  # missing required field
        {"age": True},  # bool is not int
        {"age": 1, "tags": [None]},  # null inside a list
    ],
)
def test_schema_violation_applies_nothing(
    w: httpx.Client, r: httpx.Client, bad_record: dict[str, Any]
) -> None:
    name = make_typed(w)
    assert w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"keep": {"age": 1}}}).is_success
    before = version(r, name)
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        json={
            "upserts": {"good1": {"age": 5}, "bad": bad_record, "good2": {"age": 6}},
            "deletes": ["keep"],
        },
    )
    assert resp.status_code == 400, resp.text
    assert error_code(resp) == "schema_violation"
    assert version(r, name) == before
    for key in (b"good1", b"good2", b"bad"):
        assert r.get(record_url(name, key)).status_code == 404
    assert r.get(record_url(name, b"keep")).status_code == 200


@pytest.mark.parametrize(
    "case",
    [
        (b'{"upserts": {', "application/json", 400, "bad_request"),
        (b"", "application/json", 400, "bad_request"),
        (b'{"upserts": {"k": {"age": NaN}}}', "application/json", 400, "bad_request"),
        (b"\xc1\xc1\xc1", "application/msgpack", 400, "bad_request"),
        (b"\x92\x01", "application/msgpack", 400, "bad_request"),  # truncated array
        (b"upserts=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"<batch/>", "text/xml", 415, "unsupported_media_type"),
        (b"[]", "application/json", 400, "bad_request"),
        (b'{"upserts": [], "deletes": []}', "application/json", 400, "bad_request"),
        (b'{"deletes": "k"}', "application/json", 400, "bad_request"),
        (b'{"deletes": [1]}', "application/json", 400, "bad_request"),
        (b'{"extra": 1}', "application/json", 400, "bad_request"),
        (b'{"upserts": {"k": 5}}', "application/json", 400, "bad_request"),
        (
            b'{"upserts": {"k": {"age": 1, "pic": {"base64": "!!"}}}}',
            "application/json",
            400,
            "bad_request",
        ),
        (b'{"upserts": {"": {"age": 1}}}', "application/json", 400, "bad_request"),
        (
            b'{"upserts": {"k": {"age": 1}}, "deletes": ["k"]}',
            "application/json",
            400,
            "bad_request",
        ),
    ],
)
def test_malformed_bodies(
    w: httpx.Client, r: httpx.Client, case: tuple[bytes, str, int, str]
) -> None:
    content, ctype, status, code = case
    name = make_typed(w)
    resp = w.post(f"/v1/datasets/{name}/batch", content=content, headers={"content-type": ctype})
    assert resp.status_code == status, resp.text
    assert error_code(resp) == code
    assert version(r, name) == 0


def test_oversized_body_is_413(w: httpx.Client, r: httpx.Client) -> None:
    name = make_opaque(w)
    body = json.dumps({"upserts": {"big": "x" * (2 << 20)}}).encode()
    resp = w.post(
        f"/v1/datasets/{name}/batch", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413 and error_code(resp) == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    resp = w.post(
        f"/v1/datasets/{name}/batch", content=chunks(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413 and error_code(resp) == "too_large"
    assert version(r, name) == 0
    assert w.get("/healthz").status_code == 200  # the client recovers


def test_oversized_key_and_value(w: httpx.Client, r: httpx.Client) -> None:
    name = make_opaque(w, max_value_bytes=100, compress=False)
    resp = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"k" * 512: "v"}})
    assert resp.status_code == 400 and error_code(resp) == "key_too_long"
    resp = w.post(f"/v1/datasets/{name}/batch", json={"deletes": ["k" * 600]})
    assert resp.status_code == 400 and error_code(resp) == "key_too_long"
    resp = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"ok": "v", "big": "x" * 1000}})
    assert resp.status_code == 413 and error_code(resp) == "too_large"
    assert version(r, name) == 0
    resp = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"k" * 500: "v"}})
    assert resp.status_code == 200


def test_longest_key_is_accepted(w: httpx.Client, r: httpx.Client) -> None:
    # 507 bytes: LMDB's 511 less the 4-byte Merkle leaf prefix of the stores
    name = make_opaque(w)
    resp = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"k" * 507: "v"}})
    assert resp.status_code == 200, resp.text
    assert r.get(record_url(name, b"k" * 507)).json()["value"] == "v"
    resp = w.post(f"/v1/datasets/{name}/batch", json={"upserts": {"k" * 508: "v"}})
    assert resp.status_code == 400 and error_code(resp) == "key_too_long"


# ------------------------------------------------------------------ sync


def _load(w: httpx.Client, n: int) -> tuple[str, dict[bytes, str]]:
    name = make_opaque(w)
    values = {f"key-{i:04d}".encode(): f"value {i}" for i in range(n)}
    resp = w.post(
        f"/v1/datasets/{name}/batch",
        json={"upserts": {k.decode(): v for k, v in values.items()}},
    )
    assert resp.status_code == 200, resp.text
    return name, values


def _digest(records: dict[bytes, bytes]) -> Digest:
    xor = 0
    for k, v in records.items():
        xor ^= entry_hash(k, v)
    return Digest(len(records), xor)


def test_sync_diff_round_trip(w: httpx.Client, r: httpx.Client) -> None:
    name, _ = _load(w, 50)
    start = cursor_of(r, name)
    w.post(
        f"/v1/datasets/{name}/batch",
        json={"upserts": {"key-0001": "changed"}, "deletes": ["key-0002"]},
    )
    [answer] = sync(r, DiffRequest(name, start))
    assert isinstance(answer, DiffResponse)
    assert answer.cursor == Cursor(start.epoch, start.version + 1)
    assert {k for k, _ in answer.upserts} == {b"key-0001"}
    assert answer.deletes == (b"key-0002",)
    assert answer.meta is not None  # meta_revision 0 is never the origin's
    [full] = sync(r, DiffRequest(name, Cursor(start.epoch, 0)))
    assert isinstance(full, DiffResponse) and len(full.upserts) == 49
    assert _digest(dict(full.upserts)) == full.digest
    [other] = sync(r, DiffRequest(name, Cursor(b"\x01" * 16, 0)))
    assert isinstance(other, CursorUnservable)


def test_sync_snapshot_single_and_stream(r: httpx.Client, w: httpx.Client) -> None:
    name, values = _load(w, 120)
    [chunk] = sync(r, SnapshotRequest(name, None, 1000, False))
    assert isinstance(chunk, SnapshotChunk) and chunk.next_after is None
    records = dict(chunk.records)
    assert set(records) == set(values) and _digest(records) == chunk.digest

    chunks = sync(r, SnapshotRequest(name, None, 25, True))
    assert len(chunks) == 5
    assert all(isinstance(c, SnapshotChunk) for c in chunks)
    streamed: dict[bytes, bytes] = {}
    for c in chunks:
        assert isinstance(c, SnapshotChunk) and c.cursor == chunks[0].cursor  # type: ignore[union-attr]
        streamed.update(c.records)
    assert [c.next_after is None for c in chunks] == [False] * 4 + [True]  # type: ignore[union-attr]
    assert streamed == records

    empty = make_opaque(w)
    [only] = sync(r, SnapshotRequest(empty, None, 10, True))
    assert isinstance(only, SnapshotChunk) and only.records == () and only.next_after is None
    assert only.digest == EMPTY_DIGEST


def test_sync_merkle_round_trips(r: httpx.Client, w: httpx.Client) -> None:
    name, _ = _load(w, 40)
    [nodes] = sync(r, MerkleNodesRequest(name, NodeQuery(0, (0,), 2)))
    assert isinstance(nodes, MerkleNodesResponse)
    assert nodes.geometry == (16, 4) and len(nodes.answer.digests) == 1
    assert len(nodes.answer.digests[0]) == 256
    [leaves] = sync(r, MerkleLeavesRequest(name, LeafQuery(tuple(range(0, 65536, 4096)))))
    assert isinstance(leaves, MerkleLeavesResponse)
    assert len(leaves.answer.entries) == 16
    bad = r.post(
        "/v1/sync",
        content=encode_frame(*to_wire(MerkleNodesRequest(name, NodeQuery(9, (0,), 1)))),
        headers={"content-type": FRAME},
    )
    assert bad.status_code == 422 and error_code(bad) == "bad_frame"


def test_sync_errors(r: httpx.Client, w: httpx.Client) -> None:
    name = make_opaque(w)
    frame = encode_frame(*to_wire(SnapshotRequest(name, None, 10, False)))

    def post(content: bytes, ctype: str = FRAME) -> httpx.Response:
        return r.post("/v1/sync", content=content, headers={"content-type": ctype})

    assert post(frame).status_code == 200
    corrupt = bytearray(frame)
    corrupt[-1] ^= 0x55
    for body in (bytes(corrupt), frame[:-1], frame[:10], frame + frame, b"", b"XX" + frame[2:]):
        resp = post(body)
        assert resp.status_code == 422, (body[:20], resp.text)
        assert error_code(resp) == "bad_frame"
    hint = encode_frame(*to_wire(Hint(name, Cursor(b"\x00" * 16, 0), EMPTY_DIGEST)))
    resp = post(hint)
    assert resp.status_code == 422 and error_code(resp) == "bad_frame"
    shapeless = encode_frame(4, ["only-a-name"])
    assert post(shapeless).status_code == 422
    resp = post(frame, "application/json")
    assert resp.status_code == 415 and error_code(resp) == "unsupported_media_type"
    unknown = encode_frame(*to_wire(DiffRequest("no-such-ds", Cursor(b"\x00" * 16, 0))))
    resp = post(unknown)
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    resp = post(encode_frame(*to_wire(SnapshotRequest("no-such-ds", None, 10, True))))
    assert resp.status_code == 404 and error_code(resp) == "not_found"


# ------------------------------------------------------------------ hints


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event or "comment", data) pairs from an SSE line iterator."""
    event, data = "message", ""
    for line in lines:
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "":
            if data:
                yield event, data
            event, data = "message", ""


def test_hints_stream(origin: OriginProcess, w: httpx.Client) -> None:
    a, b = make_opaque(w), make_opaque(w)
    w.post(f"/v1/datasets/{a}/batch", json={"upserts": {"k": "v"}})
    headers = {"authorization": f"Bearer {READ}"}
    url = f"{origin.base_url}/v1/hints?datasets={a},{b}"
    with httpx.stream("GET", url, headers=headers, timeout=10.0) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        events = _events(resp.iter_lines())
        first: dict[str, dict[str, Any]] = {}
        while len(first) < 2:
            kind, data = next(events)
            if kind == "hint":
                doc = json.loads(data)
                first[doc["dataset"]] = doc
        assert first[a]["version"] == 1 and first[b]["version"] == 0
        assert set(first[a]) == {"dataset", "epoch", "version", "digest"}

        w.post(f"/v1/datasets/{b}/batch", json={"upserts": {"x": "y"}})
        seen_ping = False
        while True:
            kind, data = next(events)
            if kind == "comment":
                seen_ping = seen_ping or data == "ping"
                continue
            doc = json.loads(data)
            if doc["dataset"] == b and doc["version"] == 1:
                break
        # Nothing more happens: the short ping interval (0.3 s) shows up.
        while not seen_ping:
            kind, data = next(events)
            seen_ping = kind == "comment" and data == "ping"
    # The server noticed the disconnect: the open-stream gauge drops to 0.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(origin.base_url + "/metrics").text
        if "replicad_hint_subscribers 0" in text:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hint stream was not closed after the client left")


def test_hints_all_datasets(origin: OriginProcess, w: httpx.Client) -> None:
    name = make_opaque(w)
    headers = {"authorization": f"Bearer {READ}"}
    with httpx.stream("GET", origin.base_url + "/v1/hints", headers=headers, timeout=10) as resp:
        assert resp.status_code == 200
        names = set()
        events = _events(resp.iter_lines())
        while name not in names:
            kind, data = next(events)
            if kind == "hint":
                names.add(json.loads(data)["dataset"])


# ------------------------------------------------------------------ fleet


def test_ack_then_fleet_shows_lag(r: httpx.Client, w: httpx.Client) -> None:
    name = make_opaque(w)
    for i in range(3):
        w.post(f"/v1/datasets/{name}/batch", json={"upserts": {f"k{i}": "v"}})
    cur = cursor_of(r, name)
    replica = unique("host-")
    resp = r.post(
        "/v1/ack",
        json={
            "replica": replica,
            "datasets": {
                name: {"epoch": cur.epoch.hex(), "version": cur.version - 1},
                "elsewhere": {"epoch": "00" * 16, "version": 5},
            },
            "info": {"agent": "sidecar/0.1", "pid": 42},
        },
    )
    assert resp.status_code == 204, resp.text
    assert resp.content == b""
    fleet = r.get("/v1/fleet").json()["replicas"]
    [entry] = [e for e in fleet if e["replica"] == replica]
    assert entry["address"] == "127.0.0.1"
    assert entry["datasets"][name] == {
        "epoch": cur.epoch.hex(),
        "version": cur.version - 1,
        "lag": 1,
    }
    assert entry["datasets"]["elsewhere"]["lag"] is None
    assert entry["info"] == {"agent": "sidecar/0.1", "pid": 42}
    assert 0 <= entry["age_seconds"] < 60 and entry["last_seen"] > 1.6e9

    packed = msgpack.packb(
        {"replica": replica, "datasets": {name: {"epoch": cur.epoch, "version": cur.version}}},
        use_bin_type=True,
    )
    resp = r.post("/v1/ack", content=packed, headers={"content-type": "application/msgpack"})
    assert resp.status_code == 204
    [entry] = [e for e in r.get("/v1/fleet").json()["replicas"] if e["replica"] == replica]
    assert entry["datasets"][name]["lag"] == 0

    bads: list[dict[str, Any]] = [
        {"datasets": {}},
        {"replica": ""},
        {"replica": "x" * 300},
        {"replica": "h", "datasets": {name: {"epoch": "zz", "version": 1}}},
        {"replica": "h", "datasets": {name: {"epoch": "00" * 16, "version": -1}}},
        {"replica": "h", "info": [1]},
        {"replica": "h", "info": {"blob": "x" * 70_000}},
    ]
    for bad in bads:
        resp = r.post("/v1/ack", json=bad)
        assert resp.status_code == 400, (bad, resp.text)
        assert error_code(resp) == "bad_request"


# ------------------------------------------------------------------ logs


def test_request_log_lines_carry_no_secrets(origin: OriginProcess, r: httpx.Client) -> None:
    r.get("/v1/datasets")
    text = origin.log_path.read_text()
    assert WRITE not in text and READ not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [x for x in lines if x.get("msg") == "request"]
    assert any(x["route"] == "/v1/datasets" and x["status"] == 200 for x in requests)
    assert all({"method", "route", "status", "duration_ms"} <= set(x) for x in requests)
    assert any(x.get("msg") == "listening" for x in lines)


# ------------------------------------------------------------------ durability


def test_durability_restart_and_reset_history(tmp_path: Path) -> None:
    with OriginProcess(tmp_path / "durable", write_tokens=[WRITE], durable=True) as proc:
        with _client(proc.base_url, WRITE) as c:
            assert c.post("/v1/datasets", json={"name": "d", "opaque": True}).status_code == 201
            for i in range(5):
                resp = c.post("/v1/datasets/d/batch", json={"upserts": {f"k{i}": f"v{i}"}})
                assert resp.status_code == 200
            old = cursor_of(c, "d")
        proc.kill9()  # right after the acknowledged write: no clean shutdown
        proc.start()
        with _client(proc.base_url, WRITE) as c:
            assert c.get(record_url("d", b"k4")).json()["value"] == "v4"
            assert cursor_of(c, "d") == old
            [diff] = sync(c, DiffRequest("d", Cursor(old.epoch, 1)))  # the queue survived
            assert isinstance(diff, DiffResponse)
            assert {k for k, _ in diff.upserts} == {b"k1", b"k2", b"k3", b"k4"}
        proc.restart()  # graceful this time
        with _client(proc.base_url, WRITE) as c:
            [diff] = sync(c, DiffRequest("d", Cursor(old.epoch, 2)))
            assert isinstance(diff, DiffResponse) and len(diff.upserts) == 3
            reset = c.post("/v1/datasets/d/reset-history")
            assert reset.status_code == 200
            assert reset.json()["epoch"] != old.epoch.hex()
            assert reset.json()["version"] == old.version
            [answer] = sync(c, DiffRequest("d", Cursor(old.epoch, 2)))
            assert isinstance(answer, CursorUnservable)
            new = cursor_of(c, "d")
            [fresh] = sync(c, DiffRequest("d", new))
            assert isinstance(fresh, DiffResponse) and fresh.upserts == ()
        assert proc.stop() == 0


# ------------------------------------------------------------------ in-process unit checks


def test_error_mapping_table() -> None:
    cases: list[tuple[Exception, str, tuple[int, str] | None]] = [
        (FieldTypeError("x"), "/v1/datasets/{name}/batch", (400, "schema_violation")),
        (UnknownFieldError("x"), "/v1/datasets/{name}/batch", (400, "schema_violation")),
        (MissingFieldError("x"), "/v1/datasets/{name}/batch", (400, "schema_violation")),
        (SchemaError("x"), "/v1/datasets", (400, "schema_error")),
        (KeyTooLongError("x"), "/v1/datasets/{name}/batch", (400, "key_too_long")),
        (InvalidKeyError("x"), "/v1/datasets/{name}/batch", (400, "bad_request")),
        (ValueTooLargeError("x"), "/v1/datasets/{name}/batch", (413, "too_large")),
        (UnknownDatasetError("x"), "/v1/sync", (404, "not_found")),
        (DatasetExistsError("x"), "/v1/datasets", (409, "exists")),
        (BadRequestError("x"), "/v1/datasets", (400, "bad_request")),
        (ConfigError("x"), "/v1/datasets", (400, "bad_request")),
        (FrameChecksumError("x"), "/v1/sync", (422, "bad_frame")),
        (ProtocolError("x"), "/v1/sync", (422, "bad_frame")),
        (MerkleError("x"), "/v1/sync", (422, "bad_frame")),
        (ProtocolError("x"), "/v1/ack", (400, "bad_request")),
        (MerkleError("x"), "/v1/datasets", (400, "bad_request")),
        (MapFullError("x"), "/v1/datasets/{name}/batch", (507, "storage_full")),
        (StorageError("x"), "/v1/datasets", (507, "storage_full")),
        (AuthError("x", 401), "/v1/fleet", (401, "unauthorized")),
        (AuthError("x", 403), "/v1/datasets", (403, "forbidden")),
        (CorruptRecordError("x"), "/v1/datasets/{name}/records/{key}", None),
        (RuntimeError("x"), "/v1/datasets", None),
    ]
    for exc, route, expected in cases:
        got = error_response(exc, route)
        assert (got if got is None else got[:2]) == expected, (exc, route)


class FakeService:
    """Just enough of OriginService for the app's error paths."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.registry = Registry()
        self.clock = time.time
        self.fail = fail

    def datasets(self) -> list[Any]:
        return []

    def dataset(self, name: str) -> Any:
        raise UnknownDatasetError(f"no dataset named {name!r}")

    async def create_dataset(self, spec: Any) -> Any:
        assert self.fail is not None
        raise self.fail

    def subscribe(self, datasets: Any, *, diffs: bool = False) -> Any:
        # the app requires a cancel-safe iterator: the hub's subscription
        hub = HintHub()
        return hub.subscribe(None, lambda: [Hint("fake", Cursor(b"\x00" * 16, 3), EMPTY_DIGEST)])


def _run_in_process(app: OriginApp, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return trio.run(main)


def test_unexpected_error_is_a_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    app = OriginApp(FakeService(RuntimeError("secret internals")))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="replicad.http"):
        resp = _run_in_process(app, "POST", "/v1/datasets", json={"name": "x", "opaque": True})
    assert resp.status_code == 500
    assert resp.json() == {"error": {"code": "internal", "message": "internal server error"}}
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert errors and errors[0].exc_info is not None  # the traceback is logged
    assert any(getattr(rec, "status", None) == 500 for rec in caplog.records)
    assert app.service.registry.render().count('status="500"') == 1


def test_storage_full_is_507() -> None:
    app = OriginApp(FakeService(MapFullError("map full at 64 GiB")))  # type: ignore[arg-type]
    resp = _run_in_process(app, "POST", "/v1/datasets", json={"name": "x", "opaque": True})
    assert resp.status_code == 507 and error_code(resp) == "storage_full"


def test_auth_off_without_tokens() -> None:
    app = OriginApp(FakeService(DatasetExistsError("exists")))  # type: ignore[arg-type]
    assert not app.auth_enabled
    resp = _run_in_process(app, "POST", "/v1/datasets", json={"name": "x", "opaque": True})
    assert resp.status_code == 409 and error_code(resp) == "exists"


def test_hint_stream_ends_on_shutdown() -> None:
    app = OriginApp(FakeService(), ping_interval=60)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            if not sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            await trio.sleep_forever()
            raise AssertionError

        async def send(message: Any) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/v1/hints",
            "raw_path": b"/v1/hints",
            "query_string": b"",
            "headers": [],
            "http_version": "1.1",
        }
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(app, scope, receive, send)
                while len(sent) < 2:
                    await trio.sleep(0.01)
                app.shutdown()

    trio.run(main)
    assert sent[0]["status"] == 200
    assert sent[1]["body"].startswith(b"event: hint\ndata: ")
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_every_route_is_documented() -> None:
    from replicad.openapi import build

    paths = build()["paths"]
    for route in ROUTES:
        assert route.template in paths, route.template
        documented = {m.upper() for m in paths[route.template] if m != "parameters"}
        assert documented == set(route.methods), route.template


async def _call(app: OriginApp, scope: dict[str, Any], body: bytes) -> list[dict[str, Any]]:
    """Drive the ASGI app directly; returns every message it sent."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: Any) -> None:
        sent.append(dict(message))

    base = {"type": "http", "query_string": b"", "headers": [], "http_version": "1.1"}
    await app({**base, **scope}, receive, send)
    return sent


def test_snapshot_stream_error_aborts_the_response(caplog: pytest.LogCaptureFixture) -> None:
    chunk = SnapshotChunk("fake", Cursor(b"\x00" * 16, 1), EMPTY_DIGEST, ((b"k", b"v"),), b"k")

    class Streaming(FakeService):
        async def snapshot_stream(self, request: SnapshotRequest) -> AsyncIterator[SnapshotChunk]:
            yield chunk
            raise StorageError("disk went away")

    app = OriginApp(Streaming())  # type: ignore[arg-type]
    frame = encode_frame(*to_wire(SnapshotRequest("fake", None, 1, True)))
    scope = {
        "method": "POST",
        "path": "/v1/sync",
        "raw_path": b"/v1/sync",
        "headers": [(b"content-type", FRAME.encode())],
    }
    with caplog.at_level(logging.WARNING, logger="replicad.http"):
        sent = trio.run(_call, app, scope, frame)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[1]["more_body"] is True and sent[1]["body"] == encode_frame(*to_wire(chunk))
    # No end of body: the server closes the connection, the client sees a
    # truncated stream and retries.
    assert len(sent) == 2
    assert any("after the response started" in rec.getMessage() for rec in caplog.records)


def test_serve_in_process_on_a_unix_socket(tmp_path: Path) -> None:
    from replicad.config import Listen, OriginConfig
    from replicad.server import hypercorn_config, serve

    sock = tmp_path / "origin.sock"
    config = OriginConfig(
        data=tmp_path / "data",
        listen=Listen(unix_path=str(sock)),
        write_tokens=frozenset({WRITE}),
        durable=False,
        map_size_mb=4,
    )
    stop = trio.Event()

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    lambda task_status: serve(
                        config, shutdown_trigger=stop.wait, task_status=task_status
                    )
                )
                assert binds and str(sock) in binds[0]
                transport = httpx.AsyncHTTPTransport(uds=str(sock))
                headers = {"authorization": f"Bearer {WRITE}"}
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://origin", headers=headers
                ) as client:
                    resp = await client.post("/v1/datasets", json={"name": "u", "opaque": True})
                    assert resp.status_code == 201
                    resp = await client.post("/v1/ack", json={"replica": "local"})
                    assert resp.status_code == 204
                    fleet = (await client.get("/v1/fleet")).json()["replicas"]
                    assert fleet[0]["address"] == "unix"
                stop.set()

    trio.run(main)
    # serve() returned: the store was closed and can be opened again.
    from replicad.store import OriginStore

    store = OriginStore(tmp_path / "data", durable=False, map_size=4 << 20)
    try:
        assert store.names() == ["u"]
    finally:
        store.close()

    tls = hypercorn_config(
        OriginConfig(tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem").validate()
    )
    assert tls.certfile == str(tmp_path / "cert.pem") and tls.keyfile == str(tmp_path / "key.pem")
    assert hypercorn_config(config).bind == [f"unix:{sock}"]


def test_open_hint_stream_does_not_block_shutdown(tmp_path: Path) -> None:
    with OriginProcess(tmp_path / "sse", durable=False) as proc:
        httpx.post(proc.base_url + "/v1/datasets", json={"name": "d", "opaque": True})
        with httpx.stream("GET", proc.base_url + "/v1/hints", timeout=10) as resp:
            lines = resp.iter_lines()
            assert next(lines) == "event: hint"
            started = time.monotonic()
            assert proc.stop() == 0
            assert time.monotonic() - started < 4  # well under hypercorn's grace period
            rest = list(lines)  # the server ended the stream cleanly
            assert rest[0].startswith("data: ")


def test_hint_events_are_encoded_once_per_event_for_every_stream() -> None:
    from replicad.http_app import _EventCache

    cache = _EventCache(size=2)
    one = Hint("a", Cursor(b"\x01" * 16, 1), EMPTY_DIGEST)
    two = Hint("a", Cursor(b"\x01" * 16, 2), EMPTY_DIGEST)
    first = cache.encode(one)
    assert cache.encode(one) is first  # the second stream reuses the bytes
    assert b'"version":2' in cache.encode(two) and b'"version":1' in first
    for v in range(3, 6):  # pushes the first out of the cache
        cache.encode(Hint("a", Cursor(b"\x01" * 16, v), EMPTY_DIGEST))
    again = cache.encode(one)
    assert again == first and again is not first
