"""Keys, the audit chain and wrapped data keys on a real PostgreSQL catalog: several writers (two
catalog connections, many threads) append to one chain and it stays intact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from moorage.errors import Unauthorized
from moorage.registry import Registry, crypto
from moorage.security.audit import AuditEntry, AuditLog
from moorage.security.keys import KeyStore


def test_audit_chain_stays_intact_under_concurrent_writers(pg_url, tmp_path):
    a = Registry(pg_url, str(tmp_path / "store"))
    b = Registry(pg_url, str(tmp_path / "store"))  # as if a second server process
    logs = [AuditLog(a.catalog), AuditLog(b.catalog)]

    def write(i: int) -> None:
        batch = [AuditEntry(key_id=f"k{i}", action="embeddings", status=200, model="emb", version=1)] * 5
        logs[i % 2].append(batch)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(40)))
    logs[0].append([AuditEntry(key_id="x" * 500, action="POST /" + "a" * 500, status=401, model="m" * 500)])
    count, problems = logs[1].verify()
    assert (count, problems) == (201, [])
    assert [r["seq"] for r in logs[0].rows()] == list(range(1, 202))


def test_keys_and_encrypted_versions_on_postgres(pg_url, tmp_path, fake_model):
    keys = KeyStore(Registry(pg_url, str(tmp_path / "store")).catalog)
    info, key = keys.create("operator", models=["emb"])
    assert keys.authenticate(key).role == "operator"
    keys.revoke(info.id)
    with pytest.raises(Unauthorized):
        keys.authenticate(key)

    class Security:
        encrypt_artifacts = True
        master_key = None
        master_key_file = tmp_path / "master.key"

    Security.master_key_file.write_text(crypto.generate_master_key())
    reg = Registry(pg_url, str(tmp_path / "store"), security=Security())
    reg.register(fake_model("embed"), "emb", "embed")
    new_key = crypto.MasterKey.from_text(crypto.generate_master_key(), "test")
    assert reg.rekey(new_key) == (1, [])
    info = reg.resolve("emb:1")
    assert reg.read_plaintext(info, reg.local_path(info))["fake.json"].startswith(b"{")
