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

Fast path (a reader in an app process): ``get``, ``get_many`` and
``version`` reuse one read transaction per thread for as long as the mirror
has not committed anything newer, so most reads cost one B-tree lookup. The
check is exact and cheap: the reader maps the first two pages of
``data.mdb`` (LMDB's meta pages) read-only and compares the newer meta
page's transaction id with its transaction's id; when the writer committed
since, the transaction is renewed before the read. So a read never returns
data older than the last commit that finished before it began -- the same
freshness as a new transaction per read. A reaper thread releases a
thread's transaction once it has been idle for ``idle_release`` seconds
(between one and two periods), so an idle app does not pin old pages
(LMDB cannot reuse pages a live reader still sees). If the meta pages do
not look like LMDB 0.9's on-disk format, or for :meth:`Reader.over` (a
reader inside the sidecar, where the mirror must be able to pause readers
to grow its map), every read takes a new transaction instead.

``max_datasets`` bounds the datasets one reader opens (two LMDB databases
each, four with a JSON view): LMDB's cost of beginning a transaction grows
with that bound.

The writer may grow the map at any time. This reader maps 1 TiB of address
space up front, so it never has to follow; with a smaller ``map_size``, a
transaction that begins after a growth gets MDB_MAP_RESIZED, on which the
reader pauses its other threads' transactions, adopts the new size and
retries.
"""

from __future__ import annotations

import mmap
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from replicad.codec import DatasetCodec, Dictionary
from replicad.errors import ReplicadError, StorageError, UnknownDatasetError
from replicad.messages import Cursor
from replicad.schema import Schema


class StaleDataError(ReplicadError):
    """The dataset was last synced longer ago than the reader's
    ``max_staleness`` and the reader was told to refuse stale data."""


class Record(Sequence[Any]):
    """One record, decoded lazily: ``rec["age"]``, ``rec[0]``, ``rec.to_dict()``.

    ``rec[name]`` on a record not yet decoded reads that one field from the
    stored bytes (one ``struct`` call for a scalar); ``rec.values``,
    ``rec.to_dict()``, ``len(rec)``, iteration and ``rec[index]`` decode the
    whole record, once, and later reads use that. To read many fields of
    one record, ``rec.values`` or ``rec.to_dict()`` first is cheaper. For
    opaque datasets, ``rec.value`` is the bytes and there are no fields.
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
        """Every field's value, in the latest schema's field order."""
        values = self._values
        if values is None:
            values = self._values = self._codec.decode_values(self._raw)
        return values

    @property
    def value(self) -> bytes:
        """The value of an opaque record."""
        return self._codec.decode_opaque(self._raw)

    @property
    def raw(self) -> bytes:
        """The stored bytes (the origin's canonical encoding)."""
        return self._raw

    def __getitem__(self, item: Any) -> Any:
        values = self._values
        if values is None:
            if item.__class__ is str:
                # one field of an undecoded record: read just that field
                # (lists have no one-read path: decode and keep the values)
                get = self._codec.field_getters.get(item)
                if get is not None:
                    return get(self._raw)
            values = self._values = self._codec.decode_values(self._raw)
        if item.__class__ is str:
            index = self._codec.field_positions.get(item)
            if index is None:
                raise KeyError(item)
            return values[index]
        return values[item]

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


@dataclass(slots=True)
class _Dataset:
    raw_meta: bytes
    gen: int
    cursor: Cursor | None
    synced_at: float | None
    codec: DatasetCodec | None
    db: Any
    json: Any = None
    """The JSON view's database of the live slot (None: no view)."""


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
    transaction use handles opened before it began. ``view``: the dataset
    has a JSON view, whose handles are to be opened too."""

    def __init__(self, name: str, *, view: bool) -> None:
        super().__init__(name)
        self.view = view


class _ResizeNeededError(Exception):
    """The writer grew the map past this reader's: adopt it, then retry."""


# LMDB 0.9's on-disk meta pages (pages 0 and 1 of data.mdb): a 16-byte page
# header (flags at byte 10), then MDB_meta: magic (u32 at 16), format version
# (u32 at 20), ..., the page size (u32 at 40, in the free-list DB record),
# ..., the transaction id that wrote it (u64 at 144)
_P_META = 0x08
_META_MAGIC = 0xBEEFC0DE
_TXNID_OFFSET = 144


class _MetaPages:
    """The mirror's last committed transaction id, read from its two meta
    pages through a read-only memory map: a commit rewrites the meta page of
    its parity, so the larger of the two ids is the last commit. Raises
    ValueError if the file does not look like LMDB 0.9's format."""

    def __init__(self, data_file: Path) -> None:
        with data_file.open("rb") as f:
            head = f.read(64)
            if len(head) < 64:
                raise ValueError("data.mdb too short")
            psize = int.from_bytes(head[40:44], "little")
            if psize < 512 or psize & (psize - 1):
                raise ValueError(f"implausible page size {psize}")
            self._map = mmap.mmap(f.fileno(), 2 * psize, access=mmap.ACCESS_READ)
        self.words = memoryview(self._map).cast("Q")
        self.first = _TXNID_OFFSET // 8
        self.second = (psize + _TXNID_OFFSET) // 8
        for page in (0, psize):
            flags = int.from_bytes(self._map[page + 10 : page + 12], "little")
            magic = int.from_bytes(self._map[page + 16 : page + 20], "little")
            version = int.from_bytes(self._map[page + 20 : page + 24], "little")
            if not flags & _P_META or magic != _META_MAGIC or version != 1:
                self.close()
                raise ValueError("not an LMDB 0.9 meta page")

    def txnid(self) -> int:
        words = self.words
        a, b = words[self.first], words[self.second]
        return a if a > b else b

    def close(self) -> None:
        self.words.release()
        self._map.close()


class _ThreadTxn:
    """One thread's cached read transaction (see the module docstring). Its
    lock is held only for the length of one read, and by the reaper."""

    __slots__ = ("__weakref__", "began", "datasets", "gen", "lock", "txn", "txnid", "used")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.txn: Any = None
        self.txnid = -1
        self.gen = -1
        self.began = 0
        """The reader's handle serial when ``txn`` began (``Snapshot._began``)."""
        self.used = False
        self.datasets: dict[str, _Dataset] = {}

    def drop(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.datasets.clear()


def _reap(reader: weakref.ref[Reader], stop: threading.Event, period: float) -> None:
    """Release transactions idle for a whole period (the reaper thread)."""
    while not stop.wait(period):
        r = reader()
        if r is None:
            return
        r._release_idle()
        del r


def _lookup(get: Callable[[bytes], Any], key: bytes) -> Any:
    """``get(key)``, None for a key LMDB refuses (an empty one): no record
    can have it."""
    try:
        return get(key)
    except lmdb.BadValsizeError:
        return None


class Snapshot:
    """Reads inside one read transaction (see :meth:`Reader.snapshot`)."""

    def __init__(self, reader: Reader, *, buffers: bool = True) -> None:
        self._reader = reader
        self._buffers = buffers
        self._seen: dict[str, _Dataset] = {}
        self._begin()

    def _begin(self) -> None:
        reader = self._reader
        if reader._json_wanted:  # views begun after we opened their datasets
            reader._open_json_handles()
        # before the transaction: handles another thread opens meanwhile
        # make this snapshot not current rather than go unnoticed, and are
        # not used by it (their serial is above ``_began``)
        self._began = reader._serial
        self._opened = (len(reader._dbs), reader._handles_gen)
        # buffers: values as memoryviews into the map (raw() is zero-copy);
        # what leaves the snapshot (records) is copied
        self._cm = reader._txn_context(buffers=self._buffers)
        self._txn = self._cm.__enter__()
        self._txnid: int = self._txn.id()

    def _close(self) -> None:
        self._cm.__exit__(None, None, None)

    def is_current(self) -> bool:
        """Whether a snapshot begun now would read what this one reads:
        nothing committed since it began and no dataset handles opened since
        (a server that keeps one snapshot across requests renews it when
        this turns False). Always False for a reader that cannot see the
        mirror's last commit cheaply (see docs/FORMAT.md)."""
        reader = self._reader
        pages = reader._pages
        return (
            pages is not None
            and pages.txnid() <= self._txnid
            and self._opened == (len(reader._dbs), reader._handles_gen)
        )

    def _dataset(self, name: str) -> _Dataset:
        ds = self._seen.get(name)
        if ds is None:
            reader = self._reader
            try:
                ds = reader._resolve(self._txn, name)
                if reader._d_serial.get(name, 0) > self._began:
                    # another thread opened its handles after our transaction
                    # began: LMDB will not let this transaction use them (a
                    # view's handles missing meanwhile are opened as wanted)
                    raise _HandlesMissingError(name, view=False)
            except _HandlesMissingError as missing:
                # a dataset new to this reader: open its handles and, if this
                # snapshot has read nothing yet, begin again so it can see them
                reader._open_handles(name, view=missing.view)
                if self._seen:
                    raise UnknownDatasetError(
                        f"dataset {name!r} appeared after this snapshot began; take a new one"
                    ) from None
                self._close()
                self._begin()
                ds = reader._resolve(self._txn, name)
            if ds.json is not None and reader._j_serial.get(name, 0) > self._began:
                ds = replace(ds, json=None)  # its view's handles are newer than us
            self._seen[name] = ds
        return ds

    def version(self, dataset: str) -> Cursor | None:
        return self._dataset(dataset).cursor

    def get(self, dataset: str, key: bytes) -> Record | None:
        return self._reader._get(self._txn, self._dataset(dataset), key)

    def get_many(self, dataset: str, keys: Iterable[bytes]) -> list[Record | None]:
        return self._reader._get_many(self._txn, self._dataset(dataset), keys, copy=self._buffers)

    def fetcher(
        self, dataset: str
    ) -> tuple[Callable[[bytes], bytes | memoryview | None], DatasetCodec, Cursor] | None:
        """For many lookups in one dataset (a server answering a pipeline):
        ``get(key)``, the stored bytes -- a memoryview into the map, valid
        only until this snapshot ends (copy what you keep), or ``bytes`` in
        a snapshot without buffers -- or None when the key is absent (an
        empty key raises LMDB's BadValsizeError here: callers check, as the
        server does), with the codec that decodes them and the version they
        belong to; None while the dataset has no version. As with :meth:`get`, a key found
        in a dataset whose stale data is refused raises StaleDataError, an
        absent one is None (staleness is checked here, once; only a refusing
        reader pays for a check per key)."""
        ds = self._dataset(dataset)
        if ds.codec is None or ds.cursor is None:
            return None
        reader = self._reader
        try:
            reader._is_stale(ds)
        except StaleDataError:
            cursor_get = self._txn.cursor(db=ds.db).get

            def refusing(key: bytes) -> bytes | memoryview | None:
                raw: bytes | memoryview | None = cursor_get(key)
                if raw is not None:
                    reader._is_stale(ds)  # raises, unless a sync came meanwhile
                return raw

            return refusing, ds.codec, ds.cursor
        # a cursor's get: one positional argument, and LMDB looks on the
        # cursor's current page first (161 vs 279 ns a lookup of one key,
        # 304 vs 358 of random keys, against txn.get with db=)
        get: Callable[[bytes], bytes | memoryview | None] = self._txn.cursor(db=ds.db).get
        return get, ds.codec, ds.cursor

    def json_fetcher(self, dataset: str) -> Callable[[bytes], bytes | None] | None:
        """For a dataset with a JSON view (the sidecar's ``json_views``,
        docs/FORMAT.md): ``get(key)``, the record's JSON as the socket's HGET
        replies it (a RESP bulk string: ``$<length>`` CR LF, the JSON, CR
        LF), or None when the view has no row for the key -- no record, or
        one it has not rendered yet: read the record (:meth:`fetcher`). None
        when there is no view to read, and when this reader refuses the
        dataset's stale data (:meth:`fetcher` refuses it)."""
        ds = self._dataset(dataset)
        if ds.json is None or ds.cursor is None:
            return None
        try:
            self._reader._is_stale(ds)
        except StaleDataError:
            return None
        get: Callable[[bytes], bytes | memoryview | None] = self._txn.cursor(db=ds.json).get
        if not self._buffers:
            return get  # type: ignore[return-value]  # bytes in a snapshot without buffers

        def copied(key: bytes) -> bytes | None:
            out = get(key)
            return None if out is None else bytes(out)

        return copied

    def raw(self, dataset: str, key: bytes) -> memoryview | None:
        """The stored bytes, zero-copy from the memory map: valid only until
        this snapshot ends (a view of a copy in a snapshot without buffers)."""
        ds = self._dataset(dataset)
        value = _lookup(partial(self._txn.get, db=ds.db), key)  # one lookup: no cursor
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
    :class:`StaleDataError`. ``max_datasets``: how many datasets this reader
    may open. ``idle_release``: seconds after which an idle thread's cached
    transaction is released (0 disables caching: a new transaction per read).
    Create readers after ``fork()``, not before (LMDB's rule). Raises
    :class:`StorageError` if the mirror cannot be opened.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_staleness: float | None = None,
        refuse_stale: bool = False,
        max_datasets: int = 64,
        idle_release: float = 0.05,
        clock: Callable[[], float] = time.time,
        env: Any = None,
        mirror: Any = None,
        map_size: int = 1 << 40,
    ) -> None:
        self.path = Path(path)
        self.max_staleness = max_staleness
        self.refuse_stale = refuse_stale
        self.max_datasets = max_datasets
        self._clock = clock
        self._mirror = mirror
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
                    max_dbs=4 * max_datasets + 1,
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
        self._handles_lock = threading.RLock()
        self._handles_gen = 0
        self._json_wanted: set[str] = set()
        self._serial = 0
        """Counts handle openings; a snapshot uses only handles opened
        before it began (``_d_serial``/``_j_serial``: each dataset's last)."""
        self._d_serial: dict[str, int] = {}
        self._j_serial: dict[str, int] = {}
        self._snapshots = 0
        self._snapshots_done = threading.Condition()
        self._local = threading.local()
        self._threads: weakref.WeakSet[_ThreadTxn] = weakref.WeakSet()
        self._stop = threading.Event()
        self._pages: _MetaPages | None = None
        if self._owns_env and idle_release > 0:
            self._pages = self._open_pages()
        if self._pages is not None:
            self._words, self._first, self._second = (
                self._pages.words,
                self._pages.first,
                self._pages.second,
            )
            threading.Thread(
                target=_reap,
                args=(weakref.ref(self), self._stop, idle_release),
                name="sidecar-reader-reaper",
                daemon=True,
            ).start()
        for name, view in self._views().items():
            self._open_handles(name, view=view)

    @classmethod
    def over(cls, mirror: Any, **options: Any) -> Reader:
        """A reader sharing the sidecar process's own mirror environment
        (LMDB allows one handle per environment per process). Its reads are
        counted by the mirror, which may pause them to grow the map."""
        return cls(mirror.path, env=mirror.env, mirror=mirror, **options)

    def close(self) -> None:
        self._stop.set()
        for st in list(self._threads):
            with st.lock:
                st.drop()
        if self._pages is not None:
            pages, self._pages = self._pages, None
            del self._words
            pages.close()
        if self._owns_env:
            self._env.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _open_pages(self) -> _MetaPages | None:
        """The meta pages, if they agree with LMDB about the last commit
        (else None: every read begins a transaction)."""
        try:
            pages = _MetaPages(self.path / "data.mdb")
        except (OSError, ValueError):
            return None
        for _ in range(100):  # a commit may land between the two reads
            if pages.txnid() == self._env.info()["last_txnid"]:
                return pages
        pages.close()
        return None

    def _begin(self, buffers: bool = False) -> Any:
        try:
            return self._env.begin(buffers=True) if buffers else self._env.begin()
        except lmdb.MapResizedError:
            raise _ResizeNeededError from None

    def _adopt_resize(self) -> None:
        """The writer grew the map: pause every thread's transaction, adopt
        the size (py-lmdb invalidates handles and transactions), reopen the
        handles. Called holding no thread lock."""
        with self._handles_lock:
            try:
                self._env.begin().abort()
                return  # another thread adopted it already
            except lmdb.MapResizedError:
                pass
            held = []
            try:
                for st in list(self._threads):
                    st.lock.acquire()
                    held.append(st)
                    st.drop()
                with self._snapshots_done:
                    if not self._snapshots_done.wait_for(lambda: not self._snapshots, timeout=5):
                        raise StorageError(
                            "the mirror's map grew but snapshots of this reader stayed open"
                        )
                    self._env.set_mapsize(0)
                self.resizes += 1
                # the handles again: those of each dataset, and its view's
                # where they were open
                views: dict[str, bool] = {}
                for k in self._dbs:
                    kind, name, _ = k.decode().split("/")
                    views[name] = views.get(name, False) or kind == "j"
                self._dbs.clear()
                self._cache.clear()
                self._meta = self._env.open_db(b"meta", create=False)
                for name, view in views.items():
                    self._open_handles(name, view=view)
                self._handles_gen += 1
            finally:
                for st in held:
                    st.lock.release()

    @contextmanager
    def _txn_context(self, buffers: bool = False) -> Iterator[Any]:
        """A fresh read transaction: the mirror's (counted) for a reader
        inside the sidecar, else our own (counted for map resizes)."""
        if self._mirror is not None:
            with self._mirror.read(buffers=buffers) as txn:
                yield txn
            return
        for _ in range(3):
            try:
                txn = self._begin(buffers)
                break
            except _ResizeNeededError:
                self._adopt_resize()
        else:
            raise StorageError("the mirror's map kept growing; try again")
        with self._snapshots_done:
            self._snapshots += 1
        try:
            yield txn
        finally:
            txn.abort()
            with self._snapshots_done:
                self._snapshots -= 1
                self._snapshots_done.notify_all()

    def _open_handles(self, name: str, *, view: bool = True) -> None:
        """Open both generation slots of ``name`` (outside any transaction),
        and, with ``view``, its JSON view's if they exist; number what was
        opened, so that a snapshot begun before does not use it
        (``Snapshot._dataset``)."""
        with self._handles_lock:
            opened: set[str] = set()
            try:
                self._open_slots(name, opened, view)
            finally:
                if opened:
                    self._serial += 1
                    if "d" in opened:
                        self._d_serial[name] = self._serial
                    if "j" in opened:
                        self._j_serial[name] = self._serial

    def _open_slots(self, name: str, opened: set[str], view: bool) -> None:
        for slot in (0, 1):
            dbname = f"d/{name}/{slot}".encode()
            if dbname not in self._dbs:
                if sum(k[:2] == b"d/" for k in self._dbs) >= 2 * self.max_datasets:
                    raise StorageError(
                        f"this reader opens at most {self.max_datasets} datasets "
                        "(Reader(max_datasets=...))"
                    )
                try:
                    self._dbs[dbname] = self._env.open_db(dbname, create=False)
                except lmdb.NotFoundError:
                    raise UnknownDatasetError(f"the mirror has no dataset {name!r}") from None
                opened.add("d")
        for slot in (0, 1) if view else ():
            dbname = f"j/{name}/{slot}".encode()
            if dbname not in self._dbs:
                with suppress(lmdb.NotFoundError):  # no JSON view (yet)
                    self._dbs[dbname] = self._env.open_db(dbname, create=False)
                    opened.add("j")

    def _open_json_handles(self) -> None:
        """Open the JSON views' handles ``_resolve`` found missing (outside
        any transaction of the snapshot that will use them)."""
        with self._handles_lock:
            wanted, self._json_wanted = self._json_wanted, set()
            for name in wanted:
                with suppress(ReplicadError):  # gone, or too many: without a view
                    self._open_handles(name)
                self._cache.pop(name, None)  # resolved without its view

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
        viewed = doc.get("json") is not None and codec is not None and codec.is_typed
        db = self._dbs.get(f"d/{name}/{gen % 2}".encode())
        if db is None:
            raise _HandlesMissingError(name, view=viewed)
        json = None
        if viewed:
            json = self._dbs.get(f"j/{name}/{gen % 2}".encode())
            if json is None:
                # the view began after this reader opened the dataset: read
                # the records meanwhile; the next snapshot opens its handles
                with self._handles_lock:
                    self._json_wanted.add(name)
        ds = _Dataset(raw, gen, cursor, doc.get("synced_at"), codec, db, json)
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

    def _get(self, txn: Any, ds: _Dataset, key: bytes) -> Record | None:
        raw = _lookup(partial(txn.get, db=ds.db), key)  # one lookup: no cursor
        if raw is None or ds.codec is None or ds.cursor is None:
            return None
        return Record(ds.codec, bytes(raw), ds.cursor, self._is_stale(ds))

    def _get_many(
        self, txn: Any, ds: _Dataset, keys: Iterable[bytes], *, copy: bool = False
    ) -> list[Record | None]:
        """``copy``: the transaction yields memoryviews (a snapshot's), which
        records must not keep."""
        codec, cursor = ds.codec, ds.cursor
        if codec is None or cursor is None:
            return [None for _ in keys]
        stale = self._is_stale(ds)
        get: Callable[[bytes], Any] = txn.cursor(db=ds.db).get  # see fetcher
        if not isinstance(keys, list | tuple):
            keys = list(keys)  # read again if a key is empty (below)
        try:
            return self._records(get, codec, cursor, stale, keys, copy=copy)
        except lmdb.BadValsizeError:  # an empty key: no record can have it
            return self._records(partial(_lookup, get), codec, cursor, stale, keys, copy=copy)

    @staticmethod
    def _records(
        get: Callable[[bytes], Any],
        codec: DatasetCodec,
        cursor: Cursor,
        stale: bool,
        keys: Iterable[bytes],
        *,
        copy: bool,
    ) -> list[Record | None]:
        if copy:
            return [
                None if (raw := get(key)) is None else Record(codec, bytes(raw), cursor, stale)
                for key in keys
            ]
        return [
            None if (raw := get(key)) is None else Record(codec, raw, cursor, stale) for key in keys
        ]

    # the fast path: one cached transaction per thread -------------------

    def _thread_txn(self) -> _ThreadTxn:
        st: _ThreadTxn | None = getattr(self._local, "st", None)
        if st is None:
            st = _ThreadTxn()
            self._local.st = st
            with self._handles_lock:
                self._threads.add(st)
        return st

    def _current(self, st: _ThreadTxn, name: str) -> tuple[Any, _Dataset]:
        """This thread's transaction, renewed if the mirror committed since,
        and ``name`` resolved in it. Call holding ``st.lock``."""
        assert self._pages is not None
        if st.txn is None or st.txnid != self._pages.txnid() or st.gen != self._handles_gen:
            st.drop()
            st.gen, st.began = self._handles_gen, self._serial
            st.txn = self._begin()
            st.txnid = st.txn.id()
        st.used = True
        ds = st.datasets.get(name)
        if ds is None:
            try:
                ds = self._resolve(st.txn, name)
                if self._d_serial.get(name, 0) > st.began:
                    # another thread opened its handles after this
                    # transaction began: LMDB will not let it use them
                    raise _HandlesMissingError(name, view=False)
            except _HandlesMissingError as missing:
                st.drop()
                self._open_handles(name, view=missing.view)
                st.began = self._serial
                st.txn = self._begin()
                st.txnid = st.txn.id()
                ds = self._resolve(st.txn, name)
            st.datasets[name] = ds
        return st.txn, ds

    def _fast(self, name: str, read: Callable[[Any, _Dataset], Any]) -> Any:
        st = self._thread_txn()
        for _ in range(3):
            try:
                with st.lock:
                    txn, ds = self._current(st, name)
                    return read(txn, ds)
            except _ResizeNeededError:
                self._adopt_resize()
        raise StorageError("the mirror's map kept growing; try again")

    def _release_idle(self) -> None:
        for st in list(self._threads):
            if st.lock.acquire(blocking=False):
                try:
                    if st.used:
                        st.used = False
                    else:
                        st.drop()
                finally:
                    st.lock.release()

    # ------------------------------------------------------------ API

    @contextmanager
    def snapshot(self, *, buffers: bool = True) -> Iterator[Snapshot]:
        """Consistent reads across keys and datasets, in one transaction.
        ``buffers=False`` reads values as copies (``bytes``) instead of
        views of the memory map: ``raw()`` is then a view of a copy, and
        ``fetcher``'s lookups return ``bytes`` -- cheaper for a server that
        formats many small values whole (the socket workers do this)."""
        snap = Snapshot(self, buffers=buffers)
        try:
            yield snap
        finally:
            snap._close()  # the snapshot may have begun again (a new dataset)

    def get(self, dataset: str, key: bytes) -> Record | None:
        """The record at ``key``, or None. UnknownDatasetError for a dataset
        the mirror does not hold."""
        # the hot path, kept flat: this thread's transaction if nothing was
        # committed since it began, the dataset as resolved in it
        try:
            st: _ThreadTxn = self._local.st
        except AttributeError:
            if self._pages is None:
                with self.snapshot(buffers=False) as snap:  # records copy anyway
                    return snap.get(dataset, key)
            st = self._thread_txn()
        try:
            with st.lock:
                words, txnid = self._words, st.txnid
                ds = st.datasets.get(dataset)
                if (
                    ds is None
                    or words[self._first] > txnid
                    or words[self._second] > txnid
                    or st.gen != self._handles_gen
                ):
                    _, ds = self._current(st, dataset)
                st.used = True
                raw = st.txn.get(key, None, ds.db)
                if raw is None or ds.codec is None or ds.cursor is None:
                    return None
                stale = False if self.max_staleness is None else self._is_stale(ds)
                return Record(ds.codec, raw, ds.cursor, stale)
        except _ResizeNeededError:
            self._adopt_resize()
            return self.get(dataset, key)
        except lmdb.BadValsizeError:  # an empty key: no record can have it
            return None

    def get_many(self, dataset: str, keys: Iterable[bytes]) -> list[Record | None]:
        """Records for ``keys`` (None where absent), all at one version."""
        if self._pages is None:
            with self.snapshot(buffers=False) as snap:  # records copy anyway
                return snap.get_many(dataset, keys)
        result: list[Record | None] = self._fast(
            dataset, lambda txn, ds: self._get_many(txn, ds, keys)
        )
        return result

    def version(self, dataset: str) -> Cursor | None:
        """The dataset's cursor (None before its first sync)."""
        if self._pages is None:
            with self.snapshot(buffers=False) as snap:  # records copy anyway
                return snap.version(dataset)
        cursor: Cursor | None = self._fast(dataset, lambda txn, ds: ds.cursor)
        return cursor

    def _views(self) -> dict[str, bool]:
        """Each dataset, and whether its record says it has a JSON view."""
        with self._txn_context() as txn:
            return {
                bytes(k)[3:].decode(): msgpack.unpackb(v, raw=False).get("json") is not None
                for k, v in txn.cursor(db=self._meta)
                if bytes(k).startswith(b"ds/")
            }

    def datasets(self) -> list[str]:
        with self._txn_context() as txn:
            cur = txn.cursor(db=self._meta)
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
