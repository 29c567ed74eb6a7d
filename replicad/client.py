"""HTTP clients of the origin: one for operators and writers, one for sidecars.

Theory of operation
-------------------
This module is an adapter: it owns the network (httpx) and nothing else. The
sync protocol itself (messages, frames) is the sans-IO core's; this module only
carries its bytes.

* :class:`OriginClient` -- synchronous, for the CLI, scripts and writers: the
  dataset, write and read endpoints of ``docs/api.md``. Bulk writes go as
  msgpack by default (keys and bytes travel as msgpack bin, nothing to
  base64-encode); JSON is available for debugging.
* :class:`BatchingWriter` (``OriginClient.writer``, from
  :mod:`replicad.writer`) -- single-record writes from many threads,
  coalesced into one request per batch.
* :class:`AsyncSyncClient` -- asynchronous (trio or asyncio, through httpx's
  anyio backend), for a sidecar: one sync request and its answer
  (``POST /v1/sync``), a streamed snapshot decoded frame by frame as bytes
  arrive, the hint stream (server-sent events, parsed incrementally by the
  sans-IO :class:`SSEParser`), and acks for the fleet view.

Both take an httpx transport as a parameter, the one seam in front of the
network: tests plug in ``httpx.MockTransport`` or an ASGI app.

Errors are translated once, here, into :mod:`replicad.errors` (see
:func:`error_for_status`): the server's JSON error body gives the message and
the ``code`` that picks the class; ``httpx.TransportError`` (refused,
reset, timeout, TLS, a body cut short) becomes :class:`OriginUnavailableError`,
other request errors (an undecodable content encoding) :class:`ProtocolError`.
No httpx exception escapes this module.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import re
import ssl
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypeAlias
from urllib.parse import quote

import anyio
import httpx
import msgpack

from replicad.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    DatasetExistsError,
    FrameTruncatedError,
    KeyTooLongError,
    MerkleError,
    OriginUnavailableError,
    ProtocolError,
    RecordError,
    ReplicadError,
    SchemaError,
    StorageError,
    SyncUsageError,
    UnknownDatasetError,
)
from replicad.frames import MAX_FRAME_BYTES, FrameDecoder, encode_frame
from replicad.merkle import Digest
from replicad.messages import (
    Cursor,
    CursorUnservable,
    DiffPush,
    DiffResponse,
    Hint,
    MerkleLeavesResponse,
    MerkleNodesResponse,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
    from_wire,
    to_wire,
)
from replicad.writer import DEFAULT_MAX_BATCH, BatchingWriter, WriteAck, key_bytes

__all__ = [
    "DEFAULT_URL",
    "FRAME_CONTENT_TYPE",
    "AsyncSyncClient",
    "BatchingWriter",
    "OriginClient",
    "Records",
    "SSEEvent",
    "SSEParser",
    "WriteAck",
    "error_for_status",
    "hint_from_json",
]

DEFAULT_URL = "http://127.0.0.1:7070"
"""Where the CLI looks for the origin when neither ``--origin`` nor
``REPLICAD_URL`` says otherwise."""

FRAME_CONTENT_TYPE = "application/x-replicad-frame"
MSGPACK_CONTENT_TYPE = "application/msgpack"
_USER_AGENT = "replicad-client/0.1"

Records: TypeAlias = Mapping[str, Any] | Mapping[bytes, Any] | Mapping[str | bytes, Any]
"""Keys (str as UTF-8, or bytes) to records: what the write methods take."""

_RESPONSE_TYPES = (
    DiffResponse,
    CursorUnservable,
    SnapshotChunk,
    MerkleNodesResponse,
    MerkleLeavesResponse,
)

# --- errors ------------------------------------------------------------------


def _error_body(content: bytes) -> tuple[str | None, str | None]:
    """``(code, message)`` from an error body ``{"error": {"code", "message"}}``;
    ``(None, None)`` when the body has another shape."""
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None, None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return None, None
    code, message = err.get("code"), err.get("message")
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else None,
    )


def error_for_status(status: int, content: bytes, *, what: str = "request") -> ReplicadError:
    """The exception for an HTTP error answer (``status`` >= 300).

    The message is the server's (from the JSON error body), or a description
    of the status when the body has none. The class follows ``docs/api.md``:
    401/403 :class:`AuthError` (``status`` set), 404 :class:`UnknownDatasetError`,
    409 :class:`DatasetExistsError`, 400 ``schema_violation``
    :class:`RecordError`, 400 ``schema_error`` :class:`SchemaError`, 400
    ``key_too_long`` :class:`KeyTooLongError`, other 400 and 405/413/415
    :class:`BadRequestError`, 422 :class:`ProtocolError`, 507
    :class:`StorageError`, other 5xx :class:`OriginUnavailableError`, anything
    else :class:`ProtocolError`.
    """
    code, server_message = _error_body(content)
    if server_message is None:
        text = content[:200].decode("utf-8", "replace").strip()
        reason = httpx.codes.get_reason_phrase(status) or "unexpected status"
        server_message = f"{what}: HTTP {status} {reason}" + (f": {text}" if text else "")
    message = server_message
    if status in (401, 403):
        return AuthError(message, status)
    if status == 404:
        return UnknownDatasetError(message)
    if status == 409:
        return DatasetExistsError(message)
    if status == 400:
        if code == "schema_violation":
            return RecordError(message)
        if code == "schema_error":
            return SchemaError(message)
        if code == "key_too_long":
            return KeyTooLongError(message)
        return BadRequestError(message)
    if status in (405, 413, 415):
        return BadRequestError(message)
    if status == 422:
        return ProtocolError(message)
    if status == 507:
        return StorageError(message)
    if 500 <= status < 600:
        return OriginUnavailableError(message)
    return ProtocolError(f"{what}: unexpected HTTP {status}: {message}")


def _request_failed(base_url: str, exc: httpx.RequestError) -> ReplicadError:
    """OriginUnavailableError for a transport error (refused, reset, timeout,
    TLS, a body cut short); ProtocolError for an undecodable content encoding
    or a redirect loop."""
    detail = _reason(exc)
    if isinstance(exc, httpx.TransportError):
        return OriginUnavailableError(f"origin {base_url} unavailable: {detail}")
    return ProtocolError(f"origin {base_url}: {detail}")


def _reason(exc: BaseException) -> str:
    """What went wrong, for a person: the error's message, and the TLS
    failure in its cause chain when there is one. (Under trio, httpx reports
    a refused certificate as a bare ``ConnectError``: the reason is only in
    the chain.)"""
    detail = str(exc)
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            tls = getattr(cause, "verify_message", None) or cause.reason or str(cause)
            return f"{detail or type(exc).__name__} (TLS: {tls})"
        detail = detail or str(cause)
        cause = cause.__cause__ or cause.__context__
    return detail or type(exc).__name__


def _check_url(base_url: str) -> str:
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"invalid origin URL {base_url!r}: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"origin URL must be http:// or https://HOST[:PORT], got {base_url!r}")
    return base_url.rstrip("/")


def _verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx wants a bool or an SSLContext; a string is a CA bundle path."""
    if isinstance(verify, str):
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA bundle {verify}: {exc}") from exc
    return verify


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": _USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _dataset_path(name: str, *rest: str) -> str:
    return "/".join(["/v1/datasets", quote(name, safe=""), *rest])


# --- JSON and msgpack bodies -------------------------------------------------


def _key_text(key: str | bytes) -> str:
    if isinstance(key, str):
        return key
    try:
        return key_bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError(
            f"key {key!r} is not UTF-8 and cannot travel in JSON; use msgpack"
        ) from None


def _jsonable(value: Any) -> Any:
    """``value`` with bytes as ``{"base64": ...}``, recursively (the API's JSON
    convention for bytes fields and opaque values)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _pack(doc: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequestError(f"cannot encode the request as msgpack: {exc}") from exc
    return data


def _dump_json(doc: Any) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"cannot encode the request as JSON: {exc}") from exc


def _parse_answer(response: httpx.Response, what: str) -> Any:
    """The JSON (or msgpack) document of a successful answer; ProtocolError if
    it cannot be decoded."""
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == MSGPACK_CONTENT_TYPE:
            return msgpack.unpackb(response.content, raw=False, strict_map_key=False)
        return json.loads(response.content)
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"{what}: the origin sent an undecodable answer: {exc}") from exc


def _expect_dict(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def hint_from_json(doc: Any) -> Hint:
    """A :class:`Hint` from the hint stream's JSON
    ``{"dataset", "epoch" (hex), "version", "digest" (hex)}``; ProtocolError
    for any other shape."""
    try:
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        dataset, version = doc["dataset"], doc["version"]
        if not isinstance(dataset, str) or type(version) is not int:
            raise TypeError("dataset must be a string and version an integer")
        epoch = bytes.fromhex(doc["epoch"])
        digest = Digest.from_bytes(bytes.fromhex(doc["digest"]))
        return Hint(dataset, Cursor(epoch, version), digest)
    except (KeyError, TypeError, ValueError, MerkleError, ProtocolError) as exc:
        raise ProtocolError(f"malformed hint {doc!r}: {exc}") from exc


# --- the operators' client ---------------------------------------------------


class OriginClient:
    """Synchronous client of the origin's dataset, write and read endpoints.

    ``token`` is sent as a bearer token. ``verify`` is a bool, an
    ``ssl.SSLContext`` or the path of a CA bundle. ``transport`` replaces the
    network (tests). Every method raises the :mod:`replicad.errors` class of
    the server's answer (see :func:`error_for_status`), or
    :class:`OriginUnavailableError` when the origin cannot be reached.
    Construction raises :class:`ConfigError` for a bad URL or CA bundle. Use as
    a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.base_url = _check_url(base_url)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
            verify=_verify(verify),
        )
        self._writers: dict[str, BatchingWriter] = {}
        self._writers_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OriginClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = self._http.request(method, path, content=body, headers=headers)
        except httpx.RequestError as exc:
            raise _request_failed(self.base_url, exc) from exc
        if response.status_code >= 300:
            raise error_for_status(response.status_code, response.content, what=what)
        return response

    def _json(
        self, method: str, path: str, *, what: str, doc: Any = None, msgpack_body: bool = False
    ) -> dict[str, Any]:
        if doc is None:
            response = self._send(method, path, what=what)
        elif msgpack_body:
            response = self._send(
                method, path, what=what, body=_pack(doc), content_type=MSGPACK_CONTENT_TYPE
            )
        else:
            response = self._send(
                method, path, what=what, body=_dump_json(doc), content_type="application/json"
            )
        return _expect_dict(_parse_answer(response, what), what)

    # ------------------------------------------------------------ operations

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "datasets": N}``."""
        return self._json("GET", "/healthz", what="health")

    def fleet(self) -> list[dict[str, Any]]:
        """``GET /v1/fleet``: the replicas that acked, as the API lists them."""
        doc = self._json("GET", "/v1/fleet", what="fleet")
        replicas = doc.get("replicas")
        if not isinstance(replicas, list):
            raise ProtocolError("fleet: the answer lacks a 'replicas' list")
        return replicas

    # ------------------------------------------------------------ datasets

    def datasets(self) -> list[dict[str, Any]]:
        """``GET /v1/datasets``: every dataset's DatasetInfo (without schema)."""
        doc = self._json("GET", "/v1/datasets", what="datasets")
        items = doc.get("datasets")
        if not isinstance(items, list):
            raise ProtocolError("datasets: the answer lacks a 'datasets' list")
        return items

    def dataset(self, name: str) -> dict[str, Any]:
        """``GET /v1/datasets/{name}``: DatasetInfo with its schema (None when
        opaque). UnknownDatasetError if there is no such dataset."""
        return self._json("GET", _dataset_path(name), what=f"dataset {name}")

    def create_dataset(
        self,
        name: str,
        schema_json: Mapping[str, Any] | None,
        *,
        opaque: bool = False,
        merkle: Mapping[str, int] | None = None,
        queue: Mapping[str, Any] | None = None,
        max_value_bytes: int | None = None,
        compress: bool | None = None,
    ) -> dict[str, Any]:
        """Create a dataset: typed with ``schema_json`` (``{"fields": [...]}``),
        or opaque (``opaque=True``, no schema). Optional ``merkle``
        (``{"fanout", "depth"}``), ``queue`` (``{"max_entries", "policy"}``),
        ``max_value_bytes`` and ``compress``. Returns the DatasetInfo.

        Raises BadRequestError (locally) unless exactly one of schema and
        opaque is given; DatasetExistsError, SchemaError or BadRequestError
        from the origin."""
        if (schema_json is None) == (not opaque):
            raise BadRequestError("give either a schema or opaque=True, not both or neither")
        body: dict[str, Any] = {"name": name}
        if opaque:
            body["opaque"] = True
        else:
            body["schema"] = dict(schema_json or {})
        if merkle is not None:
            body["merkle"] = dict(merkle)
        if queue is not None:
            body["queue"] = dict(queue)
        if max_value_bytes is not None:
            body["max_value_bytes"] = max_value_bytes
        if compress is not None:
            body["compress"] = compress
        return self._json("POST", "/v1/datasets", what=f"create {name}", doc=body)

    def evolve_schema(self, name: str, schema_json: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the schema with an append-only evolution; the new DatasetInfo.
        SchemaError if the evolution is not append-only."""
        return self._json(
            "PUT", _dataset_path(name, "schema"), what=f"evolve {name}", doc=dict(schema_json)
        )

    def reset_history(self, name: str) -> dict[str, Any]:
        """Drop the version queue and start a new epoch; the new DatasetInfo."""
        return self._json(
            "POST", _dataset_path(name, "reset-history"), what=f"reset-history {name}"
        )

    # ------------------------------------------------------------ writes

    def _write_body(
        self,
        records: Records,
        *,
        use_msgpack: bool,
    ) -> dict[Any, Any]:
        if use_msgpack:
            return {key_bytes(k): v for k, v in records.items()}
        return {_key_text(k): _jsonable(v) for k, v in records.items()}

    def write(
        self,
        name: str,
        upserts: Records,
        deletes: Iterable[str | bytes] = (),
        *,
        use_msgpack: bool = True,
    ) -> dict[str, Any]:
        """One write batch (one version): ``upserts`` maps keys to records
        (typed: a mapping of field values, bytes fields as bytes) or to value
        bytes/str (opaque); ``deletes`` lists keys to remove. Returns the
        WriteResult. The batch is applied whole or not at all (RecordError,
        KeyTooLongError, BadRequestError, StorageError ...). Keys that are not
        UTF-8 need ``use_msgpack=True`` (the default)."""
        body: dict[str, Any] = {
            "upserts": self._write_body(upserts, use_msgpack=use_msgpack),
            "deletes": [key_bytes(k) if use_msgpack else _key_text(k) for k in deletes],
        }
        return self._json(
            "POST",
            _dataset_path(name, "batch"),
            what=f"write {name}",
            doc=body,
            msgpack_body=use_msgpack,
        )

    def replace(
        self,
        name: str,
        records: Records,
        *,
        use_msgpack: bool = True,
    ) -> dict[str, Any]:
        """Make the dataset exactly ``records``, as one version that publishes
        only changed and deleted keys. Returns the WriteResult (``unchanged``
        counts the rest)."""
        body = {"records": self._write_body(records, use_msgpack=use_msgpack)}
        return self._json(
            "POST",
            _dataset_path(name, "replace"),
            what=f"replace {name}",
            doc=body,
            msgpack_body=use_msgpack,
        )

    def writer(self, name: str, *, max_batch: int | None = None) -> BatchingWriter:
        """The :class:`~replicad.writer.BatchingWriter` of dataset ``name``:
        single-record writes from many threads, coalesced into batches. The
        same writer for a dataset every time (batches form only among writes
        sharing one). ``max_batch`` (default 1,000) is set by the first call;
        a later call asking for another raises ConfigError."""
        with self._writers_lock:
            writer = self._writers.get(name)
            if writer is None:
                writer = BatchingWriter(self, name, max_batch=max_batch or DEFAULT_MAX_BATCH)
                self._writers[name] = writer
            elif max_batch is not None and max_batch != writer.max_batch:
                raise ConfigError(
                    f"the writer of {name!r} has max_batch {writer.max_batch}, not {max_batch}"
                )
            return writer

    # ------------------------------------------------------------ reads

    def get(self, name: str, key: str | bytes) -> dict[str, Any] | None:
        """``{"key", "version", "record"}`` (opaque: ``"value"``) for ``key``,
        or None when the dataset holds no such key. UnknownDatasetError when
        the dataset itself does not exist (told apart from a missing record
        with one more request, only on a miss)."""
        path = _dataset_path(name, "records", quote(key_bytes(key), safe=""))
        try:
            return self._json("GET", path, what=f"get {name}")
        except UnknownDatasetError:
            self.dataset(name)  # raises UnknownDatasetError if the dataset is missing
            return None


# --- server-sent events (sans-IO) --------------------------------------------

_EOL = re.compile(r"\r\n|\r|\n")


class SSEEvent:
    """One server-sent event: its ``event`` type (``"message"`` by default)
    and its ``data`` (the ``data:`` lines joined with newlines)."""

    __slots__ = ("data", "event")

    def __init__(self, event: str, data: str) -> None:
        self.event = event
        self.data = data

    def __repr__(self) -> str:
        return f"SSEEvent({self.event!r}, {self.data!r})"


class SSEParser:
    """Incremental parser of a ``text/event-stream`` (the WHATWG rules that
    matter here): feed bytes with :meth:`feed`, get complete events back.

    Lines end with CRLF, LF or CR (a CRLF split across two feeds counts once);
    a line starting with ``:`` is a comment (the server's pings) and is
    ignored; ``event:`` sets the type, ``data:`` lines accumulate, ``id:`` and
    ``retry:`` are ignored; one optional space after the colon is dropped; a
    blank line dispatches the event (an event without data is dropped). Bytes
    are decoded as UTF-8 incrementally (invalid sequences become U+FFFD), so a
    character split across feeds is fine. A line longer than ``max_line``
    characters raises :class:`ProtocolError` (a stream that never ends a line
    would otherwise grow without bound); the parser is then unusable.
    """

    def __init__(self, *, max_line: int = 1 << 20) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self._max_line = max_line
        self._first = True

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse ``data``; return the events it completed, in order."""
        text = self._decoder.decode(data)
        if self._first and text:
            self._first = False
            text = text.removeprefix("\ufeff")
        events: list[SSEEvent] = []
        if not text:
            return events
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        buf = self._pending + text
        start = 0
        for match in _EOL.finditer(buf):
            self._line(buf[start : match.start()], events)
            start = match.end()
        if buf.endswith("\r"):
            self._skip_lf = True  # a CRLF may be split across two feeds
        self._pending = buf[start:]
        if len(self._pending) > self._max_line:
            raise ProtocolError(f"event stream line longer than {self._max_line} characters")
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent(self._event or "message", "\n".join(self._data)))
            self._event = ""
            self._data = []
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)


# --- the sidecar's client ----------------------------------------------------


class _Body:
    """The bytes of a streamed httpx response, as an async iterator that is not
    an async generator, plus :meth:`finish` to end the response cleanly.

    Why: httpx and httpcore read a body through a chain of nested async
    generators. Abandoning it early (a consumer that stops following hints, an
    error in the middle of a snapshot) leaves the inner generators to the
    garbage collector, which under trio is a ResourceWarning per generator
    (httpcore 1.0.x). :meth:`finish` closes the response, then drives the
    chain until it ends (on a closed connection it raises at once), so every
    generator in it finishes in its own task.
    """

    __slots__ = ("_chunks", "_started", "_state", "response")

    _DRAIN_STEPS = 64

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks = response.aiter_bytes()
        self._started = False
        self._state = "open"  # "open", "ended" (chain finished)

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        try:
            return await self._chunks.__anext__()
        except BaseException:
            self._state = "ended"  # StopAsyncIteration or an error: the chain is done
            raise

    async def finish(self) -> None:
        """Close the response and end the iterator chain. Never raises
        (except the caller's own cancellation)."""
        with contextlib.suppress(httpx.HTTPError):  # a broken connection: nothing to do
            await self.response.aclose()
        if not self._started or self._state == "ended":
            return
        self._state = "ended"
        with anyio.move_on_after(5.0, shield=True):
            for _ in range(self._DRAIN_STEPS):
                try:
                    await self._chunks.__anext__()
                except Exception:  # StopAsyncIteration, or the closed connection's error
                    return


class AsyncSyncClient:
    """Async client of the sync endpoints (``/v1/sync``, ``/v1/hints``,
    ``/v1/ack``), for a sidecar. Runs under trio or asyncio.

    ``transport`` replaces the network (tests, the simulation); ``verify`` is
    a bool, an ``ssl.SSLContext`` or a CA bundle path; ``max_frame_bytes``
    bounds each received frame. Errors: as :class:`OriginClient`, plus
    :class:`~replicad.errors.FrameError` for a corrupt or truncated answer and
    :class:`ProtocolError` for an answer that is not a response to the
    request. A failed call leaves nothing behind; retry it as a whole. Call
    :meth:`aclose` (or use ``async with``) when done.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.base_url = _check_url(base_url)
        self.max_frame_bytes = max_frame_bytes
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
            verify=_verify(verify),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ plumbing

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        what: str,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> AsyncIterator[_Body]:
        """Open a streamed request and yield its body (a 2xx answer); translate
        transport errors (also those raised while the caller reads the body)
        and error statuses. The response is closed on every exit path."""
        request = self._http.build_request(
            method,
            path,
            content=content,
            headers=headers,
            params=params,
            timeout=timeout if timeout is not None else self._timeout,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.RequestError as exc:
            raise _request_failed(self.base_url, exc) from exc
        body = _Body(response)
        try:
            if response.status_code >= 300:
                error_body = await response.aread()
                raise error_for_status(response.status_code, error_body, what=what)
            yield body
        except httpx.RequestError as exc:
            raise _request_failed(self.base_url, exc) from exc
        finally:
            await body.finish()

    def _decode(self, frame_kind: int, body: Any, dataset: str) -> Response:
        msg = from_wire(frame_kind, body)
        if not isinstance(msg, _RESPONSE_TYPES):
            raise ProtocolError(f"expected a sync response, got {type(msg).__name__}")
        if msg.dataset != dataset:
            raise ProtocolError(
                f"asked about dataset {dataset!r}, got an answer about {msg.dataset!r}"
            )
        return msg

    @asynccontextmanager
    async def _post_frame(self, req: Request, *, what: str) -> AsyncIterator[_Body]:
        """POST ``req`` as one frame to ``/v1/sync``; yield the answer's body
        once its content type is checked (ProtocolError if it is not frames)."""
        async with self._stream(
            "POST",
            "/v1/sync",
            what=what,
            content=encode_frame(*to_wire(req)),
            headers={"Content-Type": FRAME_CONTENT_TYPE},
        ) as answer:
            ctype = answer.response.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype and ctype != FRAME_CONTENT_TYPE:
                raise ProtocolError(f"expected {FRAME_CONTENT_TYPE}, got {ctype}")
            yield answer

    # ------------------------------------------------------------ sync

    async def request(self, req: Request) -> Response:
        """Send one sync request; return its answer (a DiffResponse,
        CursorUnservable, SnapshotChunk, MerkleNodesResponse or
        MerkleLeavesResponse about the same dataset).

        Raises SyncUsageError for a SnapshotRequest with ``stream`` set (use
        :meth:`snapshot_stream`); FrameError if the answer is not exactly one
        valid frame; ProtocolError if it is not a response to this dataset;
        the mapped error of an error status; OriginUnavailableError."""
        if isinstance(req, SnapshotRequest) and req.stream:
            raise SyncUsageError("a streamed SnapshotRequest goes through snapshot_stream()")
        async with self._post_frame(req, what=f"sync {req.dataset}") as answer:
            decoder = FrameDecoder(max_frame_bytes=self.max_frame_bytes)
            frame = None
            async for chunk in answer:
                decoder.receive_data(chunk)
                if frame is None:
                    frame = decoder.next_frame()
                if frame is not None and decoder.buffered:
                    raise ProtocolError("the origin sent more than one frame")
            if frame is None:
                decoder.close()  # FrameTruncatedError if a partial frame remains
                raise FrameTruncatedError("the origin's answer holds no frame")
        return self._decode(frame.kind, frame.body, req.dataset)

    async def snapshot_stream(self, req: SnapshotRequest) -> AsyncGenerator[SnapshotChunk, None]:
        """Stream a snapshot from ``req.after``: yield each SnapshotChunk as
        soon as its frame has arrived and been verified, until the chunk whose
        ``next_after`` is None. ``req`` is sent with ``stream`` set.

        Raises FrameError for a corrupt frame, FrameTruncatedError if the body
        ends before the last chunk, ProtocolError for anything but chunks of
        this dataset (or chunks after the last); chunks yielded before an error
        were valid. Wrap in ``contextlib.aclosing`` when stopping early, so the
        connection is released at once."""
        if not req.stream:
            req = replace(req, stream=True)
        async with self._post_frame(req, what=f"snapshot {req.dataset}") as answer:
            decoder = FrameDecoder(max_frame_bytes=self.max_frame_bytes)
            finished = False
            async for chunk in answer:
                decoder.receive_data(chunk)
                for frame in decoder.frames():
                    if finished:
                        raise ProtocolError("the origin sent frames after the last chunk")
                    msg = self._decode(frame.kind, frame.body, req.dataset)
                    if not isinstance(msg, SnapshotChunk):
                        raise ProtocolError(f"expected a SnapshotChunk, got {type(msg).__name__}")
                    finished = msg.next_after is None
                    yield msg
            decoder.close()
            if not finished:
                raise FrameTruncatedError("the snapshot stream ended before its last chunk")

    async def hints(
        self,
        datasets: Collection[str] | None = None,
        *,
        idle_timeout: float | None = 60.0,
        diffs: bool = False,
    ) -> AsyncGenerator[Hint | DiffPush, None]:
        """Follow ``GET /v1/hints``: yield a Hint per ``hint`` event (first the
        current cursor of each dataset, then each new version), for
        ``datasets`` (all when None or empty). With ``diffs``, a new version
        whose changes are small comes as a DiffPush carrying them. Ends when
        the origin closes the stream.

        The origin pings every 15 s; ``idle_timeout`` seconds without any byte
        raise OriginUnavailableError (a dead connection), None waits forever.
        Raises ProtocolError for a malformed hint, FrameError for a corrupt
        pushed frame; the mapped error of an error status. Wrap in
        ``contextlib.aclosing`` when stopping early."""
        params = {"datasets": ",".join(datasets)} if datasets else {}
        if diffs:
            params["diffs"] = "1"
        timeout = httpx.Timeout(self._timeout, read=idle_timeout)
        async with self._stream(
            "GET",
            "/v1/hints",
            what="hints",
            params=params or None,
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        ) as answer:
            parser = SSEParser()
            async for chunk in answer:
                for event in parser.feed(chunk):
                    if event.event == "diff" and diffs:
                        yield self._push_of(event.data)
                        continue
                    if event.event != "hint":
                        continue
                    try:
                        doc = json.loads(event.data)
                    except ValueError as exc:
                        raise ProtocolError(f"hint is not JSON: {event.data[:200]!r}") from exc
                    yield hint_from_json(doc)

    def _push_of(self, data: str) -> DiffPush:
        """The DiffPush in a ``diff`` event's data (a base64 frame)."""
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise ProtocolError("diff event is not base64") from exc
        decoder = FrameDecoder(max_frame_bytes=self.max_frame_bytes)
        decoder.receive_data(raw)
        frame = decoder.next_frame()
        if frame is None or decoder.buffered:
            raise ProtocolError("diff event does not hold exactly one frame")
        msg = from_wire(frame.kind, frame.body)
        if not isinstance(msg, DiffPush):
            raise ProtocolError(f"diff event holds a {type(msg).__name__}")
        return msg

    async def ack(
        self,
        replica: str,
        datasets: Mapping[str, Cursor],
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Report where ``replica`` stands (``POST /v1/ack``), for the fleet
        view. ``info`` is free-form JSON (host, version of the agent, ...)."""
        body = {
            "replica": replica,
            "datasets": {
                name: {"epoch": c.epoch.hex(), "version": c.version} for name, c in datasets.items()
            },
            "info": dict(info or {}),
        }
        async with self._stream(
            "POST",
            "/v1/ack",
            what="ack",
            content=_dump_json(body),
            headers={"Content-Type": "application/json"},
        ) as answer:
            async for _ in answer:
                pass
