"""Security end to end with real processes: keys from the CLI, a TLS server with auth on, the
audit log verified, tampered and exported from the CLI, encrypted artifacts through the CLI."""

from __future__ import annotations

import datetime
import ipaddress
import json
import sqlite3
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from moorage.runtime import make_fake_model


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_signed(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def secure_env(cli_env):
    cli_env["MOORAGE_SECURITY__AUTH"] = "true"
    return cli_env


def test_tls_server_with_keys_and_a_tamper_evident_audit(cli, secure_env, tmp_path):
    folder = make_fake_model(tmp_path / "emb", "embed")
    cli("models", "register", str(folder), "--name", "emb", "--task", "embed", check=True)
    invoker = cli("keys", "create", "--role", "invoker", "--models", "emb", "-q", check=True).stdout.strip()
    assert invoker.startswith("moor_")
    listed = json.loads(cli("keys", "list", "--json", check=True).stdout)
    assert [k["role"] for k in listed] == ["invoker"] and invoker not in json.dumps(listed)

    cert, key = _self_signed(tmp_path)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moorage", "serve", "-m", "emb", "--port", str(port)]
        + ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        env=secure_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=5) as client:
            deadline = time.time() + 60
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if client.get(url + "/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "server not ready"
                time.sleep(0.2)
            body = {"model": "emb", "input": "over tls"}
            assert client.post(url + "/v1/embeddings", json=body).status_code == 401
            r = client.post(url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {invoker}"})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
            assert client.post(url + "/admin/reload", headers={"Authorization": f"Bearer {invoker}"}).status_code == 403
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # and a client that does not trust the certificate refuses it
            httpx.get(url + "/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    out = cli("audit", "verify", check=True).stdout
    assert "chain intact" in out
    rows = [json.loads(line) for line in cli("audit", "export", check=True).stdout.splitlines()]
    actions = [(r["action"], r["status"]) for r in rows]
    assert ("register", 0) in actions and (
        "POST /v1/embeddings",
        401,
    ) in actions  # refused before routing and ("embeddings", 200) in actions
    assert ("reload", 403) in actions
    assert all(len(r["hash"]) == 64 for r in rows)

    edited = next(r["seq"] for r in rows if r["action"] == "embeddings" and r["status"] == 200)
    with sqlite3.connect(secure_env["MOORAGE_HOME"] + "/catalog.db") as db:
        db.execute("UPDATE audit_log SET status = 401 WHERE seq = ?", (edited,))
    failed = cli("audit", "verify")
    assert failed.returncode == 1 and f"row {edited} was edited" in failed.stdout


def test_encrypted_register_and_predict_from_the_cli(cli, cli_env, tmp_path):
    key_file = tmp_path / "master.key"
    made = cli("models", "new-master-key", str(key_file), check=True)
    assert "wrote master key" in made.stdout and oct(key_file.stat().st_mode)[-3:] == "600"
    folder = make_fake_model(tmp_path / "emb", "embed")
    cli_env["MOORAGE_SECURITY__MASTER_KEY_FILE"] = str(key_file)
    cli("models", "register", str(folder), "--name", "emb", "--task", "embed", "--encrypt", check=True)
    assert "→" in cli("predict", "emb", "hello", check=True).stdout
    del cli_env["MOORAGE_SECURITY__MASTER_KEY_FILE"]
    keyless = cli("predict", "emb", "hello")
    assert keyless.returncode == 2 and "a master key is needed to load emb:1" in keyless.stderr
    assert "Traceback" not in keyless.stderr
    new_key = tmp_path / "new.key"
    cli("models", "new-master-key", str(new_key), check=True)
    cli_env["MOORAGE_SECURITY__MASTER_KEY_FILE"] = str(key_file)
    assert "re-wrapped 1 data key" in cli("models", "rekey", "--new-key-file", str(new_key), check=True).stdout
    assert cli("predict", "emb", "hello").returncode == 2  # the old key no longer opens it
    cli_env["MOORAGE_SECURITY__MASTER_KEY_FILE"] = str(new_key)
    assert "→" in cli("predict", "emb", "hello", check=True).stdout
