"""Deterministic sync-simulation harness (not built yet).

It will drive the real protocol core (:mod:`replicad.replica`,
:mod:`replicad.responder`, :mod:`replicad.memory`) from its own event loop.
"""
