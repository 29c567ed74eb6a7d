"""Relay mode: a sidecar serving the origin's sync API from its mirror, so
sidecars can chain into a fan-out tree (origin -> relays -> sidecars).

Theory of operation
-------------------
:class:`RelayService` implements the read side of the origin service
(``OriginServiceLike`` of :mod:`replicad.http_app`), so the origin's own HTTP
app serves it: ``/v1/sync`` (diff, snapshot, Merkle), ``/v1/hints``,
``/v1/ack``, ``/v1/fleet``, ``/v1/datasets``, record reads. Writes are refused
(403): a relay is read-only; writers talk to the origin.

Cursors pass through unchanged: the relay's mirror is at origin cursor
``(epoch, version)``, and so are the replicas below it. Diffs need history,
which the relay keeps per dataset in memory with
:class:`~replicad.relay_history.RelayHistory` (the sans-IO rules, shared with
the simulation): every diff or push the relay applies advances it and is
passed on as a push; a snapshot or Merkle sync at the relay, or a relay
restart, starts it afresh at the relay's cursor, and a replica below with an
older cursor then repairs with Merkle against the relay, shipping only
differences. The history is maintained in the mirror's commit hook, under the
same lock as the commit, so every view a request opens sees a queue that
matches its records.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgpack
import trio

from replicad.codec import DatasetCodec
from replicad.errors import AuthError, RetryLaterError, UnknownDatasetError
from replicad.hub import Fleet, HintEvent, HintHub
from replicad.merkle import Geometry
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
from replicad.origin_types import (
    DatasetInfo,
    DatasetSpec,
    EncodingBasis,
    FleetEntry,
    WriteBatch,
    WriteResult,
)
from replicad.relay_history import RelayHistory
from replicad.replica import Apply
from replicad.responder import ResponderConfig, respond, snapshot_chunk
from replicad.schema import Schema
from sidecar.mirror import Mirror
from sidecar.reader import codec_from_definition

READ_ONLY = "this is a relay: it is read-only; write to the origin"
INDEX_WAIT = 30.0
"""Seconds a leaf listing waits for a leaf index being built after the
relay's own snapshot load; then it is refused with 503 (the replica below
retries later)."""


class RelayService:
    """The read side of the origin service, over a sidecar's mirror."""

    def __init__(
        self,
        mirror: Mirror,
        *,
        registry: Registry | None = None,
        responder: ResponderConfig | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = 1024,
        push_max_bytes: int = 256 << 10,
    ) -> None:
        self.mirror = mirror
        self.push_max_bytes = push_max_bytes
        self._pushes: dict[str, DiffPush] = {}
        self.registry = registry or Registry()
        self.responder = responder or ResponderConfig()
        self.clock = clock
        self.max_entries = max_entries
        self._histories: dict[str, RelayHistory] = {}
        self._hints = HintHub()
        self._fleet = Fleet(clock)
        self._codecs: dict[str, tuple[bytes, DatasetCodec]] = {}
        self._m_sync = self.registry.counter(
            "relay_sync_requests_total", "Sync requests served by kind.", ["kind"]
        )
        with mirror.locked():
            for name in mirror.names():
                self._history(name)
        mirror.on_commit = self._on_commit

    # --- history (called under the mirror's state lock)

    def _history(self, name: str) -> RelayHistory:
        history = self._histories.get(name)
        if history is None:
            history = self._histories[name] = RelayHistory(
                name,
                self.mirror.cursor(name),
                max_entries=self.max_entries,
                push_max_bytes=self.push_max_bytes,
            )
        return history

    def _on_commit(self, name: str, batch: Apply) -> None:
        push = self._history(name).observe(batch, self.mirror.state(name).meta_revision)
        if push is None:
            self._pushes.pop(name, None)
        else:
            self._pushes[name] = push  # published by publish(), in trio

    def publish(self, name: str) -> None:
        """Announce the mirror's current cursor of ``name`` to subscribers
        (the agent calls it after each applied batch)."""
        cursor = self.mirror.cursor(name)
        if cursor is None:
            return
        push = self._pushes.pop(name, None)
        if push is not None and push.cursor == cursor:
            self._hints.publish(push)
        else:
            self._hints.publish(Hint(name, cursor, self.mirror.digest(name)))

    # --- datasets

    def _known(self, name: str) -> None:
        if name not in self.mirror.names() or self.mirror.cursor(name) is None:
            raise UnknownDatasetError(f"the relay holds no synced dataset {name!r}")

    def codec(self, name: str) -> DatasetCodec:
        self._known(name)
        definition = self.mirror.definition(name) or b""
        known = self._codecs.get(name)
        if known is None or known[0] != definition:
            known = self._codecs[name] = (definition, codec_from_definition(definition))
        return known[1]

    def dataset(self, name: str) -> DatasetInfo:
        self._known(name)
        with self.mirror.locked():
            cursor = self.mirror.cursor(name)
            digest = self.mirror.digest(name)
            definition = self.mirror.definition(name) or b""
            revision = self.mirror.state(name).meta_revision
            queue = self._history(name).queue
        assert cursor is not None
        doc = msgpack.unpackb(definition, raw=False) if definition else {}
        schemas = [Schema.from_json(s) for s in doc.get("schemas", [])]
        return DatasetInfo(
            name=name,
            schema=schemas[-1] if schemas else None,
            schema_versions=len(schemas),
            cursor=cursor,
            digest=digest,
            meta_revision=revision,
            queue_floor=cursor.version if queue is None else queue.floor,
            queue_entries=0 if queue is None else len(queue.entries),
            geometry=Geometry.from_json(doc["geometry"]) if doc else Geometry(),
            policy="relay",
            max_entries=self.max_entries,
            max_value_bytes=int(doc.get("max_value_bytes", 1 << 20)),
        )

    def datasets(self) -> list[DatasetInfo]:
        return [self.dataset(n) for n in self.mirror.names() if self.mirror.cursor(n) is not None]

    async def create_dataset(self, spec: DatasetSpec) -> DatasetInfo:
        raise AuthError(READ_ONLY, status=403)

    async def evolve_schema(self, name: str, schema: Schema) -> DatasetInfo:
        raise AuthError(READ_ONLY, status=403)

    async def reset_history(self, name: str) -> DatasetInfo:
        raise AuthError(READ_ONLY, status=403)

    def encoding_basis(self, name: str) -> EncodingBasis:
        raise AuthError(READ_ONLY, status=403)

    async def write(self, batch: WriteBatch) -> WriteResult:
        raise AuthError(READ_ONLY, status=403)

    # --- reads and sync

    async def get(self, name: str, key: bytes) -> tuple[bytes | None, Cursor]:
        self._known(name)
        return await trio.to_thread.run_sync(self._get, name, key)

    def _get(self, name: str, key: bytes) -> tuple[bytes | None, Cursor]:
        with self.mirror.view(name) as view:
            return view.get(key), view.cursor

    async def sync(self, request: Request) -> Response:
        self._m_sync.inc(1, type(request).__name__)
        self._known(request.dataset)
        if isinstance(request, MerkleLeavesRequest):
            await self._leaf_index_built(request.dataset)
        return await trio.to_thread.run_sync(self._answer, request)

    async def _leaf_index_built(self, name: str) -> None:
        """Wait (up to :data:`INDEX_WAIT`) while the mirror's leaf index is
        being built after a snapshot load, then refuse (RetryLaterError):
        meanwhile each leaf listed would cost a walk over every record not
        indexed yet, and a replica below that repairs right after the relay's
        bootstrap asks for thousands."""
        with trio.move_on_after(INDEX_WAIT):
            while not self.mirror.index_complete(name):
                await trio.sleep(0.05)
        if not self.mirror.index_complete(name):
            raise RetryLaterError(
                f"the relay is still building the leaf index of {name!r} (after a snapshot "
                "load); retry in a few seconds"
            )

    def _answer(self, request: Request) -> Response:
        with self.mirror.view(request.dataset) as view:
            view.queue = self._history(request.dataset).queue
            if isinstance(request, MerkleNodesRequest):
                with self.mirror.locked():
                    return respond(view, request, self.responder)
            return respond(view, request, self.responder)

    async def snapshot_stream(
        self, request: SnapshotRequest
    ) -> AsyncGenerator[SnapshotChunk, None]:
        self._m_sync.inc(1, "SnapshotStream")
        self._known(request.dataset)
        limit = min(request.limit, self.responder.max_snapshot_chunk)
        views = self.mirror.view(request.dataset)
        view = await trio.to_thread.run_sync(views.__enter__)
        try:
            after = request.after
            while True:
                chunk = await trio.to_thread.run_sync(snapshot_chunk, view, after, limit)
                yield chunk
                if chunk.next_after is None:
                    return
                after = chunk.next_after
        finally:
            views.__exit__(None, None, None)

    # --- hints

    def subscribe(
        self, datasets: Collection[str] | None, *, diffs: bool = False
    ) -> AbstractAsyncContextManager[AsyncIterator[HintEvent]]:
        """Hints of the relay's mirror; with ``diffs``, a version the relay
        applied as a diff or push is passed on as a push."""
        names = None if datasets is None else frozenset(datasets)
        for name in names or ():
            self._known(name)
        return self._hints.subscribe(names, self._current_hints, diffs=diffs)

    def _current_hints(self) -> list[Hint]:
        out = []
        for name in self.mirror.names():
            cursor = self.mirror.cursor(name)
            if cursor is not None:
                out.append(Hint(name, cursor, self.mirror.digest(name)))
        return out

    # --- fleet (the replicas below this relay)

    def ack(
        self, replica: str, address: str, datasets: Mapping[str, Cursor], info: Mapping[str, Any]
    ) -> None:
        self._fleet.ack(replica, address, datasets, info)

    def fleet(self) -> list[FleetEntry]:
        return self._fleet.entries()

    def lag(self, cursor: Cursor, name: str) -> int | None:
        current = self.mirror.cursor(name) if name in self.mirror.names() else None
        if current is None or current.epoch != cursor.epoch:
            return None
        return max(0, current.version - cursor.version)
