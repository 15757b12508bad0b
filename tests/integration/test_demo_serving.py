"""The demo models (MiniLM, SmolLM2) behind the HTTP app, driven by the official openai client."""

from __future__ import annotations

from asyncio import run

import pytest
from openai import AsyncOpenAI

from moorage.demo import assets
from moorage.demo.run import DEMO_MODELS, ensure_registered

pytestmark = pytest.mark.slow


def test_openai_client_on_the_demo_models_with_exact_usage(settings, registry, serving, smollm2_folder):
    folders = {"minilm": assets.minilm_folder, "smollm2": lambda: smollm2_folder}
    for name, task, package in DEMO_MODELS:
        ensure_registered(registry, name, task, package, folders[name])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = ["The capital of France is Paris.", "Stocks fell sharply on Monday."]

    async def main():
        async with serving(settings, registry, ["minilm@production", "smollm2@production"]) as (app, c):
            client = AsyncOpenAI(base_url="http://moorage/v1", api_key="unused", http_client=c)
            emb = await client.embeddings.create(model="minilm", input=texts)
            chat = await client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=12, temperature=0
            )
            stream = await client.chat.completions.create(
                model="smollm2",
                messages=messages,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [ch async for ch in stream]
            comp = await client.completions.create(
                model="smollm2", prompt="One, two, three,", max_tokens=6, temperature=0
            )
            handlers = {k: sv.loaded.handler for k, sv in app.state.pool.served().items()}
            return emb, chat, chunks, comp, handlers

    emb, chat, chunks, comp, handlers = run(main())
    st_tokenizer = handlers["minilm@production"].model.tokenizer
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    assert emb.usage.prompt_tokens == sum(len(st_tokenizer(t)["input_ids"]) for t in texts)

    generator = handlers["smollm2@production"]
    chat_prompt = generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(generator.tokenizer(chat_prompt, add_special_tokens=False)["input_ids"])
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == chat.choices[0].message.content  # greedy: streaming changes nothing
    assert chunks[-1].usage.model_dump() == chat.usage.model_dump()
    assert comp.usage.prompt_tokens == len(
        generator.tokenizer("One, two, three,", add_special_tokens=False)["input_ids"]
    )
    assert comp.usage.completion_tokens == 6 and comp.choices[0].finish_reason == "length"
