"""The driver shared by the fuzz harnesses (``fuzz/fuzz_*.py``).

Each harness defines ``one_input(data: bytes) -> None``, which feeds ``data``
to one decoder and returns normally when the decoder either accepted it or
refused it with the *specific* error it documents (a
:class:`replicad.errors.ReplicadError` subclass, or an HTTP 4xx); anything
else raises :class:`FuzzFindingError` or is itself the crash. The harness's
``SEEDS`` are valid inputs the mutations start from.

Two engines run the same ``one_input``:

* **atheris** (coverage-guided; ``pip install atheris``, which has wheels for
  CPython 3.11 on Linux x86-64): ``python -m fuzz.fuzz_frames
  -atheris_runs=1000000`` (any libFuzzer flag; a corpus directory as the
  last argument, by default ``$FUZZ_CORPUS/replicad-fuzz/<harness>``, with
  ``FUZZ_CORPUS`` defaulting to the system's temporary directory).
* **random** (no dependency, reproducible): ``python -m fuzz.fuzz_frames
  --random --inputs 1000000 --seed 1`` draws random bytes, and mutations of
  the seeds (bit flips, byte changes, insertions, deletions, truncations,
  splices, interesting integers), from one ``random.Random(seed)``.

A hang is caught too: each input gets ``--timeout`` seconds (SIGALRM, 10 by
default). A crashing input is written to ``fuzz/crashes/`` and its hex
printed; ``python -m fuzz.fuzz_frames --replay FILE`` runs it again.
``python -m fuzz.run_all`` runs every harness (from the project's root).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent

OneInput = Callable[[bytes], None]


class FuzzFindingError(AssertionError):
    """A decoder broke its contract on an input (a wrong error class, a
    wrong status, a result that does not round-trip)."""


class InputTimeoutError(FuzzFindingError):
    """One input took longer than the time limit: a hang."""


_INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    2**63 - 1,
    2**64 - 1,
]


def mutate(data: bytes, rng: random.Random, seeds: Sequence[bytes], max_len: int) -> bytes:
    """One to four random mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # delete a range
            end = min(len(buf), pos + rng.randint(1, 16))
            del buf[pos:end]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5 and seeds:  # splice with a seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 6:  # an interesting integer, big-endian, over some bytes
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTERESTING) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, "big")
        elif op == 7 and buf:  # duplicate a range
            end = min(len(buf), pos + rng.randint(1, 32))
            buf[pos:pos] = buf[pos:end]
        elif op == 8 and len(buf) > 1:  # swap two bytes
            i, j = rng.randrange(len(buf)), rng.randrange(len(buf))
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf[:max_len])


def random_inputs(
    seeds: Sequence[bytes], count: int, seed: int, max_len: int
) -> tuple[random.Random, Callable[[], bytes]]:
    rng = random.Random(seed)

    def draw() -> bytes:
        if not seeds or rng.random() < 0.15:
            return rng.randbytes(rng.randrange(0, min(max_len, 512)))
        return mutate(rng.choice(seeds), rng, seeds, max_len)

    return rng, draw


def atheris_wanted(argv: Sequence[str] | None = None) -> bool:
    """True when the harness runs as a script under atheris (not --random,
    not --replay) and atheris is installed: then its imports are
    instrumented for coverage."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("--random", "--replay", "-h", "--help") for a in args):
        return False
    try:
        importlib.import_module("atheris")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def instrumented(active: bool) -> Iterator[None]:
    """``atheris.instrument_imports()`` when ``active``, else nothing."""
    if not active:
        yield
        return
    atheris = importlib.import_module("atheris")
    with atheris.instrument_imports():
        yield


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise InputTimeoutError("input took longer than the time limit")


def save_crash(name: str, data: bytes) -> Path:
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    path = crashes / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run_random(
    name: str,
    one_input: OneInput,
    seeds: Sequence[bytes],
    *,
    inputs: int,
    seed: int,
    max_len: int,
    timeout: float,
    report_every: float = 30.0,
) -> int:
    """Feed ``inputs`` inputs; return 0, or 1 after the first finding."""
    _, draw = random_inputs(seeds, inputs, seed, max_len)
    old = signal.signal(signal.SIGALRM, _alarm)
    started = last = time.monotonic()
    try:
        for n in range(1, inputs + 1):
            data = draw()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                one_input(data)
            except BaseException as exc:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                path = save_crash(name, data)
                print(f"{name}: FINDING at input {n} (seed {seed}): {type(exc).__name__}: {exc}")
                traceback.print_exc()
                print(f"input ({len(data)} bytes) saved to {path}: {data[:200].hex()}")
                return 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            now = time.monotonic()
            if now - last >= report_every:
                last = now
                print(f"{name}: {n} inputs, {n / (now - started):.0f}/s", flush=True)
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - started
    print(f"{name}: {inputs} inputs, no finding, {elapsed:.0f} s (random engine, seed {seed})")
    return 0


def main(
    name: str, one_input: OneInput, seeds: Sequence[bytes], argv: list[str] | None = None
) -> int:
    """The command line of a harness (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m fuzz.{name}", add_help=True)
    parser.add_argument("--random", action="store_true", help="the random engine, not atheris")
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--replay", type=Path, help="run one saved input")
    args, rest = parser.parse_known_args(argv)
    if args.replay is not None:
        one_input(args.replay.read_bytes())
        print(f"{name}: {args.replay} passes")
        return 0
    if args.random:
        return run_random(
            name,
            one_input,
            seeds,
            inputs=args.inputs,
            seed=args.seed,
            max_len=args.max_len,
            timeout=args.timeout,
        )
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed: pip install atheris, or use --random", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("FUZZ_CORPUS", tempfile.gettempdir())) / "replicad-fuzz" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(data)
    if not any(not a.startswith("-") for a in rest):
        rest.append(str(corpus))
    if not any(a.startswith("-timeout=") for a in rest):
        rest.append(f"-timeout={max(1, int(args.timeout))}")
    if not any(a.startswith("-max_len=") for a in rest):
        rest.append(f"-max_len={args.max_len}")
    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()
    return 0
