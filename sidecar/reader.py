"""Zero-copy reads of the sidecar's mirror, for app processes on the host.

Theory of operation
-------------------
A :class:`Reader` opens the mirror's LMDB environment read-only (any number
of processes may) and never writes. Each read runs in one short read
transaction: it reads the dataset's ``ds/<name>`` record (which generation is
live, the cursor, the definition) and the record itself in the same
transaction, so a value always belongs to the version reported with it.
:meth:`Reader.get_many` and :meth:`Reader.snapshot` read many keys (and
datasets) in one transaction: consistent at one version per dataset.

Values are decoded lazily into a :class:`Record`: the codec's value list,
fields by name or index. The codec is built from the dataset definition and
cached by its revision. Inside :meth:`Reader.snapshot` the raw stored bytes
are available as memoryviews straight from the memory map (valid until the
snapshot ends).

The writer may grow the map at any time; a transaction that begins after it
did gets MDB_MAP_RESIZED, on which the reader adopts the new size and retries.
Keep transactions short: LMDB cannot reuse pages a live reader still sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from replicad.codec import DatasetCodec, Dictionary
from replicad.errors import ReplicadError, StorageError, UnknownDatasetError, UnknownFieldError
from replicad.messages import Cursor
from replicad.schema import Schema


class StaleDataError(ReplicadError):
    """The dataset was last synced longer ago than the reader's
    ``max_staleness`` and the reader was told to refuse stale data."""


class Record(Sequence[Any]):
    """One record, decoded lazily: ``rec["age"]``, ``rec[0]``, ``rec.to_dict()``.

    For opaque datasets, ``rec.value`` is the bytes and there are no fields.
    """

    __slots__ = ("_codec", "_raw", "_values", "cursor", "stale")

    def __init__(self, codec: DatasetCodec, raw: bytes, cursor: Cursor, stale: bool) -> None:
        self._codec = codec
        self._raw = raw
        self._values: list[Any] | None = None
        self.cursor = cursor
        self.stale = stale

    @property
    def values(self) -> list[Any]:
        if self._values is None:
            self._values = self._codec.decode_values(self._raw)
        return self._values

    @property
    def value(self) -> bytes:
        """The value of an opaque record."""
        return self._codec.decode_opaque(self._raw)

    @property
    def raw(self) -> bytes:
        """The stored bytes (the origin's canonical encoding)."""
        return self._raw

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            try:
                return self.values[self._codec.field_index(item)]
            except UnknownFieldError:
                raise KeyError(item) from None
        return self.values[item]

    def __len__(self) -> int:
        return len(self.values)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(self._codec.field_names, self.values, strict=True))

    def __repr__(self) -> str:
        return f"Record({self.to_dict() if self._codec.is_typed else self.value!r})"


@dataclass
class _Dataset:
    raw_meta: bytes
    gen: int
    cursor: Cursor | None
    synced_at: float | None
    codec: DatasetCodec | None
    db: Any


def codec_from_definition(definition: bytes) -> DatasetCodec:
    """The codec described by an origin dataset definition (msgpack map of
    schemas, dictionary, max_value_bytes; see docs/FORMAT.md)."""
    doc = msgpack.unpackb(definition, raw=False)
    schemas = [Schema.from_json(s) for s in doc.get("schemas", [])]
    return DatasetCodec(
        schemas or None,
        dictionary=Dictionary.from_json(doc["dictionary"]),
        max_value_bytes=int(doc["max_value_bytes"]),
    )


class _HandlesMissingError(Exception):
    """A dataset's database handles are not open yet: LMDB only lets a
    transaction use handles opened before it began."""


class Snapshot:
    """Reads inside one read transaction (see :meth:`Reader.snapshot`)."""

    def __init__(self, reader: Reader, txn: Any) -> None:
        self._reader = reader
        self._txn = txn
        self._seen: dict[str, _Dataset] = {}

    def _dataset(self, name: str) -> _Dataset:
        ds = self._seen.get(name)
        if ds is None:
            try:
                ds = self._reader._resolve(self._txn, name)
            except _HandlesMissingError:
                # a dataset new to this reader: open its handles and, if this
                # snapshot has read nothing yet, begin again so it can see them
                self._reader._open_handles(name)
                if self._seen:
                    raise UnknownDatasetError(
                        f"dataset {name!r} appeared after this snapshot began; take a new one"
                    ) from None
                self._txn.abort()
                self._txn = self._reader._begin()
                ds = self._reader._resolve(self._txn, name)
            self._seen[name] = ds
        return ds

    def version(self, dataset: str) -> Cursor | None:
        return self._dataset(dataset).cursor

    def get(self, dataset: str, key: bytes) -> Record | None:
        ds = self._dataset(dataset)
        raw = self._txn.get(key, db=ds.db)
        if raw is None or ds.codec is None or ds.cursor is None:
            return None
        return Record(ds.codec, bytes(raw), ds.cursor, self._reader._is_stale(ds))

    def get_many(self, dataset: str, keys: Iterable[bytes]) -> list[Record | None]:
        ds = self._dataset(dataset)
        if ds.codec is None or ds.cursor is None:
            return [None for _ in keys]
        codec, cursor, stale = ds.codec, ds.cursor, self._reader._is_stale(ds)
        get, db = self._txn.get, ds.db
        out: list[Record | None] = []
        for key in keys:
            raw = get(key, db=db)
            out.append(None if raw is None else Record(codec, bytes(raw), cursor, stale))
        return out

    def raw(self, dataset: str, key: bytes) -> memoryview | None:
        """The stored bytes, zero-copy from the memory map: valid only until
        this snapshot ends."""
        ds = self._dataset(dataset)
        value = self._txn.get(key, db=ds.db)
        return None if value is None else memoryview(value)

    def keys(self, dataset: str, start: bytes = b"", limit: int = 1000) -> list[bytes]:
        """Up to ``limit`` keys >= ``start``, in key order."""
        ds = self._dataset(dataset)
        cur = self._txn.cursor(db=ds.db)
        out: list[bytes] = []
        if cur.set_range(start):
            for k in cur.iternext(keys=True, values=False):
                out.append(bytes(k))
                if len(out) >= limit:
                    break
        return out

    def count(self, dataset: str) -> int:
        return int(self._txn.stat(self._dataset(dataset).db)["entries"])


class Reader:
    """Read-only access to a sidecar mirror directory, safe from many
    threads and processes. In the process that runs the mirror itself, use
    :meth:`over` (one LMDB handle per environment per process).

    ``max_staleness`` (seconds): records of a dataset last synced longer ago
    are flagged (``record.stale``) or, with ``refuse_stale``, raise
    :class:`StaleDataError`. Raises :class:`StorageError` if the mirror
    cannot be opened.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_staleness: float | None = None,
        refuse_stale: bool = False,
        max_dbs: int = 2001,
        clock: Any = time.time,
        env: Any = None,
        map_size: int = 1 << 40,
    ) -> None:
        self.path = Path(path)
        self.max_staleness = max_staleness
        self.refuse_stale = refuse_stale
        self._clock = clock
        self._owns_env = env is None
        try:
            if env is None:
                # map as much as the writer ever may: then the writer growing
                # the map never forces a resize here (which, in py-lmdb,
                # invalidates every open transaction of the process); it is
                # address space only
                env = lmdb.open(
                    str(self.path),
                    readonly=True,
                    lock=True,
                    max_dbs=max_dbs,
                    create=False,
                    map_size=map_size,
                )
            self._env = env
            # handles opened inside a read transaction die with it in py-lmdb
            self._meta = self._env.open_db(b"meta", create=False)
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the mirror at {self.path}: {exc}") from exc
        self.resizes = 0
        """Map growths by the writer adopted so far."""
        self._cache: dict[str, _Dataset] = {}
        self._codecs: dict[str, tuple[bytes, DatasetCodec]] = {}
        self._dbs: dict[bytes, Any] = {}
        for name in self.datasets():
            self._open_handles(name)

    @classmethod
    def over(cls, mirror: Any, **options: Any) -> Reader:
        """A reader sharing the sidecar process's own mirror environment
        (LMDB allows one handle per environment per process)."""
        return cls(mirror.path, env=mirror.env, **options)

    def close(self) -> None:
        if self._owns_env:
            self._env.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _begin(self) -> Any:
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            # the writer grew the map: adopt its size; py-lmdb invalidates the
            # database handles opened before, so open them again
            self._env.set_mapsize(0)
            self.resizes += 1
            names = {k.decode().split("/")[1] for k in self._dbs}
            self._dbs.clear()
            self._cache.clear()
            self._meta = self._env.open_db(b"meta", create=False)
            for name in names:
                self._open_handles(name)
            return self._env.begin()

    def _open_handles(self, name: str) -> None:
        """Open both generation slots of ``name`` (outside any transaction)."""
        for slot in (0, 1):
            dbname = f"d/{name}/{slot}".encode()
            if dbname not in self._dbs:
                try:
                    self._dbs[dbname] = self._env.open_db(dbname, create=False)
                except lmdb.NotFoundError:
                    raise UnknownDatasetError(f"the mirror has no dataset {name!r}") from None

    def _resolve(self, txn: Any, name: str) -> _Dataset:
        raw = txn.get(b"ds/" + name.encode(), db=self._meta)
        if raw is None:
            raise UnknownDatasetError(f"the mirror has no dataset {name!r}")
        cached = self._cache.get(name)
        if cached is not None and cached.raw_meta == raw:
            return cached
        raw = bytes(raw)
        doc = msgpack.unpackb(raw, raw=False)
        gen = int(doc["gen"])
        cursor = None if doc["epoch"] is None else Cursor(bytes(doc["epoch"]), int(doc["version"]))
        definition = doc.get("definition")
        codec = None
        if definition is not None:
            known = self._codecs.get(name)
            if known is not None and known[0] == definition:
                codec = known[1]
            else:
                codec = codec_from_definition(definition)
                self._codecs[name] = (definition, codec)
        db = self._dbs.get(f"d/{name}/{gen % 2}".encode())
        if db is None:
            raise _HandlesMissingError(name)
        ds = _Dataset(raw, gen, cursor, doc.get("synced_at"), codec, db)
        self._cache[name] = ds
        return ds

    def _is_stale(self, ds: _Dataset) -> bool:
        if self.max_staleness is None:
            return False
        stale = ds.synced_at is None or self._clock() - ds.synced_at > self.max_staleness
        if stale and self.refuse_stale:
            ago = "never" if ds.synced_at is None else f"{self._clock() - ds.synced_at:.1f}s ago"
            raise StaleDataError(f"dataset last synced {ago} (max staleness {self.max_staleness}s)")
        return stale

    # ------------------------------------------------------------ API

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """Consistent reads across keys and datasets, in one transaction."""
        snap = Snapshot(self, self._begin())
        try:
            yield snap
        finally:
            snap._txn.abort()  # the snapshot may have begun again (a new dataset)

    def get(self, dataset: str, key: bytes) -> Record | None:
        """The record at ``key``, or None. UnknownDatasetError for a dataset
        the mirror does not hold."""
        with self.snapshot() as snap:
            return snap.get(dataset, key)

    def get_many(self, dataset: str, keys: Iterable[bytes]) -> list[Record | None]:
        """Records for ``keys`` (None where absent), all at one version."""
        with self.snapshot() as snap:
            return snap.get_many(dataset, keys)

    def version(self, dataset: str) -> Cursor | None:
        """The dataset's cursor (None before its first sync)."""
        with self.snapshot() as snap:
            return snap.version(dataset)

    def datasets(self) -> list[str]:
        with self.snapshot() as snap:
            cur = snap._txn.cursor(db=self._meta)
            return sorted(
                bytes(k)[3:].decode()
                for k in cur.iternext(values=False)
                if bytes(k).startswith(b"ds/")
            )

    def wait_for(self, dataset: str, version: int, timeout: float, *, poll: float = 0.005) -> bool:
        """Block until the mirror holds ``version`` (or later) of ``dataset``
        -- read-your-writes after a write acknowledged at that version.
        Returns False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            cursor = self.version(dataset)
            if cursor is not None and cursor.version >= version:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
