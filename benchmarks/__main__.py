"""Run every benchmark and print one markdown table.

python -m benchmarks            # the real measurement (a few minutes)
python -m benchmarks --quick    # small sizes, seconds (a smoke run)
python -m benchmarks --only codec,merkle
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import Row

MODULES = ["codec", "merkle", "version_queue", "origin", "sidecar", "reader", "reads", "json_view"]
MODULES += ["simulations"]  # the simulation harness's speed (bench_simulations.py)


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if x == 0 or 0.01 <= abs(x) < 100_000:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.3g}"


def render(rows: list[Row]) -> str:
    lines = [
        "| figure | value | unit | anchor | anchor value | ratio | target | met |",
        "|---|---:|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            f"| {r.figure} | {_fmt(r.value)} | {r.unit} | {r.anchor_name} | "
            f"{_fmt(r.anchor)} | {_fmt(r.ratio)} | {r.target} | {met} |"
        )
    return "\n".join(lines)


def _byte_compile() -> None:
    """Byte-compile the packages, as ``pip install`` does: the processes the
    benchmarks start then import them as an installed sidecar would, even
    where ``PYTHONDONTWRITEBYTECODE`` is set (it is on our machine; every
    start would compile the sources again, about 0.07 s)."""
    root = Path(__file__).resolve().parent.parent
    for package in ("replicad", "sidecar", "benchmarks"):
        compileall.compile_dir(root / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated module names")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or MODULES
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(MODULES)}")
    print(f"# benchmarks ({'quick' if args.quick else 'full'}), python {platform.python_version()}")
    _byte_compile()
    all_rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rows: list[Row] = module.rows(args.quick)
        all_rows.extend(rows)
        print(f"<!-- {name}: {time.perf_counter() - start:.1f} s -->", file=sys.stderr)
    print(render(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
