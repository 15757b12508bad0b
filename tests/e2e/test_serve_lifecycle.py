"""`moorage serve` as a real process on 127.0.0.1, from its start to its stop: while a model loads
for 5 s the listener is up and requests are held or answered 503 with Retry-After, never refused;
SIGTERM during 20 streams turns /readyz 503 at once, keeps serving for serve.drain_delay_s, then
closes the listener and lets every stream finish, and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model

from tests.e2e.conftest import free_port
from tests.support import wait_until

NUM_STREAMS = 20
MAX_TOKENS = 80  # a few seconds per stream: every stream is still going when the listener closes
DRAIN_DELAY_S = 2.0


@pytest.fixture
def start(cli_env: dict, tmp_path: Path):
    """Start `moorage serve ARGS` with the given serve.* settings; returns (process, url, log path)
    once its listener answers /healthz (the models may still be loading). Stopped at teardown."""
    started: list[subprocess.Popen] = []

    def run(*args: str, **serve: object) -> tuple[subprocess.Popen, str, Path]:
        port = free_port()
        env = cli_env | {f"MOORAGE_SERVE__{key.upper()}": str(value) for key, value in serve.items()}
        log = tmp_path / f"serve-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moorage", "serve", "--port", str(port), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def listening() -> bool:
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:  # not listening yet
                return False

        wait_until(listening, timeout_s=120, what="the server's listener", interval_s=0.05)
        return proc, url, log

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _register(cli_env: dict, tmp_path: Path, name: str, task: str, **kwargs) -> None:
    """A fake model in the served home's registry (in-process: a CLI process costs seconds here)."""
    registry = Registry.from_settings(load_settings(environ=cli_env))
    try:
        registry.register(make_fake_model(tmp_path / name, task, **kwargs), name, task)
    finally:
        registry.close()


def _stream(url: str, i: int, started: threading.Semaphore) -> dict:
    """One streamed completion (even i) or chat completion (odd i): its text, usage and last event."""
    chat = i % 2 == 1
    body: dict = {"model": "gen", "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": f"stream number {i}"}]
    else:
        body["prompt"] = f"stream number {i}"
    text, usage, events, errors = [], None, [], []
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if not events:
                started.release()
            events.append(data := line.removeprefix("data: "))
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                errors.append(chunk["error"])
            for choice in chunk.get("choices", ()):
                text.append(choice["delta"].get("content") or "" if chat else choice["text"])
            usage = chunk.get("usage") or usage
    return {"text": "".join(text), "usage": usage, "last": events[-1], "errors": errors}


def test_sigterm_during_20_streams_cuts_none_and_readyz_is_503_from_the_signal_on(cli_env, start, tmp_path):
    """A config long-poll held across the signal is answered 304 when the listener closes: its 55 s
    hold would outlast the 40 s graceful timeout, which would cut it."""
    _register(cli_env, tmp_path, "gen", "generate", delay_ms=15)
    cli_env["MOORAGE_CONFIG__HOLD_S"] = "55"
    proc, url, log = start("-m", "gen", drain_delay_s=DRAIN_DELAY_S, graceful_timeout_s=40)
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, timeout_s=60, what="the model's load")
    watch = {"instance": "lifecycle-test", "after": -1}
    watch["after"] = httpx.get(url + "/v1/config/watch", params=watch).json()["revision"]
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(NUM_STREAMS + 1) as pool:
        held = pool.submit(httpx.get, url + "/v1/config/watch", params=watch, timeout=120)
        streams = [pool.submit(_stream, url, i, started) for i in range(NUM_STREAMS)]
        for _ in range(NUM_STREAMS):
            assert started.acquire(timeout=120), "a stream did not start"
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "new requests are served" in log.read_text(), what="the server's drain", interval_s=0.02)
        during = [httpx.get(url + "/readyz", timeout=10), httpx.post(url + "/v1/completions", json={
            "model": "gen", "prompt": "still served", "max_tokens": 2}, timeout=60)]  # fmt: skip
        statuses = []

        def closed() -> bool:  # every /readyz answer until the listener closes is 503 shutting_down
            try:
                ready = httpx.get(url + "/readyz", timeout=10)
            except httpx.ConnectError:
                return True
            statuses.append((ready.status_code, ready.json()["error"]["code"]))
            return False

        wait_until(closed, timeout_s=60, what="the listener's close", interval_s=0.05)
        in_flight_at_close = sum(not s.done() for s in streams)
        results = [s.result(timeout=120) for s in streams]
        long_poll = held.result(timeout=120)
    assert proc.wait(timeout=120) == 0
    assert long_poll.status_code == 304
    assert (during[0].status_code, during[0].json()["error"]["code"]) == (503, "shutting_down")
    assert during[1].status_code == 200 and during[1].json()["usage"]["completion_tokens"] == 2
    assert set(statuses) <= {(503, "shutting_down")}
    assert in_flight_at_close > 0  # the listener closed with streams still going: the drain is what is tested
    for result in results:
        assert result["errors"] == [] and result["last"] == "[DONE]"
        assert result["usage"]["completion_tokens"] == MAX_TOKENS
        assert len(result["text"].split()) == MAX_TOKENS
    assert "every accepted request was answered" in log.read_text()


@pytest.mark.parametrize("hold_s", [30, 0])
def test_requests_during_a_5_s_model_load_are_held_or_answered_503_never_refused(cli_env, start, tmp_path, hold_s):
    """With serve.cold_start_hold_s beyond the load, all 10 are served once it ends; with 0, each is
    answered 503 model_loading with Retry-After at once. No connection error either way."""
    _register(cli_env, tmp_path, "emb", "embed", load_delay_ms=5000)
    _, url, log = start("-m", "emb", cold_start_hold_s=hold_s, cold_start_queue=16)
    loading = httpx.get(url + "/readyz")
    assert (loading.status_code, loading.json()["error"]["code"]) == (503, "model_loading")

    def embed(i: int) -> httpx.Response:
        return httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": f"text {i}"}, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(embed, range(10)))  # a connection error would raise here
    if not hold_s:
        assert [(r.status_code, r.json()["error"]["code"]) for r in responses] == [(503, "model_loading")] * 10
        assert {r.headers["retry-after"] for r in responses} == {"5"}
        assert httpx.get(url + "/readyz").status_code == 503  # every answer came while loading
        return
    assert [r.status_code for r in responses] == [200] * 10
    assert all(len(r.json()["data"][0]["embedding"]) == 8 for r in responses)
    assert httpx.get(url + "/readyz").status_code == 200
    text = log.read_text()
    assert text.index("Uvicorn running on") < text.index("ready: serving")  # listening while loading
