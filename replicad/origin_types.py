"""Plain data passed between the origin's layers (store, service, HTTP, CLI).

No I/O here; JSON shapes (``to_json``) are the ones the HTTP API returns and
``docs/api.md`` documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicad.errors import BadRequestError, ReplicadError
from replicad.merkle import Digest, Geometry
from replicad.messages import Cursor, DiffPush
from replicad.schema import Schema

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_dataset_name(name: object) -> str:
    """Return ``name`` if it is a valid dataset name (1-64 chars of
    ``[A-Za-z0-9_.-]``, starting with a letter or digit); else BadRequestError."""
    if not isinstance(name, str) or not DATASET_NAME.match(name):
        raise BadRequestError(
            f"invalid dataset name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class DatasetSpec:
    """What ``create_dataset`` needs. ``schema`` None means opaque values."""

    name: str
    schema: Schema | None
    geometry: Geometry = field(default_factory=Geometry)
    max_entries: int = 1024
    policy: str = "binary-counter"
    max_value_bytes: int = 1 << 20
    compress: bool = True


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's state at one version, as listed by the API."""

    name: str
    schema: Schema | None
    schema_versions: int
    cursor: Cursor
    digest: Digest
    meta_revision: int
    queue_floor: int
    queue_entries: int
    geometry: Geometry
    policy: str
    max_entries: int
    max_value_bytes: int

    @property
    def kind(self) -> str:
        return "opaque" if self.schema is None else "typed"

    def to_json(self, *, with_schema: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "epoch": self.cursor.epoch.hex(),
            "version": self.cursor.version,
            "records": self.digest.count,
            "digest": self.digest.to_bytes().hex(),
            "meta_revision": self.meta_revision,
            "queue": {
                "floor": self.queue_floor,
                "entries": self.queue_entries,
                "max_entries": self.max_entries,
                "policy": self.policy,
            },
            "merkle": {"fanout": self.geometry.fanout, "depth": self.geometry.depth},
            "max_value_bytes": self.max_value_bytes,
        }
        if with_schema:
            out["schema"] = None if self.schema is None else self.schema.to_json()
        return out


@dataclass(frozen=True)
class EncodingBasis:
    """What encoding a dataset's records needs, as of its last commit: the
    definition replicas receive (schemas, dictionary, value limit; see
    docs/FORMAT.md) at ``meta_revision``, and whether records are compressed.
    ``store`` names the store (its directory): a dataset's dictionary only
    grows within one store, so a worker may extend the codec it has."""

    store: str
    dataset: str
    meta_revision: int
    definition: bytes
    compress: bool


@dataclass(frozen=True)
class EncodeFailure:
    """In place of a record an ingest worker could not encode: the error
    the committer raises when it reaches that record (so the batch fails
    exactly as without a worker, and the record itself does not travel
    back)."""

    error: ReplicadError


@dataclass(frozen=True)
class PreEncoded:
    """Records of a write batch encoded before its commit, outside the
    committer (by an ingest worker, :mod:`replicad.ingest`).

    ``records`` maps every upserted key, in body order, to its canonical
    bytes, or to None for a record the worker left to the committer in the
    batch's ``upserts``: one with a string new to the dictionary, or an
    :class:`EncodeFailure` for one that failed to encode. The encoding used the dataset's definition
    at ``meta_revision`` with schema version ``schema_version``: the store
    accepts it while that version is still the latest (the dictionary only
    grows, so codes of an older revision stay valid) and raises
    StaleEncodingError otherwise.
    """

    meta_revision: int
    schema_version: int
    records: Mapping[bytes, bytes | None]


@dataclass(frozen=True)
class WriteBatch:
    """One write batch: becomes one version when committed.

    ``upserts`` maps key bytes to a record (a mapping of field values, for a
    typed dataset) or to value bytes (opaque). With ``replace``, the batch is
    the whole dataset: keys absent from it are deleted, and only changed and
    deleted keys are published (``deletes`` must then be empty).

    With ``pre_encoded``, most records arrive as canonical bytes there and
    ``upserts`` holds only those the pre-encoding left to the committer.
    """

    dataset: str
    upserts: Mapping[bytes, Any]
    deletes: Sequence[bytes] = ()
    replace: bool = False
    pre_encoded: PreEncoded | None = None


@dataclass(frozen=True)
class WriteResult:
    dataset: str
    cursor: Cursor
    digest: Digest
    upserted: int
    deleted: int
    unchanged: int = 0
    push: DiffPush | None = field(default=None, compare=False, repr=False)
    """The batch's changes as the origin pushes them to replicas (None when
    larger than the store's push limit); not part of the API answer."""

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "epoch": self.cursor.epoch.hex(),
            "version": self.cursor.version,
            "digest": self.digest.to_bytes().hex(),
            "upserted": self.upserted,
            "deleted": self.deleted,
            "unchanged": self.unchanged,
        }


@dataclass(frozen=True)
class FleetEntry:
    """One replica as the origin last heard of it (through ``/v1/ack``)."""

    replica: str
    last_seen: float
    address: str
    datasets: Mapping[str, Cursor]
    info: Mapping[str, Any] = field(default_factory=dict)
