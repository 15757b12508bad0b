"""The registry on real services: a PostgreSQL catalog and an S3-protocol artifact store."""

import numpy as np

from moorage.config import RuntimeSettings
from moorage.registry import Registry, export_model, import_models
from moorage.runtime import Runtime


def test_walkthrough_on_postgres(pg_url, tmp_path, fake_model):
    reg = Registry(pg_url, str(tmp_path / "store"), user="pg-tester")
    assert reg.catalog.dialect == "postgresql"
    reg.register(fake_model(seed=1), "x", "embed")
    reg.register(fake_model(seed=2), "x", "embed")
    reg.set_alias("x", "production", 1)
    reg.set_alias("x", "production", 2)
    assert reg.rollback("x", "production").to_version == 1
    assert [(h.from_version, h.to_version) for h in reg.history("x")] == [(None, 1), (1, 2), (2, 1)]
    reg.close()
    # a second process-like open sees the same catalog, already migrated
    again = Registry(pg_url, str(tmp_path / "store"))
    assert again.resolve("x").version == 1
    again.close()


def test_export_sqlite_local_import_postgres_s3(registry, pg_url, s3_store, tmp_path, fake_model, registry_snapshot):
    """local store + SQLite -> export folder -> S3-protocol store + PostgreSQL, nothing lost."""
    for seed in (1, 2, 3):
        registry.register(
            fake_model(seed=seed),
            "x",
            "embed",
            tags={"seed": str(seed)},
            lineage={"parent": None, "dataset_sha256": "cd" * 32},
        )
    registry.set_alias("x", "production", 2)
    registry.set_alias("x", "production", 3, "promote")
    registry.rollback("x", "production", "regression")
    registry.set_alias("x", "staging", 3)
    store_url, options = s3_store
    export_model(registry, "x", f"{store_url.rsplit('/', 1)[0]}/exports", storage_options=options)

    target = Registry(pg_url, store_url, storage_options=options, user="importer", cache_dir=tmp_path / "cache")
    assert import_models(target, f"{store_url.rsplit('/', 1)[0]}/exports", storage_options=options) == ["x"]
    assert registry_snapshot(target, "x") == registry_snapshot(registry, "x")
    assert len(target.history("x")) == 4
    assert all(target.verify(f"x:{v}") == [] for v in (1, 2, 3))

    # the remote store is fetched into the local cache, verified, and serves the same outputs
    remote = Runtime(target, RuntimeSettings()).predict("x@staging", ["hello"])[0]
    local = Runtime(registry, RuntimeSettings()).predict("x:3", ["hello"])[0]
    assert np.allclose(remote, local)
    # a damaged cached copy is fetched again from the store, not served and not fatal
    cached = next((tmp_path / "cache").rglob("weights.safetensors"))
    cached.write_bytes(b"garbage")
    runtime = Runtime(target, RuntimeSettings())
    assert np.allclose(runtime.predict("x@staging", ["hello"])[0], local)
    assert cached.stat().st_size > len(b"garbage")
    target.close()


def test_tampered_object_in_s3_is_detected(pg_url, s3_store, tmp_path, fake_model):
    import s3fs

    store_url, options = s3_store
    reg = Registry(pg_url, store_url, storage_options=options, cache_dir=tmp_path / "cache")
    reg.register(fake_model(), "x", "embed")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    key = f"{store_url[5:]}/x/1/weights.safetensors"
    data = bytearray(fs.cat_file(key))
    data[10] ^= 1
    fs.pipe_file(key, bytes(data))
    assert reg.verify("x")[0].startswith("weights.safetensors: checksum mismatch")
    reg.close()
