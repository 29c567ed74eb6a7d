"""Security, with real processes: bearer tokens (constant-time comparison,
never logged, read tokens never write -- at the origin and at a relay), the
mirror's file modes, and TLS (an origin serving HTTPS with a self-signed
certificate made here with ``openssl``, a sidecar syncing over it with
``ca_file``).

``tests/test_http_api.py::test_auth_matrix`` already checks every origin
endpoint against no, unknown, read and write tokens; the tests here fill the
gaps: state unchanged after a refused write, no dataset-existence oracle
without a token, the relay's own tokens, and every log of a deployment.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.reader import Reader
from tests.chaos import PatientSidecar
from tests.origin_proc import OriginProcess, free_port
from tests.procs import ROOT

WRITE = "wtok-secret-6c1f0e9d8b7a"
READ = "rtok-secret-3e5d7c9b1a2f"
RELAY = "relaytok-secret-9a8b7c6d5e4f"
BAD = "badtok-secret-1029384756ab"
SECRETS = (WRITE, READ, RELAY, BAD)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --------------------------------------------------------------------- the code


def _token_comparisons(path: Path) -> list[str]:
    """``==``, ``!=``, ``in`` or ``not in`` with a name that mentions a token
    on either side: a comparison that may exit at the first differing byte."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            continue
        names = [
            n.id if isinstance(n, ast.Name) else n.attr
            for side in (node.left, *node.comparators)
            for n in ast.walk(side)
            if isinstance(n, ast.Name | ast.Attribute)
        ]
        if any("token" in name.lower() and "file" not in name.lower() for name in names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_tokens_are_compared_in_constant_time_only() -> None:
    found: list[str] = []
    for package in ("replicad", "sidecar"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += _token_comparisons(path)
    assert not found, "tokens compared with ==/in (not constant time):\n" + "\n".join(found)
    # and the one place that checks them uses hmac.compare_digest against
    # every known token, with no early exit
    source = (ROOT / "replicad" / "http_app.py").read_text()
    authorize = source[
        source.index("def _authorize") : source.index("# ----", source.index("def _authorize"))
    ]
    assert authorize.count("hmac.compare_digest(") == 2
    assert "break" not in authorize and "return True" not in authorize


# --------------------------------------------------------------------- tokens at the origin


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    with OriginProcess(
        tmp_path_factory.mktemp("sec"),
        write_tokens=[WRITE],
        read_tokens=[READ],
        durable=False,
        start_timeout=60,
    ) as proc:
        resp = httpx.post(
            proc.base_url + "/v1/datasets",
            json={"name": "sec", "opaque": True},
            headers=bearer(WRITE),
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        resp = httpx.post(
            proc.base_url + "/v1/datasets/sec/batch",
            json={"upserts": {"k": "v"}},
            headers=bearer(WRITE),
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        yield proc


WRITES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/datasets", {"json": {"name": "sec2", "opaque": True}}),
    ("PUT", "/v1/datasets/sec/schema", {"json": {"fields": [{"name": "a", "type": "int"}]}}),
    ("POST", "/v1/datasets/sec/reset-history", {}),
    ("POST", "/v1/datasets/sec/batch", {"json": {"upserts": {"k": "changed"}}}),
    ("POST", "/v1/datasets/sec/replace", {"json": {"records": {}}}),
]


def _state(base_url: str) -> Any:
    resp = httpx.get(base_url + "/v1/datasets", headers=bearer(WRITE), timeout=10)
    assert resp.status_code == 200
    return sorted(
        (d["name"], d["epoch"], d["version"], d["digest"]) for d in resp.json()["datasets"]
    )


def test_a_read_token_never_writes(origin: OriginProcess) -> None:
    before = _state(origin.base_url)
    with httpx.Client(base_url=origin.base_url, headers=bearer(READ), timeout=10) as client:
        for method, path, kwargs in WRITES:
            resp = client.request(method, path, **kwargs)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "forbidden"
        # the same token spelled differently is the same (or no) token, never more
        for header in (f"bearer {READ}", f"BEARER  {READ}", f"Bearer\t{READ}"):
            resp = client.post(
                "/v1/datasets/sec/batch",
                json={"upserts": {"k": "x"}},
                headers={"authorization": header},
            )
            assert resp.status_code in (401, 403), (header, resp.status_code)
    assert _state(origin.base_url) == before


def test_no_dataset_existence_oracle_without_a_token(origin: OriginProcess) -> None:
    for path in (
        "/v1/datasets/sec",
        "/v1/datasets/no-such-one",
        "/v1/datasets/sec/records/k",
        "/v1/datasets/no-such-one/records/k",
    ):
        for headers in ({}, bearer(BAD)):
            resp = httpx.get(origin.base_url + path, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, resp.status_code)
            assert BAD not in resp.text


def test_documented_open_endpoints(origin: OriginProcess) -> None:
    # docs/api.md: /healthz, /metrics and /openapi.json need no token (metrics
    # scrapers and API tools); nothing else is open
    for path in ("/healthz", "/metrics", "/openapi.json"):
        resp = httpx.get(origin.base_url + path, timeout=10)
        assert resp.status_code == 200, path
        assert not any(s in resp.text for s in SECRETS), path
    resp = httpx.get(origin.base_url + "/v1/fleet", timeout=10)
    assert resp.status_code == 401


# --------------------------------------------------------------------- tokens in every log


def _poke(base_url: str, tokens: list[str]) -> None:
    """Requests with good, bad and oddly placed tokens on every route."""
    paths = [
        "/v1/datasets",
        "/v1/datasets/sec",
        "/v1/datasets/sec/records/k",
        "/v1/fleet",
        "/v1/hints?datasets=nope",
        "/v1/datasets/sec/batch",
        "/healthz",
        "/metrics",
    ]
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for token in tokens:
            variants = [
                bearer(token),
                {"authorization": f"Basic {token}"},
                {"authorization": token},
                {"x-api-key": token},
                {"authorization": f"Bearer {token}{token}"},
            ]
            for headers in variants:
                for path in paths:
                    if path.endswith("/batch"):
                        client.post(path, json={"upserts": {token: token}}, headers=headers)
                    elif "hints" in path:
                        with client.stream("GET", path, headers=headers) as resp:
                            assert resp.status_code in (401, 404), resp.status_code
                    else:
                        resp = client.get(path, headers=headers)
                        assert token not in resp.text or path == "/v1/datasets/sec/records/k"
            client.get(f"/v1/datasets?access_token={token}", headers=bearer(token))
            client.get(f"/v1/datasets/{token}", headers=bearer(token))


def test_tokens_never_reach_any_log(tmp_path: Path) -> None:
    relay_port = free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    with OriginProcess(
        tmp_path / "origin",
        write_tokens=[WRITE],
        read_tokens=[READ],
        durable=False,
        start_timeout=60,
    ) as origin:
        with httpx.Client(base_url=origin.base_url, headers=bearer(WRITE), timeout=30) as w:
            assert w.post("/v1/datasets", json={"name": "sec", "opaque": True}).status_code == 201
            assert w.post("/v1/datasets/sec/batch", json={"upserts": {"k": "v"}}).status_code == 200
        relay = PatientSidecar(
            tmp_path / "relay",
            origin.base_url,
            ["sec"],
            token=READ,
            poll_interval=0.5,
            extra_env={
                "SIDECAR_SERVE_SYNC": f"127.0.0.1:{relay_port}",
                "SIDECAR_RELAY_READ_TOKENS": RELAY,
                "SIDECAR_ACK_INTERVAL": "0.5",
            },
        )
        leaf = PatientSidecar(tmp_path / "leaf", relay_url, ["sec"], token=RELAY, poll_interval=0.5)
        wrong = PatientSidecar(tmp_path / "wrong", origin.base_url, ["sec"], token=BAD)
        # a sidecar that presents the origin's write token to the relay: refused there
        stray = PatientSidecar(tmp_path / "stray", relay_url, ["sec"], token=WRITE)
        logs: list[Path] = []
        with relay, leaf, wrong, stray:
            relay.wait_ready()
            leaf.wait_ready()
            wrong.wait_until(lambda s: s["datasets"]["sec"]["errors"] >= 2)
            stray.wait_until(lambda s: s["datasets"]["sec"]["errors"] >= 2)
            assert not stray.status()["ready"] and not wrong.status()["ready"]
            assert "token" in str(wrong.status()["datasets"]["sec"]["last_error"])
            # a relay serves reads to its own token only, and never writes
            assert (
                httpx.get(relay_url + "/v1/datasets/sec", headers=bearer(RELAY)).status_code == 200
            )
            for token in (WRITE, READ, BAD):
                assert (
                    httpx.get(relay_url + "/v1/datasets/sec", headers=bearer(token)).status_code
                    == 401
                )
            resp = httpx.post(
                relay_url + "/v1/datasets/sec/batch",
                json={"upserts": {"k": "x"}},
                headers=bearer(RELAY),
            )
            assert resp.status_code == 403
            _poke(origin.base_url, list(SECRETS))
            _poke(relay_url, list(SECRETS))
            for proc in (relay, leaf, wrong, stray):
                for path in ("/status", "/metrics", "/readyz", "/healthz"):
                    text = httpx.get(proc.health_url + path, timeout=10).text
                    assert not any(s in text for s in SECRETS), (proc.workdir.name, path)
            for proc in (relay, leaf, wrong, stray):
                proc.stop()
                logs.append(proc.log_path)
                text = proc.log_path.read_text(errors="replace")
                assert "sidecar running" in text
                leaked = [s for s in SECRETS if s in text]
                assert not leaked, (proc.workdir.name, leaked)
        origin.stop()
        text = origin.log_path.read_text(errors="replace")
        assert '"msg": "request"' in text and '"status": 401' in text  # the requests were logged
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, ("origin", leaked)


# --------------------------------------------------------------------- file modes


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mode", "mask"), [(0o640, 0o077), (0o660, 0o022), (0o600, 0o000)])
def test_mirror_files_get_the_configured_mode_whatever_the_umask(
    tmp_path: Path, mode: int, mask: int
) -> None:
    with OriginProcess(tmp_path / "origin", durable=False, start_timeout=60) as origin:
        assert (
            httpx.post(
                origin.base_url + "/v1/datasets", json={"name": "m", "opaque": True}, timeout=30
            ).status_code
            == 201
        )
        sidecar = PatientSidecar(
            tmp_path / "s", origin.base_url, ["m"], extra_env={"SIDECAR_FILE_MODE": oct(mode)}
        )
        with umask(mask), sidecar:
            sidecar.wait_ready()
            for name in ("data.mdb", "lock.mdb"):
                got = stat.S_IMODE((sidecar.data / name).stat().st_mode)
                assert got == mode, (name, oct(got), oct(mode))


# --------------------------------------------------------------------- TLS


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (skips the test
    without openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    done = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {done.stderr.strip()[:200]}")
    return cert, key


class TLSOrigin(OriginProcess):
    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def test_an_https_origin_and_a_sidecar_syncing_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    origin = TLSOrigin(
        tmp_path / "origin",
        start_timeout=60,
        durable=False,
        write_tokens=[WRITE],
        read_tokens=[READ],
        extra_config=f'tls_cert = "{cert}"\ntls_key = "{key}"',
    )
    # the fixture's own health check trusts the certificate through the
    # environment; the sidecars below do not inherit that (ca_file only)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with origin:
        monkeypatch.delenv("SSL_CERT_FILE")
        with httpx.Client(
            base_url=origin.base_url, headers=bearer(WRITE), verify=context, timeout=30
        ) as w:
            assert w.post("/v1/datasets", json={"name": "tls", "opaque": True}).status_code == 201
            assert (
                w.post("/v1/datasets/tls/batch", json={"upserts": {"k": "v1"}}).status_code == 200
            )
            # plain HTTP to the TLS port, and TLS without the CA, both fail
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{origin.port}/healthz", timeout=5)
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(origin.base_url + "/healthz", timeout=5)
            good = PatientSidecar(
                tmp_path / "good",
                origin.base_url,
                ["tls"],
                token=READ,
                poll_interval=0.5,
                extra_env={"SIDECAR_CA_FILE": str(cert)},
            )
            untrusting = PatientSidecar(
                tmp_path / "untrusting", origin.base_url, ["tls"], token=READ
            )
            with good, untrusting:
                good.wait_ready()
                version = w.post("/v1/datasets/tls/batch", json={"upserts": {"k": "v2"}}).json()[
                    "version"
                ]
                good.wait_version("tls", version, timeout=20)  # hints and pulls over TLS
                # without the CA the sidecar refuses the origin and never syncs,
                # and says why (under trio, httpx raises a bare ConnectError:
                # the client finds the TLS reason in its cause chain)
                st = untrusting.wait_until(lambda s: s["datasets"]["tls"]["errors"] >= 2)
                assert "certificate" in str(st["datasets"]["tls"]["last_error"]).lower(), st
                assert st["datasets"]["tls"]["version"] is None and not st["ready"]
                with Reader(good.data) as reader:
                    rec = reader.get("tls", b"k")
                    assert rec is not None and rec.value == b"v2"


def test_a_refused_certificate_is_named_in_the_error() -> None:
    """httpx under trio raises a bare ConnectError for a failed TLS
    verification; the client's error carries the reason from the chain."""
    import ssl

    from replicad.client import _request_failed

    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    verify.verify_message = "self-signed certificate"
    try:
        try:
            raise verify
        except ssl.SSLError as inner:
            raise httpx.ConnectError("") from inner
    except httpx.ConnectError as outer:
        err = _request_failed("https://origin:7070", outer)
    assert str(err) == (
        "origin https://origin:7070 unavailable: ConnectError (TLS: self-signed certificate)"
    )
    plain = _request_failed("http://origin:7070", httpx.ConnectError("[Errno 111] refused"))
    assert str(plain) == "origin http://origin:7070 unavailable: [Errno 111] refused"


def test_a_relay_serves_the_sync_api_over_tls(tmp_path: Path) -> None:
    """relay_tls_cert/relay_tls_key: the relay's sync port speaks HTTPS; a
    sidecar below with the CA (ca_file) syncs through it, plain HTTP to that
    port fails, and a certificate that does not load stops the relay at start
    with a message naming the setting."""
    cert, key = make_certificate(tmp_path)
    relay_port = free_port()
    with (
        OriginProcess(tmp_path / "origin", durable=False) as origin,
        httpx.Client(base_url=origin.base_url, timeout=30) as w,
    ):
        assert w.post("/v1/datasets", json={"name": "tls", "opaque": True}).status_code == 201
        assert w.post("/v1/datasets/tls/batch", json={"upserts": {"k": "v1"}}).status_code == 200
        relay_env = {
            "SIDECAR_SERVE_SYNC": f"127.0.0.1:{relay_port}",
            "SIDECAR_RELAY_TLS_CERT": str(cert),
            "SIDECAR_RELAY_TLS_KEY": str(key),
        }
        relay = PatientSidecar(tmp_path / "relay", origin.base_url, ["tls"], extra_env=relay_env)
        with relay:
            relay.wait_ready()
            relay_url = f"https://127.0.0.1:{relay_port}"
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{relay_port}/healthz", timeout=5)
            leaf = PatientSidecar(
                tmp_path / "leaf",
                relay_url,
                ["tls"],
                poll_interval=0.5,
                extra_env={"SIDECAR_CA_FILE": str(cert)},
            )
            with leaf:
                leaf.wait_ready()
                version = w.post("/v1/datasets/tls/batch", json={"upserts": {"k": "v2"}}).json()[
                    "version"
                ]
                leaf.wait_version("tls", version, timeout=20)
                with Reader(leaf.data) as reader:
                    rec = reader.get("tls", b"k")
                    assert rec is not None and rec.value == b"v2"
        # a key that is not the certificate's: a clear error at start, no port
        (tmp_path / "other").mkdir()
        _, other_key = make_certificate(tmp_path / "other")
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "run",
             "--origin", origin.base_url, "--datasets", "tls",
             "--data", str(tmp_path / "bad"), "--serve-sync", f"127.0.0.1:{free_port()}"],
            env={**os.environ, "SIDECAR_RELAY_TLS_CERT": str(cert),
                 "SIDECAR_RELAY_TLS_KEY": str(other_key)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode != 0
        assert "relay_tls_cert/relay_tls_key" in done.stderr, done.stderr
        assert "not a certificate and its key" in done.stderr, done.stderr
