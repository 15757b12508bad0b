"""Datasets on real services: a PostgreSQL catalog (migration 0005 and its foreign keys) and an
S3-protocol store, reading the source file from S3 with fsspec storage options."""

from __future__ import annotations

import json

import fsspec

from moorage.db import Catalog
from moorage.registry import Registry
from moorage.registry.store import ArtifactStore
from moorage.training.datasets import Datasets


def test_datasets_on_postgres_and_s3(pg_url, s3_store, fake_model, tmp_path):
    store_url, options = s3_store
    source = f"{store_url.rsplit('/', 1)[0]}/incoming/news.jsonl"
    rows = [{"text": f"{label} story {i}", "label": label} for label in ("sport", "tech") for i in range(10)]
    with fsspec.open(source, "w", **options) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))

    registry = Registry(pg_url, store_url, storage_options=options, user="pg-tester", cache_dir=tmp_path / "cache")
    datasets = Datasets(Catalog(pg_url), ArtifactStore(store_url, options), user="pg-tester")
    version = datasets.add("news", source, storage_options=options)
    assert version.stats["rows"] == 20 and sum(s.rows for s in version.splits.values()) == 20
    assert {e.text for e in datasets.examples(version, "test")} <= {r["text"] for r in rows}
    assert datasets.add("news", source, storage_options=options) == version  # the same rows: not stored again

    model = registry.register(fake_model("classify"), "topics", "classify")
    datasets.record_use(version, model.name, model.version)
    assert datasets.uses("news") == [("topics", 1, "trained")]
    registry.delete_version("topics", 1)
    assert datasets.uses("news") == []  # the use row went with its model version
    datasets.close()
    registry.close()
