"""Fault model: what can go wrong, how often (drawn per seed), and when.

Theory of operation
-------------------
A scenario gives a :class:`FaultSpec`: for each fault, the *largest* rate it
may have. :func:`draw_profile` turns it into a :class:`FaultProfile` for one
seed. With ``swarm`` set (swarm testing), each fault is independently switched
on or off and, when on, gets a rate drawn between 10 % and 100 % of its bound:
different seeds explore different mixes, and a fault that masks another (much
loss hides reordering, say) is absent from many runs.

:class:`FaultInjector` applies the profile during the fault phase:

* network faults -- packet loss, duplication, corruption and hint loss are
  probabilities the network applies to every packet; clogs (one link, or
  every link of a node, held for a while) arrive as a Poisson process;
* partitions alternate with stability periods: a stable period (exponential,
  mean ``1 / partition_rate``), then a partition of a random kind (one node
  isolated, two random halves, or an asymmetric split) for an exponential
  duration, then stable again;
* node faults arrive as Poisson processes: a sidecar crash (restarted after
  an exponential downtime, keeping only its mirror), a relay crash (its
  in-memory history is lost), an origin restart (down for a while, then back
  with its history -- same epoch -- or, with probability ``lose_history``,
  without it: a new epoch at the same content), and clock skew on a replica
  (a jump of up to ``max_jump`` seconds either way, or a drift of up to
  ``max_drift``);
* storage faults -- a replica's write transaction fails and rolls back with
  probability ``storage_errors`` (a full disk): the state machine is told
  with ``apply_failed`` and must retry from durable state.

:meth:`FaultInjector.heal` ends the fault phase: every network fault stops,
every crashed node restarts, the origin comes back, clocks run at rate 1
again (without jumping back). Every fault that fires is counted by kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from simulations.history import OriginHistory
from simulations.network import Partition
from simulations.nodes import Env, OriginNode, ReplicaNode

PARTITION_KINDS = ("isolate", "halves", "asymmetric")


@dataclass(frozen=True)
class FaultSpec:
    """Upper bounds of the fault rates (probabilities per packet; events per
    second of simulated time for the rest; means in seconds)."""

    swarm: bool = True
    loss: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    hint_loss: float = 0.0
    clog_rate: float = 0.0
    partition_rate: float = 0.0
    sidecar_crash_rate: float = 0.0
    relay_crash_rate: float = 0.0
    origin_restart_rate: float = 0.0
    skew_rate: float = 0.0
    storage_errors: float = 0.0
    """Probability that a replica's write transaction fails and rolls back."""
    lose_history: float = 0.5
    """Probability that an origin restart loses the history (new epoch)."""
    clog_duration: float = 1.5
    partition_duration: float = 3.0
    downtime: float = 2.0
    max_jump: float = 2.0
    max_drift: float = 0.05
    partition_kinds: tuple[str, ...] = PARTITION_KINDS


FaultProfile = FaultSpec
"""A drawn profile has the same fields; its rates are the ones in force."""

_RATES = (
    "loss",
    "duplicate",
    "corrupt",
    "hint_loss",
    "clog_rate",
    "partition_rate",
    "sidecar_crash_rate",
    "relay_crash_rate",
    "origin_restart_rate",
    "skew_rate",
    "storage_errors",
)


def draw_profile(spec: FaultSpec, rng: random.Random) -> FaultProfile:
    """The fault rates of one seed (see the module docstring)."""
    if not spec.swarm:
        return spec
    drawn: dict[str, Any] = {}
    for name in _RATES:
        bound = float(getattr(spec, name))
        on = rng.random() < 0.5
        factor = rng.uniform(0.1, 1.0)
        drawn[name] = round(bound * factor, 6) if on and bound > 0 else 0.0
    return replace(spec, swarm=False, **drawn)


def profile_json(p: FaultProfile) -> dict[str, object]:
    """The profile as JSON-ready values."""
    out: dict[str, object] = {}
    for f in fields(p):
        v = getattr(p, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


class FaultInjector:
    """Fires the faults of a profile between ``start`` and ``end``."""

    def __init__(
        self,
        env: Env,
        profile: FaultProfile,
        rng: random.Random,
        *,
        origin: OriginNode,
        histories: dict[str, OriginHistory],
        sidecars: list[ReplicaNode],
        relays: list[ReplicaNode],
    ) -> None:
        self.env = env
        self.profile = profile
        self.rng = rng
        self.origin = origin
        self.histories = histories
        self.sidecars = sidecars
        self.relays = relays
        self.replicas = relays + sidecars
        self.names = sorted([origin.name] + [r.name for r in self.replicas])
        self.fired: dict[str, int] = {}
        self.active = False
        self._end = 0.0
        self._origin_gen = 0
        self._origin_lose = False
        self._node_gen: dict[str, int] = {}

    def _fire(self, kind: str) -> None:
        self.fired[kind] = self.fired.get(kind, 0) + 1

    def start(self, start: float, end: float) -> None:
        """Schedule the faults of the profile for ``[start, end)``."""
        loop = self.env.loop
        self._end = end
        p = self.profile

        def begin() -> None:
            self.active = True
            net = self.env.net
            net.loss, net.duplicate, net.corrupt = p.loss, p.duplicate, p.corrupt
            net.hint_loss = p.hint_loss
            self.env.storage_errors = p.storage_errors

        loop.at(start, begin)
        self._poisson(start, p.clog_rate, self._clog)
        self._poisson(start, p.sidecar_crash_rate, lambda: self._crash(self.sidecars, "sidecar"))
        self._poisson(start, p.relay_crash_rate, lambda: self._crash(self.relays, "relay"))
        self._poisson(start, p.origin_restart_rate, self._origin_down)
        self._poisson(start, p.skew_rate, self._skew)
        if p.partition_rate > 0:
            loop.at(start + self.rng.expovariate(p.partition_rate), self._partition)

    def _poisson(self, start: float, rate: float, fire: Callable[[], None]) -> None:
        if rate <= 0:
            return
        loop = self.env.loop

        def arrive() -> None:
            if loop.now >= self._end:
                return
            fire()
            loop.after(self.rng.expovariate(rate), arrive)

        loop.at(start + self.rng.expovariate(rate), arrive)

    # --- network

    def _clog(self) -> None:
        if not self.replicas:
            return
        rng = self.rng
        node = self.replicas[rng.randrange(len(self.replicas))]
        until = self.env.loop.now + rng.expovariate(1.0 / self.profile.clog_duration)
        net = self.env.net
        if rng.random() < 0.5:
            net.clog_node(node.name, until)
            self._fire("clog_node")
        elif rng.random() < 0.5:
            net.clog_link(node.name, node.upstream, until)
            self._fire("clog_link")
        else:
            net.clog_link(node.upstream, node.name, until)
            self._fire("clog_link")

    def _partition(self) -> None:
        loop = self.env.loop
        if loop.now >= self._end:
            return
        rng = self.rng
        p = self.profile
        kind = p.partition_kinds[rng.randrange(len(p.partition_kinds))]
        names = self.names
        if kind == "isolate":
            side = frozenset([names[rng.randrange(len(names))]])
        else:
            chosen = [n for n in names if rng.random() < 0.5]
            if not chosen or len(chosen) == len(names):
                chosen = [names[rng.randrange(len(names))]]
            side = frozenset(chosen)
        self.env.net.partition = Partition(kind, side)
        self._fire(f"partition_{kind}")
        duration = rng.expovariate(1.0 / p.partition_duration)

        def stable() -> None:
            self.env.net.partition = None
            if loop.now < self._end:
                loop.after(rng.expovariate(p.partition_rate), self._partition)

        loop.after(duration, stable)

    # --- nodes

    def _crash(self, pool: list[ReplicaNode], kind: str) -> None:
        up = [n for n in pool if n.up]
        if not up:
            return
        rng = self.rng
        node = up[rng.randrange(len(up))]
        node.crash()
        self._fire(f"{kind}_crash")
        gen = self._node_gen.get(node.name, 0) + 1
        self._node_gen[node.name] = gen

        def restart() -> None:
            if self._node_gen.get(node.name) == gen and self.active:
                node.start()

        self.env.loop.after(rng.expovariate(1.0 / self.profile.downtime), restart)

    def _origin_down(self) -> None:
        if not self.origin.up:
            return
        self.origin.stop()
        self._origin_gen += 1
        gen = self._origin_gen
        self._origin_lose = self.rng.random() < self.profile.lose_history
        self._fire("origin_restart")

        def back() -> None:
            if gen == self._origin_gen and self.active:
                self._origin_up()

        self.env.loop.after(self.rng.expovariate(1.0 / self.profile.downtime), back)

    def _origin_up(self) -> None:
        origin = self.origin
        if origin.up:
            return
        self._origin_gen += 1
        if self._origin_lose:
            self._fire("origin_history_loss")
            for name in sorted(origin.datasets):
                ds = origin.datasets[name]
                ds.lose_history(self.rng.randbytes(16))
                self.histories[name].alias(ds.cursor)
        origin.up = True
        origin.reconnect_children()

    def _skew(self) -> None:
        if not self.replicas:
            return
        rng = self.rng
        node = self.replicas[rng.randrange(len(self.replicas))]
        now = self.env.loop.now
        if rng.random() < 0.5:
            node.clock.jump(now, rng.uniform(-self.profile.max_jump, self.profile.max_jump))
            self._fire("clock_jump")
        else:
            d = self.profile.max_drift
            node.clock.set_rate(now, 1.0 + rng.uniform(-d, d))
            self._fire("clock_drift")
        node.clock_changed()

    # --- the end of the fault phase

    def heal(self) -> None:
        """Stop every fault and bring every node back."""
        self.active = False
        self.env.net.heal()
        self.env.storage_errors = 0.0
        self._origin_up()
        now = self.env.loop.now
        for node in self.replicas:
            if node.clock.rate != 1.0:
                node.clock.set_rate(now, 1.0)
                node.clock_changed()
        for node in self.replicas:
            self._node_gen[node.name] = self._node_gen.get(node.name, 0) + 1
            node.start()
