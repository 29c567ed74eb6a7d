"""The origin's clients, the progress bar and the ``replicad`` CLI.

Unit tests first (error translation through ``httpx.MockTransport``, the
sans-IO SSE parser, the progress bar with a fake clock), then the main tests
against a real origin process (``python -m replicad.server``) on a free port.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import trio

from replicad.cli import main
from replicad.client import (
    AsyncSyncClient,
    OriginClient,
    SSEParser,
    error_for_status,
    hint_from_json,
)
from replicad.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    DatasetExistsError,
    FrameChecksumError,
    FrameTruncatedError,
    KeyTooLongError,
    OriginUnavailableError,
    ProtocolError,
    RecordError,
    ReplicadError,
    SchemaError,
    StorageError,
    SyncUsageError,
    UnknownDatasetError,
)
from replicad.frames import encode_frame
from replicad.merkle import EMPTY_DIGEST, Digest, Geometry, LeafQuery, NodeQuery
from replicad.messages import (
    Cursor,
    CursorUnservable,
    DiffPush,
    DiffRequest,
    DiffResponse,
    Hint,
    MerkleLeavesRequest,
    MerkleLeavesResponse,
    MerkleNodesRequest,
    MerkleNodesResponse,
    SnapshotChunk,
    SnapshotRequest,
    to_wire,
)
from replicad.progress import Progress, format_count, format_duration

EPOCH = bytes(range(16))
CURSOR = Cursor(EPOCH, 7)


def frame_of(msg: Any) -> bytes:
    return encode_frame(*to_wire(msg))


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


# =============================================================================
# Unit level: error translation (MockTransport), SSE parsing, progress
# =============================================================================


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_request", BadRequestError),
        (400, "schema_violation", RecordError),
        (400, "schema_error", SchemaError),
        (400, "key_too_long", KeyTooLongError),
        (401, "unauthorized", AuthError),
        (403, "forbidden", AuthError),
        (404, "not_found", UnknownDatasetError),
        (405, "method_not_allowed", BadRequestError),
        (409, "exists", DatasetExistsError),
        (413, "too_large", BadRequestError),
        (415, "unsupported_media_type", BadRequestError),
        (422, "bad_frame", ProtocolError),
        (507, "storage_full", StorageError),
        (500, "internal", OriginUnavailableError),
        (503, "unavailable", OriginUnavailableError),
        (302, "redirect", ProtocolError),
    ],
)
def test_error_for_status_maps_documented_codes(
    status: int, code: str, cls: type[ReplicadError]
) -> None:
    exc = error_for_status(status, error_body(code, f"the server says {code}"))
    assert type(exc) is cls
    assert f"the server says {code}" in str(exc)
    if isinstance(exc, AuthError):
        assert exc.status == status


def test_error_for_status_without_a_json_body() -> None:
    exc = error_for_status(502, b"<html>bad gateway</html>", what="datasets")
    assert isinstance(exc, OriginUnavailableError)
    assert str(exc) == "datasets: HTTP 502 Bad Gateway: <html>bad gateway</html>"
    assert str(error_for_status(404, b"")) == "request: HTTP 404 Not Found"


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> OriginClient:
    return OriginClient("http://origin.test", token="t0k", transport=httpx.MockTransport(handler))


def test_origin_client_raises_the_servers_error() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(400, content=error_body("schema_violation", "field 'age': no"))

    with mock_client(handler) as client, pytest.raises(RecordError, match="field 'age': no"):
        client.write("ds", {"k": {"age": "x"}})
    assert seen[0].headers["authorization"] == "Bearer t0k"
    assert seen[0].headers["content-type"] == "application/msgpack"


def test_origin_client_get_tells_a_missing_record_from_a_missing_dataset() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        paths.append(path)
        if path == "/v1/datasets/present":
            return httpx.Response(200, json={"name": "present"})
        return httpx.Response(404, content=error_body("not_found", f"nothing at {path}"))

    with mock_client(handler) as client:
        assert client.get("present", b"a/b c\xff") is None
        assert paths == ["/v1/datasets/present/records/a%2Fb%20c%FF", "/v1/datasets/present"]
        with pytest.raises(UnknownDatasetError, match="/v1/datasets/absent"):
            client.get("absent", "k")


def test_origin_client_translates_transport_errors_and_bad_answers() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        mock_client(refused) as client,
        pytest.raises(OriginUnavailableError, match=r"origin\.test unavailable"),
    ):
        client.datasets()

    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{not json")

    with mock_client(garbage) as client, pytest.raises(ProtocolError, match="undecodable"):
        client.health()

    def bad_gzip(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    with mock_client(bad_gzip) as client, pytest.raises(ProtocolError, match=r"origin\.test: "):
        client.health()

    def wrong_shape(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": []})

    with mock_client(wrong_shape) as client, pytest.raises(ProtocolError, match="'datasets'"):
        client.datasets()


def test_origin_client_rejects_bad_arguments_locally() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        OriginClient("ftp://x")
    with pytest.raises(ConfigError, match="CA bundle"):
        OriginClient("https://x", verify="/nonexistent/ca.pem")

    def never(request: httpx.Request) -> httpx.Response:  # pragma: no cover
        raise AssertionError("no request expected")

    with mock_client(never) as client:
        with pytest.raises(BadRequestError, match="not UTF-8"):
            client.write("ds", {b"\xff": {}}, use_msgpack=False)
        with pytest.raises(BadRequestError, match="either a schema or opaque"):
            client.create_dataset("ds", None)


def async_mock(
    handler: Callable[[httpx.Request], httpx.Response],
) -> AsyncSyncClient:
    return AsyncSyncClient("http://origin.test", transport=httpx.MockTransport(handler))


def frame_response(content: bytes) -> httpx.Response:
    return httpx.Response(
        200, content=content, headers={"content-type": "application/x-replicad-frame"}
    )


DIFF_ANSWER = DiffResponse("ds", CURSOR, Digest(1, 5), ((b"k", b"v"),), (b"gone",))


@pytest.mark.trio
async def test_sync_request_decodes_one_frame() -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        assert request.headers["content-type"] == "application/x-replicad-frame"
        return frame_response(frame_of(DIFF_ANSWER))

    async with async_mock(handler) as client:
        assert await client.request(DiffRequest("ds", CURSOR)) == DIFF_ANSWER
    assert sent == [frame_of(DiffRequest("ds", CURSOR))]


@pytest.mark.trio
@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (b"", FrameTruncatedError, "no frame"),
        (frame_of(DIFF_ANSWER)[:-3], FrameTruncatedError, "bytes not handed out"),
        (frame_of(DIFF_ANSWER)[:-1] + b"!", FrameChecksumError, "checksum"),
        (frame_of(DIFF_ANSWER) * 2, ProtocolError, "more than one frame"),
        (frame_of(Hint("ds", CURSOR, EMPTY_DIGEST)), ProtocolError, "expected a sync response"),
        (frame_of(DiffRequest("ds", CURSOR)), ProtocolError, "expected a sync response"),
        (
            frame_of(CursorUnservable("other", "epoch", CURSOR, EMPTY_DIGEST)),
            ProtocolError,
            "got an answer about 'other'",
        ),
    ],
)
async def test_sync_request_rejects_corrupt_or_wrong_answers(
    content: bytes, error: type[ReplicadError], match: str
) -> None:
    async with async_mock(lambda request: frame_response(content)) as client:
        with pytest.raises(error, match=match):
            await client.request(DiffRequest("ds", CURSOR))


@pytest.mark.trio
async def test_sync_request_errors_statuses_and_transport() -> None:
    def bad_frame(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, content=error_body("bad_frame", "frame checksum mismatch"))

    async with async_mock(bad_frame) as client:
        with pytest.raises(ProtocolError, match="frame checksum mismatch"):
            await client.request(DiffRequest("ds", CURSOR))

    def unknown(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=error_body("not_found", "unknown dataset 'ds'"))

    async with async_mock(unknown) as client:
        with pytest.raises(UnknownDatasetError, match="unknown dataset 'ds'"):
            await client.request(DiffRequest("ds", CURSOR))

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    async with async_mock(reset) as client:
        with pytest.raises(OriginUnavailableError, match="connection reset"):
            await client.request(DiffRequest("ds", CURSOR))
        with pytest.raises(OriginUnavailableError):
            await client.ack("r", {"ds": CURSOR})

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>", headers={"content-type": "text/html"})

    async with async_mock(html) as client:
        with pytest.raises(ProtocolError, match="expected application/x-replicad-frame"):
            await client.request(DiffRequest("ds", CURSOR))
        with pytest.raises(SyncUsageError, match="snapshot_stream"):
            await client.request(SnapshotRequest("ds", stream=True))


def chunk(records: int, start: int, last: bool) -> SnapshotChunk:
    recs = tuple((b"k%03d" % i, b"v") for i in range(start, start + records))
    return SnapshotChunk("ds", CURSOR, EMPTY_DIGEST, recs, None if last else recs[-1][0])


@pytest.mark.trio
async def test_snapshot_stream_detects_truncation_and_trailing_frames() -> None:
    whole = frame_of(chunk(3, 0, False)) + frame_of(chunk(2, 3, True))

    async def collect(body: bytes) -> list[SnapshotChunk]:
        async with (
            async_mock(lambda request: frame_response(body)) as client,
            aclosing(client.snapshot_stream(SnapshotRequest("ds", limit=3))) as stream,
        ):
            return [c async for c in stream]

    got = await collect(whole)
    assert [len(c.records) for c in got] == [3, 2]
    with pytest.raises(FrameTruncatedError, match="ended before its last chunk"):
        await collect(frame_of(chunk(3, 0, False)))
    with pytest.raises(FrameTruncatedError):
        await collect(whole[:-5])
    with pytest.raises(ProtocolError, match="after the last chunk"):
        await collect(whole + frame_of(chunk(1, 9, True)))
    with pytest.raises(ProtocolError, match="expected a SnapshotChunk"):
        await collect(frame_of(DIFF_ANSWER))


def test_sse_parser_handles_any_split_and_line_ending() -> None:
    stream = (
        b": ping\r\n"
        b"event: hint\r\n"
        b'data: {"a":\r\n'
        b"data: 1}\r\n"
        b"\r\n"
        b"id: 7\n"
        b"retry: 10\n"
        b"data:no-space \xc3\xa9\n"
        b"\n"
        b"event: hint\r"
        b"\r"
        b"event: x\n"
        b"data\n"
        b"\n"
        b"data: partial"
    )
    expected = [("hint", '{"a":\n1}'), ("message", "no-space é"), ("x", "")]
    whole = [(e.event, e.data) for e in SSEParser().feed(stream)]
    assert whole == expected
    parser = SSEParser()
    byte_by_byte = []
    for i in range(len(stream)):
        byte_by_byte += [(e.event, e.data) for e in parser.feed(stream[i : i + 1])]
    assert byte_by_byte == expected
    assert [(e.event, e.data) for e in parser.feed(b"\n\n")] == [("message", "partial")]


def test_sse_parser_bounds_a_line() -> None:
    parser = SSEParser(max_line=10)
    with pytest.raises(ProtocolError, match="longer than 10"):
        parser.feed(b"data: " + b"x" * 20)


def test_hint_from_json() -> None:
    digest = Digest(3, 99)
    doc = {"dataset": "ds", "epoch": EPOCH.hex(), "version": 7, "digest": digest.hex()}
    assert hint_from_json(doc) == Hint("ds", CURSOR, digest)
    bad_docs: list[object] = [
        [],
        {**doc, "epoch": "zz"},
        {**doc, "epoch": "00"},
        {**doc, "digest": "00"},
        {**doc, "version": "7"},
        {"dataset": "ds"},
    ]
    for bad in bad_docs:
        with pytest.raises(ProtocolError, match="malformed hint"):
            hint_from_json(bad)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_a_line_every_interval_when_not_a_tty() -> None:
    out = io.StringIO()
    clock = FakeClock()
    bar = Progress(4_000_000, label="load", unit="B", stream=out, interval=5, clock=clock)
    assert not bar.tty
    clock.now += 1
    bar.update(1_000_000, note="10 records")
    assert out.getvalue() == ""  # not yet 5 s
    clock.now += 4
    bar.update(2_000_000, note="20 records")
    clock.now += 1
    bar.update(2_500_000)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "load: 2.0 MB/4.0 MB (50.0%), 400.0 kB/s, ETA 0:05, 20 records",
        "load: 2.5 MB/4.0 MB (62.5%), 416.7 kB/s, in 0:06, 20 records",
    ]


def test_progress_redraws_one_line_on_a_tty() -> None:
    out = io.StringIO()
    clock = FakeClock()
    with Progress(200, label="boot", stream=out, tty=True, clock=clock, width=10) as bar:
        clock.now += 1
        bar.advance(50, note="a long note")
        clock.now += 0.05
        bar.advance(10)  # within the redraw interval: no output
        clock.now += 1
        bar.advance(40)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    frames = text.split("\r")[1:]
    assert frames[0] == "boot  [##........]  25.0%  50/200  50/s  ETA 0:03  a long note"
    assert frames[1] == "boot  [#####.....]  50.0%  100/200  48.8/s  ETA 0:02  a long note"
    assert (
        frames[2] == "boot  [#####.....]  50.0%  100/200  48.8/s  in 0:02  a long note \n"
    )  # padded


def test_progress_without_total_and_on_a_broken_stream() -> None:
    out = io.StringIO()
    clock = FakeClock()
    bar = Progress(None, stream=out, interval=0, clock=clock)
    clock.now += 2
    bar.update(10)
    assert out.getvalue() == "10, 5/s, ETA ?\n"
    out.close()
    bar.update(20)  # a closed stream never fails the work
    bar.close()


def test_format_helpers() -> None:
    assert format_count(999, "B") == "999 B"
    assert format_count(1_234_567, "B") == "1.2 MB"
    assert format_count(1_234_567) == "1,234,567"
    assert format_count(2.5) == "2.5"
    assert format_count(12, "rows") == "12 rows"
    assert format_duration(75) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"


def test_cli_reports_an_unreachable_origin_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    assert main(["--origin", f"http://127.0.0.1:{port}", "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"replicad: error: origin http://127.0.0.1:{port} unavailable")
    assert "Traceback" not in err


def test_cli_usage_and_local_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["create-dataset", "x"])  # neither --schema nor --opaque
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["load", "x", "f.csv", "--batch", "0"])
    assert exc.value.code == 2
    capsys.readouterr()
    bad = tmp_path / "schema.json"
    bad.write_text('{"fields": [{"name": "1x", "type": "int"}]}')
    assert main(["create-dataset", "x", "--schema", str(bad)]) == 1
    assert f"replicad: error: {bad}: invalid field name '1x'" in capsys.readouterr().err
    assert main(["create-dataset", "x", "--schema", str(tmp_path / "none.json")]) == 1
    assert "cannot read schema file" in capsys.readouterr().err
    assert main(["status", "--token-file", str(tmp_path / "none")]) == 1
    assert "cannot read token file" in capsys.readouterr().err


# =============================================================================
# Against a real origin process
# =============================================================================

needs_server = pytest.mark.skipif(
    find_spec("replicad.server") is None, reason="replicad.server has not landed yet"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Origin:
    url: str
    data: Path
    log: Path


class StartOrigin(Protocol):
    def __call__(self, env_extra: dict[str, str], *, via_cli: bool = False) -> Origin: ...


@pytest.fixture(scope="module")
def origin_factory() -> Iterator[StartOrigin]:
    """Start origin processes on demand; stop them all (SIGTERM, then kill) and
    remove their files at the end of the module.

    ``via_cli``: run ``python -m replicad serve`` with a TOML config whose
    data directory is used and whose listen address a flag overrides."""
    running: list[tuple[subprocess.Popen[bytes], Any, Path]] = []

    def start(env_extra: dict[str, str], *, via_cli: bool = False) -> Origin:
        tmp = Path(tempfile.mkdtemp(prefix="replicad-test-"))
        port = free_port()
        log_path = tmp / "server.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
        env.pop("REPLICAD_URL", None)
        listen = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "replicad.server", "--data", str(tmp / "data")]
        argv += ["--listen", listen]
        data = tmp / "data"
        if via_cli:
            data = tmp / "toml-data"
            config = tmp / "replicad.toml"
            config.write_text(f'data = "{data}"\nlisten = "127.0.0.1:1"\nlog_format = "text"\n')
            argv = [sys.executable, "-m", "replicad", "serve", "--config", str(config)]
            argv += ["--listen", listen, "--no-durable"]
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        running.append((proc, log, tmp))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"origin exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"origin did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.05)
        return Origin(url, data, log_path)

    yield start
    for proc, log, tmp in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def origin(origin_factory: StartOrigin) -> Origin:
    return origin_factory({"REPLICAD_WRITE_TOKENS": "", "REPLICAD_READ_TOKENS": ""})


@pytest.fixture(scope="module")
def files() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="replicad-files-"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


SCHEMA_DOC = {
    "fields": [
        {"name": "age", "type": "int"},
        {"name": "city", "type": "str", "dictionary": True},
        {"name": "score", "type": "float", "nullable": True},
        {"name": "tags", "type": "list<str>", "nullable": True},
        {"name": "avatar", "type": "bytes", "nullable": True},
    ]
}
CITIES = ["paris", "lyon", "nice"]


def csv_rows(n: int, changed: frozenset[int] = frozenset()) -> list[str]:
    rows = []
    for i in range(n):
        age = 20 + i % 50 + (1000 if i in changed else 0)
        tags = f'"[""t{i % 3}""]"'
        rows.append(f"user:{i:04d},{age},{CITIES[i % 3]},{i / 4},{tags},")
    return rows


def run_cli(origin: Origin, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--origin", origin.url, *args], stdout=out, stderr=err, environ=env or {})
    return code, out.getvalue(), err.getvalue()


def info(origin: Origin, name: str) -> dict[str, Any]:
    with OriginClient(origin.url) as client:
        return client.dataset(name)


@needs_server
def test_cli_creates_loads_replaces_gets_and_lists(origin: Origin, files: Path) -> None:
    schema_file = files / "users.schema.json"
    schema_file.write_text(json.dumps(SCHEMA_DOC))
    code, out, err = run_cli(origin, "create-dataset", "users", "--schema", str(schema_file))
    assert (code, err) == (0, "")
    assert out.startswith("created dataset users (typed, schema v1 with 5 fields)")
    assert out.rstrip().endswith("version 0")

    code, out, err = run_cli(origin, "create-dataset", "users", "--schema", str(schema_file))
    assert code == 1 and err.startswith("replicad: error: ") and "users" in err

    header = "key,age,city,score,tags,avatar"
    data = files / "users.csv"
    data.write_text("\n".join([header, *csv_rows(500)]) + "\n")
    code, out, err = run_cli(origin, "load", "users", str(data), "--batch", "200")
    assert code == 0, err
    # non-TTY progress: plain log lines, ending with the final one
    assert err.splitlines()[-1].startswith("load users: ")
    assert "(100.0%)" in err and "500 records" in err and "\r" not in err
    assert out.startswith("loaded 500 records into users: 3 versions (v0 -> v3); 500 upserted")
    before = info(origin, "users")
    assert (before["version"], before["records"]) == (3, 500)

    # --replace publishes only the changes, as one version
    rows = csv_rows(500, changed=frozenset(range(10)))[:495]  # 10 changed, 5 deleted
    rows += [f"new:{i},1,paris,,," for i in range(3)]  # 3 new
    gz = files / "users-v2.csv.gz"
    gz.write_bytes(gzip.compress(("\n".join([header, *rows]) + "\n").encode()))
    code, out, err = run_cli(origin, "load", "users", str(gz), "--replace")
    assert code == 0, err
    assert "loaded 498 records into users: 1 version (v3 -> v4)" in out
    assert "13 upserted, 5 deleted, 485 unchanged" in out
    after = info(origin, "users")
    assert (after["version"], after["records"]) == (4, 498)
    assert after["epoch"] == before["epoch"]

    # an empty file never empties a dataset by accident
    empty = files / "empty.csv"
    empty.write_text(header + "\n")
    code, out, err = run_cli(origin, "load", "users", str(empty), "--replace")
    assert code == 1 and "--replace would delete every record of users" in err
    code, out, err = run_cli(origin, "load", "users", str(empty))
    assert (code, out.strip()) == (0, f"{empty}: no records; users unchanged")
    assert info(origin, "users")["version"] == 4

    code, out, err = run_cli(origin, "get", "users", "user:0003")
    assert code == 0, err
    assert json.loads(out) == {
        "age": 1023,
        "city": "paris",
        "score": 0.75,
        "tags": ["t0"],
        "avatar": None,
    }
    code, out, err = run_cli(origin, "get", "users", "user:0003", "--full")
    assert json.loads(out)["version"] == 4
    code, out, err = run_cli(origin, "get", "users", "user:0499")
    assert (code, out) == (1, "") and "no record 'user:0499'" in err
    code, out, err = run_cli(origin, "get", "nosuch", "k")
    assert code == 1 and err.startswith("replicad: error: ")

    code, out, err = run_cli(origin, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "DATASET",
        "KIND",
        "VERSION",
        "RECORDS",
        "EPOCH",
        "DIGEST",
        "QUEUE",
    ]
    row = next(line.split() for line in lines if line.startswith("users "))
    assert row[:5] == ["users", "typed", "4", "498", after["epoch"][:8]]
    assert row[5] == after["digest"][16:28]
    code, out, err = run_cli(origin, "status", "--json")
    assert any(d["name"] == "users" for d in json.loads(out))


@needs_server
def test_cli_opaque_jsonl_evolve_and_reset_history(origin: Origin, files: Path) -> None:
    code, out, err = run_cli(origin, "create-dataset", "blobs", "--opaque", "--queue-max", "64")
    assert code == 0, err
    assert "blobs (opaque)" in out
    lines: list[dict[str, Any]] = [{"key": f"b{i}", "value": f"v{i}"} for i in range(20)]
    lines.append({"key": "bin", "value": {"base64": "AP8="}})
    data = files / "blobs.ndjson"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    code, out, err = run_cli(origin, "load", "blobs", str(data))
    assert code == 0, err
    assert "loaded 21 records into blobs: 1 version (v0 -> v1)" in out
    code, out, err = run_cli(origin, "get", "blobs", "b7")
    assert json.loads(out) == "v7"
    code, out, err = run_cli(origin, "get", "blobs", "bin")
    assert json.loads(out) == {"base64": "AP8="}

    bad = files / "blobs-bad.jsonl"
    bad.write_text('{"key": "a", "value": "x"}\n{"key": "b", "value": "y"}\n{"key": "c"}\n')
    code, out, err = run_cli(origin, "load", "blobs", str(bad), "--batch", "1")
    assert code == 1
    assert err.splitlines()[-2:] == [
        "replicad: 1 batch(es) were committed before the error "
        "(1 records changed; blobs is now at version 2)",
        f"replicad: error: {bad}:3: an opaque dataset's record needs a 'value'",
    ]

    schema_file = files / "evolve.schema.json"
    schema_file.write_text(json.dumps({"fields": [{"name": "a", "type": "int"}]}))
    assert run_cli(origin, "create-dataset", "evolving", "--schema", str(schema_file))[0] == 0
    fields: list[dict[str, Any]] = [
        {"name": "a", "type": "int"},
        {"name": "b", "type": "str", "nullable": True},
    ]
    schema_file.write_text(json.dumps({"version": 2, "fields": fields}))
    code, out, err = run_cli(origin, "evolve-schema", "evolving", "--schema", str(schema_file))
    assert (code, out.strip()) == (0, "schema of evolving is now version 2 (2 fields)"), err
    schema_file.write_text(json.dumps({"version": 3, "fields": fields[1:]}))
    code, out, err = run_cli(origin, "evolve-schema", "evolving", "--schema", str(schema_file))
    assert code == 1 and err.startswith("replicad: error: ")

    old = info(origin, "blobs")["epoch"]
    code, out, err = run_cli(origin, "reset-history", "blobs")
    assert code == 0, err
    new = info(origin, "blobs")
    assert new["epoch"] != old and out.startswith(f"blobs: new epoch {new['epoch'][:8]}")


@needs_server
def test_client_errors_and_json_writes(origin: Origin) -> None:
    with OriginClient(origin.url) as client:
        assert client.health()["status"] == "ok"
        client.create_dataset(
            "typed", SCHEMA_DOC, merkle={"fanout": 4, "depth": 3}, max_value_bytes=4096
        )
        with pytest.raises(DatasetExistsError):
            client.create_dataset("typed", SCHEMA_DOC)
        with pytest.raises(SchemaError):
            client.create_dataset("broken", {"fields": [{"name": "x", "type": "decimal"}]})
        with pytest.raises(RecordError):
            client.write("typed", {"k": {"age": "old", "city": "x"}})
        with pytest.raises(KeyTooLongError):
            client.write("typed", {b"k" * 600: {"age": 1, "city": "x"}})
        with pytest.raises(UnknownDatasetError):
            client.write("nosuch", {"k": {"age": 1, "city": "x"}})
        with pytest.raises(BadRequestError):
            client.write("typed", {"k": {"age": 1, "city": "x"}}, deletes=["k"])
        assert client.dataset("typed")["version"] == 0  # rejected batches wrote nothing

        record = {"age": 5, "city": "lyon", "avatar": b"\x00\xff", "tags": ["x"], "score": None}
        result = client.write("typed", {"j": record}, use_msgpack=False)
        assert (result["version"], result["upserted"], result["deleted"]) == (1, 1, 0)
        result = client.write("typed", {b"m\xff": {**record, "age": 6}}, deletes=["gone"])
        assert result["version"] == 2
        got = client.get("typed", "j")
        assert got is not None and got["record"]["avatar"] == {"base64": "AP8="}
        got = client.get("typed", b"m\xff")
        assert got is not None and got["record"]["age"] == 6
        assert client.get("typed", "nope") is None
        with pytest.raises(UnknownDatasetError):
            client.get("nosuch", "k")
        names = {d["name"] for d in client.datasets()}
        assert "typed" in names


@needs_server
@pytest.mark.trio
async def test_sync_client_diff_snapshot_merkle_round_trips(origin: Origin) -> None:
    with OriginClient(origin.url) as writer:
        writer.create_dataset("sync", SCHEMA_DOC)
        writer.write("sync", {f"s{i:03d}": {"age": i, "city": "nice"} for i in range(250)})
        first = writer.dataset("sync")
        writer.write("sync", {"s001": {"age": 99, "city": "paris"}}, deletes=["s002"])
        now = writer.dataset("sync")
    epoch = bytes.fromhex(now["epoch"])
    digest = Digest.from_bytes(bytes.fromhex(now["digest"]))
    async with AsyncSyncClient(origin.url) as client:
        diff = await client.request(DiffRequest("sync", Cursor(epoch, first["version"])))
        assert isinstance(diff, DiffResponse)
        assert diff.cursor == Cursor(epoch, now["version"]) and diff.digest == digest
        assert [k for k, _ in diff.upserts] == [b"s001"] and diff.deletes == (b"s002",)
        assert diff.meta is not None  # the replica said meta_revision 0

        other = await client.request(DiffRequest("sync", Cursor(bytes(16), 1)))
        assert isinstance(other, CursorUnservable) and other.cursor.epoch == epoch

        page = await client.request(SnapshotRequest("sync", limit=100))
        assert isinstance(page, SnapshotChunk) and len(page.records) == 100
        assert page.next_after is not None

        keys: list[bytes] = []
        chunks = 0
        async with aclosing(client.snapshot_stream(SnapshotRequest("sync", limit=64))) as stream:
            async for c in stream:
                chunks += 1
                assert c.cursor.epoch == epoch and c.digest == digest
                keys += [k for k, _ in c.records]
        # the server's stable order (not necessarily key order), each key once
        assert chunks >= 4 and len(keys) == 249 and len(set(keys)) == 249
        assert b"s002" not in keys

        nodes = await client.request(MerkleNodesRequest("sync", NodeQuery(0, (0,), 2)))
        assert isinstance(nodes, MerkleNodesResponse)
        fanout, depth = nodes.geometry
        assert len(nodes.answer.digests) == 1 and len(nodes.answer.digests[0]) == fanout**2
        leaf = Geometry(fanout, depth).leaf_of(b"s001")
        leaves = await client.request(MerkleLeavesRequest("sync", LeafQuery((leaf,))))
        assert isinstance(leaves, MerkleLeavesResponse)
        [(got_leaf, entries)] = leaves.answer.entries
        assert got_leaf == leaf and b"s001" in {k for k, _ in entries}

        with pytest.raises(UnknownDatasetError):
            await client.request(DiffRequest("nosuch", Cursor(epoch, 0)))


@needs_server
@pytest.mark.trio
async def test_sync_client_hints_follow_writes(origin: Origin) -> None:
    with OriginClient(origin.url) as writer:
        writer.create_dataset("hinted", SCHEMA_DOC)
        writer.write("hinted", {"a": {"age": 1, "city": "x"}})
        start = writer.dataset("hinted")

    def write_one() -> None:
        with OriginClient(origin.url) as w:
            w.write("hinted", {"b": {"age": 2, "city": "y"}})

    async with AsyncSyncClient(origin.url) as client:
        with trio.fail_after(15):
            async with aclosing(client.hints(["hinted"])) as hints:
                seen: list[Hint | DiffPush] = []
                async for hint in hints:
                    seen.append(hint)
                    if len(seen) == 1:
                        assert hint.dataset == "hinted"
                        assert hint.cursor.version == start["version"]
                        assert hint.cursor.epoch.hex() == start["epoch"]
                        await trio.to_thread.run_sync(write_one)
                    elif hint.cursor.version == start["version"] + 1:
                        break
        assert seen[-1].digest.count == 2
        with pytest.raises(UnknownDatasetError):
            async with aclosing(client.hints(["nosuch"])) as hints:
                async for _ in hints:  # pragma: no cover
                    pass


@needs_server
@pytest.mark.trio
async def test_sync_client_hints_with_diffs_carry_the_records(origin: Origin) -> None:
    with OriginClient(origin.url) as writer:
        writer.create_dataset("pushed", SCHEMA_DOC)
        writer.write("pushed", {"a": {"age": 1, "city": "x"}, "gone": {"age": 0, "city": "x"}})
        start = writer.dataset("pushed")

    def write_one() -> None:
        with OriginClient(origin.url) as w:
            w.write("pushed", {"b": {"age": 2, "city": "new-city"}}, deletes=["gone"])

    async with AsyncSyncClient(origin.url) as client:
        with trio.fail_after(15):
            async with aclosing(client.hints(["pushed"], diffs=True)) as hints:
                first = await anext(hints)
                assert isinstance(first, Hint)  # the current cursor is a plain hint
                await trio.to_thread.run_sync(write_one)
                push = await anext(hints)
        assert isinstance(push, DiffPush)
        assert push.since == first.cursor and push.cursor.version == start["version"] + 1
        assert [k for k, _ in push.upserts] == [b"b"] and push.deletes == (b"gone",)
        assert push.meta is not None  # "new-city" grew the dictionary
        answer = await client.request(DiffRequest("pushed", first.cursor, push.meta.revision))
        assert isinstance(answer, DiffResponse)
        assert dict(answer.upserts) == dict(push.upserts) and answer.digest == push.digest
    # a bad value of the flag is a clear 400
    r = httpx.get(origin.url + "/v1/hints?diffs=yes", timeout=10)
    assert r.status_code == 400 and "diffs must be 0 or 1" in r.text


@needs_server
def test_sync_client_also_runs_under_asyncio(origin: Origin) -> None:
    with OriginClient(origin.url) as writer:
        writer.create_dataset("on-asyncio", {"fields": [{"name": "a", "type": "int"}]})
        writer.write("on-asyncio", {"k": {"a": 1}})

    async def follow() -> tuple[Hint | DiffPush, Any]:
        async with AsyncSyncClient(origin.url) as client:
            async with aclosing(client.hints(["on-asyncio"])) as hints:
                first = await anext(hints)
            answer = await client.request(DiffRequest("on-asyncio", first.cursor))
            return first, answer

    first, answer = asyncio.run(follow())
    assert first.cursor.version == 1
    assert isinstance(answer, DiffResponse) and answer.cursor == first.cursor


@needs_server
@pytest.mark.trio
async def test_fleet_shows_acked_replicas(origin: Origin) -> None:
    with OriginClient(origin.url) as writer:
        writer.create_dataset("fleeted", SCHEMA_DOC)
        for i in range(3):
            writer.write("fleeted", {f"k{i}": {"age": i, "city": "x"}})
        now = writer.dataset("fleeted")
    cursor = Cursor(bytes.fromhex(now["epoch"]), now["version"] - 2)
    async with AsyncSyncClient(origin.url) as client:
        await client.ack("host-a", {"fleeted": cursor}, {"agent": "test"})
        await client.ack("host-b", {"fleeted": Cursor(bytes(16), 1)})
    code, out, err = await trio.to_thread.run_sync(run_cli, origin, "fleet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["REPLICA", "ADDRESS", "LAST"]
    row_a = next(line for line in lines if line.startswith("host-a"))
    assert "127.0.0.1" in row_a and "s ago" in row_a
    assert row_a.split()[-3:] == ["fleeted", str(now["version"] - 2), "2"]
    row_b = next(line for line in lines if line.startswith("host-b"))
    assert row_b.endswith("other epoch")
    code, out, err = await trio.to_thread.run_sync(run_cli, origin, "fleet", "--json")
    entry = next(r for r in json.loads(out) if r["replica"] == "host-a")
    assert entry["info"] == {"agent": "test"} and entry["datasets"]["fleeted"]["lag"] == 2


@needs_server
def test_tokens_are_checked(origin_factory: StartOrigin, files: Path) -> None:
    secured = origin_factory({"REPLICAD_WRITE_TOKENS": "w-secret", "REPLICAD_READ_TOKENS": "r-1"})
    code, out, err = run_cli(secured, "status")
    assert code == 1 and err.startswith("replicad: error: ")
    with OriginClient(secured.url) as anonymous, pytest.raises(AuthError) as exc:
        anonymous.datasets()
    assert exc.value.status == 401
    token_file = files / "write.token"
    token_file.write_text("# the write token\nw-secret\n")
    code, out, err = run_cli(
        secured, "create-dataset", "d", "--opaque", "--token-file", str(token_file)
    )
    assert code == 0, err
    code, out, err = run_cli(secured, "status", env={"REPLICAD_TOKEN": "r-1"})
    assert code == 0 and out.startswith("DATASET"), err
    with OriginClient(secured.url, token="r-1") as reader, pytest.raises(AuthError) as exc:
        reader.write("d", {"k": b"v"})
    assert exc.value.status == 403


@needs_server
def test_cli_serve_takes_the_config_file_and_flags_override_it(
    origin_factory: StartOrigin,
) -> None:
    served = origin_factory({}, via_cli=True)
    assert served.data.name == "toml-data"
    code, out, err = run_cli(served, "create-dataset", "d", "--opaque")
    assert code == 0, err
    assert served.data.is_dir() and any(served.data.iterdir())
    code, out, err = run_cli(served, "status")
    assert code == 0, err
    assert out.splitlines()[1].split()[:4] == ["d", "opaque", "0", "0"]


def test_cli_serve_reports_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(tmp_path / "none.toml")]) == 1
    assert "replicad: error: cannot read config" in capsys.readouterr().err
    assert main(["serve", "--data", str(tmp_path), "--tls-cert", "c.pem"]) == 1
    assert "tls_cert and tls_key must be set together" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("push_max_kb = 4096\n")
    assert main(["serve", "--config", str(bad)]) == 1
    assert "push_max_kb must be between 0 and 512" in capsys.readouterr().err
