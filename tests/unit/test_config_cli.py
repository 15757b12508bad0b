"""`moorage config ...`: the settings alone, and drafts, diffs, releases, approval and rollback through
the same config center as the HTTP API, with one-line errors."""

from __future__ import annotations

import json

import pytest

from moorage.config import load_settings
from moorage.configcenter.releases import ConfigCenter
from moorage.security.audit import AuditLog

from tests.support import run_cli


@pytest.fixture
def moorage(tmp_path, monkeypatch, capsys):
    """Run the CLI as a user would: (exit status, stdout, stderr)."""

    def run(*args: str, user: str = "alice") -> tuple[int, str, str]:
        return run_cli(monkeypatch, capsys, *args, env={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": user})

    return run


def test_bare_config_still_prints_the_settings(moorage, tmp_path):
    code, out, _ = moorage("config")
    assert code == 0 and json.loads(out)["home"] == str(tmp_path / "home")
    assert json.loads(moorage("config", "show")[1]) == json.loads(out)


def test_draft_diff_publish_rollback_history(moorage, tmp_path):
    code, out, _ = moorage("config", "draft", "global", "--set", "serve.max_batch_size=16", "--set", "/serve/port=9001")
    assert code == 0 and json.loads(out) == {"serve": {"max_batch_size": 16, "port": 9001}}
    code, out, _ = moorage("config", "diff", "global")
    assert out.splitlines() == ["/serve/max_batch_size: null -> 16", "/serve/port: null -> 9001  (restart)"]
    assert (
        moorage("config", "publish", "global", "-m", "smaller batches")[1].strip() == "release 1 of global: published"
    )
    moorage("config", "draft", "global", "--unset", "serve.port")
    moorage("config", "publish", "global")
    assert moorage("config", "rollback", "global", "--to", "1")[1].strip() == "release 3 of global: published"
    history = json.loads(moorage("config", "history", "--json")[1])
    assert [(r["number"], r["author"], r["rolled_back_to"]) for r in history] == [
        (3, "cli:alice", 1), (2, "cli:alice", None), (1, "cli:alice", None),
    ]  # fmt: skip
    settings = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home")})
    center = ConfigCenter.from_settings(settings)  # what the HTTP API would see
    try:
        assert center.release(3).values == {"serve": {"max_batch_size": 16, "port": 9001}}
        actions = [r["action"] for r in AuditLog(center.backend.catalog).rows()]
    finally:
        center.close()
    assert actions == ["config.edit", "config.publish", "config.edit", "config.publish", "config.rollback"]
    assert moorage("config", "status")[1].strip() == "0 of 0 instances on revision 3, 0 rejected"


def test_errors_are_one_line_and_the_author_cannot_approve(moorage, monkeypatch):
    code, out, err = moorage("config", "draft", "global", "--set", "serve.max_batch_size=0")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "/serve/max_batch_size" in err and "Traceback" not in err
    assert moorage("config", "draft", "global")[1].strip() == "{}"  # nothing saved
    split = '[{"target": "canary", "weight": 100}]'
    code, _, err = moorage("config", "draft", "global", "--set", f"routing.emb.split={split}")
    assert code == 2 and "/routing/emb/split/0/target: emb@canary is not in the registry" in err
    code, _, err = moorage("config", "draft", "everything")
    assert code == 2 and "invalid scope 'everything'" in err
    monkeypatch.setenv("MOORAGE_CONFIG__REQUIRE_APPROVAL", "true")
    moorage("config", "draft", "global", "--set", "stream.batch_size=8")
    assert moorage("config", "publish", "global")[1].strip() == "release 1 of global: pending approval"
    code, _, err = moorage("config", "approve", "1")
    assert code == 2 and "another key must approve it" in err
    assert moorage("config", "approve", "1", user="bob")[1].strip() == "release 1 of global: published"


def test_with_url_the_same_commands_go_through_a_server(moorage, tmp_path, fake_model):
    from moorage.registry import Registry
    from moorage.security.keys import KeyStore
    from moorage.server import create_app

    from tests.support import serve_in_thread

    settings = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": "tester"})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    store = KeyStore(registry.catalog)
    (operator, op_key), (_, admin_key) = store.create("operator"), store.create("admin")
    try:
        with serve_in_thread(create_app(settings, ["emb@production"], registry=registry)) as url:
            remote = ("config", "--url", url, "--key", op_key)
            code, out, _ = moorage(*remote, "draft", "global", "--set", "serve.max_batch_size=4")
            assert code == 0 and json.loads(out) == {"serve": {"max_batch_size": 4}}
            assert moorage(*remote, "publish", "global")[1].strip() == "release 1 of global: published"
            code, _, err = moorage(*remote, "draft", "global", "--set", "serve.max_batch_size=0")
            errors = [line for line in err.splitlines() if line.startswith("error:")]  # the server logs here too
            assert code == 2 and len(errors) == 1 and "/serve/max_batch_size" in errors[0]
            code, _, err = moorage("config", "--url", url, "--key", "moor_000000000000_" + "x" * 30, "status")
            assert code == 2 and "401" in err
            history = json.loads(moorage("config", "--url", url, "--key", admin_key, "history", "--json")[1])
            assert [(r["number"], r["author"]) for r in history] == [(1, operator.id)]  # the server acts as the key
    finally:
        registry.close()
