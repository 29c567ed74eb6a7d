"""Deterministic sync-simulation harness (see ``docs/simulations.md``).

It drives the real protocol core (:mod:`replicad.replica`,
:mod:`replicad.responder`, :mod:`replicad.memory`, the real frame encoding)
from its own discrete-event loop, over a simulated network with faults,
reproducible from one seed, and checks invariants as it runs.

Entry points: ``python -m simulations run|swarm|study|scenarios``
(:mod:`simulations.cli`); in code, :func:`simulations.world.build` a world
from a :class:`simulations.scenarios.Scenario` and a seed, ``.run()`` it, and
:func:`simulations.report.build_report` the result.
"""
