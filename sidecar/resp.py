"""The Redis protocol (RESP2), sans-IO: bytes in, commands out; replies in,
bytes out.

Theory of operation
-------------------
:class:`CommandParser` is fed whatever arrives on a connection
(:meth:`CommandParser.receive_data`) and yields whole commands, each a list of
byte strings (:meth:`CommandParser.next_command`; None means "need more
bytes"). Clients send commands as RESP arrays of bulk strings
(``*2\\r\\n$4\\r\\nPING\\r\\n...``); ``redis-cli`` and telnet users may also
send *inline* commands (``PING\\r\\n``), which are split on spaces.
Pipelining is just several commands in one read.

Limits protect the server: a command of more than ``max_args`` arguments, a
bulk string longer than ``max_bulk``, or an inline line longer than
``max_inline`` is a :class:`RespError`; so is anything malformed. After an
error the parser is poisoned (the connection should answer the error and
close), since the byte stream cannot be resynchronized.

Replies are encoded by :func:`encode` from Python values: ``str`` as a simple
string (``+OK``), :class:`Error` as an error (``-ERR ...``), ``int`` as an
integer, ``bytes`` as a bulk string, None as the null bulk string, lists as
arrays (None inside a list is a null bulk).
"""

from __future__ import annotations

from dataclasses import dataclass

from replicad.errors import ReplicadError


class RespError(ReplicadError):
    """Bytes from a client that are not valid RESP, or exceed a limit."""


@dataclass(frozen=True)
class Error:
    """An error reply: ``-<message>``; the message should start with a code
    such as ``ERR`` or ``WRONGTYPE``."""

    message: str


Reply = str | Error | int | bytes | None | list["Reply"]


class CommandParser:
    """Incremental parser of client commands."""

    def __init__(
        self, *, max_args: int = 100_000, max_bulk: int = 1 << 20, max_inline: int = 64 << 10
    ) -> None:
        self.max_args = max_args
        self.max_bulk = max_bulk
        self.max_inline = max_inline
        self._buf = bytearray()
        self._pos = 0
        self._error: RespError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_command(self) -> list[bytes] | None:
        """The next whole command, or None until more bytes arrive. Raises
        RespError (and stays poisoned) for malformed or oversized input."""
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RespError as exc:
            self._error = exc
            raise

    def _line(self, start: int, limit: int) -> tuple[bytes, int] | None:
        end = self._buf.find(b"\r\n", start, start + limit + 2)
        if end < 0:
            if len(self._buf) - start > limit + 1:
                raise RespError(f"line longer than {limit} bytes")
            return None
        return bytes(self._buf[start:end]), end + 2

    def _int(self, text: bytes, what: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise RespError(f"invalid {what}: {text[:32]!r}") from None
        return value

    def _parse(self) -> list[bytes] | None:
        while True:
            if self._pos >= len(self._buf):
                return None
            if self._buf[self._pos] != ord("*"):
                found = self._line(self._pos, self.max_inline)
                if found is None:
                    return None
                line, self._pos = found
                args = line.split()
                if not args:
                    continue  # an empty line between commands
                if len(args) > self.max_args:
                    raise RespError("too many arguments")
                return args
            return self._array()

    def _array(self) -> list[bytes] | None:
        found = self._line(self._pos + 1, 20)
        if found is None:
            return None
        header, pos = found
        count = self._int(header, "array length")
        if count < 0 or count > self.max_args:
            raise RespError(f"array of {count} elements is not a command")
        args: list[bytes] = []
        for _ in range(count):
            if pos >= len(self._buf):
                return None
            if self._buf[pos] != ord("$"):
                raise RespError("expected a bulk string ($) in a command")
            found = self._line(pos + 1, 20)
            if found is None:
                return None
            size_text, pos = found
            size = self._int(size_text, "bulk length")
            if size < 0 or size > self.max_bulk:
                raise RespError(f"bulk string of {size} bytes is not allowed")
            if len(self._buf) < pos + size + 2:
                return None
            if self._buf[pos + size : pos + size + 2] != b"\r\n":
                raise RespError("bulk string not followed by CRLF")
            args.append(bytes(self._buf[pos : pos + size]))
            pos += size + 2
        self._pos = pos
        if not args:
            raise RespError("empty command")
        return args


def encode(reply: Reply) -> bytes:
    """The RESP2 bytes of one reply."""
    out = bytearray()
    _encode(reply, out)
    return bytes(out)


def _encode(reply: Reply, out: bytearray) -> None:
    if reply is None:
        out += b"$-1\r\n"
    elif isinstance(reply, bool):
        raise TypeError("booleans have no RESP2 form; send an int")
    elif isinstance(reply, str):
        if "\r" in reply or "\n" in reply:
            raise ValueError("a simple string cannot hold CR or LF")
        out += b"+" + reply.encode() + b"\r\n"
    elif isinstance(reply, Error):
        message = reply.message.replace("\r", " ").replace("\n", " ")
        out += b"-" + message.encode() + b"\r\n"
    elif isinstance(reply, int):
        out += b":%d\r\n" % reply
    elif isinstance(reply, bytes):
        out += b"$%d\r\n" % len(reply) + reply + b"\r\n"
    elif isinstance(reply, list):
        out += b"*%d\r\n" % len(reply)
        for item in reply:
            _encode(item, out)
    else:
        raise TypeError(f"no RESP2 form for {type(reply).__name__}")
