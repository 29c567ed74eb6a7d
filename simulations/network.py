"""The simulated network: per-link delivery queues and the faults on them.

Theory of operation
-------------------
Every directed link ``(src, dst)`` has its own queue of packets ordered by
delivery time. A link transmits one packet at a time at ``bandwidth`` (a
packet waits for those sent before it), and a packet arrives ``latency +
jitter`` after its transmission ends, the jitter drawn from a truncated
exponential; so delay and reordering come from one mechanism (a packet sent
later may draw a shorter jitter and overtake). When a link's earliest packet becomes due, the
event loop wakes the link and it hands every due packet to the receiver.

On top of that, all drawn from the network's own seeded PRNG:

* **loss** -- a packet is dropped at send time with probability ``loss``
  (hints additionally with ``hint_loss``: a lossy push channel);
* **duplication** -- a second copy is queued with its own delay (the receiver
  decodes it from its bytes and must shrug it off: answers are matched to
  requests by id, and applying a hint twice is harmless);
* **corruption** -- one byte of the frame is flipped; the receiver's frame
  decoder must reject it (checksum) and the request fails, never half-applied;
* **clogging** -- a link (or every link of a node) holds its packets until
  the clog ends, then delivers them in order: latency spikes without loss;
* **partitions** -- a :class:`Partition` blocks some directed pairs: one node
  isolated, the nodes split into two random halves, or an asymmetric split
  where one side can send and not receive. A packet is dropped if it is
  blocked when sent or when due.

Streams (a snapshot sent as one response of many chunks) behave like the TCP
connection they model: their packets are never duplicated, stay in order, and
the first lost packet breaks the stream (every later packet of it is dropped;
the receiver sees silence and times out).

The network does not know whether nodes are up: the receiver drops packets
that arrive while it is down. It never reads a clock or iterates a set.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from replicad.messages import Message
from simulations.loop import EventLoop
from simulations.wire import corrupt


class Kind(Enum):
    """What a packet carries."""

    REQUEST = "request"
    RESPONSE = "response"
    CHUNK = "chunk"
    """One chunk of a streamed snapshot response."""
    ERROR = "error"
    """A refusal: the server could not answer (bad frame, no such dataset)."""
    HINT = "hint"
    HELLO = "hello"
    """A (re)connecting replica asks its upstream for the current hints."""


@dataclass(slots=True)
class Packet:
    """One message in flight. ``data`` is the frame, ``size`` its length;
    ``decode`` tells the receiver to decode ``data`` instead of trusting
    ``msg`` (the network touched the bytes). ``rid`` matches an answer to its
    request; ``stream`` (non-zero) names the ordered stream a chunk belongs to."""

    kind: Kind
    src: str
    dst: str
    dataset: str
    rid: int
    msg: Message | None
    data: bytes
    size: int
    decode: bool = False
    stream: int = 0
    error: str = ""


@dataclass(frozen=True)
class Partition:
    """Directed pairs the network blocks.

    ``kind`` is ``"isolate"`` (``side`` is one node, cut off both ways),
    ``"halves"`` (no traffic between ``side`` and the rest) or
    ``"asymmetric"`` (``side`` cannot send to the rest; the rest can send to it).
    """

    kind: str
    side: frozenset[str]

    def blocks(self, src: str, dst: str) -> bool:
        a = src in self.side
        b = dst in self.side
        if self.kind == "asymmetric":
            return a and not b
        return a != b


@dataclass(frozen=True)
class NetConfig:
    """Link characteristics (seconds, bytes per second)."""

    latency: float = 0.002
    """Fixed one-way delay."""
    jitter: float = 0.003
    """Mean of the exponential jitter added to each packet."""
    jitter_cap: float = 0.05
    """Jitter is truncated here, so delivery times are bounded."""
    bandwidth: float = 50e6
    """Per-link transfer rate: a link transmits one packet at a time."""

    @property
    def max_one_way(self) -> float:
        """Upper bound of a packet's delay, before transfer time."""
        return self.latency + self.jitter_cap


@dataclass
class NetStats:
    """What the network did, for the report."""

    sent: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    duplicated: int = 0
    corrupted: int = 0
    delivered: int = 0


def _count(d: dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class _Link:
    __slots__ = ("heap", "tx_free", "wake_at")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Packet]] = []
        self.wake_at = float("inf")
        self.tx_free = 0.0
        """When the link has finished transmitting what was sent so far."""


class Network:
    """Carries :class:`Packet` objects between named nodes through per-link queues.

    ``deliver(packet)`` is called at the packet's delivery time. The fault
    knobs (``loss``, ``duplicate``, ``corrupt``, ``hint_loss``, ``partition``,
    clogs) are plain attributes the fault injector turns; :meth:`heal` resets
    them all.
    """

    def __init__(
        self,
        loop: EventLoop,
        rng: random.Random,
        config: NetConfig,
        deliver: Callable[[Packet], None],
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.config = config
        self.deliver = deliver
        self.stats = NetStats()
        self.loss = 0.0
        self.duplicate = 0.0
        self.corrupt = 0.0
        self.hint_loss = 0.0
        self.hint_loss_to: dict[str, float] = {}
        """Per-destination hint loss, overriding ``hint_loss`` (studies)."""
        self.partition: Partition | None = None
        self._link_clogs: dict[tuple[str, str], float] = {}
        self._node_clogs: dict[str, float] = {}
        self._links: dict[tuple[str, str], _Link] = {}
        self._seq = 0
        self._stream_last: dict[int, float] = {}
        self._stream_broken: dict[int, bool] = {}

    # --- faults

    def heal(self) -> None:
        """Stop every network fault: no loss, duplication, corruption,
        partition or clog from now on (packets already queued stay queued)."""
        self.loss = self.duplicate = self.corrupt = self.hint_loss = 0.0
        self.hint_loss_to.clear()
        self.partition = None
        self._link_clogs.clear()
        self._node_clogs.clear()

    def clog_link(self, src: str, dst: str, until: float) -> None:
        """Hold packets on ``src -> dst`` until ``until``."""
        key = (src, dst)
        self._link_clogs[key] = max(until, self._link_clogs.get(key, 0.0))

    def clog_node(self, node: str, until: float) -> None:
        """Hold packets on every link to or from ``node`` until ``until``."""
        self._node_clogs[node] = max(until, self._node_clogs.get(node, 0.0))

    def _clogged_until(self, src: str, dst: str) -> float:
        until = self._link_clogs.get((src, dst), 0.0)
        if self._node_clogs:
            until = max(until, self._node_clogs.get(src, 0.0), self._node_clogs.get(dst, 0.0))
        return until

    def _blocked(self, src: str, dst: str) -> bool:
        p = self.partition
        return p is not None and p.blocks(src, dst)

    # --- sending

    def _link(self, src: str, dst: str) -> _Link:
        key = (src, dst)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link()
        return link

    def _propagation(self) -> float:
        cfg = self.config
        jitter = min(self.rng.expovariate(1.0 / cfg.jitter), cfg.jitter_cap) if cfg.jitter else 0.0
        return cfg.latency + jitter

    def _arrival(self, p: Packet) -> float:
        """When ``p``, sent now, arrives: the link transmits one packet at a
        time at ``bandwidth`` (a packet waits for those sent before it), then
        the bits travel for ``latency + jitter``."""
        link = self._link(p.src, p.dst)
        start = max(self.loop.now, link.tx_free)
        link.tx_free = start + p.size / self.config.bandwidth
        return link.tx_free + self._propagation()

    def send(self, p: Packet) -> None:
        """Put ``p`` on its link, subject to the current faults."""
        stats = self.stats
        kind = p.kind.value
        _count(stats.sent, kind)
        _count(stats.bytes, kind, p.size)
        if p.stream:
            self._send_stream(p)
            return
        if self._blocked(p.src, p.dst):
            _count(stats.dropped, "partition")
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            _count(stats.dropped, "loss")
            return
        if p.kind is Kind.HINT:
            hint_loss = (
                self.hint_loss_to.get(p.dst, self.hint_loss)
                if self.hint_loss_to
                else self.hint_loss
            )
            if hint_loss and rng.random() < hint_loss:
                _count(stats.dropped, "hint_loss")
                return
        if self.corrupt and p.data and rng.random() < self.corrupt:
            stats.corrupted += 1
            p.data = corrupt(p.data, rng)
            p.decode = True
        arrival = self._arrival(p)
        self._enqueue(p, arrival)
        if self.duplicate and rng.random() < self.duplicate:
            stats.duplicated += 1
            copy = Packet(
                p.kind, p.src, p.dst, p.dataset, p.rid, p.msg, p.data, p.size, True, 0, p.error
            )
            self._enqueue(copy, arrival + self._propagation())

    def _send_stream(self, p: Packet) -> None:
        stats = self.stats
        sid = p.stream
        if self._stream_broken.get(sid, False):
            _count(stats.dropped, "stream_broken")
            return
        rng = self.rng
        if self._blocked(p.src, p.dst) or (self.loss and rng.random() < self.loss):
            _count(stats.dropped, "stream_break")
            self._stream_broken[sid] = True
            self._stream_last.pop(sid, None)
            return
        if self.corrupt and rng.random() < self.corrupt:
            stats.corrupted += 1
            p.data = corrupt(p.data, rng)
            p.decode = True
        when = max(self._arrival(p), self._stream_last.get(sid, 0.0))
        self._stream_last[sid] = when
        self._enqueue(p, when)

    def end_stream(self, sid: int) -> None:
        """The sender has sent every packet of stream ``sid``: forget its
        ordering state (a break is remembered until its packets are gone)."""
        self._stream_last.pop(sid, None)

    # --- delivery

    def _enqueue(self, p: Packet, when: float) -> None:
        key = (p.src, p.dst)
        link = self._link(*key)
        self._seq += 1
        heapq.heappush(link.heap, (when, self._seq, p))
        if when < link.wake_at:
            link.wake_at = when
            self.loop.at(when, lambda: self._wake(key, when))

    def _wake(self, key: tuple[str, str], scheduled: float) -> None:
        link = self._links[key]
        if scheduled != link.wake_at:
            return  # superseded by an earlier wake-up that already ran or will
        link.wake_at = float("inf")
        now = self.loop.now
        clog = self._clogged_until(*key)
        heap = link.heap
        if clog <= now:
            while heap and heap[0][0] <= now:
                p = heapq.heappop(heap)[2]
                if p.stream and self._stream_broken.get(p.stream, False):
                    _count(self.stats.dropped, "stream_broken")
                    continue
                if self._blocked(p.src, p.dst):
                    _count(self.stats.dropped, "partition")
                    if p.stream:
                        self._stream_broken[p.stream] = True
                    continue
                self.stats.delivered += 1
                self.deliver(p)
        if heap:
            when = max(heap[0][0], clog)
            link.wake_at = when
            self.loop.at(when, lambda: self._wake(key, when))

    @property
    def in_flight(self) -> int:
        """Packets queued on all links."""
        return sum(len(link.heap) for link in self._links.values())
