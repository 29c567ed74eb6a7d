"""The sidecar's entrypoint as a real process, the way its container runs it.

``python -m sidecar run`` (what the image's ``ENTRYPOINT ["sidecar", "run"]``
starts) configured from the environment alone, from a TOML file with flags
over it, and wrongly (it must exit quickly with one clear line). SIGTERM in
the middle of a bootstrap and of a 200,000-record diff apply: exit 0 within
seconds, a mirror that is a whole origin version (every batch rewrites every
key to its own version number, so a torn state would show mixed values), and
a restart that converges without digest mismatches.

The deployment files are checked statically: the Dockerfile (and its
HEALTHCHECK command, run against a live sidecar), .dockerignore,
deploy/pod.yaml, deploy/sidecar.toml, and docs/deploy.md naming every setting.

Every process listens on 127.0.0.1 and is stopped, and its files removed, when
its test ends.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import msgpack
import pytest

from replicad.errors import ConfigError
from sidecar import Reader, cli
from sidecar.config import SidecarConfig, load
from tests.origin_proc import OriginProcess, free_port
from tests.procs import ROOT

SETTINGS = sorted({f.name for f in dataclasses.fields(SidecarConfig)} | {"token_file"})
"""Every setting: the TOML keys; ``SIDECAR_<NAME>`` are the variables."""
OPAQUE = b"\x12"  # header of an uncompressed opaque value (replicad/codec.py)


# --------------------------------------------------------------------- helpers


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any SIDECAR_* variable, with the
    project importable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(settings)
    return env


class SidecarRun:
    """``python -m sidecar run ARGS``, configured only by ``env`` and ``args``
    (no flags added), its stderr (the log) in ``workdir/stderr.log``.
    ``port`` is the health port the configuration names. Leaving the ``with``
    block kills it if it still runs and removes ``workdir``."""

    def __init__(
        self, workdir: Path, port: int, env: dict[str, str], args: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.env = env
        self.args = list(args)
        self.log = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SidecarRun:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    def launch(self) -> None:
        assert self.proc is None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.workdir,
            )

    def wait_alive(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"no /healthz in {timeout} s:\n{self.tail()}")

    def start(self) -> None:
        self.launch()
        self.wait_alive()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.get("/status").json()
        return doc

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if predicate(last):
                return last
            time.sleep(0.02)
        raise AssertionError(f"condition not reached; last status {last}\n{self.tail()}")

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM; the exit status and the seconds it took to exit."""
        proc, self.proc = self.proc, None
        assert proc is not None and proc.poll() is None, "not running"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"still running {timeout} s after SIGTERM:\n{self.tail()}"
            ) from None
        return code, time.monotonic() - start

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines()[-n:])


def write(client: httpx.Client, dataset: str, upserts: dict[bytes, bytes]) -> int:
    """One msgpack write batch; the version it committed."""
    body = msgpack.packb({"upserts": upserts, "deletes": []}, use_bin_type=True)
    r = client.post(
        f"/v1/datasets/{dataset}/batch",
        content=body,
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


def json_log(run: SidecarRun) -> list[dict[str, Any]]:
    """The process's log: every line must be one JSON object."""
    docs = []
    for line in run.lines():
        doc = json.loads(line)
        assert isinstance(doc, dict) and {"ts", "level", "logger", "msg"} <= doc.keys(), line
        docs.append(doc)
    return docs


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation
    lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continuation"
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=VALUE: {rest}"
                env[name] = value
    return env


def healthcheck_argv() -> list[str]:
    (check,) = [rest for keyword, rest in dockerfile() if keyword == "HEALTHCHECK"]
    _, sep, command = check.partition("CMD ")
    assert sep, check
    argv: list[str] = json.loads(command)
    return argv


def load_yaml(path: Path) -> Any:
    yaml = importlib.import_module("yaml")  # PyYAML, without type stubs
    return yaml.safe_load(path.read_text())


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (``512Mi``, ``2Gi``) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "Ti": 1024.0**2}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)", quantity)
    assert m, f"use a binary unit: {quantity}"
    return float(m[1]) * units[m[2]]


def apply_in_progress(pid: int) -> bool:
    """True while a worker thread of the sidecar runs (state R) or waits on
    the disk (D). The sidecar's only worker threads are the trio threads
    that apply batches to the LMDB mirror; the trio loop is the main thread."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("R", "D"):
            return True
    return False


# ------------------------------------------------------- configuration sources


def test_configuration_from_the_environment_alone(tmp_path: Path) -> None:
    with (
        OriginProcess(
            tmp_path / "origin", durable=False, write_tokens=["w-secret"], read_tokens=["r-secret"]
        ) as origin,
        httpx.Client(
            base_url=origin.base_url, headers={"authorization": "Bearer w-secret"}, timeout=30
        ) as client,
    ):
        assert client.post("/v1/datasets", json={"name": "env", "opaque": True}).status_code == 201
        v1 = write(client, "env", {b"p%04d" % i: b"v1" for i in range(500)})

        def run(name: str, token: str) -> SidecarRun:
            port = free_port()
            env = clean_env(
                SIDECAR_ORIGIN=origin.base_url,
                SIDECAR_DATASETS="env",
                SIDECAR_DATA=str(tmp_path / name / "mirror"),
                SIDECAR_HEALTH=f"127.0.0.1:{port}",
                SIDECAR_POLL_INTERVAL="0.3",
                SIDECAR_HINTS="false",  # so only the poll interval can bring a write
                SIDECAR_TOKEN=token,
                SIDECAR_REPLICA_ID=f"{name}-from-env",
            )
            return SidecarRun(tmp_path / name, port, env)

        with run("good", "r-secret") as good, run("bad", "not-the-token") as bad:
            good.launch()
            bad.launch()
            good.wait_alive()
            bad.wait_alive()
            st = good.wait_until(lambda s: bool(s["ready"]))
            assert st["replica"] == "good-from-env"
            assert list(st["datasets"]) == ["env"]
            assert st["datasets"]["env"]["version"] == v1
            assert st["datasets"]["env"]["records"] == 500
            with Reader(good.workdir / "mirror") as reader:
                rec = reader.get("env", b"p0007")
                assert rec is not None and rec.value == b"v1"

            # hints are off: a write arrives by the 0.3 s poll (the default is 5 s)
            v2 = write(client, "env", {b"p0007": b"v2"})
            start = time.monotonic()
            good.wait_until(lambda s: s["datasets"]["env"]["version"] == v2, timeout=10)
            assert time.monotonic() - start < 3.0

            # the wrong token: alive, never ready, and /status says why
            st = bad.wait_until(lambda s: bool(s["datasets"]["env"]["last_error"]))["datasets"]
            assert "token" in st["env"]["last_error"], st
            assert bad.get("/healthz").status_code == 200
            assert bad.get("/readyz").status_code == 503
            st = bad.status()
            assert not st["ready"] and st["datasets"]["env"]["version"] is None
            assert st["datasets"]["env"]["errors"] >= 2, st  # it keeps trying

            assert good.terminate()[0] == 0
            assert bad.terminate()[0] == 0
            good_log, bad_log = json_log(good), json_log(bad)
            assert any(d["msg"] == "sidecar running" for d in good_log)
            assert any("unknown token" in str(d.get("error")) for d in bad_log)
            # tokens never reach the log
            assert "r-secret" not in good.log.read_text()
            assert "not-the-token" not in bad.log.read_text()


def test_toml_file_then_environment_then_flags(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as client,
    ):
        assert client.post("/v1/datasets", json={"name": "cfg", "opaque": True}).status_code == 201
        write(client, "cfg", {b"a": b"1"})
        port = free_port()
        config = tmp_path / "sidecar.toml"
        config.write_text(
            f'origin = "{origin.base_url}"\n'
            f'data = "{tmp_path / "run" / "mirror"}"\n'
            'datasets = ["not-this-one"]          # SIDECAR_DATASETS wins\n'
            f'health = "127.0.0.1:{port}"\n'
            "poll_interval = 30.0                 # --poll-interval wins\n"
            "hints = false\n"
            'replica_id = "from-file"\n'
            'log_format = "text"                  # --log-format wins\n'
        )
        args = ["--config", str(config), "--poll-interval", "0.3", "--log-format", "json"]
        with SidecarRun(tmp_path / "run", port, clean_env(SIDECAR_DATASETS="cfg"), args) as run:
            run.start()
            st = run.wait_until(lambda s: bool(s["ready"]))
            assert st["replica"] == "from-file"  # the file is read
            assert list(st["datasets"]) == ["cfg"]  # the environment overrides it
            v = write(client, "cfg", {b"a": b"2"})
            start = time.monotonic()
            run.wait_until(lambda s: s["datasets"]["cfg"]["version"] == v, timeout=10)
            assert time.monotonic() - start < 3.0  # a 0.3 s poll, not the file's 30 s
            assert run.terminate()[0] == 0
            assert any(d["msg"] == "sidecar running" for d in json_log(run))  # JSON, not text


# ------------------------------------------------------------ bad configuration


@dataclasses.dataclass(frozen=True)
class BadConfig:
    env: dict[str, str]
    args: tuple[str, ...]
    message: str
    toml: str | None = None


BAD_CONFIGS: dict[str, BadConfig] = {
    "no datasets": BadConfig({"SIDECAR_DATASETS": ""}, (), "no datasets configured"),
    "unknown setting in the file": BadConfig(
        {}, (), "unknown setting(s): poll_intervall", toml="poll_intervall = 1.0\n"
    ),
    "origin without a scheme": BadConfig(
        {"SIDECAR_ORIGIN": "origin.internal:7070"}, (), "origin must be an http(s) URL"
    ),
    "a number that is not one": BadConfig(
        {"SIDECAR_POLL_INTERVAL": "soon"}, (), "poll_interval must be a number"
    ),
    "a negative interval flag": BadConfig({}, ("--poll-interval", "-1"), "must be positive"),
    "a health address without a port": BadConfig(
        {"SIDECAR_HEALTH": "localhost"}, (), "expected HOST:PORT"
    ),
    "a missing config file": BadConfig({}, ("--config", "missing.toml"), "cannot read config"),
    "a missing token file": BadConfig(
        {"SIDECAR_TOKEN_FILE": "missing-token"}, (), "cannot read token file"
    ),
    "an origin URL httpx cannot parse": BadConfig(
        {"SIDECAR_ORIGIN": "http://[::1"}, (), "invalid origin URL"
    ),
    "a mirror path that is a file": BadConfig(
        {"SIDECAR_DATA": "not-a-directory"}, (), "not-a-directory"
    ),
}


def expect_one_line_error(
    tmp_path: Path, env: dict[str, str], args: Sequence[str], message: str
) -> None:
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", *args],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after 10 s: {exc.stderr!r}") from None
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 5.0
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sidecar: error: ") and message in err, err
    assert done.stdout == ""


@pytest.mark.parametrize(
    "case",
    sorted(BAD_CONFIGS),
)
def test_bad_configuration_exits_at_once_with_one_line(tmp_path: Path, case: str) -> None:
    bad = BAD_CONFIGS[case]
    (tmp_path / "not-a-directory").write_text("")
    env = clean_env(
        SIDECAR_ORIGIN=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        SIDECAR_DATASETS="a",
        SIDECAR_DATA=str(tmp_path / "mirror"),
        SIDECAR_HEALTH=f"127.0.0.1:{free_port()}",
    )
    env.update(bad.env)
    args = list(bad.args)
    if bad.toml is not None:
        (tmp_path / "sidecar.toml").write_text(bad.toml)
        args = ["--config", "sidecar.toml", *args]
    expect_one_line_error(tmp_path, env, args, bad.message)


def test_a_health_port_in_use_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = clean_env(
            SIDECAR_ORIGIN=f"http://127.0.0.1:{free_port()}",
            SIDECAR_DATASETS="a",
            SIDECAR_DATA=str(tmp_path / "mirror"),
            SIDECAR_HEALTH=f"127.0.0.1:{port}",
        )
        expect_one_line_error(tmp_path, env, [], f"127.0.0.1:{port}")


def test_token_and_token_file_in_the_environment_resolve_the_same_way_every_run(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text("from-file\n")
    code = (
        "from sidecar.config import load; print(load(environ={'SIDECAR_DATASETS': 'a', "
        f"'SIDECAR_TOKEN': 'from-env', 'SIDECAR_TOKEN_FILE': {str(tmp_path / 'token')!r}}}).token)"
    )
    # 12 interpreters with different hash seeds, run side by side
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=clean_env(PYTHONHASHSEED=str(seed)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(12)
    ]
    try:
        seen = {proc.communicate(timeout=30)[0].strip() for proc in procs}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs)
    assert len(seen) == 1, seen


# ----------------------------------------------------------------- SIGTERM


RECORDS = 200_000
KEYS = [b"k%06d" % i for i in range(RECORDS)]


def assert_whole_version(mirror: Path, dataset: str) -> int | None:
    """Open the mirror as an app would; either no version yet (and no
    records), or a version V whose every record is V (each write batch
    rewrote every key to its version number). Returns V."""
    with Reader(mirror) as reader, reader.snapshot() as snap:
        cursor = snap.version(dataset)
        if cursor is None:
            assert snap.count(dataset) == 0
            return None
        keys = snap.keys(dataset, limit=RECORDS + 1)
        assert len(keys) == RECORDS, (cursor, len(keys))
        values = {bytes(snap.raw(dataset, k) or b"") for k in keys}
        assert values == {OPAQUE + str(cursor.version).encode()}, (cursor, sorted(values)[:5])
        return cursor.version


def wait_for_apply(run: SidecarRun, done: Callable[[dict[str, Any]], bool]) -> None:
    """Return while a batch is being applied, or once ``done(status)``."""
    deadline = time.monotonic() + 30
    next_status = 0.0
    while time.monotonic() < deadline:
        if apply_in_progress(run.pid):
            return
        if time.monotonic() > next_status:
            if done(run.status()):
                return
            next_status = time.monotonic() + 0.1
        time.sleep(0.002)
    raise AssertionError(f"no apply seen in 30 s\n{run.tail()}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_mid_apply_exits_0_and_leaves_a_whole_version(tmp_path: Path) -> None:
    with (
        OriginProcess(tmp_path / "origin", durable=False, max_body_mb=16) as origin,
        httpx.Client(base_url=origin.base_url, timeout=120) as client,
    ):
        assert client.post("/v1/datasets", json={"name": "big", "opaque": True}).status_code == 201

        def rewrite_all(version: int) -> int:
            """The next batch sets every key to the version it will get."""
            return write(client, "big", {k: str(version + 1).encode() for k in KEYS})

        v1 = rewrite_all(0)
        port = free_port()
        env = clean_env(
            SIDECAR_ORIGIN=origin.base_url,
            SIDECAR_DATASETS="big",
            SIDECAR_DATA=str(tmp_path / "sidecar" / "mirror"),
            SIDECAR_HEALTH=f"127.0.0.1:{port}",
            SIDECAR_POLL_INTERVAL="30",  # hints bring the diff; no polls in between
        )
        with SidecarRun(tmp_path / "sidecar", port, env) as run:
            mirror = run.workdir / "mirror"

            # 1. SIGTERM during the bootstrap (a snapshot of 40 chunks, each
            #    staged in its own transaction; readers see none of them)
            run.start()
            run.wait_until(lambda s: s["datasets"]["big"]["phase"] == "snapshot")
            time.sleep(0.5)  # a few chunks staged
            wait_for_apply(run, lambda s: s["datasets"]["big"]["version"] is not None)
            code, seconds = run.terminate()
            assert code == 0 and seconds < 10, (code, seconds, run.tail())
            assert assert_whole_version(mirror, "big") in (None, v1)

            run.start()  # resumes the load
            st = run.wait_until(lambda s: bool(s["ready"]), timeout=30)["datasets"]["big"]
            assert st["version"] == v1 and st["digest_mismatches"] == 0, st
            assert assert_whole_version(mirror, "big") == v1
            # the leaf index is built after the load in the apply thread:
            # let it finish, or it would pass for the diff's apply below
            run.wait_until(lambda s: bool(s["datasets"]["big"]["leaf_index_complete"]), timeout=60)

            # 2. SIGTERM while the 200,000-record diff is being applied: the
            #    apply finishes and commits, then the process exits
            v2 = rewrite_all(v1)
            wait_for_apply(run, lambda s: s["datasets"]["big"]["version"] == v2)
            assert run.status()["datasets"]["big"]["version"] == v1, "the apply ended too soon"
            code, seconds = run.terminate()
            assert code == 0 and seconds < 10, (code, seconds, run.tail())
            assert assert_whole_version(mirror, "big") == v2  # committed, not abandoned
            stopping = [d for d in json_log(run) if d["msg"] == "stopping"]
            assert [d["signal"] for d in stopping] == ["SIGTERM", "SIGTERM"]
            assert not any("exc" in d or d["level"] == "error" for d in json_log(run))

            # 3. restarted, it carries on from its mirror with diffs; the
            #    digest check of the next diff covers every record
            run.start()
            run.wait_until(lambda s: bool(s["ready"]), timeout=30)
            v3 = write(client, "big", {b"k000000": b"touched"})
            st = run.wait_until(lambda s: s["datasets"]["big"]["version"] == v3)["datasets"]
            info = client.get("/v1/datasets/big").json()
            assert st["big"]["digest_mismatches"] == 0, st
            assert st["big"]["syncs"].get("snapshot", 0) == 0, st  # no reload needed
            assert st["big"]["records"] == info["records"] == RECORDS
            assert run.terminate()[0] == 0


# ------------------------------------------------------------ the image


def test_dockerfile_builds_the_sidecar_image(tmp_path: Path) -> None:
    ins = dockerfile()
    keywords = [k for k, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert keywords.count("FROM") == 1

    def only(keyword: str) -> str:
        (value,) = [rest for k, rest in ins if k == keyword]
        return value

    assert json.loads(only("ENTRYPOINT")) == ["sidecar", "run"]
    assert json.loads(only("CMD")) == []  # drops the base image's CMD ["python3"]
    assert only("STOPSIGNAL") == "SIGTERM"
    user = only("USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0, "a numeric non-root uid (runAsNonRoot)"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")

    env = dockerfile_env()
    for name in env:
        if name.startswith("SIDECAR_"):
            assert name[8:].lower() in SETTINGS, name
    assert json.loads(only("VOLUME")) == [env["SIDECAR_DATA"]] == ["/var/lib/sidecar"]
    health_port = env["SIDECAR_HEALTH"].rpartition(":")[2]
    assert only("EXPOSE").split() == [health_port]

    check = only("HEALTHCHECK")
    argv = healthcheck_argv()
    assert argv[0] == "python" and "/healthz" in argv[-1] and "curl" not in check

    # installs the project (no dev extra) from sources that exist
    installs = [rest for k, rest in ins if k == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and "[dev]" not in installs[0] and "-e " not in installs[0]
    copied: set[str] = set()
    for k, rest in ins:
        if k in ("COPY", "ADD"):
            assert k == "COPY" and "--from" not in rest
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {"pyproject.toml", project["project"]["readme"]}
    wanted |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert wanted <= copied, wanted - copied
    # the entrypoint, and `replicad` for running the origin from the same image
    assert {"sidecar", "replicad"} <= project["project"]["scripts"].keys()


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: Sequence[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its
    parent directories decides; ``!`` re-includes."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, rest in dockerfile():
        if keyword == "COPY":
            for src in shlex.split(rest)[:-1]:
                paths = [src]
                if (ROOT / src).is_dir():
                    paths += [
                        p.relative_to(ROOT).as_posix()
                        for p in (ROOT / src).rglob("*.py")
                        if "__pycache__" not in p.parts
                    ]
                for path in paths:
                    assert not dockerignored(path, patterns), f"{path} is in .dockerignore"
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_codec.py", "sidecar/__pycache__/x"):
        assert dockerignored(path, patterns), f"{path} would enter the build context"


def test_dockerfile_healthcheck_command_probes_the_health_port(tmp_path: Path) -> None:
    """Run the HEALTHCHECK command (with this Python for the image's) against a
    sidecar whose origin is down: alive (exit 0) though not ready; after the
    sidecar stops, it fails."""
    argv = [sys.executable, *healthcheck_argv()[1:]]
    port = free_port()
    env = clean_env(
        SIDECAR_ORIGIN=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        SIDECAR_DATASETS="a",
        SIDECAR_DATA=str(tmp_path / "run" / "mirror"),
        SIDECAR_HEALTH=f"127.0.0.1:{port}",
    )
    # the image's form of the address: all interfaces
    check_env = clean_env(SIDECAR_HEALTH=f"0.0.0.0:{port}")
    with SidecarRun(tmp_path / "run", port, env) as run:
        run.start()
        assert run.get("/readyz").status_code == 503
        assert subprocess.run(argv, env=check_env, timeout=10, check=False).returncode == 0
        assert run.terminate()[0] == 0
        failed = subprocess.run(argv, env=check_env, timeout=10, capture_output=True, check=False)
        assert failed.returncode != 0


# ------------------------------------------------------- deployment examples


def test_pod_spec_shares_the_mirror_with_the_app() -> None:
    pod = load_yaml(ROOT / "deploy" / "pod.yaml")
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    spec = pod["spec"]
    containers: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    (sidecar,) = [c for c in containers if any(e["name"] == "SIDECAR_DATASETS" for e in c["env"])]
    apps = [c for c in containers if c is not sidecar]
    assert apps, "an app container beside the sidecar"

    # the memory-backed volume, mounted by both, writable (LMDB's lock.mdb)
    (volume,) = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    env = {e["name"]: e for e in sidecar["env"]}
    data = env["SIDECAR_DATA"]["value"]
    for container in containers:
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == data and not mount.get("readOnly", False), container["name"]
    assert spec["shareProcessNamespace"] is True  # LMDB reader slots are keyed by PID

    # the environment is a valid configuration, the token from a Secret
    for name in env:
        assert name.startswith("SIDECAR_") and name[8:].lower() in SETTINGS, name
    secret = env["SIDECAR_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and "value" not in env["SIDECAR_TOKEN"]
    values = {k: e.get("value", "from-the-cluster") for k, e in env.items()}
    cfg = load(None, environ=values)
    assert cfg.health is not None and cfg.health.host == "0.0.0.0"  # the kubelet probes it

    # probes on the health port
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == cfg.health.port
    assert 10 <= spec["terminationGracePeriodSeconds"] <= 120

    # memory: the sidecar's limit covers the tmpfs volume, and the map stops
    # growing before the volume is full
    size_limit = mebibytes(volume["emptyDir"]["sizeLimit"])
    resources = sidecar["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert mebibytes(resources["limits"]["memory"]) > size_limit
    assert cfg.map_size_mb <= cfg.max_map_size_mb < size_limit
    for app in apps:
        assert "memory" in app["resources"]["limits"]

    # one non-root user and group for both (lock.mdb must be writable by readers)
    uid = int(next(rest for k, rest in dockerfile() if k == "USER").split(":")[0])
    for container in containers:
        ctx = {**spec["securityContext"], **container.get("securityContext", {})}
        assert ctx["runAsUser"] == uid and ctx["runAsGroup"] == uid and ctx["runAsNonRoot"]
    assert spec["securityContext"]["fsGroup"] == uid


def test_example_config_is_valid() -> None:
    path = ROOT / "deploy" / "sidecar.toml"
    keys = tomllib.loads(path.read_text()).keys()
    assert keys <= set(SETTINGS)
    cfg = load(path, environ={})
    assert cfg.datasets and str(cfg.data) == dockerfile_env()["SIDECAR_DATA"]
    health_port = dockerfile_env()["SIDECAR_HEALTH"].rpartition(":")[2]
    assert cfg.health is not None and str(cfg.health.port) == health_port


def test_deploy_doc_names_every_setting_and_flag(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in SETTINGS:
        assert f"`{name}`" in doc and f"SIDECAR_{name.upper()}" in doc, name
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    flags = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out)) - {"--help"}
    missing = sorted(flag for flag in flags if f"`{flag}" not in doc)
    assert flags and not missing, missing


def test_push_is_on_by_default_and_can_be_turned_off_three_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar_main = cli.main
    from sidecar.main import settings_of

    assert settings_of(load(None, environ={"SIDECAR_DATASETS": "a"})).push
    off = load(None, environ={"SIDECAR_DATASETS": "a", "SIDECAR_PUSH": "false"})
    assert not settings_of(off).push
    toml = tmp_path / "s.toml"
    toml.write_text('datasets = ["a"]\npush = false\n')
    assert not load(toml, environ={}).push
    toml.write_text('datasets = ["a"]\npush = "sometimes"\n')
    with pytest.raises(ConfigError, match="push"):
        load(toml, environ={})
    # --no-push reaches the configuration the process runs with
    seen: list[SidecarConfig] = []
    monkeypatch.setattr("sidecar.main.run", seen.append)
    argv = ["run", "--datasets", "a", "--origin", "http://127.0.0.1:9", "--no-push"]
    assert sidecar_main([*argv, "--data", str(tmp_path / "m"), "--log-format", "text"]) == 0
    assert len(seen) == 1 and not seen[0].push
