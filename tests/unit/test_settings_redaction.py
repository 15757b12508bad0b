"""Settings are frozen, handed to workers in an owner-only file, and shown only redacted: a secret
planted in every credential field appears neither in `Settings.redacted`, `/admin/settings` nor
`moorage config`."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from moorage.config import (
    SETTINGS_FILE_ENV,
    Settings,
    load_settings,
    read_settings_file,
    redact_url,
    write_settings_file,
)
from moorage.errors import ConfigError
from moorage.registry import Registry
from moorage.security.keys import KeyStore

MASTER_KEY = base64.b64encode(b"planted-master-key-32-bytes-long").decode()
SECRETS = [
    "CATALOG-PW",
    "REDIS-PW",
    "JOBS-PW",
    "QUERY-PW",
    "STORE-PW",
    "S3-KEY-ID",
    "S3-SECRET",
    "S3-TOKEN",
    "NESTED-SECRET",
    "SAS-TOKEN",
    MASTER_KEY,
]
PLANTED = {
    "MOORAGE_REGISTRY__CATALOG_URL": "postgresql://moorage:CATALOG-PW@db.internal:5432/moorage",
    "MOORAGE_REGISTRY__STORE_URL": "ftp://artifacts:STORE-PW@files.internal/models",
    "MOORAGE_REGISTRY__STORAGE_OPTIONS": json.dumps(
        {
            "key": "S3-KEY-ID",
            "secret": "S3-SECRET",
            "token": "S3-TOKEN",
            "endpoint_url": "http://minio.internal:9000",
            "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "NESTED-SECRET"},
            "sas": "SAS-TOKEN",  # a credential under a name no rule knows: masked all the same
        }
    ),
    "MOORAGE_SECURITY__LIMITS__REDIS_URL": "redis://:REDIS-PW@cache.internal:6379/1",
    "MOORAGE_STREAM__JOBS_URL": "amqp://jobs:JOBS-PW@mq.internal:5672/?topic=jobs&password=QUERY-PW",
    "MOORAGE_SECURITY__MASTER_KEY": MASTER_KEY,
}


def _planted(home, **extra: str) -> Settings:
    return load_settings(environ={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester", **PLANTED, **extra})


def _assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secrets shown: {leaked}\n{text}"


def test_redacted_masks_every_credential_and_keeps_the_rest(tmp_path):
    data = _planted(tmp_path).redacted()
    _assert_no_secret(json.dumps(data))
    assert data["registry"]["catalog_url"] == "postgresql://moorage:***@db.internal:5432/moorage"
    assert data["security"]["limits"]["redis_url"] == "redis://:***@cache.internal:6379/1"
    assert data["stream"]["jobs_url"] == "amqp://jobs:***@mq.internal:5672/?topic=jobs&password=***"
    options = data["registry"]["storage_options"]
    assert options["endpoint_url"] == "http://minio.internal:9000"  # what an operator needs to see
    assert options["client_kwargs"]["region_name"] == "eu-west-1"
    assert data["security"]["master_key"] == "***"
    assert data["home"] == str(tmp_path) and data["serve"]["port"] == 8000  # plain JSON values


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:p@ss/w@cache:6379/0", "redis://:***@cache:6379/0"),  # unescaped @ and / in the password
        ("kafka://user:pw@h1:9092,h2:9092/topic", "kafka://user:***@h1:9092,h2:9092/topic"),
        ("https://host/x?X-Amz-Signature=abc&part=1", "https://host/x?X-Amz-Signature=***&part=1"),
        ("postgresql://moorage@db/moorage", "postgresql://moorage@db/moorage"),  # no password: as it is
        ("sqlite:////data/jobs.db?topic=jobs", "sqlite:////data/jobs.db?topic=jobs"),
        ("s3://bucket/key@v2", "s3://bucket/key@v2"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_settings_are_frozen(tmp_path):
    settings = _planted(tmp_path)
    with pytest.raises(ValidationError, match="frozen"):
        settings.serve.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.log_level = "DEBUG"  # type: ignore[misc]
    changed = settings.model_copy(update={"serve": settings.serve.model_copy(update={"port": 1})})
    assert changed.serve.port == 1 and settings.serve.port == 8000


def test_worker_settings_file_is_owner_only_and_keeps_secrets(tmp_path):
    settings = _planted(tmp_path)
    path = write_settings_file(settings, tmp_path / "settings.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = read_settings_file(environ={SETTINGS_FILE_ENV: str(path)})
    assert again == settings  # the worker gets the real master key, not a mask
    assert again.security.master_key is not None and again.security.master_key.get_secret_value() == MASTER_KEY
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by its owner only"):
        read_settings_file(path)
    with pytest.raises(ConfigError, match=SETTINGS_FILE_ENV):
        read_settings_file(environ={})


@pytest.mark.anyio
async def test_admin_settings_shows_no_secret(tmp_path, serving, fake_model):
    clean = load_settings(environ={"MOORAGE_HOME": str(tmp_path / "home"), "MOORAGE_USER": "tester"})
    registry = Registry.from_settings(clean)
    try:
        registry.register(fake_model("embed"), "emb", "embed")
        admin_key = KeyStore(registry.catalog).create("admin")[1]
        async with serving(clean, registry, refs=("emb",)) as (app, client):
            # The planted URLs name servers that do not exist: the app starts on clean settings and
            # the route is shown the planted tree, which is what it renders.
            app.state.settings = _planted(tmp_path / "home")
            response = await client.get("/admin/settings", headers={"Authorization": f"Bearer {admin_key}"})
        assert response.status_code == 200, response.text
        _assert_no_secret(response.text)
        assert response.json()["registry"]["catalog_url"] == "postgresql://moorage:***@db.internal:5432/moorage"
    finally:
        registry.close()


def test_moorage_config_shows_no_secret(tmp_path):
    from moorage.cli.main import app

    env = {"MOORAGE_HOME": str(tmp_path), "MOORAGE_USER": "tester", "MOORAGE_CONFIG": None, **PLANTED}
    result = CliRunner().invoke(app, ["config"], env=env)
    assert result.exit_code == 0, result.output
    _assert_no_secret(result.output)
    assert json.loads(result.output)["stream"]["jobs_url"].startswith("amqp://jobs:***@mq.internal")


def test_a_mistyped_command_is_a_usage_error(monkeypatch, capsys):
    from moorage.cli.main import main

    monkeypatch.setattr("sys.argv", ["moorage", "lis"])
    monkeypatch.setattr("faulthandler.enable", lambda: None)  # captured stderr has no file descriptor
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "No such command 'lis'" in err and "Usage:" in err and "unexpected" not in err
