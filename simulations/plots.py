"""PNG plots of runs and studies (matplotlib, imported lazily, Agg backend).

Theory of operation
-------------------
Nothing here is needed to run or check a simulation: matplotlib is imported
only inside the plotting functions, with the non-interactive Agg backend, so
the harness runs without it and a plot never opens a window. The PNG files
are figures for people (docs/img/sim-*.png); the JSON next to them is the
record. Functions take plain data (series of x/y values), not simulation
objects, except :func:`plot_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.world import RunResult

Series = tuple[str, Sequence[float], Sequence[float]]
"""A labelled line: (label, xs, ys)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: RunResult, path: Path) -> None:
    """Two panels: every replica's content version over time against the
    origin's (fault phase shaded), and the CDF of the readers' staleness."""
    plt = _pyplot()
    w = result.world
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted(w.histories):
        h = w.histories[name]
        ax1.step(h.times, range(len(h.times)), where="post", color="black", lw=2, label=name)
    by_replica: dict[tuple[str, str], tuple[list[float], list[int]]] = {}
    for t, node, ds, seq in w.timeline:
        xs, ys = by_replica.setdefault((node, ds), ([], []))
        xs.append(t)
        ys.append(seq)
    for (node, ds), (xs, ys) in sorted(by_replica.items()):
        ax1.step(xs, ys, where="post", lw=0.8, alpha=0.7, label=f"{node}/{ds}")
    ax1.axvspan(
        min(result.scenario.warmup, result.heal_at), result.heal_at, color="red", alpha=0.06
    )
    ax1.axvline(result.heal_at, color="red", ls="--", lw=1)
    ax1.set_xlabel("simulated time (s)")
    ax1.set_ylabel("content version (origin writes)")
    ax1.set_title(f"{result.scenario.name} seed {result.seed}: replicas follow the origin")
    if len(by_replica) <= 12:
        ax1.legend(fontsize=6, loc="upper left")
    stale = sorted(w.env.metrics.staleness)
    if stale:
        ax2.plot(stale, [(i + 1) / len(stale) for i in range(len(stale))])
    ax2.set_xlabel("staleness of a read (s)")
    ax2.set_ylabel("fraction of reads")
    ax2.set_title("staleness CDF")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(
    path: Path,
    panels: Sequence[tuple[str, str, str, Sequence[Series]]],
    *,
    title: str = "",
    logx: Sequence[bool] = (),
    logy: Sequence[bool] = (),
) -> None:
    """Side-by-side line panels: each ``(title, xlabel, ylabel, series)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.3), squeeze=False)
    for i, (ptitle, xlabel, ylabel, series) in enumerate(panels):
        ax = axes[0][i]
        for label, xs, ys in series:
            ax.plot(list(xs), list(ys), marker="o", ms=3, label=label)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if i < len(logx) and logx[i]:
            ax.set_xscale("log")
        if i < len(logy) and logy[i]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(
    path: Path,
    panels: Sequence[tuple[str, str, Sequence[str], Sequence[tuple[str, Sequence[float]]]]],
    *,
    title: str = "",
    logy: Sequence[bool] = (),
) -> None:
    """Grouped bar panels: each ``(title, ylabel, groups, [(label, values)])``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.3), squeeze=False)
    for i, (ptitle, ylabel, groups, bars) in enumerate(panels):
        ax = axes[0][i]
        width = 0.8 / max(1, len(bars))
        for j, (label, values) in enumerate(bars):
            xs = [g + (j - (len(bars) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, list(values), width=width, label=label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), fontsize=8)
        ax.set_title(ptitle, fontsize=10)
        ax.set_ylabel(ylabel)
        if i < len(logy) and logy[i]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
