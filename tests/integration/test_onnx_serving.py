"""ONNX versions served by the same app and batching engine as torch ones: over HTTP, listed
with their framework and precision, and hot-swapped in by an alias move under load."""

from __future__ import annotations

import asyncio
from asyncio import run

import numpy as np
import pytest

from tests.support import eventually, tiny_onnx_folder

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

TEXTS = ["stocks fell sharply on Monday", "a late goal in extra time", "the new chip is faster"]
CLIENTS = 6
SEEN_AFTER_SWAP = 3  # each client stops once the ONNX version answered it this often
MAX_REQUESTS = 3000  # per client: a swap that never happens fails instead of hanging


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {task: tiny_onnx_folder(root, task) for task in ("embed", "classify")}


@pytest.fixture
def fp32_settings(settings):
    runtime = settings.runtime.model_copy(update={"dtype": "float32", "num_threads": 1})
    return settings.model_copy(update={"runtime": runtime})


def test_onnx_versions_answer_embeddings_and_classify_over_http_like_their_torch_parents(
    fp32_settings, registry, exported, serving
):
    registry.register(exported["embed"][0], "emb", "embed", alias="torch")
    registry.register(exported["embed"][1], "emb", "embed", alias="onnx")
    registry.register(exported["classify"][0], "news", "classify", alias="torch")
    registry.register(exported["classify"][1], "news", "classify", alias="onnx")
    refs = ["emb@torch", "emb@onnx", "news@torch", "news@onnx"]

    async def main():
        async with serving(fp32_settings, registry, refs) as (app, c):
            listed = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
            embeddings = {
                ref: (await c.post("/v1/embeddings", json={"model": ref, "input": TEXTS})).json()
                for ref in ("emb@torch", "emb@onnx")
            }
            classified = {
                ref: await c.post("/v1/classify", json={"model": ref, "input": TEXTS})
                for ref in ("news@torch", "news@onnx")
            }
            predicted = await c.post("/v1/models/news@onnx/predict", json={"inputs": TEXTS})
            return listed, embeddings, classified, predicted

    listed, embeddings, classified, predicted = run(main())
    assert {k: (m["framework"], m["precision"], m["version"]) for k, m in listed.items()} == {
        "emb@torch": ("sentence-transformers", "fp32", 1),
        "emb@onnx": ("onnx", "fp32", 2),
        "news@torch": ("transformers", "fp32", 1),
        "news@onnx": ("onnx", "fp32", 2),
    }
    assert all({"id", "object", "created", "owned_by", "task", "version"} <= set(m) for m in listed.values())
    torch_vectors = [np.array(d["embedding"]) for d in embeddings["emb@torch"]["data"]]
    onnx_vectors = [np.array(d["embedding"]) for d in embeddings["emb@onnx"]["data"]]
    assert len(onnx_vectors) == len(TEXTS) and embeddings["emb@onnx"]["usage"] == embeddings["emb@torch"]["usage"]
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(torch_vectors, onnx_vectors)]
    assert min(cosines) > 0.9999
    assert all(r.status_code == 200 for r in classified.values()), [r.text for r in classified.values()]
    torch_items, onnx_items = (classified[ref].json()["data"] for ref in ("news@torch", "news@onnx"))
    assert [i["label"] for i in onnx_items] == [i["label"] for i in torch_items]
    for t, o in zip(torch_items, onnx_items):
        assert o["scores"] == pytest.approx(t["scores"], abs=1e-5)
    assert predicted.status_code == 200 and predicted.json()["version"] == 2
    assert [o["label"] for o in predicted.json()["outputs"]] == [i["label"] for i in onnx_items]


def test_an_alias_moved_from_a_torch_to_an_onnx_version_under_load_fails_nothing(
    fp32_settings, registry, exported, serving
):
    registry.register(exported["embed"][0], "emb", "embed", alias="production")
    registry.register(exported["embed"][1], "emb", "embed")

    async def main():
        async with serving(fp32_settings, registry, ["emb@production"], poll_interval_s=0.1) as (app, c):
            seen: list[list[tuple[int, int | None]]] = [[] for _ in range(CLIENTS)]

            async def client(i: int) -> None:
                while sum(v == 2 for _, v in seen[i]) < SEEN_AFTER_SWAP and len(seen[i]) < MAX_REQUESTS:
                    r = await c.post("/v1/models/emb@production/predict", json={"inputs": [f"text {i}", TEXTS[i % 3]]})
                    seen[i].append((r.status_code, r.json().get("version")))

            async def move():  # once every client was answered by the torch version
                await eventually(lambda: all(len(client) >= 3 for client in seen))
                await asyncio.to_thread(registry.set_alias, "emb", "production", 2, "serve the ONNX export")
                return (await c.post("/admin/reload")).status_code  # the watcher may have been first

            results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), move())
            listed = (await c.get("/v1/models")).json()["data"]
            return seen, results[-1], listed, app.state.pool.runtime.cache.keys()

    seen, reload_status, listed, cache_keys = run(main())
    statuses = [s for client in seen for s, _ in client]
    assert statuses and set(statuses) == {200}, "a request failed during the swap"
    for client in seen:  # each client switches once, from torch to ONNX, and never goes back
        versions = [v for _, v in client]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
    assert reload_status == 200
    assert [(m["id"], m["version"], m["framework"]) for m in listed] == [("emb@production", 2, "onnx")]
    assert ("emb", 1) not in cache_keys  # drained, then unloaded
