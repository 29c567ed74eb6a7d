"""Fuzzing, bounded, of every decoder that takes outside input except the
HTTP bodies (``tests/test_fuzz_http.py``): wire frames, message bodies, the
RESP parser, the hint stream, schema definitions and config files.

Each test feeds Hypothesis-made inputs -- random bytes, and structured
inputs close to valid ones, which reach deeper -- to the same
``one_input`` function the long-running harnesses in ``fuzz/`` use (atheris
or the random engine: see ``fuzz/driver.py``). Its contract: accept, or
refuse with the decoder's documented ``ReplicadError`` subclass; never any
other exception, never a hang; plus each decoder's own oracle (round trips,
whole-versus-pieces agreement, the RESP parser's two paths agreeing).

Regressions of what fuzzing found are at the end.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import fuzz_config, fuzz_frames, fuzz_messages, fuzz_resp, fuzz_schema, fuzz_sse
from replicad import config as origin_config
from replicad.errors import ConfigError
from replicad.frames import encode_frame
from replicad.messages import to_wire
from sidecar import config as sidecar_config
from sidecar.resp import encode

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=20,
)


def packed(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# --------------------------------------------------------------------- frames


@FAST
@given(data=st.binary(max_size=600))
def test_frames_random_bytes(data: bytes) -> None:
    fuzz_frames.one_input(data)


@FAST
@given(
    seed=st.sampled_from(fuzz_frames.SEEDS),
    step=st.integers(0, 255),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
)
def test_frames_edited_valid_streams(
    seed: bytes, step: int, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    data[0] = step
    for pos, byte in edits:
        data[1 + pos % (len(data) - 1)] = byte
    fuzz_frames.one_input(bytes(data[: 1 + cut % len(data)]))


# --------------------------------------------------------------------- messages


def _replace_leaf(body: Any, path: list[int], new: Any) -> Any:
    """``body`` with the element at ``path`` (indices into nested lists,
    taken modulo each list's length) replaced by ``new``."""
    if not path or not isinstance(body, list) or not body:
        return new
    i = path[0] % len(body)
    out = list(body)
    out[i] = _replace_leaf(body[i], path[1:], new)
    return out


@settings(max_examples=150, deadline=None)
@given(
    msg=st.sampled_from(fuzz_messages.sample_messages()),
    path=st.lists(st.integers(0, 20), min_size=1, max_size=3),
    new=msgpack_values,
    kind=st.none() | st.integers(0, 255),
)
def test_messages_with_one_field_replaced(
    msg: Any, path: list[int], new: Any, kind: int | None
) -> None:
    wire_kind, body = to_wire(msg)
    try:
        raw = packed(_replace_leaf(body, path, new))
    except (OverflowError, ValueError):
        return
    fuzz_messages.one_input(bytes([wire_kind if kind is None else kind]) + raw)


@FAST
@given(kind=st.integers(0, 255), body=msgpack_values)
def test_messages_arbitrary_bodies(kind: int, body: Any) -> None:
    try:
        raw = packed(body)
    except (OverflowError, ValueError):
        return
    fuzz_messages.one_input(bytes([kind]) + raw)


# --------------------------------------------------------------------- RESP

resp_arg = st.binary(max_size=20) | st.sampled_from([b"HGET", b"PING", b"x" * 600, b"a\r\nb"])
resp_piece = (
    st.lists(resp_arg, min_size=1, max_size=6).map(lambda a: encode(list(a)))
    | st.sampled_from(
        [
            b"PING\r\n",
            b"\r\n",
            b"*",
            b"$",
            b"*2\r\n",
            b"$3\r\nabc\r\n",
            b"*-1\r\n",
            b"$-1\r\n",
            b"*100\r\n",
            b"$99999\r\n",
            b"*1\r\n$4\r\nPING",
            b"HGET a b\r\n",
            b" " * 300 + b"\r\n",
            b"*65\r\n",
            b"*0\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$1\r\nab\r\n",
            b"*3\r\n$4\r\nHGET\r\n",
        ]
    )
    | st.binary(max_size=12)
)


@settings(max_examples=200, deadline=None)
@given(step=st.integers(0, 255), pieces=st.lists(resp_piece, max_size=10))
def test_resp_both_paths_agree_on_any_stream(step: int, pieces: list[bytes]) -> None:
    fuzz_resp.one_input(bytes([step]) + b"".join(pieces))


# --------------------------------------------------------------------- hint stream

sse_line = st.sampled_from(
    [
        ": ping",
        "event: hint",
        "event: diff",
        "event:hint",
        "data: {}",
        "data",
        "id: 3",
        "retry: 10",
        "",
        "event: other",
        "data: not json",
        "data: AAAA",
    ]
) | st.text(max_size=30).map(lambda t: "data: " + t)


@FAST
@given(
    step=st.integers(0, 255),
    lines=st.lists(sse_line, max_size=12),
    eol=st.sampled_from(["\n", "\r", "\r\n"]),
    hint=st.dictionaries(
        st.sampled_from(["dataset", "epoch", "version", "digest", "x"]),
        st.none() | st.integers() | st.text(max_size=50) | st.sampled_from(["00" * 16, "00" * 24]),
    ),
)
def test_hint_stream_events(step: int, lines: list[str], eol: str, hint: dict[str, Any]) -> None:
    text = eol.join(lines) + eol + "event: hint" + eol + "data: " + json.dumps(hint) + eol * 2
    fuzz_sse.one_input(bytes([step]) + text.encode("utf-8", "surrogatepass"))


@FAST
@given(step=st.integers(0, 255), data=st.binary(max_size=300))
def test_hint_stream_bytes(step: int, data: bytes) -> None:
    fuzz_sse.one_input(bytes([step]) + data)


# --------------------------------------------------------------------- schemas

TYPES = [
    "int",
    "float",
    "float32",
    "bool",
    "str",
    "bytes",
    "list<int>",
    "list<str>",
    "list<bytes>",
    "list<float32>",
    "list<list<int>>",
    "Int",
    "list<>",
    "",
]
junk = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
field_doc = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["age", "city", "_x", "1bad", "", "a" * 65]) | junk,
        "type": st.sampled_from(TYPES) | junk,
        "nullable": st.booleans() | junk,
        "default": junk | st.lists(junk, max_size=3) | st.sampled_from(["AAE=", "!!"]),
        "dictionary": st.booleans() | junk,
        "extra": junk,
    },
)
schema_doc = st.fixed_dictionaries(
    {},
    optional={
        "version": st.integers(-1, 3) | junk,
        "fields": st.lists(field_doc, max_size=5) | junk,
        "extra": junk,
    },
)


@settings(max_examples=150, deadline=None)
@given(doc=schema_doc | field_doc | st.tuples(schema_doc, schema_doc).map(list) | msgpack_values)
def test_schema_documents(doc: Any) -> None:
    fuzz_schema.one_input(b"\x00" + json.dumps(doc, default=repr).encode())
    try:
        raw = packed(doc)
    except (OverflowError, ValueError):
        return
    fuzz_schema.one_input(b"\x01" + raw)


# --------------------------------------------------------------------- configs


def toml_value(value: Any) -> str:
    """``value`` in TOML (enough of it for these tests)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.dates()
    | st.sampled_from(["127.0.0.1:7070", "unix:/tmp/x.sock", "http://h:1", "0o660", "json"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2)
    ),
    max_leaves=6,
)
ORIGIN_KEYS = sorted(origin_config._KEYS - {"write_tokens_file", "read_tokens_file"})


def toml_doc(values: dict[str, Any]) -> bytes:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in values.items()).encode()


@settings(max_examples=100, deadline=None)
@given(values=st.dictionaries(st.sampled_from([*ORIGIN_KEYS, "nope"]), toml_values, max_size=5))
def test_origin_config_files(values: dict[str, Any]) -> None:
    fuzz_config.one_input(b"\x00" + toml_doc(values))


SIDECAR_NUMBERS = [
    "poll_interval",
    "max_staleness",
    "ack_interval",
    "request_timeout",
    "socket_idle_timeout",
    "socket_view_max_age",
    "map_size_mb",
    "max_map_size_mb",
    "max_readers",
    "file_mode",
    "socket_workers",
    "socket_max_clients",
    "socket_max_request_bytes",
    "socket_mode",
]
SIDECAR_TEXTS = [
    "origin",
    "data",
    "replica_id",
    "health",
    "log_format",
    "ca_file",
    "serve_sync",
    "socket",
    "socket_group",
    "token",
]
finite = st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(
    numbers=st.dictionaries(
        st.sampled_from(SIDECAR_NUMBERS), finite | st.text(max_size=8) | st.booleans(), max_size=4
    ),
    texts=st.dictionaries(st.sampled_from(SIDECAR_TEXTS), toml_scalars, max_size=4),
    lists=st.dictionaries(
        st.sampled_from(["datasets", "relay_read_tokens"]),
        st.text(max_size=10) | st.lists(st.text(max_size=5) | st.integers(), max_size=3),
        max_size=2,
    ),
    flags=st.dictionaries(st.sampled_from(["hints", "durable"]), toml_scalars, max_size=2),
)
def test_sidecar_config_files(
    numbers: dict[str, Any], texts: dict[str, Any], lists: dict[str, Any], flags: dict[str, Any]
) -> None:
    # the shapes of the known, reported bugs (below) are left out here
    fuzz_config.one_input(b"\x01" + toml_doc({**numbers, **texts, **lists, **flags}))


@settings(max_examples=60, deadline=None)
@given(
    env=st.dictionaries(
        st.sampled_from(SIDECAR_NUMBERS + SIDECAR_TEXTS + ["datasets", "hints", "nope"]),
        st.text(
            alphabet=st.characters(codec="utf-8", blacklist_characters="\x00\n\r"),
            max_size=12,
        ),
        max_size=5,
    )
)
def test_sidecar_environment(env: dict[str, str]) -> None:
    fuzz_config.one_input(b"\x02" + "\n".join(f"{k}={v}" for k, v in env.items()).encode())


# --------------------------------------------------------------------- the harnesses' seeds


@pytest.mark.parametrize(
    "module",
    [fuzz_frames, fuzz_messages, fuzz_resp, fuzz_schema, fuzz_config, fuzz_sse],
    ids=lambda m: m.__name__.rsplit(".", 1)[1],
)
def test_every_harness_accepts_its_seeds(module: Any) -> None:
    for data in module.SEEDS:
        module.one_input(data)


# --------------------------------------------------------------------- regressions


def _origin_toml(tmp_path: Path, text: bytes) -> Path:
    path = tmp_path / "replicad.toml"
    path.write_bytes(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # found by fuzz/fuzz_config.py: tomllib's UnicodeDecodeError escaped
        (b'data = "\xff\xfe"\n', "not UTF-8"),
        # found by tests/test_fuzz_decoders.py: tokens that are not strings
        # were accepted, and the server then crashed encoding them
        (b"write_tokens = [1, 2]\n", "write_tokens must be a list of strings"),
        # a map LMDB cannot be asked for: an OverflowError at start-up
        (b"map_size_mb = 1\nmax_map_size_mb = 100000000000000000000\n", "max_map_size_mb"),
        # a table where a path belongs was turned into its repr
        (b"data = {a = 1}\n", "data must be a string"),
        (b"listen = 7070\n", "listen must be a string"),
    ],
)
def test_origin_config_errors_found_by_fuzzing(tmp_path: Path, text: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        origin_config.load(_origin_toml(tmp_path, text), environ={})


def test_frame_encoding_of_seed_messages_is_stable() -> None:
    # the harness seeds are real frames: a changed layout would silently
    # weaken the fuzzing that starts from them
    for msg in fuzz_messages.sample_messages():
        frame = encode_frame(*to_wire(msg))
        assert frame[:2] == b"RF"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"map_size_mb = inf\n", id="inf-int-OverflowError"),
        pytest.param(b"datasets = 5\n", id="datasets-int-TypeError"),
        pytest.param(b"relay_read_tokens = 5\n", id="tokens-int-TypeError"),
        pytest.param(b"poll_interval = nan\n", id="nan-interval-accepted"),
        pytest.param(b'replica_id = "\xff"\n', id="not-utf8-UnicodeDecodeError"),
    ],
)
def test_sidecar_config_errors_found_by_fuzzing(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError):
        sidecar_config.load(path, environ={"SIDECAR_DATASETS": "a"})
