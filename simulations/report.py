"""The run report: one JSON document, byte-identical for the same seed.

Theory of operation
-------------------
:func:`build_report` turns a finished :class:`~simulations.world.RunResult`
into plain JSON values; :func:`dumps` serializes it with sorted keys and a
fixed indentation. Every float is rounded to 6 decimals, every mapping is
emitted with sorted keys, and nothing from the wall clock or the process
(hash seeds, ids, paths) enters it -- so running a seed twice, in any
process, gives the same bytes. Wall-clock speed is reported separately by the
CLI, never in the JSON.

Sections: the run (seed, scenario, replay command, topology, drawn fault
profile), the verdict (``ok`` or the violation), ``convergence`` (heal time,
bound, time to converge), ``staleness`` (percentiles of the readers'
staleness in seconds and lag in versions), ``propagation`` (write-to-replica
delays), ``bytes`` (shipped, needed, redundancy, by packet kind), ``requests``
(by message type and by sync phase; syncs completed by kind; failures),
``origin`` (its load), ``faults`` (how often each fault fired) and
``events``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from simulations.faults import profile_json
from simulations.world import RunResult


def replay_command(seed: int, scenario: str) -> str:
    """The command that replays one seed."""
    return f"python -m simulations run --seed {seed} --scenario {scenario}"


def r6(x: float) -> float:
    """Round for the report (6 decimals; -0.0 becomes 0.0)."""
    v = round(x, 6)
    return 0.0 if v == 0 else v


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles (and count, mean, max) of ``values``."""
    data = sorted(values)
    n = len(data)
    out: dict[str, Any] = {"count": n}
    if n == 0:
        for q in qs:
            out[f"p{q:g}"] = None
        out["mean"] = out["max"] = None
        return out
    for q in qs:
        rank = max(1, math.ceil(q / 100 * n))
        out[f"p{q:g}"] = r6(data[rank - 1])
    out["mean"] = r6(math.fsum(data) / n)
    out["max"] = r6(data[-1])
    return out


def _sorted(d: dict[str, int]) -> dict[str, int]:
    return {k: d[k] for k in sorted(d)}


def build_report(result: RunResult) -> dict[str, Any]:
    """The report of one run as JSON-ready values."""
    w = result.world
    m = w.env.metrics
    net = w.env.net.stats
    s = result.scenario
    v = result.violation
    shipped = sum(m.shipped.values())
    needed = sum(m.needed.values())
    syncs: dict[str, int] = {}
    for node in w.replicas:
        for k, n in node.sync_stats().items():
            syncs[k] = syncs.get(k, 0) + n
    faults = dict(w.injector.fired)
    for reason, n in net.dropped.items():
        faults[f"dropped_{reason}"] = n
    if net.duplicated:
        faults["duplicated"] = net.duplicated
    if net.corrupted:
        faults["corrupted"] = net.corrupted
    if m.storage_errors:
        faults["storage_errors"] = m.storage_errors
    origin_total = sum(m.origin_requests.values())
    duration = max(result.end, 1e-9)
    report: dict[str, Any] = {
        "seed": result.seed,
        "scenario": s.name,
        "replay": replay_command(result.seed, s.name),
        "ok": v is None,
        "violation": None
        if v is None
        else {
            "kind": v.kind,
            "node": v.node,
            "dataset": v.dataset,
            "time": r6(v.time),
            "detail": v.detail,
        },
        "topology": result.topology,
        "profile": profile_json(result.profile),
        "convergence": {
            "heal_at": r6(result.heal_at),
            "bound": r6(result.bound),
            "converged": result.converged_at is not None,
            "time": None
            if result.converged_at is None
            else r6(result.converged_at - result.heal_at),
        },
        "staleness": {
            "seconds": percentiles(m.staleness),
            "versions_behind": percentiles(m.lag),
        },
        "propagation": percentiles(m.propagation),
        "bytes": {
            "shipped": shipped,
            "needed": needed,
            "redundancy": None if needed == 0 else r6(shipped / needed),
            "by_packet_kind": _sorted(net.bytes),
        },
        "requests": {
            "by_type": _sorted(m.requests),
            "by_sync_kind": _sorted(m.requests_by_phase),
            "syncs": _sorted(syncs),
            "timeouts": m.timeouts,
            "refusals": m.refusals,
            "answers_ignored": m.answers_ignored,
            "corrupt_frames": m.corrupt_frames,
            "served_by_relays": m.relay_requests,
        },
        "origin": {
            "requests": origin_total,
            "by_type": _sorted(m.origin_requests),
            "bytes_out": m.origin_bytes_out,
            "writes": m.writes,
            "writes_refused": m.writes_refused,
            "requests_per_write": None if m.writes == 0 else r6(origin_total / m.writes),
            "bytes_per_write": None if m.writes == 0 else r6(m.origin_bytes_out / m.writes),
            "requests_per_second_mean": r6(origin_total / duration),
            "requests_per_second_peak": max(m.origin_per_second.values(), default=0),
        },
        "faults": _sorted(faults),
        "events": {
            "loop": w.env.loop.events,
            "sync": m.sync_events,
            "commits": m.commits,
            "reads": m.reads,
            "full_checks": w.env.checker.full_checks,
            "sim_seconds": r6(result.end),
        },
    }
    if len(w.replicas) <= 50:
        report["replicas"] = {
            node.name: {
                "upstream": node.upstream,
                "relay": node.relay,
                "crashes": node.crashes,
                "shipped": m.shipped.get(node.name, 0),
                "needed": m.needed.get(node.name, 0),
                "syncs": _sorted(node.sync_stats()),
                "cursors": {
                    ds: None if mirror.cursor is None else str(mirror.cursor)
                    for ds, mirror in sorted(node.mirrors.items())
                },
            }
            for node in sorted(w.replicas, key=lambda n: n.name)
        }
    return report


def dumps(report: dict[str, Any]) -> str:
    """The canonical serialization (sorted keys, 2-space indent, final newline)."""
    return json.dumps(report, sort_keys=True, indent=2) + "\n"


def summary(report: dict[str, Any]) -> str:
    """One human line about a run."""
    conv = report["convergence"]
    st = report["staleness"]["seconds"]
    verdict = "ok" if report["ok"] else f"VIOLATION {report['violation']['kind']}"
    ctime = "-" if conv["time"] is None else f"{conv['time']:.3f}s"
    p99 = "-" if st["p99"] is None else f"{st['p99']:.3f}s"
    red = report["bytes"]["redundancy"]
    return (
        f"seed={report['seed']} scenario={report['scenario']} {verdict} "
        f"converged_in={ctime} (bound {conv['bound']:.1f}s) staleness_p99={p99} "
        f"redundancy={'-' if red is None else f'{red:.2f}'} "
        f"sync_events={report['events']['sync']}"
    )
