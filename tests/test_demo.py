"""The README's run command today: the sync-core walk-through."""

from __future__ import annotations

import pytest

from replicad.cli import main
from replicad.demo import run


def test_demo_ends_every_step_equal_to_the_origin() -> None:
    lines: list[str] = []
    run(300, out=lines.append)
    steps = [line for line in lines if "requests" in line]
    assert len(steps) == 3
    assert all("== origin" in line for line in steps), lines
    assert "city='shenzhen'" in lines[-2]
    assert "merkle" in lines[-1] and "snapshot" in lines[-1] and "diff" in lines[-1]


def test_cli_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--records", "100"]) == 0
    assert capsys.readouterr().out.count("== origin") == 3


def test_cli_rejects_too_few_records(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--records", "3"])
    assert exc.value.code == 2
    assert "at least 20" in capsys.readouterr().err
