"""The Responses API with the official openai client against a real server (uvicorn on 127.0.0.1,
auth on, fake generate model): created and streamed responses, and refusals as the client sees them."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model
from moorage.security.keys import KeyStore


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import uvicorn

    from moorage.server import create_app

    tmp = tmp_path_factory.mktemp("responses")
    config = load_settings(environ={"MOORAGE_HOME": str(tmp / "home"), "MOORAGE_SECURITY__AUDIT": "false"})
    registry = Registry.from_settings(config)
    registry.register(make_fake_model(tmp / "gen", "generate"), "gen", "generate")
    app = create_app(config, ["gen"], registry=registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not (server.started and server.servers):
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.time() < deadline, "the model did not load"
        time.sleep(0.05)
    yield url, KeyStore(registry.catalog)
    server.should_exit = True
    thread.join(30)
    registry.close()


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_created_and_streamed_responses_with_the_official_client(live):
    url, keys = live
    client = _client(url, keys.create("invoker", models=["gen"])[1])
    whole = client.responses.create(
        model="gen", instructions="answer briefly", input="what is new", max_output_tokens=5, temperature=0
    )
    with client.responses.stream(
        model="gen", instructions="answer briefly", input="what is new", max_output_tokens=5, temperature=0
    ) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response  # response.incomplete: get_final_response() waits for response.completed only
    raw = client.responses.create(model="gen", input="what is new", max_output_tokens=3, stream=True)
    names = [e.type for e in raw]

    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert len(whole.output_text.split()) == 5 and whole.usage.output_tokens == 5
    assert whole.usage.input_tokens == 5  # fake tokens: the words of the instructions and the input
    assert "".join(deltas) == final.output_text == whole.output_text  # greedy: streaming changes nothing
    assert final.usage == whole.usage and final.id != whole.id
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]


def test_refusals_over_the_wire(live):
    url, keys = live
    client = _client(url, keys.create("invoker", models=["other*"])[1])
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="gen", input="hi")
    client = _client(url, keys.create("invoker")[1])
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gen", input="hi", store=True)
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "store"
    with pytest.raises(openai.AuthenticationError):
        _client(url, "not-a-key").responses.create(model="gen", input="hi")
