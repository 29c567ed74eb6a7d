"""One simulation run: build the world from a scenario and a seed, run it, check it.

Theory of operation
-------------------
:func:`build` draws everything that varies per seed from one
``random.Random(seed)``, in a fixed order (topology, snapshot mode, fault
profile, then one derived stream each for the network, the faults, the
writers, the readers, the epochs and every replica's jitter), so a seed names
one run exactly. :meth:`World.run` then has three phases:

1. **start** -- the origin loads its initial records; replicas start at
   random times in the first second and bootstrap;
2. **faults** -- for ``scenario.duration`` seconds, writers write, readers
   read, and the injector fires the drawn faults; every replica commit and
   every read is checked (:mod:`simulations.invariants`);
3. **liveness** -- everything heals, writers stop, and every replica must
   reach the origin's final cursor with exactly its content within
   :func:`convergence_bound` seconds. The run stops as soon as they all have.

A broken invariant, an exception escaping the protocol core, or a missed
bound ends the run with a :class:`~simulations.invariants.InvariantError`.
"""

from __future__ import annotations

import gc
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from replicad.memory import MemoryDataset, MemoryMirror
from replicad.merkle import Geometry
from replicad.messages import Cursor
from replicad.replica import SyncConfig
from replicad.responder import ResponderConfig
from replicad.version_queue import policy_by_name
from simulations.faults import FaultInjector, FaultProfile, draw_profile
from simulations.history import OriginHistory
from simulations.invariants import Checker, InvariantError, Watch
from simulations.loop import EventLoop
from simulations.metrics import Metrics
from simulations.network import Network, Packet
from simulations.nodes import Env, OriginNode, ReplicaConfig, ReplicaNode
from simulations.scenarios import Range, Scenario
from simulations.workload import Readers, Writer

MirrorFactory = Callable[[Geometry], MemoryMirror]


def convergence_bound(
    s: Scenario, depth: int, profile: FaultProfile, poll_interval: float | None = None
) -> float:
    """Seconds after the heal by which every replica must have converged.

    Per level of the tree: a request lost just before the heal times out
    (``request_timeout``), the backoff that follows is at most
    ``backoff_max``, a clock stepped back delays the next poll by up to
    ``max_jump``, a sync that read an older state before the heal is
    followed by a poll (``poll_interval``), and two complete syncs of the
    slowest kind fit in ``2 * sync_time``, where ``sync_time`` is 12 round
    trips at the largest one-way delay plus twice the dataset's transfer
    time (Merkle repair falling back to a snapshot). Levels add up: a replica
    can only converge after its upstream has. ``poll_interval`` overrides the
    scenario's (the longest of the replicas', when a study sets them apart).
    """
    n = s.net
    rtt = 2 * (n.max_one_way + 64 * 1024 / n.bandwidth)
    w = s.workload
    dataset_bytes = w.keyspace * (w.value_size * 1.5 + 32)
    sync_time = 12 * rtt + 2 * dataset_bytes / n.bandwidth
    jump = profile.max_jump if profile.skew_rate > 0 else 0.0
    poll = s.poll_interval if poll_interval is None else poll_interval
    level = s.request_timeout + s.backoff_max + jump + poll + 2 * sync_time
    return round(depth * level + 1.0, 6)


@dataclass
class RunResult:
    """What a finished run hands to the report."""

    seed: int
    scenario: Scenario
    profile: FaultProfile
    topology: dict[str, object]
    violation: InvariantError | None
    heal_at: float
    bound: float
    converged_at: float | None
    end: float
    world: World


@dataclass
class World:
    """All the parts of one run, wired together."""

    seed: int
    scenario: Scenario
    profile: FaultProfile
    env: Env
    origin: OriginNode
    histories: dict[str, OriginHistory]
    sidecars: list[ReplicaNode]
    relays: list[ReplicaNode]
    writer: Writer
    readers: Readers
    injector: FaultInjector
    depth: int
    stream: bool
    starts: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[float, str, str, int]] = field(default_factory=list)
    _waiting: set[tuple[str, str]] = field(default_factory=set)
    _converged_time: float | None = None
    _targets: dict[str, Cursor] = field(default_factory=dict)

    @property
    def replicas(self) -> list[ReplicaNode]:
        return self.relays + self.sidecars

    def topology_json(self) -> dict[str, object]:
        return {
            "datasets": sorted(self.origin.datasets),
            "sidecars": len(self.sidecars),
            "relays": len(self.relays),
            "depth": self.depth,
            "snapshot_stream": self.stream,
            "decode_all": self.env.decode_all,
        }

    # --- running

    def run(self) -> RunResult:
        """Run the three phases; never raises for a finding (see the result)."""
        s = self.scenario
        loop = self.env.loop
        poll = max((n.config.sync.poll_interval for n in self.replicas), default=0.0)
        bound = convergence_bound(s, self.depth, self.profile, poll)
        heal_at = s.duration
        converged_at: float | None = None
        violation: InvariantError | None = None
        # The world's objects live for the whole run and hold no garbage
        # cycles: keep the cyclic collector from re-scanning them (a quarter
        # of the wall time of a 10,000-replica run otherwise).
        gc.collect()
        gc.freeze()
        try:
            self.writer.initial_load()
            for node in self.replicas:
                loop.at(self.starts[node.name], node.start)
            self.writer.start(until=heal_at)
            self.readers.start(until=heal_at + bound)
            self.injector.start(min(s.warmup, heal_at), heal_at)
            loop.run(heal_at)
            self.writer.stop()
            self.injector.heal()
            self._targets = {n: ds.cursor for n, ds in self.origin.datasets.items()}
            self._waiting = {
                (w.node, w.dataset) for w in self.env.checker.watches if not self._converged(w)
            }
            if self._waiting:
                loop.run(heal_at + bound)
            if self._waiting:
                raise self._not_converged(heal_at, bound)
            converged_at = self._converged_time if self._converged_time is not None else heal_at
            for w in self.env.checker.watches:
                self.env.checker.full_check(w, loop.now)
        except InvariantError as v:
            violation = v
        except Exception as exc:  # the protocol core (or the harness) broke
            tb = traceback.format_exception(exc)
            detail = "".join(tb[-4:]).strip().replace("\n", " | ")
            violation = InvariantError("exception", "-", "-", loop.now, detail)
        finally:
            gc.unfreeze()
        self.readers.stop()
        return RunResult(
            seed=self.seed,
            scenario=s,
            profile=self.profile,
            topology=self.topology_json(),
            violation=violation,
            heal_at=heal_at,
            bound=bound,
            converged_at=converged_at,
            end=loop.now,
            world=self,
        )

    def _converged(self, w: Watch) -> bool:
        return w.mirror.cursor == self._targets.get(w.dataset) and w.cursor == w.mirror.cursor

    def on_commit(self, w: Watch, now: float) -> None:
        """Called by the checker after every checked commit."""
        if self.scenario.timeline:
            self.timeline.append((now, w.node, w.dataset, w.seq))
        if self._waiting and self._converged(w):
            self._waiting.discard((w.node, w.dataset))
            if not self._waiting:
                self._converged_time = now
                self.env.loop.stop()

    def _not_converged(self, heal_at: float, bound: float) -> InvariantError:
        late: list[str] = []
        for node in self.replicas:
            for ds in node.datasets:
                w = node.watches[ds]
                if self._converged(w):
                    continue
                slot = node.slots.get(ds)
                state = (
                    "down"
                    if slot is None
                    else f"phase={slot.sync.phase.value} error={slot.sync.stats.last_error!r}"
                )
                late.append(f"{node.name}/{ds} at {w.mirror.cursor} ({state})")
        target = ", ".join(f"{n}={c}" for n, c in sorted(self._targets.items()))
        return InvariantError(
            "convergence",
            late[0].split("/")[0] if late else "-",
            "-",
            heal_at + bound,
            f"{len(late)} replica datasets did not reach {target} within {bound:.3f} s "
            f"of the heal: {'; '.join(late[:4])}",
        )


def _draw(rng: random.Random, r: Range) -> int:
    return r[0] if r[0] >= r[1] else rng.randint(r[0], r[1])


def build(
    scenario: Scenario,
    seed: int,
    *,
    mirror_factory: MirrorFactory = MemoryMirror,
    on_write: Callable[[str, frozenset[bytes]], None] | None = None,
) -> World:
    """Build the world of ``scenario`` for ``seed`` (see the module docstring).

    ``mirror_factory`` builds every replica's mirror (tests inject faulty
    mirrors through it); ``on_write`` sees every origin write (studies).
    """
    s = scenario
    rng = random.Random(seed)
    topo = s.topology
    n_datasets = _draw(rng, topo.datasets)
    n_direct = _draw(rng, topo.direct)
    level_counts = [_draw(rng, r) for r in topo.tree]
    n_leaves = _draw(rng, topo.leaves)
    stream = rng.random() < 0.5 if s.snapshot_stream is None else s.snapshot_stream
    profile = draw_profile(s.faults, rng)
    decode_all = rng.random() < 0.5 if s.decode_all is None else s.decode_all
    streams = {
        name: random.Random(rng.getrandbits(64))
        for name in ("net", "faults", "writer", "readers", "epochs", "replicas", "starts")
    }

    loop = EventLoop()
    metrics = Metrics()
    histories: dict[str, OriginHistory] = {}
    checker = Checker(histories, metrics, full_check_every=s.full_check_every)
    nodes: dict[str, OriginNode | ReplicaNode] = {}

    def deliver(p: Packet) -> None:
        nodes[p.dst].receive(p)

    net = Network(loop, streams["net"], s.net, deliver)
    env = Env(loop, net, checker, metrics, decode_all=decode_all)
    env.fault_rng = random.Random(streams["faults"].getrandbits(64))
    geometry = s.geom
    responder = ResponderConfig(
        max_diff_keys=s.max_diff_keys, max_merkle_indices=s.max_merkle_indices
    )
    datasets: dict[str, MemoryDataset] = {}
    for i in range(n_datasets):
        name = f"ds{i}"
        epoch = streams["epochs"].randbytes(16)
        datasets[name] = MemoryDataset(
            name,
            epoch,
            geometry=geometry,
            max_entries=s.max_entries,
            max_keys=s.max_keys,
            policy=policy_by_name(s.policy),
        )
        histories[name] = OriginHistory(name, datasets[name].cursor, 0.0)
    origin = OriginNode(env, datasets, responder, s.origin_service)
    nodes[origin.name] = origin
    config = ReplicaConfig(
        sync=SyncConfig(
            poll_interval=s.poll_interval,
            backoff_base=s.backoff_base,
            backoff_max=s.backoff_max,
            snapshot_chunk=s.snapshot_chunk,
            snapshot_stream=stream,
            merkle_levels_per_query=s.merkle_levels,
            merkle_max_per_query=s.max_merkle_indices,  # the servers' bound
        ),
        request_timeout=s.request_timeout,
        responder=responder,
        relay_max_entries=s.relay_max_entries,
        relay_service=s.relay_service,
    )
    names = sorted(datasets)
    rep_rng = streams["replicas"]

    def replica(name: str, upstream: str, relay: bool) -> ReplicaNode:
        node = ReplicaNode(
            env,
            name,
            upstream,
            names,
            geometry=geometry,
            config=config,
            rng=random.Random(rep_rng.getrandbits(64)),
            relay=relay,
            mirror_factory=mirror_factory,
        )
        nodes[name] = node
        parent = nodes[upstream]
        parent.children.append(name)
        return node

    relays: list[ReplicaNode] = []
    sidecars: list[ReplicaNode] = []
    parents = [origin.name]
    levels = 0
    for level, per_parent in enumerate(level_counts, start=1):
        current: list[str] = []
        for parent in parents:
            for _ in range(per_parent):
                name = f"r{level}.{len(relays):04d}"
                relays.append(replica(name, parent, True))
                current.append(name)
        if not current:
            break
        parents = current
        levels = level
    if levels:
        for parent in parents:
            for _ in range(n_leaves):
                sidecars.append(replica(f"s{len(sidecars):05d}", parent, False))
    depth = max(1, levels + (1 if levels and n_leaves else 0))
    for _ in range(n_direct):
        sidecars.append(replica(f"s{len(sidecars):05d}", origin.name, False))

    writer = Writer(env, origin, histories, streams["writer"], s.workload, on_write=on_write)
    replicas = relays + sidecars
    readers = Readers(env, replicas, streams["readers"], s.workload)
    injector = FaultInjector(
        env,
        profile,
        streams["faults"],
        origin=origin,
        histories=histories,
        sidecars=sidecars,
        relays=relays,
    )
    start_rng = streams["starts"]
    starts = {n.name: round(start_rng.uniform(0.0, s.start_spread), 6) for n in replicas}
    world = World(
        seed=seed,
        scenario=s,
        profile=profile,
        env=env,
        origin=origin,
        histories=histories,
        sidecars=sidecars,
        relays=relays,
        writer=writer,
        readers=readers,
        injector=injector,
        depth=depth,
        stream=stream,
        starts=starts,
    )
    checker.on_commit = world.on_commit
    return world


def run(
    scenario: Scenario, seed: int, *, mirror_factory: MirrorFactory = MemoryMirror
) -> RunResult:
    """Build and run one seed."""
    return build(scenario, seed, mirror_factory=mirror_factory).run()
