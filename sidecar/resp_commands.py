"""The sidecar's Redis commands, sans-IO: a parsed command and a read
snapshot in, a reply out.

Theory of operation
-------------------
The Redis keyspace seen through the socket has one key per dataset, and every
key is a hash: its fields are the record keys, its values the records.
``HGET user_profile user:42`` is one record, as a JSON object for a typed
dataset (bytes as ``{"base64": ...}``, non-finite floats as ``"NaN"``,
``"Infinity"``, ``"-Infinity"``, like the origin's HTTP API) and as the raw
value for an opaque one. A dataset *exists* once the mirror holds a version of
it (its first sync is done); before that, and for a name the mirror does not
hold, it reads as a missing key does in Redis: nil, 0, an empty scan.
``docs/reads.md`` lists every command with its replies and errors.

:class:`Dispatcher` maps one command (a list of byte strings from
:class:`sidecar.resp.CommandParser`) to a :data:`sidecar.resp.Reply`, reading
through a *view* (:class:`ReadView`, which :class:`sidecar.reader.Snapshot`
is). :meth:`Dispatcher.execute_many` runs a batch of commands (a pipeline, or
the commands of every connection that was ready at once) and returns the
encoded replies; the socket adapter gives it a lazily opened snapshot, so the
batch reads in one LMDB read transaction: every reply belongs to one whole
origin version per dataset, and ``HMGET`` and ``HSCAN`` pages are consistent.

Nothing here does I/O: the clock, the dataset list, the sync status and the
connection counters are callables the adapter passes in. Per connection
state (protocol version, client name, QUIT) lives in a :class:`Session`.

``execute_many`` answers a run of HGETs through one *replier* per dataset
and view: the view's LMDB lookup function, the codec and the render cache
resolved once, then a key in, the encoded bulk reply out.

Rendering JSON costs far more than the LMDB read, so rendered replies are
kept in a bounded cache per dataset keyed by the stored bytes. The same bytes
render the same JSON while the dataset's definition (its codec: schemas,
dictionary) and epoch stay the same (a schema evolution appends fields,
which older records show with their defaults; an epoch change may bring
anything): each view's first replier compares both, and a change empties
that dataset's cache. orjson renders (about 15 times faster than the
standard library's encoder, which stays the fallback).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from replicad.codec import HEADER_OPAQUE, HEADER_OPAQUE_SNAPPY, DatasetCodec
from replicad.errors import ReplicadError, UnknownDatasetError
from replicad.messages import Cursor
from replicad.origin_types import DATASET_NAME
from sidecar.json_render import JsonRenderer, bulk, to_json
from sidecar.reader import Record
from sidecar.resp import Error, Map, Reply, encode

MAX_KEY_BYTES = 507
"""Longer keys cannot be in a mirror (LMDB's 511 less the Merkle prefix)."""
SCAN_DEFAULT_COUNT = 10
SCAN_MAX_COUNT = 100_000
"""HSCAN's COUNT is a hint, as in Redis; one call examines at most this many
keys (one short read transaction)."""
REDIS_VERSION = "7.0.0"
"""The Redis version reported to clients (HELLO, INFO): the command set and
reply shapes follow Redis 7."""
_OPAQUE_HEADERS = (HEADER_OPAQUE, HEADER_OPAQUE_SNAPPY)
"""Value header bytes of opaque records (docs/FORMAT.md)."""


class ReadView(Protocol):
    """Reads at one version (what :class:`sidecar.reader.Snapshot` offers)."""

    def version(self, dataset: str) -> Cursor | None: ...

    def get(self, dataset: str, key: bytes) -> Record | None: ...

    def get_many(self, dataset: str, keys: Iterable[bytes]) -> list[Record | None]: ...

    def fetcher(
        self, dataset: str
    ) -> tuple[Callable[[bytes], bytes | memoryview | None], DatasetCodec, Cursor] | None: ...

    def keys(self, dataset: str, start: bytes = b"", limit: int = 1000) -> list[bytes]: ...

    def raw(self, dataset: str, key: bytes) -> memoryview | None: ...

    def json_fetcher(self, dataset: str) -> Callable[[bytes], bytes | None] | None: ...

    def count(self, dataset: str) -> int: ...


@dataclass
class Session:
    """One connection's state."""

    id: int
    protocol: int = 2
    name: bytes | None = None
    lib_name: bytes | None = None
    lib_ver: bytes | None = None
    closing: bool = False
    """Set by QUIT: the adapter closes the connection after the reply."""


@dataclass(frozen=True)
class DatasetSyncStatus:
    """What the sync loop knows of one dataset (pushed by the sidecar process)."""

    ready: bool = False
    epoch: str | None = None
    """The sync loop's cursor epoch (hex)."""
    version: int | None = None
    origin_version: int | None = None
    lag: int | None = None
    """Origin version minus the mirror's; None when unknown or across an
    epoch change."""
    last_sync: float | None = None
    """Unix time of the last successful sync."""
    phase: str = ""


@dataclass(frozen=True)
class SyncStatus:
    """The sync loop's state: readiness and per-dataset status."""

    ready: bool = False
    datasets: Mapping[str, DatasetSyncStatus] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "datasets": {
                name: {
                    "ready": d.ready,
                    "epoch": d.epoch,
                    "version": d.version,
                    "origin_version": d.origin_version,
                    "lag": d.lag,
                    "last_sync": d.last_sync,
                    "phase": d.phase,
                }
                for name, d in self.datasets.items()
            },
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SyncStatus:
        """Raises KeyError, TypeError or ValueError for a malformed document."""
        datasets = {
            str(name): DatasetSyncStatus(
                ready=bool(d["ready"]),
                epoch=None if d["epoch"] is None else str(d["epoch"]),
                version=None if d["version"] is None else int(d["version"]),
                origin_version=None if d["origin_version"] is None else int(d["origin_version"]),
                lag=None if d["lag"] is None else int(d["lag"]),
                last_sync=None if d["last_sync"] is None else float(d["last_sync"]),
                phase=str(d["phase"]),
            )
            for name, d in doc["datasets"].items()
        }
        return cls(bool(doc["ready"]), datasets)


def is_opaque(record: Record) -> bool:
    """An opaque dataset's record (its header byte, docs/FORMAT.md)."""
    raw = record.raw
    return bool(raw) and raw[0] in _OPAQUE_HEADERS


class _RenderCache:
    """HGET's replies (``$N`` CR LF, the JSON, CR LF) for one dataset's typed
    records, keyed by their stored bytes. The entries hold while the codec
    the records decode with (the reader keeps one per dataset definition:
    schemas, dictionary) and the epoch stay those they were rendered under;
    ``validate`` compares both, once per view."""

    __slots__ = ("codec", "entries", "epoch", "limit", "render")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.epoch: bytes | None = None
        self.codec: object = None
        # keyed by bytes; a memoryview of the same bytes finds its entry
        self.entries: dict[bytes | memoryview, bytes] = {}
        self.render: Callable[[bytes | memoryview], bytes] | None = None

    def store(self, raw: bytes, out: bytes) -> None:
        if self.limit:
            if len(self.entries) >= self.limit:
                # evict the oldest eighth (dicts keep insertion order)
                for old in list(itertools.islice(self.entries, max(1, self.limit // 8))):
                    del self.entries[old]
            self.entries[raw] = out

    def validate(self, codec: DatasetCodec, epoch: bytes) -> Callable[[bytes | memoryview], bytes]:
        """The renderer of ``codec``'s records; the entries are dropped if
        the codec or the epoch changed."""
        if codec is not self.codec or epoch != self.epoch or self.render is None:
            self.entries.clear()
            self.codec, self.epoch = codec, epoch
            self.render = JsonRenderer(codec)
        return self.render


def _absent(key: bytes) -> None:
    return None


# ------------------------------------------------------------------ globs


def glob_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Redis' glob (``*``, ``?``, ``[abc]``, ``[^a-z]``, ``\\x``) as a regex."""
    out = bytearray()
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c == b"*":
            out += b".*"
        elif c == b"?":
            out += b"."
        elif c == b"\\" and i + 1 < n:
            i += 1
            out += re.escape(pattern[i : i + 1])
        elif c == b"[":
            end = i + 1
            if end < n and pattern[end : end + 1] == b"^":
                end += 1
            if end < n and pattern[end : end + 1] == b"]":
                end += 1
            while end < n and pattern[end : end + 1] != b"]":
                end += 2 if pattern[end : end + 1] == b"\\" else 1
            if end >= n:  # no closing bracket: a literal "["
                out += b"\\["
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith(b"^")
                if negate:
                    body = body[1:]
                items = bytearray()
                j = 0
                while j < len(body):
                    ch = body[j : j + 1]
                    if ch == b"\\" and j + 1 < len(body):
                        j += 1
                        ch = body[j : j + 1]
                    if body[j + 1 : j + 2] == b"-" and j + 2 < len(body):
                        hi = body[j + 2 : j + 3]
                        lo, hi = min(ch, hi), max(ch, hi)
                        items += re.escape(lo) + b"-" + re.escape(hi)
                        j += 3
                        continue
                    items += re.escape(ch)
                    j += 1
                if not items:
                    out += b"(?!)" if not negate else b"."
                else:
                    out += b"[" + (b"^" if negate else b"") + bytes(items) + b"]"
                i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(bytes(out), re.DOTALL)


def literal_prefix(pattern: bytes) -> bytes:
    """The bytes every key matching ``pattern`` starts with."""
    end = len(pattern)
    for special in (b"*", b"?", b"[", b"\\"):
        at = pattern.find(special)
        if 0 <= at < end:
            end = at
    return pattern[:end]


# ------------------------------------------------------------------ cursors


def encode_cursor(start: bytes) -> bytes:
    """The HSCAN cursor that resumes at the first key >= ``start``: a
    decimal integer (larger than 64 bits for keys longer than 7 bytes)."""
    return str(int.from_bytes(b"\x01" + start, "big")).encode()


def decode_cursor(cursor: bytes) -> bytes | None:
    """The key an HSCAN cursor resumes at (b"" for "0"); None if invalid."""
    if not cursor.isdigit() or len(cursor) > 1300:
        return None
    n = int(cursor)
    if n == 0:
        return b""
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if raw[:1] != b"\x01" or len(raw) > MAX_KEY_BYTES + 2:
        return None
    return raw[1:]


# ------------------------------------------------------------------ dispatch


Handler = Callable[[list[bytes], Callable[[], ReadView], Session], Reply]

_WRITE_COMMANDS = frozenset(
    b"""SET SETNX SETEX PSETEX MSET MSETNX APPEND INCR INCRBY INCRBYFLOAT DECR DECRBY
    GETSET GETDEL GETEX DEL UNLINK EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST RENAME
    RENAMENX MOVE COPY RESTORE HSET HSETNX HMSET HDEL HINCRBY HINCRBYFLOAT HEXPIRE
    HPEXPIRE HPERSIST LPUSH RPUSH LPOP RPOP LSET LREM LTRIM SADD SREM SPOP SMOVE ZADD
    ZREM ZINCRBY XADD XDEL PUBLISH FLUSHDB FLUSHALL SWAPDB EVAL EVALSHA FCALL
    """.split()
)
_STRING_COMMANDS = frozenset(b"GET GETRANGE STRLEN SUBSTR MGET".split())

_NAME_OK = re.compile(rb"[!-~]*")
"""Client names: printable ASCII without spaces (as Redis)."""


@dataclass(frozen=True)
class ServerFacts:
    """What INFO and CONFIG GET report about the server (from the adapter)."""

    sidecar_version: str = "0"
    pid: int = 0
    sidecar_pid: int = 0
    started: float = 0.0
    """Unix time the socket server started."""
    socket: str = ""
    socket_mode: int = 0o660
    workers: int = 1
    max_clients: int = 0
    idle_timeout: float = 0.0
    max_request_bytes: int = 0
    mirror: str = ""


class Dispatcher:
    """Runs commands against read views; see the module docstring.

    ``datasets`` lists the datasets the mirror holds (synced or not),
    ``sync_status`` the sync loop's last pushed state (None before the first),
    ``stats`` the server-wide counters (``connected_clients``,
    ``total_connections_received``, ``total_commands_processed``,
    ``rejected_connections``), ``clock`` the unix time. ``cache_entries``
    bounds the rendered-JSON cache per dataset (0: no cache).

    Handlers never raise: any error becomes an error reply (an unexpected one
    as ``ERR internal error``, reported through ``on_internal_error``).
    """

    def __init__(
        self,
        *,
        facts: ServerFacts,
        datasets: Callable[[], list[str]],
        sync_status: Callable[[], SyncStatus | None],
        stats: Callable[[], Mapping[str, int | str]],
        clock: Callable[[], float],
        cache_entries: int = 16_384,
        on_internal_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.facts = facts
        self._datasets = datasets
        self._sync_status = sync_status
        self._stats = stats
        self._clock = clock
        self._cache_entries = cache_entries
        self._caches: dict[str, _RenderCache] = {}
        self._replier_view: object = None
        self._repliers: dict[str, Callable[[bytes], bytes | None]] = {}
        self._names: dict[bytes, str] = {}
        self._globs: dict[bytes, re.Pattern[bytes]] = {}
        self._on_internal_error = on_internal_error
        self.commands_processed = 0
        self._table: dict[bytes, tuple[Handler, int]] = {
            b"PING": (self._ping, -1),
            b"ECHO": (self._echo, 2),
            b"QUIT": (self._quit, -1),
            b"HELLO": (self._hello, -1),
            b"AUTH": (self._auth, -2),
            b"SELECT": (self._select, 2),
            b"CLIENT": (self._client, -2),
            b"COMMAND": (self._command, -1),
            b"CONFIG": (self._config, -2),
            b"INFO": (self._info, -1),
            b"DBSIZE": (self._dbsize, 1),
            b"EXISTS": (self._exists_cmd, -2),
            b"TYPE": (self._type, 2),
            b"KEYS": (self._keys, 2),
            b"SCAN": (self._scan, -2),
            b"HGET": (self._hget, 3),
            b"HMGET": (self._hmget, -3),
            b"HEXISTS": (self._hexists, 3),
            b"HLEN": (self._hlen, 2),
            b"HSCAN": (self._hscan, -3),
            b"HGETFIELDS": (self._hgetfields, -4),
        }
        for name in _STRING_COMMANDS:
            self._table[name] = (self._string_command, -2)
        self._docs: dict[bytes, str] = {
            b"PING": "Ping the server (PONG, or the message).",
            b"ECHO": "Echo the message.",
            b"QUIT": "Close the connection.",
            b"HELLO": "Handshake: RESP2 or RESP3, client name.",
            b"AUTH": "No passwords: the socket file's mode and group control access.",
            b"SELECT": "Only database 0 exists.",
            b"CLIENT": "SETNAME, GETNAME, SETINFO, ID, INFO, LIST (this connection).",
            b"COMMAND": "The commands this server knows (COUNT, DOCS, INFO, LIST).",
            b"CONFIG": "CONFIG GET of the socket's limits; nothing can be set.",
            b"INFO": "Server, clients, stats, replication and keyspace sections.",
            b"DBSIZE": "The number of datasets with a version.",
            b"EXISTS": "How many of the given datasets have a version.",
            b"TYPE": "hash for a dataset with a version, none otherwise.",
            b"KEYS": "Datasets whose names match a glob pattern.",
            b"SCAN": "Datasets, in one page (cursor 0 only).",
            b"HGET": "One record: a JSON object (typed) or the raw value (opaque).",
            b"HMGET": "Several records of one dataset, at one version.",
            b"HEXISTS": "1 if the dataset holds the key.",
            b"HLEN": "The number of records of a dataset.",
            b"HSCAN": "Records in key order, by cursor; MATCH, COUNT, NOVALUES.",
            b"HGETFIELDS": "Chosen fields of one record, each as JSON; nil for no record.",
        }

    # ------------------------------------------------------------ running

    def execute_many(
        self, commands: Sequence[list[bytes]], view: Callable[[], ReadView], session: Session
    ) -> bytes:
        """The encoded replies to ``commands``, in order. Stops after QUIT
        (``session.closing``): later commands get no reply."""
        out: list[bytes] = []
        append = out.append
        names = self._names
        last: str | None = None  # the dataset `replier` answers for
        replier: Callable[[bytes], bytes | None] = _absent
        nil = b"_\r\n" if session.protocol == 3 else b"$-1\r\n"
        fast = 0
        for args in commands:
            # the hot path, HGET of a known dataset, kept flat: one replier
            # per dataset and view answers every key (its lookup and cache)
            if len(args) == 3 and (args[0] == b"HGET" or args[0] == b"hget"):
                dataset = names.get(args[1])
                key = args[2]
                if dataset is not None and 0 < len(key) <= MAX_KEY_BYTES:
                    try:
                        if dataset is not last:
                            replier = self._replier(view(), dataset)
                            last = dataset
                        bulk = replier(key)
                    except Exception:  # the general path reports it
                        pass
                    else:
                        fast += 1
                        append(nil if bulk is None else bulk)
                        continue
            self.commands_processed += fast  # an INFO here counts the HGETs before it
            fast = 0
            reply = self.execute(args, view, session)
            if type(reply) is bytes:
                append(b"$%d\r\n%b\r\n" % (len(reply), reply))
            else:
                append(encode(reply, session.protocol))
            if session.closing:
                break
            nil = b"_\r\n" if session.protocol == 3 else b"$-1\r\n"  # HELLO may change it
        self.commands_processed += fast
        return b"".join(out)

    def execute(self, args: list[bytes], view: Callable[[], ReadView], session: Session) -> Reply:
        """The reply to one command (never raises)."""
        self.commands_processed += 1
        name = args[0]
        entry = self._table.get(name) or self._table.get(name.upper())
        if entry is None:
            return self._unknown(args)
        handler, arity = entry
        n = len(args)
        if (n != arity) if arity > 0 else (n < -arity):
            return _arity(name)
        try:
            return handler(args, view, session)
        except UnknownDatasetError:
            return None  # appeared after this snapshot began: not visible yet
        except Exception as exc:
            if self._on_internal_error is not None:
                self._on_internal_error(exc)
            detail = str(exc) if isinstance(exc, ReplicadError) else type(exc).__name__
            return Error(f"ERR internal error: {detail}")

    def _unknown(self, args: list[bytes]) -> Reply:
        name = args[0]
        if name.upper() in _WRITE_COMMANDS:
            return Error("READONLY You can't write against a read only replica.")
        shown = " ".join(f"'{_text(a, 64)}'" for a in args[1:4])
        return Error(
            f"ERR unknown command '{_text(name, 64)}', with args beginning with: {shown}".rstrip()
        )

    # ------------------------------------------------------------ helpers

    def _dataset(self, arg: bytes) -> str | None:
        name = self._names.get(arg)
        if name is None:
            if DATASET_NAME.fullmatch(arg.decode("latin-1")) is None:
                return None
            name = arg.decode("ascii")
            if len(self._names) > 10_000:
                self._names.clear()
            self._names[arg] = name
        return name

    def _replier(self, v: ReadView, dataset: str) -> Callable[[bytes], bytes | None]:
        """``dataset``'s replier in view ``v`` (made once per view): key ->
        HGET's encoded bulk reply (the record's JSON, or an opaque value),
        or None when the key is absent. UnknownDatasetError for a dataset
        the mirror does not hold; StaleDataError when stale data is refused."""
        repliers = self._repliers
        if v is not self._replier_view:  # a new view starts with none
            repliers.clear()
            self._replier_view = v
        replier = repliers.get(dataset)
        if replier is not None:
            return replier
        found = v.fetcher(dataset)  # no Record object on this path
        if found is None:
            repliers[dataset] = _absent
            return _absent
        get, codec, cursor = found
        cache = self._caches.get(dataset)
        if cache is None:
            cache = self._caches[dataset] = _RenderCache(self._cache_entries)
        render = cache.validate(codec, cursor.epoch)
        entries, store, inflate = cache.entries, cache.store, codec.inflate
        # the last key answered from the render cache, and its reply: in one
        # view a key's record cannot change, so a key asked for again and
        # again costs one comparison (no LMDB read, no hash of the stored
        # bytes); other keys, one failed comparison
        last_key: bytes | None = None
        last_out = b""

        def reply(key: bytes) -> bytes | None:
            nonlocal last_key, last_out
            if key == last_key:
                return last_out
            raw = get(key)
            if raw is None:
                return None
            header = raw[0]  # raw: bytes (the workers' snapshots) or a view of the map
            if header == HEADER_OPAQUE:  # stored as is (docs/FORMAT.md)
                # (%b takes any buffer; typeshed says bytes only)
                return b"$%d\r\n%b\r\n" % (len(raw) - 1, raw[1:])  # type: ignore[str-format]
            if header == HEADER_OPAQUE_SNAPPY:  # formatted from cramjam's buffer
                value = inflate(raw)
                return b"$%d\r\n%b\r\n" % (len(value), value)
            out = entries.get(raw)
            if out is None:
                out = bulk(render(raw))
                store(bytes(raw), out)  # a view dies with its snapshot (bytes: as is)
            else:
                last_key, last_out = key, out
            return out

        if codec.is_typed and (stored := v.json_fetcher(dataset)) is not None:
            # the mirror's JSON view holds the replies: render only the
            # records it has no row for (not built yet, not decodable)
            def reply_stored(key: bytes) -> bytes | None:
                out = stored(key)
                return reply(key) if out is None else out

            repliers[dataset] = reply_stored
            return reply_stored
        repliers[dataset] = reply
        return reply

    def _value(self, v: ReadView, dataset: str, key: bytes) -> bytes | None:
        """HGET's value for one key: the record's JSON, an opaque value, or
        None. UnknownDatasetError for a dataset the mirror does not hold."""
        reply = self._replier(v, dataset)(key)
        if reply is None:
            return None
        return reply[reply.index(b"\r\n") + 2 : -2]

    def _glob(self, pattern: bytes) -> re.Pattern[bytes]:
        rx = self._globs.get(pattern)
        if rx is None:
            if len(self._globs) > 256:
                self._globs.clear()
            rx = self._globs[pattern] = glob_regex(pattern)
        return rx

    def _existing(self, view: ReadView) -> list[str]:
        return [name for name in self._datasets() if self._has(view, name)]

    # ------------------------------------------------------------ connection

    def _ping(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        if len(args) > 2:
            return _arity(args[0])
        return "PONG" if len(args) == 1 else args[1]

    def _echo(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        return args[1]

    def _quit(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        s.closing = True
        return "OK"

    def _hello(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        protocol = s.protocol
        if len(args) > 1:
            if not args[1].isdigit():
                return Error("ERR Protocol version is not an integer or out of range")
            protocol = int(args[1])
            if protocol not in (2, 3):
                return Error("NOPROTO unsupported protocol version")
        name = s.name
        i = 2
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                i += 3  # no passwords here: access is the socket file's mode
            elif option == b"SETNAME" and i + 1 < len(args):
                if _NAME_OK.fullmatch(args[i + 1]) is None:
                    return _bad_name()
                name = args[i + 1]
                i += 2
            else:
                return Error(f"ERR Syntax error in HELLO option '{_text(args[i], 64)}'")
        s.protocol, s.name = protocol, name
        return Map(
            [
                (b"server", b"redis"),
                (b"version", REDIS_VERSION.encode()),
                (b"proto", protocol),
                (b"id", s.id),
                (b"mode", b"standalone"),
                (b"role", b"replica"),
                (b"modules", []),
            ]
        )

    def _auth(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        if len(args) > 3:
            return Error("ERR syntax error")
        return Error(
            "ERR AUTH <password> called without any password configured for the default "
            "user. Are you sure your configuration is correct?"
        )

    def _select(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        if not _is_int(args[1]):
            return Error("ERR value is not an integer or out of range")
        return "OK" if int(args[1]) == 0 else Error("ERR DB index is out of range")

    def _client(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        sub = args[1].upper()
        n = len(args)
        if sub == b"SETNAME" and n == 3:
            if _NAME_OK.fullmatch(args[2]) is None:
                return _bad_name()
            s.name = args[2] or None
            return "OK"
        if sub == b"GETNAME" and n == 2:
            return s.name
        if sub == b"SETINFO" and n == 4:
            attr = args[2].upper()
            if attr == b"LIB-NAME":
                s.lib_name = args[3]
            elif attr == b"LIB-VER":
                s.lib_ver = args[3]
            else:
                return Error(f"ERR Unrecognized option '{_text(args[2], 64)}'")
            return "OK"
        if sub == b"ID" and n == 2:
            return s.id
        if sub in (b"INFO", b"LIST") and n == 2:
            line = _client_line(s)
            return line + b"\n" if sub == b"LIST" else line
        if sub in (b"NO-EVICT", b"NO-TOUCH") and n == 3:
            return "OK"
        if sub == b"HELP" and n == 2:
            return [
                b"CLIENT SETNAME <name>",
                b"CLIENT GETNAME",
                b"CLIENT SETINFO LIB-NAME|LIB-VER <value>",
                b"CLIENT ID",
                b"CLIENT INFO",
                b"CLIENT LIST (this connection only)",
            ]
        if sub in (b"SETNAME", b"GETNAME", b"SETINFO", b"ID", b"INFO", b"LIST"):
            return Error(f"ERR wrong number of arguments for 'client|{_text(sub, 16).lower()}'")
        return Error(f"ERR unknown subcommand '{_text(args[1], 64)}'. Try CLIENT HELP.")

    def _command_info(self, name: bytes) -> Reply:
        _, arity = self._table[name]
        writes = name in _WRITE_COMMANDS
        flags: list[Reply] = ["readonly" if not writes else "write"]
        if name in (b"PING", b"ECHO", b"HELLO", b"AUTH", b"QUIT", b"CLIENT", b"SELECT"):
            flags = ["fast", "no-auth"] if name in (b"HELLO", b"AUTH") else ["fast"]
        keyed = (name.startswith(b"H") and name != b"HELLO") or name in (b"TYPE", b"EXISTS")
        first, last = (1, -1 if name == b"EXISTS" else 1) if keyed else (0, 0)
        return [name.lower(), arity, flags, first, last, 1 if keyed else 0, [], [], [], []]

    def _command(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        names = sorted(self._table)
        if len(args) == 1:
            return [self._command_info(n) for n in names]
        sub = args[1].upper()
        if sub == b"COUNT" and len(args) == 2:
            return len(names)
        if sub == b"LIST":
            return [n.lower() for n in names]
        if sub == b"INFO":
            return [
                self._command_info(a.upper()) if a.upper() in self._table else None
                for a in args[2:]
            ]
        if sub == b"DOCS":
            wanted = [a.upper() for a in args[2:]] or names
            return Map(
                [
                    (
                        n.lower(),
                        Map(
                            [
                                (b"summary", self._docs.get(n, "").encode()),
                                (b"since", b"1.0.0"),
                                (b"group", b"hash" if n.startswith(b"H") else b"server"),
                            ]
                        ),
                    )
                    for n in wanted
                    if n in self._table
                ]
            )
        return Error(f"ERR unknown subcommand '{_text(args[1], 64)}'. Try COMMAND HELP.")

    def _config(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        if args[1].upper() != b"GET" or len(args) < 3:
            if args[1].upper() == b"SET":
                return Error(
                    "ERR CONFIG SET is not supported: the sidecar takes its settings from "
                    "its TOML file, SIDECAR_* variables and flags"
                )
            return Error(f"ERR unknown subcommand '{_text(args[1], 64)}'. Try CONFIG GET.")
        f = self.facts
        values = {
            "maxclients": str(f.max_clients),
            "timeout": f"{f.idle_timeout:g}",
            "unixsocket": f.socket,
            "unixsocketperm": f"{f.socket_mode:o}",
            "save": "",
            "appendonly": "no",
            "databases": "1",
            "proto-max-bulk-len": str(f.max_request_bytes),
            "client-query-buffer-limit": str(f.max_request_bytes),
            "replica-read-only": "yes",
        }
        items: list[tuple[Reply, Reply]] = []
        for pattern in args[2:]:
            rx = self._glob(pattern.lower())
            for key, value in values.items():
                if rx.fullmatch(key.encode()) and all(k != key.encode() for k, _ in items):
                    items.append((key.encode(), value.encode()))
        return Map(items)

    # ------------------------------------------------------------ keyspace

    def _dbsize(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        return len(self._existing(view()))

    def _exists_cmd(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        v = view()
        return sum(self._has(v, self._dataset(a)) for a in args[1:])

    def _type(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        return "hash" if self._has(view(), self._dataset(args[1])) else "none"

    def _keys(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        rx = self._glob(args[1])
        return [n.encode() for n in self._existing(view()) if rx.fullmatch(n.encode())]

    def _scan(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        if args[1] != b"0":
            return Error("ERR invalid cursor") if not args[1].isdigit() else [b"0", []]
        options = _scan_options(args[2:], allow_type=True)
        if isinstance(options, Error):
            return options
        pattern, _count, _novalues, kind = options
        names = [n.encode() for n in self._existing(view())]
        if pattern is not None:
            rx = self._glob(pattern)
            names = [n for n in names if rx.fullmatch(n)]
        if kind is not None and kind.lower() != b"hash":
            names = []
        return [b"0", list[Reply](names)]

    def _string_command(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        name = args[0].upper()
        if name == b"MGET":  # Redis' MGET answers nil for a key of another type
            return [None for _ in args[1:]]
        if len(args) != (2 if name in (b"GET", b"STRLEN") else 4):
            return _arity(args[0])
        if self._has(view(), self._dataset(args[1])):
            return _wrongtype()
        return 0 if name == b"STRLEN" else (b"" if name in (b"GETRANGE", b"SUBSTR") else None)

    def _has(self, view: ReadView, dataset: str | None) -> bool:
        if dataset is None:
            return False
        try:
            return view.version(dataset) is not None
        except UnknownDatasetError:
            return False

    # ------------------------------------------------------------ hashes

    def _hget(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        dataset = self._names.get(args[1]) or self._dataset(args[1])
        key = args[2]
        if dataset is None or not 0 < len(key) <= MAX_KEY_BYTES:
            return None
        try:
            return self._value(view(), dataset, key)
        except UnknownDatasetError:
            return None

    def _hmget(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        dataset = self._dataset(args[1])
        keys = args[2:]
        if dataset is None:
            return [None for _ in keys]
        v = view()
        value = self._value
        try:
            return [value(v, dataset, k) if 0 < len(k) <= MAX_KEY_BYTES else None for k in keys]
        except UnknownDatasetError:
            return [None for _ in keys]

    def _hexists(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        dataset = self._dataset(args[1])
        key = args[2]
        if dataset is None or not 0 < len(key) <= MAX_KEY_BYTES:
            return 0
        try:
            return int(view().get(dataset, key) is not None)
        except UnknownDatasetError:
            return 0

    def _hlen(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        dataset = self._dataset(args[1])
        v = view()
        if not self._has(v, dataset):
            return 0
        assert dataset is not None
        return v.count(dataset)

    def _hscan(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        start = decode_cursor(args[2])
        if start is None:
            return Error("ERR invalid cursor")
        options = _scan_options(args[3:], allow_type=False)
        if isinstance(options, Error):
            return options
        pattern, count, novalues, _ = options
        dataset = self._dataset(args[1])
        v = view()
        if not self._has(v, dataset):
            return [b"0", []]
        assert dataset is not None
        prefix = b""
        rx = None
        if pattern is not None and pattern != b"*":
            prefix = literal_prefix(pattern)
            rx = self._glob(pattern)
            start = max(start, prefix)
        keys = v.keys(dataset, start, limit=count) if len(start) <= MAX_KEY_BYTES else []
        done = len(keys) < count
        if prefix and keys and not keys[-1].startswith(prefix):
            keys = [k for k in keys if k.startswith(prefix)]
            done = True
        cursor = b"0" if done or not keys else encode_cursor(keys[-1] + b"\x00")
        if rx is not None:
            keys = [k for k in keys if rx.fullmatch(k)]
        if novalues:
            return [cursor, list[Reply](keys)]
        items: list[Reply] = []
        for key in keys:
            value = self._value(v, dataset, key)
            if value is not None:
                items += [key, value]
        return [cursor, items]

    def _hgetfields(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        dataset = self._dataset(args[1])
        key = args[2]
        if dataset is None or not 0 < len(key) <= MAX_KEY_BYTES:
            return None
        try:
            record = view().get(dataset, key)
        except UnknownDatasetError:
            return None
        if record is None:
            return None
        if is_opaque(record):
            return Error(f"WRONGTYPE dataset '{dataset}' is opaque: its records have no fields")
        # a few fields: read each in place (the fixed layout); many: decode once
        doc: Any = record.to_dict() if len(args) > 7 else record
        out: list[Reply] = []
        for raw_name in args[3:]:
            name = raw_name.decode("utf-8", "replace")
            try:
                value = doc[name]
            except KeyError:
                return Error(f"ERR dataset '{dataset}' has no field '{_text(raw_name, 64)}'")
            out.append(to_json(value))
        return out

    # ------------------------------------------------------------ INFO

    def _info(self, args: list[bytes], view: Callable[[], ReadView], s: Session) -> Reply:
        wanted = {a.lower() for a in args[1:]} or {b"default"}
        every = bool(wanted & {b"all", b"everything", b"default"})
        sections: list[tuple[bytes, Callable[[ReadView], list[str]]]] = [
            (b"server", self._info_server),
            (b"clients", self._info_clients),
            (b"stats", self._info_stats),
            (b"replication", self._info_replication),
            (b"keyspace", self._info_keyspace),
        ]
        lines: list[str] = []
        v = view()
        for name, build in sections:
            if every or name in wanted:
                if lines:
                    lines.append("")
                lines.append(f"# {name.decode().capitalize()}")
                lines += build(v)
        return ("\r\n".join(lines) + "\r\n").encode() if lines else b""

    def _info_server(self, v: ReadView) -> list[str]:
        f = self.facts
        now = self._clock()
        return [
            f"redis_version:{REDIS_VERSION}",
            "redis_mode:standalone",
            "server_name:replicad-sidecar",
            f"sidecar_version:{f.sidecar_version}",
            "os:Linux" if f.pid else "os:unknown",
            f"process_id:{f.pid}",
            f"sidecar_process_id:{f.sidecar_pid}",
            f"uptime_in_seconds:{max(0, int(now - f.started))}",
            f"unixsocket:{f.socket}",
            f"unixsocketperm:{f.socket_mode:o}",
            f"io_workers:{f.workers}",
            f"mirror:{f.mirror}",
        ]

    def _info_clients(self, v: ReadView) -> list[str]:
        stats = self._stats()
        return [
            f"connected_clients:{stats.get('connected_clients', 0)}",
            f"io_worker_clients:{stats.get('io_worker_clients', '')}",
            f"maxclients:{self.facts.max_clients}",
            f"idle_timeout:{self.facts.idle_timeout:g}",
            f"max_request_bytes:{self.facts.max_request_bytes}",
        ]

    def _info_stats(self, v: ReadView) -> list[str]:
        stats = self._stats()
        return [
            f"total_connections_received:{stats.get('total_connections_received', 0)}",
            f"total_commands_processed:{stats.get('total_commands_processed', 0)}",
            f"rejected_connections:{stats.get('rejected_connections', 0)}",
        ]

    def _info_replication(self, v: ReadView) -> list[str]:
        status = self._sync_status()
        now = self._clock()
        known = status.datasets if status is not None else {}
        names = sorted(set(self._datasets()) | set(known))
        ready = status is not None and status.ready
        lines = [
            "role:slave",
            f"master_link_status:{'up' if ready else 'down'}",
            f"sidecar_ready:{int(ready)}",
            f"datasets:{len(names)}",
        ]
        for name in names:
            try:
                cursor = v.version(name)
                records = v.count(name) if cursor is not None else 0
            except UnknownDatasetError:
                cursor, records = None, 0
            st = known.get(name, DatasetSyncStatus())
            lag = -1
            if st.lag is not None:
                lag = st.lag
                if (
                    cursor is not None
                    and st.origin_version is not None
                    and cursor.epoch.hex() == st.epoch
                ):
                    lag = max(0, st.origin_version - cursor.version)
            since = -1.0 if st.last_sync is None else max(0.0, now - st.last_sync)
            lines.append(
                f"dataset_{name}:version={-1 if cursor is None else cursor.version},"
                f"epoch={'' if cursor is None else cursor.epoch.hex()},"
                f"lag_versions={lag},lag_seconds={since:.3f},ready={int(st.ready)},"
                f"records={records}"
            )
        return lines

    def _info_keyspace(self, v: ReadView) -> list[str]:
        existing = self._existing(v)
        return [f"db0:keys={len(existing)},expires=0,avg_ttl=0"] if existing else []


def _scan_options(
    args: list[bytes], *, allow_type: bool
) -> tuple[bytes | None, int, bool, bytes | None] | Error:
    """(MATCH pattern, COUNT, NOVALUES, TYPE) of a SCAN-like command."""
    pattern: bytes | None = None
    count = SCAN_DEFAULT_COUNT
    novalues = False
    kind: bytes | None = None
    i = 0
    while i < len(args):
        option = args[i].upper()
        if option == b"MATCH" and i + 1 < len(args):
            pattern = args[i + 1]
            i += 2
        elif option == b"COUNT" and i + 1 < len(args):
            if not _is_int(args[i + 1]):
                return Error("ERR value is not an integer or out of range")
            count = int(args[i + 1])
            if count < 1:
                return Error("ERR syntax error")
            count = min(count, SCAN_MAX_COUNT)
            i += 2
        elif option == b"NOVALUES" and not allow_type:
            novalues = True
            i += 1
        elif option == b"TYPE" and allow_type and i + 1 < len(args):
            kind = args[i + 1]
            i += 2
        else:
            return Error("ERR syntax error")
    return pattern, count, novalues, kind


def _is_int(text: bytes) -> bool:
    body = text[1:] if text[:1] == b"-" else text
    return body.isdigit() and len(body) <= 19


def _text(raw: bytes, limit: int) -> str:
    """Client bytes in an error message: one line, at most ``limit`` chars."""
    text = raw.decode("utf-8", "replace")
    return (text[:limit] + "...") if len(text) > limit else text


def _arity(name: bytes) -> Error:
    return Error(f"ERR wrong number of arguments for '{_text(name, 64).lower()}' command")


def _wrongtype() -> Error:
    return Error("WRONGTYPE Operation against a key holding the wrong kind of value")


def _bad_name() -> Error:
    return Error("ERR Client names cannot contain spaces, newlines or special characters.")


def _client_line(s: Session) -> bytes:
    def show(v: bytes | None) -> bytes:
        return v or b""

    return b"id=%d name=%b lib-name=%b lib-ver=%b resp=%d" % (
        s.id,
        show(s.name),
        show(s.lib_name),
        show(s.lib_ver),
        s.protocol,
    )
