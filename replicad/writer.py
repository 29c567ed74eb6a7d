"""A thread-safe writer that coalesces concurrent single-record writes into
batches: many writers' records share one HTTP request and one version.

Theory of operation
-------------------
Each write through the origin's HTTP API costs the origin about a
millisecond and a half of CPU in request handling, whatever the batch
holds, and every version it commits is pushed to every subscribed sidecar.
Applications that produce records one at a time (a feature pipeline
updating one user per event) would spend most of the origin on that fixed
cost. :class:`BatchingWriter` sends one request at a time (one writer per
dataset, shared by every thread: :meth:`OriginClient.writer` hands out the
same one for a dataset each time); the writes that arrive while a request
is in flight wait and go together in the next one (adaptive batching, as
group commit does for fsync: there is no timer, so a lone write is sent at
once and a burst shares one request).

* **Ordering.** Writes are sent in the order they were submitted, one
  request in flight per writer, so a later write of a key never lands before
  an earlier one. A batch never holds the same key twice: a second write of
  a key starts the next batch, so every write is visible at some version
  exactly as written (none is folded into a later one).
* **Acknowledgement.** :meth:`upsert` and :meth:`delete` block until the
  origin has durably committed the batch holding the write and return a
  :class:`WriteAck` naming the version, the same for every write of that
  batch.
* **Errors stay with their write.** The origin applies a batch whole or not
  at all. When it refuses a batch because of what is in it (a schema
  violation, a key too long, a malformed value: :class:`RecordError`,
  :class:`InvalidKeyError`, :class:`BadRequestError`), the batch is split in
  halves, each sent in turn, down to the write at fault: each caller gets
  its own answer, one bad record does not fail its neighbours, and finding
  it costs a few requests, not one per write. Errors about the request as a
  whole (the origin unreachable, authentication, an unknown dataset, a
  storage failure, an acknowledgement that cannot be read) are raised to
  every caller of the batch, and nothing more of it is resent: after
  :class:`OriginUnavailableError` the batch may or may not have been
  committed, exactly as for a single write. A write whose caller is
  interrupted (a KeyboardInterrupt, say) before it was sent is taken out of
  the queue, never sent later; one interrupted in flight ends with
  :class:`OriginUnavailableError` (outcome unknown) for its batch.
* **No thread of its own.** The first caller that finds no request in
  flight sends the pending batch from its own thread (the leader) and keeps
  sending until its own write is answered; then the next waiting caller
  takes over. Nothing runs when nobody writes, and nothing needs closing.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from replicad.errors import (
    BadRequestError,
    ConfigError,
    InvalidKeyError,
    OriginUnavailableError,
    ProtocolError,
    RecordError,
)

if TYPE_CHECKING:
    from replicad.client import OriginClient

__all__ = ["BatchingWriter", "WriteAck"]

DEFAULT_MAX_BATCH = 1000
"""Default bound on the writes of one request."""


@dataclass(frozen=True)
class WriteAck:
    """The origin's acknowledgement of one write: the dataset's ``epoch``
    (hex) and the ``version`` that holds it, and how many writes shared its
    request (``batched``)."""

    dataset: str
    epoch: str
    version: int
    batched: int


_SPLIT_ON = (RecordError, InvalidKeyError, BadRequestError)
"""Refusals caused by what a batch holds: the batch is then split."""


class _Write:
    __slots__ = ("ack", "delete", "done", "error", "key", "record")

    def __init__(self, key: bytes, record: Any, delete: bool) -> None:
        self.key = key
        self.record = record
        self.delete = delete
        self.ack: WriteAck | None = None
        self.error: BaseException | None = None
        self.done = False


def key_bytes(key: str | bytes) -> bytes:
    """A key as the bytes the origin stores (str as UTF-8)."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    raise BadRequestError(f"a key must be str or bytes, got {type(key).__name__}")


class BatchingWriter:
    """Coalesce concurrent writes to one dataset of ``client``'s origin
    (see the module doc). ``max_batch`` bounds the writes of one request.

    Thread-safe: share one writer between every thread writing the dataset.
    """

    def __init__(
        self, client: OriginClient, dataset: str, *, max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, not {max_batch!r}")
        self.client = client
        self.dataset = dataset
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[_Write] = []
        self._sending = False
        self.requests = 0
        """Requests sent so far (batches, and writes resent alone)."""

    def upsert(self, key: str | bytes, record: Mapping[str, Any] | bytes | str) -> WriteAck:
        """Write ``record`` (typed: a mapping of field values; opaque: the
        value) under ``key``; return once it is durably committed."""
        return self._submit(_Write(key_bytes(key), record, False))

    def delete(self, key: str | bytes) -> WriteAck:
        """Delete ``key`` (a no-op version when it is absent); return once
        committed."""
        return self._submit(_Write(key_bytes(key), None, True))

    # ------------------------------------------------------------ internals

    def _submit(self, write: _Write) -> WriteAck:
        with self._cond:
            self._pending.append(write)
            try:
                while not write.done and self._sending:
                    self._cond.wait()
            except BaseException:
                self._withdraw(write)  # interrupted while waiting
                raise
            if not write.done:
                self._sending = True  # this thread leads until its write is answered
        if not write.done:
            try:
                while not write.done:
                    batch: list[_Write] = []
                    try:
                        with self._cond:
                            batch = self._take()
                        self._send(batch)
                    finally:
                        _settle_unanswered(batch)
                        with self._cond:
                            self._cond.notify_all()
            finally:
                with self._cond:
                    self._withdraw(write)  # the leader was interrupted before its turn
                    self._sending = False
                    self._cond.notify_all()
        if write.error is not None:
            raise _for_this_caller(write.error)
        assert write.ack is not None
        return write.ack

    def _withdraw(self, write: _Write) -> None:
        """Take a write whose caller is gone out of the queue, if it was never
        sent (so it is known not to be committed); called with the lock held."""
        if not write.done and write in self._pending:
            self._pending.remove(write)
            write.error = OriginUnavailableError("the write was interrupted before it was sent")
            write.done = True

    def _take(self) -> list[_Write]:
        """The next batch from the front of the queue: at most ``max_batch``
        writes, no key twice (called with the lock held)."""
        keys: set[bytes] = set()
        n = 0
        for write in self._pending:
            if n == self.max_batch or write.key in keys:
                break
            keys.add(write.key)
            n += 1
        batch, self._pending[:n] = self._pending[:n], []
        return batch

    def _send(self, batch: list[_Write]) -> BaseException | None:
        """Send ``batch`` and settle its writes. A refusal for the batch's
        content splits it in halves, each sent in turn, down to the write
        at fault; an error of the request as a whole settles every write
        not yet settled with it, and is returned so no more is resent."""
        if not batch:
            return None
        upserts = {w.key: w.record for w in batch if not w.delete}
        deletes = [w.key for w in batch if w.delete]
        self.requests += 1
        try:
            result = self.client.write(self.dataset, upserts, deletes)
        except _SPLIT_ON as exc:
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].done = True
                return None
            half = len(batch) // 2
            fatal = self._send(batch[:half])
            if fatal is None:
                return self._send(batch[half:])
            _settle(batch[half:], fatal)
            return fatal
        except Exception as exc:  # the request as a whole failed
            _settle(batch, exc)
            return exc
        try:
            ack = WriteAck(self.dataset, str(result["epoch"]), int(result["version"]), len(batch))
        except (KeyError, TypeError, ValueError) as exc:
            # committed or not, we cannot tell: never resent
            error = ProtocolError(f"write {self.dataset}: unreadable acknowledgement: {exc!r}")
            _settle(batch, error)
            return error
        for write in batch:
            write.ack = ack
            write.done = True
        return None


def _settle(batch: list[_Write], error: BaseException) -> None:
    for write in batch:
        if not write.done:
            write.error = error
            write.done = True


def _settle_unanswered(batch: list[_Write]) -> None:
    """After an interruption mid-request: the outcome is unknown."""
    _settle(
        batch,
        OriginUnavailableError(
            "the write was interrupted before the origin answered; "
            "it may or may not have been committed"
        ),
    )


def _for_this_caller(error: BaseException) -> BaseException:
    """A copy of ``error`` for one of the callers of a batch (one exception
    object raised in many threads would collect all their tracebacks)."""
    try:
        own = copy.copy(error)
    except Exception:  # an exception that cannot be copied: share it
        return error
    own.__cause__ = error.__cause__
    return own
