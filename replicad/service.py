"""The origin service: the store behind a group committer, push hints, the
fleet view and metrics. Trio; the HTTP layer (:mod:`replicad.http_app`) is a
thin translation on top of it.

Theory of operation
-------------------
* **Group commit.** :meth:`OriginService.write` queues its batch and waits.
  One committer task takes every batch waiting (up to ``group_commit_max``)
  and commits them in one LMDB transaction in a worker thread: one fsync for
  the whole group. Each batch is still its own version, and each caller gets
  its own result or error. A write returns only after its commit is durable.
* **Hints.** After each commit the new cursor of every dataset written is
  published to the subscribers of :meth:`OriginService.subscribe`. A slow
  subscriber never blocks the committer: per subscriber only the newest hint
  per dataset is kept (hints are lossy by design; pulls are what make
  replicas correct).
* **Reads** (record reads, sync answers) run in worker threads over
  :meth:`OriginStore.view`, which is consistent at one version. Merkle node
  answers are computed under the store's state lock (the tree is shared and
  updated in place by commits).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio

from replicad.codec import DatasetCodec
from replicad.errors import ReplicadError
from replicad.hub import Fleet, HintHub
from replicad.messages import (
    Cursor,
    DiffPush,
    DiffRequest,
    Hint,
    MerkleLeavesRequest,
    MerkleNodesRequest,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.metrics import Registry
from replicad.origin_types import (
    DatasetInfo,
    DatasetSpec,
    EncodingBasis,
    FleetEntry,
    WriteBatch,
    WriteResult,
)
from replicad.responder import ResponderConfig
from replicad.schema import Schema
from replicad.store import OriginStore

SyncRequest = DiffRequest | SnapshotRequest | MerkleNodesRequest | MerkleLeavesRequest


@dataclass
class _Pending:
    batch: WriteBatch
    done: trio.Event = field(default_factory=trio.Event)
    result: WriteResult | ReplicadError | None = None


class OriginService:
    """Owns the store while running. Start :meth:`run` in a nursery with
    ``await nursery.start(service.run)``; call :meth:`close` after it ends."""

    def __init__(
        self,
        store: OriginStore,
        *,
        group_commit_max: int = 256,
        responder: ResponderConfig | None = None,
        clock: Callable[[], float] = time.time,
        max_pending: int = 4096,
    ) -> None:
        self.store = store
        self.group_commit_max = group_commit_max
        self.responder = responder or ResponderConfig()
        self.clock = clock
        self._send, self._receive = trio.open_memory_channel[_Pending](max_pending)
        self._hints = HintHub()
        self._fleet = Fleet(clock)
        self.registry = Registry()
        r = self.registry
        self._m_batches = r.counter(
            "replicad_write_batches_total", "Write batches by outcome.", ["outcome"]
        )
        self._m_records = r.counter(
            "replicad_records_written_total", "Records upserted or deleted.", ["op"]
        )
        self._m_group = r.histogram(
            "replicad_commit_group_batches",
            "Batches per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self._m_commit = r.histogram("replicad_commit_seconds", "Group commit duration.")
        self._m_sync = r.counter("replicad_sync_requests_total", "Sync requests by kind.", ["kind"])
        self._m_hints = r.counter("replicad_hints_published_total", "Hints published.")
        r.gauge(
            "replicad_hint_subscribers",
            "Open hint streams.",
            collect=lambda: [((), len(self._hints))],
        )
        r.gauge("replicad_dataset_version", "Current version.", ["dataset"], collect=self._versions)
        r.gauge(
            "replicad_dataset_records", "Records held.", ["dataset"], collect=self._record_counts
        )
        r.gauge(
            "replicad_fleet_replicas", "Replicas seen.", collect=lambda: [((), len(self._fleet))]
        )

    def _versions(self) -> list[tuple[tuple[str, ...], float]]:
        return [((i.name,), float(i.cursor.version)) for i in self.store.infos()]

    def _record_counts(self) -> list[tuple[tuple[str, ...], float]]:
        return [((i.name,), float(i.digest.count)) for i in self.store.infos()]

    # ------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group committer. Runs until cancelled."""
        task_status.started()
        async with self._receive:
            while True:
                group = [await self._receive.receive()]
                while len(group) < self.group_commit_max:
                    try:
                        group.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._commit(group)

    async def _commit(self, group: list[_Pending]) -> None:
        start = time.perf_counter()
        results = await trio.to_thread.run_sync(self.store.commit, [p.batch for p in group])
        self._m_commit.observe(time.perf_counter() - start)
        self._m_group.observe(len(group))
        written: dict[str, WriteResult] = {}
        pushes: dict[str, DiffPush | None] = {}
        for pending, result in zip(group, results, strict=True):
            pending.result = result
            if isinstance(result, WriteResult):
                if result.dataset in written:
                    # the group's batches of one dataset, merged in commit
                    # order; none as soon as one has none (too large)
                    so_far = pushes[result.dataset]
                    pushes[result.dataset] = (
                        so_far.follow(result.push, self.store.push_max_bytes)
                        if so_far is not None and result.push is not None
                        else None
                    )
                else:
                    pushes[result.dataset] = result.push
                written[result.dataset] = result
                self._m_batches.inc(1, "committed")
                self._m_records.inc(result.upserted, "upsert")
                self._m_records.inc(result.deleted, "delete")
            else:
                self._m_batches.inc(1, "rejected")
            pending.done.set()
        for name, result in written.items():
            push = pushes.get(name)
            self._publish(push or Hint(result.dataset, result.cursor, result.digest))

    def _publish(self, event: Hint | DiffPush) -> None:
        self._m_hints.inc()
        self._hints.publish(event)

    def close(self) -> None:
        """Close the store (saving the Merkle trees for a fast restart)."""
        self.store.close()

    # ------------------------------------------------------------ datasets

    def datasets(self) -> list[DatasetInfo]:
        return self.store.infos()

    def dataset(self, name: str) -> DatasetInfo:
        return self.store.info(name)

    def codec(self, name: str) -> DatasetCodec:
        return self.store.codec(name)

    def encoding_basis(self, name: str) -> EncodingBasis:
        return self.store.encoding_basis(name)

    async def create_dataset(self, spec: DatasetSpec) -> DatasetInfo:
        info = await trio.to_thread.run_sync(self.store.create_dataset, spec)
        self._publish(Hint(info.name, info.cursor, info.digest))
        return info

    async def evolve_schema(self, name: str, schema: Schema) -> DatasetInfo:
        return await trio.to_thread.run_sync(self.store.evolve_schema, name, schema)

    async def reset_history(self, name: str) -> DatasetInfo:
        info = await trio.to_thread.run_sync(self.store.reset_history, name)
        self._publish(Hint(info.name, info.cursor, info.digest))
        return info

    # ------------------------------------------------------------ writes

    async def write(self, batch: WriteBatch) -> WriteResult:
        """Commit ``batch`` as one version (group-committed, durable on
        return). Raises the error that rejected it."""
        self.store.check(batch.dataset)  # UnknownDatasetError before queueing
        pending = _Pending(batch)
        await self._send.send(pending)
        await pending.done.wait()
        if isinstance(pending.result, ReplicadError):
            raise pending.result
        assert pending.result is not None
        return pending.result

    # ------------------------------------------------------------ reads

    async def get(self, name: str, key: bytes) -> tuple[bytes | None, Cursor]:
        return await trio.to_thread.run_sync(self.store.get, name, key)

    async def sync(self, request: SyncRequest) -> Response:
        """Answer one sync request from a consistent view."""
        self._m_sync.inc(1, type(request).__name__)
        self.store.check(request.dataset)
        return await trio.to_thread.run_sync(self.store.answer, request, self.responder)

    async def snapshot_stream(
        self, request: SnapshotRequest
    ) -> AsyncGenerator[SnapshotChunk, None]:
        """Every chunk from ``request.after`` to the end, read in one read
        transaction (one version), one worker-thread hop per chunk."""
        self._m_sync.inc(1, "SnapshotStream")
        self.store.check(request.dataset)
        chunks = self.store.stream(request, self.responder)
        try:
            while True:
                chunk = await trio.to_thread.run_sync(next, chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            chunks.close()

    # ------------------------------------------------------------ hints

    def subscribe(
        self, datasets: Collection[str] | None, *, diffs: bool = False
    ) -> AbstractAsyncContextManager[AsyncIterator[Hint | DiffPush]]:
        """``async with service.subscribe(names) as hints: async for hint in
        hints`` -- first the current cursor of each dataset, then every new
        one (coalesced per dataset for a slow reader); with ``diffs``, a new
        version comes as a DiffPush carrying its records when they fit the
        store's push limit. UnknownDatasetError for an unknown name."""
        names = None if datasets is None else frozenset(datasets)
        for name in names or ():
            self.store.check(name)
        return self._hints.subscribe(
            names,
            lambda: [Hint(i.name, i.cursor, i.digest) for i in self.store.infos()],
            diffs=diffs,
        )

    # ------------------------------------------------------------ fleet

    def ack(
        self,
        replica: str,
        address: str,
        datasets: Mapping[str, Cursor],
        info: Mapping[str, Any],
    ) -> None:
        self._fleet.ack(replica, address, datasets, info)

    def fleet(self) -> list[FleetEntry]:
        return self._fleet.entries()

    def lag(self, cursor: Cursor, name: str) -> int | None:
        """Origin version minus the replica's (None: other epoch or unknown)."""
        try:
            current = self.store.info(name).cursor
        except ReplicadError:
            return None
        if current.epoch != cursor.epoch:
            return None
        return max(0, current.version - cursor.version)
