"""The simulation harness: determinism, faults, invariants (each must catch
its bug), convergence, the CLI, and a bounded swarm of seeds for CI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from replicad.memory import MemoryMirror
from replicad.merkle import Geometry
from replicad.replica import Apply, Target
from simulations import cli
from simulations.loop import EventLoop
from simulations.network import NetConfig, Network, Packet, Partition
from simulations.report import build_report, dumps
from simulations.scenarios import SCENARIOS, scenario
from simulations.swarm import MIX, swarm
from simulations.world import build, run
from tests.procs import ROOT

SIM = [sys.executable, "-m", "simulations"]


# --- determinism -------------------------------------------------------------


def test_same_seed_same_report_bytes() -> None:
    sc = scenario("swarm")
    a = dumps(build_report(build(sc, 7).run()))
    b = dumps(build_report(build(sc, 7).run()))
    assert a == b
    c = dumps(build_report(build(sc, 8).run()))
    assert a != c


def test_report_is_identical_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"r{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [*SIM, "run", "--seed", "11", "--scenario", "network", "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["ok"] is True


# --- the event loop and the network -------------------------------------------


def test_event_loop_orders_by_time_then_schedule_order() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.at(2.0, lambda: seen.append("b"))
    loop.at(1.0, lambda: seen.append("a"))
    loop.at(2.0, lambda: seen.append("c"))
    loop.at(5.0, lambda: seen.append("late"))
    assert loop.run(3.0) is False
    assert seen == ["a", "b", "c"] and loop.now == 3.0
    loop.at(0.0, lambda: seen.append("clamped"))  # the past means now
    loop.run(3.0)
    assert seen[-1] == "clamped"


def _net(**cfg: float) -> tuple[EventLoop, Network, list[tuple[float, str]]]:
    import random

    loop = EventLoop()
    got: list[tuple[float, str]] = []
    net = Network(
        loop,
        random.Random(1),
        NetConfig(**cfg),
        lambda p: got.append((loop.now, p.error)),
    )
    return loop, net, got


def _pkt(tag: str, src: str = "a", dst: str = "b") -> Packet:
    from simulations.network import Kind

    return Packet(Kind.ERROR, src, dst, "ds", 0, None, b"", 16, error=tag)


def test_network_reorders_with_jitter_and_delivers_everything_without_faults() -> None:
    loop, net, got = _net(latency=0.001, jitter=0.05, jitter_cap=1.0)
    for i in range(200):
        net.send(_pkt(str(i)))
    loop.run(10.0)
    order = [int(tag) for _, tag in got]
    assert sorted(order) == list(range(200))
    assert order != list(range(200))  # one mechanism gives delay and reordering
    assert [t for t, _ in got] == sorted(t for t, _ in got)


def test_network_clogs_partitions_and_losses() -> None:
    loop, net, got = _net(latency=0.01, jitter=0.0)
    net.clog_link("a", "b", 1.0)
    net.send(_pkt("held"))
    net.send(_pkt("other-way", "b", "a"))
    loop.run(0.5)
    assert [tag for _, tag in got] == ["other-way"]
    loop.run(2.0)
    assert got[-1] == (1.0, "held")
    net.partition = Partition("asymmetric", frozenset({"a"}))
    net.send(_pkt("blocked"))
    net.send(_pkt("allowed", "b", "a"))
    loop.run(3.0)
    assert got[-1][1] == "allowed"
    assert net.stats.dropped["partition"] == 1
    net.heal()
    net.loss = 1.0
    net.send(_pkt("lost"))
    loop.run(4.0)
    assert net.stats.dropped["loss"] == 1 and got[-1][1] == "allowed"


# --- every fault fires ----------------------------------------------------------


def test_every_fault_kind_fires_and_every_sync_kind_runs() -> None:
    fired: dict[str, int] = {}
    syncs: dict[str, int] = {}
    for name, seeds in (("network", range(2)), ("crashes", range(2)), ("epochs", range(2))):
        for seed in seeds:
            report = build_report(build(scenario(name), seed).run())
            assert report["ok"], report["violation"]
            for k, n in report["faults"].items():
                fired[k] = fired.get(k, 0) + n
            for k, n in report["requests"]["syncs"].items():
                syncs[k] = syncs.get(k, 0) + n
    expected = {
        "dropped_loss",
        "dropped_hint_loss",
        "dropped_partition",
        "duplicated",
        "corrupted",
        "clog_link",
        "clog_node",
        "partition_isolate",
        "partition_halves",
        "partition_asymmetric",
        "sidecar_crash",
        "relay_crash",
        "origin_restart",
        "origin_history_loss",
        "clock_jump",
        "clock_drift",
        "storage_errors",
    }
    assert expected <= set(fired), sorted(expected - set(fired))
    assert {"sync:diff", "sync:merkle", "sync:snapshot"} <= set(syncs)


def test_swarm_draws_different_fault_mixes_per_seed() -> None:
    profiles = {
        json.dumps(build_report(build(scenario("swarm"), s).run())["profile"]) for s in range(4)
    }
    assert len(profiles) == 4


def test_origin_restart_with_and_without_history_is_survived() -> None:
    sc = replace(
        scenario("epochs"),
        faults=replace(scenario("epochs").faults, origin_restart_rate=0.5, lose_history=0.5),
    )
    report = build_report(build(sc, 3).run())
    assert report["ok"], report["violation"]
    assert report["faults"]["origin_restart"] > report["faults"].get("origin_history_loss", 0) > 0


# --- invariants: each one must catch a broken mirror ------------------------------


class DroppingMirror(MemoryMirror):
    """Commits every diff but silently keeps one upserted key at its old
    value (tree kept consistent with the records): a state the origin never had."""

    def apply(self, batch: Apply) -> bool:
        before = dict(self.live.records)
        ok = super().apply(batch)
        if ok and batch.target is Target.LIVE and batch.upserts and self.applied_batches > 3:
            key = batch.upserts[0][0]
            old, new = before.get(key), self.live.records.get(key)
            if old != new:
                self._set(key, new, old)
        return ok

    def _set(self, key: bytes, current: bytes | None, value: bytes | None) -> None:
        self.live.tree.update(key, current, value)
        self.live.leaves.update(key, current, value)
        if value is None:
            self.live.records.pop(key, None)
        else:
            self.live.records[key] = value


class RollbackMirror(MemoryMirror):
    """Loses its last two commits after the sixth (a disk that lied about fsync)."""

    def __init__(self, geometry: Geometry | None = None) -> None:
        super().__init__(geometry)
        self.saved: list[tuple[object, ...]] = []

    def apply(self, batch: Apply) -> bool:
        ok = super().apply(batch)
        if ok and (batch.target is Target.LIVE or batch.promote):
            self.saved.append((copy.deepcopy(self.live), self.cursor, self.meta))
            if len(self.saved) == 6:
                live, cursor, meta = self.saved[3]
                self.live = copy.deepcopy(live)  # type: ignore[assignment]
                self.cursor, self.meta = cursor, meta  # type: ignore[assignment]
        return ok


class BadTreeMirror(MemoryMirror):
    """After a few commits its Merkle tree counts an entry the records lack."""

    def apply(self, batch: Apply) -> bool:
        ok = super().apply(batch)
        if ok and batch.target is Target.LIVE and self.live_commits == 4:
            self.live.tree.update(b"phantom", None, b"x")
        return ok


class RottingOnceMirror(MemoryMirror):
    """Rewrites a key no writer touches (outside the key space), once."""

    def apply(self, batch: Apply) -> bool:
        ok = super().apply(batch)
        if self.live_commits == 2 and ok:
            self.live.records[b"zz-not-a-key"] = b"rotten"
        return ok


class StuckMirror(MemoryMirror):
    """Says it applied diffs but never changes after its bootstrap."""

    def apply(self, batch: Apply) -> bool:
        if self.cursor is not None and batch.target is Target.LIVE:
            return True
        return super().apply(batch)


@pytest.mark.parametrize(
    ("mirror", "kind", "writes"),
    [
        (DroppingMirror, "origin-state", 4.0),
        (RollbackMirror, "backwards", 4.0),
        (BadTreeMirror, "digest", 4.0),
        (StuckMirror, "convergence", 4.0),
    ],
)
def test_each_invariant_catches_a_broken_mirror(
    mirror: type[MemoryMirror], kind: str, writes: float
) -> None:
    base = scenario("quiet")
    sc = replace(base, duration=10.0, workload=replace(base.workload, write_rate=writes))
    result = run(sc, 5, mirror_factory=mirror)
    assert result.violation is not None
    assert result.violation.kind == kind, str(result.violation)
    report = build_report(result)
    assert report["ok"] is False
    assert report["replay"] == "python -m simulations run --seed 5 --scenario quiet"
    # the healthy mirror passes the same run
    assert run(sc, 5).violation is None


def test_readers_catch_storage_rot_between_commits() -> None:
    """Records that rot after their commit was checked (no writes follow, so
    no commit check runs again): the readers see it."""
    base = scenario("quiet")
    sc = replace(base, duration=10.0, workload=replace(base.workload, write_rate=0.0))
    world = build(sc, 5)

    def rot() -> None:
        for node in world.replicas:
            node.mirrors["ds0"].live.records[b"k000000"] = b"rotten"

    world.env.loop.at(5.0, rot)
    result = world.run()
    assert result.violation is not None and result.violation.kind == "read", result.violation
    assert "rotten" in result.violation.detail


def test_full_check_catches_what_the_digest_cannot() -> None:
    """Rot outside any batch escapes the incremental digest; the periodic
    key-by-key comparison finds it even when no reader looks."""
    sc = replace(
        scenario("quiet"),
        duration=10.0,
        full_check_every=5,
        workload=replace(scenario("quiet").workload, read_rate=0.0),
    )
    result = run(sc, 2, mirror_factory=RottingOnceMirror)
    assert result.violation is not None and result.violation.kind == "origin-state"


def test_an_exception_in_the_core_is_reported_with_the_seed() -> None:
    class Exploding(MemoryMirror):
        def apply(self, batch: Apply) -> bool:
            if self.live_commits == 2:
                raise RuntimeError("disk on fire")
            return super().apply(batch)

    result = run(replace(scenario("quiet"), duration=5.0), 1, mirror_factory=Exploding)
    assert result.violation is not None and result.violation.kind == "exception"
    assert "disk on fire" in result.violation.detail


# --- liveness -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["network", "crashes", "relays", "tiny-queue"])
def test_replicas_converge_after_the_heal(name: str) -> None:
    result = build(scenario(name), 21).run()
    assert result.violation is None, str(result.violation)
    assert result.converged_at is not None
    assert result.converged_at - result.heal_at <= result.bound
    world = result.world
    for node in world.replicas:
        for ds, mirror in node.mirrors.items():
            assert mirror.cursor == world.origin.datasets[ds].cursor
            assert mirror.live.records == world.origin.datasets[ds].records


# --- CLI ------------------------------------------------------------------------------


def test_cli_run_prints_the_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["run", "--seed", "4", "--scenario", "quiet"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["seed"] == 4 and report["ok"] is True
    assert "sync_events/s" in out.err
    png = tmp_path / "run.png"
    args = ["run", "--seed", "4", "--scenario", "quiet", "--out", "/dev/null", "--plot", str(png)]
    assert cli.main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_run_failure_prints_seed_scenario_and_replay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cli, "build", lambda sc, seed: build(sc, seed, mirror_factory=BadTreeMirror)
    )
    assert cli.main(["run", "--seed", "9", "--scenario", "quiet"]) == 1
    err = capsys.readouterr().err
    assert "VIOLATION digest" in err
    assert "seed=9 scenario=quiet" in err
    assert "replay: python -m simulations run --seed 9 --scenario quiet" in err


def test_cli_swarm_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["swarm", "--seeds", "3", "--start", "100", "--scenario", "quiet"]) == 0
    out = capsys.readouterr().out
    assert "runs=3 violations=0" in out
    assert cli.main(["run", "--seed", "1", "--scenario", "nope"]) == 2
    assert cli.main(["swarm", "--seeds", "1", "--scenario", "nope"]) == 2
    assert cli.main(["scenarios"]) == 0
    assert "swarm" in capsys.readouterr().out


def test_cli_swarm_subprocess_reports_summary() -> None:
    proc = subprocess.run(
        [*SIM, "swarm", "--seeds", "2", "--scenario", "mix", "--jobs", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "runs=2 violations=0" in proc.stdout
    assert "sync_events/s" in proc.stderr


# --- the CI swarm -----------------------------------------------------------------


def test_bounded_swarm_holds_every_invariant() -> None:
    """A bounded slice of the swarm (the 10,000-seed run is in docs/simulations.md)."""
    outcomes = swarm("mix", range(1000, 1000 + 3 * len(MIX)))
    bad = [f"{o.replay}: {o.violation}" for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)


def test_every_named_scenario_runs() -> None:
    for name in SCENARIOS:
        assert build(scenario(name), 0).scenario.name == name


# --- core bugs the simulation found (fixed; kept as regressions) ------------------------


def test_merkle_repair_beyond_the_responders_leaf_bound_converges() -> None:
    """Replay: python -m simulations run --seed 11 --scenario merkle-limits"""
    result = build(scenario("merkle-limits"), 11).run()
    assert result.violation is None, str(result.violation)
