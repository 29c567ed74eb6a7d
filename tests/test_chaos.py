"""Chaos trials of real processes (``tests/chaos.py`` explains one trial and
its checks): a few short seeded trials in the suite.

More trials: ``python -m tests.chaos --trials 100`` (docs/guarantees.md has
the last result), or in pytest ``CHAOS_TRIALS=20 CHAOS_SECONDS=15
CHAOS_SEED=500 pytest tests/test_chaos.py``. A failure names its seed and the
command that replays it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.chaos import run_trial

TRIALS = int(os.environ.get("CHAOS_TRIALS", "2"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "6"))
FIRST_SEED = int(os.environ.get("CHAOS_SEED", "1"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; kill -9")
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + TRIALS))
def test_chaos_trial(seed: int, tmp_path: Path) -> None:
    result = run_trial(seed, seconds=SECONDS, converge_timeout=90.0, root=tmp_path)
    print(result.line())
    # the trial exercised what it is for
    assert result.verified > 0 and result.observations > 0, result.line()
    assert sum(result.events.values()) > 0, result.line()


def test_every_test_docs_guarantees_names_exists() -> None:
    """docs/guarantees.md points each claim at tests: they must exist."""
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "guarantees.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc)
    short = re.findall(r"`::(\w+)`", doc)
    assert len(refs) > 20
    for path, name in refs:
        source = (root / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name}"
    fuzz = (root / "tests" / "test_fuzz_decoders.py").read_text()
    for name in short:  # the table's `::name` entries are in test_fuzz_decoders.py
        assert re.search(rf"^def {name}\(", fuzz, re.M), name
