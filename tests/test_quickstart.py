"""The README's run command, as a process: origin + sidecar + reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT


def test_quickstart_runs_the_whole_system_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "qs"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.quickstart", "--records", "3000", "--dir", str(workdir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "origin (replicad serve) listening" in out
    assert "sidecar ready" in out and "3,000 records" in out
    assert "user:00000000: age=" in out
    assert "the mirror followed in" in out and "city='shenzhen'" in out
    assert "user:00000000 deleted" in out
    # the Redis protocol on the unix socket, from the JSON view
    assert "any language reads over the Redis protocol: redis-cli -s " in out
    assert '{"age":48,"gender":"m","city":"xian"' in out
    assert "the JSON view of user_profile, built" in out
    assert "over the socket: HGET user_profile user:00000001 -> city 'shenzhen'" in out
    sock = out.split("redis-cli -s ", 1)[1].split()[0]
    assert not Path(sock).parent.exists()  # its directory removed
    assert "stopped the sidecar and the origin" in out
    # both processes are gone
    ps = subprocess.run(["ps", "-eo", "args"], check=True, capture_output=True, text=True).stdout
    assert str(workdir) not in ps
