import threading

import numpy as np
import pytest

from moorage.config import RuntimeSettings
from moorage.errors import IntegrityError, UnsafeArtifact
from moorage.runtime import GenerateInput, GenerationParams, ModelCache, Runtime


@pytest.fixture
def runtime(registry, settings):
    return Runtime(registry, settings.runtime)


def test_fake_models_of_each_task_load_and_predict(registry, runtime, fake_model):
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("classify", labels=("neg", "pos")), "cls", "classify")
    registry.register(fake_model("generate"), "gen", "generate")

    a, b, a2 = runtime.predict("emb", ["hello world", "other text", "hello world"])
    assert a.shape == (8,) and np.isclose(np.linalg.norm(a), 1.0)
    assert np.allclose(a, a2) and not np.allclose(a, b)

    (c,) = runtime.predict("cls", ["good movie"])
    assert c.label in ("neg", "pos") and c.scores[c.label] == c.score
    assert sum(c.scores.values()) == pytest.approx(1.0)

    params = GenerationParams(max_new_tokens=5)
    (g,) = runtime.predict("gen", [GenerateInput(prompt="say something", params=params)])
    assert g.completion_tokens == 5 and g.finish_reason == "length" and g.prompt_tokens == 2


def test_tampered_weights_are_refused_before_loading(registry, runtime, fake_model, home):
    registry.register(fake_model(), "x", "embed")
    path = home / "artifacts" / "x" / "1" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        runtime.get("x")
    assert "weights.safetensors" in info.value.message
    assert runtime.cache.keys() == []


def test_pickle_files_are_refused_at_load(registry, runtime, fake_model):
    info = registry.register(fake_model(), "x", "embed")
    info.manifest.files[0].path = "pytorch_model.bin"  # as if the catalog had been edited
    from moorage.runtime import load_version

    with pytest.raises(UnsafeArtifact, match="pytorch_model.bin"):
        load_version(registry, info, RuntimeSettings())


def test_cache_returns_the_same_loaded_model(registry, runtime, fake_model):
    registry.register(fake_model(), "x", "embed", alias="production")
    assert runtime.get("x") is runtime.get("x@production") is runtime.get("x:1")


def test_cache_evicts_least_recently_used_by_memory():
    cache = ModelCache(max_bytes=100, size_of=lambda v: v)
    cache.get_or_load("a", lambda: 40)
    cache.get_or_load("b", lambda: 40)
    cache.get_or_load("a", lambda: pytest.fail("a is cached"))
    cache.get_or_load("c", lambda: 40)  # 120 > 100: b is the least recently used
    assert cache.keys() == ["a", "c"]
    cache.get_or_load("huge", lambda: 500)  # alone over the bound: kept, everything else goes
    assert cache.keys() == ["huge"]


def test_cache_loads_once_under_concurrency():
    cache = ModelCache(max_bytes=10, size_of=lambda v: 1)
    calls = []
    gate = threading.Barrier(8)

    def load():
        calls.append(1)
        return object()

    results = []

    def worker():
        gate.wait()
        results.append(cache.get_or_load("k", load))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1
