"""Request/reply over Redis and RabbitMQ against a running stream worker."""

from __future__ import annotations

import asyncio

import pytest

from moorage.streams.rpc import RpcClient
from moorage.streams.runner import StreamJob, run_stream

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("base", ["redis_base", "rabbitmq_base"])
async def test_rpc_round_trip_and_rejections(base, request, settings, registry, fake_model, tmp_path):
    registry.register(fake_model("classify"), "cls", task="classify")
    url = f"{request.getfixturevalue(base)}?topic=rpc-{tmp_path.name}"
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_stream(settings, StreamJob(url, f"jsonl://{tmp_path}/out?seconds=0.2", "cls"), stop, registry=registry)
    )
    try:
        async with RpcClient(url) as rpc:
            answers = await asyncio.gather(*(rpc.call(f"text number {i}", timeout=30) for i in range(20)))
            assert [a["model"] for a in answers] == ["cls"] * 20
            assert all(a["label"] in ("negative", "positive") and 0 <= a["score"] <= 1 for a in answers)
            rejected = await rpc.call(None, timeout=30, id="no-text")  # no text: dead-lettered, and said so
            assert rejected["error"]["code"] == "missing_text"
    finally:
        stop.set()
        await worker
    files = list((tmp_path / "out").glob("*.jsonl"))
    assert sum(len(f.read_text().splitlines()) for f in files) == 20
