"""The sidecar's sync loop under trio, against the real origin service in
the same process (group commit, hints), with the real LMDB mirror."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from replicad.errors import OriginUnavailableError, StorageError
from replicad.loopback import LoopbackDriver
from replicad.merkle import entry_hash
from replicad.messages import (
    Cursor,
    DiffPush,
    Hint,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.replica import ReplicaSync, SyncConfig
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType, Schema
from replicad.service import OriginService
from replicad.store import OriginStore
from sidecar.agent import LARGE_BATCH, Agent, AgentSettings
from sidecar.mirror import INDEX_STEP, Mirror
from sidecar.reader import Reader


class ServiceTransport:
    """The origin service called directly; ``hints_on`` cuts the hint
    stream (it then fails every reconnect) to test the safety poll."""

    def __init__(self, service: OriginService) -> None:
        self.service = service
        self.hints_on = True
        self.push_on = True
        self.acks: list[tuple[str, dict[str, Cursor]]] = []
        self.requests = 0

    async def request(self, req: Request) -> Response:
        self.requests += 1
        return await self.service.sync(req)

    async def snapshot_stream(self, req: SnapshotRequest) -> AsyncGenerator[SnapshotChunk, None]:
        self.requests += 1
        async with contextlib.aclosing(self.service.snapshot_stream(req)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def hints(
        self, datasets: Collection[str] | None = None, *, diffs: bool = False
    ) -> AsyncGenerator[Hint | DiffPush, None]:
        if not self.hints_on:
            raise OriginUnavailableError("hints are cut")
        async with self.service.subscribe(datasets, diffs=diffs and self.push_on) as hints:
            async for hint in hints:
                if not self.hints_on:
                    raise OriginUnavailableError("hints are cut")
                yield hint

    async def ack(
        self, replica: str, datasets: Mapping[str, Cursor], info: Mapping[str, Any] | None = None
    ) -> None:
        self.acks.append((replica, dict(datasets)))


async def serve_up(
    nursery: trio.Nursery, service: OriginService, n: int, key: bytes = b"u%04d"
) -> None:
    """Start the origin service with dataset "up" holding ``n`` seed-like
    records (keys ``key % i``)."""
    await nursery.start(service.run)
    await service.create_dataset(DatasetSpec("up", seed_like_schema()))
    await service.write(WriteBatch("up", {key % i: seed_like_record(i) for i in range(n)}))


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def records(store: OriginStore) -> dict[bytes, bytes]:
    with store.view("up") as view:
        return dict(view.scan(None, 10**9)[0])


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "origin", tmp_path / "mirror"


async def test_the_agent_bootstraps_follows_hints_and_acks(paths: tuple[Path, Path]) -> None:
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False)
    transport = ServiceTransport(service)
    settings = AgentSettings(
        datasets=("up",),
        replica_id="test-1",
        sync=SyncConfig(poll_interval=60.0, snapshot_chunk=100),
        ack_interval=0.05,
    )
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 500, b"u%04d")
        agent = Agent(mirror, transport, settings, rng=random.Random(1))
        await nursery.start(agent.run)
        await wait_until(agent.ready)
        assert mirror.items("up") == records(store)
        # writes propagate through hints, long before the 60 s safety poll
        for i in range(20):
            await service.write(WriteBatch("up", {b"u%04d" % i: seed_like_record(1000 + i)}))
        await service.write(WriteBatch("up", {}, [b"u0499"]))
        await wait_until(lambda: mirror.cursor("up") == store.info("up").cursor, timeout=5)
        assert mirror.items("up") == records(store)
        await wait_until(
            lambda: any(c.get("up") == store.info("up").cursor for _, c in transport.acks)
        )
        status = agent.status()["up"]
        assert status["lag"] == 0 and status["ready"] and status["syncs"]["snapshot"] == 1
        # the leaf index the snapshot load skipped is built in the background
        await wait_until(lambda: agent.status()["up"]["leaf_index_complete"])
        geometry = mirror._state("up").live.tree.geometry
        with mirror.read() as txn:
            rows = {bytes(k): bytes(v) for k, v in txn.cursor(db=mirror._state("up").live.leaves)}
        assert rows == {
            geometry.leaf_of(k).to_bytes(4, "big") + k: entry_hash(k, v).to_bytes(16, "big")
            for k, v in records(store).items()
        }
        text = agent.registry.render()
        assert 'sidecar_lag_versions{dataset="up"} 0' in text
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()


@pytest.mark.parametrize("push", [True, False])
async def test_small_versions_arrive_pushed_without_a_request(
    paths: tuple[Path, Path], push: bool
) -> None:
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False)
    transport = ServiceTransport(service)
    transport.push_on = push
    settings = AgentSettings(
        datasets=("up",), replica_id="p", sync=SyncConfig(poll_interval=60.0), ack_interval=60
    )
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 50, b"u%04d")
        agent = Agent(mirror, transport, settings, rng=random.Random(1))
        await nursery.start(agent.run)
        await wait_until(agent.ready)
        requests = transport.requests
        for i in range(30):
            record = seed_like_record(2000 + i)
            if i % 10 == 0:
                record["city"] = f"New City {i}"  # grows the dictionary: the push carries it
            result = await service.write(
                WriteBatch("up", {b"u%04d" % i: record}, [b"u%04d" % (49 - i)])
            )
            await wait_until(lambda r=result: mirror.cursor("up") == r.cursor, timeout=5)
        assert mirror.items("up") == records(store)
        syncs = agent.status()["up"]["syncs"]
        if push:
            assert transport.requests == requests  # every version came pushed
            assert syncs["push"] == 30
        else:
            assert transport.requests >= requests + 30 and "push" not in syncs
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()


async def test_large_batches_apply_in_the_lowered_thread_small_ones_do_not(
    paths: tuple[Path, Path],
) -> None:
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False)
    settings = AgentSettings(
        datasets=("up",),
        replica_id="n",
        sync=SyncConfig(poll_interval=60.0, snapshot_chunk=LARGE_BATCH),
        apply_nice=5,
    )
    applied: list[tuple[int, str, int]] = []
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 2 * LARGE_BATCH, b"u%05d")
        agent = Agent(mirror, ServiceTransport(service), settings, rng=random.Random(1))
        handle = agent.datasets["up"].handle
        apply = handle.apply

        def spy(batch: Any) -> bool:
            nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            applied.append((len(batch.upserts), threading.current_thread().name, nice))
            return apply(batch)

        handle.apply = spy  # type: ignore[method-assign]
        await nursery.start(agent.run)
        await wait_until(agent.ready)
        result = await service.write(WriteBatch("up", {b"u00001": seed_like_record(7)}))
        await wait_until(lambda: mirror.cursor("up") == result.cursor, timeout=5)
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    large = [(name, nice) for n, name, nice in applied if n >= LARGE_BATCH]
    small = [(name, nice) for n, name, nice in applied if n < LARGE_BATCH]
    assert len(large) >= 2 and small
    assert {name for name, _ in large} == {"sidecar-apply"}
    assert "sidecar-apply" not in {name for name, _ in small}
    if sys.platform.startswith("linux"):
        assert {nice for _, nice in large} == {min(19, base + 5)}
        assert {nice for _, nice in small} == {base}


async def test_lost_hints_are_covered_by_the_safety_poll(paths: tuple[Path, Path]) -> None:
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False)
    transport = ServiceTransport(service)
    settings = AgentSettings(
        datasets=("up",),
        replica_id="test-2",
        sync=SyncConfig(poll_interval=0.3),
        hint_backoff_base=0.05,
        hint_backoff_max=0.1,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.create_dataset(DatasetSpec("up", seed_like_schema()))
        agent = Agent(mirror, transport, settings, rng=random.Random(2))
        await nursery.start(agent.run)
        await wait_until(agent.ready)
        transport.hints_on = False
        result = await service.write(WriteBatch("up", {b"late": seed_like_record(1)}))
        await wait_until(lambda: mirror.cursor("up") == result.cursor, timeout=5)
        assert mirror.items("up") == records(store)
        assert agent.metrics.hint_reconnects.value() >= 2
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()


async def test_restart_resumes_from_the_mirror_and_repairs_an_epoch_change(
    paths: tuple[Path, Path],
) -> None:
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    settings = AgentSettings(
        datasets=("up",), replica_id="test-3", sync=SyncConfig(poll_interval=0.2)
    )
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 300, b"u%04d")
        mirror = Mirror(paths[1], durable=False)
        transport = ServiceTransport(service)
        async with trio.open_nursery() as inner:
            agent = Agent(mirror, transport, settings, rng=random.Random(3))
            await inner.start(agent.run)
            await wait_until(agent.ready)
            inner.cancel_scope.cancel()
        mirror.close()
        # while the sidecar is down: the origin loses its history and changes
        await service.reset_history("up")
        await service.write(WriteBatch("up", {b"u0001": seed_like_record(99)}))
        mirror = Mirror(paths[1], durable=False)
        transport = ServiceTransport(service)
        agent = Agent(mirror, transport, settings, rng=random.Random(4))
        await nursery.start(agent.run)
        await wait_until(lambda: mirror.cursor("up") == store.info("up").cursor, timeout=5)
        ds = agent.datasets["up"].sync
        # one Merkle repair, no reload (later safety polls may add empty diffs)
        assert ds.stats.syncs["merkle"] == 1 and "snapshot" not in ds.stats.syncs
        assert ds.stats.records_applied == 1
        assert mirror.items("up") == records(store)
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()


async def test_a_repair_first_completes_an_unfinished_leaf_index_in_the_apply_thread(
    paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror whose snapshot load left its leaf index unbuilt (the process
    stopped before the background build), restarted after the origin lost
    its history: the Merkle repair needs leaf listings, and the loop builds
    the rest of the index first, in the apply thread, not in trio's."""
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    built_in: list[str] = []
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 10_000, b"u%05d")
        mirror = Mirror(paths[1], durable=False)
        handle = mirror.ensure("up")
        loader = ReplicaSync("up", state=handle.state(), local=handle, rng=random.Random(1), now=0)
        LoopbackDriver(loader, handle, store).run(0.0)  # a snapshot load, no index build
        assert mirror.items("up") == records(store) and not mirror.index_complete("up")
        await service.reset_history("up")
        await service.write(WriteBatch("up", {b"u00001": seed_like_record(99)}))

        step = mirror.index_step

        def recorded(name: str, limit: int = INDEX_STEP) -> bool:
            built_in.append(threading.current_thread().name)
            if len(built_in) == 2:  # a full disk, once: that sync fails and is retried
                raise StorageError("injected: the disk is full")
            return step(name, limit)

        monkeypatch.setattr(mirror, "index_step", recorded)
        settings = AgentSettings(
            datasets=("up",), replica_id="test-idx", sync=SyncConfig(poll_interval=0.2)
        )
        agent = Agent(mirror, ServiceTransport(service), settings, rng=random.Random(4))
        monkeypatch.setattr(agent, "_build_indexes", trio.sleep_forever)  # the repair alone
        await nursery.start(agent.run)
        await wait_until(lambda: mirror.cursor("up") == store.info("up").cursor, timeout=10)
        ds = agent.datasets["up"].sync
        assert ds.stats.syncs["merkle"] == 1 and "snapshot" not in ds.stats.syncs
        assert ds.stats.records_applied == 1 and ds.stats.failures >= 1
        assert mirror.index_complete("up") and mirror.items("up") == records(store)
        assert len(built_in) >= 3 and set(built_in) == {"sidecar-apply"}
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()


@contextlib.asynccontextmanager
async def origin_with_500_records(
    paths: tuple[Path, Path], replica_id: str, **settings: Any
) -> AsyncIterator[tuple[OriginStore, OriginService, Mirror, AgentSettings, trio.Nursery]]:
    """A running origin service holding 500 records and an empty mirror;
    the agent settings pull snapshots in chunks of 100."""
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False)
    agent_settings = AgentSettings(
        datasets=("up",), replica_id=replica_id, sync=SyncConfig(snapshot_chunk=100), **settings
    )
    try:
        async with trio.open_nursery() as nursery:
            await serve_up(nursery, service, 500, b"u%04d")
            yield store, service, mirror, agent_settings, nursery
            nursery.cancel_scope.cancel()
    finally:
        mirror.close()
        store.close()


class SlowStream(ServiceTransport):
    async def snapshot_stream(self, req: SnapshotRequest) -> AsyncGenerator[SnapshotChunk, None]:
        async with contextlib.aclosing(super().snapshot_stream(req)) as chunks:
            async for chunk in chunks:
                await trio.sleep(0.2)
                yield chunk


async def test_a_long_snapshot_stream_is_timed_per_chunk(paths: tuple[Path, Path]) -> None:
    # the whole stream takes ~1 s; each chunk 0.2 s
    async with origin_with_500_records(paths, "slow", request_timeout=0.5) as (
        store, service, mirror, settings, nursery,
    ):  # fmt: skip
        agent = Agent(mirror, SlowStream(service), settings, rng=random.Random(5))
        await nursery.start(agent.run)
        await wait_until(agent.ready, timeout=10)
        assert agent.datasets["up"].sync.stats.failures == 0
        assert mirror.items("up") == records(store)


class CountingStream(ServiceTransport):
    """Counts the chunks the agent has taken from the stream; fails the first
    stream after ``fail_after`` chunks."""

    def __init__(self, service: OriginService, fail_after: int | None = None) -> None:
        super().__init__(service)
        self.taken = 0
        self.fail_after = fail_after

    async def snapshot_stream(self, req: SnapshotRequest) -> AsyncGenerator[SnapshotChunk, None]:
        async with contextlib.aclosing(super().snapshot_stream(req)) as chunks:
            sent = 0
            async for chunk in chunks:
                if self.fail_after is not None and sent == self.fail_after:
                    self.fail_after = None
                    raise OriginUnavailableError("the stream broke")
                self.taken += 1
                sent += 1
                yield chunk


async def test_the_next_chunk_is_fetched_while_one_is_applied(paths: tuple[Path, Path]) -> None:
    """The first chunk's apply (in its worker thread) waits until the agent
    has taken the second chunk from the stream: it would wait forever (and
    fail) if receiving and applying strictly alternated."""
    async with origin_with_500_records(paths, "overlap") as (
        store, service, mirror, settings, nursery,
    ):  # fmt: skip
        transport = CountingStream(service)
        agent = Agent(mirror, transport, settings, rng=random.Random(6))
        handle = agent.datasets["up"].handle
        overlapped: list[bool] = []
        real_apply = handle.apply

        def slow_apply(batch: Any) -> bool:
            if batch.upserts and not overlapped:
                deadline = time.monotonic() + 5
                while transport.taken < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                overlapped.append(transport.taken >= 2)
            return real_apply(batch)

        handle.apply = slow_apply  # type: ignore[method-assign]
        await nursery.start(agent.run)
        await wait_until(agent.ready, timeout=15)
        assert overlapped == [True]
        assert mirror.items("up") == records(store)


async def test_a_stream_that_breaks_mid_bootstrap_is_resumed(paths: tuple[Path, Path]) -> None:
    """An error raised by the stream while a chunk is being applied surfaces
    as that error (a failed request, not a crash of the agent) and the
    bootstrap resumes after the chunks already staged."""
    async with origin_with_500_records(paths, "broken") as (
        store, service, mirror, settings, nursery,
    ):  # fmt: skip
        transport = CountingStream(service, fail_after=3)
        agent = Agent(mirror, transport, settings, rng=random.Random(7))
        await nursery.start(agent.run)
        await wait_until(agent.ready, timeout=15)
        stats = agent.datasets["up"].sync.stats
        assert stats.failures == 1
        assert stats.records_applied == 500  # nothing staged twice
        assert mirror.items("up") == records(store)


async def test_json_views_are_built_in_the_background_and_a_failing_one_waits_its_turn(
    paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent builds each dataset's JSON view after its bootstrap; a view
    whose build fails (a storage error) is tried again later while the
    others are built; a schema change empties a view, and it is built again
    within ``JSON_VIEW_CHECK``."""
    import sidecar.agent

    monkeypatch.setattr(sidecar.agent, "INDEX_RETRY", 0.01)
    store = OriginStore(paths[0], durable=False)
    service = OriginService(store)
    mirror = Mirror(paths[1], durable=False, json_views=["up", "up2"])
    real_step = mirror.json_step
    failures = 0

    def json_step(name: str, limit: int = 1024) -> bool:
        # "up" fails until "up2" is built, and "up2" builds only once "up"
        # failed: the loop must go on to the others after a failure
        nonlocal failures
        if name == "up" and mirror.json_view_state("up2") != "built":
            failures += 1
            raise StorageError("a disk error, for the test")
        if name == "up2" and not failures:
            raise StorageError("not yet, for the test")
        return real_step(name, limit)

    monkeypatch.setattr(mirror, "json_step", json_step)
    settings = AgentSettings(
        datasets=("up", "up2"),
        replica_id="test-json",
        sync=SyncConfig(poll_interval=60.0, snapshot_chunk=100),
    )
    async with trio.open_nursery() as nursery:
        await serve_up(nursery, service, 300)
        await service.create_dataset(DatasetSpec("up2", seed_like_schema()))
        await service.write(WriteBatch("up2", {b"k%d" % i: seed_like_record(i) for i in range(50)}))
        agent = Agent(mirror, ServiceTransport(service), settings)
        await nursery.start(agent.run)
        await wait_until(agent.ready)  # bootstrapped: the views are to be built
        await wait_until(lambda: all(s["json_view"] == "built" for s in agent.status().values()))
        assert failures >= 1  # "up" failed while "up2" was built
        old = seed_like_schema()
        evolved = Schema(2, (*old.fields, Field("extra", FieldType.INT, nullable=True)))
        await trio.to_thread.run_sync(store.evolve_schema, "up", evolved)
        await service.write(WriteBatch("up", {b"u0001": {**seed_like_record(1), "extra": 5}}))
        await wait_until(lambda: mirror.cursor("up") == store.info("up").cursor)
        await wait_until(lambda: agent.status()["up"]["json_view"] == "built", timeout=5)
        reader = Reader.over(mirror)
        with reader.snapshot() as snap:
            fetch = snap.json_fetcher("up")
            assert fetch is not None
            row = fetch(b"u0002")
            assert row is not None and row.endswith(b',"extra":null}\r\n')
        nursery.cancel_scope.cancel()
    mirror.close()
    store.close()
