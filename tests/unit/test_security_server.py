"""The security edge in-process: roles x endpoints, rate limits, request limits, content filters,
audit rows of every call and a tamper-evident chain."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import text

from moorage.config import load_settings
from moorage.db import utcnow
from moorage.registry import Registry
from moorage.security.audit import AuditLog
from moorage.security.keys import KeyStore

pytestmark = pytest.mark.anyio


def _settings(home, **env):
    base = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", "MOORAGE_SECURITY__AUDIT_FLUSH_MS": "0"}
    return load_settings(environ=base | {f"MOORAGE_SECURITY__{k.upper()}": v for k, v in env.items()})


@pytest.fixture
def secured(tmp_path, fake_model):
    settings = _settings(tmp_path / "home")
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.register(fake_model("generate"), "gen", "generate")
    yield settings, registry
    registry.close()


def _keys(registry) -> dict[str, str]:
    store = KeyStore(registry.catalog)
    keys = {
        "admin": store.create("admin")[1],
        "operator": store.create("operator")[1],
        "invoker": store.create("invoker", models=["emb*"])[1],
        "operator-gen": store.create("operator", models=["gen"])[1],
    }
    revoked_info, keys["revoked"] = store.create("admin")
    store.revoke(revoked_info.id)
    expired_info, keys["expired"] = store.create("admin", expires_at=utcnow() + timedelta(days=1))
    with registry.catalog.session() as s:  # let it expire
        s.execute(
            text("UPDATE api_keys SET expires_at = :t WHERE id = :i"),
            {"t": utcnow() - timedelta(1), "i": expired_info.id},
        )
    keys["forged"] = keys["admin"][:-4] + "AAAA"
    keys["garbage"] = "not-a-key"
    return keys


def _tar(folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


# (method, path, body or callable, permission, model): permission None = any valid key
ENDPOINTS = [
    ("GET", "/v1/models", None, None, None),
    ("GET", "/metrics", None, None, None),
    ("POST", "/v1/models/{model}/predict", {"inputs": ["hi"]}, "invoke", "emb"),
    ("POST", "/v1/embeddings", {"model": "emb", "input": "hi"}, "invoke", "emb"),
    ("POST", "/v1/completions", {"model": "gen", "prompt": "hi", "max_tokens": 2}, "invoke", "gen"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "gen", "messages": [{"role": "user", "content": "hi"}]},
        "invoke",
        "gen",
    ),
    ("POST", "/v1/responses", {"model": "gen", "input": "hi", "max_output_tokens": 2}, "invoke", "gen"),
    ("POST", "/v1/classify", {"model": "emb", "input": ["hi"]}, "invoke", "emb"),
    ("POST", "/v1/jobs", {"model": "emb", "inputs": ["hi"]}, "invoke", "emb"),
    ("GET", "/v1/jobs/{job_id}", None, None, None),
    ("POST", "/admin/reload", None, "manage_models", None),
    ("GET", "/v1/registry/models", None, "manage_models", None),
    ("GET", "/v1/registry/models/{name}", None, "manage_models", "emb"),
    ("POST", "/v1/registry/models/{name}/versions", "upload", "manage_models", "emb"),
    ("PUT", "/v1/registry/models/{name}/aliases/{alias}", {"version": 1}, "manage_models", "emb"),
    ("POST", "/v1/registry/models/{name}/aliases/{alias}/rollback", {}, "manage_models", "emb"),
    ("DELETE", "/v1/registry/models/{name}/aliases/{alias}", None, "manage_models", "emb"),
    ("POST", "/v1/models/{name}/promote", {}, "manage_models", "emb"),
    ("GET", "/admin/keys", None, "manage_keys", None),
    ("POST", "/admin/keys", {"role": "invoker"}, "manage_keys", None),
    ("DELETE", "/admin/keys/{key_id}", None, "manage_keys", None),
    ("GET", "/admin/settings", None, "read_settings", None),
    ("GET", "/admin/audit", None, "read_audit", None),
    ("GET", "/admin/audit/verify", None, "read_audit", None),
    ("GET", "/v1/config/watch", {"instance": "matrix"}, "subscribe_config", None),  # a query, not a body
    (
        "POST",
        "/v1/config/reports",
        {"instance": "matrix", "revision": 0, "status": "applied"},
        "subscribe_config",
        None,
    ),
    ("GET", "/v1/config/drafts/{scope}", None, "manage_config", None),
    ("PUT", "/v1/config/drafts/{scope}", {"values": {"serve": {"max_batch_size": 8}}}, "manage_config", None),
    ("GET", "/v1/config/drafts/{scope}/diff", None, "manage_config", None),
    ("POST", "/v1/config/releases", {"scope": "global"}, "manage_config", None),
    ("GET", "/v1/config/releases", None, "manage_config", None),
    ("POST", "/v1/config/releases/{number}/approve", None, "manage_config", None),
    ("POST", "/v1/config/releases/{number}/promote", None, "manage_config", None),
    ("POST", "/v1/config/releases/{number}/abandon", None, "manage_config", None),
    ("POST", "/v1/config/rollback", {"scope": "global", "to": 1}, "manage_config", None),
    ("GET", "/v1/config/status", None, "manage_config", None),
    (
        "POST",
        "/v1/training/jobs",
        {"task": "classify", "base": "emb", "dataset": "none", "name": "emb"},
        "manage_models",
        "emb",
    ),
    ("GET", "/v1/training/jobs/{job_id}", None, "manage_models", None),  # an inference job: 404 here
    ("POST", "/v1/training/jobs/{job_id}/cancel", None, "manage_models", None),
    ("GET", "/v1/training/jobs/{job_id}/logs", None, "manage_models", None),
]
OPEN = [("GET", "/healthz"), ("GET", "/readyz")]
ROLE_RIGHTS = {
    "admin": {
        "invoke",
        "manage_models",
        "subscribe_config",
        "manage_config",
        "manage_keys",
        "read_settings",
        "read_audit",
    },
    "operator": {"invoke", "manage_models", "subscribe_config", "manage_config"},
    "operator-gen": {"invoke", "manage_models", "subscribe_config", "manage_config"},
    "invoker": {"invoke"},
}
PATTERNS = {"admin": "*", "operator": "*", "operator-gen": "gen", "invoker": "emb*"}


def test_the_matrix_covers_every_route(secured):
    from moorage.server import create_app

    settings, registry = secured
    app = create_app(settings, ["emb"], registry=registry)
    routes = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    listed = {(m, p) for m, p, *_ in ENDPOINTS} | set(OPEN)
    assert routes == listed, f"routes missing from the matrix: {routes - listed}"


def _expected(caller: str, permission: str | None, model: str | None) -> int | str:
    if caller not in ROLE_RIGHTS:
        return 401
    if permission is not None and permission not in ROLE_RIGHTS[caller]:
        return 403
    if model is not None and not (PATTERNS[caller] == "*" or model.startswith(PATTERNS[caller].rstrip("*"))):
        return 403
    return "allowed"


async def test_roles_by_endpoints_every_cell(secured, serving, fake_model):
    settings, registry = secured
    keys = _keys(registry)
    upload = _tar(fake_model("embed", seed=3))
    cells = 0
    async with serving(settings, registry, refs=("emb@production", "gen")) as (app, c):
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        job_id = (await c.post("/v1/jobs", json={"model": "emb", "inputs": ["x"]}, headers=admin)).json()["id"]
        for caller in ["none", "garbage", "forged", "revoked", "expired", *ROLE_RIGHTS]:
            headers = {} if caller == "none" else {"Authorization": f"Bearer {keys[caller]}"}
            if caller == "operator":
                headers = {"X-API-Key": keys[caller]}  # the other header clients use
            for method, path, body, permission, model in ENDPOINTS:
                spare = KeyStore(registry.catalog).create("invoker")[0].id
                url = path.format(
                    model=model, name=model, alias="staging", job_id=job_id, key_id=spare, scope="global", number=1
                )
                kwargs = {"content": upload, "params": {"task": "embed"}} if body == "upload" else {"json": body}
                if method == "GET" and body is not None:
                    kwargs = {"params": body}
                r = await c.request(method, url, headers=headers, **kwargs)
                expected = _expected(caller, permission, model)
                if path == "/v1/jobs/{job_id}" and caller in ROLE_RIGHTS and caller != "admin":
                    expected = 404  # a job is visible to the key that created it (and admins) only
                if path == "/v1/classify" and expected == "allowed":
                    expected = 400  # past the key's rights: emb is an embedding model, not a classifier
                cell = f"{caller} {method} {path}: {r.status_code} {r.text[:200]}"
                if expected == "allowed":
                    assert r.status_code < 400 or r.status_code in (404, 409), cell
                else:
                    assert r.status_code == expected, cell
                    if expected == 401:
                        assert r.headers["www-authenticate"].startswith("Bearer") and "error" in r.json()
                cells += 1
            for method, path in OPEN:
                assert (await c.request(method, path, headers=headers)).status_code == 200
        listed = (await c.get("/v1/models", headers={"Authorization": f"Bearer {keys['invoker']}"})).json()["data"]
        assert [m["id"] for m in listed] == ["emb@production"]  # only the models its patterns allow
        scraped = (await c.get("/metrics", headers=admin)).text
        for code in ("missing_api_key", "invalid_api_key", "revoked_api_key", "expired_api_key"):
            assert f'moorage_security_rejections_total{{code="{code}"}}' in scraped
    assert cells == 9 * len(ENDPOINTS)
    rows = AuditLog(registry.catalog).rows()
    assert {r["status"] for r in rows} >= {200, 201, 202, 401, 403}
    assert any(r["action"] == "upload_version" and r["status"] == 201 and r["version"] for r in rows)
    assert AuditLog(registry.catalog).verify()[1] == []


async def test_auth_off_is_explicit_and_warned(tmp_path, fake_model, serving, caplog):
    settings = _settings(tmp_path / "h", auth="false")
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    async with serving(settings, registry, refs=("emb",)) as (_, c):
        assert (await c.post("/v1/embeddings", json={"model": "emb", "input": "hi"})).status_code == 200
    assert "security.auth is false" in caplog.text


async def test_audit_rows_hold_the_call_not_the_text(secured, serving):
    import hashlib

    settings, registry = secured
    keys = _keys(registry)
    body = {"model": "emb", "input": "a secret sentence"}
    async with serving(settings, registry, refs=("emb@production",)) as (_, c):
        r = await c.post(
            "/v1/embeddings",
            content=json.dumps(body),
            headers={"Authorization": f"Bearer {keys['invoker']}", "Content-Type": "application/json"},
        )
        assert r.status_code == 200
    row = AuditLog(registry.catalog).rows(action="embeddings")[-1]
    assert row["key_id"] == keys["invoker"].split("_")[1]
    assert (row["model"], row["version"], row["status"]) == ("emb", 1, 200)
    assert row["input_sha256"] == hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert row["input_text"] is None and row["latency_ms"] > 0


def test_audit_verify_names_the_edited_or_deleted_row(secured):
    from moorage.security.audit import AuditEntry

    _, registry = secured
    log = AuditLog(registry.catalog)
    log.append([AuditEntry(key_id=f"k{i}", action="embeddings", status=200, model="emb", version=1) for i in range(6)])
    assert log.verify() == (6, [])

    def sql(statement):
        with registry.catalog.session() as s:
            s.execute(text(statement))

    sql("UPDATE audit_log SET status = 500 WHERE seq = 3")
    assert log.verify()[1] == ["row 3 was edited: its content does not match its hash"]
    sql("UPDATE audit_log SET status = 200 WHERE seq = 3")
    # a careful forger recomputes the row's own hash: the next row no longer chains to it
    from moorage.security.audit import row_hash

    row = log.rows()[3]
    forged = row_hash(_hash(registry, 3), row | {"key_id": "someone-else"})
    sql(f"UPDATE audit_log SET key_id = 'someone-else', hash = '{forged}' WHERE seq = 4")
    assert log.verify()[1] == ["row 4 was edited or replaced: row 5 does not chain to it"]
    sql("DELETE FROM audit_log WHERE seq = 4")
    assert "row 4 deleted" in log.verify()[1][0]
    sql("DELETE FROM audit_log WHERE seq >= 5")
    assert log.verify()[1] == ["rows 4-6 deleted (the log should end at row 6)"]


def test_audit_verify_on_a_live_log_and_rows_added_behind_its_back(secured, monkeypatch):
    """verify checks the chain up to the head it read first: rows a live server appends meanwhile are
    not reported as deleted; a row inserted without moving the head is reported."""
    from moorage.security.audit import AuditEntry

    _, registry = secured
    log = AuditLog(registry.catalog)
    entries = [AuditEntry(key_id=f"k{i}", action="embeddings", status=200, model="emb", version=1) for i in range(3)]
    log.append(entries)
    rows = log._iter_rows

    def rows_while_a_server_appends():
        yield from rows()
        log.append(entries)  # a live server commits more rows while verify is reading

    monkeypatch.setattr(log, "_iter_rows", rows_while_a_server_appends)
    assert log.verify() == (3, [])
    monkeypatch.undo()
    assert log.verify() == (6, [])
    row = log.rows()[-1]
    with registry.catalog.session() as s:
        s.execute(
            text("INSERT INTO audit_log (seq, at, key_id, action, status, model, latency_ms, input_sha256, detail,"
                 " prev_hash, hash) VALUES (7, :at, 'forger', 'embeddings', 200, 'emb', 0, '', '{}', :p, :p)"),
            {"at": row["at"], "p": _hash(registry, 6)},
        )  # fmt: skip
    assert log.verify()[1] == ["rows after 6 were appended outside the audit log"]


def _hash(registry, seq):
    with registry.catalog.session() as s:
        return s.execute(text("SELECT hash FROM audit_log WHERE seq = :s"), {"s": seq}).scalar()


async def test_rate_limits_answer_429_with_retry_after(secured, serving):
    settings, registry = secured
    store = KeyStore(registry.catalog)
    rpm_key = store.create("invoker", requests_per_minute=2)[1]
    tpm_key = store.create("invoker", tokens_per_minute=5)[1]
    async with serving(settings, registry, refs=("emb@production",)) as (_, c):
        h = {"Authorization": f"Bearer {rpm_key}"}
        codes = [
            (await c.post("/v1/embeddings", json={"model": "emb", "input": "hi"}, headers=h)).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": "hi"}, headers=h)
        assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        h = {"Authorization": f"Bearer {tpm_key}"}
        long = "one two three four five six seven eight"
        assert (await c.post("/v1/embeddings", json={"model": "emb", "input": long}, headers=h)).status_code == 200
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": "hi"}, headers=h)
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
        # another key is not affected
        other = {"Authorization": f"Bearer {store.create('invoker')[1]}"}
        assert (await c.post("/v1/embeddings", json={"model": "emb", "input": "hi"}, headers=other)).status_code == 200


async def test_request_limits(tmp_path, fake_model, serving):
    settings = _settings(tmp_path / "h", auth="false", limits__max_text_chars="10", limits__max_tokens="8")
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("generate"), "gen", "generate")
    async with serving(settings, registry, refs=("emb", "gen"), max_body_bytes=2048) as (_, c):
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": ["short", "x" * 11]})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "text_too_long") and "input.1" in r.text
        r = await c.post("/v1/completions", json={"model": "gen", "prompt": "hi", "max_tokens": 9})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "max_tokens_too_large")
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": ["x"] * 1000})
        assert r.status_code == 413


async def test_content_filters_block_inputs_mask_and_withhold_outputs(tmp_path, fake_model, serving):
    filters = {
        "emb": {"input_deny": ["forbidden", "re:\\bdrop\\s+table\\b"], "mask_email": True, "mask_phone": True},
        "gen*": {"output_deny": ["re:\\w"]},  # every generated word is withheld
    }
    settings = _settings(tmp_path / "h", auth="false", filters=json.dumps(filters))
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    registry.register(fake_model("generate"), "gen", "generate")
    async with serving(settings, registry, refs=("emb", "gen")) as (_, c):
        for bad in ("this is Forbidden.", "please DROP  TABLE users"):
            r = await c.post("/v1/embeddings", json={"model": "emb", "input": ["fine", bad]})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "content_blocked")
        assert (await c.post("/v1/embeddings", json={"model": "emb", "input": "unforbiddenly fine"})).status_code == 200

        async def vec(t):
            return np.array(
                (await c.post("/v1/embeddings", json={"model": "emb", "input": t})).json()["data"][0]["embedding"]
            )

        masked = await vec("write to ann@example.com or +1 (555) 010-9999 today")
        np.testing.assert_allclose(masked, await vec("write to [EMAIL] or [PHONE] today"))

        r = (await c.post("/v1/completions", json={"model": "gen", "prompt": "hi", "max_tokens": 4})).json()
        assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == ("", "content_filter")
        r = (await c.post("/v1/models/gen/predict", json={"inputs": ["hi"]})).json()["outputs"][0]
        assert (r["text"], r["finish_reason"], r["filtered"]) == ("", "content_filter", True)
        body = {"model": "gen", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        async with c.stream("POST", "/v1/chat/completions", json=body) as s:
            events = [line async for line in s.aiter_lines() if line.startswith("data: {")]
        assert all('"content":"' not in e or '"content":""' in e for e in events)
        assert '"finish_reason":"content_filter"' in events[-1]


def test_stream_filter_holds_back_and_never_splits_an_address():
    from moorage.config import FilterSettings
    from moorage.security.filters import ContentFilter, StreamFilter

    f = StreamFilter(ContentFilter(FilterSettings(mask_email=True, output_deny=["secret plan"])))
    text = "word " * 30 + "mail ann@example.com now " + "more " * 20
    out = "".join(f.push(text[i : i + 3]) for i in range(0, len(text), 3)) + f.finish()
    assert "ann@" not in out and "[EMAIL]" in out and not f.blocked
    g = StreamFilter(ContentFilter(FilterSettings(output_deny=["secret plan"])))
    sent = "".join(g.push(t) for t in ["the ", "secret ", "plan ", "is ", "x " * 50]) + g.finish()
    assert g.blocked and "secret" not in sent
