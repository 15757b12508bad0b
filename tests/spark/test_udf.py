"""`predict_udf` on the shared local[2] session: typed columns per task, one model load per Python
worker for a whole job, the server's results, a pinned version, bad rows in the error column.

Each test registers fake models in its own catalog, so the workers (which keep loaded versions for
their life, keyed by catalog and version) load afresh in each test."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from moorage.batching import InferenceService, ModelPool
from moorage.batching.pool import PoolConfig
from moorage.config import load_settings
from moorage.engines.spark import predict_udf
from moorage.engines.spark.udf import public_settings
from moorage.errors import BadRequest, ModelNotFound, Unprocessable
from moorage.registry import Registry
from moorage.runtime import Runtime

TEXTS = [f"the model serves batch {i} " + "tokens " * (i % 7) for i in range(48)]


def server_outputs(registry, settings, ref: str, texts: list[str]) -> list[dict]:
    """What the server answers for `texts`: InferenceService over the model pool, encoded."""

    async def run() -> list[dict]:
        pool = ModelPool(registry, Runtime(registry, settings.runtime), [ref], PoolConfig(poll_interval_s=0))
        await pool.start()
        try:
            return (await InferenceService(pool).infer(ref, texts)).encode()["outputs"]
        finally:
            await pool.stop()

    return asyncio.run(run())


@pytest.fixture
def texts_df(spark):
    rows = [(i, t) for i, t in enumerate(TEXTS)]
    return spark.createDataFrame(rows, "id int, text string").repartition(8)  # 8 tasks, 2 at a time


@pytest.fixture
def catalog(tmp_path, fake_model):
    """A fresh catalog with an embedder (two versions, production -> 1), a classifier, a generator."""
    settings = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": "tester"})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed", seed=0), "emb", "embed", alias="production")
    registry.register(fake_model("embed", seed=1), "emb", "embed")
    registry.register(fake_model("classify"), "cls", "classify")
    registry.register(fake_model("generate"), "gen", "generate")
    yield settings, registry
    registry.close()


def test_one_load_per_python_worker_for_the_whole_job_and_the_servers_embeddings(spark, texts_df, catalog):
    settings, registry = catalog
    udf = predict_udf("emb@production", batch_size=4, settings=settings, spark=spark)
    assert udf.pinned.ref == "emb:1"
    rows = texts_df.select("id", "text", udf("text").alias("p")).select("id", "text", "p.*").collect()
    # 8 tasks of 6 rows in batches of 4, on the Python workers of local[2] (reused across tasks)
    assert sorted(udf.load_pids) == sorted(udf.workers) and 1 <= udf.loads < 8

    expected = server_outputs(registry, settings, "emb:1", TEXTS)
    by_id = {r.id: r for r in rows}
    assert sorted(by_id) == list(range(len(TEXTS)))
    for i, served in enumerate(expected):
        assert by_id[i].error is None and by_id[i].tokens == served["tokens"]
        np.testing.assert_allclose(by_id[i].embedding, served["embedding"], rtol=1e-5, atol=1e-6)

    again = predict_udf("emb@production", batch_size=4, settings=settings, spark=spark)  # a re-created UDF
    assert texts_df.select(again("text").alias("p")).where("p.error IS NULL").count() == len(TEXTS)
    assert again.workers and sorted(again.load_pids) == sorted(again.workers - udf.workers)  # kept where loaded


def test_an_alias_moved_after_resolution_does_not_change_the_jobs_version(spark, texts_df, catalog):
    settings, registry = catalog
    pinned = predict_udf("emb@production", settings=settings, spark=spark)
    registry.set_alias("emb", "production", 2, reason="moved while the job is planned")
    moved = predict_udf("emb@production", settings=settings, spark=spark)
    assert (pinned.pinned.version, moved.pinned.version) == (1, 2)

    rows = texts_df.select("id", pinned("text").alias("a"), moved("text").alias("b")).collect()
    runtime = Runtime(registry, settings.runtime)
    v1, v2 = runtime.predict("emb:1", TEXTS), runtime.predict("emb:2", TEXTS)
    for r in rows:
        np.testing.assert_allclose(r.a.embedding, v1[r.id], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.b.embedding, v2[r.id], rtol=1e-5, atol=1e-6)


def test_classify_and_generate_columns_are_typed(spark, texts_df, catalog):
    settings, registry = catalog
    cls = predict_udf("cls", task="classify", settings=settings, spark=spark)
    gen = predict_udf("gen", batch_size=8, parameters={"max_new_tokens": 3}, settings=settings, spark=spark)
    out = texts_df.select("id", cls("text").alias("c"), gen("text").alias("g"))
    fields = {f.name: f.dataType.simpleString() for f in out.schema["c"].dataType.fields}
    assert fields == {"label": "string", "score": "double", "scores": "map<string,double>", "tokens": "int",
                      "error": "string"}  # fmt: skip
    gen_fields = {f.name: f.dataType.simpleString() for f in out.schema["g"].dataType.fields}
    assert gen_fields == {"text": "string", "finish_reason": "string", "prompt_tokens": "int",
                          "completion_tokens": "int", "tokens": "int", "filtered": "boolean",
                          "error": "string"}  # fmt: skip

    labels = server_outputs(registry, settings, "cls", TEXTS)
    for r in out.collect():
        assert (r.c.label, r.c.tokens, r.c.error) == (labels[r.id]["label"], labels[r.id]["tokens"], None)
        assert r.c.score == pytest.approx(labels[r.id]["score"]) and r.c.scores == pytest.approx(labels[r.id]["scores"])
        assert r.g.error is None and r.g.finish_reason == "length" and r.g.completion_tokens == 3
        assert r.g.tokens == r.g.prompt_tokens + 3 and r.g.text and r.g.filtered is False


def test_bad_rows_land_in_the_error_column_and_the_task_goes_on(spark, tmp_path, fake_model):
    env = {"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": "tester",
           "MOORAGE_SECURITY__LIMITS__MAX_TEXT_CHARS": "40"}  # fmt: skip
    settings = load_settings(environ=env)
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    registry.close()
    rows = [(0, "fine"), (1, None), (2, ""), (3, "x" * 41), (4, "also fine")]
    df = spark.createDataFrame(rows, "id int, text string").coalesce(1)  # one task holds every bad row
    udf = predict_udf("emb", settings=settings, spark=spark)
    out = {r.id: r.p for r in df.select("id", udf("text").alias("p")).collect()}
    assert [i for i, p in out.items() if p.error is None] == [0, 4]
    assert all(len(out[i].embedding) == 8 for i in (0, 4))
    assert out[1].error == out[2].error == "invalid_input: a non-empty string is needed for this model"
    assert out[3].error == "text_too_long: input has 41 characters; the limit is 40"
    assert out[3].embedding is None and out[3].tokens is None


def test_the_driver_refuses_what_no_worker_could_run(spark, catalog):
    settings, _ = catalog
    with pytest.raises(ModelNotFound):
        predict_udf("nope@production", settings=settings, spark=spark)
    with pytest.raises(BadRequest, match="emb:1 has task embed, not generate"):
        predict_udf("emb", task="generate", settings=settings, spark=spark)
    with pytest.raises(Unprocessable, match="max_new_tokens"):
        predict_udf("gen", parameters={"max_new_tokens": 0}, settings=settings, spark=spark)


def test_workers_are_told_no_secret_and_read_theirs_from_their_own_environment():
    env = {"MOORAGE_HOME": "/srv/moorage", "MOORAGE_REGISTRY__CATALOG_URL": "postgresql://app:s3cret@db/moorage",
           "MOORAGE_SECURITY__MASTER_KEY": "bWFzdGVyLWtleQ==", "MOORAGE_REGISTRY__STORAGE_OPTIONS":
           '{"key": "AKIA1", "secret": "hush", "endpoint_url": "http://127.0.0.1:9000"}'}  # fmt: skip
    shipped = public_settings(load_settings(environ=env))
    assert not any(secret in json.dumps(shipped) for secret in ("s3cret", "bWFzdGVyLWtleQ==", "AKIA1", "hush"))
    worker = load_settings(overrides=shipped, environ=env)  # a worker with the same environment
    assert worker.catalog_url == env["MOORAGE_REGISTRY__CATALOG_URL"] and str(worker.home) == "/srv/moorage"
    assert worker.security.master_key is not None and worker.registry.storage_options["secret"] == "hush"
