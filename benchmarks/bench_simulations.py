"""Simulation harness: simulated sidecar-sync events per second of wall time.

A *sync event* is one call into a replica's state machine (a hint, an answer,
a failure or an applied batch fed back): the unit of the harness's speed
target, at least 1,000 per second of wall time so that a 10,000-sidecar study
runs in minutes.

Rows:

* ``fan-out`` -- the fan-out study's workload (one origin, N sidecars directly
  under it, one write per second, every answer framed with the real wire
  encoding, every commit checked): N = 2,000 (300 quick);
* ``relay tree`` -- the same through a relay tree of depth 2;
* ``swarm`` -- seeds of the ``mix`` swarm (every fault kind, small topologies):
  sync events per second and seconds per seed (40 seeds, 8 quick).

Each figure is one run (a simulation is deterministic: repeating it only
measures the machine's noise). Run alone:
``.venv/bin/python -m benchmarks.bench_simulations [--quick]``.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import Row
from simulations.studies import fanout_scenario, fanout_shapes
from simulations.swarm import swarm
from simulations.world import build

TARGET = 1_000.0


def _fanout(n: int, shape: int) -> tuple[float, int]:
    _, topo = fanout_shapes(n)[shape]
    world = build(fanout_scenario(topo, quick=True), 1)
    start = time.perf_counter()
    result = world.run()
    wall = time.perf_counter() - start
    if result.violation is not None:
        raise RuntimeError(f"benchmark run broke an invariant: {result.violation}")
    events = world.env.metrics.sync_events
    return events / wall, len(world.sidecars)


def rows(quick: bool) -> list[Row]:
    """Sync events per second of wall time, on three workloads."""
    n = 300 if quick else 2_000
    out: list[Row] = []
    for shape in (0, 1):
        rate, sidecars = _fanout(n, shape)
        name = "fan-out" if shape == 0 else "relay tree (depth 2)"
        out.append(
            Row(
                f"simulation {name}, {sidecars:,} sidecars: sync events/s",
                round(rate),
                "events/s",
                target=">= 1,000",
                met=rate >= TARGET,
            )
        )
    seeds = 8 if quick else 40
    start = time.perf_counter()
    outcomes = swarm("mix", range(seeds))
    wall = time.perf_counter() - start
    if any(not o.ok for o in outcomes):
        raise RuntimeError("benchmark swarm broke an invariant")
    events = sum(o.sync_events for o in outcomes)
    out.append(
        Row(
            f"simulation swarm (mix, {seeds} seeds): sync events/s",
            round(events / wall),
            "events/s",
            target=">= 1,000",
            met=events / wall >= TARGET,
        )
    )
    out.append(Row("simulation swarm: wall time per seed", round(wall / seeds, 3), "s"))
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import render

    print(render(rows("--quick" in sys.argv[1:])))
