"""The sidecar agent: an LMDB mirror of origin datasets, kept current by push
hints and idempotent pull diffs.

Built so far: :class:`Mirror`, the LMDB mirror that executes the replica
state machine's Apply batches (:mod:`replicad.replica`). The sync loop,
health, relay and local reads follow.
"""

from sidecar.mirror import DatasetHandle, Mirror
from sidecar.resp_commands import Dispatcher, Session, SyncStatus

# the socket server (sidecar.resp_server: SocketService, SocketSettings) is
# not imported here: it needs trio, which app processes reading the mirror
# do not
__all__ = ["DatasetHandle", "Dispatcher", "Mirror", "Session", "SyncStatus"]
