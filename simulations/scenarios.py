"""Named scenarios: topology, load, network, sync settings and fault bounds.

Theory of operation
-------------------
A :class:`Scenario` is a frozen description; ranges in it (how many
sidecars, relays, datasets; whether snapshots stream) are drawn per seed by
the world, like the fault rates, so one scenario name covers a family of
runs. :data:`SCENARIOS` holds the named ones; ``swarm`` is the default of
``python -m simulations swarm`` and draws the most. The studies build their
own scenarios with :func:`dataclasses.replace`.

Topology: ``direct`` sidecars sync from the origin; ``tree`` lists, per relay
level, how many relays hang under each node of the level above (the first
level under the origin), and ``leaves`` how many sidecars hang under each
relay of the last level. A replica's *depth* is its distance from the origin
(1 for a direct sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from replicad.merkle import Geometry
from simulations.faults import FaultSpec
from simulations.network import NetConfig
from simulations.nodes import ServiceModel
from simulations.workload import WorkloadConfig

Range = tuple[int, int]

DEFAULT_SERVICE = ServiceModel(per_request=0.0005, egress=125e6)
"""0.5 ms of work per request and a 1 Gbit/s link out, one request at a time.
(The real origin spends about 2.5 ms in one small diff request, see
``docs/benchmarks.md``; the simulation is kinder, which only favours direct
fan-out.)"""


@dataclass(frozen=True)
class Topology:
    direct: Range = (3, 3)
    tree: tuple[Range, ...] = ()
    leaves: Range = (0, 0)
    datasets: Range = (1, 1)

    @property
    def depth(self) -> int:
        """Deepest replica's distance from the origin."""
        if not self.tree:
            return 1
        return len(self.tree) + (1 if self.leaves[1] > 0 else 0)


@dataclass(frozen=True)
class Scenario:
    """Everything a run needs besides its seed."""

    name: str
    description: str
    topology: Topology = field(default_factory=Topology)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    faults: FaultSpec = field(default_factory=FaultSpec)
    net: NetConfig = field(default_factory=NetConfig)
    duration: float = 30.0
    """Length of the fault phase (writers run during it); then everything heals."""
    warmup: float = 2.0
    """Faults start this long after the beginning."""
    start_spread: float = 1.0
    """Replicas start at uniform times in [0, start_spread]."""
    poll_interval: float = 2.0
    backoff_base: float = 0.05
    backoff_max: float = 4.0
    request_timeout: float = 1.0
    snapshot_chunk: int = 64
    snapshot_stream: bool | None = None
    """None: drawn per seed."""
    merkle_levels: int = 2
    geometry: tuple[int, int] = (4, 3)
    """Merkle fan-out and depth (small trees keep thousands of replicas cheap)."""
    max_entries: int = 64
    max_keys: int | None = None
    policy: str = "binary-counter"
    max_diff_keys: int = 250_000
    max_merkle_indices: int = 4_096
    """Nodes or leaves one Merkle request may name (the responder's bound)."""
    relay_max_entries: int = 64
    full_check_every: int = 25
    decode_all: bool | None = False
    """Decode every frame at its receiver (None: drawn per seed); corrupted
    and duplicated frames are always decoded."""
    timeline: bool = True
    """Record every replica commit (time, content version) for plots."""
    origin_service: ServiceModel = field(default_factory=lambda: DEFAULT_SERVICE)
    relay_service: ServiceModel = field(default_factory=lambda: DEFAULT_SERVICE)

    @property
    def geom(self) -> Geometry:
        return Geometry(*self.geometry)


_ALL_FAULTS = FaultSpec(
    swarm=True,
    loss=0.15,
    duplicate=0.05,
    corrupt=0.02,
    hint_loss=0.5,
    clog_rate=0.3,
    partition_rate=0.15,
    sidecar_crash_rate=0.25,
    relay_crash_rate=0.1,
    origin_restart_rate=0.05,
    skew_rate=0.2,
    storage_errors=0.03,
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "quiet",
            "No faults: an origin, three sidecars and a relay with two children.",
            topology=Topology(direct=(3, 3), tree=((1, 1),), leaves=(2, 2)),
            faults=FaultSpec(swarm=False),
        ),
        Scenario(
            "swarm",
            "Everything drawn per seed: 1-6 direct sidecars, 0-2 relays with 1-3 "
            "children, 1-2 datasets, every fault on or off with a random rate.",
            topology=Topology(direct=(1, 6), tree=((0, 2),), leaves=(1, 3), datasets=(1, 2)),
            faults=_ALL_FAULTS,
            decode_all=None,
        ),
        Scenario(
            "network",
            "Only network faults, all on: loss, duplication, corruption, reordering, "
            "clogs, partitions of every kind.",
            topology=Topology(direct=(3, 5), tree=((1, 1),), leaves=(2, 2)),
            net=NetConfig(jitter=0.01, jitter_cap=0.2),
            decode_all=True,
            faults=FaultSpec(
                swarm=False,
                loss=0.1,
                duplicate=0.05,
                corrupt=0.02,
                hint_loss=0.3,
                clog_rate=0.3,
                partition_rate=0.2,
            ),
        ),
        Scenario(
            "crashes",
            "Only node faults, all on: sidecar and relay crashes, origin restarts "
            "with and without history, clock skew.",
            topology=Topology(direct=(3, 5), tree=((1, 2),), leaves=(1, 3)),
            faults=FaultSpec(
                swarm=False,
                sidecar_crash_rate=0.4,
                relay_crash_rate=0.2,
                origin_restart_rate=0.1,
                skew_rate=0.3,
                storage_errors=0.05,
            ),
        ),
        Scenario(
            "epochs",
            "Frequent origin history loss and bulk replaces: Merkle repair and "
            "snapshots under load.",
            topology=Topology(direct=(2, 4), tree=((1, 1),), leaves=(1, 2)),
            workload=WorkloadConfig(bulk_probability=0.03),
            faults=FaultSpec(
                swarm=False, origin_restart_rate=0.2, lose_history=0.9, loss=0.03, downtime=0.5
            ),
        ),
        Scenario(
            "relays",
            "A relay tree of depth 3 under faults: relays crash and lose history.",
            topology=Topology(direct=(1, 2), tree=((1, 2), (1, 2)), leaves=(1, 2)),
            faults=replace(_ALL_FAULTS, relay_crash_rate=0.3),
        ),
        Scenario(
            "merkle-limits",
            "Epoch changes while replicas lag a little, against a responder that "
            "takes at most 16 Merkle nodes or leaves per request with a 256-leaf tree: "
            "to these datasets what the default bound (4,096 of 65,536 leaves) is to "
            "a big one. Reproduced a core bug (a leaf query above the bound was "
            "refused forever), fixed by splitting queries at the bound.",
            topology=Topology(direct=(2, 4)),
            geometry=(4, 4),
            max_merkle_indices=16,
            faults=FaultSpec(swarm=False, origin_restart_rate=0.15, lose_history=1.0, downtime=0.5),
        ),
        Scenario(
            "tiny-queue",
            "A 4-entry version queue holding at most 40 keys and diffs capped at 30 "
            "keys: replicas keep falling off the history into Merkle and snapshots.",
            topology=Topology(direct=(2, 4), tree=((1, 1),), leaves=(1, 2)),
            max_entries=4,
            max_keys=40,
            max_diff_keys=30,
            relay_max_entries=4,
            faults=_ALL_FAULTS,
        ),
    ]
}


def scenario(name: str) -> Scenario:
    """The named scenario; raises KeyError with the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
