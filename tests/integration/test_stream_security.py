"""Streams follow the same security policy as HTTP: the model's content filter (inputs refused to the
dead-letter destination, outputs withheld and flagged, addresses masked), its size limits, and a
hash-chained audit row for every processed or dead-lettered message."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from moorage.config import FilterSettings
from moorage.security.audit import AuditLog, sha256_text
from moorage.streams import open_broker
from moorage.streams.runner import StreamJob, run_stream

pytestmark = pytest.mark.anyio


def secured(settings, filters: dict, **security):
    stream = settings.stream.model_copy(update={"batch_size": 16, "max_wait_ms": 5, "log_interval_s": 1.0})
    sec = settings.security.model_copy(
        update={"filters": {k: FilterSettings(**v) for k, v in filters.items()}, "audit_flush_ms": 50, **security}
    )
    return settings.model_copy(update={"stream": stream, "security": sec})


def jsonl_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


async def run_until(settings, registry, url: str, out: Path, model: str, done) -> list:
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_stream(settings, StreamJob(url, f"jsonl://{out}?rows=1", model), stop, registry=registry)
    )
    try:
        deadline = time.monotonic() + 60
        async with open_broker(url) as b:
            while not done(jsonl_rows(out), await b.dead_letters()):
                assert time.monotonic() < deadline, "the worker did not finish in time"
                assert not worker.done(), worker
                await asyncio.sleep(0.2)
            dead = await b.dead_letters()
    finally:
        stop.set()
        await worker
    return dead


@pytest.mark.parametrize("broker_url", ["sqlite", "redis"], indirect=True)
async def test_input_filter_masking_and_audit_of_every_message(broker_url, settings, registry, fake_model, tmp_path):
    registry.register(fake_model("embed"), "emb", task="embed")
    settings = secured(settings, {"emb": {"input_deny": ["secret", "re:card \\d{4}"], "mask_email": True}})
    bodies = [json.dumps({"id": f"ok-{i}", "text": f"plain text {i}"}).encode() for i in range(20)]
    bodies += [
        json.dumps({"id": "blocked-1", "text": "the SECRET plan"}).encode(),
        json.dumps({"id": "blocked-2", "text": "pay with card 1234"}).encode(),
        json.dumps({"id": "mail", "text": "write to jane.doe@example.com today"}).encode(),
        json.dumps({"id": "masked", "text": "write to [EMAIL] today"}).encode(),
        json.dumps({"id": "huge", "text": "x" * 300}).encode(),  # stream.max_text_chars is 20000 by default
        b"not json",
    ]
    settings = settings.model_copy(
        update={"security": settings.security.model_copy(
            update={"limits": settings.security.limits.model_copy(update={"max_text_chars": 200})})}
    )  # fmt: skip
    url, out = broker_url(), tmp_path / "out"
    async with open_broker(url) as b:
        await b.publish(bodies)
    dead = await run_until(settings, registry, url, out, "emb", lambda rows, dead: len(rows) >= 22 and len(dead) >= 4)

    rows = {r["id"]: r for r in jsonl_rows(out)}
    assert set(rows) == {f"ok-{i}" for i in range(20)} | {"mail", "masked"}
    assert rows["mail"]["embedding"] == rows["masked"]["embedding"], "the model saw the address masked"
    reasons = {json.loads(d.body)["id"] if d.body != b"not json" else "garbage": d.reason.split(":")[0] for d in dead}
    assert reasons == {
        "blocked-1": "content_blocked",
        "blocked-2": "content_blocked",
        "huge": "text_too_long",  # security.limits.max_text_chars, as over HTTP
        "garbage": "invalid_json",
    }

    log = AuditLog(registry.catalog)
    audited = [r for r in log.rows() if r["action"] == "stream.embed"]
    assert len(audited) == len(bodies), "one audit row per message, processed or dead-lettered"
    assert {r["input_sha256"] for r in audited} == {sha256_text(b) for b in bodies}
    by_status = {}
    for r in audited:
        by_status.setdefault(r["status"], []).append(r)
        assert r["key_id"].startswith("stream:") and r["model"] == "emb" and r["version"] == 1
        assert r["input_text"] is None  # the raw text only with security.audit_inputs
    assert len(by_status[200]) == 22
    assert sorted(r["detail"]["error"] for s, rs in by_status.items() if s != 200 for r in rs) == sorted(
        ["content_blocked", "content_blocked", "text_too_long", "invalid_json"]
    )
    assert {r["status"] for r in audited if r["detail"].get("error") == "content_blocked"} == {400}
    count, problems = log.verify()
    assert problems == [] and count >= len(bodies)


@pytest.mark.parametrize("broker_url", ["sqlite"], indirect=True)
async def test_generated_outputs_are_withheld_and_flagged(broker_url, settings, registry, fake_model, tmp_path):
    registry.register(fake_model("generate"), "gen", task="generate")
    settings = secured(settings, {"gen": {"output_deny": ["moorage"]}}, audit_inputs=True)
    bodies = [
        json.dumps({"id": f"p-{i}", "text": f"prompt {i}", "parameters": {"max_new_tokens": 12}}).encode()
        for i in range(24)
    ]
    url, out = broker_url(), tmp_path / "out"
    async with open_broker(url) as b:
        await b.publish(bodies)
    await run_until(settings, registry, url, out, "gen", lambda rows, dead: len(rows) >= 24)

    rows = {r["id"]: r for r in jsonl_rows(out)}
    assert len(rows) == 24
    withheld = {i for i, r in rows.items() if r["finish_reason"] == "content_filter"}
    assert withheld and len(withheld) < 24, "the fake model says 'moorage' in some outputs, not all"
    for i, r in rows.items():
        if i in withheld:
            assert r["text"] == ""
        else:
            assert "moorage" not in r["text"].lower() and r["text"]
    audited = [r for r in AuditLog(registry.catalog).rows() if r["action"] == "stream.generate"]
    assert {r["detail"]["id"] for r in audited if r["detail"].get("filtered")} == withheld
    assert sorted(r["input_text"] for r in audited) == sorted(b.decode() for b in bodies)  # security.audit_inputs
