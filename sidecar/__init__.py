"""The sidecar agent: an LMDB mirror of origin datasets, kept current by push
hints and idempotent pull diffs, with zero-copy and unix-socket reads.

Not built yet: the sync decisions it will run live in
:mod:`replicad.replica` (the sans-IO core); see the project's issues.
"""
