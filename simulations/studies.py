"""The four studies of ``docs/simulations.md``, each one command.

Theory of operation
-------------------
A study is a set of simulation runs that differ in one or two parameters,
with the measurement the question needs. Each study builds its scenarios from
:class:`~simulations.scenarios.Scenario` with :func:`dataclasses.replace`,
runs them with fixed seeds (so a study is reproducible too), writes a PNG
(``sim-<study>.png``) and returns a markdown report with the figures' table.
Every run must hold every invariant; a violation aborts the study.

1. ``merge`` -- merge policies of the origin's version queue: redundancy of
   diffs as a function of the replica's lag and of the queue length, under a
   realistic mix of lags (most replicas follow hints, a tail polls slowly).
2. ``fanout`` -- 10,000 sidecars directly under the origin, and through relay
   trees of depth 2 and 3: origin requests and bytes per write, propagation
   delay percentiles.
3. ``hints`` -- hint loss rate against staleness, for several safety-poll
   intervals.
4. ``recovery`` -- after an epoch change, Merkle repair against a full
   snapshot: time and bytes to converge, by dataset size and by the fraction
   of keys that changed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from replicad.messages import CursorUnservable, DiffRequest, DiffResponse, Request, Response
from replicad.replica import SyncConfig
from simulations.faults import FaultSpec
from simulations.invariants import Watch
from simulations.network import NetConfig
from simulations.plots import plot_bars, plot_lines
from simulations.report import percentiles, r6
from simulations.scenarios import Scenario, Topology
from simulations.workload import WorkloadConfig
from simulations.world import RunResult, World, build

NO_FAULTS = FaultSpec(swarm=False)


def _check(result: RunResult, what: str) -> RunResult:
    if result.violation is not None:
        raise RuntimeError(f"study run {what} broke an invariant: {result.violation}")
    return result


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 10_000 or abs(x) < 0.001):
        return f"{x:,.0f}" if abs(x) >= 10_000 else f"{x:.2e}"
    return f"{x:.{digits}g}"


# --- 1. merge policy -------------------------------------------------------------

POLICIES = ("halving", "oldest-first", "binary-counter")
LAG_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 1 << 30)


@dataclass(frozen=True)
class LagClass:
    name: str
    poll: float
    hints: bool
    count: int


MERGE_CLASSES = (
    LagClass("hinted", 5.0, True, 8),
    LagClass("poll 1 s", 1.0, False, 4),
    LagClass("poll 4 s", 4.0, False, 4),
    LagClass("poll 16 s", 16.0, False, 4),
    LagClass("poll 64 s", 64.0, False, 2),
    LagClass("poll 256 s", 256.0, False, 2),
)


def merge_scenario(policy: str, q: int, *, quick: bool) -> Scenario:
    n = len(MERGE_CLASSES) if quick else sum(c.count for c in MERGE_CLASSES)
    return Scenario(
        "study-merge",
        "merge policy study",
        topology=Topology(direct=(n, n)),
        workload=WorkloadConfig(
            keyspace=20_000,
            initial_records=20_000,
            value_size=32,
            write_rate=10.0,
            batch_keys=20.0,
            delete_fraction=0.05,
            bulk_probability=0.0,
            meta_probability=0.0,
            read_rate=0.0,
        ),
        faults=NO_FAULTS,
        duration=150.0 if quick else 900.0,
        poll_interval=5.0,
        request_timeout=30.0,
        backoff_max=10.0,
        snapshot_chunk=5_000,
        snapshot_stream=True,
        geometry=(16, 2),
        max_entries=q,
        policy=policy,
        full_check_every=0,
        timeline=False,
    )


def _assign_lag_classes(world: World, *, quick: bool) -> dict[str, str]:
    classes: dict[str, str] = {}
    sidecars = list(world.sidecars)
    i = 0
    for c in MERGE_CLASSES:
        for _ in range(1 if quick else c.count):
            node = sidecars[i]
            i += 1
            node.config = replace(node.config, sync=replace(node.config.sync, poll_interval=c.poll))
            if not c.hints:
                world.env.net.hint_loss_to[node.name] = 1.0
            classes[node.name] = c.name
    return classes


def _bucket(lag: int) -> int:
    for i in range(len(LAG_BUCKETS) - 1):
        if lag < LAG_BUCKETS[i + 1]:
            return i
    return len(LAG_BUCKETS) - 2


def _bucket_label(i: int) -> str:
    lo, hi = LAG_BUCKETS[i], LAG_BUCKETS[i + 1] - 1
    return f"{lo}" if lo == hi else (f"{lo}+" if hi > 1 << 20 else f"{lo}-{hi}")


class _MergeProbe:
    """Measures every plain diff answer: bytes shipped against the bytes of
    an exact queue's answer (the keys written in the diff's version range).

    Only diffs answered after ``start`` *from* a version written after
    ``start`` count: both ends in the queue's steady state (the initial load,
    version 1, holds every key, and merging it into its neighbours says
    nothing about a policy)."""

    def __init__(self, world: World, classes: dict[str, str], start: float) -> None:
        self.loop = world.env.loop
        self.classes = classes
        self.start = start
        self.written: list[frozenset[bytes]] = [frozenset()]
        nb = len(LAG_BUCKETS) - 1
        self.shipped = [0] * nb
        self.needed = [0] * nb
        self.diffs = [0] * nb
        self.by_class: dict[str, list[int]] = {}
        self.floor = 1 << 62
        self.fallbacks = 0
        world.env.loop.at(start, self._start)

    def _start(self) -> None:
        self.floor = len(self.written) - 1

    def on_write(self, _: str, keys: frozenset[bytes]) -> None:
        self.written.append(keys)  # one dataset, no epoch change: index = version

    def on_answer(self, node: str, req: Request, resp: Response) -> None:
        if self.loop.now < self.start or not isinstance(req, DiffRequest) or req.extra_keys:
            return
        if isinstance(resp, CursorUnservable):
            self.fallbacks += 1
            return
        if not isinstance(resp, DiffResponse) or resp.cursor.epoch != req.since.epoch:
            return
        if req.since.version < self.floor:
            return
        lag = resp.cursor.version - req.since.version
        if lag <= 0:
            return
        exact: set[bytes] = set()
        for version in range(req.since.version + 1, resp.cursor.version + 1):
            exact.update(self.written[version])
        shipped = needed = 0
        for key, value in resp.upserts:
            shipped += len(key) + len(value)
            if key in exact:
                needed += len(key) + len(value)
        for key in resp.deletes:
            shipped += len(key)
            if key in exact:
                needed += len(key)
        b = _bucket(lag)
        self.shipped[b] += shipped
        self.needed[b] += needed
        self.diffs[b] += 1
        acc = self.by_class.setdefault(self.classes[node], [0, 0, 0])
        acc[0] += shipped
        acc[1] += needed
        acc[2] += 1


def _merge_run(policy: str, q: int, *, quick: bool) -> dict[str, Any]:
    sc = merge_scenario(policy, q, quick=quick)
    start = sc.duration / 5
    world = build(sc, 1)
    probe = _MergeProbe(world, _assign_lag_classes(world, quick=quick), start)
    world.writer.on_write = probe.on_write  # before run(): the initial load is version 1
    world.env.on_answer = probe.on_answer
    world.env.metrics.measure_from = start
    _check(world.run(), f"merge {policy} q={q}")
    nb = len(LAG_BUCKETS) - 1
    return {
        "policy": policy,
        "q": q,
        "shipped": sum(probe.shipped),
        "needed": sum(probe.needed),
        "redundant": sum(probe.shipped) - sum(probe.needed),
        "diffs": sum(probe.diffs),
        "unservable": probe.fallbacks,
        "by_lag": [
            {
                "lag": _bucket_label(i),
                "diffs": probe.diffs[i],
                "shipped": probe.shipped[i],
                "needed": probe.needed[i],
                "redundancy": None
                if probe.needed[i] == 0
                else r6(probe.shipped[i] / probe.needed[i]),
            }
            for i in range(nb)
            if probe.diffs[i]
        ],
        "by_class": {
            k: {"diffs": v[2], "redundancy": None if v[1] == 0 else r6(v[0] / v[1])}
            for k, v in sorted(probe.by_class.items())
        },
    }


def run_merge(quick: bool) -> dict[str, Any]:
    """Redundancy of diffs by policy, queue length and lag."""
    qs = (16, 64) if quick else (16, 64, 256, 1024)
    runs = [_merge_run(policy, q, quick=quick) for q in qs for policy in POLICIES]
    return {"queue_lengths": list(qs), "runs": runs}


def _merge_report(data: dict[str, Any], out_dir: Path) -> str:
    runs = data["runs"]
    by = {(r["policy"], r["q"]): r for r in runs}
    qs = data["queue_lengths"]
    rows = []
    for q in qs:
        base = by[("halving", q)]["redundant"]
        for policy in POLICIES:
            r = by[(policy, q)]
            ratio = None if base == 0 else r["redundant"] / base
            rows.append(
                [
                    str(q),
                    policy,
                    str(r["diffs"]),
                    _fmt(r["shipped"] / 1e6, 4),
                    _fmt(r["needed"] / 1e6, 4),
                    _fmt(r["shipped"] / r["needed"] if r["needed"] else None, 4),
                    _fmt(r["redundant"] / 1e6, 4),
                    _fmt(ratio, 3),
                    str(r["unservable"]),
                ]
            )
    table = _md_table(
        [
            "q",
            "policy",
            "diffs",
            "shipped MB",
            "needed MB",
            "shipped/needed",
            "redundant MB",
            "redundant vs halving",
            "unservable",
        ],
        rows,
    )
    lag_rows = []
    for q in qs:
        for policy in POLICIES:
            cells = {b["lag"]: b["redundancy"] for b in by[(policy, q)]["by_lag"]}
            labels = [_bucket_label(i) for i in range(len(LAG_BUCKETS) - 1)]
            lag_rows.append([str(q), policy] + [_fmt(cells.get(lb), 4) for lb in labels])
    lag_table = _md_table(
        ["q", "policy"] + [f"lag {_bucket_label(i)}" for i in range(len(LAG_BUCKETS) - 1)],
        lag_rows,
    )
    panels = []
    for q in [qs[0], qs[-1]] if len(qs) > 1 else qs:
        series = []
        for policy in POLICIES:
            pts = [
                (LAG_BUCKETS[i], b["redundancy"])
                for i in range(len(LAG_BUCKETS) - 1)
                for b in by[(policy, q)]["by_lag"]
                if b["lag"] == _bucket_label(i) and b["redundancy"] is not None
            ]
            series.append((policy, [p[0] for p in pts], [p[1] for p in pts]))
        panels.append(
            (f"q = {q}: redundancy by lag", "lag (versions)", "shipped / needed bytes", series)
        )
    panels.append(
        (
            "redundant bytes (all lags)",
            "queue length q",
            "redundant MB",
            [
                (policy, list(qs), [by[(policy, q)]["redundant"] / 1e6 for q in qs])
                for policy in POLICIES
            ],
        )
    )
    plot_lines(
        out_dir / "sim-merge.png",
        panels,
        title="Merge policy: redundant diff bytes under a realistic mix of lags",
        logx=[True, True, True],
        logy=[True, True, True],
    )
    return f"{table}\n\nRedundancy (shipped / needed bytes) by lag:\n\n{lag_table}\n"


# --- 2. fan-out ----------------------------------------------------------------------


def fanout_shapes(n: int) -> list[tuple[str, Topology]]:
    """Direct, and relay trees of depth 2 and 3, with about ``n`` sidecars."""
    f2 = max(1, round(math.sqrt(n)))
    f3 = max(1, round(n ** (1 / 3)))
    return [
        ("direct", Topology(direct=(n, n))),
        ("depth 2", Topology(direct=(0, 0), tree=((f2, f2),), leaves=(f2, f2))),
        (
            "depth 3",
            Topology(direct=(0, 0), tree=((f3, f3), (f3, f3)), leaves=(math.ceil(n / f3**2),) * 2),
        ),
    ]


def fanout_scenario(topology: Topology, *, quick: bool) -> Scenario:
    return Scenario(
        "study-fanout",
        "fan-out study",
        topology=topology,
        workload=WorkloadConfig(
            keyspace=1_000,
            initial_records=500,
            value_size=32,
            write_rate=1.0,
            batch_keys=4.0,
            delete_fraction=0.0,
            bulk_probability=0.0,
            meta_probability=0.0,
            read_rate=0.0,
        ),
        faults=NO_FAULTS,
        duration=25.0 if quick else 50.0,
        start_spread=5.0,
        poll_interval=5.0,
        request_timeout=60.0,
        backoff_max=30.0,
        snapshot_chunk=5_000,
        snapshot_stream=True,
        geometry=(4, 3),
        full_check_every=0,
        timeline=False,
        max_entries=1024,
        relay_max_entries=1024,
    )


def _fanout_run(label: str, topo: Topology, *, quick: bool, window: float) -> dict[str, Any]:
    sc = fanout_scenario(topo, quick=quick)
    start = time.perf_counter()
    world = build(sc, 1)
    m = world.env.metrics
    m.measure_from = window
    mark: dict[str, float] = {}

    def at_window() -> None:
        mark.update(m.counters())
        mark["busy"] = world.origin.server.busy

    world.env.loop.at(window, at_window)
    result = _check(world.run(), f"fanout {label}")
    wall = time.perf_counter() - start
    end = m.counters()
    writes = max(end["writes"], 1)
    return {
        "shape": label,
        "sidecars": len(world.sidecars),
        "relays": len(world.relays),
        "writes": end["writes"],
        "origin_requests_per_write": r6(
            (end["origin_requests"] - mark["origin_requests"]) / writes
        ),
        "origin_bytes_per_write": r6((end["origin_bytes_out"] - mark["origin_bytes_out"]) / writes),
        "relay_requests_per_write": r6((end["relay_requests"] - mark["relay_requests"]) / writes),
        "origin_busy_fraction": r6(
            (world.origin.server.busy - mark["busy"]) / max(result.end - window, 1e-9)
        ),
        "propagation": percentiles(m.propagation),
        "convergence": None
        if result.converged_at is None
        else r6(result.converged_at - result.heal_at),
        "sync_events": m.sync_events,
        "wall_seconds": round(wall, 1),
        "sync_events_per_second": round(m.sync_events / wall),
    }


def run_fanout(quick: bool) -> dict[str, Any]:
    """Origin load and propagation, direct and through relay trees."""
    n = 300 if quick else 10_000
    window = 10.0 if quick else 20.0
    runs = [
        _fanout_run(label, topo, quick=quick, window=window) for label, topo in fanout_shapes(n)
    ]
    return {"sidecars": n, "runs": runs}


def _fanout_report(data: dict[str, Any], out_dir: Path) -> str:
    rows = []
    for r in data["runs"]:
        p = r["propagation"]
        rows.append(
            [
                r["shape"],
                f"{r['sidecars']:,}",
                str(r["relays"]),
                _fmt(r["origin_requests_per_write"], 4),
                _fmt(r["origin_bytes_per_write"] / 1e3, 4),
                _fmt(r["relay_requests_per_write"], 4),
                _fmt(100 * r["origin_busy_fraction"], 3),
                _fmt(None if p["p50"] is None else 1e3 * p["p50"], 4),
                _fmt(None if p["p99"] is None else 1e3 * p["p99"], 4),
                f"{r['sync_events']:,}",
                f"{r['wall_seconds']:.0f}",
                f"{r['sync_events_per_second']:,}",
            ]
        )
    table = _md_table(
        [
            "shape",
            "sidecars",
            "relays",
            "origin requests / write",
            "origin kB / write",
            "relay requests / write",
            "origin busy %",
            "propagation p50 ms",
            "propagation p99 ms",
            "sync events",
            "wall s",
            "sync events / s",
        ],
        rows,
    )
    shapes = [r["shape"] for r in data["runs"]]
    plot_bars(
        out_dir / "sim-fanout.png",
        [
            (
                "origin load per write",
                "requests (log)",
                shapes,
                [
                    (
                        "origin requests / write",
                        [r["origin_requests_per_write"] for r in data["runs"]],
                    )
                ],
            ),
            (
                "origin bytes per write",
                "kB (log)",
                shapes,
                [("origin kB / write", [r["origin_bytes_per_write"] / 1e3 for r in data["runs"]])],
            ),
            (
                "propagation delay",
                "ms (log)",
                shapes,
                [
                    ("p50", [1e3 * (r["propagation"]["p50"] or 0) for r in data["runs"]]),
                    ("p99", [1e3 * (r["propagation"]["p99"] or 0) for r in data["runs"]]),
                ],
            ),
        ],
        title=f"Fan-out to {data['sidecars']:,} sidecars: direct vs relay trees",
        logy=[True, True, True],
    )
    return table + "\n"


# --- 3. lost hints ---------------------------------------------------------------------


def hints_scenario(loss: float, poll: float, *, quick: bool) -> Scenario:
    n = 5 if quick else 20
    return Scenario(
        "study-hints",
        "lost hints study",
        topology=Topology(direct=(n, n)),
        workload=WorkloadConfig(
            keyspace=2_000,
            initial_records=1_000,
            write_rate=5.0,
            batch_keys=4.0,
            bulk_probability=0.0,
            meta_probability=0.0,
            read_rate=2.0,
        ),
        faults=FaultSpec(swarm=False, hint_loss=loss),
        warmup=0.0,
        duration=80.0 if quick else 400.0,
        poll_interval=poll,
        request_timeout=30.0,
        geometry=(16, 2),
        full_check_every=0,
        timeline=False,
    )


def run_hints(quick: bool) -> dict[str, Any]:
    losses = (0.0, 0.5, 1.0) if quick else (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    polls = (1.0, 5.0) if quick else (1.0, 5.0, 15.0, 60.0)
    out: dict[str, Any] = {"runs": []}
    for poll in polls:
        for loss in losses:
            sc = hints_scenario(loss, poll, quick=quick)
            world = build(sc, 1)
            world.env.metrics.measure_from = 20.0
            result = _check(world.run(), f"hints loss={loss} poll={poll}")
            m = world.env.metrics
            out["runs"].append(
                {
                    "poll": poll,
                    "hint_loss": loss,
                    "staleness": percentiles(m.staleness),
                    "versions_behind": percentiles(m.lag),
                    "origin_requests_per_second": r6(
                        sum(m.origin_requests.values()) / max(result.end, 1e-9)
                    ),
                }
            )
    return out


def _hints_report(data: dict[str, Any], out_dir: Path) -> str:
    runs = data["runs"]
    polls = sorted({r["poll"] for r in runs})
    rows = [
        [
            _fmt(r["poll"]),
            _fmt(r["hint_loss"]),
            _fmt(r["staleness"]["p50"]),
            _fmt(r["staleness"]["p99"]),
            _fmt(r["staleness"]["mean"]),
            _fmt(r["versions_behind"]["p99"]),
            _fmt(r["origin_requests_per_second"]),
        ]
        for r in runs
    ]
    table = _md_table(
        [
            "poll s",
            "hint loss",
            "staleness p50 s",
            "p99 s",
            "mean s",
            "versions behind p99",
            "origin requests/s",
        ],
        rows,
    )

    def series(key: str) -> list[tuple[str, list[float], list[float]]]:
        out = []
        for poll in polls:
            rs = [r for r in runs if r["poll"] == poll]
            out.append(
                (
                    f"poll {poll:g} s",
                    [r["hint_loss"] for r in rs],
                    [r["staleness"][key] for r in rs],
                )
            )
        return out

    plot_lines(
        out_dir / "sim-hints.png",
        [
            ("mean staleness", "hint loss rate", "seconds (log)", series("mean")),
            ("staleness p99", "hint loss rate", "seconds (log)", series("p99")),
            (
                "origin load",
                "hint loss rate",
                "requests / s",
                [
                    (
                        f"poll {poll:g} s",
                        [r["hint_loss"] for r in runs if r["poll"] == poll],
                        [r["origin_requests_per_second"] for r in runs if r["poll"] == poll],
                    )
                    for poll in polls
                ],
            ),
        ],
        title="Lost hints cost only latency: staleness is bounded by the safety poll",
        logy=[True, True, False],
    )
    return table + "\n"


# --- 4. recovery -----------------------------------------------------------------------


def recovery_scenario(n: int) -> Scenario:
    return Scenario(
        "study-recovery",
        "recovery study",
        topology=Topology(direct=(2, 2)),
        workload=WorkloadConfig(
            keyspace=n,
            initial_records=n,
            value_size=32,
            write_rate=0.0,
            bulk_probability=0.0,
            meta_probability=0.0,
            read_rate=0.0,
        ),
        faults=NO_FAULTS,
        net=NetConfig(latency=0.02, jitter=0.005, jitter_cap=0.05, bandwidth=12.5e6),
        duration=40.0,
        poll_interval=5.0,
        request_timeout=60.0,
        backoff_max=30.0,
        snapshot_chunk=SyncConfig().snapshot_chunk,
        snapshot_stream=True,
        geometry=(16, 4),
        max_entries=1024,
        full_check_every=0,
        timeline=True,
    )


CHANGE_AT = 15.0
"""When the recovery study's origin loses its history (replicas are synced)."""


class _RecoveryProbe:
    """Changes the epoch (and ``fraction`` of the values) at ``CHANGE_AT``;
    records when each replica first shows the final content, and its bytes."""

    def __init__(self, world: World, fraction: float) -> None:
        self.world = world
        self.fraction = fraction
        self.names = [n.name for n in world.sidecars]
        self.mark: dict[str, int] = {}
        self.done: dict[str, tuple[float, int]] = {}
        self.target: int | None = None
        base = world.env.checker.on_commit
        assert base is not None
        self.base = base

    def epoch_change(self) -> None:
        w = self.world
        shipped = w.env.metrics.shipped
        self.mark = {k: shipped.get(k, 0) for k in self.names}
        ds = w.origin.datasets["ds0"]
        ds.lose_history(w.writer.rng.randbytes(16))
        w.histories["ds0"].alias(ds.cursor)
        keys = sorted(ds.records)
        changed = w.writer.rng.sample(keys, int(len(keys) * self.fraction))
        if changed:
            w.writer.commit("ds0", {k: w.writer.rng.randbytes(32) for k in changed}, [])
        else:
            w.origin.publish("ds0")
        self.target = w.histories["ds0"].seq

    def on_commit(self, watch: Watch, now: float) -> None:
        self.base(watch, now)
        if self.target is not None and watch.seq == self.target and watch.node not in self.done:
            self.done[watch.node] = (now, self.world.env.metrics.shipped.get(watch.node, 0))


def recovery_run(n: int, fraction: float) -> list[dict[str, Any]]:
    """One recovery run: a synced replica repairs after the epoch change
    (``merkle``) while an empty one bootstraps (``snapshot``); one row each.
    A replica that never converges (a core bug) gets ``seconds`` None and
    ``stuck`` says why; any other violation raises."""
    world = build(recovery_scenario(n), 1)
    merkle, fresh = world.sidecars[0].name, world.sidecars[1].name
    world.starts[merkle] = 0.0
    world.starts[fresh] = CHANGE_AT  # an empty replica: the full snapshot
    probe = _RecoveryProbe(world, fraction)
    world.env.checker.on_commit = probe.on_commit
    world.env.loop.at(CHANGE_AT, probe.epoch_change)
    result = world.run()
    stuck = sorted(set(probe.names) - set(probe.done))
    if result.violation is not None and (
        result.violation.kind != "convergence" or stuck != [merkle]
    ):
        _check(result, f"recovery n={n} f={fraction}")
    out = []
    shipped_now = world.env.metrics.shipped
    for node, mode in ((merkle, "merkle"), (fresh, "snapshot")):
        replica = next(r for r in world.sidecars if r.name == node)
        stats = replica.sync_stats()
        row: dict[str, Any] = {
            "records": n,
            "changed_fraction": fraction,
            "changed_keys": int(n * fraction),
            "mode": mode,
            "syncs": {k: v for k, v in sorted(stats.items()) if k.startswith("sync:")},
        }
        if node in probe.done:
            t, shipped = probe.done[node]
            row.update(seconds=r6(t - CHANGE_AT), bytes=shipped - probe.mark[node], stuck="")
        else:  # the convergence violation of a core bug: see docs/simulations.md
            slot = replica.slots.get("ds0")
            error = "" if slot is None else slot.sync.stats.last_error
            row.update(
                seconds=None,
                bytes=shipped_now.get(node, 0) - probe.mark[node],
                stuck=f"{error} (failures: {stats.get('failures', 0)})",
                until=r6(result.end - CHANGE_AT),
            )
        out.append(row)
    return out


def run_recovery(quick: bool) -> dict[str, Any]:
    """Time and bytes to converge after an epoch change: Merkle vs snapshot."""
    sizes = (2_000, 10_000) if quick else (10_000, 100_000)
    fractions = (0.01, 0.2) if quick else (0.0, 0.001, 0.01, 0.03, 0.05, 0.2)
    runs = [row for n in sizes for f in fractions for row in recovery_run(n, f)]
    return {"runs": runs}


def _recovery_report(data: dict[str, Any], out_dir: Path) -> str:
    runs = data["runs"]
    rows = [
        [
            f"{r['records']:,}",
            f"{r['changed_fraction']:g}",
            f"{r['changed_keys']:,}",
            r["mode"],
            _fmt(r["seconds"], 3)
            if r["seconds"] is not None
            else f"never: {r['stuck']}, still repairing after {r['until']:.0f} s",
            _fmt(r["bytes"] / 1e3, 4),
            ", ".join(f"{k[5:]}={v}" for k, v in r["syncs"].items()),
        ]
        for r in runs
    ]
    table = _md_table(
        [
            "records",
            "changed",
            "changed keys",
            "replica",
            "seconds to converge",
            "kB shipped",
            "syncs (whole run)",
        ],
        rows,
    )
    sizes = sorted({r["records"] for r in runs})
    series_b = []
    series_t = []
    for n in sizes:
        for mode in ("merkle", "snapshot"):
            rs = [
                r
                for r in runs
                if r["records"] == n and r["mode"] == mode and r["seconds"] is not None
            ]
            xs = [max(r["changed_fraction"], 1e-4) for r in rs]
            series_b.append((f"{mode}, {n:,} records", xs, [r["bytes"] / 1e3 for r in rs]))
            series_t.append((f"{mode}, {n:,} records", xs, [r["seconds"] for r in rs]))
    plot_lines(
        out_dir / "sim-recovery.png",
        [
            ("bytes to converge", "fraction of keys changed", "kB (log)", series_b),
            ("time to converge", "fraction of keys changed", "seconds", series_t),
        ],
        title="After an epoch change: Merkle repair vs a full snapshot",
        logx=[True, True],
        logy=[True, False],
    )
    return table + "\n"


# --- entry point -------------------------------------------------------------------------

STUDIES: dict[
    str, tuple[Callable[[bool], dict[str, Any]], Callable[[dict[str, Any], Path], str]]
] = {
    "merge": (run_merge, _merge_report),
    "fanout": (run_fanout, _fanout_report),
    "hints": (run_hints, _hints_report),
    "recovery": (run_recovery, _recovery_report),
}


def run_study(
    name: str,
    *,
    quick: bool,
    out_dir: Path,
    json_path: Path | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    """Run study ``name``; write ``sim-<name>.png`` into ``out_dir`` (and the
    data as JSON to ``json_path``); return the markdown report. With
    ``data`` (a study's JSON), only render it again."""
    runner, render = STUDIES[name]
    start = time.perf_counter()
    redrawn = data is not None
    if data is None:
        data = runner(quick)
    text = render(data, out_dir)
    if json_path is not None:
        json_path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n")
    wall = time.perf_counter() - start
    command = f"python -m simulations study {name}{' --quick' if quick else ''}"
    how = "redrawn from JSON" if redrawn else f"{wall:.0f} s of wall time"
    return f"<!-- {command}: {how} -->\n{text}"
