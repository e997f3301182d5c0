"""`todi serve` over TLS, and the REST client that verifies it (`todi precompute --server
https://... --ca-file`).

The test makes its own certificate authority and a server certificate for 127.0.0.1 with
`cryptography`, serves the real teacher (hf backend) over HTTPS as a `todi serve` process,
and checks that:
- a client that trusts the CA gets answers, the key still guards `/v1`, and a precompute job
  runs end to end over HTTPS;
- a client that trusts another CA (a stranger's), or only the system's CAs, is refused before
  any HTTP is spoken, with an error that says what to do; plain HTTP to the TLS port gets no
  answer;
- bad TLS configuration (half a pair, a key that is not the certificate's, a missing file,
  `--ca-file` with an http:// server) is a one-line error before the engine loads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from todi.storage import verify_shard_set

ROOT = Path(__file__).resolve().parents[1]
KEY = "tls-test-key"

pytestmark = pytest.mark.timeout(600)


# -- certificates ---------------------------------------------------------------------------
def _write_key(key, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(subject: str, issuer_name, issuer_key, key, *, ca: bool, sans=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class Pki:
    """Two independent CAs (ours and a stranger's) and a server certificate from ours."""

    def __init__(self, folder: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pem = serialization.Encoding.PEM
        self.folder = folder
        ca_key, stranger_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
        ca = _cert("todi test CA", None, None, ca_key, ca=True)
        stranger = _cert("a stranger's CA", None, None, stranger_key, ca=True)
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        server = _cert("127.0.0.1", ca.subject, ca_key, server_key, ca=False, sans=sans)
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(ca.public_bytes(pem))
        self.stranger_ca = folder / "stranger-ca.pem"
        self.stranger_ca.write_bytes(stranger.public_bytes(pem))
        self.cert = folder / "server.pem"
        self.cert.write_bytes(server.public_bytes(pem))
        self.key = folder / "server.key"
        _write_key(server_key, self.key)
        self.other_key = folder / "other.key"  # a valid key that is not the certificate's
        _write_key(stranger_key, self.other_key)


# -- the server -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TODI_API_KEY", "TODI_CA_FILE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki, teacher_dir: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls-serve")
    port = _free_port()
    log = tmp / "serve.log"
    cmd = [
        sys.executable, "-m", "todi.cli", "serve", "--backend", "hf",
        "--model", str(teacher_dir), "--host", "127.0.0.1", "--port", str(port),
        "--storage-root", str(tmp / "storage"), "--max-model-len", "256",
        "--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.key), "--log-level", "warning",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(TODI_API_KEY=KEY), cwd=tmp,
            start_new_session=True,
        )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"todi serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/healthz", verify=trusted, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"todi serve (TLS) not ready after 300 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "tmp": tmp, "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cli():
    from todi.cli import app

    runner = CliRunner()

    def run(*args, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return run


def _user_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


# -- tests ----------------------------------------------------------------------------------
def test_https_answers_a_client_that_trusts_the_ca_and_still_needs_the_key(tls_server, pki):
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=tls_server["url"], verify=trusted, timeout=60) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/v1/teacher").status_code == 401
        wrong = client.get("/v1/teacher", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.get("/v1/teacher", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["backend"] == "hf", ok.text
        # What was negotiated really is TLS.
        raw = socket.create_connection(("127.0.0.1", tls_server["port"]))
        with trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_precompute_over_https_with_the_ca_file(tls_server, pki, tmp_path):
    data = tls_server["tmp"] / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": f"The number {i} is small."}) + "\n"
                for i in range(3))
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "todi.cli", "precompute", "--dataset", str(data), "--out", "tls",
        "--top-k", "4", "--server", tls_server["url"], "--ca-file", str(pki.ca), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=_env(TODI_API_KEY=KEY), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["state"] == "succeeded" and final["sequences_done"] == 3, final
    verify_shard_set(tls_server["tmp"] / "storage" / "tls")
    # TODI_CA_FILE is the same thing as --ca-file (e.g. for the compose jobs).
    env = _env(TODI_API_KEY=KEY, TODI_CA_FILE=str(pki.ca))
    cmd_env = [c for c in cmd if c not in ("--ca-file", str(pki.ca))]
    cmd_env[cmd_env.index("tls")] = "tls-env"
    proc = subprocess.run(cmd_env, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr


def test_a_client_trusting_another_ca_is_refused(tls_server, pki, cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    base = ["precompute", "--dataset", data, "--out", "never", "--top-k", "2",
            "--server", tls_server["url"], "--no-progress"]  # fmt: skip
    env = {"TODI_API_KEY": KEY, "TODI_CA_FILE": ""}
    line = _user_error(
        cli(*base, "--ca-file", pki.stranger_ca, env=env), "CERTIFICATE_VERIFY_FAILED", "--ca-file"
    )
    assert KEY not in line
    # Only the system's trusted CAs: refused as well.
    _user_error(cli(*base, env=env), "CERTIFICATE_VERIFY_FAILED")
    # The same at the TLS layer, without the project's client.
    stranger = ssl.create_default_context(cafile=str(pki.stranger_ca))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_server["url"] + "/healthz", verify=stranger, timeout=10)
    # Plain HTTP to the TLS port: no answer in clear text.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server['port']}/healthz", timeout=10)
    assert not (tls_server["tmp"] / "storage" / "never").exists()


def test_bad_tls_configuration_is_a_clear_error(cli, pki, teacher_dir, tmp_path):
    base = ["serve", "--model", teacher_dir, "--storage-root", tmp_path / "s"]
    _user_error(cli(*base, "--ssl-certfile", pki.cert), "both a certificate and its key")
    _user_error(cli(*base, "--ssl-keyfile", pki.key), "both a certificate and its key")
    _user_error(
        cli(*base, "--ssl-certfile", pki.cert, "--ssl-keyfile", pki.other_key),
        "cannot use TLS certificate",
    )
    _user_error(
        cli(*base, "--ssl-certfile", tmp_path / "missing.pem", "--ssl-keyfile", pki.key),
        "no such file",
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    pre = ["precompute", "--dataset", data, "--out", "o", "--top-k", "2"]
    _user_error(cli(*pre, "--server", "http://127.0.0.1:9", "--ca-file", pki.ca), "https://")
    _user_error(
        cli(*pre, "--server", "https://127.0.0.1:9", "--ca-file", tmp_path / "nope.pem"),
        "no such file",
    )
    _user_error(cli(*pre, "--server", "127.0.0.1:9"), "https://HOST:PORT")
