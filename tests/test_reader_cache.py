"""The reader's fast path: one cached read transaction per thread, renewed
exactly when the mirror commits, released when idle.

The mirror (the writer) lives in this process; each reader runs in a child
process, as in production (LMDB allows one environment handle per process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicad.origin_types import WriteBatch
from replicad.sample import seed_like_record
from sidecar.reader import Reader, _MetaPages
from tests.test_reader import Setup, ok


class ReaderProcess:
    """A child process running a Reader, driven one command per line."""

    def __init__(self, mirror: Path, options: str = "") -> None:
        script = textwrap.dedent(
            f"""
            import sys, threading
            from sidecar.reader import Reader
            r = Reader({str(mirror)!r}{options})
            print("cached" if r._pages is not None else "uncached", flush=True)
            for line in sys.stdin:
                cmd, *args = line.split()
                if cmd == "get":
                    rec = r.get("up", args[0].encode())
                    print(rec.cursor.version, rec["age"], flush=True)
                elif cmd == "empty":  # a key no record can have, on the cached path
                    many = r.get_many("up", [b"", b"u001"])
                    print(r.get("up", b""), [m is None for m in many], flush=True)
                elif cmd == "version":
                    print(r.version("up").version, flush=True)
                elif cmd == "many":
                    recs = r.get_many("up", [a.encode() for a in args])
                    print(len({{x.cursor for x in recs}}), recs[0].cursor.version, flush=True)
                elif cmd == "threads":
                    out = []
                    def work():
                        out.append(r.get("up", b"u001").cursor.version)
                    ts = [threading.Thread(target=work) for _ in range(8)]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                    print(len(set(out)), out[0], flush=True)
                elif cmd == "hold":
                    held = r.snapshot()
                    snap = held.__enter__()
                    print(snap.version("up").version, flush=True)
                elif cmd == "current":
                    print(snap.is_current(), flush=True)
                elif cmd == "open":
                    try:
                        snap.version(args[0])
                        print("opened", flush=True)
                    except Exception as exc:
                        print(type(exc).__name__, flush=True)
                elif cmd == "release":
                    held.__exit__(None, None, None)
                    print("released", flush=True)
                elif cmd == "close":
                    r.close()
                    print("closed", flush=True)
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.mode = self.readline()

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the reader process died"
        return line.strip()

    def ask(self, command: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.readline().split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.mirror.close()
    s.origin.close()


def write(setup: Setup, key: bytes, i: int, now: float) -> int:
    result = ok(setup.origin.commit([WriteBatch("up", {key: seed_like_record(i)})])[0])
    setup.sync(now)
    return result.cursor.version


def test_every_read_sees_the_last_commit_that_finished_before_it(
    setup: Setup, tmp_path: Path
) -> None:
    reader = ReaderProcess(tmp_path / "mirror")
    try:
        assert reader.mode == "cached"
        for i in range(1, 30):
            version = write(setup, b"u001", 1000 + i, float(i))
            # no sleep: the cached transaction must be renewed by this read
            got_version, age = reader.ask("get u001")
            assert int(got_version) == version
            assert int(age) == seed_like_record(1000 + i)["age"]
            assert int(reader.ask("version")[0]) == version
        distinct, version_seen = reader.ask("many u001 u002 u003 u150")
        assert distinct == "1" and int(version_seen) == version
        distinct, version_seen = reader.ask("threads")
        assert distinct == "1" and int(version_seen) == version
    finally:
        reader.stop()


def _reader_txnids(setup: Setup, pid: int) -> list[str]:
    """The transaction ids LMDB's reader table shows for ``pid`` ("-": a
    slot kept but holding no snapshot)."""
    rows = setup.mirror.env.readers().splitlines()[1:]
    return [row.split()[2] for row in rows if row.split()[0] == str(pid)]


def test_an_idle_reader_releases_its_snapshot(setup: Setup, tmp_path: Path) -> None:
    reader = ReaderProcess(tmp_path / "mirror", ", idle_release=0.05")
    try:
        reader.ask("get u001")
        write(setup, b"u002", 7, 1.0)
        held = _reader_txnids(setup, reader.proc.pid)
        assert any(t != "-" for t in held), held  # pinned right after the read
        deadline = time.monotonic() + 5
        while any(t != "-" for t in _reader_txnids(setup, reader.proc.pid)):
            assert time.monotonic() < deadline, "the idle reader kept its snapshot"
            time.sleep(0.02)
        # and reads still work after the release
        got_version, _ = reader.ask("get u002")
        assert int(got_version) == setup.origin.info("up").cursor.version
        assert reader.ask("close") == ["closed"]
    finally:
        reader.stop()


def test_an_empty_key_is_a_miss_on_the_cached_path(setup: Setup, tmp_path: Path) -> None:
    reader = ReaderProcess(tmp_path / "mirror")
    try:
        assert reader.mode == "cached"
        assert reader.ask("empty") == ["None", "[True,", "False]"]
        reader.ask("get u001")  # the cached transaction still serves
    finally:
        reader.stop()


def test_a_snapshot_knows_whether_it_is_current(setup: Setup, tmp_path: Path) -> None:
    """What the socket workers keep their snapshot by: current until the
    mirror commits or a dataset's handles are opened, never for a reader
    that cannot read the last commit cheaply."""
    reader = ReaderProcess(tmp_path / "mirror")
    try:
        first = int(reader.ask("hold")[0])
        assert reader.ask("current") == ["True"]
        assert reader.ask("current") == ["True"]  # reading does not change it
        version = write(setup, b"u001", 3, 1.0)
        assert reader.ask("current") == ["False"]
        assert reader.ask("release") == ["released"]
        assert int(reader.ask("hold")[0]) == version > first
        assert reader.ask("current") == ["True"]
        setup.mirror.ensure("late")  # a new dataset: a commit
        assert reader.ask("current") == ["False"]
        assert reader.ask("release") == ["released"]
        reader.ask("hold")
        assert reader.ask("current") == ["True"]
        # the snapshot sees the dataset but began before this reader opened
        # its handles: it cannot read it, and is no longer current
        assert reader.ask("open late") == ["UnknownDatasetError"]
        assert reader.ask("current") == ["False"]
        assert reader.ask("release") == ["released"]
        reader.ask("hold")
        assert reader.ask("open late") == ["opened"]
        assert reader.ask("current") == ["True"]
    finally:
        reader.stop()
    uncached = ReaderProcess(tmp_path / "mirror", ", idle_release=0")
    try:
        uncached.ask("hold")
        assert uncached.ask("current") == ["False"]
    finally:
        uncached.stop()


def test_without_caching_every_read_begins_a_transaction(setup: Setup, tmp_path: Path) -> None:
    reader = ReaderProcess(tmp_path / "mirror", ", idle_release=0")
    try:
        assert reader.mode == "uncached"
        version = write(setup, b"u001", 5, 1.0)
        assert int(reader.ask("get u001")[0]) == version
        # no snapshot is held between reads
        assert all(t == "-" for t in _reader_txnids(setup, reader.proc.pid))
    finally:
        reader.stop()


def test_meta_pages_agree_with_lmdb_and_reject_other_files(setup: Setup, tmp_path: Path) -> None:
    pages = _MetaPages(tmp_path / "mirror" / "data.mdb")
    try:
        assert pages.txnid() == setup.mirror.env.info()["last_txnid"]
        write(setup, b"u001", 9, 1.0)
        assert pages.txnid() == setup.mirror.env.info()["last_txnid"]
    finally:
        pages.close()
    bogus = tmp_path / "bogus.mdb"
    bogus.write_bytes(b"\x00" * 16 + (4096).to_bytes(4, "little") * 2000)
    with pytest.raises(ValueError):
        _MetaPages(bogus)
    bogus.write_bytes(b"short")
    with pytest.raises(ValueError):
        _MetaPages(bogus)


def test_a_reader_over_the_mirror_never_caches(setup: Setup) -> None:
    with Reader.over(setup.mirror) as reader:
        assert reader._pages is None
        rec = reader.get("up", b"u001")
        assert rec is not None
        version = write(setup, b"u001", 11, 1.0)
        rec = reader.get("up", b"u001")
        assert rec is not None and rec.cursor.version == version
