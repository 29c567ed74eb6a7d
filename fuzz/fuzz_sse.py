"""Fuzz harness: the sidecar's reading of a hint stream
(``replicad/client.py``: :class:`SSEParser`, ``hint_from_json`` and the
``diff`` events' base64 frames).

The first input byte picks the read size; the rest is the
``text/event-stream`` body an origin (or a relay, or anything at that
address) sends. Each event is handled as :meth:`AsyncSyncClient.hints`
handles it. Checks: only :class:`~replicad.errors.ProtocolError` or
:class:`~replicad.errors.FrameError` ever escape, and the parser gives the
same events whether the stream arrives whole or in pieces.
"""

from __future__ import annotations

import base64
import json
import sys

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    from replicad.client import AsyncSyncClient, SSEParser, hint_from_json
    from replicad.errors import FrameError, ProtocolError
    from replicad.frames import encode_frame
    from replicad.merkle import Digest
    from replicad.messages import Cursor, DiffPush, to_wire


class _Shared:
    client: AsyncSyncClient | None = None


def _client() -> AsyncSyncClient:
    if _Shared.client is None:  # never sends anything: only its event decoding is used
        _Shared.client = AsyncSyncClient("http://127.0.0.1:9", max_frame_bytes=1 << 16)
    return _Shared.client


def _events(stream: bytes, step: int) -> list[tuple[str, str]]:
    parser = SSEParser(max_line=1024)
    out: list[tuple[str, str]] = []
    try:
        for i in range(0, len(stream), step):
            out.extend((e.event, e.data) for e in parser.feed(stream[i : i + step]))
    except ProtocolError:
        out.append(("<error>", ""))
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    stream = data[1:]
    step = data[0] % 24 or len(stream) + 1
    events = _events(stream, step)
    whole = _events(stream, len(stream) + 1)
    if events != whole and not (events[-1:] == whole[-1:] == [("<error>", "")]):
        raise driver.FuzzFindingError(f"pieces of {step}: {events} whole: {whole}")
    for kind, payload in events:
        try:
            if kind == "diff":
                _client()._push_of(payload)
            elif kind == "hint":
                try:
                    doc = json.loads(payload)
                except ValueError:
                    continue  # the client raises ProtocolError here
                hint_from_json(doc)
        except (ProtocolError, FrameError):
            pass


def seeds() -> list[bytes]:
    c = Cursor(bytes(range(16)), 3)
    push = DiffPush("up", c, Cursor(c.epoch, 4), Digest(1, 5), ((b"k", b"v"),), (b"d",), 0, None)
    frame = base64.b64encode(encode_frame(*to_wire(push))).decode()
    hint = json.dumps(
        {"dataset": "up", "epoch": c.epoch.hex(), "version": 3, "digest": Digest(1, 5).hex()}
    )
    body = f": ping\n\nevent: hint\ndata: {hint}\n\nevent: diff\ndata: {frame}\r\n\r\n"
    return [b"\x00" + body.encode(), b"\x03" + body.replace("\n", "\r").encode()]


SEEDS = seeds()

if __name__ == "__main__":
    sys.exit(driver.main("fuzz_sse", one_input, SEEDS))
