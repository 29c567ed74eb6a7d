"""Swarm testing: many seeds, each with its own drawn topology and fault mix.

Theory of operation
-------------------
:func:`run_seed` runs one seed of one scenario and condenses the report into
a :class:`SeedOutcome`. :func:`swarm` runs a range of seeds, in this process
or in a pool of worker processes (results are collected in seed order, so the
summary does not depend on scheduling), and calls back for every outcome so
the CLI can print failures as they come, each with its replay command.

The pseudo-scenario ``mix`` rotates through every named scenario except
those in :data:`EXCLUDED_FROM_MIX` (seed ``s`` runs scenario ``s mod n``); a failure names the real
scenario, so its replay command is exact.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from simulations.report import build_report, replay_command
from simulations.scenarios import SCENARIOS, scenario
from simulations.world import build

EXCLUDED_FROM_MIX = ("quiet", "merkle-limits")
"""``quiet`` has no faults; ``merkle-limits`` reproduces a known core bug
(``docs/simulations.md``) and joins the mix once it is fixed."""

MIX = [name for name in SCENARIOS if name not in EXCLUDED_FROM_MIX]


def scenario_for(name: str, seed: int) -> str:
    """The concrete scenario a swarm with ``name`` runs for ``seed``."""
    return MIX[seed % len(MIX)] if name == "mix" else name


@dataclass(frozen=True)
class SeedOutcome:
    seed: int
    scenario: str
    ok: bool
    violation: str
    sync_events: int
    loop_events: int
    convergence: float | None

    @property
    def replay(self) -> str:
        return replay_command(self.seed, self.scenario)


def run_seed(args: tuple[str, int]) -> SeedOutcome:
    """Run one seed (the argument is a tuple so that a pool can map it)."""
    name, seed = args
    concrete = scenario_for(name, seed)
    result = build(scenario(concrete), seed).run()
    report = build_report(result)
    v = report["violation"]
    return SeedOutcome(
        seed=seed,
        scenario=concrete,
        ok=bool(report["ok"]),
        violation="" if v is None else f"[{v['kind']}] {v['node']}/{v['dataset']}: {v['detail']}",
        sync_events=int(report["events"]["sync"]),
        loop_events=int(report["events"]["loop"]),
        convergence=report["convergence"]["time"],
    )


def swarm(
    name: str,
    seeds: range,
    *,
    jobs: int = 1,
    on_outcome: Callable[[SeedOutcome], None] | None = None,
) -> list[SeedOutcome]:
    """Run every seed of ``seeds``; outcomes in seed order."""
    if name != "mix":
        scenario(name)  # fail early on an unknown name
    work = [(name, seed) for seed in seeds]
    outcomes: list[SeedOutcome] = []
    it: Iterator[SeedOutcome]
    if jobs <= 1:
        it = map(run_seed, work)
        for outcome in it:
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return outcomes
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool:
        for outcome in pool.imap(run_seed, work, chunksize=4):
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes
