"""The socket's commands, sans-IO: :class:`sidecar.resp_commands.Dispatcher`
over a real mirror kept by the real sync machinery (in process, no sockets).

Every command with hits, misses, unknown and not-yet-synced datasets, wrong
arity, wrong types and bad options; JSON rendering (bytes, NaN, lists,
schema evolution seen through the render cache); HSCAN cursors and globs
(properties); RESP3 after HELLO 3; and the parser's fast path against its
exact path.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.codec import DatasetCodec
from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync, SyncConfig
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType, Schema
from replicad.store import OriginStore
from sidecar.json_render import JsonRenderer, to_json
from sidecar.mirror import Mirror
from sidecar.reader import Reader
from sidecar.resp import CommandParser, Error, Map, Reply, RespError, encode
from sidecar.resp_commands import (
    DatasetSyncStatus,
    Dispatcher,
    ServerFacts,
    Session,
    SyncStatus,
    decode_cursor,
    encode_cursor,
    glob_regex,
    literal_prefix,
)

ODD_SCHEMA = Schema(
    1,
    (
        Field("f", FieldType.FLOAT, nullable=True),
        Field("b", FieldType.BYTES, nullable=True),
        Field("s", FieldType.STR),
        Field("l", FieldType.FLOAT, is_list=True),
    ),
)
CODEC = DatasetCodec([seed_like_schema()])


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


class World:
    """An origin store, a mirror synced from it, a reader and a dispatcher."""

    def __init__(self, tmp: Path) -> None:
        self.origin = OriginStore(tmp / "origin", durable=False)
        self.origin.create_dataset(DatasetSpec("up", seed_like_schema()))
        self.origin.create_dataset(DatasetSpec("blobs", None))
        self.origin.create_dataset(DatasetSpec("odd", ODD_SCHEMA))
        ok(
            self.origin.commit(
                [WriteBatch("up", {b"u%03d" % i: seed_like_record(i) for i in range(200)})]
            )[0]
        )
        blobs = {b"b1": b"hello", b"b2": b"\x00\xff", b"big": b"x" * 5000}
        ok(self.origin.commit([WriteBatch("blobs", blobs)])[0])
        odd = {
            b"nan": {"f": math.nan, "b": b"\x00\x01", "s": 'caf\u00e9 "q"\n', "l": [1.5]},
            b"inf": {"f": -math.inf, "b": None, "s": "", "l": [math.inf, 2.0]},
        }
        ok(self.origin.commit([WriteBatch("odd", odd)])[0])
        self.mirror = Mirror(tmp / "mirror", durable=False)
        self.mirror.ensure("pending")  # registered, never synced
        self.drivers: dict[str, LoopbackDriver] = {}
        for name in ("up", "blobs", "odd"):
            handle = self.mirror.ensure(name)
            sync = ReplicaSync(
                name,
                state=handle.state(),
                local=handle,
                rng=random.Random(1),
                now=0.0,
                config=SyncConfig(snapshot_chunk=64),
            )
            self.drivers[name] = LoopbackDriver(sync, handle, self.origin)
        self.sync()
        self.reader = Reader.over(self.mirror)
        self.status: SyncStatus | None = None
        self.now = 1_000_000.0
        self.dispatcher = Dispatcher(
            facts=ServerFacts(
                sidecar_version="9.9",
                pid=11,
                sidecar_pid=10,
                started=self.now - 5,
                socket="/run/s.sock",
                workers=2,
                max_clients=100,
                idle_timeout=30,
                max_request_bytes=4096,
                mirror=str(tmp / "mirror"),
            ),
            datasets=self.reader.datasets,
            sync_status=lambda: self.status,
            stats=lambda: {"connected_clients": 3, "total_commands_processed": 7},
            clock=lambda: self.now,
            cache_entries=64,
        )
        self.session = Session(id=1)

    def sync(self, now: float = 0.0) -> None:
        for name, driver in self.drivers.items():
            info = self.origin.info(name)
            driver.sync.hint(Hint(name, info.cursor, info.digest), now)
            driver.run(now)

    def run(self, *args: str | bytes, session: Session | None = None) -> Reply:
        command = [a.encode() if isinstance(a, str) else a for a in args]
        with self.reader.snapshot() as snap:
            return self.dispatcher.execute(command, lambda: snap, session or self.session)

    def wire(self, *commands: list[bytes], session: Session | None = None) -> bytes:
        with self.reader.snapshot() as snap:
            return self.dispatcher.execute_many(
                list(commands), lambda: snap, session or self.session
            )

    def close(self) -> None:
        self.reader.close()
        self.mirror.close()
        self.origin.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def expected_json(i: int) -> dict[str, Any]:
    """Record ``u%03d % i`` as the reader decodes it (float32 rounding)."""
    doc: dict[str, Any] = CODEC.decode(CODEC.encode(seed_like_record(i)))
    return doc


def err(reply: Reply) -> str:
    assert isinstance(reply, Error), reply
    return reply.message


# --------------------------------------------------------------- the records


def test_hget_typed_opaque_and_misses(world: World) -> None:
    reply = world.run("HGET", "up", "u007")
    assert isinstance(reply, bytes)
    assert json.loads(reply) == expected_json(7)
    assert world.run("hget", "up", "u007") == reply  # command names ignore case
    assert world.run("HGET", "up", "u007") == reply  # a cache hit: the same bytes
    assert world.run("HGET", "blobs", "b1") == b"hello"
    assert world.run("HGET", "blobs", "b2") == b"\x00\xff"
    assert world.run("HGET", "blobs", "big") == b"x" * 5000  # stored compressed
    for args in (
        ("up", "nope"),  # no such key
        ("nope", "u007"),  # no such dataset
        ("pending", "u007"),  # registered, never synced
        ("up", ""),  # an empty key cannot exist
        ("up", "k" * 600),  # longer than any key can be
        ("bad name!", "x"),  # not a dataset name at all
    ):
        assert world.run("HGET", *args) is None, args
    assert err(world.run("HGET", "up")) == "ERR wrong number of arguments for 'hget' command"
    assert err(world.run("HGET", "up", "a", "b")).startswith("ERR wrong number of arguments")


def test_a_corrupt_compressed_value_is_an_error_that_says_so(world: World) -> None:
    env = world.mirror.env
    with env.begin(write=True) as txn:
        for slot in (b"d/blobs/0", b"d/blobs/1"):  # the two generations' tables
            db = env.open_db(slot, txn=txn, create=False)
            if txn.get(b"big", db=db) is not None:
                # claims 5,000 bytes; the block holds one literal of 3
                txn.put(b"big", b"\x13\x88\x27\x08abc", db=db)
                txn.put(b"b1", b"\x13\x03\x08abc", db=db)  # a valid block
    bad = err(world.run("HGET", "blobs", "big"))
    assert bad.startswith("ERR internal error: bad Snappy block: ")
    assert "expected 5000 decompressed bytes but got 3" in bad
    pipelined = world.wire(
        [b"HGET", b"blobs", b"b1"], [b"HGET", b"blobs", b"big"], [b"HGET", b"blobs", b"b2"]
    )
    assert pipelined == b"$3\r\nabc\r\n-" + bad.encode() + b"\r\n$2\r\n\x00\xff\r\n"


def test_json_of_bytes_nan_infinity_unicode_and_lists(world: World) -> None:
    nan = world.run("HGET", "odd", "nan")
    assert isinstance(nan, bytes)
    text = nan.decode("utf-8")
    assert "caf\u00e9" in text  # UTF-8, not \\u escapes
    assert json.loads(text) == {
        "f": "NaN",
        "b": {"base64": "AAE="},
        "s": 'caf\u00e9 "q"\n',
        "l": [1.5],
    }
    inf = world.run("HGET", "odd", "inf")
    assert isinstance(inf, bytes)
    assert json.loads(inf) == {"f": "-Infinity", "b": None, "s": "", "l": ["Infinity", 2.0]}
    fields = world.run("HGETFIELDS", "odd", "nan", "f", "b", "l")
    assert fields == [b'"NaN"', b'{"base64":"AAE="}', b"[1.5]"]


def test_hmget_hexists_hlen(world: World) -> None:
    reply = world.run("HMGET", "up", "u001", "nope", "u199", "", "u001")
    assert isinstance(reply, list) and len(reply) == 5
    assert reply[1] is None and reply[3] is None
    assert reply[0] == reply[4]
    assert isinstance(reply[0], bytes) and json.loads(reply[0]) == expected_json(1)
    assert isinstance(reply[2], bytes) and json.loads(reply[2]) == expected_json(199)
    assert world.run("HMGET", "nope", "a", "b") == [None, None]
    assert world.run("HMGET", "blobs", "b1", "b2") == [b"hello", b"\x00\xff"]
    assert err(world.run("HMGET", "up")).startswith("ERR wrong number of arguments")
    assert world.run("HEXISTS", "up", "u010") == 1
    assert world.run("HEXISTS", "up", "zzz") == 0
    assert world.run("HEXISTS", "nope", "u010") == 0
    assert world.run("HEXISTS", "pending", "u010") == 0
    assert world.run("HLEN", "up") == 200
    assert world.run("HLEN", "blobs") == 3
    assert world.run("HLEN", "nope") == 0
    assert world.run("HLEN", "pending") == 0
    assert err(world.run("HLEN")).startswith("ERR wrong number of arguments")


def test_hgetfields(world: World) -> None:
    want = expected_json(42)
    reply = world.run("HGETFIELDS", "up", "u042", "age", "city", "ctr_7d", "tags", "is_vip")
    assert isinstance(reply, list)
    assert [json.loads(v) for v in reply if isinstance(v, bytes)] == [
        want["age"],
        want["city"],
        want["ctr_7d"],
        want["tags"],
        want["is_vip"],
    ]
    assert world.run("HGETFIELDS", "up", "missing", "age") is None
    assert world.run("HGETFIELDS", "nope", "u042", "age") is None
    assert err(world.run("HGETFIELDS", "up", "u042", "age", "nope")) == (
        "ERR dataset 'up' has no field 'nope'"
    )
    assert err(world.run("HGETFIELDS", "blobs", "b1", "x")).startswith("WRONGTYPE dataset 'blobs'")
    assert err(world.run("HGETFIELDS", "up", "u042")).startswith("ERR wrong number")


def test_schema_evolution_reaches_cached_records(world: World) -> None:
    """A record rendered (and cached) before a schema evolution shows the new
    field's default afterwards, although its stored bytes did not change."""
    before = world.run("HGET", "up", "u003")
    assert isinstance(before, bytes) and "score" not in json.loads(before)
    schema = seed_like_schema()
    evolved = Schema(2, (*schema.fields, Field("score", FieldType.INT, default=7)))
    world.origin.evolve_schema("up", evolved)
    ok(world.origin.commit([WriteBatch("up", {b"u900": {**seed_like_record(900), "score": 1}})])[0])
    world.sync(1.0)
    after = world.run("HGET", "up", "u003")
    assert isinstance(after, bytes)
    assert json.loads(after) == {**json.loads(before), "score": 7}
    assert world.run("HGETFIELDS", "up", "u900", "score") == [b"1"]


def test_keys_asked_again_and_again_in_one_view(world: World) -> None:
    """A pipeline asking for the same keys over and over (a hot key: the
    replier answers it from its last reply) gets each key's own record, and
    the next view after a write gets the new one."""
    three, four = (b"HGET", b"up", b"u003"), (b"HGET", b"up", b"u004")
    order = [three, three, three, four, four, three, four, three, three]

    def replies() -> list[dict[str, Any]]:
        wire = world.wire(*[list(c) for c in order])
        out: list[dict[str, Any]] = []
        while wire:
            head, _, wire = wire.partition(b"\r\n")
            body, wire = wire[: int(head[1:])], wire[int(head[1:]) + 2 :]
            out.append(json.loads(body))
        return out

    assert replies() == [expected_json(3 if c is three else 4) for c in order]
    ok(world.origin.commit([WriteBatch("up", {b"u003": seed_like_record(303)})])[0])
    world.sync(1.0)
    assert replies() == [expected_json(303 if c is three else 4) for c in order]


# --------------------------------------------------------------- the keyspace


def test_datasets_as_keys(world: World) -> None:
    assert (
        world.run("EXISTS", "up", "blobs", "nope", "pending", "up") == 3
    )  # as Redis: repeats count
    assert world.run("DBSIZE") == 3
    assert world.run("TYPE", "up") == "hash"
    assert world.run("TYPE", "pending") == "none"
    assert world.run("KEYS", "*") == [b"blobs", b"odd", b"up"]
    assert world.run("KEYS", "[ou]*") == [b"odd", b"up"]
    assert world.run("SCAN", "0") == [b"0", [b"blobs", b"odd", b"up"]]
    assert world.run("SCAN", "0", "MATCH", "b*", "COUNT", "5") == [b"0", [b"blobs"]]
    assert world.run("SCAN", "0", "TYPE", "string") == [b"0", []]
    assert err(world.run("SCAN", "x")) == "ERR invalid cursor"
    assert (
        err(world.run("SCAN", "0", "COUNT", "x")) == "ERR value is not an integer or out of range"
    )
    # string commands on a hash, as Redis answers them
    wrongtype = "WRONGTYPE Operation against a key holding the wrong kind of value"
    assert err(world.run("GET", "up")) == wrongtype
    assert world.run("GET", "nope") is None
    assert world.run("MGET", "up", "nope") == [None, None]
    assert world.run("STRLEN", "nope") == 0
    # writes
    for args in (("SET", "a", "b"), ("HSET", "up", "k", "v"), ("DEL", "up"), ("FLUSHALL",)):
        assert err(world.run(*args)) == "READONLY You can't write against a read only replica."


def test_hscan_pages_filters_and_values(world: World) -> None:
    cursor, items = _page(world.run("HSCAN", "up", "0"))
    assert len(items) == 20 and cursor != b"0"  # 10 keys and their values
    keys = items[0::2]
    assert keys == [b"u%03d" % i for i in range(10)]
    assert [json.loads(v) for v in items[1::2]] == [expected_json(i) for i in range(10)]
    cursor, items = _page(world.run("HSCAN", "up", cursor, "COUNT", "3", "NOVALUES"))
    assert items == [b"u010", b"u011", b"u012"]
    # MATCH with a literal prefix seeks to it and ends past it
    cursor, items = _page(world.run("HSCAN", "up", "0", "MATCH", "u19?", "COUNT", "100"))
    assert cursor == b"0" and items[0::2] == [b"u%03d" % i for i in range(190, 200)]
    cursor, items = _page(world.run("hscan", "up", "0", "match", "*7", "count", "1000", "novalues"))
    assert cursor == b"0" and items == [b"u%03d" % i for i in range(200) if i % 10 == 7]
    assert world.run("HSCAN", "nope", "0") == [b"0", []]
    assert world.run("HSCAN", "blobs", "0", "COUNT", "2") == [
        encode_cursor(b"b2\x00"),
        [b"b1", b"hello", b"b2", b"\x00\xff"],
    ]
    assert err(world.run("HSCAN", "up", "abc")) == "ERR invalid cursor"
    assert err(world.run("HSCAN", "up", "12345")) == "ERR invalid cursor"  # not one of ours
    assert err(world.run("HSCAN", "up", "0", "COUNT", "0")) == "ERR syntax error"
    assert err(world.run("HSCAN", "up", "0", "COUNT", "-1")) == "ERR syntax error"
    assert err(world.run("HSCAN", "up", "0", "COUNT", "x")).startswith("ERR value is not an int")
    assert err(world.run("HSCAN", "up", "0", "BOGUS")) == "ERR syntax error"
    assert err(world.run("HSCAN", "up", "0", "MATCH")) == "ERR syntax error"


def _page(reply: Reply) -> tuple[bytes, list[bytes]]:
    assert isinstance(reply, list) and len(reply) == 2
    cursor, items = reply
    assert isinstance(cursor, bytes) and isinstance(items, list)
    assert all(isinstance(i, bytes) for i in items)
    return cursor, [i for i in items if isinstance(i, bytes)]


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 40), pattern=st.sampled_from([None, "u1*", "*5", "u0[0-4]?", "x*"]))
def test_hscan_returns_every_key_once_while_keys_come_and_go(
    tmp_path_factory: pytest.TempPathFactory, count: int, pattern: str | None
) -> None:
    """Keys present for the whole scan come back exactly once; keys added or
    deleted meanwhile may or may not (Redis' guarantee, here without
    duplicates at all); the cursor survives the writes."""
    world = _shared_world(tmp_path_factory)
    rx = None if pattern is None else fnmatch.translate(pattern)
    stable = {b"u%03d" % i for i in range(200) if i % 3}  # never touched below
    seen: list[bytes] = []
    cursor = b"0"
    step = 0
    options = ["COUNT", str(count), "NOVALUES"] + ([] if pattern is None else ["MATCH", pattern])
    while True:
        cursor, keys = _page(world.run("HSCAN", "up", cursor, *options))
        seen += keys
        step += 1
        if step % 2 == 0:  # churn keys that are not in the stable set
            i = random.randrange(0, 200, 3)
            ok(world.origin.commit([WriteBatch("up", {}, deletes=[b"u%03d" % i])])[0])
            ok(world.origin.commit([WriteBatch("up", {b"u%03da" % i: seed_like_record(i)})])[0])
            world.sync(float(step))
        if cursor == b"0":
            break
    assert len(seen) == len(set(seen)), "no key twice"
    want = {k for k in stable if rx is None or _fnmatch(k, pattern)}
    assert want <= set(seen)
    assert all(pattern is None or _fnmatch(k, pattern) for k in seen)


_WORLDS: dict[str, World] = {}


def _shared_world(factory: pytest.TempPathFactory) -> World:
    if "w" not in _WORLDS:
        _WORLDS["w"] = World(factory.mktemp("scan"))
    return _WORLDS["w"]


@pytest.fixture(scope="module", autouse=True)
def _close_shared_world() -> Iterator[None]:
    yield
    for w in _WORLDS.values():
        w.close()
    _WORLDS.clear()


def _fnmatch(key: bytes, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatchcase(key.decode(), pattern)


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=0, max_size=507))
def test_cursor_round_trip(key: bytes) -> None:
    cursor = encode_cursor(key)
    assert cursor.isdigit() and decode_cursor(cursor) == key
    assert decode_cursor(b"0") == b""


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        (b"*", [b"", b"abc", b"a\nb"], []),
        (b"u?1", [b"ua1", b"u\x001"], [b"u1", b"uab1"]),
        (b"[abc]x", [b"ax", b"cx"], [b"dx", b"x"]),
        (b"[^abc]x", [b"dx"], [b"ax"]),
        (b"[a-c]*", [b"b", b"cz"], [b"d"]),
        (b"[c-a]", [b"b"], [b"d"]),  # Redis accepts reversed ranges
        (b"a\\*b", [b"a*b"], [b"axb"]),
        (b"[\\]]", [b"]"], [b"a"]),
        (b"a[", [b"a["], [b"ab"]),  # an unclosed bracket is literal
        (b"user:1.*", [b"user:1.x"], [b"user:1x"]),
    ],
)
def test_redis_globs(pattern: bytes, matches: list[bytes], misses: list[bytes]) -> None:
    rx = glob_regex(pattern)
    for key in matches:
        assert rx.fullmatch(key), (pattern, key)
    for key in misses:
        assert not rx.fullmatch(key), (pattern, key)


def test_literal_prefix() -> None:
    assert literal_prefix(b"user:12*") == b"user:12"
    assert literal_prefix(b"a?b") == b"a"
    assert literal_prefix(b"[ab]") == b""
    assert literal_prefix(b"a\\*") == b"a"
    assert literal_prefix(b"plain") == b"plain"


# --------------------------------------------------------------- connection


def test_ping_echo_select_auth_quit(world: World) -> None:
    assert world.run("PING") == "PONG"
    assert world.run("PING", "hi") == b"hi"
    assert err(world.run("PING", "a", "b")).startswith("ERR wrong number")
    assert world.run("ECHO", "x y") == b"x y"
    assert world.run("SELECT", "0") == "OK"
    assert err(world.run("SELECT", "1")) == "ERR DB index is out of range"
    assert err(world.run("SELECT", "x")) == "ERR value is not an integer or out of range"
    assert err(world.run("AUTH", "secret")).startswith("ERR AUTH <password> called without")
    session = Session(id=5)
    assert world.wire([b"PING"], [b"QUIT"], [b"PING"], session=session) == b"+PONG\r\n+OK\r\n"
    assert session.closing


def test_unknown_commands(world: World) -> None:
    assert err(world.run("FOO", "a", "b")) == (
        "ERR unknown command 'FOO', with args beginning with: 'a' 'b'"
    )
    assert err(world.run("NOPE")) == "ERR unknown command 'NOPE', with args beginning with:"
    long = err(world.run("X" * 500, "\r\n"))
    assert "\n" not in encode(Error(long)).decode()[:-2] and len(long) < 200


def test_hello_client_and_resp3(world: World) -> None:
    s = Session(id=9)
    hello2 = world.run("HELLO", session=s)
    assert isinstance(hello2, Map)
    assert dict(hello2.items)[b"proto"] == 2 and dict(hello2.items)[b"id"] == 9
    assert err(world.run("HELLO", "4", session=s)) == "NOPROTO unsupported protocol version"
    assert err(world.run("HELLO", "x", session=s)).startswith("ERR Protocol version")
    assert err(world.run("HELLO", "3", "BOGUS", session=s)).startswith("ERR Syntax error")
    assert s.protocol == 2
    # HELLO 3 switches this connection to RESP3: the reply is a map, nil is "_"
    wire = world.wire(
        [b"HELLO", b"3", b"AUTH", b"default", b"pw", b"SETNAME", b"app1"],
        [b"HGET", b"up", b"nope"],
        [b"CLIENT", b"GETNAME"],
        session=s,
    )
    assert wire.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert wire.endswith(b"_\r\n$4\r\napp1\r\n")
    assert s.protocol == 3
    assert world.run("CLIENT", "SETNAME", "worker-2", session=s) == "OK"
    assert world.run("CLIENT", "GETNAME", session=s) == b"worker-2"
    assert err(world.run("CLIENT", "SETNAME", "a b", session=s)).startswith(
        "ERR Client names cannot contain spaces"
    )
    assert world.run("CLIENT", "SETINFO", "LIB-NAME", "redis-py", session=s) == "OK"
    assert world.run("CLIENT", "SETINFO", "lib-ver", "8.1", session=s) == "OK"
    assert err(world.run("CLIENT", "SETINFO", "color", "red", session=s)).startswith(
        "ERR Unrecognized option"
    )
    assert world.run("CLIENT", "ID", session=s) == 9
    info = world.run("CLIENT", "INFO", session=s)
    assert info == b"id=9 name=worker-2 lib-name=redis-py lib-ver=8.1 resp=3"
    assert err(world.run("CLIENT", "KILL", "x", session=s)).startswith("ERR unknown subcommand")
    assert err(world.run("CLIENT", "SETNAME", session=s)).startswith("ERR wrong number")


def test_command_and_config(world: World) -> None:
    table = world.run("COMMAND")
    assert isinstance(table, list)
    names = {entry[0] for entry in table if isinstance(entry, list)}
    assert {b"hget", b"hmget", b"hscan", b"hgetfields", b"info", b"ping"} <= names
    assert world.run("COMMAND", "COUNT") == len(table)
    info = world.run("COMMAND", "INFO", "hget", "nope")
    assert isinstance(info, list) and info[1] is None
    assert isinstance(info[0], list) and info[0][:6] == [b"hget", 3, ["readonly"], 1, 1, 1]
    docs = world.run("COMMAND", "DOCS", "HGET")
    assert isinstance(docs, Map) and docs.items[0][0] == b"hget"
    assert isinstance(world.run("COMMAND", "DOCS"), Map)
    assert err(world.run("COMMAND", "BOGUS")).startswith("ERR unknown subcommand")
    assert world.run("CONFIG", "GET", "save") == Map([(b"save", b"")])
    got = world.run("CONFIG", "GET", "max*", "timeout")
    assert got == Map([(b"maxclients", b"100"), (b"timeout", b"30")])
    assert err(world.run("CONFIG", "SET", "timeout", "1")).startswith("ERR CONFIG SET is not")


def test_info_sections(world: World) -> None:
    up = world.origin.info("up").cursor
    world.status = SyncStatus(
        ready=True,
        datasets={
            "up": DatasetSyncStatus(
                ready=True,
                epoch=up.epoch.hex(),
                version=up.version,
                origin_version=up.version + 3,
                lag=3,
                last_sync=world.now - 2.5,
                phase="idle",
            ),
            "pending": DatasetSyncStatus(phase="bootstrap"),
        },
    )
    reply = world.run("INFO")
    assert isinstance(reply, bytes)
    info = _parse_info(reply)
    assert info["redis_version"] == "7.0.0" and info["process_id"] == "11"
    assert info["uptime_in_seconds"] == "5" and info["io_workers"] == "2"
    assert info["connected_clients"] == "3" and info["maxclients"] == "100"
    assert info["total_commands_processed"] == "7"
    assert info["role"] == "slave" and info["master_link_status"] == "up"
    assert info["sidecar_ready"] == "1"
    assert info["dataset_up"] == (
        f"version={up.version},epoch={up.epoch.hex()},lag_versions=3,lag_seconds=2.500,"
        "ready=1,records=200"
    )
    assert info["dataset_pending"] == (
        "version=-1,epoch=,lag_versions=-1,lag_seconds=-1.000,ready=0,records=0"
    )
    assert (
        info["dataset_blobs"].startswith("version=1,")
        and "lag_versions=-1" in info["dataset_blobs"]
    )
    assert info["db0"] == "keys=3,expires=0,avg_ttl=0"
    only = world.run("INFO", "replication")
    assert isinstance(only, bytes) and only.startswith(b"# Replication\r\n")
    assert b"# Server" not in only
    assert world.run("INFO", "nosuchsection") == b""
    world.status = None  # nothing pushed yet by the sidecar process
    assert _parse_info(world.run("INFO", "replication"))["master_link_status"] == "down"


def _parse_info(reply: Reply) -> dict[str, str]:
    assert isinstance(reply, bytes)
    out: dict[str, str] = {}
    for line in reply.decode().split("\r\n"):
        if line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    return out


def test_internal_errors_become_error_replies(world: World) -> None:
    seen: list[BaseException] = []
    world.dispatcher._on_internal_error = seen.append

    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("disk on fire")

    def broken() -> Any:
        return Broken()

    reply = world.dispatcher.execute([b"HGET", b"up", b"u001"], broken, Session(id=1))
    assert err(reply) == "ERR internal error: RuntimeError"
    assert len(seen) == 1


def test_pipeline_replies_in_order(world: World) -> None:
    commands = [[b"HGET", b"up", b"u%03d" % (i % 250)] for i in range(300)] + [[b"HLEN", b"up"]]
    wire = world.wire(*commands)
    assert wire == b"".join(world.wire(c) for c in commands)
    assert wire.count(b"$-1\r\n") == 50  # u200..u249 are misses
    assert wire.endswith(b":200\r\n")


def test_pipelined_hgets_read_their_own_view(world: World) -> None:
    """One replier per dataset and view answers a pipeline's HGETs; the next
    view sees what a sync changed, cached renderings included."""
    commands = [[b"HGET", name, key] for key in (b"u001", b"b1") for name in (b"up", b"blobs")]
    first = world.wire(*commands)
    assert first == b"".join(world.wire(c) for c in commands)
    assert first.count(b"$-1\r\n") == 2  # b1 in up, u001 in blobs
    ok(world.origin.commit([WriteBatch("up", {b"u001": seed_like_record(77)})])[0])
    ok(world.origin.commit([WriteBatch("blobs", {b"b1": b"bye"})])[0])
    world.sync(1.0)
    again = world.wire(*commands)
    assert json.loads(again.split(b"\r\n")[1]) == expected_json(77)
    assert again.endswith(b"$-1\r\n$-1\r\n$3\r\nbye\r\n")
    assert again == b"".join(world.wire(c) for c in commands)


def test_hello_inside_a_pipeline_changes_the_nil_of_later_hgets(world: World) -> None:
    miss = [b"HGET", b"up", b"missing"]
    assert world.wire([b"HELLO", b"3"], miss, session=Session(id=5)).endswith(b"\r\n_\r\n")
    resp3 = Session(id=6, protocol=3)
    assert world.wire([b"HELLO", b"2"], miss, session=resp3).endswith(b"\r\n$-1\r\n")


def test_info_in_a_pipeline_counts_the_hgets_before_it(world: World) -> None:
    counted = world.dispatcher
    counted._stats = lambda: {"total_commands_processed": counted.commands_processed}
    before = counted.commands_processed
    wire = world.wire(*([[b"HGET", b"up", b"u002"]] * 3), [b"INFO", b"stats"])
    assert b"total_commands_processed:%d\r\n" % (before + 4) in wire


def test_refused_stale_data_is_an_error_and_an_absent_key_nil(world: World) -> None:
    """With stale data refused, HGET of a present key is an error reply and
    of an absent key nil, whether pipelined (the replier) or not."""
    world.reader.close()
    world.reader = Reader.over(
        world.mirror, max_staleness=5.0, refuse_stale=True, clock=lambda: 1e12
    )
    assert world.wire([b"HGET", b"up", b"missing"]) == b"$-1\r\n"
    assert world.run("HGET", "up", "missing") is None
    assert err(world.run("HGET", "up", "u001")).startswith(
        "ERR internal error: dataset last synced"
    )
    wire = world.wire([b"HGET", b"up", b"missing"], [b"HGET", b"up", b"u001"])
    assert wire.startswith(b"$-1\r\n-ERR internal error: dataset last synced")


@pytest.mark.parametrize(
    "head", [b"*3\rGARBAGE", b"*3\r" + b"x" * 5000, b"*3\r\x00\x01", b"*3x", b"*30"]
)
def test_a_lone_command_with_a_bad_header_fails_as_in_the_exact_parser(head: bytes) -> None:
    data = head + b"\r\n$4\r\nHGET\r\n$2\r\nup\r\n$4\r\nu001\r\n"
    for limits in ({}, {"max_request": 1024}):
        assert _fast(data, 1, **limits) == _exact(data, **limits), (head, limits)


def test_the_render_cache_is_bounded_and_evicts_the_oldest() -> None:
    from sidecar.resp_commands import _RenderCache

    cache = _RenderCache(16)
    for i in range(40):
        cache.store(b"raw%d" % i, b"out%d" % i)
        assert len(cache.entries) <= 16
    assert b"raw39" in cache.entries and b"raw0" not in cache.entries
    assert list(cache.entries) == sorted(cache.entries, key=lambda k: int(k[3:]))  # oldest first
    off = _RenderCache(0)
    off.store(b"raw", b"out")
    assert off.entries == {}


RENDER_SCHEMA = Schema(
    1,
    (
        Field("x", FieldType.FLOAT, nullable=True),
        Field("nullable_y", FieldType.FLOAT32, nullable=True),  # "null" in a field name
        Field("s", FieldType.STR, nullable=True),
        Field("b", FieldType.BYTES, nullable=True),
        Field("l", FieldType.FLOAT, is_list=True),
        Field("i", FieldType.INT, nullable=True),
    ),
)
# without float lists: the renderer's finite-sum path
SCALAR_SCHEMA = Schema(1, tuple(f for f in RENDER_SCHEMA.fields if f.name != "l"))
ONE_FLOAT_SCHEMA = Schema(1, tuple(f for f in RENDER_SCHEMA.fields if f.name not in ("l", "x")))
NO_FLOAT_SCHEMA = Schema(
    1, tuple(f for f in RENDER_SCHEMA.fields if f.name not in ("l", "x", "nullable_y"))
)
floats = st.one_of(st.none(), st.floats(), st.sampled_from([math.nan, 1e308, -1e308, 0.0, -0.0]))
floats32 = st.one_of(st.none(), st.floats(width=32), st.sampled_from([math.nan]))
texts = st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["null", "a null", "NaN"]))


@settings(max_examples=300, deadline=None)
@given(
    record=st.fixed_dictionaries(
        {
            "x": floats,
            "nullable_y": floats32,
            "s": texts,
            "b": st.one_of(st.none(), st.binary(max_size=6)),
            "l": st.lists(st.floats(), max_size=3),
            "i": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        }
    )
)
def test_the_renderer_writes_what_to_json_writes(record: dict[str, Any]) -> None:
    """HGET's renderer (orjson, then a finite sum of the floats or a count of
    its nulls) gives to_json's bytes, whatever NaN, infinity, overflowing
    sum, null or "null" the record holds, with float lists or without, one
    float field or none."""
    for schema in (RENDER_SCHEMA, SCALAR_SCHEMA, ONE_FLOAT_SCHEMA, NO_FLOAT_SCHEMA):
        codec = DatasetCodec([schema])
        raw = codec.encode({k: v for k, v in record.items() if k in schema.names})
        assert JsonRenderer(codec)(raw) == to_json(codec.decode(raw)), schema.names


def test_the_renderer_takes_orjson_for_nulls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record with None fields (and "null" in a field name) is rendered by
    orjson alone; only NaN and infinities, or "null" in a string, need to_json."""
    import sidecar.json_render as rc

    if rc._orjson is None:
        pytest.skip("orjson is not installed")
    codec = DatasetCodec([RENDER_SCHEMA])
    render = JsonRenderer(codec)
    calls: list[Any] = []
    real = rc.to_json

    def counted(value: Any) -> bytes:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(rc, "to_json", counted)
    plain = {"x": None, "nullable_y": 0.5, "s": None, "b": None, "l": [1.0], "i": None}
    assert json.loads(render(codec.encode(plain))) == plain
    assert calls == []
    for odd in ({"x": math.inf}, {"s": "null"}, {"l": [math.nan]}):
        render(codec.encode({**plain, **odd}))
    assert len(calls) == 3
    # without float lists the floats' sum decides: "null" in a string, None
    # fields and finite floats are orjson's alone; NaN, an infinity or a sum
    # that overflows go on to the null count
    calls.clear()
    scalar = DatasetCodec([SCALAR_SCHEMA])
    render = JsonRenderer(scalar)
    with_null: dict[str, Any] = {"x": 1e300, "nullable_y": None, "s": "null", "b": None}
    assert json.loads(render(scalar.encode(with_null))) == {**with_null, "i": None}
    assert calls == []
    overflow: dict[str, Any] = {"x": 1.7e308, "nullable_y": 3e38, "s": "text"}
    for odd in ({"x": math.nan}, {"nullable_y": -math.inf}, overflow):
        render(scalar.encode({**with_null, **odd}))
    assert len(calls) == 2  # the overflow's nulls are its None fields: orjson's


# --------------------------------------------------------------- the parser


def _exact(data: bytes, **limits: int) -> tuple[list[list[bytes]], bool]:
    parser = CommandParser(**limits)
    parser.receive_data(data)
    out: list[list[bytes]] = []
    try:
        while (cmd := parser.next_command()) is not None:
            out.append(cmd)
    except RespError:
        return out, True
    return out, False


def _fast(data: bytes, chunks: int, **limits: int) -> tuple[list[list[bytes]], bool]:
    parser = CommandParser(**limits)
    out: list[list[bytes]] = []
    size = max(1, len(data) // chunks)
    try:
        for i in range(0, len(data), size):
            parser.receive_data(data[i : i + size])
            out += parser.commands()
        out += parser.commands()
    except RespError:
        return out, True
    return out, False


arg = st.one_of(st.binary(max_size=12), st.sampled_from([b"\r\n", b"a\r\nb", b"$3", b"*1", b"\r"]))
command = st.lists(arg, min_size=1, max_size=5)


@settings(max_examples=400, deadline=None)
@given(
    commands=st.lists(command, max_size=6),
    junk=st.one_of(st.just(b""), st.binary(max_size=8), st.sampled_from([b"PING\r\n", b"*x\r\n"])),
    chunks=st.integers(1, 5),
)
def test_fast_parse_equals_exact_parse(
    commands: list[list[bytes]], junk: bytes, chunks: int
) -> None:
    """The batch parser (fast path plus exact parser) gives the commands and
    the errors that the exact parser alone gives, whatever the chunking."""
    data = b"".join(encode(list[Reply](c)) for c in commands) + junk
    limited = {"max_args": 3, "max_bulk": 6}
    for limits in ({}, limited, {**limited, "max_request": 40, "max_inline": 30}):
        want, want_err = _exact(data, **limits)
        got, got_err = _fast(data, chunks, **limits)
        assert got == want and got_err == want_err, (data, limits)


@settings(max_examples=300, deadline=None)
@given(
    commands=st.lists(st.lists(arg, min_size=3, max_size=3), min_size=4, max_size=20),
    odd=st.one_of(st.none(), st.tuples(st.integers(0, 19), command)),
    junk=st.one_of(st.just(b""), st.binary(max_size=8), st.just(b"*3\r\n$4\r\nHGET\r\n")),
    chunks=st.integers(1, 3),
)
def test_a_pipeline_of_three_argument_commands_parses_as_the_exact_parser_does(
    commands: list[list[bytes]], odd: tuple[int, list[bytes]] | None, junk: bytes, chunks: int
) -> None:
    """Pipelines of HGET-shaped commands (the fast path's unrolled case, whose
    size check must count the framing against max_request), with now and
    then another command or junk among them."""
    if odd is not None:
        commands.insert(odd[0] % (len(commands) + 1), odd[1])
    data = b"".join(encode(list[Reply](c)) for c in commands) + junk
    for limits in ({}, {"max_bulk": 6}, {"max_args": 2}, {"max_request": 30}):
        want, want_err = _exact(data, **limits)
        got, got_err = _fast(data, chunks, **limits)
        assert got == want and got_err == want_err, (data, limits)


def test_parser_returns_commands_before_a_fault_then_raises() -> None:
    parser = CommandParser()
    parser.receive_data(b"*1\r\n$4\r\nPING\r\n*1\r\n$x\r\n")
    assert parser.commands() == [[b"PING"]]
    assert parser.error is not None
    with pytest.raises(RespError):
        parser.commands()


def test_parser_max_request() -> None:
    """A command over the limit is refused whether it arrives whole or in
    pieces, as soon as its size is known."""
    parser = CommandParser(max_request=64, max_bulk=64)
    parser.receive_data(b"*2\r\n$4\r\nHGET\r\n$40\r\n" + b"k" * 30)
    assert parser.commands() == []
    parser.receive_data(b"k" * 10 + b"\r\n")
    assert parser.commands() == [[b"HGET", b"k" * 40]]
    parser.receive_data(b"*2\r\n$4\r\nHGET\r\n$60\r\n")  # 60 bytes will not fit
    with pytest.raises(RespError, match="larger than 64 bytes"):
        parser.commands()
    whole = CommandParser(max_request=64)
    whole.receive_data(encode([b"HMGET", b"k" * 30, b"k" * 30]))
    with pytest.raises(RespError, match="larger than 64 bytes"):
        whole.commands()


TRICKY: list[Any] = [
    {"f": math.nan, "g": [math.inf, -math.inf, 1.5], "b": b"\x00\xff", "s": '\u00e9\n"', "n": None},
    {"big": 2**70, "small": -(2**63), "t": True, "l": [[1, 2], {"x": b"y"}]},
    {"tiny": 1e-05, "huge": 1e16, "neg0": -0.0},
    [1.0, None, "null", math.nan],
]


@pytest.mark.parametrize("value", TRICKY)
def test_to_json_is_strict_and_the_same_with_or_without_orjson(
    value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.json_render as rc

    fast = rc.to_json(value)  # orjson, when it is installed
    monkeypatch.setattr(rc, "_orjson", None)
    slow = rc.to_json(value)
    assert b"NaN" not in slow.replace(b'"NaN"', b"")  # strict JSON: no bare NaN

    def bare(name: str) -> Any:
        pytest.fail(f"bare {name} in the JSON")

    assert json.loads(fast, parse_constant=bare) == json.loads(slow, parse_constant=bare)
