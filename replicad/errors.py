"""The one exception hierarchy of the project.

Every error raised on purpose by ``replicad`` or ``sidecar`` derives from
:class:`ReplicadError`. Errors of dependencies (msgpack, snappy, lmdb, httpx)
are translated into these at the boundary where they occur
(``raise ProjectError(...) from exc``), so callers never need to catch a
third-party type.

The tree, by the layer that raises:

* :class:`CodecError` -- records, schemas and keys (the record codec).
* :class:`FrameError` -- bytes from the wire that are not a valid frame.
* :class:`ProtocolError` -- a well-formed frame whose message breaks the sync
  protocol (wrong shape, impossible values, an answer to a question not asked).
* :class:`CursorError` -- a replica cursor that the origin cannot serve a diff
  for; the replica should fall back to Merkle sync or a snapshot.
* :class:`MerkleError` -- Merkle queries that do not fit the tree's geometry.
* :class:`StorageError` -- the durable store (LMDB) failed; raised by adapters.
* :class:`ConfigError` -- a configuration value (constructor argument, policy
  name) is invalid.
* :class:`VersionOrderError` -- a write batch was given a version that does not
  follow the current one.
* :class:`CorruptStateError` -- persisted state (for example the version queue)
  cannot be decoded or is inconsistent.
"""

from __future__ import annotations


class ReplicadError(Exception):
    """Base class of every error the project raises on purpose."""


# --- codec -------------------------------------------------------------------


class CodecError(ReplicadError):
    """A record, key or schema could not be encoded or decoded."""


class SchemaError(CodecError):
    """A schema definition is invalid, or an evolution is not append-only."""


class RecordError(CodecError):
    """A record does not fit its dataset's schema.

    Raised before anything is written: a batch containing such a record is
    rejected whole.
    """


class FieldTypeError(RecordError):
    """A field's value has the wrong type (or is null in a non-nullable field)."""


class UnknownFieldError(RecordError):
    """A record names a field that the schema does not have."""


class MissingFieldError(RecordError):
    """A record lacks a field that has no default and is not nullable."""


class InvalidKeyError(CodecError):
    """A key is not acceptable: empty, not bytes, or longer than 507 bytes."""


class KeyTooLongError(InvalidKeyError):
    """A key is longer than 507 bytes (LMDB's 511, less the Merkle leaf prefix)."""


class ValueTooLargeError(CodecError):
    """An encoded value is larger than the dataset's configured limit."""


class CorruptRecordError(CodecError):
    """Stored or received record bytes cannot be decoded."""


# --- wire frames -------------------------------------------------------------


class FrameError(ReplicadError):
    """Bytes received from the wire do not form a valid frame.

    The decoder that raised it has discarded nothing that was valid before the
    error; the request that produced the bytes should be retried as a whole.
    """


class FrameChecksumError(FrameError):
    """A frame's checksum does not match its contents (corruption in transit)."""


class FrameTruncatedError(FrameError):
    """The input ended in the middle of a frame."""


class FrameTooLargeError(FrameError):
    """A frame declares a length above the decoder's limit."""


class FrameFormatError(FrameError):
    """A frame header or payload is malformed (bad magic, flags, msgpack, snappy)."""


# --- sync protocol -----------------------------------------------------------


class ProtocolError(ReplicadError):
    """A peer sent a message that violates the sync protocol."""


class CursorError(ReplicadError):
    """A diff cannot be served for the replica's cursor.

    The replica should fall back to Merkle sync (if it holds data) or to a
    snapshot (if it holds none).
    """


class EpochMismatchError(CursorError):
    """The cursor names an epoch the origin does not have (history was lost)."""


class CursorAheadError(CursorError):
    """The cursor's version is ahead of the origin's current version."""


class HistoryTruncatedError(CursorError):
    """The cursor is older than the oldest version the version queue covers."""


class VersionOrderError(ReplicadError):
    """A write batch was pushed with a version other than the current one + 1.

    Raised by :meth:`replicad.version_queue.VersionQueue.push` before anything
    changes; it is a bug in the caller (versions are assigned by the origin).
    """


class MerkleError(ReplicadError):
    """A Merkle query does not fit the tree's geometry (bad level or index)."""


# --- adapters ----------------------------------------------------------------


class StorageError(ReplicadError):
    """The durable store failed (translated from lmdb errors by adapters)."""


class MapFullError(StorageError):
    """The LMDB map is full; the write was rolled back whole."""


class CorruptStateError(ReplicadError):
    """Persisted state (such as the version queue) cannot be decoded.

    Raised when loading bytes or records that are malformed or inconsistent
    with each other; nothing is loaded.
    """


# --- configuration -----------------------------------------------------------


class ConfigError(ReplicadError):
    """A configuration value is invalid (out of range, wrong type, unknown name).

    Raised by constructors and lookups before any state is created.
    """


class SyncUsageError(ReplicadError):
    """An adapter drove the replica state machine out of turn (for example
    reported an Apply that was never handed out). A bug in the caller, not the
    peer; the machine's state is unchanged."""


# --- origin service ----------------------------------------------------------


class UnknownDatasetError(ReplicadError):
    """A request names a dataset that does not exist (HTTP 404)."""


class DatasetExistsError(ReplicadError):
    """A dataset of that name already exists (HTTP 409)."""


class RetryLaterError(ReplicadError):
    """The server cannot answer this now but will soon (HTTP 503): a relay
    asked for Merkle leaf listings while it is still building its leaf
    index. Clients see OriginUnavailableError and retry."""


class BadRequestError(ReplicadError):
    """A request body or parameter is malformed: not JSON/msgpack, wrong shape,
    bad dataset name, unsupported content type (HTTP 400/415). Nothing of the
    request was applied."""


class StaleEncodingError(ReplicadError):
    """A write batch encoded ahead of its commit (by an ingest worker) used a
    schema version that is no longer the latest. The HTTP layer encodes the
    body again and retries; a client never sees this error."""


class AuthError(ReplicadError):
    """A request lacks a valid bearer token (HTTP 401) or its token may not do
    this (HTTP 403); ``status`` says which."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class OriginUnavailableError(ReplicadError):
    """The origin could not be reached or did not answer: connection refused or
    reset, DNS failure, timeout, TLS failure, a connection closed mid-answer,
    or an HTTP 5xx other than 507 (translated from httpx errors by
    :mod:`replicad.client`). A write that failed this way may or may not have
    been committed (check the dataset's version before retrying a non-idempotent
    batch); sync pulls are idempotent and may simply be retried."""
