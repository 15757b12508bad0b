"""`moorage serve` starts quietly: no progress bars ("Loading weights") and no deprecation or future
warnings from the model libraries on stderr, for the fake model and for a real (tiny, random,
local) transformers model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support import tiny_llama

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

NOISE = ("Loading weights", "it/s]", "s/it]", "DeprecationWarning", "FutureWarning")


@pytest.fixture
def tiny_lm(tmp_path):
    """A tiny random Llama with MiniLM's tokenizer (from the demo package: nothing is downloaded)."""
    return tiny_llama(tmp_path / "lm")


def test_the_tiny_model_shows_a_progress_bar_when_loaded_without_moorage(tiny_lm, cli_env):
    """The control: transformers on its own draws the bar this test looks for."""
    script = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tiny_lm)!r})"
    # without moorage: none of the switches it sets (an in-process test may have set them in this
    # process's environment, which cli_env copies)
    switches = (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS",
        "TQDM_DISABLE",
    )
    env = {k: v for k, v in cli_env.items() if k not in switches}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" in out.stderr


def test_serve_start_up_has_no_progress_bars_or_library_warnings(cli, server, fake_model, tiny_lm, tmp_path):
    cli("models", "register", str(fake_model("embed")), "--name", "emb", "--task", "embed", check=True)
    cli("models", "register", str(tiny_lm), "--name", "lm", "--task", "generate", check=True)
    proc, url = server("-m", "emb", "-m", "lm")
    import httpx

    body = {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    proc.terminate()
    proc.wait(timeout=60)
    (log,) = tmp_path.glob("serve-*.log")
    output = log.read_text()
    assert "ready: serving emb" in output
    noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert noisy == [], textwrap.indent("\n".join(noisy), "  ")


def test_serve_logs_json_lines_and_answers_the_callers_request_id(cli, cli_env, fake_model, tmp_path):
    """observability.log_format=json: every stderr line of `moorage serve` (uvicorn's included) is one
    JSON object; the caller's request id comes back in the error body."""
    import httpx

    from tests.e2e.conftest import free_port

    cli("models", "register", str(fake_model("embed")), "--name", "emb", "--task", "embed", check=True)
    port = free_port()
    env = {**cli_env, "MOORAGE_OBSERVABILITY__LOG_FORMAT": "json"}
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moorage", "serve", "-m", "emb", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=5) as client:
                for _ in range(600):  # up to ~2 minutes: a bounded wait for the models to load
                    if proc.poll() is not None:
                        raise AssertionError((tmp_path / "stderr.log").read_text())
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)  # the polling interval of a bounded wait, as the server fixture's
                r = client.post(
                    "/v1/embeddings", json={"model": "nope", "input": "x"}, headers={"X-Request-ID": "e2e-7"}
                )
            assert r.status_code == 404 and r.json()["error"]["request_id"] == "e2e-7"
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    entries = [json.loads(line) for line in (tmp_path / "stderr.log").read_text().splitlines() if line.strip()]
    loggers = {e["logger"] for e in entries}
    assert {"uvicorn", "moorage.server"} <= loggers
    assert any(e["message"].startswith("ready: serving emb") for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
