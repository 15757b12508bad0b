"""Logs and request ids: JSON lines that parse and carry the request id, the id echoed in the
response header and carried in every error body, and the libraries kept quiet."""

from __future__ import annotations

import io
import json
import logging
import os
from asyncio import run

import httpx
import pytest

from moorage.observability import logging as mlog


@pytest.fixture
def models(registry, fake_model):
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.register(fake_model("generate"), "gen", "generate")
    return registry


@pytest.fixture
def log_stream():
    """A stream for setup_logging's handler; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    moorage_level = logging.getLogger("moorage").level
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("moorage").setLevel(moorage_level)


def _broken(app):
    def broken(features):
        raise ZeroDivisionError("secret internals")

    app.state.pool.lookup("emb").engine._predict = broken


def test_json_lines_parse_and_carry_the_request_id(settings, models, serving, log_stream):
    mlog.setup_logging("WARNING", "json", moorage_level="INFO", stream=log_stream)
    logging.getLogger("moorage.test").info("outside a request")

    async def main():
        async with serving(settings, models, refs=("emb@production",)) as (app, c):
            _broken(app)
            return await c.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers={"X-Request-ID": "r-42"})

    r = run(main())
    assert r.status_code == 500 and r.headers["x-request-id"] == "r-42"
    entries = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert entries, "nothing was logged"
    outside = next(e for e in entries if e["message"] == "outside a request")
    assert "request_id" not in outside and outside["level"] == "INFO" and outside["logger"] == "moorage.test"
    (error,) = [e for e in entries if e["message"].startswith("unexpected error")]
    assert error["request_id"] == "r-42" and error["level"] == "ERROR"
    assert "ZeroDivisionError" in error["exc_info"]
    assert error["time"].endswith("Z")


def test_console_lines_carry_the_request_id(log_stream):
    mlog.setup_logging("INFO", "console", stream=log_stream)
    token = mlog.request_id.set("abc")
    try:
        logging.getLogger("moorage.test").warning("hello %s", "there")
    finally:
        mlog.request_id.reset(token)
    logging.getLogger("uvicorn.error").info("Started server process")
    assert log_stream.getvalue().splitlines() == [
        "WARNING moorage.test: hello there [request_id=abc]",
        "INFO uvicorn: Started server process",
    ]


def test_setup_twice_keeps_one_handler(log_stream):
    mlog.setup_logging("INFO", "console", stream=log_stream)
    mlog.setup_logging("INFO", "json", stream=log_stream)
    logging.getLogger("moorage.test").warning("once")
    assert [json.loads(line)["message"] for line in log_stream.getvalue().splitlines()] == ["once"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("get", "/v1/nothing-here", None, 404, "not_found"),  # Starlette's own 404
        ("post", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("post", "/v1/embeddings", {"model": "emb"}, 422, "invalid_input"),  # pydantic
        ("post", "/v1/models/gen/predict", {"inputs": ["x"], "parameters": {"top_p": 0}}, 422, "invalid_parameters"),
        ("post", "/v1/embeddings", "x" * 5000, 413, "payload_too_large"),  # the edge middleware's own answer
        ("post", "/v1/embeddings", {"model": "emb", "input": "x"}, 500, "internal_error"),  # opaque
    ],
)
def test_every_error_body_carries_the_request_id_of_the_response_header(
    settings, models, serving, method, path, body, status, code
):
    async def main():
        async with serving(settings, models, refs=("emb@production", "gen"), max_body_bytes=4096) as (app, c):
            if status == 500:
                _broken(app)
                transport = httpx.ASGITransport(app, raise_app_exceptions=False)
                c = httpx.AsyncClient(transport=transport, base_url="http://moorage")
            kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
            return await c.request(method, path, **kwargs)

    r = run(main())
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == r.headers["x-request-id"]
    assert len(error["request_id"]) == 32  # none was offered: a new one


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        ("req-1.a:b_C", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("new\u00e9line", False),
        ("", False),
    ],
)
def test_a_sane_incoming_request_id_is_kept_and_any_other_replaced(settings, models, serving, offered, kept):
    async def main():
        async with serving(settings, models, refs=("emb@production",)) as (_, c):
            headers = [(b"x-request-id", offered.encode("utf-8"))]
            return await c.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=headers)

    r = run(main())
    rid = r.headers["x-request-id"]
    assert (rid == offered) is kept
    assert r.json()["error"]["request_id"] == rid
    assert r.headers.get_list("x-request-id") == [rid]


def test_successful_responses_carry_the_request_id_too(settings, models, serving):
    async def main():
        async with serving(settings, models, refs=("emb@production",)) as (_, c):
            return await c.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers={"X-Request-ID": "ok-1"})

    assert run(main()).headers["x-request-id"] == "ok-1"


def test_the_libraries_are_told_to_draw_no_progress_bars(monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a user's own choice is kept
    mlog.quiet_libraries()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_only_a_command_that_asks_turns_every_tqdm_bar_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    mlog.quiet_libraries()
    assert "TQDM_DISABLE" not in os.environ  # training's bars stay
    mlog.quiet_libraries(every_tqdm_bar=True)
    assert os.environ["TQDM_DISABLE"] == "1"
