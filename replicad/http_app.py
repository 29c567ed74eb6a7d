"""The origin's HTTP API (``docs/api.md``) as a raw ASGI 3 application.

Theory of operation
-------------------
:class:`OriginApp` is a thin translation between HTTP and
:class:`replicad.service.OriginService`; it holds no state of its own beyond
its settings and metrics. One request goes through these steps, in order:

1. **Route.** The raw (still percent-encoded) path is split on ``/`` and
   matched against a small table of templates (:data:`ROUTES`); each segment
   is percent-decoded only after matching, so a record key may contain ``/``
   (as ``%2F``) and any byte. No match is ``404``; a match with another method
   is ``405`` with an ``Allow`` header.
2. **Authorize.** Each route has an access level: open (``/healthz``,
   ``/metrics``, ``/openapi.json``), read or write. The bearer token is
   compared with every configured token in constant time
   (:func:`hmac.compare_digest`, no early exit). No or an unknown token is
   ``401``, a read token on a write route ``403``. With no token configured at
   all, auth is off.
3. **Read the body** incrementally, never more than ``max_body_bytes``: a
   ``Content-Length`` above the limit is ``413`` before any byte is read, and
   a body that grows past the limit is ``413`` as soon as it does; a body
   that stalls for ``body_timeout`` seconds is ``408`` (so a slow client
   cannot hold a connection forever).
4. **Decode** JSON or msgpack by ``Content-Type`` (``415`` otherwise; no
   content type means JSON, so ``curl -d`` works), check the shape, convert
   keys and bytes (JSON: keys are strings whose UTF-8 bytes are the key,
   bytes are ``{"base64": ...}``; msgpack: bin or str). The rules live in
   :mod:`replicad.http_body`. A large write body is decoded, checked and
   encoded by an ingest worker process instead (:mod:`replicad.ingest`),
   with the same rules and messages.
5. **Call the service**, and map its errors to the documented status and
   code (:func:`error_response`). Anything unexpected is a ``500`` with a
   generic message and a logged traceback.

Every request is counted in ``service.registry``
(``replicad_http_requests_total{route,method,status}`` and the
``replicad_http_request_duration_seconds{route}`` histogram) and logged as one
line (method, route template, status, duration): never a token, never a body.

Streams. ``POST /v1/sync`` with a streaming ``SnapshotRequest`` sends one frame
per chunk as it is read; an error after the first chunk aborts the response
(the connection is closed without the final chunk, so the client sees a
truncated stream and retries, never a half answer). ``GET /v1/hints`` is a
server-sent event stream: the subscription's hints go through a zero-size
channel to one writer task, which sends a ``: ping`` comment whenever no hint
came for ``ping_interval`` seconds; a task watching ``http.disconnect`` and
one watching :meth:`OriginApp.shutdown` end the stream.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote_to_bytes

import trio

from replicad.codec import DatasetCodec
from replicad.errors import (
    AuthError,
    BadRequestError,
    CodecError,
    ConfigError,
    CorruptRecordError,
    DatasetExistsError,
    FrameError,
    InvalidKeyError,
    KeyTooLongError,
    MerkleError,
    ProtocolError,
    RecordError,
    ReplicadError,
    RetryLaterError,
    SchemaError,
    StaleEncodingError,
    StorageError,
    UnknownDatasetError,
    ValueTooLargeError,
)
from replicad.frames import FrameDecoder, encode_frame
from replicad.http_body import (
    HttpError,
    check_object,
    decode_document,
    key_text,
    parse_write,
)
from replicad.ingest_pool import IngestPool
from replicad.merkle import Geometry
from replicad.messages import (
    EPOCH_BYTES,
    REQUEST_TYPES,
    Cursor,
    DiffPush,
    DiffResponse,
    Hint,
    Response,
    SnapshotChunk,
    SnapshotRequest,
    from_wire,
    to_wire,
)
from replicad.metrics import Registry
from replicad.origin_types import (
    DatasetInfo,
    DatasetSpec,
    EncodingBasis,
    FleetEntry,
    WriteBatch,
    WriteResult,
    check_dataset_name,
)
from replicad.schema import Schema

__all__ = [
    "FRAME_MEDIA_TYPE",
    "ROUTES",
    "HttpError",
    "OriginApp",
    "error_response",
]

log = logging.getLogger("replicad.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FRAME_MEDIA_TYPE = "application/x-replicad-frame"
JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
DEFAULT_PING_INTERVAL = 15.0
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a request body may go without a byte before the request is
answered 408 and its connection closed: a client that sends its headers and
then trickles (or stops) its body would otherwise hold a connection forever
(the server's own timeout only covers the request line and headers)."""
MAX_INFO_BYTES = 64 * 1024
"""Bound of an ack's ``info`` object (as JSON): the fleet view keeps one per replica."""

OPEN, READ, WRITE = "open", "read", "write"
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class OriginServiceLike(Protocol):
    """What the app needs of :class:`replicad.service.OriginService`."""

    registry: Registry
    clock: Callable[[], float]

    def datasets(self) -> list[DatasetInfo]: ...
    def dataset(self, name: str) -> DatasetInfo: ...
    def codec(self, name: str) -> DatasetCodec: ...
    def encoding_basis(self, name: str) -> EncodingBasis: ...
    async def create_dataset(self, spec: DatasetSpec) -> DatasetInfo: ...
    async def evolve_schema(self, name: str, schema: Schema) -> DatasetInfo: ...
    async def reset_history(self, name: str) -> DatasetInfo: ...
    async def write(self, batch: WriteBatch) -> WriteResult: ...
    async def get(self, name: str, key: bytes) -> tuple[bytes | None, Cursor]: ...
    async def sync(self, request: Any) -> Response: ...
    def snapshot_stream(self, request: SnapshotRequest) -> AsyncIterator[SnapshotChunk]: ...
    def subscribe(self, datasets: Any, *, diffs: bool = False) -> Any:
        """An async context manager yielding the hint iterator. Its
        ``__anext__`` must be cancel-safe (a :class:`~replicad.hub.Subscription`
        is): the stream waits for the next hint under a ping timeout."""

    def ack(
        self, replica: str, address: str, datasets: Mapping[str, Cursor], info: Mapping[str, Any]
    ) -> None: ...
    def fleet(self) -> list[FleetEntry]: ...
    def lag(self, cursor: Cursor, name: str) -> int | None: ...


class _ClientGoneError(Exception):
    """The client disconnected before its request body was read."""


def error_response(exc: BaseException, route: str) -> tuple[int, str, str] | None:
    """The documented ``(status, code, message)`` for ``exc`` raised while
    serving ``route`` (a template), or None for an unexpected error (a 500).

    Frame, protocol and Merkle errors are ``422 bad_frame`` on ``/v1/sync``
    (the bytes came from a peer) and ``400 bad_request`` elsewhere.
    """
    msg = str(exc)
    match exc:
        case HttpError():
            return exc.status, exc.code, exc.message
        case AuthError():
            return exc.status, ("forbidden" if exc.status == 403 else "unauthorized"), msg
        case UnknownDatasetError():
            return 404, "not_found", msg
        case DatasetExistsError():
            return 409, "exists", msg
        case BadRequestError() | ConfigError():
            return 400, "bad_request", msg
        case KeyTooLongError():
            return 400, "key_too_long", msg
        case InvalidKeyError():
            return 400, "bad_request", msg
        case RecordError():
            return 400, "schema_violation", msg
        case SchemaError():
            return 400, "schema_error", msg
        case ValueTooLargeError():
            return 413, "too_large", msg
        case CorruptRecordError():
            return None  # stored bytes that do not decode: our fault, not the client's
        case CodecError():
            return 400, "bad_request", msg
        case FrameError() | ProtocolError() | MerkleError():
            if route == "/v1/sync":
                return 422, "bad_frame", msg
            return 400, "bad_request", msg
        case StorageError():
            return 507, "storage_full", msg
        case RetryLaterError():
            return 503, "retry_later", msg
    return None


# --------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    """A path template (``{name}`` segments match one non-empty segment) and
    its handlers by method, each with an access level."""

    template: str
    methods: Mapping[str, tuple[str, str]]  # method -> (access level, handler name)
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.template.split("/")[1:]))

    def match(self, parts: list[bytes]) -> dict[str, bytes] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, bytes] = {}
        for seg, part in zip(self.segments, parts, strict=True):
            if seg.startswith("{"):
                if not part:
                    return None
                params[seg[1:-1]] = unquote_to_bytes(part)
            elif seg.encode() != part:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("/healthz", {"GET": (OPEN, "healthz")}),
    Route("/metrics", {"GET": (OPEN, "metrics")}),
    Route("/openapi.json", {"GET": (OPEN, "openapi")}),
    Route("/v1/datasets", {"GET": (READ, "list_datasets"), "POST": (WRITE, "create_dataset")}),
    Route("/v1/datasets/{name}", {"GET": (READ, "get_dataset")}),
    Route("/v1/datasets/{name}/schema", {"PUT": (WRITE, "evolve_schema")}),
    Route("/v1/datasets/{name}/reset-history", {"POST": (WRITE, "reset_history")}),
    Route("/v1/datasets/{name}/batch", {"POST": (WRITE, "batch")}),
    Route("/v1/datasets/{name}/replace", {"POST": (WRITE, "replace")}),
    Route("/v1/datasets/{name}/records/{key}", {"GET": (READ, "get_record")}),
    Route("/v1/sync", {"POST": (READ, "sync")}),
    Route("/v1/hints", {"GET": (READ, "hints")}),
    Route("/v1/ack", {"POST": (READ, "ack")}),
    Route("/v1/fleet", {"GET": (READ, "fleet")}),
)
"""Every endpoint of ``docs/api.md`` (the OpenAPI document lists the same)."""


@dataclass
class _Request:
    scope: Scope
    receive: Receive
    raw_send: Send
    method: str
    route: str
    params: dict[str, bytes]
    headers: dict[bytes, bytes]
    status: int = 0
    started: bool = False
    gone: bool = False
    body_done: bool = False

    @property
    def unread_body(self) -> bool:
        """True when the client sent (or is sending) a body not read to its end."""
        if self.body_done:
            return False
        if b"transfer-encoding" in self.headers:
            return True
        return self.headers.get(b"content-length", b"0").strip() not in (b"0", b"")

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.started = True
        await self.raw_send(message)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes | None,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        headers = [(b"content-length", str(len(body)).encode())]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        headers += extra
        await self.start(status, headers)
        await self.body(body)

    async def json(self, status: int, doc: Any, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        await self.respond(status, _dumps(doc), b"application/json", extra)

    def param(self, name: str) -> str:
        """A path parameter as text (dataset names); undecodable is 404."""
        try:
            return self.params[name].decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(404, "not_found", f"no such {name}") from None

    def query(self) -> dict[str, list[str]]:
        raw = self.scope.get("query_string", b"")
        try:
            return parse_qs(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "bad_request", "malformed query string") from None


# --------------------------------------------------------------------- JSON helpers


def _jsonable(value: Any) -> Any:
    """Make ``value`` strict JSON: bytes -> ``{"base64": ...}``, non-finite
    floats -> ``"NaN"``/``"Infinity"``/``"-Infinity"``, tuples -> lists,
    non-str map keys -> str."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            name = k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else k
            out[name if isinstance(name, str) else str(name)] = _jsonable(v)
        return out
    return value


def _dumps(doc: Any) -> bytes:
    try:
        text = json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, TypeError):
        text = json.dumps(
            _jsonable(doc), allow_nan=False, ensure_ascii=False, separators=(",", ":")
        )
    return text.encode("utf-8")


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HttpError(400, "bad_request", f"{what} must be an integer >= {minimum}")
    return value


class _EventCache:
    """The server-sent event of the last few hints: the hub hands the same
    object to every subscriber, so N streams encode (and, for a push, frame
    and base64) it once, not N times. Keyed by identity, holding the events
    so an id is not reused while cached."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._cached: list[tuple[Hint | DiffPush, bytes]] = []

    def encode(self, hint: Hint | DiffPush) -> bytes:
        for event, data in self._cached:
            if event is hint:
                return data
        data = _hint_event(hint)
        self._cached.append((hint, data))
        if len(self._cached) > self._size:
            del self._cached[0]
        return data


def _hint_event(hint: Hint | DiffPush) -> bytes:
    if isinstance(hint, DiffPush):
        return b"event: diff\ndata: " + base64.b64encode(encode_frame(*to_wire(hint))) + b"\n\n"
    data = {
        "dataset": hint.dataset,
        "epoch": hint.cursor.epoch.hex(),
        "version": hint.cursor.version,
        "digest": hint.digest.to_bytes().hex(),
    }
    return b"event: hint\ndata: " + _dumps(data) + b"\n\n"


# --------------------------------------------------------------------- the app


def _encode(message: Response) -> bytes:
    return encode_frame(*to_wire(message))


async def _frame(message: Response) -> bytes:
    """The message as one frame. A large answer is packed and compressed in
    a worker thread, so it does not stall every other request; a small one
    inline (cheaper than the thread hop)."""
    if isinstance(message, SnapshotChunk):
        size = len(message.records)
    elif isinstance(message, DiffResponse):
        size = len(message.upserts)
    else:
        size = 0
    if size < 256:
        return _encode(message)
    frame: bytes = await trio.to_thread.run_sync(_encode, message)
    return frame


class OriginApp:
    """The ASGI application. ``max_body_bytes`` bounds every request body
    (the server passes ``config.max_body_mb`` in bytes); ``ping_interval`` is
    the SSE keep-alive period; ``openapi`` the document served at
    ``/openapi.json`` (built by :func:`replicad.openapi.build` when None);
    ``ingest`` the worker processes for large write bodies (None: every body
    is decoded in this process).

    Registers its metrics in ``service.registry`` (so one service takes one
    app; a second raises ValueError).
    """

    def __init__(
        self,
        service: OriginServiceLike,
        *,
        write_tokens: Iterable[str] = (),
        read_tokens: Iterable[str] = (),
        max_body_bytes: int = 256 << 20,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        openapi: Mapping[str, Any] | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        ingest: IngestPool | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be >= 1")
        if ping_interval <= 0:
            raise ConfigError("ping_interval must be > 0")
        if not body_timeout > 0:
            raise ConfigError("body_timeout must be > 0")
        self.service = service
        self._write = [t.encode("utf-8") for t in write_tokens]
        self._read = [t.encode("utf-8") for t in read_tokens]
        self.auth_enabled = bool(self._write or self._read)
        self.max_body_bytes = max_body_bytes
        self.ping_interval = ping_interval
        self.body_timeout = body_timeout
        self.ingest = ingest
        if openapi is None:
            from replicad.openapi import build

            openapi = build()
        self._openapi = _dumps(openapi)
        self._closing = trio.Event()
        self._events = _EventCache()
        r = service.registry
        self._m_requests = r.counter(
            "replicad_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
        )
        self._m_latency = r.histogram(
            "replicad_http_request_duration_seconds",
            "HTTP request duration (for streams: the whole stream) by route template.",
            ["route"],
        )
        self._m_ingest = r.counter(
            "replicad_ingest_jobs_total",
            "Write bodies given to an ingest worker, by outcome: committed (from the "
            "worker's bytes), rejected (refused: a 4xx, or 507 for a full store), "
            "fallback (the worker failed or the schema changed meanwhile: decoded "
            "again in process).",
            ["outcome"],
        )
        self._in_flight = 0
        r.gauge(
            "replicad_http_requests_in_flight",
            "HTTP requests being served (open streams included).",
            collect=lambda: [((), float(self._in_flight))],
        )

    def shutdown(self) -> None:
        """Begin a graceful shutdown: open hint streams end (cleanly, with
        the end of their body), other requests finish normally."""
        self._closing.set()

    # ---------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        method = str(scope.get("method", "GET")).upper()
        raw_path = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
        raw_path = bytes(raw_path).split(b"?", 1)[0]
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            headers[bytes(name).lower()] = bytes(value)
        req = _Request(scope, receive, send, method, "unmatched", {}, headers)
        self._in_flight += 1
        try:
            await self._dispatch(req, raw_path)
        except Exception as exc:
            await self._fail(req, exc)
        finally:
            self._in_flight -= 1
            elapsed = time.perf_counter() - start
            status = req.status if req.started else 0
            label = method if method in _METHODS else "OTHER"
            self._m_requests.inc(1, req.route, label, str(status))
            self._m_latency.observe(elapsed, req.route)
            client = scope.get("client")
            log.info(
                "request",
                extra={
                    "method": label,
                    "route": req.route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": client[0] if client else None,
                },
            )

    async def _fail(self, req: _Request, exc: Exception) -> None:
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # one error out of a nursery: judge it alone
        if isinstance(exc, _ClientGoneError):
            return
        mapped = error_response(exc, req.route)
        if mapped is None:
            log.error(
                "unhandled error",
                exc_info=exc,
                extra={"method": req.method, "route": req.route},
            )
            mapped = (500, "internal", "internal server error")
        if req.started:
            # Too late to change the status: abort the response (the client
            # sees a truncated body and retries).
            if mapped[0] != 500:
                log.warning(
                    "error after the response started",
                    extra={"route": req.route, "error": type(exc).__name__},
                )
            return
        status, code, message = mapped
        extra = list(exc.headers) if isinstance(exc, HttpError) else []
        if status == 401:
            extra.append((b"www-authenticate", b'Bearer realm="replicad"'))
        if req.unread_body and req.scope.get("http_version") in ("1.0", "1.1"):
            # The rest of the body will not be read: the connection cannot be
            # reused, so tell the client before the server closes it.
            extra.append((b"connection", b"close"))
        await req.json(status, {"error": {"code": code, "message": message}}, extra)

    async def _dispatch(self, req: _Request, raw_path: bytes) -> None:
        parts = raw_path.split(b"/")[1:] if raw_path.startswith(b"/") else [raw_path]
        for route in ROUTES:
            params = route.match(parts)
            if params is None:
                continue
            req.route = route.template
            req.params = params
            entry = route.methods.get(req.method)
            if entry is None:
                allow = ", ".join(sorted(route.methods)).encode()
                raise HttpError(
                    405,
                    "method_not_allowed",
                    f"{req.method} is not allowed on {route.template}",
                    [(b"allow", allow)],
                )
            access, handler = entry
            self._authorize(req, access)
            await getattr(self, "_h_" + handler)(req)
            return
        raise HttpError(404, "not_found", "no such route")

    # ---------------------------------------------------------------- auth

    def _authorize(self, req: _Request, access: str) -> None:
        if access == OPEN or not self.auth_enabled:
            return
        value = req.headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise AuthError("missing bearer token", 401)
        is_write = False
        is_read = False
        for known in self._write:
            is_write |= hmac.compare_digest(token, known)
        for known in self._read:
            is_read |= hmac.compare_digest(token, known)
        if not (is_write or is_read):
            raise AuthError("unknown token", 401)
        if access == WRITE and not is_write:
            raise AuthError("a read token may not write", 403)

    # ---------------------------------------------------------------- bodies

    async def _read_body(self, req: _Request) -> bytes:
        limit = self.max_body_bytes
        declared = req.headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HttpError(400, "bad_request", "malformed Content-Length") from None
            if size > limit:
                raise HttpError(413, "too_large", f"body of {size} bytes, limit {limit}")
        chunks: list[bytes] = []
        total = 0
        while True:
            message: Message | None = None
            with trio.move_on_after(self.body_timeout):
                message = await req.receive()
            if message is None:
                raise HttpError(
                    408, "timeout", f"no request body bytes for {self.body_timeout:g} s"
                )
            if message["type"] == "http.disconnect":
                raise _ClientGoneError()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise HttpError(413, "too_large", f"body above the limit of {limit} bytes")
            if chunk:
                chunks.append(bytes(chunk))
            if not message.get("more_body", False):
                req.body_done = True
                return b"".join(chunks)

    def _media_type(self, req: _Request) -> str | None:
        value = req.headers.get(b"content-type")
        if value is None:
            return None
        return value.split(b";", 1)[0].strip().lower().decode("latin-1")

    async def _read_typed_body(self, req: _Request) -> tuple[bytes, bool]:
        """The body and whether it is JSON (else msgpack); 415 for another
        media type."""
        media = self._media_type(req)
        is_json = media is None or media in JSON_TYPES or media.endswith("+json")
        if not is_json and media not in MSGPACK_TYPES:
            raise HttpError(
                415,
                "unsupported_media_type",
                f"expected application/json or application/msgpack, not {media}",
            )
        return await self._read_body(req), is_json

    async def _read_document(self, req: _Request) -> tuple[Any, bool]:
        """The decoded body and whether it was JSON. 415 for another media
        type, 400 for a malformed body."""
        body, is_json = await self._read_typed_body(req)
        return decode_document(body, is_json), is_json

    async def _write_body(self, req: _Request, *, replace: bool) -> WriteResult:
        """Commit the batch (or, with ``replace``, the whole dataset) in the
        request body. A large body is decoded and encoded by an ingest worker
        (:mod:`replicad.ingest`); a small one, or one the workers could not
        take, in this process."""
        name = req.param("name")
        typed = self.service.dataset(name).schema is not None
        body, is_json = await self._read_typed_body(req)
        pool = self.ingest
        if pool is not None and pool.wants(body):
            basis = self.service.encoding_basis(name)
            try:
                batch = await pool.prepare(basis, body, is_json, replace)
                if batch is not None:
                    result = await self.service.write(batch)
                    self._m_ingest.inc(1, "committed")
                    return result
            except StaleEncodingError:
                pass  # the schema evolved meanwhile: encode it all here
            except (HttpError, ReplicadError):
                self._m_ingest.inc(1, "rejected")
                raise
            self._m_ingest.inc(1, "fallback")
        upserts, deletes = parse_write(body, is_json, typed, replace)
        return await self.service.write(WriteBatch(name, upserts, deletes, replace=replace))

    # ---------------------------------------------------------------- operations

    async def _h_healthz(self, req: _Request) -> None:
        await req.json(200, {"status": "ok", "datasets": len(self.service.datasets())})

    async def _h_metrics(self, req: _Request) -> None:
        text = self.service.registry.render().encode("utf-8")
        await req.respond(200, text, b"text/plain; version=0.0.4; charset=utf-8")

    async def _h_openapi(self, req: _Request) -> None:
        await req.respond(200, self._openapi, b"application/json")

    # ---------------------------------------------------------------- datasets

    async def _h_list_datasets(self, req: _Request) -> None:
        infos = self.service.datasets()
        await req.json(200, {"datasets": [i.to_json(with_schema=False) for i in infos]})

    async def _h_get_dataset(self, req: _Request) -> None:
        await req.json(200, self.service.dataset(req.param("name")).to_json())

    async def _h_create_dataset(self, req: _Request) -> None:
        doc, _ = await self._read_document(req)
        spec = _dataset_spec(doc)
        info = await self.service.create_dataset(spec)
        location = b"/v1/datasets/" + info.name.encode()
        await req.json(201, info.to_json(), [(b"location", location)])

    async def _h_evolve_schema(self, req: _Request) -> None:
        name = req.param("name")
        current = self.service.dataset(name)
        doc, _ = await self._read_document(req)
        if isinstance(doc, dict) and "version" not in doc:
            base = 0 if current.schema is None else current.schema.version
            doc = {**doc, "version": base + 1}
        schema = Schema.from_json(doc)
        info = await self.service.evolve_schema(name, schema)
        await req.json(200, info.to_json())

    async def _h_reset_history(self, req: _Request) -> None:
        name = req.param("name")
        await self._read_body(req)  # ignored, but bounded and drained
        info = await self.service.reset_history(name)
        await req.json(200, info.to_json())

    # ---------------------------------------------------------------- writes

    async def _h_batch(self, req: _Request) -> None:
        result = await self._write_body(req, replace=False)
        await req.json(200, result.to_json())

    async def _h_replace(self, req: _Request) -> None:
        result = await self._write_body(req, replace=True)
        await req.json(200, result.to_json())

    # ---------------------------------------------------------------- reads

    async def _h_get_record(self, req: _Request) -> None:
        name = req.param("name")
        key = req.params["key"]
        value, cursor = await self.service.get(name, key)
        if value is None:
            raise HttpError(404, "not_found", f"no record {key_text(key)!r} in {name!r}")
        codec = self.service.codec(name)
        doc: dict[str, Any] = {"key": key_text(key), "version": cursor.version}
        if codec.is_typed:
            doc["record"] = _jsonable(codec.decode(value))
        else:
            raw = codec.decode_opaque(value)
            doc["value"] = key_text(raw)
        await req.json(200, doc)

    # ---------------------------------------------------------------- sync

    async def _h_sync(self, req: _Request) -> None:
        media = self._media_type(req)
        if media != FRAME_MEDIA_TYPE:
            raise HttpError(
                415, "unsupported_media_type", f"/v1/sync takes {FRAME_MEDIA_TYPE}, not {media}"
            )
        body = await self._read_body(req)
        decoder = FrameDecoder(max_frame_bytes=max(self.max_body_bytes, 1))
        decoder.receive_data(body)
        frame = decoder.next_frame()
        decoder.close()  # truncated input, or bytes after the frame: 422
        if frame is None:
            raise HttpError(422, "bad_frame", "empty body: expected one frame")
        request = from_wire(frame.kind, frame.body)
        if not isinstance(request, REQUEST_TYPES):
            raise HttpError(422, "bad_frame", f"{type(request).__name__} is not a request")
        headers = [(b"content-type", FRAME_MEDIA_TYPE.encode()), (b"cache-control", b"no-store")]
        if isinstance(request, SnapshotRequest) and request.stream:
            await self._snapshot_stream(req, request, headers)
            return
        response = await self.service.sync(request)
        await req.respond(200, await _frame(response), None, headers)

    async def _snapshot_stream(
        self, req: _Request, request: SnapshotRequest, headers: list[tuple[bytes, bytes]]
    ) -> None:
        chunks = self.service.snapshot_stream(request)
        try:
            first = await chunks.__anext__()  # errors here still get their status
            await req.start(200, headers)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, req, nursery.cancel_scope)
                await req.body(await _frame(first), more=True)
                async for chunk in chunks:
                    await req.body(await _frame(chunk), more=True)
                await req.body(b"")
                nursery.cancel_scope.cancel()
        except StopAsyncIteration:
            raise HttpError(500, "internal", "snapshot stream ended without a chunk") from None
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch_disconnect(self, req: _Request, scope: trio.CancelScope) -> None:
        while True:
            message = await req.receive()
            if message["type"] == "http.disconnect":
                req.gone = True
                scope.cancel()
                return

    # ---------------------------------------------------------------- hints

    async def _h_hints(self, req: _Request) -> None:
        query = req.query()
        values = query.get("datasets")
        diffs = query.get("diffs", ["0"])[-1]
        if diffs not in ("0", "1"):
            raise HttpError(400, "bad_request", "diffs must be 0 or 1")
        names: list[str] | None = None
        if values is not None:
            names = [n for v in values for n in v.split(",") if n]
            if not names:
                names = None
        subscription = self.service.subscribe(names, diffs=diffs == "1")  # unknown: 404
        async with subscription as hints:
            await req.start(
                200,
                [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, req, nursery.cancel_scope)
                nursery.start_soon(self._watch_closing, nursery.cancel_scope)
                while True:
                    hint: Hint | DiffPush | None = None
                    with trio.move_on_after(self.ping_interval):
                        try:
                            hint = await hints.__anext__()
                        except StopAsyncIteration:
                            break
                    if hint is None:
                        await req.body(b": ping\n\n", more=True)
                    else:
                        await req.body(self._events.encode(hint), more=True)
                nursery.cancel_scope.cancel()
        if not req.gone:
            await req.body(b"")

    async def _watch_closing(self, scope: trio.CancelScope) -> None:
        await self._closing.wait()
        scope.cancel()

    # ---------------------------------------------------------------- fleet

    async def _h_ack(self, req: _Request) -> None:
        doc, _ = await self._read_document(req)
        doc = check_object(doc, "ack", ("replica", "datasets", "info"))
        replica = doc.get("replica")
        if not isinstance(replica, str) or not replica:
            raise HttpError(400, "bad_request", "replica must be a non-empty string")
        datasets: dict[str, Cursor] = {}
        for name, raw in check_object(doc.get("datasets", {}), "datasets").items():
            if not isinstance(name, str):
                raise HttpError(400, "bad_request", "dataset names must be strings")
            cur = check_object(raw, f"datasets[{name!r}]", ("epoch", "version"))
            datasets[name] = Cursor(
                _epoch(cur.get("epoch"), name), _int(cur.get("version"), f"{name}.version")
            )
        info = check_object(doc.get("info", {}), "info")
        info = _jsonable(info)
        if len(_dumps(info)) > MAX_INFO_BYTES:
            raise HttpError(400, "bad_request", f"info is larger than {MAX_INFO_BYTES} bytes")
        client = req.scope.get("client")
        address = str(client[0]) if client and client[0] else "unix"
        self.service.ack(replica, address, datasets, info)
        await req.respond(204, b"", None)

    async def _h_fleet(self, req: _Request) -> None:
        now = self.service.clock()
        replicas = []
        for entry in self.service.fleet():
            replicas.append(
                {
                    "replica": entry.replica,
                    "address": entry.address,
                    "last_seen": entry.last_seen,
                    "age_seconds": max(0.0, now - entry.last_seen),
                    "datasets": {
                        name: {
                            "epoch": cursor.epoch.hex(),
                            "version": cursor.version,
                            "lag": self.service.lag(cursor, name),
                        }
                        for name, cursor in entry.datasets.items()
                    },
                    "info": _jsonable(entry.info),
                }
            )
        await req.json(200, {"replicas": replicas})


# --------------------------------------------------------------------- body shapes


def _epoch(raw: Any, name: str) -> bytes:
    if isinstance(raw, bytes) and len(raw) == EPOCH_BYTES:
        return raw
    if isinstance(raw, str) and len(raw) == 2 * EPOCH_BYTES:
        try:
            return bytes.fromhex(raw)
        except ValueError:
            pass
    raise HttpError(400, "bad_request", f"{name}: epoch must be {2 * EPOCH_BYTES} hex digits")


def _dataset_spec(doc: Any) -> DatasetSpec:
    """The body of ``POST /v1/datasets`` as a DatasetSpec (see docs/api.md)."""
    doc = check_object(
        doc,
        "dataset",
        ("name", "schema", "opaque", "merkle", "queue", "max_value_bytes", "compress"),
    )
    name = check_dataset_name(doc.get("name"))
    opaque = doc.get("opaque", False)
    if not isinstance(opaque, bool):
        raise HttpError(400, "bad_request", "opaque must be true or false")
    raw_schema = doc.get("schema")
    if opaque and raw_schema is not None:
        raise HttpError(400, "bad_request", "a dataset has a schema or is opaque, not both")
    if not opaque and raw_schema is None:
        raise HttpError(400, "bad_request", 'give a "schema", or "opaque": true')
    schema = None
    if raw_schema is not None:
        if isinstance(raw_schema, dict) and "version" not in raw_schema:
            raw_schema = {**raw_schema, "version": 1}
        schema = Schema.from_json(raw_schema)
    kwargs: dict[str, Any] = {}
    if "merkle" in doc:
        merkle = check_object(doc["merkle"], "merkle", ("fanout", "depth"))
        kwargs["geometry"] = Geometry(
            _int(merkle.get("fanout", 16), "merkle.fanout", 2),
            _int(merkle.get("depth", 4), "merkle.depth", 1),
        )
    if "queue" in doc:
        queue = check_object(doc["queue"], "queue", ("max_entries", "policy"))
        if "max_entries" in queue:
            kwargs["max_entries"] = _int(queue["max_entries"], "queue.max_entries", 1)
        if "policy" in queue:
            if not isinstance(queue["policy"], str):
                raise HttpError(400, "bad_request", "queue.policy must be a string")
            kwargs["policy"] = queue["policy"]
    if "max_value_bytes" in doc:
        kwargs["max_value_bytes"] = _int(doc["max_value_bytes"], "max_value_bytes", 1)
    if "compress" in doc:
        if not isinstance(doc["compress"], bool):
            raise HttpError(400, "bad_request", "compress must be true or false")
        kwargs["compress"] = doc["compress"]
    return DatasetSpec(name, schema, **kwargs)
