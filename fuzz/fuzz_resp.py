"""Fuzz harness: the RESP command parser (``sidecar/resp.py``).

The first input byte picks the read size (1 to 31 bytes, or all at once);
the rest is what a client sends. Small limits (64 arguments, 512-byte bulk
strings, 256-byte inline lines, 2 KiB requests) so they are reached. Checks:

* the parser returns commands or raises
  :class:`~sidecar.resp.RespError` (a ReplicadError), nothing else, and stays
  poisoned after an error;
* its two paths -- :meth:`CommandParser.commands` (with its split fast path)
  and :meth:`CommandParser.next_command` -- give the same commands and the
  same verdict, fed the same pieces, as the module promises;
* every command is a non-empty list of byte strings within the limits.
"""

from __future__ import annotations

import sys

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    from sidecar.resp import CommandParser, RespError, encode

LIMITS = {"max_args": 64, "max_bulk": 512, "max_inline": 256, "max_request": 2048}


def _by_commands(pieces: list[bytes]) -> tuple[list[list[bytes]], bool]:
    parser = CommandParser(**LIMITS)
    out: list[list[bytes]] = []
    try:
        for piece in pieces:
            parser.receive_data(piece)
            out.extend(parser.commands())
        out.extend(parser.commands())
    except RespError:
        try:
            parser.commands()
        except RespError:
            return out, True
        raise driver.FuzzFindingError("commands(): not poisoned after an error") from None
    return out, False


def _by_next(pieces: list[bytes]) -> tuple[list[list[bytes]], bool]:
    parser = CommandParser(**LIMITS)
    out: list[list[bytes]] = []
    try:
        for piece in pieces:
            parser.receive_data(piece)
            while (cmd := parser.next_command()) is not None:
                out.append(cmd)
    except RespError:
        try:
            parser.next_command()
        except RespError:
            return out, True
        raise driver.FuzzFindingError("next_command(): not poisoned after an error") from None
    return out, False


def one_input(data: bytes) -> None:
    if not data:
        return
    stream = data[1:]
    step = data[0] % 32 or len(stream) + 1
    pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
    fast = _by_commands(pieces)
    exact = _by_next(pieces)
    if fast != exact:
        raise driver.FuzzFindingError(f"commands() gave {fast}, next_command() gave {exact}")
    for cmd in fast[0]:
        if not cmd or not all(type(a) is bytes for a in cmd) or len(cmd) > LIMITS["max_args"]:
            raise driver.FuzzFindingError(f"bad command {cmd!r}")


def seeds() -> list[bytes]:
    cmds = [
        [b"PING"],
        [b"HGET", b"user_profile", b"user:1"],
        [b"HMGET", b"up", b"a", b"b", b"c"],
        [b"INFO"],
        [b"SET", b"k", b"v" * 300],
    ]
    wire = b"".join(encode(list(c)) for c in cmds)
    return [
        b"\x00" + wire,
        b"\x05" + wire,
        b"\x01PING\r\nHGET up k\r\n\r\n",
        b"\x00*3\r\n$4\r\nHGET",
    ]


SEEDS = seeds()

if __name__ == "__main__":
    sys.exit(driver.main("fuzz_resp", one_input, SEEDS))
