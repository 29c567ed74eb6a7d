"""Relay mode: a sidecar's mirror serving the sync API to replicas below it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import trio

from replicad.errors import RetryLaterError
from replicad.http_app import error_response
from replicad.loopback import LoopbackDriver
from replicad.memory import MemoryMirror
from replicad.merkle import LeafQuery
from replicad.messages import (
    Hint,
    MerkleLeavesRequest,
    MerkleLeavesResponse,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync, SyncConfig
from replicad.responder import snapshot_chunk
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore
from sidecar import Reader
from sidecar import relay as relay_module
from sidecar.mirror import Mirror
from sidecar.relay import RelayService
from tests.origin_proc import OriginProcess
from tests.sidecar_proc import SidecarProcess


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


class RelayServer:
    """The relay's answers, called synchronously (as its worker threads do)."""

    def __init__(self, relay: RelayService) -> None:
        self.relay = relay

    def answer(self, request: Request) -> Response:
        return self.relay._answer(request)

    def stream(self, request: SnapshotRequest) -> Iterator[SnapshotChunk]:
        with self.relay.mirror.view(request.dataset) as view:
            after = request.after
            while True:
                chunk = snapshot_chunk(view, after, request.limit)
                yield chunk
                if chunk.next_after is None:
                    return
                after = chunk.next_after


class Chain:
    """origin store -> relay mirror (LMDB) -> downstream replica (memory)."""

    def __init__(self, tmp: Path) -> None:
        self.origin = OriginStore(tmp / "origin", durable=False)
        self.origin.create_dataset(DatasetSpec("up", seed_like_schema()))
        ok(
            self.origin.commit(
                [WriteBatch("up", {b"u%04d" % i: seed_like_record(i) for i in range(400)})]
            )[0]
        )
        self.mirror = Mirror(tmp / "relay", durable=False)
        self.relay = RelayService(self.mirror)
        handle = self.mirror.ensure("up")
        self.up_sync = ReplicaSync(
            "up", state=handle.state(), local=handle, rng=random.Random(1), now=0.0
        )
        self.up = LoopbackDriver(self.up_sync, handle, self.origin)
        self.down_mirror = MemoryMirror()
        self.down_sync = ReplicaSync(
            "up",
            state=self.down_mirror.state(),
            local=self.down_mirror,
            rng=random.Random(2),
            now=0.0,
            config=SyncConfig(snapshot_chunk=64),
        )
        self.down = LoopbackDriver(self.down_sync, self.down_mirror, RelayServer(self.relay))

    def step(self, now: float) -> None:
        info = self.origin.info("up")
        self.up_sync.hint(Hint("up", info.cursor, info.digest), now)
        self.up.run(now)
        cursor = self.mirror.cursor("up")
        assert cursor is not None
        self.down_sync.hint(Hint("up", cursor, self.mirror.digest("up")), now)
        self.down.run(now)

    def origin_records(self) -> dict[bytes, bytes]:
        with self.origin.view("up") as view:
            return dict(view.scan(None, 10**9)[0])


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def test_downstream_follows_through_the_relay_with_diffs(chain: Chain) -> None:
    chain.step(0.0)
    assert chain.down_mirror.live.records == chain.origin_records()
    assert chain.down_mirror.cursor == chain.origin.info("up").cursor  # cursors pass through
    for i in range(5):
        ok(
            chain.origin.commit(
                [
                    WriteBatch(
                        "up", {b"u%04d" % i: seed_like_record(900 + i)}, [b"u%04d" % (300 + i)]
                    )
                ]
            )[0]
        )
        ok(chain.origin.commit([WriteBatch("up", {b"n%d" % i: seed_like_record(i)})])[0])
        chain.step(1.0 + i)
    assert chain.down_mirror.live.records == chain.origin_records()
    assert chain.down_sync.stats.syncs == {"snapshot": 1, "diff": 5}
    assert chain.down_sync.stats.digest_mismatches == 0


def test_relay_restart_and_epoch_change_repair_below_with_merkle(
    chain: Chain, tmp_path: Path
) -> None:
    chain.step(0.0)
    # the relay moves ahead of the replica below, then restarts: its history
    # is gone, so the replica (behind the new queue's floor) repairs
    ok(chain.origin.commit([WriteBatch("up", {b"u0001": seed_like_record(1234)})])[0])
    info = chain.origin.info("up")
    chain.up_sync.hint(Hint("up", info.cursor, info.digest), 0.5)
    chain.up.run(0.5)
    chain.mirror.on_commit = None
    chain.relay = RelayService(chain.mirror)
    chain.down.server = RelayServer(chain.relay)
    applied = chain.down_sync.stats.records_applied
    chain.step(1.0)
    assert chain.down_mirror.live.records == chain.origin_records()
    assert chain.down_sync.stats.syncs.get("merkle") == 1
    assert chain.down_sync.stats.records_applied - applied == 1
    # the origin loses its history: the relay repairs, then the replica below
    chain.origin.reset_history("up")
    ok(chain.origin.commit([WriteBatch("up", {b"u0002": seed_like_record(4321)})])[0])
    chain.step(2.0)
    assert chain.up_sync.stats.syncs.get("merkle") == 1
    assert chain.down_mirror.live.records == chain.origin_records()
    assert chain.down_mirror.cursor == chain.origin.info("up").cursor
    assert chain.down_sync.stats.syncs.get("merkle") == 2
    assert chain.down_sync.stats.digest_mismatches == 0


def test_a_real_relay_chain_converges(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        assert (
            client.post(
                "/v1/datasets", json={"name": "up", "schema": seed_like_schema().to_json()}
            ).status_code
            == 201
        )
        body = msgpack.packb(
            {"upserts": {b"u%04d" % i: seed_like_record(i) for i in range(1000)}}, use_bin_type=True
        )
        assert (
            client.post(
                "/v1/datasets/up/batch",
                content=body,
                headers={"content-type": "application/msgpack"},
            ).status_code
            == 200
        )
        from tests.origin_proc import free_port

        relay_port = free_port()
        with SidecarProcess(
            tmp_path / "relay", origin.base_url, ["up"],
            extra_env={"SIDECAR_SERVE_SYNC": f"127.0.0.1:{relay_port}"},
        ) as relay:  # fmt: skip
            relay.wait_ready()
            relay_url = f"http://127.0.0.1:{relay_port}"
            assert (
                httpx.post(relay_url + "/v1/datasets/up/batch", json={"upserts": {}}).status_code
                == 403
            )
            with SidecarProcess(tmp_path / "leaf", relay_url, ["up"]) as leaf:
                leaf.wait_ready()
                r = client.post(
                    "/v1/datasets/up/batch",
                    json={"upserts": {"u0001": seed_like_record(42)}, "deletes": ["u0002"]},
                )
                version = r.json()["version"]
                leaf.wait_version("up", version, timeout=15)
                st = leaf.status()["datasets"]["up"]
                assert st["syncs"].get("push", 0) >= 1, st["syncs"]  # passed on by the relay
                assert st["digest_mismatches"] == 0
                with Reader(leaf.data) as reader:
                    rec = reader.get("up", b"u0001")
                    assert rec is not None and rec["age"] == seed_like_record(42)["age"]
                    assert reader.get("up", b"u0002") is None
                    assert reader.version("up").version == version  # type: ignore[union-attr]
                fleet = httpx.get(relay_url + "/v1/fleet").json()
                assert "replicas" in fleet


def build_index(mirror: Mirror) -> None:
    while mirror.index_step("up", 64):
        pass


async def test_a_relays_leaf_listing_waits_for_its_leaf_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after the relay's snapshot load its leaf index is being built:
    a leaf listing waits for it (instead of hashing every unindexed record
    per leaf), answers as soon as it is complete, and is refused with a
    retryable error (503) if it takes longer than INDEX_WAIT."""
    chain = Chain(tmp_path)
    chain.up.run(0.0)
    mirror = chain.mirror
    assert not mirror.index_complete("up")
    geometry = mirror._state("up").live.tree.geometry
    leaves = tuple(sorted({geometry.leaf_of(k) for k in [b"u0007", b"u0300"]}))
    request = MerkleLeavesRequest("up", LeafQuery(leaves))

    monkeypatch.setattr(relay_module, "INDEX_WAIT", 0.2)
    with pytest.raises(RetryLaterError, match="still building the leaf index"):
        await chain.relay.sync(request)
    assert error_response(RetryLaterError("x"), "/v1/sync") == (503, "retry_later", "x")

    monkeypatch.setattr(relay_module, "INDEX_WAIT", 60.0)
    answers: list[Response] = []

    async def ask() -> None:
        answers.append(await chain.relay.sync(request))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(0.3)
        assert answers == []  # still waiting
        await trio.to_thread.run_sync(build_index, mirror)
        with trio.fail_after(2):  # answered promptly once the index is complete
            while not answers:
                await trio.sleep(0.01)
    (answer,) = answers
    assert isinstance(answer, MerkleLeavesResponse)
    with chain.origin.view("up") as origin_view:
        want = tuple((leaf, origin_view.leaf_entries(leaf)) for leaf in leaves)
    assert answer.answer.entries == want
