"""The Redis protocol (RESP2, and the RESP3 replies a HELLO 3 client needs),
sans-IO: bytes in, commands out; replies in, bytes out.

Theory of operation
-------------------
:class:`CommandParser` is fed whatever arrives on a connection
(:meth:`CommandParser.receive_data`) and yields whole commands, each a list of
byte strings (:meth:`CommandParser.next_command`; None means "need more
bytes"). Clients send commands as RESP arrays of bulk strings
(``*2\\r\\n$4\\r\\nPING\\r\\n...``); ``redis-cli`` and telnet users may also
send *inline* commands (``PING\\r\\n``), which are split on spaces.
Pipelining is just several commands in one read: :meth:`CommandParser.commands`
returns every whole command buffered, taking a fast path (one ``split`` of
the buffer) for the canonical arrays clients send and the exact parser for
anything else; both give the same commands and the same errors.

Limits protect the server: a command of more than ``max_args`` arguments, a
bulk string longer than ``max_bulk``, or an inline line longer than
``max_inline`` is a :class:`RespError`, and so is an incomplete command that
already holds more than ``max_request`` bytes; so is anything malformed. After an
error the parser is poisoned (the connection should answer the error and
close), since the byte stream cannot be resynchronized.

Replies are encoded by :func:`encode` from Python values: ``str`` as a simple
string (``+OK``), :class:`Error` as an error (``-ERR ...``), ``int`` as an
integer, ``bytes`` as a bulk string, None as the null bulk string, lists as
arrays (None inside a list is a null bulk), :class:`Map` as a RESP3 map or,
in RESP2, a flat array of keys and values. ``protocol=3`` changes only what
RESP3 spells differently: null is ``_`` and maps are ``%``.
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


@dataclass(frozen=True)
class Map:
    """A map reply: ``%`` in RESP3, a flat array ``[k1, v1, k2, v2, ...]`` in
    RESP2 (how Redis answers HELLO or COMMAND DOCS to each)."""

    items: list[tuple[Reply, Reply]]


Reply = str | Error | int | bytes | None | Map | list["Reply"]


_HEADS = {b"*%d" % n: n for n in range(1, 1025)}
"""Canonical array headers of the commands the fast path takes."""
_LENGTHS = [b"$%d" % n for n in range(4097)]
"""Canonical bulk headers by length: the fast path takes commands of less
than 4 KiB of arguments, the exact parser the rest."""


class CommandParser:
    """Incremental parser of client commands (the limits are fixed when it
    is made)."""

    def __init__(
        self,
        *,
        max_args: int = 100_000,
        max_bulk: int = 1 << 20,
        max_inline: int = 64 << 10,
        max_request: int | None = None,
    ) -> None:
        self.max_args = max_args
        self.max_bulk = max_bulk
        self.max_inline = max_inline
        self.max_request = max_request
        self._buf = bytearray()
        self._pos = 0
        self._error: RespError | None = None
        # the fast path's bounds: arguments of a command it takes total less
        # than _small bytes (under max_bulk, max_request and _LENGTHS); a
        # three-argument command's framing is at most 31 bytes ("*3", three
        # "$4096" headers, CR LFs), so under _small3 it fits max_request too
        self._limit = max_request if max_request is not None else 1 << 62
        self._small = min(max_bulk, self._limit, len(_LENGTHS) - 1)
        self._small3 = min(self._small, self._limit - 31) if max_args >= 3 else -1

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def error(self) -> RespError | None:
        """The fault that poisoned the parser, if any."""
        return self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data`` (copied: the caller may reuse it)."""
        if self._error is not None:
            raise self._error
        if self._pos == len(self._buf):
            self._buf[:] = data  # everything before was consumed
            self._pos = 0
            return
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

    def commands(self) -> list[list[bytes]]:
        """Every whole command buffered, in order (empty: need more bytes).

        On malformed or oversized input it returns the whole commands before
        the fault, if any, and raises RespError on the next call (the parser
        stays poisoned); with none before it, it raises at once.
        """
        if self._error is not None:
            raise self._error
        out: list[list[bytes]] = []
        try:
            while True:
                if self._pos < len(self._buf) and self._buf[self._pos] == 42:  # "*"
                    self._fast(out)
                    if self._pos == len(self._buf):
                        break  # all taken (the usual case): nothing for the exact parser
                cmd = self._parse()
                if cmd is None:
                    break
                out.append(cmd)
            if self.max_request is not None and len(self._buf) - self._pos > self.max_request:
                raise RespError(f"request larger than {self.max_request} bytes")
        except RespError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def _fast(self, out: list[list[bytes]]) -> None:
        """Parse canonical commands (``*N``, then ``$len`` + data per
        argument, no CR LF inside the data) by splitting the buffer on CR LF;
        stop, leaving the rest to the exact parser, at the first thing that is
        not one, or that breaks a limit. A command accepted here is the only
        parse of those bytes."""
        pos = self._pos
        parts = (bytes(self._buf[pos:]) if pos else bytes(self._buf)).split(b"\r\n")
        last = len(parts) - 1  # parts[last] is not followed by CR LF: incomplete
        i = 0
        heads, lens = _HEADS, _LENGTHS
        max_args, max_request = self.max_args, self._limit
        small, small3 = self._small, self._small3
        append = out.append
        while i < last:
            head = parts[i]
            if head == b"*3":  # HGET, HEXISTS, ...: unrolled (small3 < 0 if max_args < 3)
                end = i + 7
                if end > last:
                    break
                h1, a1, h2, a2, h3, a3 = parts[i + 1 : end]
                n1, n2, n3 = len(a1), len(a2), len(a3)
                if n1 + n2 + n3 >= small3 or h1 != lens[n1] or h2 != lens[n2] or h3 != lens[n3]:
                    break
                append([a1, a2, a3])
                i = end
                continue
            count = heads.get(head)
            if count is None or count > max_args:
                break
            end = i + 1 + 2 * count
            if end > last:
                break
            args = parts[i + 2 : end : 2]
            size = sum(map(len, args))
            if (
                size >= small
                or parts[i + 1 : end : 2] != [lens[len(a)] for a in args]
                or sum(map(len, parts[i:end])) + 2 * (end - i) > max_request
            ):
                break
            append(args)
            i = end
        if i == last and not parts[last]:
            self._pos = len(self._buf)  # every byte taken
        elif i:
            self._pos += sum(map(len, parts[:i])) + 2 * i

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
                if self.max_request is not None and pos + size - self._pos > self.max_request:
                    raise RespError(f"request larger than {self.max_request} bytes")
                return None
            if self._buf[pos + size : pos + size + 2] != b"\r\n":
                raise RespError("bulk string not followed by CRLF")
            args.append(bytes(self._buf[pos : pos + size]))
            pos += size + 2
            if self.max_request is not None and pos - self._pos > self.max_request:
                raise RespError(f"request larger than {self.max_request} bytes")
        self._pos = pos
        if not args:
            raise RespError("empty command")
        return args


def encode(reply: Reply, protocol: int = 2) -> bytes:
    """The RESP2 (or, with ``protocol=3``, RESP3) bytes of one reply.
    TypeError for a value with no RESP form, ValueError for a simple string
    holding CR or LF."""
    out = bytearray()
    _encode(reply, out, protocol == 3)
    return bytes(out)


def _encode(reply: Reply, out: bytearray, resp3: bool) -> None:
    if reply is None:
        out += b"_\r\n" if resp3 else b"$-1\r\n"
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
            _encode(item, out, resp3)
    elif isinstance(reply, Map):
        out += b"%%%d\r\n" % len(reply.items) if resp3 else b"*%d\r\n" % (2 * len(reply.items))
        for key, value in reply.items:
            _encode(key, out, resp3)
            _encode(value, out, resp3)
    else:
        raise TypeError(f"no RESP2 form for {type(reply).__name__}")
