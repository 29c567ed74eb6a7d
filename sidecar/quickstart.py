"""The README's run command: an origin and a sidecar on this machine.

``python -m sidecar.quickstart`` (what ``scripts/run.sh`` runs):

1. starts ``replicad serve`` (a real origin process) on a free loopback port;
2. creates the ``user_profile`` dataset (about 30 features per user) and loads
   seed-like profiles from a generated JSON-lines file with ``replicad load``
   (its progress bar included);
3. starts ``sidecar run`` (a real sidecar process, with its Redis-protocol
   unix socket and a JSON view of the dataset) and waits until it is ready;
4. reads profiles from the mirror with the zero-copy reader, as an app would,
   and one over the unix socket, as an app in any language would;
5. writes at the origin and shows the sidecar following;
6. stops both processes (or, with ``--keep``, leaves them running until
   Ctrl-C) and removes its temporary directory unless ``--dir`` was given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from replicad.client import OriginClient
from replicad.sample import seed_like_record, seed_like_schema
from sidecar.reader import Reader
from sidecar.resp import encode


def _hget(path: Path, dataset: str, key: str) -> bytes | None:
    """``HGET dataset key`` over the Redis protocol on a unix socket (what
    ``redis-cli -s PATH HGET ...`` sends), without a client library."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(encode([b"HGET", dataset.encode(), key.encode()]))  # a command: an array
        replies = s.makefile("rb")
        head = replies.readline()
        if head == b"$-1\r\n":
            return None
        if not head.startswith(b"$"):
            raise SystemExit(f"the socket answered {head[:200]!r}")
        return replies.read(int(head[1:]) + 2)[:-2]


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited with status {proc.returncode}; see its log")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise SystemExit(f"the sidecar's socket {path} did not answer within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run(records: int, workdir: Path, *, keep: bool) -> None:
    say = print
    origin_port, health_port = _free_port(), _free_port()
    origin_url = f"http://127.0.0.1:{origin_port}"
    health_url = f"http://127.0.0.1:{health_port}"
    say(f"== working directory {workdir}")
    with _process(
        [_bin("replicad"), "serve", "--data", str(workdir / "origin"),
         "--listen", f"127.0.0.1:{origin_port}", "--max-body-mb", "64"],
        workdir / "origin.log",
    ) as origin:  # fmt: skip
        _wait_http(origin_url + "/healthz", origin, "the origin")
        say(f"== origin (replicad serve) listening on {origin_url}")
        client = OriginClient(origin_url)
        client.create_dataset("user_profile", seed_like_schema().to_json())
        say("== dataset user_profile created: 27 features per user (ints, floats, a city, tags...)")
        sample = workdir / "user_profile.jsonl"
        with open(sample, "w", encoding="utf-8") as fh:
            for i in range(records):
                fh.write(json.dumps({"key": f"user:{i:08d}", **seed_like_record(i)}) + "\n")
        say(f"== loading {records:,} profiles: replicad load user_profile {sample.name}")
        subprocess.run(
            [_bin("replicad"), "--origin", origin_url, "load", "user_profile", str(sample)],
            check=True,
        )
        # AF_UNIX paths are short: the socket lives in a directory of its own
        with tempfile.TemporaryDirectory(prefix="replicad-qs-") as sockdir, _process(
            [_bin("sidecar"), "run", "--origin", origin_url, "--data", str(workdir / "mirror"),
             "--datasets", "user_profile", "--health", f"127.0.0.1:{health_port}",
             "--socket", str(Path(sockdir) / "redis.sock"), "--json-views", "user_profile",
             "--log-format", "text"],
            workdir / "sidecar.log",
        ) as sidecar:  # fmt: skip
            start = time.monotonic()
            _wait_http(health_url + "/healthz", sidecar, "the sidecar")
            _wait_http(health_url + "/readyz", sidecar, "the sidecar's first sync", timeout=300)
            status = httpx.get(health_url + "/status").json()["datasets"]["user_profile"]
            say(
                f"== sidecar ready in {time.monotonic() - start:.1f} s: mirror at version "
                f"{status['version']}, {status['records']:,} records (bootstrap by snapshot)"
            )
            with Reader(workdir / "mirror") as reader:
                say("== an app reads the mirror (zero-copy, sidecar.Reader):")
                for key in (b"user:00000000", b"user:00000001", b"user:%08d" % (records - 1)):
                    rec = reader.get("user_profile", key)
                    assert rec is not None
                    say(
                        f"   {key.decode()}: age={rec['age']} city={rec['city']!r} "
                        f"ctr_7d={rec['ctr_7d']:.4f} tags={rec['tags']}"
                    )
                keys = [b"user:%08d" % i for i in range(0, records, max(1, records // 1000))]
                t = time.perf_counter()
                rounds = 20
                for _ in range(rounds):
                    for key in keys:
                        rec = reader.get("user_profile", key)
                        assert rec is not None and rec["age"] is not None
                per_get = (time.perf_counter() - t) / (rounds * len(keys)) * 1e6
                t = time.perf_counter()
                reader.get_many("user_profile", keys)
                many = (time.perf_counter() - t) * 1e3
                say(
                    f"   Reader.get with decoding: {per_get:.1f} us per key; "
                    f"get_many of {len(keys)} keys: {many:.2f} ms"
                )
                sock = Path(sockdir) / "redis.sock"
                _wait_socket(sock, sidecar)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    doc = httpx.get(health_url + "/status").json()
                    if doc["datasets"]["user_profile"]["json_view"] == "built":
                        break
                    time.sleep(0.05)
                else:
                    say("   (the JSON view is still being built: this reply is rendered)")
                say(
                    f"== any language reads over the Redis protocol: redis-cli -s {sock} "
                    "HGET user_profile user:00000001"
                )
                reply = _hget(sock, "user_profile", "user:00000001")
                if reply is None:
                    raise SystemExit("the socket has no user:00000001")
                shown = reply.decode()
                say(f"   {shown[:96]}{'...' if len(shown) > 96 else ''}")
                say(
                    "   (the JSON view of user_profile, "
                    f"{doc['datasets']['user_profile']['json_view']}: replies stored beside "
                    "the records, sent without rendering)"
                )
                new = seed_like_record(7)
                new["city"] = "shenzhen"
                t = time.perf_counter()
                result = client.write("user_profile", {"user:00000001": new}, ["user:00000000"])
                acked = time.perf_counter()
                ok = reader.wait_for("user_profile", int(result["version"]), timeout=10)
                seen = time.perf_counter()
                rec = reader.get("user_profile", b"user:00000001")
                gone = reader.get("user_profile", b"user:00000000") is None
                say(
                    f"== wrote user:00000001 (city -> 'shenzhen') and deleted user:00000000 "
                    f"at the origin: version {result['version']}, acknowledged in "
                    f"{(acked - t) * 1e3:.1f} ms"
                )
                say(
                    f"   the mirror {'followed' if ok else 'did NOT follow'} in "
                    f"{(seen - acked) * 1e3:.1f} ms: city={rec['city'] if rec else None!r}, "
                    f"user:00000000 {'deleted' if gone else 'still there'}"
                )
                after = _hget(sock, "user_profile", "user:00000001")
                city = json.loads(after)["city"] if after else None
                say(f"   and over the socket: HGET user_profile user:00000001 -> city {city!r}")
            if keep:
                say("== both processes keep running; Ctrl-C to stop them. Meanwhile try:")
                say(f"   {_bin('sidecar')} status --health {health_url}")
                say(f"   redis-cli -s {sock} HGET user_profile user:00000002")
                say(f"   {_bin('replicad')} --origin {origin_url} status")
                with contextlib.suppress(KeyboardInterrupt):
                    while origin.poll() is None and sidecar.poll() is None:
                        time.sleep(0.5)
        say("== stopped the sidecar and the origin")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.quickstart", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--records", type=int, default=50_000, help="profiles to load")
    parser.add_argument("--dir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="leave both running until Ctrl-C")
    args = parser.parse_args(argv)
    if args.records < 2:
        parser.error("--records must be at least 2")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="replicad-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args.records, workdir, keep=args.keep)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
