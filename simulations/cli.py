"""Command line: ``python -m simulations run|swarm|study|scenarios``.

Theory of operation
-------------------
``run`` runs one seed of one scenario and prints its JSON report (stdout, or
``--out``); the same seed prints the same bytes. ``swarm`` runs a range of
seeds and prints one line per failure with the command that replays it, then
a summary. ``study`` runs one of the four studies of ``docs/simulations.md``
and writes its plots and JSON. Wall-clock figures (events per second) go to
stderr, never into a report. Exit status: 0 when every run held every
invariant, 1 when one did not, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from simulations.report import build_report, dumps, replay_command, summary
from simulations.scenarios import SCENARIOS, scenario
from simulations.swarm import MIX, SeedOutcome, swarm
from simulations.world import build


def _run(args: argparse.Namespace) -> int:
    try:
        sc = scenario(args.scenario)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    start = time.perf_counter()
    world = build(sc, args.seed)
    result = world.run()
    wall = time.perf_counter() - start
    report = build_report(result)
    text = dumps(report)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from simulations.plots import plot_run

        plot_run(result, Path(args.plot))
    events = report["events"]["sync"]
    print(
        f"{summary(report)} wall={wall:.2f}s sync_events/s={events / max(wall, 1e-9):,.0f}",
        file=sys.stderr,
    )
    if not report["ok"]:
        v = report["violation"]
        print(f"VIOLATION {v['kind']}: {v['detail']}", file=sys.stderr)
        print(f"  seed={args.seed} scenario={args.scenario}", file=sys.stderr)
        print(f"  replay: {replay_command(args.seed, args.scenario)}", file=sys.stderr)
        return 1
    return 0


def _swarm(args: argparse.Namespace) -> int:
    if args.scenario != "mix" and args.scenario not in SCENARIOS:
        print(f"unknown scenario {args.scenario!r}; known: mix, {', '.join(SCENARIOS)}")
        return 2
    seeds = range(args.start, args.start + args.seeds)
    failures: list[SeedOutcome] = []
    done = 0
    begin = time.perf_counter()

    def report(o: SeedOutcome) -> None:
        nonlocal done
        done += 1
        if not o.ok:
            failures.append(o)
            print(f"FAIL seed={o.seed} scenario={o.scenario}: {o.violation}", flush=True)
            print(f"  replay: {o.replay}", flush=True)
        if args.progress and done % args.progress == 0:
            wall = time.perf_counter() - begin
            print(f"... {done} seeds, {len(failures)} failing, {wall:.0f}s", file=sys.stderr)

    outcomes = swarm(args.scenario, seeds, jobs=args.jobs, on_outcome=report)
    wall = time.perf_counter() - begin
    sync_events = sum(o.sync_events for o in outcomes)
    conv = [o.convergence for o in outcomes if o.convergence is not None]
    print(
        f"swarm scenario={args.scenario} seeds={args.start}..{args.start + args.seeds - 1} "
        f"runs={len(outcomes)} violations={len(failures)} "
        f"max_convergence={max(conv, default=0.0):.3f}s"
    )
    print(
        f"wall={wall:.1f}s jobs={args.jobs} sync_events={sync_events:,} "
        f"sync_events/s={sync_events / max(wall, 1e-9):,.0f}",
        file=sys.stderr,
    )
    return 1 if failures else 0


def _study(args: argparse.Namespace) -> int:
    from simulations import studies

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else None
    data = json.loads(Path(args.from_json).read_text()) if args.from_json else None
    text = studies.run_study(
        args.name, quick=args.quick, out_dir=out_dir, json_path=json_path, data=data
    )
    print(text)
    return 0


def _scenarios(_: argparse.Namespace) -> int:
    for name, sc in SCENARIOS.items():
        print(f"{name:12} {sc.description}")
    print(f"{'mix':12} (swarm only) seed s runs scenario s mod {len(MIX)} of: {', '.join(MIX)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Deterministic sync simulation of replicad (see docs/simulations.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one seed and print its JSON report")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--scenario", default="swarm")
    p.add_argument("--out", help="write the JSON report here instead of stdout")
    p.add_argument("--plot", help="write a PNG of the run here")
    p.set_defaults(fn=_run)

    p = sub.add_parser("swarm", help="run many seeds; print failures with replay commands")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--scenario", default="swarm", help="a scenario name, or mix")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--progress", type=int, default=0, help="print progress every N seeds")
    p.set_defaults(fn=_swarm)

    p = sub.add_parser("study", help="run a study of docs/simulations.md")
    p.add_argument("name", choices=["merge", "fanout", "hints", "recovery"])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--out-dir", default="docs/img", help="where the PNG goes")
    p.add_argument("--json", help="also write the study's data as JSON here")
    p.add_argument("--from-json", help="only redraw the plot and table from this JSON")
    p.set_defaults(fn=_study)

    p = sub.add_parser("scenarios", help="list the scenarios")
    p.set_defaults(fn=_scenarios)

    args = parser.parse_args(argv)
    code: int = args.fn(args)
    return code
