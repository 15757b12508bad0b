"""The HTTP app in-process (httpx ASGITransport + asgi-lifespan) on fake models."""

from __future__ import annotations

from asyncio import run

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.register(fake_model("classify"), "cls", "classify")
    registry.register(fake_model("generate"), "gen", "generate")
    return registry


def test_predict_endpoint_for_each_task(settings, models, serving):
    async def main():
        async with serving(settings, models) as (_, c):
            emb = (await c.post("/v1/models/emb@production/predict", json={"inputs": ["hello", "world"]})).json()
            cls = (await c.post("/v1/models/cls/predict", json={"inputs": ["good movie"]})).json()
            body = {
                "inputs": ["say", {"messages": [{"role": "user", "content": "hi"}]}],
                "parameters": {"max_new_tokens": 4},
            }
            gen = (await c.post("/v1/models/gen/predict", json=body)).json()
            return emb, cls, gen

    emb, cls, gen = run(main())
    assert (emb["model"], emb["version"], emb["task"]) == ("emb", 1, "embed")
    assert len(emb["outputs"]) == 2 and len(emb["outputs"][0]["embedding"]) == 8
    assert np.linalg.norm(emb["outputs"][0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert cls["outputs"][0]["label"] in ("negative", "positive")
    assert [o["completion_tokens"] for o in gen["outputs"]] == [4, 4]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("post", "/v1/embeddings", {"model": "emb", "input": []}, 400, "empty_input"),
        ("post", "/v1/embeddings", {"model": "emb", "input": [1, 2]}, 422, "invalid_input"),
        ("post", "/v1/embeddings", {"model": "emb", "input": ""}, 422, "invalid_input"),
        ("post", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("post", "/v1/embeddings", {"model": "gen", "input": "x"}, 400, "wrong_task"),
        ("post", "/v1/embeddings", {"input": "x"}, 422, "invalid_input"),
        ("post", "/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 99}, 400, "invalid_dimensions"),
        ("post", "/v1/completions", {"model": "gen", "prompt": "x", "max_tokens": 0}, 422, "invalid_input"),
        ("post", "/v1/completions", {"model": "gen", "prompt": "x", "max_tokens": -5}, 422, "invalid_input"),
        (
            "post",
            "/v1/completions",
            {"model": "gen", "prompt": "x", "max_tokens": 4000},  # under the server's limit, over the model's
            400,
            "context_length_exceeded",
        ),
        ("post", "/v1/completions", {"model": "gen", "prompt": "x", "max_tokens": 10**6}, 422, "max_tokens_too_large"),
        ("post", "/v1/completions", {"model": "gen", "prompt": [], "max_tokens": 3}, 422, "invalid_input"),
        ("post", "/v1/completions", {"model": "gen", "prompt": "x", "temperature": 9}, 422, "invalid_input"),
        ("post", "/v1/chat/completions", {"model": "gen", "messages": []}, 422, "invalid_input"),
        (
            "post",
            "/v1/chat/completions",
            {"model": "gen", "messages": [{"role": "king", "content": "x"}]},
            422,
            "invalid_input",
        ),
        ("post", "/v1/models/cls/predict", {"inputs": []}, 400, "empty_input"),
        ("post", "/v1/models/cls/predict", {"inputs": [{"prompt": "x"}]}, 422, "invalid_input"),
        (
            "post",
            "/v1/models/gen/predict",
            {"inputs": ["x"], "parameters": {"max_new_tokens": 0}},
            422,
            "invalid_parameters",
        ),
        ("post", "/v1/models/bad..name/predict", {"inputs": ["x"]}, 400, "invalid_reference"),
        ("get", "/v1/nothing-here", None, 404, "not_found"),
        ("get", "/v1/embeddings", None, 405, "method_not_allowed"),
    ],
)
def test_bad_input_gets_a_precise_4xx_with_a_stable_code(settings, models, method, path, body, status, code, serving):
    async def main():
        async with serving(settings, models) as (_, c):
            return await c.request(method, path, json=body)

    r = run(main())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_invalid_json_oversized_body_and_too_many_inputs(settings, models, serving):
    async def main():
        async with serving(settings, models, max_body_bytes=2048, max_inputs=5) as (_, c):
            bad_json = await c.post(
                "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
            )
            big = await c.post("/v1/embeddings", json={"model": "emb", "input": "x" * 5000})

            async def chunks():  # no Content-Length: the limit is counted while reading
                for _ in range(10):
                    yield b" " * 1000

            streamed = await c.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
            many = await c.post("/v1/embeddings", json={"model": "emb", "input": ["a"] * 6})
            return bad_json, big, streamed, many

    bad_json, big, streamed, many = run(main())
    assert (bad_json.status_code, bad_json.json()["error"]["code"]) == (422, "invalid_input")
    assert (big.status_code, big.json()["error"]["code"]) == (413, "payload_too_large")
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "payload_too_large")
    assert (many.status_code, many.json()["error"]["code"]) == (413, "too_many_inputs")


def test_an_unexpected_error_is_an_opaque_500(settings, models, caplog, serving):
    async def main():
        async with serving(settings, models) as (app, c):
            sv = app.state.pool.lookup("emb")

            def broken(features):
                raise ZeroDivisionError("secret internals")

            sv.engine._predict = broken
            transport = httpx.ASGITransport(app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://moorage") as quiet:
                return await quiet.post("/v1/embeddings", json={"model": "emb", "input": "x"})

    r = run(main())
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "code": "internal_error",
        "param": None,
        "request_id": r.headers["x-request-id"],
    }
    assert "secret" not in r.text
    assert "ZeroDivisionError" in caplog.text


def test_openai_client_embeddings_chat_and_completions(settings, models, serving):
    async def main():
        async with serving(settings, models) as (app, c):
            client = AsyncOpenAI(base_url="http://moorage/v1", api_key="unused", http_client=c)
            emb = await client.embeddings.create(model="emb", input=["hello world", "other"])  # base64 by default
            emb_float = await client.embeddings.create(model="emb", input="hello world", encoding_format="float")
            chat = await client.chat.completions.create(
                model="gen",
                messages=[{"role": "user", "content": "hi there"}],
                max_tokens=5,
                n=2,
                seed=3,
                temperature=1,
            )
            stream = await client.chat.completions.create(
                model="gen",
                messages=[{"role": "user", "content": "hi there"}],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [ch async for ch in stream]
            comp = await client.completions.create(model="gen", prompt=["one two", "three"], max_tokens=4, stop=["zzz"])
            models_list = await client.models.list()
            return emb, emb_float, chat, chunks, comp, models_list

    emb, emb_float, chat, chunks, comp, models_list = run(main())
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    assert np.allclose(emb.data[0].embedding, emb_float.data[0].embedding, atol=1e-6)
    assert emb.usage.prompt_tokens == 3  # fake tokens: words
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 10 and chat.usage.prompt_tokens == 2
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert len(text.split()) == 5 and chunks[-1].usage.completion_tokens == 5
    assert [c.index for c in comp.choices] == [0, 1]
    assert comp.usage.prompt_tokens == 3 and comp.usage.completion_tokens == 8
    assert {m.id for m in models_list.data} == {"emb@production", "cls", "gen"}


def test_metrics_and_probes(settings, models, serving):
    async def main():
        async with serving(settings, models) as (_, c):
            await c.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]})
            await c.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 3, "stream": True})
            return [await c.get(p) for p in ("/healthz", "/readyz", "/metrics")]

    health, ready, metrics = run(main())
    assert health.json() == {"status": "ok"}
    assert ready.json()["models"] == {"emb@production": 1, "cls": 1, "gen": 1}
    text = metrics.text
    for line in (
        'moorage_requests_total{model="emb",status="200",version="1"}',
        'moorage_requests_total{model="gen",status="200",version="1"}',
        'moorage_generated_tokens_total{model="gen",version="1"}',
        'moorage_batch_size_count{model="emb",version="1"}',
        'moorage_time_to_first_token_seconds_count{model="gen",version="1"}',
        'moorage_model_load_seconds_count{model="emb",version="1"}',
        "moorage_process_resident_memory_bytes",
    ):
        assert line in text, line


def test_a_bare_name_served_under_two_references_is_ambiguous(settings, models, serving):
    async def main():
        async with serving(settings, models, ["emb@production", "emb:1"]) as (_, c):
            bare = await c.post("/v1/embeddings", json={"model": "emb", "input": "x"})
            pinned = await c.post("/v1/embeddings", json={"model": "emb:1", "input": "x"})
            return bare, pinned

    bare, pinned = run(main())
    assert (bare.status_code, bare.json()["error"]["code"]) == (400, "ambiguous_model")
    assert pinned.status_code == 200


def test_in_process_callers_get_the_same_outcome_as_http_predict(settings, models, serving):
    """InferenceService.infer is the entry point for callers inside the process (evaluation, gates):
    the same validation, results and JSON as the HTTP route."""

    async def main():
        async with serving(settings, models) as (app, c):
            http = await c.post("/v1/models/gen/predict", json={"inputs": ["hi"], "parameters": {"max_new_tokens": 3}})
            outcome = await app.state.service.infer("gen", ["hi"], {"max_new_tokens": 3})
            return http.json(), outcome

    http, outcome = run(main())
    assert outcome.encode() == http
    assert outcome.total_tokens == http["outputs"][0]["tokens"]
