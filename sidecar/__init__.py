"""The sidecar agent: an LMDB mirror of origin datasets, kept current by push
hints and idempotent pull diffs.

The public API: :class:`Reader` (and its :class:`Record`, :class:`Snapshot`,
:class:`StaleDataError`) for app processes that read the mirror in place;
:class:`Mirror`, the LMDB mirror that executes the replica state machine's
Apply batches (:mod:`replicad.replica`); the RESP command layer
(:class:`Dispatcher`, :class:`Session`, :class:`SyncStatus`). The agent itself
runs as ``sidecar run`` (:mod:`sidecar.main`).
"""

from sidecar.mirror import DatasetHandle, Mirror
from sidecar.reader import Reader, Record, Snapshot, StaleDataError
from sidecar.resp_commands import Dispatcher, Session, SyncStatus

# the socket server (sidecar.resp_server: SocketService, SocketSettings) is
# not imported here: it needs trio, which app processes reading the mirror
# do not
__all__ = [
    "DatasetHandle",
    "Dispatcher",
    "Mirror",
    "Reader",
    "Record",
    "Session",
    "Snapshot",
    "StaleDataError",
    "SyncStatus",
]
