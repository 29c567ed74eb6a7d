"""The sidecar's mirror: origin datasets in one LMDB environment, written only
by the sync loop, read by anyone on the host.

Theory of operation
-------------------
Layout (``docs/FORMAT.md`` is the reference for readers in other languages):

=========================  ====================================================
named database             contents
=========================  ====================================================
``meta``                   ``ds/<name>`` -> msgpack map: ``gen`` (int, the live
                           generation), ``epoch`` (16 bytes or nil),
                           ``version`` (int),
                           ``meta_revision`` (int), ``definition`` (bytes: the
                           origin's dataset definition: schemas, dictionary,
                           geometry), ``synced_at`` (float, unix seconds).
                           ``stage/<name>`` -> the staged snapshot in progress
                           ``index/<name>`` -> where the leaf index build
                           resumes (present only while it is incomplete)
``d/<name>/<gen % 2>``     records: key -> value bytes, exactly as the origin
                           encoded them
``l/<name>/<gen % 2>``     Merkle leaf index: leaf (4 bytes BE) + key -> the
                           entry's 128-bit hash (16 bytes BE)
``j/<name>/<gen % 2>``     the JSON view (only for datasets in ``json_views``):
                           key -> HGET's reply, a RESP bulk string of the
                           record's JSON
=========================  ====================================================

A reader begins a read transaction, reads ``ds/<name>`` and then
``d/<name>/<gen % 2>``: everything it sees belongs to one origin version.

Every :class:`~replicad.replica.Apply` is one write transaction. A diff
(``LIVE``) updates the live generation's records and leaf index and the
``ds/`` record; before the commit the digest the batch expects is compared
with the digest the live tree would have after it, and a mismatch aborts
the transaction (nothing written, the tree untouched). A snapshot loads into
generation ``gen + 1`` (``STAGING``), chunk by chunk, each chunk committed
with its resume position (``stage/<name>``) so a crash resumes the load;
the promotion applies the catch-up diff to the staging generation, checks its
digest, flips ``gen`` and empties the old generation's databases, all in one
transaction (the two slots alternate, so no database handle is ever closed).
Readers that began before the flip keep reading the old generation (LMDB's
MVCC) until they end their transaction.

Leaf index: a snapshot chunk is staged without its leaf index rows (random
inserts into a B-tree of every key: half of a bootstrap's apply time); the
tree is updated from the hashes computed anyway. After the promotion the
sync loop builds the index in the background, in short write transactions
of a few thousand records each, walking the records in key order
(:meth:`Mirror.index_step`); ``index/<name>`` in ``meta`` (absent when the
index is complete) is where the walk resumes after a restart. Meanwhile
every apply keeps the rows of the keys it touches, so a row that exists is
always right; leaf entries are the rows plus, from the resume key on, the
records without a row, hashed on the spot (a walk over all of them per
leaf: the sync loop completes the index before a Merkle repair, and a relay
waits for it before listing leaves). At start-up a tree whose index is
incomplete (and a staging generation's) is rebuilt from the records.

Memory: the environment is opened with a writable memory map
(``MDB_WRITEMAP``), so a write transaction changes pages in place in the
(file-backed, shared) map instead of in malloc'd copies that LMDB would keep
for reuse for the life of the process -- a bootstrap's chunk of random leaf
index inserts dirties tens of megabytes of pages. A page in a hole of the
file that the disk cannot fill would then end the process with SIGBUS
instead of failing the write, so the data file's blocks are reserved
(``posix_fallocate``) up to the map size at open and before every growth: a
full disk is a clean error there (nothing written, the last version kept),
never in the middle of a transaction. The map starts small (64 MiB by
default) and doubles, so the reservation stays within twice the data.

JSON view: for the typed datasets in ``json_views``, every apply to the
live generation also writes (or deletes) the view rows of the records it
changes, rendered under the definition after the batch. Every row present
is right; a row may be missing, and a reader then renders the record. When
the rendering of stored records may change -- a LIVE batch bringing
another schema list or origin epoch (``renders_alike``), a snapshot
promotion -- the view is emptied in that transaction and ``json/from`` in
``ds/<name>`` is set to the empty key; :meth:`Mirror.json_step` then
renders the records in key order, ``JSON_STEP`` at a time outside the write
lock, writes the rows of those still unchanged in one write transaction, and
records where it resumes there (nil: built). Snapshot chunks write no rows.
A dataset named in ``json_views`` for the first time starts empty and is
built the same way, as is a view another renderer made (``rendering`` in
the record: ``json_render.RENDERING``); one no longer named has its view
emptied (the databases stay: readers may hold handles to them) at open. A
definition this process cannot build a codec from renders nothing (the
view empties and stays empty), and a map full at its maximum size drops
every view until the next start rather than fail the write.

The in-memory part is one :class:`~replicad.merkle.MerkleTree` per live
generation (and one for a staging generation), rebuilt at start-up from the
leaf index (one pass over 16-byte hashes, no re-hashing) -- or from the
records where the index is incomplete -- and updated only after a
transaction commits.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from xxhash import xxh3_64_intdigest

from replicad.errors import (
    CorruptStateError,
    MapFullError,
    StorageError,
)
from replicad.lmdb_scan import LEAF_PREFIX as _LEAF
from replicad.lmdb_scan import LmdbDatasetView
from replicad.merkle import Digest, Geometry, LeafEntries, MerkleTree, entry_hash
from replicad.messages import Cursor, MetaBlob
from replicad.replica import Apply, ReplicaState, SnapshotProgress, Target
from sidecar.json_render import RENDERING, JsonRenderer, bulk, renders_alike
from sidecar.reader import codec_from_definition

log = logging.getLogger("sidecar.mirror")

MAX_DATASETS = 64
"""Default bound on datasets per mirror (six LMDB databases each): LMDB's
cost of beginning any transaction grows with the bound, so it is modest by
default (``Mirror(max_datasets=...)`` / the sidecar's ``max_datasets``)."""
GROW_WAIT = 10.0
"""Seconds an apply that needs a bigger map waits for open read transactions."""
INDEX_STEP = 4_096
"""Records per write transaction of the background leaf index build
(:meth:`Mirror.index_step`): a few milliseconds, so a pushed version that
waits for the write lock meanwhile waits little."""
JSON_STEP = 1_024
"""Records per step of the background JSON view build (:meth:`Mirror.json_step`):
rendered outside the write lock (about 5 us a record), written under it."""


def _put_view_rows(txn: Any, db: Any, rows: list[tuple[bytes, bytes | None]]) -> None:
    """Write JSON view rows; a record rendered as None (it does not decode)
    gets no row, so readers render it themselves and report what is wrong."""
    txn.cursor(db=db).putmulti([(k, out) for k, out in rows if out is not None])
    for k, out in rows:
        if out is None:
            txn.delete(k, db=db)


def _digest_after(digest: Digest, changes: list[tuple[int, int | None, int | None]]) -> Digest:
    """The digest after ``(leaf, old hash, new hash)`` changes (XOR in, XOR out)."""
    count, xor = digest.count, digest.xor
    for _, old_h, new_h in changes:
        if old_h is not None:
            xor ^= old_h
            count -= 1
        if new_h is not None:
            xor ^= new_h
            count += 1
    return Digest(count, xor)


def _index_key(name: str) -> bytes:
    """The ``meta`` key holding where a leaf index build resumes."""
    return b"index/" + name.encode()


def _db_name(kind: str, name: str, gen: int) -> bytes:
    """Generations alternate between two slots, so the database handles this
    process (and readers) opened stay valid across promotions."""
    return f"{kind}/{name}/{gen % 2}".encode()


def geometry_of(definition: bytes | None) -> Geometry:
    """The Merkle geometry named in an origin dataset definition (default
    when there is none yet)."""
    if not definition:
        return Geometry()
    doc = msgpack.unpackb(definition, raw=False)
    return Geometry.from_json(doc["geometry"])


@dataclass
class _Gen:
    """One generation of a dataset: its databases and tree."""

    gen: int
    records: Any
    leaves: Any
    tree: MerkleTree
    index_from: bytes | None
    """None: the leaf index has a row for every record; else it has one for
    every record before this key (and for the keys applies touched since)."""
    json: Any = None
    """The JSON view's database of this slot (None: the dataset has none)."""


@dataclass
class _DatasetState:
    name: str
    gen: int
    cursor: Cursor | None
    meta_revision: int
    definition: bytes | None
    synced_at: float | None
    live: _Gen
    staging: _Gen | None
    progress: SnapshotProgress | None
    staged_meta: MetaBlob | None = None
    json_from: bytes | None = None
    """With a JSON view: None when it has a row for every typed record; else
    where its build resumes (rows before it and rows applies wrote since)."""
    json_resets: int = 0
    """How many times an apply emptied the view (a build step rendered
    before one does not write)."""


class _LeafView:
    """LeafSource over one generation's leaf index (a short read txn per call)."""

    def __init__(self, mirror: Mirror, name: str) -> None:
        self._mirror = mirror
        self._name = name

    def leaf_entries(self, leaf: int) -> LeafEntries:
        return self._mirror.leaf_entries(self._name, leaf)


class DatasetHandle:
    """What the replica state machine sees of one dataset (LocalContent)."""

    def __init__(self, mirror: Mirror, name: str) -> None:
        self._mirror = mirror
        self._name = name
        self._leaves = _LeafView(mirror, name)

    @property
    def tree(self) -> MerkleTree:
        return self._mirror._state(self._name).live.tree

    @property
    def leaves(self) -> _LeafView:
        return self._leaves

    @property
    def name(self) -> str:
        return self._name

    def apply(self, batch: Apply) -> bool:
        return self._mirror.apply(self._name, batch)

    def index_complete(self) -> bool:
        return self._mirror.index_complete(self._name)

    def index_step(self) -> bool:
        return self._mirror.index_step(self._name)

    def state(self) -> ReplicaState:
        return self._mirror.state(self._name)


class Mirror:
    """The sidecar's LMDB mirror. One writer (the sync loop; writes are
    serialized internally), any number of readers.

    Raises :class:`StorageError` if the environment cannot be opened and
    :class:`CorruptStateError` if its metadata cannot be read.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 64 << 20,
        max_map_size: int = 1 << 40,
        max_readers: int = 1024,
        durable: bool = True,
        file_mode: int = 0o660,
        max_datasets: int = MAX_DATASETS,
        json_views: Collection[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_datasets = max_datasets
        self.json_views = frozenset(json_views)
        """The datasets whose JSON view this mirror keeps (see "JSON view" in
        the module doc); the others' views are emptied at open."""
        self._renderers: dict[bytes, Callable[[bytes], bytes | None] | None] = {}
        self._rendered_by: set[str] = set()
        """Views found rendered by another renderer (``RENDERING``) at open."""
        self._views_dropped: set[str] = set()
        self.max_map_size = max(map_size, max_map_size)
        self._clock = clock
        self._write_lock = threading.Lock()
        self._state_lock = threading.Condition()
        self._readers = 0
        self._datasets: dict[str, _DatasetState] = {}
        self._closed = False
        self.on_commit: Callable[[str, Apply], None] | None = None
        """Called after each committed Apply, under the state lock (so a view
        opened afterwards sees the hook's effects): a relay keeps its
        version queue with it. It must be quick and must not raise."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=6 * max_datasets + 1,
                max_readers=max_readers,
                writemap=True,  # see "Memory" in the module doc
                sync=durable,
                # an OS crash may undo the last apply (integrity is kept, and the
                # sidecar simply pulls it again): one fsync per apply, not two
                metasync=False,
                readahead=False,
                mode=file_mode,
            )
            # the umask may have narrowed LMDB's create mode: readers in the
            # group need lock.mdb writable (it is LMDB's reader table)
            for name in ("data.mdb", "lock.mdb"):
                os.chmod(self.path / name, file_mode)
            try:
                self._reserve(self._env.info()["map_size"])
            except BaseException:
                self._env.close()
                raise
            self.stale_readers_cleared = self._env.reader_check()
            self._meta = self._env.open_db(b"meta")
            try:
                self._load()
                self._reconcile_json_views()
            except BaseException:
                self._env.close()
                raise
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the mirror at {self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open the mirror at {self.path}: {exc.strerror}") from exc

    # ------------------------------------------------------------ start-up

    def _load(self) -> None:
        with self._env.begin() as txn:
            rows = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._meta)}
        held = sum(1 for key in rows if key.startswith(b"ds/"))
        if held > self.max_datasets:
            raise StorageError(
                f"the mirror at {self.path} holds {held} datasets, more than max_datasets "
                f"({self.max_datasets}): raise the sidecar's max_datasets"
            )
        for key, raw in rows.items():
            if not key.startswith(b"ds/"):
                continue
            name = key[3:].decode()
            try:
                doc = msgpack.unpackb(raw, raw=False)
                gen = int(doc["gen"])
                epoch = doc["epoch"]
                cursor = None if epoch is None else Cursor(bytes(epoch), int(doc["version"]))
                definition = doc["definition"]
                view = doc.get("json")
                json_from = None if view is None else view["from"]
                if view is not None and view.get("rendering") != RENDERING:
                    self._rendered_by.add(name)
                stage_raw = rows.get(b"stage/" + name.encode())
                progress = None
                staged_meta = None
                if stage_raw is not None:
                    st = msgpack.unpackb(stage_raw, raw=False)
                    progress = SnapshotProgress(
                        Cursor(bytes(st["epoch"]), int(st["version"])), st["after"]
                    )
                    if st.get("definition") is not None:
                        staged_meta = MetaBlob(int(st["meta_revision"]), st["definition"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptStateError(f"mirror: dataset {name!r} metadata: {exc}") from exc
            live = self._open_gen(
                name,
                gen,
                geometry_of(definition),
                build=True,
                index_from=rows.get(_index_key(name)),
                json=view is not None,
            )
            staging = None
            if progress is not None:
                staged_def = staged_meta.body if staged_meta else definition
                staging = self._open_gen(
                    name,
                    gen + 1,
                    geometry_of(staged_def),
                    build=True,
                    index_from=b"",
                    json=view is not None,
                )
            self._datasets[name] = _DatasetState(
                name,
                gen,
                cursor,
                int(doc.get("meta_revision", 0)),
                definition,
                doc.get("synced_at"),
                live,
                staging,
                progress,
                staged_meta,
                json_from,
            )

    def _reconcile_json_views(self) -> None:
        """Start the JSON view of each dataset in ``json_views`` that has
        none (empty, to be built), empty and stop the others', and empty (to
        be built again) the views another renderer made."""
        turned = [
            ds
            for name, ds in self._datasets.items()
            if (name in self.json_views) != (ds.live.json is not None) or name in self._rendered_by
        ]
        if not turned:
            return
        with self._env.begin(write=True) as txn:
            for ds in turned:
                on = ds.name in self.json_views
                # both slots, emptied (stopped: kept, since readers may hold
                # handles to them; an empty view only sends them to the records)
                dbs = [
                    self._env.open_db(_db_name("j", ds.name, ds.gen + i), txn=txn) for i in (0, 1)
                ]
                for db in dbs:
                    txn.drop(db, delete=False)
                ds.live.json = dbs[0] if on else None
                if ds.staging is not None:
                    ds.staging.json = dbs[1] if on else None
                ds.json_from = b"" if on else None
                self._put_ds(
                    txn,
                    ds,
                    ds.gen,
                    ds.cursor,
                    meta=None,
                    synced_at=ds.synced_at,
                    json_from=ds.json_from,
                )

    def _open_gen(
        self,
        name: str,
        gen: int,
        geometry: Geometry,
        *,
        build: bool,
        index_from: bytes | None,
        json: bool = False,
    ) -> _Gen:
        records = self._env.open_db(_db_name("d", name, gen))
        leaves = self._env.open_db(_db_name("l", name, gen))
        json_db = self._env.open_db(_db_name("j", name, gen)) if json else None
        tree = MerkleTree(geometry)
        if build and index_from is None:  # from the leaf index: no hashing
            with self._env.begin(buffers=True) as txn:
                for k, v in txn.cursor(db=leaves):
                    tree.update_leaf(_LEAF.unpack_from(k)[0], None, int.from_bytes(v, "big"))
        elif build:  # the index is incomplete: hash the records
            leaf_of = geometry.leaf_of
            with self._env.begin() as txn:
                tree.update_leaves(
                    (leaf_of(k), None, entry_hash(k, v)) for k, v in txn.cursor(db=records)
                )
        return _Gen(gen, records, leaves, tree, index_from, json_db)

    @property
    def env(self) -> Any:
        """The LMDB environment, for in-process readers
        (:meth:`sidecar.reader.Reader.over`)."""
        return self._env

    def close(self) -> None:
        if not self._closed:
            self._env.close()
            self._closed = True

    # ------------------------------------------------------------ datasets

    def ensure(self, name: str) -> DatasetHandle:
        """Register ``name`` (creating an empty entry on first use) and return
        the handle the replica state machine reads the local tree through."""
        with self._write_lock:
            if name not in self._datasets:
                if len(self._datasets) >= self.max_datasets:
                    raise StorageError(
                        f"the mirror holds at most {self.max_datasets} datasets "
                        "(raise the sidecar's max_datasets)"
                    )
                json = name in self.json_views
                live = self._open_gen(name, 1, Geometry(), build=False, index_from=None, json=json)
                # both slots exist for readers
                self._open_gen(name, 2, Geometry(), build=False, index_from=None, json=json)
                ds = _DatasetState(name, 1, None, 0, None, None, live, None, None)
                with self._env.begin(write=True) as txn:
                    self._put_ds(txn, ds, 1, None, meta=None, synced_at=None)
                with self._state_lock:
                    self._datasets[name] = ds
        return DatasetHandle(self, name)

    def names(self) -> list[str]:
        return sorted(self._datasets)

    def _state(self, name: str) -> _DatasetState:
        return self._datasets[name]

    def state(self, name: str) -> ReplicaState:
        ds = self._state(name)
        return ReplicaState(ds.cursor, ds.meta_revision, ds.progress)

    def cursor(self, name: str) -> Cursor | None:
        return self._state(name).cursor

    def digest(self, name: str) -> Digest:
        return self._state(name).live.tree.digest

    def synced_at(self, name: str) -> float | None:
        return self._state(name).synced_at

    def definition(self, name: str) -> bytes | None:
        return self._state(name).definition

    def index_complete(self, name: str) -> bool:
        """Whether the live leaf index has a row for every record (see
        "Leaf index" in the module doc)."""
        return self._state(name).live.index_from is None

    def unindexed(self) -> list[str]:
        """The datasets whose live leaf index is still being built."""
        return [n for n, ds in sorted(self._datasets.items()) if ds.live.index_from is not None]

    def json_view_state(self, name: str) -> str:
        """``"off"``, ``"building"``, ``"built"``, or ``"dropped"``: emptied
        and stopped until the next start because the map was full."""
        ds = self._state(name)
        if ds.live.json is None:
            return "dropped" if name in self._views_dropped else "off"
        return "built" if ds.json_from is None else "building"

    def json_unbuilt(self) -> list[str]:
        """The datasets whose JSON view is still being built."""
        return [
            n
            for n, ds in sorted(self._datasets.items())
            if ds.live.json is not None and ds.json_from is not None
        ]

    # ------------------------------------------------------------ reads

    @contextmanager
    def read(self, *, buffers: bool = False) -> Iterator[Any]:
        """A read transaction of this process (short, please); counted so a
        map resize can wait for it. ``buffers``: values come as memoryviews
        into the map (valid until the transaction ends), not as copies."""
        with self._state_lock:
            self._readers += 1
        try:
            with self._env.begin(buffers=True) if buffers else self._env.begin() as txn:
                yield txn
        finally:
            with self._state_lock:
                self._readers -= 1
                self._state_lock.notify_all()

    @contextmanager
    def view(self, name: str) -> Iterator[LmdbDatasetView]:
        """A consistent view of one dataset for serving sync requests (a
        relay): its read transaction, cursor, digest and definition are
        captured together, under the lock commits take."""
        with self._state_lock:
            ds = self._state(name)
            txn = self._env.begin()  # may raise (reader slots full): count only after
            self._readers += 1
            view = LmdbDatasetView(
                name,
                records=(txn, ds.live.records),
                leaves=(txn, ds.live.leaves),
                cursor=ds.cursor,
                digest=ds.live.tree.digest,
                meta=MetaBlob(ds.meta_revision, ds.definition or b""),
                tree=ds.live.tree,
                queue=None,  # the relay sets its history's queue
                unindexed_from=ds.live.index_from,
            )
        try:
            yield view
        finally:
            txn.abort()
            with self._state_lock:
                self._readers -= 1
                self._state_lock.notify_all()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state lock (no commit changes a tree meanwhile)."""
        with self._state_lock:
            yield

    def get(self, name: str, key: bytes) -> bytes | None:
        ds = self._state(name)
        with self.read() as txn:
            value = txn.get(key, db=ds.live.records)
            return None if value is None else bytes(value)

    def leaf_entries(self, name: str, leaf: int) -> LeafEntries:
        """The live entries under ``leaf``, from the leaf index (while it is
        incomplete, plus the unindexed records of that leaf, hashed by a walk
        over all of them: the sync loop completes the index before a Merkle
        repair: ``sidecar.agent.DatasetSync._complete_leaf_index``)."""
        with self.view(name) as view:
            return view.leaf_entries(leaf)

    def items(self, name: str) -> dict[bytes, bytes]:
        """Every live record (for tests and small datasets)."""
        ds = self._state(name)
        with self.read() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=ds.live.records)}

    # ------------------------------------------------------------ writes

    def apply(self, name: str, batch: Apply) -> bool:
        """Execute ``batch`` in one write transaction (see the module doc).

        Returns False, with nothing written, when the digest after the batch
        would not be ``batch.expected_digest``. Raises MapFullError (nothing
        written) when the map is full at its maximum size, StorageError for
        other LMDB failures.
        """
        return self._writing(lambda: self._apply(name, batch))

    def index_step(self, name: str, limit: int = INDEX_STEP) -> bool:
        """Add the leaf index rows of up to ``limit`` more records of the
        live generation, in one write transaction that also records where
        the walk resumes; return whether records remain unindexed. Raises
        like :meth:`apply`."""
        return self._writing(lambda: self._index_step(name, limit))

    def json_step(self, name: str, limit: int = JSON_STEP) -> bool:
        """Render the JSON view rows of up to ``limit`` more records of the
        live generation and write them in one write transaction that also
        records where the build resumes; return whether records remain.
        The records are read and rendered in a read transaction, outside
        the write lock (applies go on meanwhile); the write keeps the rows
        of the records still unchanged, and nothing if the view was emptied
        meanwhile (the next step starts where the view then resumes).
        Raises like :meth:`apply`."""
        ds = self._state(name)
        with self._state_lock:  # one commit's state (applies update it under the lock)
            gen, start, definition, resets = ds.live, ds.json_from, ds.definition, ds.json_resets
        if gen.json is None or start is None:
            return False
        render = self._json_render(definition)
        rendered: list[tuple[bytes, bytes, bytes | None]] = []
        resume: bytes | None = None
        if render is not None:
            with self.read() as txn:
                cur = txn.cursor(db=gen.records)
                if cur.set_range(start):
                    for n, (k, v) in enumerate(cur.iternext()):
                        if n == limit:
                            resume = k
                            break
                        rendered.append((k, v, render(v)))

        def write() -> bool:
            # a definition that changed without emptying the view renders
            # the records alike (``renders_alike``): the rows still hold
            if (
                ds.live is not gen
                or gen.json is None
                or ds.json_from != start
                or ds.json_resets != resets
            ):
                return ds.json_from is not None and ds.live.json is not None
            return self._json_write(ds, rendered, resume)

        return self._writing(write)

    def _writing(self, write: Callable[[], bool]) -> bool:
        """Run ``write`` (one write transaction) under the write lock,
        growing the map and retrying when it is full."""
        with self._write_lock:
            while True:
                try:
                    return write()
                except lmdb.MapFullError as exc:
                    size = self._env.info()["map_size"]
                    if size >= self.max_map_size and self._drop_views():
                        continue  # an optional copy never stops the sync
                    if size >= self.max_map_size:
                        raise MapFullError(
                            f"mirror full at its maximum map size ({size >> 20} MiB)"
                        ) from exc
                    self._grow(min(size * 2, self.max_map_size))
                except lmdb.Error as exc:
                    raise StorageError(f"mirror write failed: {exc}") from exc

    def _drop_views(self) -> bool:
        """Empty and stop every JSON view (until the next start), in one
        write transaction; whether there was one."""
        dropped = [ds for ds in self._datasets.values() if ds.live.json is not None]
        if not dropped:
            return False
        try:
            with self._env.begin(write=True) as txn:
                for ds in dropped:
                    for gen in (ds.live, ds.staging):
                        if gen is not None and gen.json is not None:
                            txn.drop(gen.json, delete=False)
                    self._put_ds(
                        txn, ds, ds.gen, ds.cursor, meta=None, synced_at=ds.synced_at, view=False
                    )
        except lmdb.MapFullError:
            return False
        with self._state_lock:
            for ds in dropped:
                ds.live.json, ds.json_from = None, None
                if ds.staging is not None:
                    ds.staging.json = None
                self._views_dropped.add(ds.name)
        log.error(
            "the mirror's map is full at its maximum size: JSON views dropped until the "
            "next start (raise max_map_size_mb)",
            extra={"datasets": [ds.name for ds in dropped]},
        )
        return True

    def _grow(self, size: int) -> None:
        """Grow the map once no read transaction of this process is open,
        waiting at most ``GROW_WAIT`` seconds (a relay's snapshot stream may
        hold one); then fail the apply, retriably, instead of stalling."""
        with self._state_lock:
            if not self._state_lock.wait_for(lambda: not self._readers, timeout=GROW_WAIT):
                raise MapFullError(
                    "the mirror's map is full and could not grow: read transactions "
                    "stayed open; nothing was written, the sync loop retries"
                )
            self._reserve(size)
            self._env.set_mapsize(size)

    def _reserve(self, size: int) -> None:
        """Allocate the data file's blocks up to ``size`` bytes (see "Memory"
        in the module doc). Raises MapFullError, nothing written, when the
        disk cannot hold them."""
        try:
            fd = os.open(self.path / "data.mdb", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise MapFullError(
                f"the disk cannot hold the mirror's map at {size >> 20} MiB "
                f"({exc.strerror}); nothing was written"
            ) from exc

    def _json_render(self, definition: bytes | None) -> Callable[[bytes], bytes | None] | None:
        """The JSON view's row of a record under ``definition`` (None for a
        record that does not decode: readers render it, and report, as
        without a view), or None when its records have no JSON form (an
        opaque dataset, no definition yet)."""
        if definition is None:
            return None
        try:  # one lookup: also called outside the write lock
            return self._renderers[definition]
        except KeyError:
            pass
        render: Callable[[bytes], bytes | None] | None = None
        try:
            codec = codec_from_definition(definition)
        except Exception:  # one this sidecar cannot read (its readers cannot either)
            codec = None
        if codec is not None and codec.is_typed:
            text = JsonRenderer(codec)

            def render(value: bytes) -> bytes | None:
                try:
                    return bulk(text(value))
                except Exception:  # the reader's path reports it
                    return None

        if len(self._renderers) >= 8:
            self._renderers.clear()
        self._renderers[definition] = render
        return render

    def _apply(self, name: str, batch: Apply) -> bool:
        ds = self._state(name)
        now = self._clock()
        staged_meta = ds.staged_meta
        json_from, emptied = ds.json_from, False
        render = None
        txn = self._env.begin(write=True)
        try:
            if batch.target is Target.LIVE:
                target = ds.live
                if target.json is not None:
                    definition = ds.definition if batch.meta is None else batch.meta.body
                    render = self._json_render(definition)
                    if not renders_alike(
                        ds.definition,
                        None if ds.cursor is None else ds.cursor.epoch,
                        definition,
                        None if batch.cursor is None else batch.cursor.epoch,
                    ):  # its rows may be wrong now: empty, to be built again
                        txn.drop(target.json, delete=False)
                        json_from, emptied = b"", True
            elif batch.reset_staging or ds.staging is None:
                staged_meta = batch.meta
                definition = staged_meta.body if staged_meta else ds.definition
                target = self._fresh_gen(txn, name, ds.gen + 1, geometry_of(definition))
            else:
                target = ds.staging
                staged_meta = batch.meta or staged_meta
            changes, inserted = self._write_records(txn, target, batch, render)
            verify = batch.target is Target.LIVE or batch.promote
            assert not (verify and inserted[0]), "staged chunks are not verified"
            if (
                verify
                and batch.expected_digest is not None
                and batch.expected_digest != _digest_after(target.tree.digest, changes)
            ):
                txn.abort()
                return False
            stage_key = b"stage/" + name.encode()
            if batch.target is Target.LIVE:
                self._put_ds(
                    txn,
                    ds,
                    ds.gen,
                    batch.cursor,
                    meta=batch.meta,
                    synced_at=now,
                    json_from=json_from,
                )
            elif batch.promote:
                # its index and JSON view are built from the first record on
                # (see "Leaf index" and "JSON view")
                if ds.live.json is not None:
                    json_from, emptied = b"", True
                    txn.drop(ds.live.json, delete=False)
                self._put_ds(
                    txn,
                    ds,
                    target.gen,
                    batch.cursor,
                    meta=staged_meta,
                    synced_at=now,
                    json_from=json_from,
                )
                txn.put(_index_key(name), b"", db=self._meta)
                txn.delete(stage_key, db=self._meta)
                txn.drop(ds.live.records, delete=False)  # empty the old slot
                txn.drop(ds.live.leaves, delete=False)
            else:
                if batch.progress is None:
                    raise StorageError("a staging batch without progress")
                p = batch.progress
                stage = {
                    "epoch": p.base.epoch,
                    "version": p.base.version,
                    "after": p.after,
                    "definition": None if staged_meta is None else staged_meta.body,
                    "meta_revision": None if staged_meta is None else staged_meta.revision,
                }
                txn.put(stage_key, msgpack.packb(stage, use_bin_type=True), db=self._meta)
        except BaseException:
            txn.abort()
            raise
        with self._state_lock:
            txn.commit()
            target.tree.insert_many(*inserted)
            target.tree.update_leaves(changes)
            if batch.target is Target.LIVE:
                ds.cursor, ds.synced_at = batch.cursor, now
                if batch.meta is not None:
                    ds.definition, ds.meta_revision = batch.meta.body, batch.meta.revision
            elif batch.promote:
                if staged_meta is not None:
                    ds.definition, ds.meta_revision = staged_meta.body, staged_meta.revision
                ds.live, ds.staging, ds.gen = target, None, target.gen
                ds.cursor, ds.synced_at, ds.progress, ds.staged_meta = batch.cursor, now, None, None
            else:
                ds.staging, ds.progress, ds.staged_meta = target, batch.progress, staged_meta
            ds.json_from = json_from
            ds.json_resets += emptied
            if self.on_commit is not None:
                self.on_commit(name, batch)
        return True

    def _fresh_gen(self, txn: Any, name: str, gen: int, geometry: Geometry) -> _Gen:
        records = self._env.open_db(_db_name("d", name, gen), txn=txn)
        leaves = self._env.open_db(_db_name("l", name, gen), txn=txn)
        txn.drop(records, delete=False)
        txn.drop(leaves, delete=False)
        json = None
        if self._state(name).live.json is not None:
            json = self._env.open_db(_db_name("j", name, gen), txn=txn)
            txn.drop(json, delete=False)
        # staged chunks write no leaf index rows (see "Leaf index") and no
        # JSON view rows (built after the promotion)
        return _Gen(gen, records, leaves, MerkleTree(geometry), index_from=b"", json=json)

    def _index_step(self, name: str, limit: int) -> bool:
        ds = self._state(name)
        gen = ds.live
        start = gen.index_from
        if start is None:
            return False
        leaf_of, pack = gen.tree.geometry.leaf_of, _LEAF.pack
        txn = self._env.begin(write=True)
        try:
            cur = txn.cursor(db=gen.records)
            rows: list[tuple[bytes, bytes]] = []
            resume: bytes | None = None
            if cur.set_range(start):
                for k, v in cur.iternext():  # hashed as walked: values may be large
                    if len(rows) == limit:
                        resume = k
                        break
                    rows.append((pack(leaf_of(k)) + k, entry_hash(k, v).to_bytes(16, "big")))
            txn.cursor(db=gen.leaves).putmulti(rows)
            if resume is None:
                txn.delete(_index_key(name), db=self._meta)
            else:
                txn.put(_index_key(name), resume, db=self._meta)
        except BaseException:
            txn.abort()
            raise
        with self._state_lock:
            txn.commit()
            gen.index_from = resume
        return resume is not None

    def _json_write(
        self,
        ds: _DatasetState,
        rendered: list[tuple[bytes, bytes, bytes | None]],
        resume: bytes | None,
    ) -> bool:
        """Write a build step's rows (under the write lock): those of records
        still as they were rendered (an apply since wrote the others' rows
        itself, or deleted them with their records)."""
        gen = ds.live
        txn = self._env.begin(write=True)
        try:
            get = txn.cursor(db=gen.records).get
            _put_view_rows(txn, gen.json, [(k, out) for k, v, out in rendered if get(k) == v])
            self._put_ds(
                txn, ds, ds.gen, ds.cursor, meta=None, synced_at=ds.synced_at, json_from=resume
            )
        except BaseException:
            txn.abort()
            raise
        with self._state_lock:
            txn.commit()
            ds.json_from = resume
        return resume is not None

    def _write_records(
        self,
        txn: Any,
        gen: _Gen,
        batch: Apply,
        render: Callable[[bytes], bytes | None] | None = None,
    ) -> tuple[list[tuple[int, int | None, int | None]], tuple[list[int], list[int]]]:
        """Write the batch into ``gen`` (and, with ``render``, the JSON view
        rows of the records it changes); return ``(leaf, old hash, new hash)``
        per change, and the ``(leaves, hashes)`` of the keys a snapshot chunk
        inserted (new to the tree: :meth:`MerkleTree.insert_many`). Each
        key's leaf and each value's hash are computed once: they feed the
        leaf index, the digest check and the tree update."""
        changes: list[tuple[int, int | None, int | None]] = []
        inserted: tuple[list[int], list[int]] = ([], [])
        shift = 64 - (gen.tree.geometry.leaves.bit_length() - 1)
        records, leaves = gen.records, gen.leaves
        replace, pack = txn.replace, _LEAF.pack
        upserts: Sequence[tuple[bytes, bytes]] = batch.upserts
        if batch.target is Target.STAGING and not batch.promote:
            # a snapshot chunk: its keys are new to staging (chunks do not
            # overlap), so insert without reading old values; a key already
            # there (a server repeating itself) takes the general path below
            upserts, inserted = self._stage_chunk(txn, gen, batch.upserts, shift)
        # one pass per step, each a comprehension (a large diff is 100,000s
        # of records): write the values, keep the changed ones, then their
        # leaves, hashes and index rows (in batch order: a key repeated in
        # the batch ends with its last value, as one put after another would)
        olds = [replace(key, value, db=records) for key, value in upserts]
        changed = [
            (key, value, old)
            for (key, value), old in zip(upserts, olds, strict=True)
            if old != value
        ]
        if changed:
            new_leaves = [xxh3_64_intdigest(key) >> shift for key, _, _ in changed]
            new_hashes = [entry_hash(key, value) for key, value, _ in changed]
            old_hashes = [None if old is None else entry_hash(key, old) for key, _, old in changed]
            rows = [pack(lf) + c[0] for lf, c in zip(new_leaves, changed, strict=True)]
            hashes = [h.to_bytes(16, "big") for h in new_hashes]
            txn.cursor(db=leaves).putmulti(list(zip(rows, hashes, strict=True)))
            changes += zip(new_leaves, old_hashes, new_hashes, strict=True)
            if render is not None:
                _put_view_rows(txn, gen.json, [(key, render(value)) for key, value, _ in changed])
        for key in batch.deletes:
            old = txn.pop(key, db=records)
            if old is None:
                continue
            if render is not None:
                txn.delete(key, db=gen.json)
            leaf = xxh3_64_intdigest(key) >> shift
            txn.delete(pack(leaf) + key, db=leaves)
            changes.append((leaf, entry_hash(key, bytes(old)), None))
        return changes, inserted

    @staticmethod
    def _stage_chunk(
        txn: Any, gen: _Gen, chunk: Sequence[tuple[bytes, bytes]], shift: int
    ) -> tuple[list[tuple[bytes, bytes]], tuple[list[int], list[int]]]:
        """Insert a snapshot chunk's records into staging, without leaf index
        rows (see "Leaf index" in the module doc); return the ones that were
        already there (for the general path) and the leaves and hashes of the
        rest. The usual chunk (keys ascending, all after the last staged key:
        the origin sends them in key order) is appended by LMDB in one call;
        any other is inserted key by key without overwriting."""
        keys = [k for k, _ in chunk]
        cur = txn.cursor(db=gen.records)
        again: list[tuple[bytes, bytes]] = []
        if (
            keys
            and all(map(operator.lt, keys, islice(keys, 1, None)))
            and (not cur.last() or cur.key() < keys[0])
        ):
            _, added = cur.putmulti(chunk, overwrite=False, append=True)
            if added != len(keys):  # pragma: no cover - LMDB refused an append it was promised
                raise StorageError(f"staging appended {added} of {len(keys)} records")
            fresh: Sequence[tuple[bytes, bytes]] = chunk
        else:
            put, records = txn.put, gen.records
            fresh = []
            for item in chunk:
                (fresh if put(item[0], item[1], db=records, overwrite=False) else again).append(
                    item
                )
            keys = [k for k, _ in fresh]
        leaves = [xxh3_64_intdigest(k) >> shift for k in keys]
        hashes = [entry_hash(k, v) for k, v in fresh]
        return again, (leaves, hashes)

    def _put_ds(
        self,
        txn: Any,
        ds: _DatasetState,
        gen: int,
        cursor: Cursor | None,
        *,
        meta: MetaBlob | None,
        synced_at: float | None,
        json_from: bytes | None = None,
        view: bool | None = None,
    ) -> None:
        """Write ``ds/<name>``; with a JSON view (``view``, by default
        whether the dataset has one), ``json_from`` is where its build
        resumes (None: built)."""
        if view is None:
            view = ds.live.json is not None
        doc: dict[str, Any] = {
            "gen": gen,
            "epoch": None if cursor is None else cursor.epoch,
            "version": 0 if cursor is None else cursor.version,
            "meta_revision": ds.meta_revision if meta is None else meta.revision,
            "definition": ds.definition if meta is None else meta.body,
            "synced_at": synced_at,
            "json": {"from": json_from, "rendering": RENDERING} if view else None,
        }
        txn.put(b"ds/" + ds.name.encode(), msgpack.packb(doc, use_bin_type=True), db=self._meta)
