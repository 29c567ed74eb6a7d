"""Shared pieces of the benchmark suite: one row type and a median timer.

Every benchmark module exposes ``rows(quick: bool) -> list[Row]``. The runner
(``python -m benchmarks``) collects them into one markdown table. A row holds
the project's figure, and where the figure has an anchor (a reference measured
in the same run, on the same machine), the anchor's value and the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table.

    ``value`` is the project's measurement in ``unit``. ``anchor`` is the
    reference measured in the same run (None when the figure has none) and
    ``anchor_name`` says what it is. ``target`` is the goal from the issue, as
    text (for example ``"<= 5 us"``), and ``met`` whether the value meets it
    (None when there is no target or it cannot be judged mechanically).
    """

    figure: str
    value: float
    unit: str
    anchor: float | None = None
    anchor_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        """value / anchor, or None without an anchor (or a zero anchor)."""
        if self.anchor is None or self.anchor == 0:
            return None
        return self.value / self.anchor


def median_time(fn: Callable[[], object], *, number: int, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean seconds per call of ``fn``.

    Each run calls ``fn`` ``number`` times back to back; the median of the
    per-call means resists a run disturbed by the other core's work.
    """
    per_call: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        per_call.append((time.perf_counter() - start) / number)
    return statistics.median(per_call)
