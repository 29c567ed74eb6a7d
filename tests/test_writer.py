"""The batching writer (``replicad/writer.py``): concurrent writes share
requests, in order, never the same key twice in one batch, each error stays
with its write; against a scripted transport (this layer alone) and against a
real origin process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from replicad.client import BatchingWriter, OriginClient, WriteAck
from replicad.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    OriginUnavailableError,
    ProtocolError,
    RecordError,
)
from replicad.writer import _Write
from tests.origin_proc import OriginProcess

EPOCH = "00" * 16


class FakeOrigin:
    """A transport answering ``POST .../batch`` like the origin: one version
    per request; ``gate`` (when set) holds each request until released;
    ``refuse`` picks a (status, code) answer for a body."""

    def __init__(self) -> None:
        self.bodies: list[dict[Any, Any]] = []
        self.version = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Semaphore(0)
        self.refuse: Callable[[dict[Any, Any]], tuple[int, str] | None] = lambda body: None
        self.raise_in_request: BaseException | None = None
        self.raise_on_key: tuple[bytes, BaseException] | None = None
        self.answer_override: dict[str, Any] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = msgpack.unpackb(request.content, raw=False)
        self.bodies.append(body)
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the request"
        if self.raise_in_request is not None:
            raise self.raise_in_request
        if self.raise_on_key is not None and self.raise_on_key[0] in body["upserts"]:
            raise self.raise_on_key[1]
        refusal = self.refuse(body)
        if refusal is not None:
            status, code = refusal
            doc = {"error": {"code": code, "message": f"refused: {code}"}}
            return httpx.Response(status, content=json.dumps(doc).encode())
        self.version += 1
        result = {"dataset": "d", "epoch": EPOCH, "version": self.version}
        return httpx.Response(200, json=self.answer_override or result)


@pytest.fixture
def fake() -> FakeOrigin:
    return FakeOrigin()


@pytest.fixture
def client(fake: FakeOrigin) -> Iterator[OriginClient]:
    with OriginClient("http://origin.test", transport=httpx.MockTransport(fake)) as c:
        yield c


def _in_threads(calls: Sequence[Callable[[], Any]]) -> tuple[list[Any], list[threading.Thread]]:
    """Start one thread per call; results[i] is its return value or exception."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return results, threads


def _wait_pending(writer: BatchingWriter, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(writer._pending) < n:
        assert time.monotonic() < deadline, f"{len(writer._pending)} of {n} writes queued"
        time.sleep(0.001)


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a writer thread hung"


def _behind_a_request(
    writer: BatchingWriter, fake: FakeOrigin, calls: Sequence[Callable[[], Any]]
) -> tuple[Any, list[Any]]:
    """Send one write and, while the origin holds its request, queue
    ``calls`` in order (a thread each); then let the origin answer. Returns the first
    write's result and the calls' results."""
    fake.gate = threading.Event()
    first, t0 = _in_threads([partial(writer.upsert, "first", {"v": 0})])
    assert fake.entered.acquire(timeout=10)
    results: list[Any] = []
    threads: list[threading.Thread] = []
    for i, call in enumerate(calls):  # one at a time: the queue is in this order
        result, started = _in_threads([call])
        results.append(result)
        threads += started
        _wait_pending(writer, i + 1)
    fake.gate.set()
    _join(t0 + threads)
    return first[0], [r[0] for r in results]


def test_a_lone_write_is_sent_at_once(client: OriginClient, fake: FakeOrigin) -> None:
    writer = client.writer("d")
    ack = writer.upsert("user:1", {"age": 3})
    assert ack == WriteAck("d", EPOCH, 1, 1)
    assert fake.bodies == [{"upserts": {b"user:1": {"age": 3}}, "deletes": []}]
    assert writer.delete(b"user:1") == WriteAck("d", EPOCH, 2, 1)
    assert fake.bodies[1] == {"upserts": {}, "deletes": [b"user:1"]}


def test_writes_arriving_during_a_request_share_the_next(
    client: OriginClient, fake: FakeOrigin
) -> None:
    writer = client.writer("d")
    calls = [partial(writer.upsert, f"k{i}", {"v": i}) for i in range(1, 9)]
    calls.append(partial(writer.delete, "gone"))
    first, rest = _behind_a_request(writer, fake, calls)
    assert first == WriteAck("d", EPOCH, 1, 1)
    assert rest == [WriteAck("d", EPOCH, 2, 9)] * 9
    assert len(fake.bodies) == 2 and writer.requests == 2
    assert fake.bodies[1]["upserts"] == {f"k{i}".encode(): {"v": i} for i in range(1, 9)}
    assert fake.bodies[1]["deletes"] == [b"gone"]


def test_a_key_written_twice_starts_the_next_batch_in_order(
    client: OriginClient, fake: FakeOrigin
) -> None:
    writer = BatchingWriter(client, "d", max_batch=100)
    # queued in this order: a=1, b=1, a=2, a deleted
    calls = [
        partial(writer.upsert, "a", {"v": 1}),
        partial(writer.upsert, "b", {"v": 1}),
        partial(writer.upsert, "a", {"v": 2}),
        partial(writer.delete, "a"),
    ]
    _, rest = _behind_a_request(writer, fake, calls)
    assert fake.bodies[1:] == [
        {"upserts": {b"a": {"v": 1}, b"b": {"v": 1}}, "deletes": []},
        {"upserts": {b"a": {"v": 2}}, "deletes": []},
        {"upserts": {}, "deletes": [b"a"]},
    ]
    assert [r.version for r in rest] == [2, 2, 3, 4]


def test_max_batch_bounds_a_request(client: OriginClient, fake: FakeOrigin) -> None:
    writer = BatchingWriter(client, "d", max_batch=3)
    calls = [partial(writer.upsert, f"k{i}", {"v": i}) for i in range(7)]
    _, results = _behind_a_request(writer, fake, calls)
    assert [len(b["upserts"]) for b in fake.bodies] == [1, 3, 3, 1]
    assert sorted(r.batched for r in results) == [1, 3, 3, 3, 3, 3, 3]


def test_a_refused_record_fails_alone(client: OriginClient, fake: FakeOrigin) -> None:
    """The origin refuses any batch holding key "bad" (400 schema_violation):
    the batch is split in halves down to the bad write; only it fails."""
    writer = client.writer("d")
    fake.refuse = lambda body: (400, "schema_violation") if b"bad" in body["upserts"] else None
    keys = ["g1", "bad", "g2", "g3"]
    _, results = _behind_a_request(
        writer, fake, [partial(writer.upsert, k, {"v": 1}) for k in keys]
    )
    by_key = dict(zip(keys, results, strict=True))
    assert isinstance(by_key["bad"], RecordError) and "schema_violation" in str(by_key["bad"])
    assert [by_key[k].batched for k in ("g1", "g2", "g3")] == [1, 2, 2]
    assert [list(b["upserts"]) for b in fake.bodies[1:]] == [
        [b"g1", b"bad", b"g2", b"g3"],
        [b"g1", b"bad"],
        [b"g1"],
        [b"bad"],
        [b"g2", b"g3"],
    ]
    assert writer.requests == 6


def test_an_origin_failing_during_a_split_stops_the_resending(
    client: OriginClient, fake: FakeOrigin
) -> None:
    """A refused batch of 8 is split; the origin then fails outright: the
    writes not yet answered all get that error and none is sent again."""
    writer = client.writer("d")
    answers = iter([(400, "schema_violation"), (503, "unavailable")])
    fake.refuse = lambda body: None if b"first" in body["upserts"] else next(answers)
    calls = [partial(writer.upsert, f"k{i}", {"v": i}) for i in range(8)]
    _, results = _behind_a_request(writer, fake, calls)
    assert all(isinstance(r, OriginUnavailableError) for r in results)
    assert [len(b["upserts"]) for b in fake.bodies] == [1, 8, 4]  # not 8 more
    assert writer.requests == 3


def test_an_unreadable_acknowledgement_is_not_resent(
    client: OriginClient, fake: FakeOrigin
) -> None:
    writer = client.writer("d")
    fake.answer_override = {"dataset": "d", "epoch": EPOCH, "version": None}
    with pytest.raises(ProtocolError, match="unreadable acknowledgement"):
        writer.upsert("a", {"v": 1})
    assert len(fake.bodies) == 1


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(401, "unauthorized", AuthError), (503, "unavailable", OriginUnavailableError)],
)
def test_an_error_of_the_whole_request_reaches_every_caller_unresent(
    client: OriginClient, fake: FakeOrigin, status: int, code: str, error: type[Exception]
) -> None:
    writer = client.writer("d")
    fake.refuse = lambda body: (status, code)
    calls = [partial(writer.upsert, f"k{i}", {"v": i}) for i in range(4)]
    first, results = _behind_a_request(writer, fake, calls)
    assert all(isinstance(r, error) for r in [first, *results])
    assert len({id(r) for r in results}) == len(results)  # each caller its own copy
    assert all(str(r) == str(first) for r in results)
    assert len(fake.bodies) == 2  # nothing resent


def test_an_interrupted_leader_settles_its_batch_and_hands_over(
    client: OriginClient, fake: FakeOrigin
) -> None:
    """A BaseException in the thread sending a batch (here raised by the
    transport) reaches that thread; the other writes of its batch fail as
    unknown outcomes instead of hanging, and the writer keeps working."""

    class Stop(BaseException):
        pass

    writer = client.writer("d")
    fake.gate = threading.Event()
    fake.raise_in_request = Stop()
    first, t0 = _in_threads([lambda: writer.upsert("first", {"v": 0})])
    assert fake.entered.acquire(timeout=10)
    fake.gate.set()
    _join(t0)
    assert isinstance(first[0], Stop)
    # a batch of followers whose leader is interrupted
    fake.gate = threading.Event()
    fake.raise_in_request = None
    _, t1 = _in_threads([lambda: writer.upsert("x", {"v": 0})])
    assert fake.entered.acquire(timeout=10)
    results, threads = _in_threads([partial(writer.upsert, f"k{i}", {"v": i}) for i in range(3)])
    _wait_pending(writer, 3)
    fake.raise_in_request = Stop()
    fake.gate.set()
    _join(t1 + threads)
    stops = [r for r in results if isinstance(r, Stop)]
    unknown = [r for r in results if isinstance(r, OriginUnavailableError)]
    assert len(stops) == 1 and len(unknown) == 2
    assert "may or may not have been committed" in str(unknown[0])
    fake.gate, fake.raise_in_request = None, None
    assert writer.upsert("after", {"v": 1}).batched == 1


def test_a_leader_interrupted_before_its_own_turn_withdraws_its_write(
    client: OriginClient, fake: FakeOrigin
) -> None:
    """Batches of one. Another caller's write "c" waits in the queue (its
    thread asleep) when this thread arrives with "b" and leads: it sends
    "c" first, and that request is interrupted. "c" ends as an unknown
    outcome; "b" was never sent, so it is taken out of the queue -- not
    sent with some later write after its caller saw the exception."""

    class Stop(BaseException):
        pass

    writer = BatchingWriter(client, "d", max_batch=1)
    waiting = _Write(b"c", {"v": 1}, False)
    writer._pending.append(waiting)  # as if its caller were asleep in wait()
    fake.raise_on_key = (b"c", Stop())
    with pytest.raises(Stop):
        writer.upsert("b", {"v": 1})
    assert waiting.done and isinstance(waiting.error, OriginUnavailableError)
    assert "may or may not have been committed" in str(waiting.error)
    assert writer._pending == [] and not writer._sending
    fake.raise_on_key = None
    assert writer.upsert("later", {"v": 2}).batched == 1
    assert [list(b["upserts"]) for b in fake.bodies] == [[b"c"], [b"later"]]


def test_the_client_hands_out_one_writer_per_dataset(client: OriginClient) -> None:
    assert client.writer("d") is client.writer("d")
    assert client.writer("e") is not client.writer("d")
    assert client.writer("d").max_batch == 1000
    with pytest.raises(ConfigError, match="max_batch 1000, not 5"):
        client.writer("d", max_batch=5)
    assert client.writer("f", max_batch=5).max_batch == 5


def test_bad_arguments(client: OriginClient) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        BatchingWriter(client, "d", max_batch=0)
    with pytest.raises(BadRequestError, match="key must be str or bytes"):
        client.writer("d").upsert(7, {"v": 1})  # type: ignore[arg-type]


# ---------------------------------------------------------------- real origin

SCHEMA = {"fields": [{"name": "n", "type": "int"}, {"name": "who", "type": "str"}]}


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    with OriginProcess(tmp_path / "origin") as proc:
        yield proc


def test_many_threads_against_a_real_origin(origin: OriginProcess) -> None:
    """12 threads write 40 records each, every thread rewriting its own keys
    in order; one write breaks the schema. Every other write is acknowledged
    at a version that holds it, the dataset ends with each key's last value,
    and the writes shared requests."""
    threads_n, per_thread = 12, 40
    with OriginClient(origin.base_url) as client:
        client.create_dataset("d", SCHEMA)
        writer = client.writer("d", max_batch=64)

        def work(t: int) -> list[WriteAck | BaseException]:
            out: list[WriteAck | BaseException] = []
            for i in range(per_thread):
                record: dict[str, Any] = {"n": i, "who": f"t{t}"}
                if t == 3 and i == 17:
                    record = {"n": "not an int", "who": "t3"}
                try:
                    out.append(writer.upsert(f"t{t}:k{i % 5}", record))
                except RecordError as exc:
                    out.append(exc)
            return out

        results, threads = _in_threads([partial(work, t) for t in range(threads_n)])
        _join(threads)
        failures = [r for res in results for r in res if not isinstance(r, WriteAck)]
        assert len(failures) == 1 and isinstance(failures[0], RecordError)
        acks = [r for res in results for r in res if isinstance(r, WriteAck)]
        assert len(acks) == threads_n * per_thread - 1
        for res in results:  # each thread's acks in increasing versions
            versions = [r.version for r in res if isinstance(r, WriteAck)]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert writer.requests < threads_n * per_thread  # coalesced
        assert max(a.batched for a in acks) > 1
        for t in range(threads_n):
            for k in range(5):
                last = max(i for i in range(per_thread) if i % 5 == k)
                got = client.get("d", f"t{t}:k{k}")
                assert got is not None and got["record"] == {"n": last, "who": f"t{t}"}
        info = client.dataset("d")
        assert info["records"] == threads_n * 5
        assert info["version"] == max(a.version for a in acks)
