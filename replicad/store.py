"""The origin's durable store: LMDB under the sans-IO core.

Theory of operation
-------------------
Two LMDB environments. ``DATA/origin.lmdb`` (durable: fsync on commit)
holds every dataset's truth:

==================  =========================================================
named database      contents
==================  =========================================================
``meta``            ``format``: 2; ``ds/<name>``: the dataset's definition
                    (schemas, dictionary, Merkle geometry, queue policy and
                    bounds); ``st/<name>``: its state (epoch, version, queue
                    floor, digest, meta revision); ``tree/<name>``: the Merkle
                    tree saved at a clean shutdown, with the version it
                    describes; ``clean``: present only between a clean
                    shutdown and the next start
``r/<name>``        records: key -> value bytes (the codec's canonical
                    encoding), in key order, so loads of ordered keys append
``q/<name>``        version queue entries: ``version (8 bytes BE)`` -> entry
==================  =========================================================

``DATA/index.lmdb`` holds ``l/<name>``: ``leaf (4 bytes BE) + key`` -> entry
hash (16 bytes BE), the Merkle leaf listing. Keys hash to leaves, so its
writes scatter over the whole B-tree; it is derived data, so it is written in
the same commit but never fsynced (it would multiply the pages each durable
commit must flush). It is trusted only after a clean shutdown (the ``clean``
marker, consumed at start); after a crash it is rebuilt from the records, in
the same pass that rebuilds the Merkle tree. (Format 1 stores, whose record
keys carried the leaf prefix, are converted at start.)

Writes (:meth:`OriginStore.commit`) take a group of batches and run them in
one write transaction: encode every record first (a batch that fails
validation is rejected alone, nothing of it written), then for each batch read
the old values, write the new ones, compute the new digest from entry hashes,
push the batch onto a *copy* of the version queue and persist the queue delta
and the dataset state. Only then, under the state lock, the transaction
commits (fsync when durable) and the in-memory tree and queue are switched to
the new state. A reader opens its view under the same lock, so the view's
LMDB snapshot, cursor, digest, queue and tree always describe one version.
If the transaction fails nothing in memory changed (the dictionary additions
of the group are rolled back), so the store is as it was.

A full map (``MDB_MAP_FULL``) grows the map (doubling, up to the configured
maximum) once no read transaction of this process is open, and retries the
group; at the maximum the group fails with :class:`MapFullError`, nothing
written.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from xxhash import xxh3_64_intdigest, xxh3_128_intdigest

from replicad.codec import DatasetCodec, Dictionary, check_key
from replicad.errors import (
    BadRequestError,
    CorruptStateError,
    DatasetExistsError,
    MapFullError,
    MerkleError,
    ReplicadError,
    StaleEncodingError,
    StorageError,
    UnknownDatasetError,
)
from replicad.lmdb_scan import LEAF_PREFIX as _LEAF
from replicad.lmdb_scan import LmdbDatasetView
from replicad.merkle import Digest, Geometry, MerkleTree, entry_hash
from replicad.messages import (
    Cursor,
    DiffPush,
    MerkleNodesRequest,
    MetaBlob,
    Record,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)
from replicad.origin_types import (
    DatasetInfo,
    DatasetSpec,
    EncodeFailure,
    EncodingBasis,
    WriteBatch,
    WriteResult,
    check_dataset_name,
)
from replicad.responder import ResponderConfig, respond, snapshot_chunk
from replicad.schema import Schema
from replicad.version_queue import (
    VersionQueue,
    decode_entry,
    encode_entry,
    policy_by_name,
)

MAX_DATASETS = 1000
GROW_WAIT = 10.0
"""Seconds a write that needs a bigger map waits for open read transactions."""
MAX_QUEUE_KEYS = 1_000_000
"""Keys a dataset's version queue may hold; past it the oldest history is
dropped (replicas that old repair with Merkle). Entries larger than the
biggest diff the responder ships would be useless anyway."""
_VERSION = struct.Struct(">Q")
FORMAT = 2
"""The store's on-disk format (see the module docstring)."""
_REBUILD_CHUNK = 100_000


def _name_key(prefix: str, name: str) -> bytes:
    return f"{prefix}/{name}".encode()


@dataclass
class _Dataset:
    """In-memory state of one dataset; replaced or mutated only under the
    store's state lock (the queue object is replaced, never mutated)."""

    name: str
    spec: DatasetSpec
    schemas: list[Schema]
    codec: DatasetCodec
    records_db: Any
    leaves_db: Any
    queue_db: Any
    queue: VersionQueue
    tree: MerkleTree
    meta_revision: int
    meta_blob: MetaBlob
    info: DatasetInfo | None = None
    """What :meth:`OriginStore.info` answers: rebuilt under the state lock
    with every change, read without it."""

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.queue.epoch, self.queue.version)

    @property
    def leaf_shift(self) -> int:
        """``leaf_of(key) == xxh3_64(key) >> leaf_shift``."""
        return 64 - (self.spec.geometry.leaves.bit_length() - 1)


def _definition(ds_spec: DatasetSpec, schemas: Sequence[Schema], dictionary: Dictionary) -> bytes:
    doc = {
        "name": ds_spec.name,
        "kind": "opaque" if ds_spec.schema is None else "typed",
        "schemas": [s.to_json() for s in schemas],
        "dictionary": dictionary.to_json(),
        "geometry": ds_spec.geometry.to_json(),
        "policy": ds_spec.policy,
        "max_entries": ds_spec.max_entries,
        "max_value_bytes": ds_spec.max_value_bytes,
        "compress": ds_spec.compress,
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def _meta_blob(definition: bytes, revision: int) -> MetaBlob:
    """What replicas receive: the definition minus origin-only settings."""
    doc = msgpack.unpackb(definition, raw=False)
    for origin_only in ("policy", "max_entries", "compress"):
        doc.pop(origin_only, None)
    return MetaBlob(revision, msgpack.packb(doc, use_bin_type=True))


class OriginStore:
    """The origin's datasets in one LMDB environment. Thread-safe: one writer
    at a time (serialized internally), any number of readers.

    Raises :class:`StorageError` when the environment cannot be opened.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 1 << 30,
        max_map_size: int = 64 << 30,
        durable: bool = True,
        max_readers: int = 256,
        random_bytes: Callable[[int], bytes] = os.urandom,
        push_max_bytes: int = 256 << 10,
    ) -> None:
        self.path = Path(path)
        self.max_map_size = max(max_map_size, map_size)
        self.push_max_bytes = push_max_bytes
        """Batches whose changes (keys and values) exceed this many bytes
        carry no :class:`~replicad.messages.DiffPush` (0: never push)."""
        self._random_bytes = random_bytes
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._readers = 0
        self._readers_idle = threading.Condition(self._state_lock)
        self._datasets: dict[str, _Dataset] = {}
        self._closed = False
        self._broken = ""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.path / "origin.lmdb"),
                map_size=map_size,
                max_dbs=2 * MAX_DATASETS + 1,
                sync=durable,
                metasync=durable,
                max_readers=max_readers,
                readahead=False,
            )
            self._env.reader_check()
            # derived data, never fsynced; twice the records' bound, so it is
            # never the one that fills up
            self._index = lmdb.open(
                str(self.path / "index.lmdb"),
                map_size=2 * self.max_map_size,
                max_dbs=MAX_DATASETS + 1,
                sync=False,
                metasync=False,
                max_readers=max_readers,
                readahead=False,
            )
            self._index.reader_check()
            self._meta_db = self._env.open_db(b"meta")
            self._load()
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from exc

    # ------------------------------------------------------------ start-up

    def _load(self) -> None:
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._meta_db)
            definitions = {
                bytes(k)[3:].decode(): bytes(v) for k, v in cur if bytes(k).startswith(b"ds/")
            }
            states = {
                name: txn.get(_name_key("st", name), db=self._meta_db) for name in definitions
            }
            trees = {
                name: txn.get(_name_key("tree", name), db=self._meta_db) for name in definitions
            }
            fmt = txn.get(b"format", db=self._meta_db)
            clean = txn.get(b"clean", db=self._meta_db) is not None
        if fmt is None and definitions:
            self._convert_format_1(definitions)
            clean = False
        elif fmt is not None and int(fmt) != FORMAT:
            raise CorruptStateError(f"store format {int(fmt)} is not {FORMAT}: upgrade replicad")
        for name, definition in definitions.items():
            state = states[name]
            if state is None:
                raise CorruptStateError(f"dataset {name!r} has no state record")
            ds = self._open_dataset(
                name, definition, bytes(state), trees[name] if clean else None, clean
            )
            ds.info = self._info(ds)
            self._datasets[name] = ds
        # from here on a crash leaves the index untrusted until a clean close
        with self._env.begin(write=True) as txn:
            txn.put(b"format", str(FORMAT).encode(), db=self._meta_db)
            txn.delete(b"clean", db=self._meta_db)

    def _convert_format_1(self, definitions: Mapping[str, bytes]) -> None:
        """Format 1 keyed records by leaf prefix + key: strip the prefix (one
        transaction per dataset; an interrupted conversion is redone, since
        the format marker is written only after every dataset is done)."""
        for name in definitions:
            db = self._env.open_db(_name_key("r", name))
            with self._env.begin(write=True) as txn:
                rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                if rows and len(rows[0][0]) > 4 and all(len(k) > 4 for k, _ in rows):
                    txn.drop(db, delete=False)
                    txn.cursor(db=db).putmulti(sorted((k[4:], v) for k, v in rows))

    def _open_dataset(
        self,
        name: str,
        definition: bytes,
        state_raw: bytes,
        saved_tree: bytes | None,
        index_trusted: bool,
    ) -> _Dataset:
        try:
            doc = msgpack.unpackb(definition, raw=False)
            state = msgpack.unpackb(state_raw, raw=False)
            schemas = [Schema.from_json(s) for s in doc["schemas"]]
            geometry = Geometry.from_json(doc["geometry"])
            spec = DatasetSpec(
                name=name,
                schema=schemas[-1] if schemas else None,
                geometry=geometry,
                max_entries=int(doc["max_entries"]),
                policy=str(doc["policy"]),
                max_value_bytes=int(doc["max_value_bytes"]),
                compress=bool(doc["compress"]),
            )
            dictionary = Dictionary.from_json(doc["dictionary"])
            epoch, version, floor = (
                bytes(state["epoch"]),
                int(state["version"]),
                int(state["floor"]),
            )
            digest = Digest.from_bytes(state["digest"])
            meta_revision = int(state["meta_revision"])
        except (KeyError, TypeError, ValueError, ReplicadError) as exc:
            raise CorruptStateError(f"dataset {name!r}: unreadable definition: {exc}") from exc
        codec = DatasetCodec(
            schemas or None,
            dictionary=dictionary,
            max_value_bytes=spec.max_value_bytes,
            compress=spec.compress,
        )
        records_db = self._env.open_db(_name_key("r", name))
        queue_db = self._env.open_db(_name_key("q", name))
        leaves_db = self._index.open_db(_name_key("l", name))
        policy = policy_by_name(spec.policy)
        try:
            with self._env.begin() as txn:
                entries = [decode_entry(bytes(v)) for _, v in txn.cursor(db=queue_db)]
            queue = VersionQueue.from_entries(
                epoch,
                floor,
                version,
                entries,
                max_entries=spec.max_entries,
                max_keys=MAX_QUEUE_KEYS,
                policy=policy,
            )
        except ReplicadError:
            # the history is unusable: keep the data, start a new epoch
            queue = VersionQueue(
                self._random_bytes(16),
                floor=version,
                max_entries=spec.max_entries,
                max_keys=MAX_QUEUE_KEYS,
                policy=policy,
            )
        tree = self._load_tree(
            saved_tree,
            records_db=records_db,
            leaves_db=leaves_db,
            geometry=geometry,
            version=version,
            epoch=epoch,
            index_trusted=index_trusted,
        )
        if tree.digest != digest:
            raise CorruptStateError(
                f"dataset {name!r}: records digest {tree.digest.hex()} != recorded {digest.hex()}"
            )
        ds = _Dataset(
            name,
            spec,
            schemas,
            codec,
            records_db,
            leaves_db,
            queue_db,
            queue,
            tree,
            meta_revision,
            _meta_blob(definition, meta_revision),
        )
        if queue.epoch != epoch:
            self._write_state(ds)
        return ds

    def _load_tree(
        self,
        saved: bytes | None,
        *,
        records_db: Any,
        leaves_db: Any,
        geometry: Geometry,
        version: int,
        epoch: bytes,
        index_trusted: bool,
    ) -> MerkleTree:
        if saved is not None:
            try:
                doc = msgpack.unpackb(saved, raw=False)
                if doc["version"] == version and doc["epoch"] == epoch:
                    tree = MerkleTree.from_bytes(doc["tree"])
                    if tree.geometry == geometry:
                        return tree
            except (KeyError, TypeError, ValueError, MerkleError):
                pass  # rebuild below
        tree = MerkleTree(geometry)
        if index_trusted:  # the leaf index has every entry hash: no hashing
            with self._index.begin(buffers=True) as txn:
                tree.update_leaves(
                    (_LEAF.unpack_from(k)[0], None, int.from_bytes(v, "big"))
                    for k, v in txn.cursor(db=leaves_db)
                )
            return tree
        # rebuild the index from the records, and the tree with it
        shift = 64 - (geometry.leaves.bit_length() - 1)
        pack = _LEAF.pack
        with self._index.begin(write=True) as itxn:
            itxn.drop(leaves_db, delete=False)
        with self._env.begin(buffers=True) as txn:
            records = txn.cursor(db=records_db)
            more = records.first()
            while more:
                changes: list[tuple[int, int | None, int | None]] = []
                rows: list[tuple[bytes, bytes]] = []
                add_change, add_row = changes.append, rows.append
                for k, v in islice(records.iternext(), _REBUILD_CHUNK):
                    key = bytes(k)
                    leaf = xxh3_64_intdigest(key) >> shift
                    h = xxh3_128_intdigest(key + v, len(key))  # entry_hash, inlined
                    add_change((leaf, None, h))
                    add_row((pack(leaf) + key, h.to_bytes(16, "big")))
                more = len(rows) == _REBUILD_CHUNK and records.next()
                tree.update_leaves(changes)
                with self._index.begin(write=True) as itxn:
                    itxn.cursor(db=leaves_db).putmulti(rows)
        return tree

    def _write_state(self, ds: _Dataset) -> None:
        with self._write_lock, self._env.begin(write=True) as txn:
            txn.put(
                _name_key("st", ds.name),
                self._state_doc(ds, ds.queue, ds.tree.digest),
                db=self._meta_db,
            )
            self._drop_queue_entries(txn, ds)

    @staticmethod
    def _state_doc(
        ds: _Dataset, queue: VersionQueue, digest: Digest, revision: int | None = None
    ) -> bytes:
        out: bytes = msgpack.packb(
            {
                "epoch": queue.epoch,
                "version": queue.version,
                "floor": queue.floor,
                "digest": digest.to_bytes(),
                "meta_revision": ds.meta_revision if revision is None else revision,
            },
            use_bin_type=True,
        )
        return out

    @staticmethod
    def _drop_queue_entries(txn: Any, ds: _Dataset) -> None:
        txn.drop(ds.queue_db, delete=False)
        for entry in ds.queue.entries:
            txn.put(_VERSION.pack(entry.version), encode_entry(entry), db=ds.queue_db)

    # ------------------------------------------------------------ admin

    def close(self) -> None:
        """Save each Merkle tree (so the next start-up skips the rebuild) and
        close the environment. Idempotent."""
        if self._closed:
            return
        with self._write_lock:
            try:
                self._index.sync(True)
                with self._env.begin(write=True) as txn:
                    if not self._broken:  # the index is whole: trust it next time
                        txn.put(b"clean", b"1", db=self._meta_db)
                    for ds in self._datasets.values():
                        doc = {
                            "version": ds.queue.version,
                            "epoch": ds.queue.epoch,
                            "tree": ds.tree.to_bytes(),
                        }
                        txn.put(
                            _name_key("tree", ds.name),
                            msgpack.packb(doc, use_bin_type=True),
                            db=self._meta_db,
                        )
            except lmdb.Error:
                pass  # a missing saved tree only costs a rebuild
            self._env.close()
            self._index.close()
            self._closed = True

    def names(self) -> list[str]:
        return sorted(self._datasets)

    def check(self, name: str) -> None:
        """UnknownDatasetError unless ``name`` exists. Takes no lock, so the
        event loop can call it while a commit holds the state lock."""
        if name not in self._datasets:
            raise UnknownDatasetError(f"no dataset named {name!r}")

    def _dataset(self, name: str) -> _Dataset:
        ds = self._datasets.get(name)
        if ds is None:
            raise UnknownDatasetError(f"no dataset named {name!r}")
        return ds

    def info(self, name: str) -> DatasetInfo:
        """The dataset's state after its last change. It does not take the
        state lock, which a commit holds through its fsync: the HTTP event
        loop asks this on every write and must not wait for a disk."""
        return self._published(self._dataset(name))

    def infos(self) -> list[DatasetInfo]:
        """:meth:`info` of every dataset, by name."""
        found = list(self._datasets.values())  # one C-level copy: safe from other threads
        return sorted((self._published(ds) for ds in found), key=lambda i: i.name)

    @staticmethod
    def _published(ds: _Dataset) -> DatasetInfo:
        if ds.info is None:  # pragma: no cover - set wherever a dataset is made
            raise StorageError(f"dataset {ds.name!r} has no published state")
        return ds.info

    @staticmethod
    def _info(ds: _Dataset) -> DatasetInfo:
        return DatasetInfo(
            name=ds.name,
            schema=ds.schemas[-1] if ds.schemas else None,
            schema_versions=len(ds.schemas),
            cursor=ds.cursor,
            digest=ds.tree.digest,
            meta_revision=ds.meta_revision,
            queue_floor=ds.queue.floor,
            queue_entries=len(ds.queue.entries),
            geometry=ds.spec.geometry,
            policy=ds.spec.policy,
            max_entries=ds.spec.max_entries,
            max_value_bytes=ds.spec.max_value_bytes,
        )

    def codec(self, name: str) -> DatasetCodec:
        return self._dataset(name).codec

    def encoding_basis(self, name: str) -> EncodingBasis:
        """What an ingest worker needs to encode records of ``name`` the way
        :meth:`commit` would: the committed definition (schemas and
        dictionary, never codes of a write still in flight) and its revision.
        Raises UnknownDatasetError."""
        ds = self._dataset(name)
        blob = ds.meta_blob  # one object: revision and body always agree
        return EncodingBasis(str(self.path), name, blob.revision, blob.body, ds.spec.compress)

    def create_dataset(self, spec: DatasetSpec) -> DatasetInfo:
        """Create an empty dataset at version 0 of a new epoch.

        Raises DatasetExistsError, BadRequestError (name), ConfigError (policy
        or bounds)."""
        check_dataset_name(spec.name)
        policy = policy_by_name(spec.policy)
        schemas = [] if spec.schema is None else [spec.schema]
        codec = DatasetCodec(
            schemas or None, max_value_bytes=spec.max_value_bytes, compress=spec.compress
        )
        queue = VersionQueue(
            self._random_bytes(16),
            max_entries=spec.max_entries,
            max_keys=MAX_QUEUE_KEYS,
            policy=policy,
        )
        with self._write_lock:
            if spec.name in self._datasets:
                raise DatasetExistsError(f"dataset {spec.name!r} already exists")
            if len(self._datasets) >= MAX_DATASETS:
                raise BadRequestError(f"at most {MAX_DATASETS} datasets")
            definition = _definition(spec, schemas, codec.dictionary)
            tree = MerkleTree(spec.geometry)

            def run() -> _Dataset:
                records_db = self._env.open_db(_name_key("r", spec.name))
                queue_db = self._env.open_db(_name_key("q", spec.name))
                leaves_db = self._index.open_db(_name_key("l", spec.name))
                ds = _Dataset(
                    spec.name,
                    spec,
                    schemas,
                    codec,
                    records_db,
                    leaves_db,
                    queue_db,
                    queue,
                    tree,
                    1,
                    _meta_blob(definition, 1),
                )
                with self._env.begin(write=True) as txn:
                    txn.put(_name_key("ds", spec.name), definition, db=self._meta_db)
                    txn.put(
                        _name_key("st", spec.name),
                        self._state_doc(ds, queue, tree.digest),
                        db=self._meta_db,
                    )
                return ds

            made: _Dataset = self._with_growth(run)
            with self._state_lock:
                made.info = self._info(made)
                self._datasets[spec.name] = made
                return made.info

    def evolve_schema(self, name: str, schema: Schema) -> DatasetInfo:
        """Append a schema version (append-only evolution). Raises
        SchemaError for anything else, BadRequestError for opaque datasets."""
        with self._write_lock:
            ds = self._dataset(name)
            if not ds.schemas:
                raise BadRequestError(f"dataset {name!r} is opaque: it has no schema")
            current = ds.schemas[-1]
            if schema.version != current.version + 1:
                schema = Schema(current.version + 1, schema.fields)
            Schema.check_evolution(current, schema)
            schemas = [*ds.schemas, schema]
            codec = ds.codec.with_schema(schema)
            spec = replace(ds.spec, schema=schema)
            definition = _definition(spec, schemas, codec.dictionary)
            revision = ds.meta_revision + 1

            def run() -> None:
                with self._env.begin(write=True) as txn:
                    txn.put(_name_key("ds", name), definition, db=self._meta_db)
                    txn.put(
                        _name_key("st", name),
                        self._state_doc(ds, ds.queue, ds.tree.digest, revision),
                        db=self._meta_db,
                    )

            self._with_growth(run)
            with self._state_lock:
                ds.schemas, ds.codec, ds.spec = schemas, codec, spec
                ds.meta_revision = revision
                ds.meta_blob = _meta_blob(definition, revision)
                ds.info = self._info(ds)
                return ds.info

    def reset_history(self, name: str) -> DatasetInfo:
        """Forget the version queue: a new epoch whose history starts at the
        current version. Replicas of the old epoch repair with Merkle."""
        with self._write_lock:
            ds = self._dataset(name)
            queue = VersionQueue(
                self._random_bytes(16),
                floor=ds.queue.version,
                max_entries=ds.spec.max_entries,
                max_keys=MAX_QUEUE_KEYS,
                policy=ds.queue.policy,
            )

            def run() -> None:
                with self._env.begin(write=True) as txn:
                    txn.drop(ds.queue_db, delete=False)
                    txn.put(
                        _name_key("st", name),
                        self._state_doc(ds, queue, ds.tree.digest),
                        db=self._meta_db,
                    )

            self._with_growth(run)
            with self._state_lock:
                ds.queue = queue
                ds.info = self._info(ds)
                return ds.info

    # ------------------------------------------------------------ writes

    def commit(self, batches: Sequence[WriteBatch]) -> list[WriteResult | ReplicadError]:
        """Commit ``batches`` in order, in one transaction; one version each.

        Returns, per batch, its result or the error that rejected it (a batch
        rejected for its content writes nothing and does not stop the others).
        A storage failure (full map at the maximum size, I/O error) fails
        every batch of the group with MapFullError / StorageError and writes
        nothing.
        """
        with self._write_lock:
            if self._broken:
                return [
                    StorageError(f"the store must be restarted: {self._broken}") for _ in batches
                ]
            prepared: list[_Prepared | ReplicadError] = []
            marks: dict[str, int] = {}
            for batch in batches:
                try:
                    ds = self._dataset(batch.dataset)
                    marks.setdefault(ds.name, ds.codec.dictionary.size)
                    prepared.append(self._prepare(ds, batch))
                except ReplicadError as exc:
                    prepared.append(exc)
            try:
                outcome: list[WriteResult | ReplicadError] = self._with_growth(
                    lambda: self._write_group(prepared, marks)
                )
            except _CommittedError as exc:
                # durable, but unconfirmed: never hand the dictionary codes out again
                return [exc for _ in batches]
            except ReplicadError as exc:
                for name, mark in marks.items():
                    self._datasets[name].codec.dictionary.truncate(mark)
                return [exc for _ in batches]
            return outcome

    def _prepare(self, ds: _Dataset, batch: WriteBatch) -> _Prepared:
        deletes = [check_key(k) for k in batch.deletes]
        if batch.replace and deletes:
            raise BadRequestError("a replace batch lists the whole dataset; it has no deletes")
        encoded: dict[bytes, bytes] = {}
        pre = batch.pre_encoded
        if pre is not None:
            if pre.schema_version != len(ds.schemas) or pre.meta_revision > ds.meta_revision:
                raise StaleEncodingError(
                    f"dataset {ds.name!r}: encoded with schema version {pre.schema_version} "
                    f"(definition revision {pre.meta_revision}); the latest is "
                    f"{len(ds.schemas)} (revision {ds.meta_revision})"
                )
            # None marks the records left in batch.upserts; filled in below,
            # so the batch keeps its body order
            encoded = dict(pre.records)  # type: ignore[arg-type]
        mark = ds.codec.dictionary.size
        try:
            for key, record in batch.upserts.items():
                check_key(key)
                if record.__class__ is EncodeFailure:
                    raise record.error  # found by an ingest worker, raised in order
                if ds.schemas:
                    encoded[key] = ds.codec.encode(record)
                else:
                    if not isinstance(record, bytes | bytearray | memoryview):
                        raise BadRequestError(f"opaque dataset {ds.name!r}: values must be bytes")
                    encoded[key] = ds.codec.encode_opaque(bytes(record))
            if pre is not None and (len(encoded) != len(pre.records) or None in encoded.values()):
                raise BadRequestError("pre-encoded records and upserts do not match")
        except ReplicadError:
            ds.codec.dictionary.truncate(mark)
            raise
        both = set(deletes).intersection(encoded)
        if both:
            ds.codec.dictionary.truncate(mark)
            raise BadRequestError(f"key {min(both)!r} is both upserted and deleted")
        return _Prepared(ds, batch, encoded, deletes, mark)

    def _write_group(
        self, prepared: Sequence[_Prepared | ReplicadError], marks: Mapping[str, int]
    ) -> list[WriteResult | ReplicadError]:
        results: list[WriteResult | ReplicadError] = []
        # per dataset: the queue copy, digest and changes accumulated so far
        pending: dict[str, _Pending] = {}
        txn = self._env.begin(write=True)
        itxn = self._index.begin(write=True)
        try:
            for item in prepared:
                if isinstance(item, ReplicadError):
                    results.append(item)
                    continue
                ds = item.ds
                p = pending.get(ds.name)
                if p is None:
                    p = pending[ds.name] = _Pending(
                        ds.queue, ds.tree.digest, [], ds.meta_revision, marks[ds.name]
                    )
                results.append(self._write_batch(txn, itxn, item, p))
            for name, p in pending.items():
                ds = self._datasets[name]
                definition = None
                if ds.codec.dictionary.size > p.dictionary_mark:
                    p.revision += 1
                    definition = _definition(ds.spec, ds.schemas, ds.codec.dictionary)
                    txn.put(_name_key("ds", name), definition, db=self._meta_db)
                    p.definition = definition
                txn.put(
                    _name_key("st", name),
                    self._state_doc(ds, p.queue, p.digest, p.revision),
                    db=self._meta_db,
                )
            blobs = {
                name: _meta_blob(p.definition, p.revision)
                for name, p in pending.items()
                if p.definition is not None
            }
            for i, result in enumerate(results):
                if isinstance(result, WriteResult) and result.push is not None:
                    p = pending[result.dataset]
                    push = replace(
                        result.push, meta_revision=p.revision, meta=blobs.get(result.dataset)
                    )
                    results[i] = replace(result, push=push)
            with self._state_lock:
                txn.commit()
                try:
                    itxn.commit()
                    for name, p in pending.items():
                        ds = self._datasets[name]
                        ds.queue = p.queue
                        ds.tree.update_leaves(p.changes)
                        if name in blobs:
                            ds.meta_revision = p.revision
                            ds.meta_blob = blobs[name]
                        ds.info = self._info(ds)
                except BaseException as exc:
                    # committed, but memory is out of step with the disk: refuse
                    # every further write; a restart rebuilds memory from disk
                    self._broken = f"in-memory state lost after a commit: {exc!r}"
                    raise _CommittedError(self._broken) from exc
        except _CommittedError:
            raise
        except BaseException:
            txn.abort()
            itxn.abort()
            raise
        return results

    def _write_batch(self, txn: Any, itxn: Any, item: _Prepared, p: _Pending) -> WriteResult:
        ds = item.ds
        db, ldb = ds.records_db, ds.leaves_db
        iput, idelete = itxn.put, itxn.delete
        xor = 0
        count = 0
        touched: list[bytes] = []
        unchanged = 0
        upserted = deleted = 0
        changes = p.changes
        shift = ds.leaf_shift
        pack = _LEAF.pack
        replace_ = txn.replace
        append = changes.append
        for key, value in item.encoded.items():
            old = replace_(key, value, db=db)
            if old == value:
                unchanged += 1
                continue
            leaf = xxh3_64_intdigest(key) >> shift
            new_h = entry_hash(key, value)
            iput(pack(leaf) + key, new_h.to_bytes(16, "big"), db=ldb)
            old_h = None
            if old is None:
                count += 1
            else:
                old_h = entry_hash(key, old)
                xor ^= old_h
            xor ^= new_h
            append((leaf, old_h, new_h))
            touched.append(key)
            upserted += 1
        deletes: Collection[bytes] = item.deletes
        if item.batch.replace:
            encoded = item.encoded
            deletes = [
                key
                for k in txn.cursor(db=db).iternext(values=False)
                if (key := bytes(k)) not in encoded
            ]
        for key in deletes:
            old = txn.pop(key, db=db)
            if old is None:
                if not item.batch.replace:
                    touched.append(key)  # a tombstone for a key we never had is harmless
                continue
            leaf = xxh3_64_intdigest(key) >> shift
            idelete(pack(leaf) + key, db=ldb)
            old_h = entry_hash(key, old)
            xor ^= old_h
            count -= 1
            append((leaf, old_h, None))
            touched.append(key)
            deleted += 1
        queue = p.queue.copy() if p.queue is ds.queue else p.queue
        since = Cursor(queue.epoch, queue.version)
        delta = queue.push(queue.version + 1, touched)
        for version in delta.removed:
            txn.delete(_VERSION.pack(version), db=ds.queue_db)
        for entry in delta.added:
            txn.put(_VERSION.pack(entry.version), encode_entry(entry), db=ds.queue_db)
        p.queue = queue
        p.digest = Digest(p.digest.count + count, p.digest.xor ^ xor)
        cursor = Cursor(queue.epoch, queue.version)
        push = None
        if self.push_max_bytes:
            encoded = item.encoded
            size = 0
            ups: list[Record] = []
            dels: list[bytes] = []
            for key in touched:
                current = encoded.get(key)
                if current is None:
                    dels.append(key)
                    size += len(key)
                else:
                    ups.append((key, current))
                    size += len(key) + len(current)
                if size > self.push_max_bytes:
                    break
            else:
                push = DiffPush(ds.name, since, cursor, p.digest, tuple(ups), tuple(dels))
        return WriteResult(ds.name, cursor, p.digest, upserted, deleted, unchanged, push=push)

    def _with_growth(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a whole write transaction); on MDB_MAP_FULL grow the
        map and run it again, up to the maximum size."""
        while True:
            try:
                return fn()
            except lmdb.MapFullError as exc:
                size = self._env.info()["map_size"]
                if size >= self.max_map_size:
                    raise MapFullError(
                        f"the store is full at its maximum map size ({size >> 20} MiB); "
                        "nothing was written"
                    ) from exc
                self._grow(min(size * 2, self.max_map_size))
            except lmdb.Error as exc:
                raise StorageError(f"store write failed: {exc}") from exc

    def _grow(self, size: int) -> None:
        """Grow the map once no read transaction of this process is open,
        waiting at most ``GROW_WAIT`` seconds (a long snapshot stream may hold
        one); then fail the write, retriably, instead of stalling writers."""
        with self._state_lock:
            if not self._readers_idle.wait_for(lambda: not self._readers, timeout=GROW_WAIT):
                raise MapFullError(
                    "the store's map is full and could not grow: read transactions "
                    "(snapshot streams) stayed open; nothing was written, retry"
                )
            self._env.set_mapsize(size)

    # ------------------------------------------------------------ reads

    @contextmanager
    def view(self, name: str) -> Iterator[LmdbDatasetView]:
        """A consistent read-only view of one dataset at its current version
        (a :class:`~replicad.responder.DatasetView`). Keep it short: LMDB
        cannot reuse pages a live reader still sees."""
        with self._state_lock:
            ds = self._dataset(name)
            txn = self._env.begin(buffers=False)
            try:
                itxn = self._index.begin(buffers=False)
            except BaseException:
                txn.abort()
                raise
            view = LmdbDatasetView(
                ds.name,
                records=(txn, ds.records_db),
                leaves=(itxn, ds.leaves_db),
                cursor=ds.cursor,
                digest=ds.tree.digest,
                meta=ds.meta_blob,
                tree=ds.tree,
                queue=ds.queue,
            )
            self._readers += 1
        try:
            yield view
        finally:
            txn.abort()
            itxn.abort()
            with self._state_lock:
                self._readers -= 1
                if not self._readers:
                    self._readers_idle.notify_all()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state lock: no commit changes the in-memory trees while
        held. Merkle node answers are computed under it."""
        with self._state_lock:
            yield

    def get(self, name: str, key: bytes) -> tuple[bytes | None, Cursor]:
        with self.view(name) as view:
            return view.get(key), view.cursor

    def answer(self, request: Request, config: ResponderConfig | None = None) -> Response:
        """Answer one sync request from a consistent view (Merkle node
        answers under the state lock: the tree is shared)."""
        with self.view(request.dataset) as view:
            if isinstance(request, MerkleNodesRequest):
                with self._state_lock:
                    return respond(view, request, config)
            return respond(view, request, config)

    def stream(
        self, request: SnapshotRequest, config: ResponderConfig | None = None
    ) -> Generator[SnapshotChunk, None, None]:
        """Every snapshot chunk from ``request.after`` on, in one read
        transaction. Close the iterator (or exhaust it) promptly."""
        limit = min(request.limit, (config or ResponderConfig()).max_snapshot_chunk)
        with self.view(request.dataset) as view:
            after = request.after
            while True:
                chunk = snapshot_chunk(view, after, limit)
                yield chunk
                if chunk.next_after is None:
                    return
                after = chunk.next_after


class _CommittedError(StorageError):
    """A group committed to disk but its in-memory switch failed; the store
    refuses further writes until restarted."""


@dataclass
class _Prepared:
    ds: _Dataset
    batch: WriteBatch
    encoded: dict[bytes, bytes]
    deletes: list[bytes]
    mark: int


@dataclass
class _Pending:
    """A dataset's state as the group's transaction builds it."""

    queue: VersionQueue
    digest: Digest
    changes: list[tuple[int, int | None, int | None]]
    """(leaf, old entry hash, new entry hash) per change, in order."""
    revision: int
    dictionary_mark: int
    definition: bytes | None = None


def decode_definition(blob: MetaBlob) -> Mapping[str, Any]:
    """The dataset definition replicas receive in a MetaBlob (see FORMAT)."""
    doc: Mapping[str, Any] = msgpack.unpackb(blob.body, raw=False)
    return doc
