"""The ``replicad`` command line.

``main(argv)`` is callable from tests. Subcommands so far:

* ``replicad demo [--records N]`` -- the sync core walk-through
  (:mod:`replicad.demo`): an in-memory origin and replica, real codec, real
  frames, real state machine.
"""

from __future__ import annotations

import argparse
import sys

from replicad import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replicad", description="Origin of the edge replica.")
    parser.add_argument("--version", action="version", version=f"replicad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walk through the sync core in one process")
    demo.add_argument("--records", type=int, default=20_000, help="records to load (>= 20)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.records < 20:
            parser.error("--records must be at least 20")
        from replicad.demo import run

        run(args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
