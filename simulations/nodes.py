"""The simulated nodes: an origin, and replicas (sidecars and relays).

Theory of operation
-------------------
Nodes are thin adapters around the real protocol core, like the sidecar's
trio loop but driven by the harness's event loop:

* :class:`OriginNode` holds :class:`~replicad.memory.MemoryDataset` objects
  and answers requests with :func:`~replicad.responder.respond`; a streamed
  snapshot is read in one go (one consistent view, as the origin reads it in
  one transaction) and sent as ordered chunk packets. After each write it
  pushes a :class:`~replicad.messages.Hint` to its children.
* :class:`ReplicaNode` holds one :class:`~replicad.memory.MemoryMirror` per
  dataset (its durable state) and one :class:`~replicad.replica.ReplicaSync`
  per dataset (its process state). :meth:`ReplicaNode.pump` runs the adapter
  cycle -- ``next_action``: Send a request packet with a timeout, Apply to the
  mirror (wrapped by the checker), or Wait (a timer) -- until the machine
  waits. Answers are matched to the outstanding request by id; anything else
  (late, duplicated) is ignored, as an HTTP client would.
  A *relay* is a replica that also serves its mirror, through
  :class:`~simulations.mirror_view.MirrorView`, to the replicas below it and
  pushes them a hint after each commit readers can see.

Crashes: a crashed replica drops its state machines, outstanding requests and
timers (its incarnation number changes, so stale callbacks are ignored) and
keeps only its mirrors; restarting builds new machines from
``mirror.state()``. A restarted relay's history starts afresh. An origin
restart keeps its datasets, with their history or (a new epoch) without.

Each replica has a local clock (offset and rate over simulated time) that the
clock-skew fault moves; the state machine only ever sees local time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from replicad.errors import MerkleError, ProtocolError
from replicad.memory import MemoryDataset, MemoryMirror
from replicad.merkle import Geometry
from replicad.messages import (
    REQUEST_TYPES,
    CursorUnservable,
    DiffResponse,
    Hint,
    MerkleLeavesResponse,
    MerkleNodesResponse,
    Message,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.replica import Apply, ReplicaSync, Send, SyncConfig, Target, Wait
from replicad.responder import DatasetView, ResponderConfig, respond, snapshot_chunk
from simulations.invariants import Checker, Watch
from simulations.loop import EventLoop
from simulations.metrics import Metrics, count
from simulations.mirror_view import MirrorView
from simulations.network import Kind, Network, Packet
from simulations.wire import WireError, decode, encode

_RESPONSE_TYPES = (
    DiffResponse,
    CursorUnservable,
    SnapshotChunk,
    MerkleNodesResponse,
    MerkleLeavesResponse,
)


@dataclass
class Env:
    """What every node shares: the clock, the network, the checker, counters."""

    loop: EventLoop
    net: Network
    checker: Checker
    metrics: Metrics
    decode_all: bool = False
    storage_errors: float = 0.0
    """Probability that a mirror's write transaction fails (set by the faults)."""
    fault_rng: random.Random = field(default_factory=lambda: random.Random(0))
    on_answer: Callable[[str, Request, Response], None] | None = None
    """Studies: sees every answer a replica accepts, with its request."""
    _ids: int = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids


@dataclass(frozen=True)
class ServiceModel:
    """A server's capacity. Requests are served one at a time, first come
    first served; each takes ``per_request`` seconds plus its answer's bytes
    over ``egress`` (bytes per second), and its answer leaves when it is done.
    The defaults (no cost) answer at once."""

    per_request: float = 0.0
    egress: float = math.inf


@dataclass(frozen=True)
class ReplicaConfig:
    """How a replica syncs (shared by the replicas of one run)."""

    sync: SyncConfig = field(default_factory=SyncConfig)
    request_timeout: float = 2.0
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    """How a relay answers the replicas below it."""
    relay_max_entries: int = 1024
    relay_service: ServiceModel = field(default_factory=ServiceModel)


class Clock:
    """A node's local clock: ``local = base_local + (t - base_t) * rate``."""

    __slots__ = ("base_local", "base_t", "rate")

    def __init__(self) -> None:
        self.base_t = 0.0
        self.base_local = 0.0
        self.rate = 1.0

    def local(self, t: float) -> float:
        return self.base_local + (t - self.base_t) * self.rate

    def to_global(self, local: float) -> float:
        return self.base_t + (local - self.base_local) / self.rate

    def jump(self, t: float, delta: float) -> None:
        """Step the clock by ``delta`` seconds at simulated time ``t``."""
        self.base_local = self.local(t) + delta
        self.base_t = t

    def set_rate(self, t: float, rate: float) -> None:
        """Run at ``rate`` local seconds per simulated second from ``t`` on."""
        self.base_local = self.local(t)
        self.base_t = t
        self.rate = rate


# --- serving (origin and relays) ----------------------------------------------


def _packet(kind: Kind, src: str, dst: str, *, ds: str, rid: int, msg: Message) -> Packet:
    data = encode(msg)
    return Packet(kind, src, dst, ds, rid, msg, data, len(data))


class Server:
    """The serving side of the origin or a relay: answers requests from a
    view through :func:`~replicad.responder.respond`, with the capacity of
    its :class:`ServiceModel`."""

    def __init__(self, env: Env, name: str, model: ServiceModel) -> None:
        self.env = env
        self.name = name
        self.model = model
        self.busy_until = 0.0
        self.busy = 0.0
        """Seconds spent serving."""
        self.generation = 0

    def reset(self) -> None:
        """The server process stopped: answers not yet sent are lost."""
        self.generation += 1
        self.busy_until = self.env.loop.now

    def refuse(self, p: Packet, reason: str) -> None:
        self.env.net.send(
            Packet(Kind.ERROR, self.name, p.src, p.dataset, p.rid, None, b"", 16, error=reason)
        )

    def serve(self, p: Packet, view: DatasetView, responder: ResponderConfig) -> int:
        """Answer request packet ``p`` from ``view``; returns the answer's bytes.

        The answer is read now (one consistent view, as the adapters read it
        in one transaction) and sent when the server is done with it. A frame
        that does not decode, or a request the responder rejects, gets a
        refusal (the HTTP adapters answer 400), which the client counts as a
        failed request.
        """
        env = self.env
        msg = p.msg
        if p.decode or env.decode_all:
            try:
                msg = decode(p.data)
            except WireError as exc:
                self.refuse(p, f"bad frame: {exc}")
                return 0
        if not isinstance(msg, REQUEST_TYPES):
            self.refuse(p, "not a request")
            return 0
        req: Request = msg
        out: list[Packet] = []
        if isinstance(req, SnapshotRequest) and req.stream:
            if req.dataset != view.name:
                self.refuse(p, "unknown dataset")
                return 0
            limit = min(req.limit, responder.max_snapshot_chunk)
            after = req.after
            while True:
                chunk = snapshot_chunk(view, after, limit)
                packet = _packet(Kind.CHUNK, self.name, p.src, ds=p.dataset, rid=p.rid, msg=chunk)
                packet.stream = p.rid
                out.append(packet)
                if chunk.next_after is None:
                    break
                after = chunk.next_after
        else:
            try:
                resp = respond(view, req, responder)
            except (ProtocolError, MerkleError) as exc:
                self.refuse(p, f"bad request: {exc}")
                return 0
            out.append(_packet(Kind.RESPONSE, self.name, p.src, ds=p.dataset, rid=p.rid, msg=resp))
        size = sum(q.size for q in out)
        count(env.metrics.shipped, p.src, size)
        model = self.model
        if model.per_request == 0 and model.egress == math.inf:
            self._send(out, self.generation)
            return size
        loop = env.loop
        cost = model.per_request + size / model.egress
        done = max(loop.now, self.busy_until) + cost
        self.busy_until = done
        self.busy += cost
        gen = self.generation
        loop.at(done, lambda: self._send(out, gen))
        return size

    def _send(self, packets: list[Packet], generation: int) -> None:
        if generation != self.generation:
            return
        net = self.env.net
        for q in packets:
            net.send(q)
        if packets[0].stream:
            net.end_stream(packets[0].stream)


class OriginNode:
    """The origin: datasets, the sync API, and hints to its children."""

    name = "origin"

    def __init__(
        self,
        env: Env,
        datasets: dict[str, MemoryDataset],
        responder: ResponderConfig,
        service: ServiceModel | None = None,
    ) -> None:
        self.env = env
        self.datasets = datasets
        self.responder = responder
        self.server = Server(env, self.name, service or ServiceModel())
        self.children: list[str] = []
        self.up = True

    def stop(self) -> None:
        """The origin process stops (its datasets are durable)."""
        self.up = False
        self.server.reset()

    def receive(self, p: Packet) -> None:
        if not self.up:
            count(self.env.net.stats.dropped, "node_down")
            return
        if p.kind is Kind.HELLO:
            for name in sorted(self.datasets):
                self._hint_to(p.src, name)
            return
        if p.kind is not Kind.REQUEST:
            return
        ds = self.datasets.get(p.dataset)
        m = self.env.metrics
        if ds is None:
            self.server.refuse(p, "unknown dataset")
            return
        kind = type(p.msg).__name__
        if isinstance(p.msg, SnapshotRequest) and p.msg.stream:
            kind = "SnapshotStream"
        m.origin_request(kind, self.env.loop.now)
        m.origin_bytes_out += self.server.serve(p, ds, self.responder)

    def publish(self, name: str) -> None:
        """Push the dataset's current cursor to every child (after a write)."""
        if not self.up:
            return
        ds = self.datasets[name]
        hint = Hint(name, ds.cursor, ds.digest)
        data = encode(hint)
        for child in self.children:
            self._send_hint(child, name, hint, data)

    def _hint_to(self, child: str, name: str) -> None:
        ds = self.datasets[name]
        hint = Hint(name, ds.cursor, ds.digest)
        self._send_hint(child, name, hint, encode(hint))

    def _send_hint(self, child: str, name: str, hint: Hint, data: bytes) -> None:
        self.env.net.send(Packet(Kind.HINT, self.name, child, name, 0, hint, data, len(data)))
        count(self.env.metrics.shipped, child, len(data))

    def reconnect_children(self) -> None:
        """After a restart, children's hint streams reconnect: current hints."""
        for child in self.children:
            for name in sorted(self.datasets):
                self._hint_to(child, name)


# --- replicas -----------------------------------------------------------------


class _Slot:
    """Process state of one dataset of a running replica."""

    __slots__ = ("deadline", "request", "rid", "stream", "sync", "timer_at", "timer_token")

    def __init__(self, sync: ReplicaSync) -> None:
        self.sync = sync
        self.rid = 0
        """Id of the outstanding request (0: none)."""
        self.request: Request | None = None
        self.stream = 0
        """Id of the open snapshot stream (0: none)."""
        self.deadline = 0.0
        """Simulated time at which the outstanding request or stream times out."""
        self.timer_at = float("inf")
        self.timer_token = 0


MirrorFactory = Callable[[Geometry], MemoryMirror]


class ReplicaNode:
    """A sidecar (or, with children, a relay) syncing from ``upstream``."""

    def __init__(
        self,
        env: Env,
        name: str,
        upstream: str,
        datasets: list[str],
        *,
        geometry: Geometry,
        config: ReplicaConfig,
        rng: random.Random,
        relay: bool = False,
        mirror_factory: MirrorFactory = MemoryMirror,
    ) -> None:
        self.env = env
        self.name = name
        self.upstream = upstream
        self.config = config
        self.rng = rng
        self.relay = relay
        self.children: list[str] = []
        self.datasets = sorted(datasets)
        self.mirrors = {ds: mirror_factory(geometry) for ds in self.datasets}
        self.watches: dict[str, Watch] = {
            ds: env.checker.watch(name, ds, m) for ds, m in self.mirrors.items()
        }
        self.views: dict[str, MirrorView] = (
            {
                ds: MirrorView(ds, m, max_entries=config.relay_max_entries)
                for ds, m in self.mirrors.items()
            }
            if relay
            else {}
        )
        self.clock = Clock()
        self.server = Server(env, name, config.relay_service)
        self.up = False
        self.incarnation = 0
        self.slots: dict[str, _Slot] = {}
        self.retired: dict[str, int] = {}
        """Sync stats (syncs by kind, failures) of machines that crashed."""
        self.crashes = 0

    # --- life cycle

    def now(self) -> float:
        return self.clock.local(self.env.loop.now)

    def start(self) -> None:
        """(Re)start the process: new machines from the mirrors' durable state."""
        if self.up:
            return
        self.up = True
        self.incarnation += 1
        local = self.now()
        for ds in self.datasets:
            mirror = self.mirrors[ds]
            sync = ReplicaSync(
                ds,
                state=mirror.state(),
                local=mirror,
                rng=random.Random(self.rng.getrandbits(64)),
                now=local,
                config=self.config.sync,
            )
            self.slots[ds] = _Slot(sync)
        for view in self.views.values():
            view.reset()
        hello = Packet(Kind.HELLO, self.name, self.upstream, "", 0, None, b"", 16)
        self.env.net.send(hello)
        for ds in self.datasets:
            self.pump(ds)

    def crash(self) -> None:
        """Stop the process: only the mirrors (committed state) survive."""
        if not self.up:
            return
        self.crashes += 1
        for slot in self.slots.values():
            self._retire(slot.sync)
        self.up = False
        self.incarnation += 1
        self.slots.clear()
        self.server.reset()

    def _retire(self, sync: ReplicaSync) -> None:
        for kind, n in sync.stats.syncs.items():
            count(self.retired, f"sync:{kind}", n)
        count(self.retired, "failures", sync.stats.failures)
        count(self.retired, "digest_mismatches", sync.stats.digest_mismatches)

    def sync_stats(self) -> dict[str, int]:
        """Sync stats over every incarnation (syncs by kind, failures, mismatches)."""
        out = dict(self.retired)
        for slot in self.slots.values():
            s = slot.sync.stats
            for kind, n in s.syncs.items():
                count(out, f"sync:{kind}", n)
            count(out, "failures", s.failures)
            count(out, "digest_mismatches", s.digest_mismatches)
        return out

    def clock_changed(self) -> None:
        """The local clock jumped or changed rate: recompute every timer."""
        if not self.up:
            return
        for ds in self.datasets:
            self.slots[ds].timer_at = float("inf")
            self.pump(ds)

    # --- the adapter cycle

    def pump(self, ds: str) -> None:
        """Perform the machine's actions until it waits."""
        slot = self.slots[ds]
        sync = slot.sync
        env = self.env
        while True:
            action = sync.next_action(self.now())
            if isinstance(action, Wait):
                if action.deadline is not None:
                    self._timer(ds, slot, action.deadline)
                return
            if isinstance(action, Send):
                self._send(ds, slot, action.request)
            else:
                self._apply(ds, action)
                env.metrics.sync_events += 1

    def _apply(self, ds: str, batch: Apply) -> None:
        mirror = self.mirrors[ds]
        env = self.env
        if env.storage_errors and env.fault_rng.random() < env.storage_errors:
            # the write transaction failed and rolled back (a full disk, say)
            env.metrics.storage_errors += 1
            self.slots[ds].sync.apply_failed("injected storage error", self.now())
            return
        watch = self.watches[ds]
        checker = env.checker
        checker.before_apply(watch, batch)
        ok = mirror.apply(batch)
        checker.after_apply(watch, batch, ok, self.env.loop.now)
        self.slots[ds].sync.applied(ok, self.now())
        if ok and self.relay:
            self.views[ds].observe(batch)
            if batch.target is Target.LIVE or batch.promote:
                self.publish(ds)

    def _send(self, ds: str, slot: _Slot, request: Request) -> None:
        env = self.env
        rid = env.next_id()
        slot.rid = rid
        slot.request = request
        m = env.metrics
        count(m.requests, type(request).__name__)
        count(m.requests_by_phase, slot.sync.phase.value)
        p = _packet(Kind.REQUEST, self.name, self.upstream, ds=ds, rid=rid, msg=request)
        count(m.shipped, self.name, p.size)
        if isinstance(request, SnapshotRequest) and request.stream:
            slot.stream = rid
        env.net.send(p)
        self._arm_timeout(ds, slot, rid)

    def _arm_timeout(self, ds: str, slot: _Slot, rid: int) -> None:
        loop = self.env.loop
        slot.deadline = loop.now + self.config.request_timeout
        inc = self.incarnation
        loop.at(slot.deadline, lambda: self._timeout(inc, ds, rid))

    def _timeout(self, inc: int, ds: str, rid: int) -> None:
        if inc != self.incarnation:
            return
        slot = self.slots[ds]
        if rid not in (slot.rid, slot.stream):
            return
        loop = self.env.loop
        if loop.now < slot.deadline:  # the stream made progress: wait more
            loop.at(slot.deadline, lambda: self._timeout(inc, ds, rid))
            return
        self.env.metrics.timeouts += 1
        self._fail(ds, slot, "timeout")

    def _fail(self, ds: str, slot: _Slot, reason: str) -> None:
        slot.rid = 0
        slot.stream = 0
        self.env.metrics.sync_events += 1
        slot.sync.failed(reason, self.now())
        self.pump(ds)

    def _timer(self, ds: str, slot: _Slot, deadline: float) -> None:
        # a hair late, so that the local clock has surely reached the deadline
        # despite the rounding of a drifting clock's conversion
        at = max(self.clock.to_global(deadline) + 1e-9, self.env.loop.now)
        if at == slot.timer_at:
            return
        slot.timer_token += 1
        slot.timer_at = at
        token = slot.timer_token
        inc = self.incarnation
        self.env.loop.at(at, lambda: self._tick(inc, ds, token))

    def _tick(self, inc: int, ds: str, token: int) -> None:
        if inc != self.incarnation:
            return
        slot = self.slots[ds]
        if token != slot.timer_token:
            return
        slot.timer_at = float("inf")
        self.pump(ds)

    # --- receiving

    def receive(self, p: Packet) -> None:
        env = self.env
        if not self.up:
            count(env.net.stats.dropped, "node_down")
            return
        kind = p.kind
        if kind is Kind.REQUEST or kind is Kind.HELLO:
            self._serve(p)
            return
        slot = self.slots.get(p.dataset)
        if slot is None:
            return
        if kind is Kind.HINT:
            msg = p.msg
            if p.decode or env.decode_all:
                try:
                    msg = decode(p.data)
                except WireError:
                    env.metrics.corrupt_frames += 1
                    return
            if isinstance(msg, Hint):
                env.metrics.sync_events += 1
                slot.sync.hint(msg, self.now())
                self.pump(p.dataset)
            return
        if kind is Kind.CHUNK and p.rid == slot.stream and slot.rid != p.rid:
            self._chunk(p, slot)
            return
        if p.rid == 0 or p.rid != slot.rid:
            env.metrics.answers_ignored += 1
            return
        if kind is Kind.ERROR:
            env.metrics.refusals += 1
            self._fail(p.dataset, slot, f"refused: {p.error}")
            return
        resp = self._decoded(p)
        if resp is None:
            self._fail(p.dataset, slot, "corrupt frame")
            return
        slot.rid = 0
        if kind is Kind.CHUNK:
            slot.deadline = env.loop.now + self.config.request_timeout
        else:
            slot.stream = 0
        env.metrics.sync_events += 1
        if env.on_answer is not None and slot.request is not None:
            env.on_answer(self.name, slot.request, resp)
        slot.sync.response(resp, self.now())
        self.pump(p.dataset)
        if slot.stream and not slot.sync.streaming:
            slot.stream = 0

    def _chunk(self, p: Packet, slot: _Slot) -> None:
        """A later chunk of the open snapshot stream."""
        if not slot.sync.streaming:
            slot.stream = 0
            self.env.metrics.answers_ignored += 1
            return
        resp = self._decoded(p)
        if resp is None:
            self._fail(p.dataset, slot, "corrupt frame")
            return
        slot.deadline = self.env.loop.now + self.config.request_timeout
        env = self.env
        env.metrics.sync_events += 1
        if env.on_answer is not None and slot.request is not None:
            env.on_answer(self.name, slot.request, resp)
        slot.sync.response(resp, self.now())
        self.pump(p.dataset)
        if slot.stream == p.rid and not slot.sync.streaming:
            slot.stream = 0

    def _decoded(self, p: Packet) -> Response | None:
        msg = p.msg
        if p.decode or self.env.decode_all:
            try:
                msg = decode(p.data)
            except WireError:
                self.env.metrics.corrupt_frames += 1
                return None
        return msg if isinstance(msg, _RESPONSE_TYPES) else None

    # --- relays

    def _serve(self, p: Packet) -> None:
        if not self.relay:
            return
        env = self.env
        if p.kind is Kind.HELLO:
            for ds in self.datasets:
                self._hint(p.src, ds)
            return
        view = self.views.get(p.dataset)
        if view is None or not view.ready:
            self.server.refuse(p, "the relay holds no synced dataset")
            return
        env.metrics.relay_requests += 1
        self.server.serve(p, view, self.config.responder)

    def publish(self, ds: str) -> None:
        """Push the mirror's cursor to every child (after a visible commit)."""
        for child in self.children:
            self._hint(child, ds)

    def _hint(self, child: str, ds: str) -> None:
        mirror = self.mirrors[ds]
        if mirror.cursor is None:
            return
        hint = Hint(ds, mirror.cursor, mirror.tree.digest)
        data = encode(hint)
        self.env.net.send(Packet(Kind.HINT, self.name, child, ds, 0, hint, data, len(data)))
        count(self.env.metrics.shipped, child, len(data))
