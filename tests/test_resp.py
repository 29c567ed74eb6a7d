"""The sans-IO RESP2 codec: whole buffers, byte-at-a-time, pipelining,
truncation, corruption and limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resp import CommandParser, Error, RespError, encode


def command_bytes(args: list[bytes]) -> bytes:
    return encode(list(args))  # a client's command is an array of bulk strings


def feed_all(data: bytes, step: int | None = None) -> list[list[bytes]]:
    parser = CommandParser()
    out: list[list[bytes]] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        parser.receive_data(chunk)
        while (cmd := parser.next_command()) is not None:
            out.append(cmd)
    assert parser.buffered == 0
    return out


args_st = st.lists(st.binary(max_size=40), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(commands=st.lists(args_st, min_size=1, max_size=5), step=st.integers(1, 7))
def test_pipelined_commands_whole_and_in_pieces(commands: list[list[bytes]], step: int) -> None:
    data = b"".join(command_bytes(c) for c in commands)
    assert feed_all(data) == commands
    assert feed_all(data, step) == commands
    assert feed_all(data, 1) == commands


def test_inline_commands_and_blank_lines() -> None:
    assert feed_all(b"PING\r\n\r\nHGET  up  user:1\r\n") == [[b"PING"], [b"HGET", b"up", b"user:1"]]


@settings(max_examples=100, deadline=None)
@given(args=args_st)
def test_every_truncation_waits_for_more(args: list[bytes]) -> None:
    data = command_bytes(args)
    for cut in range(1, len(data)):
        parser = CommandParser()
        parser.receive_data(data[:cut])
        assert parser.next_command() is None
        parser.receive_data(data[cut:])
        assert parser.next_command() == args


@pytest.mark.parametrize(
    "data",
    [
        b"*x\r\n",
        b"*-2\r\n",
        b"*1\r\n+PING\r\n",
        b"*1\r\n$z\r\nPING\r\n",
        b"*1\r\n$4\r\nPINGXX",
        b"*1\r\n$-1\r\n",
        b"*0\r\n",
        b"*200000\r\n",
        b"*1\r\n$99999999\r\n",
    ],
)
def test_malformed_input_is_an_error_and_poisons(data: bytes) -> None:
    parser = CommandParser()
    parser.receive_data(data)
    with pytest.raises(RespError):
        parser.next_command()
    with pytest.raises(RespError):
        parser.next_command()
    with pytest.raises(RespError):
        parser.receive_data(b"PING\r\n")


def test_limits() -> None:
    parser = CommandParser(max_inline=16)
    parser.receive_data(b"X" * 40)
    with pytest.raises(RespError, match="longer"):
        parser.next_command()
    parser = CommandParser(max_args=2)
    parser.receive_data(b"A B C\r\n")
    with pytest.raises(RespError, match="too many"):
        parser.next_command()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    parser = CommandParser(max_args=8, max_bulk=64, max_inline=64)
    parser.receive_data(data)
    try:
        while parser.next_command() is not None:
            pass
    except RespError:
        pass


def test_encode_replies() -> None:
    assert encode("OK") == b"+OK\r\n"
    assert encode(Error("ERR no such key")) == b"-ERR no such key\r\n"
    assert encode(Error("ERR two\nlines")) == b"-ERR two lines\r\n"
    assert encode(42) == b":42\r\n"
    assert encode(b"v") == b"$1\r\nv\r\n"
    assert encode(None) == b"$-1\r\n"
    assert encode([b"a", None, 1, [b"b"]]) == b"*4\r\n$1\r\na\r\n$-1\r\n:1\r\n*1\r\n$1\r\nb\r\n"
    with pytest.raises(ValueError):
        encode("bad\r\n")
    with pytest.raises(TypeError):
        encode(True)
