"""The Responses API with the official openai client against a real server (uvicorn on 127.0.0.1,
auth on, fake generate model): created and streamed responses, and refusals as the client sees them."""

from __future__ import annotations

import openai
import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model
from moorage.security.keys import KeyStore

from tests.support import serve_in_thread


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from moorage.server import create_app

    tmp = tmp_path_factory.mktemp("responses")
    config = load_settings(environ={"MOORAGE_HOME": str(tmp / "home"), "MOORAGE_SECURITY__AUDIT": "false"})
    registry = Registry.from_settings(config)
    registry.register(make_fake_model(tmp / "gen", "generate"), "gen", "generate")
    app = create_app(config, ["gen"], registry=registry)
    with serve_in_thread(app) as url:
        yield url, KeyStore(registry.catalog)
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
