"""The sidecar's sync loop: the replica state machine driven by trio.

Theory of operation
-------------------
One :class:`DatasetSync` task per dataset runs the cycle of
:mod:`replicad.replica`: ask the machine for its next action, perform it
(a request through the transport, an Apply in a worker thread against the
LMDB mirror), feed the result back, and sleep until the machine's deadline
or a hint. A single hint task follows the origin's hint stream for every
dataset and reconnects with backoff and jitter when it breaks; hints only
wake the per-dataset tasks, which coalesce any burst into one pull. An ack
task reports the cursors to the origin for its fleet view. An index task
builds the Merkle leaf index a snapshot load leaves incomplete
(:meth:`sidecar.mirror.Mirror.index_step`), a few thousand records per
write transaction in the apply thread, after the dataset is ready.

Time is ``trio.current_time()`` (monotonic), so tests can run the loop under
``trio.testing.MockClock``. The transport is a parameter
(:class:`SyncTransport`): :class:`replicad.client.AsyncSyncClient` over HTTP,
or anything that answers the same calls (tests plug the origin store in).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from replicad.errors import ProtocolError, ReplicadError, StorageError
from replicad.messages import (
    Cursor,
    DiffPush,
    Hint,
    MerkleLeavesRequest,
    MerkleNodesRequest,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.metrics import Registry
from replicad.progress import Progress
from replicad.replica import Apply, ReplicaSync, Send, SyncConfig, Target, Wait
from sidecar.apply_thread import ApplyThread
from sidecar.mirror import DatasetHandle, Mirror

log = logging.getLogger("sidecar.agent")


class SyncTransport(Protocol):
    """What the sync loop needs from the origin (or a relay)."""

    async def request(self, req: Request) -> Response: ...

    def snapshot_stream(self, req: SnapshotRequest) -> AsyncIterator[SnapshotChunk]: ...

    def hints(
        self, datasets: Collection[str] | None = None, *, diffs: bool = False
    ) -> AsyncIterator[Hint | DiffPush]: ...

    async def ack(
        self, replica: str, datasets: Mapping[str, Cursor], info: Mapping[str, Any] | None = None
    ) -> None: ...


INDEX_RETRY = 5.0
"""Seconds before a background build (leaf index, JSON view) tries again
after a storage error."""
JSON_VIEW_CHECK = 1.0
"""Seconds between looks for a JSON view a diff emptied (a definition
change); a snapshot load wakes the builder at once."""
LARGE_BATCH = 1_000
"""Batches of at least this many records are applied in the lowered apply
thread; smaller ones (pushed versions, most diffs) at full priority, so that
propagation does not wait behind a busy host."""


@dataclass(frozen=True)
class AgentSettings:
    """Loop settings (the CLI builds them from TOML, environment and flags)."""

    datasets: tuple[str, ...]
    replica_id: str
    sync: SyncConfig = field(default_factory=SyncConfig)
    request_timeout: float = 60.0
    ack_interval: float = 10.0
    hint_backoff_base: float = 0.1
    hint_backoff_max: float = 10.0
    max_staleness: float = 30.0
    """Ready only while every dataset synced within this many seconds."""
    hints: bool = True
    """Follow the origin's hint stream (off: the safety poll alone)."""
    push: bool = True
    """Ask the hint stream for pushed diffs (small versions arrive with their
    records: applied without a request)."""
    apply_nice: int = 10
    """How much lower than the rest of the process the thread applying large
    batches (:data:`LARGE_BATCH` records or more: snapshot chunks, big diffs)
    runs (its nice value is raised by this; 0: the same priority), so the
    socket's worker processes get a core first (:mod:`sidecar.apply_thread`)."""


class BootstrapProgress:
    """Reports a snapshot load: a progress bar when stderr is a terminal,
    otherwise a log line every ``interval`` seconds."""

    def __init__(self, name: str, *, interval: float = 5.0) -> None:
        self.name = name
        self.total: int | None = None
        self.interval = interval
        self._count = 0
        self._bar: Progress | None = None
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def staged(self, n: int, *, reset: bool, done: bool) -> None:
        if reset:
            self._count = 0
            self._last = time.monotonic()
            if self._tty:
                self._bar = Progress(self.total, label=f"bootstrap {self.name}", unit="records")
        self._count += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.update(self._count)
        elif time.monotonic() - self._last >= self.interval or done:
            self._last = time.monotonic()
            log.info(
                "bootstrap progress",
                extra={"dataset": self.name, "staged": self._count, "total": self.total},
            )
        if done and self._bar is not None:
            self._bar.close()
            self._bar = None


class DatasetSync:
    """Drives one dataset's :class:`ReplicaSync` against the transport."""

    def __init__(
        self,
        handle: DatasetHandle,
        transport: SyncTransport,
        settings: AgentSettings,
        rng: random.Random,
        metrics: AgentMetrics,
        *,
        apply_thread: ApplyThread | None = None,
    ) -> None:
        self.handle = handle
        self.apply_thread = apply_thread
        self.name = handle.name
        self.transport = transport
        self.settings = settings
        self.metrics = metrics
        self.sync = ReplicaSync(
            handle.name,
            state=handle.state(),
            local=handle,
            rng=rng,
            now=trio.current_time(),
            config=settings.sync,
        )
        self._wake = trio.Event()
        self._bootstrap = BootstrapProgress(handle.name)
        self.bytes_pulled = 0
        self.on_applied: Callable[[str], None] | None = None
        """Called (in trio) after a batch that changed what readers see."""
        self.on_promoted: Callable[[], None] | None = None
        """Called (in trio) after a snapshot load was promoted to live."""

    def hint(self, hint: Hint | DiffPush) -> None:
        if isinstance(hint, DiffPush):
            self.sync.pushed(hint, trio.current_time())
        else:
            self.sync.hint(hint, trio.current_time())
        self._wake.set()

    def pull_now(self) -> None:
        self.sync.request_pull()
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            action = self.sync.next_action(trio.current_time())
            if isinstance(action, Wait):
                if action.deadline is None:
                    await self._wake.wait()
                else:
                    with trio.move_on_at(action.deadline):
                        await self._wake.wait()
                self._wake = trio.Event()
            elif isinstance(action, Apply):
                await self._apply(action)
            else:
                await self._send(action)

    async def _apply(self, batch: Apply) -> None:
        start = time.perf_counter()
        try:
            size = len(batch.upserts) + len(batch.deletes)
            if self.apply_thread is not None and size >= LARGE_BATCH:
                ok = await self.apply_thread.run(self.handle.apply, batch)
            else:  # small: at full priority, it is over in a millisecond
                ok = await trio.to_thread.run_sync(self.handle.apply, batch)
        except StorageError as exc:
            log.error("apply failed", extra={"dataset": self.name, "error": str(exc)})
            self.sync.apply_failed(str(exc), trio.current_time())
            return
        self.metrics.apply_seconds.observe(time.perf_counter() - start, self.name)
        if batch.target is Target.STAGING and ok:
            self._bootstrap.staged(
                len(batch.upserts), reset=batch.reset_staging, done=batch.promote
            )
        self.bytes_pulled += sum(len(k) + len(v) for k, v in batch.upserts)
        if not ok:
            log.warning("digest mismatch; repairing", extra={"dataset": self.name})
        self.sync.applied(ok, trio.current_time())
        if ok and batch.cursor is not None and self.on_applied is not None:
            self.on_applied(self.name)
        if ok and batch.promote and self.on_promoted is not None:
            self.on_promoted()

    async def _send(self, action: Send) -> None:
        req = action.request
        follow: Send | None = None
        try:
            if isinstance(req, MerkleNodesRequest | MerkleLeavesRequest):
                await self._complete_leaf_index()  # a StorageError fails this sync
            if isinstance(req, SnapshotRequest) and req.stream:
                follow = await self._stream(req)  # timed per chunk, not as a whole
            else:
                with trio.fail_after(self.settings.request_timeout):
                    resp = await self.transport.request(req)
                if isinstance(resp, SnapshotChunk):
                    self._bootstrap.total = resp.digest.count
                self.sync.response(resp, trio.current_time())
        except (ReplicadError, trio.TooSlowError, OSError) as exc:
            reason = f"{type(req).__name__}: {str(exc) or type(exc).__name__}"
            log.warning("sync request failed", extra={"dataset": self.name, "error": reason})
            self.sync.failed(reason, trio.current_time())
        if follow is not None:
            await self._send(follow)

    async def _complete_leaf_index(self) -> None:
        """A Merkle repair compares leaf listings: build what is left of a
        leaf index a snapshot load left incomplete first, in the apply
        thread (as the agent's index task does), never in this one."""
        while not self.handle.index_complete():
            if self.apply_thread is not None:
                await self.apply_thread.run(self.handle.index_step)
            else:
                await trio.to_thread.run_sync(self.handle.index_step)

    async def _stream(self, req: SnapshotRequest) -> Send | None:
        """Feed the stream's chunks; return a request the machine handed out
        instead of the next chunk (it moved on), to perform after the stream
        is closed.

        The next chunk is received and decoded (in this thread) while the
        current one is applied (in a worker thread, mostly inside LMDB), one
        chunk ahead at most: a bootstrap is not a strict alternation of
        network and disk. An error of the stream surfaces when its chunk is
        due, as the same exception."""
        failure: Exception | None = None
        follow: Send | None = None
        async with _closing(self.transport.snapshot_stream(req)) as chunks:
            send, receive = trio.open_memory_channel[SnapshotChunk | Exception](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_prefetch, chunks, send)
                try:
                    follow = await self._feed(receive)
                except Exception as exc:  # raised after the nursery, not grouped
                    failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return follow

    async def _feed(
        self, chunks: trio.MemoryReceiveChannel[SnapshotChunk | Exception]
    ) -> Send | None:
        while True:
            # an idle timeout per chunk: a long bootstrap is not one request
            with trio.fail_after(self.settings.request_timeout):
                try:
                    chunk = await chunks.receive()
                except trio.EndOfChannel:
                    break
            if isinstance(chunk, Exception):
                raise chunk
            self._bootstrap.total = chunk.digest.count
            self.sync.response(chunk, trio.current_time())
            follow = self.sync.next_action(trio.current_time())
            if isinstance(follow, Apply):
                await self._apply(follow)
            elif isinstance(follow, Send):
                return follow
            if not self.sync.streaming:
                return None
        if self.sync.streaming:  # the stream ended before its last chunk
            raise ProtocolError("the snapshot stream ended before its last chunk")
        return None


async def _prefetch(
    chunks: AsyncIterator[SnapshotChunk],
    out: trio.MemorySendChannel[SnapshotChunk | Exception],
) -> None:
    """Move chunks from the stream to ``out`` until the last one (the channel
    closes; the stream is left for its owner to close, not cancelled
    mid-read) or an error (sent in place of a chunk)."""
    async with out:
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                await out.send(exc)
                return
            await out.send(chunk)
            if chunk.next_after is None:
                return


class AgentMetrics:
    """The sidecar's Prometheus metrics."""

    def __init__(self, registry: Registry, agent: Agent) -> None:
        self.registry = registry
        self.apply_seconds = registry.histogram(
            "sidecar_apply_seconds", "Time to apply one batch.", ["dataset"]
        )
        registry.gauge(
            "sidecar_lag_versions",
            "Origin version minus ours.",
            ["dataset"],
            collect=agent.lag_versions,
        )
        registry.gauge(
            "sidecar_seconds_since_sync",
            "Seconds since the last successful sync.",
            ["dataset"],
            collect=agent.seconds_since_sync,
        )
        registry.gauge("sidecar_version", "Mirror version.", ["dataset"], collect=agent.versions)
        registry.gauge(
            "sidecar_records", "Records in the mirror.", ["dataset"], collect=agent.records
        )
        registry.gauge(
            "sidecar_bytes_pulled", "Record bytes applied.", ["dataset"], collect=agent.bytes
        )
        registry.gauge(
            "sidecar_syncs", "Completed syncs by kind.", ["dataset", "kind"], collect=agent.syncs
        )
        registry.gauge(
            "sidecar_sync_errors", "Failed requests and applies.", ["dataset"], collect=agent.errors
        )
        registry.gauge(
            "sidecar_ready", "1 when ready.", collect=lambda: [((), float(agent.ready()))]
        )
        self.hint_reconnects = registry.counter(
            "sidecar_hint_reconnects_total", "Hint stream (re)connections."
        )


class Agent:
    """The whole sidecar loop over one mirror and one transport."""

    def __init__(
        self,
        mirror: Mirror,
        transport: SyncTransport,
        settings: AgentSettings,
        *,
        rng: random.Random | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.mirror = mirror
        self.transport = transport
        self.settings = settings
        self.rng = rng or random.Random()
        self.registry = registry or Registry()
        self.metrics = AgentMetrics(self.registry, self)
        self.apply_thread = ApplyThread(settings.apply_nice)
        self.datasets = {
            name: DatasetSync(
                mirror.ensure(name),
                transport,
                settings,
                self.rng,
                self.metrics,
                apply_thread=self.apply_thread,
            )
            for name in settings.datasets
        }
        self._index_wake = trio.Event()
        for ds in self.datasets.values():
            ds.on_promoted = self._index_needed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for ds in self.datasets.values():
                    await nursery.start(ds.run)
                if self.settings.hints:
                    nursery.start_soon(self._follow_hints)
                nursery.start_soon(self._ack_loop)
                nursery.start_soon(self._build_indexes)
                task_status.started()
        finally:
            # every apply's wait is shielded: none is running by now
            self.apply_thread.close(timeout=5.0)

    async def _follow_hints(self) -> None:
        failures = 0
        names = list(self.datasets)
        while True:
            self.metrics.hint_reconnects.inc()
            try:
                stream = self.transport.hints(names, diffs=self.settings.push)
                async with _closing(stream) as hints:
                    async for hint in hints:
                        failures = 0
                        ds = self.datasets.get(hint.dataset)
                        if ds is not None:
                            ds.hint(hint)
            except (ReplicadError, OSError) as exc:
                log.warning("hint stream broke", extra={"error": str(exc)})
            failures += 1
            cap = min(
                self.settings.hint_backoff_max,
                self.settings.hint_backoff_base * 2 ** min(failures, 30),
            )
            await trio.sleep(self.rng.uniform(cap / 2, cap))

    def _index_needed(self) -> None:
        self._index_wake.set()

    async def _build_indexes(self) -> None:
        """Complete the leaf indexes snapshot loads left incomplete, then
        the JSON views loads and definition changes emptied, one short write
        transaction at a time in the apply thread (applies queued meanwhile
        run between them); then wait for the next load (or, for a view a
        diff emptied, at most ``JSON_VIEW_CHECK`` seconds)."""
        mirror = self.mirror
        while True:
            pending = [("leaf index", n, mirror.index_step) for n in mirror.unindexed()]
            pending += [("JSON view", n, mirror.json_step) for n in mirror.json_unbuilt()]
            if not pending:
                with trio.move_on_after(JSON_VIEW_CHECK):
                    await self._index_wake.wait()
                    self._index_wake = trio.Event()
                continue
            for what, name, step in pending:
                began = time.perf_counter()
                try:
                    while await self.apply_thread.run(step, name):
                        await trio.lowlevel.checkpoint()  # the wait above is shielded
                except StorageError as exc:
                    log.error(f"{what} build failed", extra={"dataset": name, "error": str(exc)})
                    await trio.sleep(INDEX_RETRY)
                    continue  # the others meanwhile; this one on the next round
                log.info(
                    f"{what} built",
                    extra={"dataset": name, "seconds": round(time.perf_counter() - began, 3)},
                )

    async def _ack_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.ack_interval)
            cursors = {n: c for n in self.datasets if (c := self.mirror.cursor(n)) is not None}
            try:
                await self.transport.ack(self.settings.replica_id, cursors, {"ready": self.ready()})
            except (ReplicadError, OSError) as exc:
                log.info("ack failed", extra={"error": str(exc)})

    # --- status

    def ready(self) -> bool:
        """Every dataset has finished a sync in this process and synced within
        ``max_staleness`` seconds."""
        now = trio.current_time()
        for ds in self.datasets.values():
            last = ds.sync.last_sync
            if not ds.sync.ready or last is None or now - last > self.settings.max_staleness:
                return False
        return True

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        out: dict[str, Any] = {}
        for name, ds in self.datasets.items():
            cursor = ds.sync.cursor
            origin = ds.sync.origin_cursor
            out[name] = {
                "epoch": None if cursor is None else cursor.epoch.hex(),
                "version": None if cursor is None else cursor.version,
                "origin_version": None if origin is None else origin.version,
                "lag": _lag(cursor, origin),
                "ready": ds.sync.ready,
                "phase": ds.sync.phase.value,
                "seconds_since_sync": None
                if ds.sync.last_sync is None
                else now - ds.sync.last_sync,
                "records": ds.sync.digest.count,
                "leaf_index_complete": self.mirror.index_complete(name),
                "json_view": self.mirror.json_view_state(name),
                "records_applied": ds.sync.stats.records_applied,
                "digest_mismatches": ds.sync.stats.digest_mismatches,
                "syncs": dict(ds.sync.stats.syncs),
                "errors": ds.sync.stats.failures,
                "last_error": ds.sync.stats.last_error,
            }
        return out

    def lag_versions(self) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for name, ds in self.datasets.items():
            lag = _lag(ds.sync.cursor, ds.sync.origin_cursor)
            out.append(((name,), float("nan") if lag is None else float(lag)))
        return out

    def seconds_since_sync(self) -> list[tuple[tuple[str, ...], float]]:
        now = trio.current_time()
        return [
            ((n,), float("inf") if d.sync.last_sync is None else now - d.sync.last_sync)
            for n, d in self.datasets.items()
        ]

    def versions(self) -> list[tuple[tuple[str, ...], float]]:
        return [
            ((n,), -1.0 if d.sync.cursor is None else float(d.sync.cursor.version))
            for n, d in self.datasets.items()
        ]

    def records(self) -> list[tuple[tuple[str, ...], float]]:
        return [((n,), float(d.sync.digest.count)) for n, d in self.datasets.items()]

    def bytes(self) -> list[tuple[tuple[str, ...], float]]:
        return [((n,), float(d.bytes_pulled)) for n, d in self.datasets.items()]

    def syncs(self) -> list[tuple[tuple[str, ...], float]]:
        return [
            ((n, kind), float(count))
            for n, d in self.datasets.items()
            for kind, count in sorted(d.sync.stats.syncs.items())
        ]

    def errors(self) -> list[tuple[tuple[str, ...], float]]:
        return [((n,), float(d.sync.stats.failures)) for n, d in self.datasets.items()]


_T = TypeVar("_T")


@contextlib.asynccontextmanager
async def _closing(it: AsyncIterator[_T]) -> AsyncGenerator[AsyncIterator[_T], None]:
    """Close an async generator when the block ends (early exit included)."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def _lag(cursor: Cursor | None, origin: Cursor | None) -> int | None:
    if cursor is None or origin is None or cursor.epoch != origin.epoch:
        return None
    return max(0, origin.version - cursor.version)
