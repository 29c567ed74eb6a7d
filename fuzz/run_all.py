"""Run every fuzz harness, one after the other, each in its own process.

``python -m fuzz.run_all --inputs 1000000 --seed 1`` (the random engine, the
default) or ``python -m fuzz.run_all --atheris --runs 1000000`` (atheris,
where installed). Prints one line per harness and a closing
``N passed, M failed`` line; exits non-zero when any harness found something.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

HARNESSES = (
    "fuzz_frames",
    "fuzz_messages",
    "fuzz_resp",
    "fuzz_sse",
    "fuzz_schema",
    "fuzz_config",
    "fuzz_http",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run_all")
    parser.add_argument("--atheris", action="store_true", help="atheris instead of random inputs")
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per harness (random)")
    parser.add_argument("--runs", type=int, default=100_000, help="runs per harness (atheris)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=HARNESSES, help="these harnesses only")
    args = parser.parse_args(argv)
    passed = failed = 0
    for name in args.only or HARNESSES:
        cmd = [sys.executable, "-m", f"fuzz.{name}"]
        if args.atheris:
            cmd += [f"-atheris_runs={args.runs}", f"-seed={args.seed}"]
        else:
            cmd += ["--random", "--inputs", str(args.inputs), "--seed", str(args.seed)]
        start = time.monotonic()
        done = subprocess.run(cmd, check=False)
        print(f"{name}: exit {done.returncode} in {time.monotonic() - start:.0f} s", flush=True)
        if done.returncode == 0:
            passed += 1
        else:
            failed += 1
    print(f"fuzz: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
