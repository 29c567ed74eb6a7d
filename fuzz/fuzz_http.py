"""Fuzz harness: the origin's HTTP API bodies and request lines
(``replicad/http_app.py`` over a real :class:`OriginService` and
:class:`OriginStore`, in process, through ASGI calls).

The first input byte picks the endpoint and the body's media type (write
batches and bulk replaces in JSON and msgpack on a typed and an opaque
dataset, dataset creation, schema evolution, acks, sync frames, record reads
with a fuzzed key, hint subscriptions with a fuzzed query string, and raw
paths); the rest is the body (or the key, query or path). Checks, per the
contract of ``docs/api.md``:

* the answer is a documented status -- 2xx, or 400/404/405/409/413/415/422
  with the matching error code -- never a 500 (or 507: the store here is far
  from full);
* every error is JSON ``{"error": {"code", "message"}}``;
* a rejected write applies nothing (the dataset's version and digest are
  unchanged);
* the app answers within 5 s.

The origin runs in a trio thread of this process; every 2,000 inputs it
starts afresh (a new store), so datasets and records do not pile up.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    import msgpack
    import trio

    from replicad.frames import encode_frame
    from replicad.http_app import FRAME_MEDIA_TYPE, OriginApp
    from replicad.merkle import Digest, LeafQuery, NodeQuery
    from replicad.messages import (
        Cursor,
        DiffRequest,
        MerkleLeavesRequest,
        MerkleNodesRequest,
        SnapshotRequest,
        to_wire,
    )
    from replicad.origin_types import DatasetSpec, WriteBatch
    from replicad.schema import Schema
    from replicad.service import OriginService
    from replicad.store import OriginStore

JSON = "application/json"
MSGPACK = "application/msgpack"
TYPED_SCHEMA: dict[str, Any] = {
    "version": 1,
    "fields": [
        {"name": "age", "type": "int"},
        {"name": "city", "type": "str", "dictionary": True, "nullable": True},
        {"name": "pic", "type": "bytes", "nullable": True},
        {"name": "tags", "type": "list<str>", "nullable": True},
        {"name": "score", "type": "float32", "nullable": True},
    ],
}
CODES = {
    400: {"bad_request", "schema_violation", "schema_error", "key_too_long"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    409: {"exists"},
    413: {"too_large"},
    415: {"unsupported_media_type"},
    422: {"bad_frame"},
}
MAX_BODY = 1 << 16
RESET_EVERY = 2000


@dataclass(frozen=True)
class Target:
    method: str
    path: str  # "{key}" / "{raw}" are filled from the input
    media: str | None
    writes: str | None = None  # the dataset a rejected request must leave unchanged


TARGETS = [
    Target("POST", "/v1/datasets/fz_typed/batch", JSON, "fz_typed"),
    Target("POST", "/v1/datasets/fz_typed/batch", MSGPACK, "fz_typed"),
    Target("POST", "/v1/datasets/fz_opaque/batch", JSON, "fz_opaque"),
    Target("POST", "/v1/datasets/fz_opaque/batch", MSGPACK, "fz_opaque"),
    Target("POST", "/v1/datasets/fz_typed/replace", JSON, "fz_typed"),
    Target("POST", "/v1/datasets/fz_opaque/replace", MSGPACK, "fz_opaque"),
    Target("POST", "/v1/datasets", JSON),
    Target("POST", "/v1/datasets", MSGPACK),
    Target("PUT", "/v1/datasets/fz_typed/schema", JSON, "fz_typed"),
    Target("PUT", "/v1/datasets/fz_typed/schema", MSGPACK, "fz_typed"),
    Target("POST", "/v1/ack", JSON),
    Target("POST", "/v1/ack", MSGPACK),
    Target("POST", "/v1/sync", FRAME_MEDIA_TYPE),
    Target("GET", "/v1/datasets/fz_typed/records/{key}", None),
    Target("GET", "/v1/hints?{raw}", None),
    Target("GET", "{raw}", None),
    Target("POST", "/v1/datasets/fz_opaque/batch", "{raw}", "fz_opaque"),
]


@dataclass
class Answer:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


class Origin:
    """An OriginService and its OriginApp in a trio thread; :meth:`call` runs
    one request through the app from any other thread."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-http-"))
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.app: OriginApp | None = None
        self.service: OriginService | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-origin", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fuzz origin did not start")
        if self.error is not None:
            raise RuntimeError("the fuzz origin did not start") from self.error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        store = OriginStore(
            self.dir / "store", durable=False, map_size=64 << 20, max_map_size=4 << 30
        )
        store.create_dataset(DatasetSpec("fz_typed", Schema.from_json(TYPED_SCHEMA)))
        store.create_dataset(DatasetSpec("fz_opaque", None))
        store.commit([WriteBatch("fz_opaque", {b"a": b"1", b"b": b"2"})])
        self.service = OriginService(store)
        self.app = OriginApp(self.service, max_body_bytes=MAX_BODY, ping_interval=0.05)
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.service.run)
                self._ready.set()
                await self._stop.wait()
                self.app.shutdown()
                nursery.cancel_scope.cancel()
        finally:
            self.service.close()

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def state(self, name: str) -> tuple[Cursor, Digest]:
        assert self.service is not None
        info = self.service.dataset(name)
        return info.cursor, info.digest

    def call(self, method: str, raw_path: bytes, media: str | None, body: bytes) -> Answer:
        assert self._token is not None
        return trio.from_thread.run(
            self._call, method, raw_path, media, body, trio_token=self._token
        )

    async def _call(self, method: str, raw_path: bytes, media: str | None, body: bytes) -> Answer:
        assert self.app is not None
        path, _, query = raw_path.partition(b"?")
        headers = [(b"content-length", str(len(body)).encode())]
        if media is not None:
            headers.append((b"content-type", media.encode("latin-1")))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": urllib.parse.unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 7070),
        }
        sent = False
        answer = Answer()

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await trio.sleep(0.01)  # then the client goes away (ends hint streams)
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = int(message["status"])
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                answer.body += bytes(message.get("body", b""))

        with trio.fail_after(5):
            await self.app(scope, receive, send)
        return answer


class _Shared:
    """The one origin of this process, renewed every RESET_EVERY inputs."""

    origin: Origin | None = None
    calls = 0


def origin() -> Origin:
    _Shared.calls += 1
    if _Shared.origin is not None and _Shared.calls % RESET_EVERY == 0:
        _Shared.origin.close()
        _Shared.origin = None
    if _Shared.origin is None:
        _Shared.origin = Origin()
    return _Shared.origin


def close() -> None:
    if _Shared.origin is not None:
        _Shared.origin.close()
        _Shared.origin = None


def _check_error(answer: Answer, what: str) -> None:
    if answer.status not in CODES:
        raise driver.FuzzFindingError(f"{what}: status {answer.status}: {answer.body[:300]!r}")
    try:
        doc = json.loads(answer.body)
        code = doc["error"]["code"]
        message = doc["error"]["message"]
    except (ValueError, KeyError, TypeError):
        raise driver.FuzzFindingError(
            f"{what}: malformed error body {answer.body[:300]!r}"
        ) from None
    if set(doc) != {"error"} or code not in CODES[answer.status] or not isinstance(message, str):
        raise driver.FuzzFindingError(f"{what}: status {answer.status} with {doc}")


def one_input(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    rest = data[1:]
    body = rest
    path = target.path
    media = target.media
    if "{key}" in path:
        path, body = path.replace("{key}", urllib.parse.quote(rest, safe="")), b""
    elif "{raw}" in path:
        raw = rest.split(b"\n", 1)[0]
        path, body = path.replace("{raw}", raw.decode("latin-1")), b""
        if not path.startswith("/"):
            path = "/" + path
    if media == "{raw}":
        media_raw, _, body = rest.partition(b"\n")
        media = media_raw[:100].decode("latin-1")
    o = origin()
    before = o.state(target.writes) if target.writes else None
    answer = o.call(target.method, path.encode("latin-1"), media, body)
    what = f"{target.method} {path[:80]} ({media})"
    if not 200 <= answer.status < 300:
        _check_error(answer, what)
        if before is not None and o.state(target.writes or "") != before:
            raise driver.FuzzFindingError(f"{what}: rejected with {answer.status}, yet it wrote")


def seeds() -> list[bytes]:
    def pick(method: str, path: str, media: str | None) -> bytes:
        for i, t in enumerate(TARGETS):
            if (t.method, t.path, t.media) == (method, path, media):
                return bytes([i])
        raise KeyError(path)

    c = Cursor(b"\x00" * 16, 0)
    rec = {"age": 3, "city": "x", "pic": {"base64": "AAE="}, "tags": ["a"], "score": 1.5}
    out = [
        pick("POST", "/v1/datasets/fz_typed/batch", JSON)
        + json.dumps({"upserts": {"k": rec}, "deletes": ["z"]}).encode(),
        pick("POST", "/v1/datasets/fz_typed/batch", MSGPACK)
        + msgpack.packb({"upserts": {b"k": {**rec, "pic": b"\x00"}}}, use_bin_type=True),
        pick("POST", "/v1/datasets/fz_opaque/batch", JSON)
        + json.dumps({"upserts": {"k": "v", "b": {"base64": "AAE="}}, "deletes": ["a"]}).encode(),
        pick("POST", "/v1/datasets/fz_opaque/batch", MSGPACK)
        + msgpack.packb({"upserts": {b"k": b"v"}, "deletes": [b"a"]}, use_bin_type=True),
        pick("POST", "/v1/datasets/fz_typed/replace", JSON)
        + json.dumps({"records": {"k": rec}}).encode(),
        pick("POST", "/v1/datasets/fz_opaque/replace", MSGPACK)
        + msgpack.packb({"records": {b"k": b"v"}}, use_bin_type=True),
        pick("POST", "/v1/datasets", JSON)
        + json.dumps(
            {
                "name": "n1",
                "schema": {"fields": TYPED_SCHEMA["fields"]},
                "merkle": {"fanout": 4, "depth": 2},
                "queue": {"max_entries": 8, "policy": "halving"},
                "max_value_bytes": 100,
                "compress": True,
            }
        ).encode(),
        pick("POST", "/v1/datasets", MSGPACK)
        + msgpack.packb({"name": "n2", "opaque": True}, use_bin_type=True),
        pick("PUT", "/v1/datasets/fz_typed/schema", JSON)
        + json.dumps(
            {"fields": [*TYPED_SCHEMA["fields"], {"name": "x", "type": "int", "default": 1}]}
        ).encode(),
        pick("POST", "/v1/ack", JSON)
        + json.dumps(
            {
                "replica": "h",
                "datasets": {"fz_typed": {"epoch": "00" * 16, "version": 1}},
                "info": {"a": [1, 2.5, None]},
            }
        ).encode(),
        pick("POST", "/v1/ack", MSGPACK)
        + msgpack.packb({"replica": "h", "datasets": {}}, use_bin_type=True),
        pick("GET", "/v1/datasets/fz_typed/records/{key}", None) + b"k",
        pick("GET", "/v1/hints?{raw}", None) + b"datasets=fz_typed,fz_opaque&diffs=1",
        pick("GET", "{raw}", None) + b"/v1/datasets/fz_opaque/records/a%2Fb",
        pick("POST", "/v1/datasets/fz_opaque/batch", "{raw}")
        + b"application/vnd.msgpack; charset=x\n"
        + msgpack.packb({"upserts": {b"k": b"v"}}, use_bin_type=True),
    ]
    sync = pick("POST", "/v1/sync", FRAME_MEDIA_TYPE)
    for msg in (
        DiffRequest("fz_opaque", c, 0, (b"a",)),
        SnapshotRequest("fz_opaque", None, 10, False),
        SnapshotRequest("fz_typed", b"", 1, True),
        MerkleNodesRequest("fz_opaque", NodeQuery(0, (0,), 2)),
        MerkleLeavesRequest("fz_opaque", LeafQuery((0, 1))),
    ):
        out.append(sync + encode_frame(*to_wire(msg)))
    return out


SEEDS = seeds()

if __name__ == "__main__":
    try:
        code = driver.main("fuzz_http", one_input, SEEDS)
    finally:
        close()
    sys.exit(code)
