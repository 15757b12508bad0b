"""Tracing: the spans of inference calls (the SDK's in-memory exporter), their parent, and nothing of
OpenTelemetry when tracing is off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from asyncio import run

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from moorage.observability import semconv, tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.register(fake_model("classify"), "cls", "classify")
    registry.register(fake_model("generate"), "gen", "generate")
    return registry


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    with tracing.exporting_to(exporter):
        yield exporter


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def test_a_chat_request_is_one_server_span_with_genai_attributes_under_the_incoming_traceparent(
    settings, models, serving, spans
):
    async def main():
        async with serving(settings, models) as (_, c):
            body = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
            r = await c.post("/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT})
            return r

    r = run(main())
    assert r.status_code == 200
    named = _by_name(spans)
    (span,) = named["chat gen"]
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    a = span.attributes
    assert a[semconv.OPERATION_NAME] == "chat"
    assert a[semconv.REQUEST_MODEL] == "gen"
    assert a[semconv.RESPONSE_MODEL] == "gen:1"
    assert a[semconv.REQUEST_MAX_TOKENS] == 5
    assert a[semconv.REQUEST_TEMPERATURE] == 0.0
    assert a[semconv.USAGE_INPUT_TOKENS] == r.json()["usage"]["prompt_tokens"]
    assert a[semconv.USAGE_OUTPUT_TOKENS] == r.json()["usage"]["completion_tokens"] == 5
    assert tuple(a[semconv.RESPONSE_FINISH_REASONS]) == ("length",)
    assert a[semconv.REQUEST_ID] == r.headers["x-request-id"]
    # children: queue wait and the batch under the request; prefill and decode under the batch
    (queue,), (batch,) = named[semconv.SPAN_QUEUE_WAIT], named[semconv.SPAN_BATCH]
    assert queue.parent.span_id == batch.parent.span_id == span.context.span_id
    for name in (semconv.SPAN_PREFILL, semconv.SPAN_DECODE):
        (child,) = named[name]
        assert child.parent.span_id == batch.context.span_id
        assert child.context.trace_id == span.context.trace_id
    assert span.start_time <= queue.start_time <= queue.end_time <= batch.start_time
    assert named[semconv.SPAN_PREFILL][0].end_time <= named[semconv.SPAN_DECODE][0].end_time <= span.end_time


def test_an_embeddings_batch_is_one_set_of_children_with_its_model_call(settings, models, serving, spans):
    async def main():
        async with serving(settings, models) as (_, c):
            return await c.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b", "c"]})

    assert run(main()).status_code == 200
    named = _by_name(spans)
    (span,) = named["embeddings emb"]
    assert span.attributes[semconv.INPUT_COUNT] == 3
    assert span.parent is None  # no traceparent came: a new trace
    batches = named[semconv.SPAN_BATCH]
    assert sum(b.attributes[semconv.BATCH_SIZE] for b in batches) >= 3
    assert len(named[semconv.SPAN_MODEL_CALL]) == len(batches)


def test_a_streamed_chat_is_recorded_when_its_stream_ends(settings, models, serving, spans):
    async def main():
        async with serving(settings, models) as (_, c):
            body = {"model": "gen", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
            async with c.stream("POST", "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}) as r:
                return [line async for line in r.aiter_lines() if line]

    lines = run(main())
    assert lines[-1] == "data: [DONE]"
    (span,) = _by_name(spans)["chat gen"]
    assert span.attributes[semconv.REQUEST_STREAM] is True
    assert span.attributes[semconv.USAGE_OUTPUT_TOKENS] == 3
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_a_failed_call_is_a_span_with_its_error_type(settings, models, serving, spans):
    async def main():
        async with serving(settings, models) as (_, c):
            body = {"model": "gen", "prompt": "x", "max_tokens": 4000}  # over the fake model's context
            return await c.post("/v1/completions", json=body)

    assert run(main()).status_code == 400
    (span,) = _by_name(spans)["text_completion gen"]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes[semconv.ERROR_TYPE] == "context_length_exceeded"


def test_a_malformed_traceparent_starts_a_new_trace(settings, models, serving, spans):
    async def main():
        async with serving(settings, models) as (_, c):
            bad = f"00-{'0' * 32}-{PARENT_ID}-01"  # an all-zero trace id is invalid
            return await c.post("/v1/models/cls/predict", json={"inputs": ["x"]}, headers={"traceparent": bad})

    assert run(main()).status_code == 200
    (span,) = _by_name(spans)["classify cls"]
    assert span.parent is None


def test_a_job_created_with_a_traceparent_runs_in_the_same_trace(settings, models, serving, spans):
    from tests.unit.test_jobs import wait_job

    async def main():
        async with serving(settings, models) as (_, c):
            body = {"model": "gen", "inputs": ["hello"], "parameters": {"max_new_tokens": 2}}
            r = await c.post("/v1/jobs", json=body, headers={"traceparent": TRACEPARENT})
            job_id = r.json()["id"]
            return job_id, await wait_job(c, job_id)

    job_id, job = run(main())
    assert job["status"] == "succeeded"
    named = _by_name(spans)
    (created,) = named["create_job gen"]
    (ran,) = named["text_completion gen"]
    assert format(created.context.trace_id, "032x") == format(ran.context.trace_id, "032x") == TRACE_ID
    assert format(created.parent.span_id, "016x") == PARENT_ID
    assert ran.parent.span_id == created.context.span_id
    assert created.attributes[semconv.JOB_ID] == job_id
    assert ran.kind == SpanKind.CONSUMER


def test_the_pinned_names_match_the_installed_conventions():
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai

    pinned = {
        semconv.OPERATION_NAME: gen_ai.GEN_AI_OPERATION_NAME,
        semconv.PROVIDER_NAME: gen_ai.GEN_AI_PROVIDER_NAME,
        semconv.REQUEST_MODEL: gen_ai.GEN_AI_REQUEST_MODEL,
        semconv.REQUEST_MAX_TOKENS: gen_ai.GEN_AI_REQUEST_MAX_TOKENS,
        semconv.REQUEST_TEMPERATURE: gen_ai.GEN_AI_REQUEST_TEMPERATURE,
        semconv.REQUEST_TOP_P: gen_ai.GEN_AI_REQUEST_TOP_P,
        semconv.REQUEST_SEED: gen_ai.GEN_AI_REQUEST_SEED,
        semconv.REQUEST_STOP_SEQUENCES: gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES,
        semconv.REQUEST_CHOICE_COUNT: gen_ai.GEN_AI_REQUEST_CHOICE_COUNT,
        semconv.REQUEST_STREAM: gen_ai.GEN_AI_REQUEST_STREAM,
        semconv.RESPONSE_MODEL: gen_ai.GEN_AI_RESPONSE_MODEL,
        semconv.RESPONSE_FINISH_REASONS: gen_ai.GEN_AI_RESPONSE_FINISH_REASONS,
        semconv.USAGE_INPUT_TOKENS: gen_ai.GEN_AI_USAGE_INPUT_TOKENS,
        semconv.USAGE_OUTPUT_TOKENS: gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS,
    }
    assert {k: k for k in pinned} == pinned
    ops = gen_ai.GenAiOperationNameValues
    assert (semconv.OP_CHAT, semconv.OP_TEXT_COMPLETION, semconv.OP_EMBEDDINGS) == (
        ops.CHAT.value,
        ops.TEXT_COMPLETION.value,
        ops.EMBEDDINGS.value,
    )


def test_traceparent_validation():
    assert tracing.valid_traceparent(TRACEPARENT) == TRACEPARENT
    assert tracing.valid_traceparent(TRACEPARENT.upper()) == TRACEPARENT
    for bad in (
        None,
        "",
        "garbage",
        f"01-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        TRACEPARENT + "x",
    ):
        assert tracing.valid_traceparent(bad) is None


def test_with_tracing_off_nothing_of_opentelemetry_is_imported(tmp_path):
    """A whole request through the app, in a fresh interpreter: sys.modules holds no module of the SDK
    or the exporter. (FastAPI imports the OpenTelemetry API itself when it is installed.)"""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import httpx
        from asgi_lifespan import LifespanManager
        from moorage.config import load_settings
        from moorage.registry import Registry
        from moorage.runtime import make_fake_model
        from moorage.server import create_app

        env = {{"MOORAGE_HOME": {str(tmp_path / "home")!r}, "MOORAGE_USER": "t", "MOORAGE_SECURITY__AUTH": "false"}}
        settings = load_settings(environ=env)
        registry = Registry.from_settings(settings)
        registry.register(make_fake_model({str(tmp_path / "src")!r}, "generate"), "gen", "generate")

        async def main():
            app = create_app(settings, ["gen"], registry=registry)
            async with LifespanManager(app) as manager:
                await app.state.loading
                transport = httpx.ASGITransport(manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://m") as c:
                    body = {{"model": "gen", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 2}}
                    headers = {{"traceparent": {TRACEPARENT!r}}}
                    r = await c.post("/v1/chat/completions", json=body, headers=headers)
                    assert r.status_code == 200, r.text

        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_stream_message_with_a_traceparent_continues_its_trace(settings, registry, fake_model, tmp_path, spans):
    import asyncio
    import json

    from moorage.streams import open_broker
    from moorage.streams.runner import StreamJob, run_stream

    from tests.support import eventually

    registry.register(fake_model("embed"), "emb", "embed")
    url = f"sqlite:///{tmp_path}/q.db?topic=in"

    def processed() -> bool:
        return any(s.name == "embeddings emb" for s in spans.get_finished_spans())

    async def main():
        async with open_broker(url) as broker:
            await broker.publish([json.dumps({"id": "m1", "text": "hello", "traceparent": TRACEPARENT}).encode()])
        stop = asyncio.Event()
        job = StreamJob(url, f"jsonl://{tmp_path}/out", "emb")
        worker = asyncio.create_task(run_stream(settings, job, stop, registry=registry))
        await eventually(processed, what="the message's span")
        stop.set()
        return await worker

    counts = run(main())
    assert counts.processed == 1
    (span,) = _by_name(spans)["embeddings emb"]
    assert span.kind == SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes[semconv.USAGE_INPUT_TOKENS] > 0
    assert _by_name(spans)[semconv.SPAN_MODEL_CALL]


def test_configured_tracing_exports_over_otlp_http(tmp_path):
    """The production path: settings turn tracing on, spans reach an OTLP/HTTP receiver (a local one,
    decoding the protobuf body) when the batch processor flushes; settings off turn it off again."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from moorage.config import ObservabilitySettings

    received: list[ExportTraceServiceRequest] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1/traces"
        tracing.configure(ObservabilitySettings(tracing=True, otlp_endpoint=endpoint, service_name="svc-test"))
        assert tracing.is_enabled()
        traceparent = tracing.link_point("create_job gen", {semconv.REQUEST_MODEL: "gen"}, parent=TRACEPARENT)
        tracing.flush()
        tracing.configure(ObservabilitySettings(tracing=False))
        assert not tracing.is_enabled()
    finally:
        server.shutdown()
    assert traceparent is not None and traceparent.startswith(f"00-{TRACE_ID}-")
    (resource_spans,) = [rs for r in received for rs in r.resource_spans]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    (span,) = [s for ss in resource_spans.scope_spans for s in ss.spans]
    assert (service, span.name, span.trace_id.hex(), span.parent_span_id.hex()) == (
        "svc-test",
        "create_job gen",
        TRACE_ID,
        PARENT_ID,
    )
