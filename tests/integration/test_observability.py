"""The monitoring contract: the shipped alert rules and dashboards read only metrics moorage emits.

A real `moorage serve` (fake models, auth on, a content filter) and a real `moorage stream run`
(SQLite queue and sink) get traffic that touches every metric: requests, generation, a refused key,
a filtered input, a swap, a version that fails to load, a dead letter. Debian's Prometheus scrapes
both every second with the shipped rules loaded; promtool checks the rules, runs their tests and
lints both /metrics pages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from moorage.config import load_settings
from moorage.observability import dashboards
from moorage.registry import Registry
from moorage.runtime import make_fake_model
from moorage.security.keys import KeyStore

from tests.services.servers import free_port
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
# Grafana's variables, replaced by values Prometheus accepts
GRAFANA_VARS = {"$__rate_interval": "1m", "${datasource}": "", "$model": ".*", "$version": ".*"}
GRAFANA_VARS |= {"$instance": ".*", "$source": ".*"}


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run scripts/test.sh (it installs Debian's prometheus)")
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120)


def shipped_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard query, Grafana's variables filled in."""
    found = [(f"rule {r.get('record') or r['alert']}", r["expr"]) for g in dashboards.rule_groups() for r in g["rules"]]
    for board in dashboards.build().values():
        found += list(dashboards.expressions(board))
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        found = [(where, expr.replace(name, value)) for where, expr in found]
    return found


# -- offline: promtool on the rules, and the PromQL of the dashboards -----------------------------
def test_promtool_checks_the_rules_and_runs_their_tests():
    checked = _promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = [r["alert"] for g in dashboards.rule_groups() for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 8
    tested = _promtool("test", "rules", *map(str, sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a case where it fires and one where it stays silent
    cases = [c for f in (PROMETHEUS_DIR / "tests").glob("*.yml") for t in yaml.safe_load(f.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]  # fmt: skip
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == set(alerts)
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == set(alerts)


def test_every_expression_parses(tmp_path):
    """promtool parses each expression as a recording rule: the dashboards' queries too."""
    exprs = shipped_expressions()
    rules = {
        "groups": [{"name": "parse", "rules": [{"record": f"parse:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]
    }  # noqa: E501
    (tmp_path / "parse.yml").write_text(yaml.safe_dump(rules))
    checked = _promtool("check", "rules", str(tmp_path / "parse.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(exprs)} rules found" in checked.stdout


def test_a_panel_on_a_metric_nobody_emits_fails_the_check(tmp_path):
    boards = dashboards.build()
    planted = dashboards.panel("Served (renamed metric)", [dashboards.query("rate(moorage_requests_served_total[5m])")])
    boards["moorage-overview.json"]["panels"].append(planted)
    for name, board in boards.items():  # committed as generated: only the metric is wrong
        (tmp_path / name).write_text(dashboards.render(board))
    problems = dashboards.check(boards, tmp_path)
    assert problems == [
        "moorage-overview: panel 'Served (renamed metric)': moorage_requests_served_total is not declared in "
        "metrics.py nor recorded by a rule"
    ]
    # the command fails too: the planted panel is not what dashboards.py generates
    cmd = [sys.executable, "-m", "moorage.observability.dashboards", "--check", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "moorage-overview.json differs" in proc.stderr, proc.stderr


# -- live: a server, a stream worker and Prometheus -------------------------------------------------
def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _answers(url: str, log: Path, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[:4]} exited:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _handler_raises(folder: Path) -> Path:
    """Valid safetensors without the tensor the fake handler needs: its load raises."""
    from safetensors.numpy import save_file

    save_file({"other": np.zeros((4, 4), np.float32)}, str(folder / "weights.safetensors"))
    return folder


def _environment(tmp: Path) -> dict:
    """The subprocesses' environment: a home, and a config file with auth on (so that a refused key is
    counted), /metrics open to the scraper, a content filter on emb, lag measured every 0.2 s and
    swaps only on /admin/reload."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env |= {"MOORAGE_HOME": str(tmp / "home"), "MOORAGE_CONFIG": str(tmp / "moorage.yml"), "HF_HUB_OFFLINE": "1"}
    security = {"auth": True, "metrics_auth": False, "audit": False, "filters": {"emb": {"input_deny": ["forbidden"]}}}
    config = {"security": security, "stream": {"log_interval_s": 0.2}, "serve": {"poll_interval_s": 0}}
    (tmp / "moorage.yml").write_text(yaml.safe_dump(config))
    return env


def _catalog(tmp: Path, env: dict) -> tuple[Registry, str]:
    """emb:1 (production), emb:2, emb:3 (does not load), gen:1 (production); an admin key."""
    registry = Registry.from_settings(load_settings(environ={"MOORAGE_HOME": env["MOORAGE_HOME"]}))
    registry.register(make_fake_model(tmp / "emb1", "embed"), "emb", "embed", alias="production")
    registry.register(make_fake_model(tmp / "emb2", "embed", seed=1), "emb", "embed")
    registry.register(_handler_raises(make_fake_model(tmp / "emb3", "embed", seed=2)), "emb", "embed")
    registry.register(make_fake_model(tmp / "gen", "generate"), "gen", "generate", alias="production")
    _, key = KeyStore(registry.catalog, 0, 0).create("admin", name="observability test")
    return registry, key


def _prometheus(tmp: Path, env: dict, port: int, targets: dict[str, int]) -> subprocess.Popen:
    """Debian's Prometheus with the shipped rules, scraping and evaluating every second."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/test.sh (it installs Debian's prometheus)")
    scrape = [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]} for job, p in targets.items()]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(f) for f in RULE_FILES],
        "scrape_configs": scrape,
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    args = [f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
    return _start(["prometheus", *args, f"--web.listen-address=127.0.0.1:{port}"], env, tmp / "prometheus.log")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Yields (server URL, worker URL, Prometheus URL) after traffic that touches every metric."""
    tmp = tmp_path_factory.mktemp("observability")
    env = _environment(tmp)
    registry, key = _catalog(tmp, env)
    queue, moorage = f"sqlite:///{tmp}/queue.db?topic=news", [sys.executable, "-m", "moorage"]
    lines = [json.dumps({"text": f"story {i}"}) for i in range(20)] + ["{broken"]  # the last one is dead-lettered
    (tmp / "news.jsonl").write_text("\n".join(lines) + "\n")
    produce = [*moorage, "stream", "produce", str(tmp / "news.jsonl"), "--to", queue]
    subprocess.run(produce, env=env, check=True, capture_output=True, timeout=120)

    serve_port, worker_port, prom_port = free_port(), free_port(), free_port()
    serve = ["serve", "--port", str(serve_port), "-m", "emb@production", "-m", "gen@production"]
    sink = f"sql+sqlite:///{tmp}/results.db?table=news"
    stream = [
        "stream",
        "run",
        "--source",
        queue,
        "--model",
        "emb:1",
        "--sink",
        sink,
        "--metrics-port",
        str(worker_port),
    ]
    targets = {"moorage-serve": serve_port, "moorage-stream": worker_port}
    prom = _prometheus(tmp, env, prom_port, targets)
    procs = [prom, server := _start([*moorage, *serve], env, tmp / "serve.log")]
    procs.append(worker := _start([*moorage, *stream], env, tmp / "worker.log"))
    url, worker_url, prom_url = (f"http://127.0.0.1:{p}" for p in (serve_port, worker_port, prom_port))
    try:
        wait_until(lambda: _answers(prom_url + "/-/ready", tmp / "prometheus.log", prom), 60, "Prometheus is ready")
        wait_until(lambda: _answers(url + "/readyz", tmp / "serve.log", server), 120, "the server is ready")
        _traffic(url, key, registry, prom_url)
        wait_until(lambda: _answers(worker_url + "/healthz", tmp / "worker.log", worker), 120, "the worker is up")
        wait_until(lambda: "moorage_stream_lag{" in httpx.get(worker_url + "/metrics").text, 60, "lag is measured")
        yield url, worker_url, prom_url
    finally:
        for proc in procs:  # stopped by pid
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        registry.close()


def _traffic(url: str, key: str, registry: Registry, prom_url: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        # a counter's series appears with its first increment: once Prometheus has a sample of it,
        # more requests give its rate two different points
        assert http.post("/v1/embeddings", json={"model": "emb", "input": "first"}).status_code == 200
        served = 'moorage_requests_total{model="emb", version="1", status="200"}'
        wait_until(lambda: _query(prom_url, served) != [], 60, "Prometheus scraped the first request")
        for i in range(5):
            assert http.post("/v1/embeddings", json={"model": "emb", "input": [f"a {i}", "b"]}).status_code == 200
        completion = {"model": "gen", "prompt": "hi there", "max_tokens": 6, "stream": True}
        with http.stream("POST", "/v1/completions", json=completion) as streamed:
            assert streamed.status_code == 200 and "[DONE]" in streamed.read().decode()
        assert http.post("/v1/embeddings", json={"model": "emb", "input": "forbidden"}).status_code == 400
        assert httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": "x"}).status_code == 401
        registry.set_alias("emb", "production", 2, "a good release")
        assert http.post("/admin/reload").json()["changes"][0]["to_version"] == 2  # a swap
        registry.set_alias("emb", "production", 3, "a release that does not load")
        assert http.post("/admin/reload").status_code == 422  # a load failure: version 2 keeps serving
        assert http.post("/v1/embeddings", json={"model": "emb", "input": "after"}).status_code == 200


def _query(prom_url: str, promql: str) -> list[dict]:
    answer = httpx.get(prom_url + "/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _series_names(exposition: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in exposition.splitlines() if line and line[0] != "#"}


def test_promtool_finds_no_problem_in_either_metrics_page(stack):
    url, worker_url, _ = stack
    for page in (url + "/metrics", worker_url + "/metrics"):
        linted = _promtool("check", "metrics", stdin=httpx.get(page).text)
        assert (linted.returncode, linted.stdout + linted.stderr) == (0, ""), page


def test_every_metric_the_rules_and_dashboards_name_is_emitted(stack):
    url, worker_url, prom_url = stack
    emitted = _series_names(httpx.get(url + "/metrics").text) | _series_names(httpx.get(worker_url + "/metrics").text)
    recorded = dashboards.recorded_metrics()
    named = {name: where for where, expr in shipped_expressions() for name in dashboards.metric_names(expr)}
    missing = {name: where for name, where in named.items() if name not in emitted | recorded | {"up"}}
    assert missing == {}
    assert {r["metric"]["job"] for r in _query(prom_url, "up == 1")} == {"moorage-serve", "moorage-stream"}


def test_prometheus_scrapes_both_and_evaluates_the_rules(stack):
    _, _, prom_url = stack
    wait_until(lambda: _query(prom_url, "sum(moorage_requests_total) > 0") != [], 60, "requests were scraped")
    wait_until(lambda: _query(prom_url, 'sum(moorage_stream_messages_total{outcome="processed"}) >= 20') != [], 60,
               "stream messages were scraped")  # fmt: skip
    recorded = 'model_version_status:moorage_requests:rate5m{model="emb", status="200"} > 0'
    wait_until(lambda: _query(prom_url, recorded) != [], 60, "a recording rule has a value")
    errors = 'model:moorage_request_errors:ratio_rate5m{model="emb"}'
    wait_until(lambda: _query(prom_url, errors) != [], 60, "the error ratio is recorded")
    assert float(_query(prom_url, errors)[0]["value"][1]) == 0.0  # no 5xx: 0, not "no data"

    def every_rule_evaluated() -> bool:
        groups = httpx.get(prom_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == sum(len(g["rules"]) for g in dashboards.rule_groups()) and all(
            r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules
        )

    wait_until(every_rule_evaluated, 60, "every shipped rule evaluated without an error")

    def firing() -> list[dict]:
        alerts = httpx.get(prom_url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [a["labels"] for a in alerts if a["state"] == "firing"]

    # emb:3 did not load: the one alert without a `for` fires on the real server's counter
    wait_until(lambda: firing() != [], 60, "an alert fires")
    assert [(a["alertname"], a["model"], a["version"], a["job"]) for a in firing()] == [
        ("MoorageModelLoadFailed", "emb", "3", "moorage-serve")
    ]
