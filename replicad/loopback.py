"""Run a replica state machine against an in-process server, synchronously.

:class:`LoopbackDriver` is the smallest honest adapter of the sync core: every
message travels through the real wire encoding (message -> frame bytes ->
frame -> message), the server side is the real :func:`~replicad.responder.respond`,
and :class:`~replicad.memory.MemoryMirror` (or the sidecar's LMDB mirror) honours the
Apply contract. The
tests of the core and ``replicad demo`` use it; the networked adapters replace
the function call with HTTP and the mirror with LMDB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from replicad.errors import ProtocolError
from replicad.frames import FrameDecoder, encode_frame
from replicad.messages import (
    REQUEST_TYPES,
    Message,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
    from_wire,
    to_wire,
)
from replicad.replica import Apply, ReplicaSync, Send, Wait
from replicad.responder import DatasetView, ResponderConfig, respond, snapshot_chunk


class Link:
    """Carries messages as checksummed frames, counting frames and bytes."""

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0

    def carry(self, msg: Message) -> Message:
        kind, body = to_wire(msg)
        data = encode_frame(kind, body)
        self.bytes += len(data)
        self.frames += 1
        decoder = FrameDecoder()
        decoder.receive_data(data)
        frame = decoder.next_frame()
        decoder.close()
        if frame is None:
            raise ProtocolError("frame lost in the loopback link")
        return from_wire(frame.kind, frame.body)

    def carry_response(self, msg: Response) -> Response:
        out = self.carry(msg)
        if type(out) is not type(msg):
            raise ProtocolError("loopback link changed the message type")
        return out


class BatchTarget(Protocol):
    """Where Apply batches go: :class:`~replicad.memory.MemoryMirror`, or a
    dataset of the sidecar's LMDB mirror."""

    def apply(self, batch: Apply) -> bool:
        """Apply all or nothing; False when the digest check failed."""
        ...


@runtime_checkable
class SyncServer(Protocol):
    """Anything that answers sync requests: the origin store, a relay, or a
    :class:`ViewServer` over an in-memory dataset."""

    def answer(self, request: Request) -> Response:
        """One answer, read at one version."""
        ...

    def stream(self, request: SnapshotRequest) -> Iterator[SnapshotChunk]:
        """Every chunk from ``request.after`` to the end, at one version."""
        ...


class ViewServer:
    """A :class:`SyncServer` over a dataset view that is always current
    (such as :class:`~replicad.memory.MemoryDataset`)."""

    def __init__(self, view: DatasetView, config: ResponderConfig | None = None) -> None:
        self.view = view
        self.config = config

    def answer(self, request: Request) -> Response:
        return respond(self.view, request, self.config)

    def stream(self, request: SnapshotRequest) -> Iterator[SnapshotChunk]:
        after = request.after
        while True:
            chunk = snapshot_chunk(self.view, after, request.limit)
            yield chunk
            if chunk.next_after is None:
                return
            after = chunk.next_after


class LoopbackDriver:
    """Drives ``sync`` against ``server`` and ``mirror`` until it waits.

    ``on_request(n)`` runs before the n-th request is answered (tests use it to
    race writes against a sync); when ``fail_request(n)`` is true the n-th
    request fails instead of being answered.
    """

    def __init__(
        self,
        sync: ReplicaSync,
        mirror: BatchTarget,
        server: DatasetView | SyncServer,
        *,
        config: ResponderConfig | None = None,
        on_request: Callable[[int], None] | None = None,
        fail_request: Callable[[int], bool] | None = None,
    ) -> None:
        self.sync = sync
        self.mirror = mirror
        self.server = server if isinstance(server, SyncServer) else ViewServer(server, config)
        self.on_request = on_request
        self.fail_request = fail_request
        self.link = Link()
        self.requests = 0
        self.request_kinds: list[str] = []

    def run(self, now: float, max_steps: int = 100_000) -> Wait:
        """Perform actions until the machine waits; return that Wait.

        Raises RuntimeError if it does not settle within ``max_steps``.
        """
        for _ in range(max_steps):
            action = self.sync.next_action(now)
            if isinstance(action, Wait):
                return action
            if isinstance(action, Apply):
                self.sync.applied(self.mirror.apply(action), now)
            else:
                self._perform(action, now)
        raise RuntimeError("sync did not settle")

    def _perform(self, action: Send, now: float) -> None:
        self.requests += 1
        n = self.requests
        req = self.link.carry(action.request)
        self.request_kinds.append(type(req).__name__)
        if self.on_request is not None:
            self.on_request(n)
        if self.fail_request is not None and self.fail_request(n):
            self.sync.failed("injected failure", now)
            return
        if isinstance(req, SnapshotRequest) and req.stream:
            self._stream(req, now)
            return
        if not isinstance(req, REQUEST_TYPES):
            raise ProtocolError(f"{type(req).__name__} is not a request")
        resp = self.server.answer(req)
        self.sync.response(self.link.carry_response(resp), now)

    def _stream(self, req: SnapshotRequest, now: float) -> None:
        for chunk in self.server.stream(req):
            self.sync.response(self.link.carry_response(chunk), now)
            follow = self.sync.next_action(now)
            if isinstance(follow, Apply):
                self.sync.applied(self.mirror.apply(follow), now)
            elif isinstance(follow, Send):  # the machine abandoned the stream
                self._perform(follow, now)
                return
            if not self.sync.streaming:
                return
