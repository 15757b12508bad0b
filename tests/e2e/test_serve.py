"""`moorage serve` as a real process on 127.0.0.1: the openai client, SIGTERM, several workers."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from openai import OpenAI

from moorage.runtime import make_fake_model

from tests.support import serve_workers, wait_until


def _gauge(url: str, name: str) -> float:
    """The sum of a metric's samples on the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _register(cli, tmp_path, name: str, task: str, **kwargs) -> None:
    folder = make_fake_model(tmp_path / name, task, **kwargs)
    cli("models", "register", str(folder), "--name", name, "--task", task, "--alias", "production", check=True)


def test_openai_client_against_a_served_process(cli, server, tmp_path):
    _register(cli, tmp_path, "emb", "embed")
    _register(cli, tmp_path, "gen", "generate")
    _, url = server("-m", "emb@production", "-m", "gen")
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    emb = client.embeddings.create(model="emb@production", input=["a b", "c"])
    assert [len(d.embedding) for d in emb.data] == [8, 8] and emb.usage.prompt_tokens == 3
    chunks = list(client.completions.create(model="gen", prompt="hi", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).count(" ") == 3
    chat = client.chat.completions.create(model="gen", messages=[{"role": "user", "content": "x y"}], max_tokens=3)
    assert chat.usage.completion_tokens == 3 and chat.usage.prompt_tokens == 2


def test_sigterm_finishes_in_flight_work_then_exits(cli, server, tmp_path):
    _register(cli, tmp_path, "gen", "generate", delay_ms=20)
    proc, url = server("-m", "gen")
    result = {}

    def slow_request():
        body = {"model": "gen", "prompt": "go", "max_tokens": 60}
        result["response"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(lambda: _gauge(url, "moorage_generated_tokens_total") > 0, what="the request is being generated")
    proc.send_signal(signal.SIGTERM)
    worker.join(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so that supervisors see why it ended
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "every accepted request was answered" in (tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
    response = result["response"]
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 60


def test_metrics_add_up_over_worker_processes(cli, server, tmp_path):
    _register(cli, tmp_path, "emb", "embed")
    _, url = server("-m", "emb", "--workers", "2")
    ready_in_a_row, deadline = 0, time.time() + 60
    while ready_in_a_row < 10:  # the fixture saw one worker ready; new connections reach both
        assert time.time() < deadline, "both workers did not become ready"
        ready_in_a_row = ready_in_a_row + 1 if httpx.get(url + "/readyz").status_code == 200 else 0
    with httpx.Client(base_url=url) as http:
        for i in range(20):  # new connections, so both workers get some
            r = httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": f"t {i}"})
            assert r.status_code == 200, r.text
        text = http.get("/metrics").text
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('moorage_requests_total{model="emb",status="200"')
    )
    assert counted == 20
    pids = {
        line.split('pid="')[1].split('"')[0] for line in text.splitlines() if "moorage_process_cpu_seconds{" in line
    }
    assert len(pids) == 2  # process metrics of each worker


def test_a_dead_engine_answers_503_and_the_process_exits_for_its_supervisor(cli, server, tmp_path):
    """The fake model ends its engine thread at its fourth decode step: every waiting request gets 503
    engine_failed, /readyz turns 503, and the server stops by itself (a supervisor starts a new one)."""
    _register(cli, tmp_path, "gen", "generate", crash_after_steps=3)
    proc, url = server("-m", "gen")
    body = {"model": "gen", "prompt": "go", "max_tokens": 50}
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("/v1/completions", json=body)
    assert (response.status_code, response.json()["error"]["code"]) == (503, "engine_failed")
    assert proc.wait(timeout=60) == 1  # not a stop on request: a supervisor restarts it even "on failure"
    log = (tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
    assert "stopping this server process so that its supervisor restarts it" in log
    assert "every accepted request was answered" in log


def test_with_several_workers_a_worker_whose_engine_died_is_replaced(cli, server, tmp_path):
    """`serve --workers 2` is its own supervisor: the worker that stopped after its engine died is
    started again, loads the model anew, and the server is ready on every connection again."""
    _register(cli, tmp_path, "gen", "generate", crash_after_steps=3)
    proc, url = server("-m", "gen", "--workers", "2")
    wait_until(lambda: len(serve_workers(proc.pid)) == 2, what="two worker processes")
    before = serve_workers(proc.pid)
    body = {"model": "gen", "prompt": "go", "max_tokens": 50}
    codes = set()
    for _ in range(20):  # new connections reach both workers; each dies at its first long request
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        codes.add(response.status_code)
        if 503 in codes:
            break
    assert 503 in codes
    ready_in_a_row = 0

    def all_ready() -> bool:
        nonlocal ready_in_a_row
        try:
            ok = httpx.get(url + "/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        ready_in_a_row = ready_in_a_row + 1 if ok else 0
        return ready_in_a_row >= 10

    wait_until(lambda: len(serve_workers(proc.pid)) == 2 and serve_workers(proc.pid) != before, what="a new worker")
    wait_until(all_ready, timeout_s=120, what="both workers ready again")
    assert proc.poll() is None  # the server itself kept running
    short = httpx.post(url + "/v1/completions", json={"model": "gen", "prompt": "go", "max_tokens": 2}, timeout=60)
    assert short.status_code == 200
