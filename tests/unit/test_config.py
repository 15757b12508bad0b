from pathlib import Path

import pytest

from moorage.config import load_settings
from moorage.errors import ConfigError


def test_defaults_derive_paths_from_home(tmp_path):
    s = load_settings(environ={"MOORAGE_HOME": str(tmp_path)})
    assert s.home == tmp_path
    assert s.catalog_url == f"sqlite:///{tmp_path / 'catalog.db'}"
    assert s.store_url == str(tmp_path / "artifacts")
    assert s.cache_dir == tmp_path / "cache"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_precedence_defaults_file_env_flags(tmp_path, suffix):
    cfg = tmp_path / f"moorage{suffix}"
    if suffix == ".yaml":
        cfg.write_text("log_level: warning\nregistry:\n  store_url: /from/file\n  lock_timeout_s: 5\n")
    else:
        cfg.write_text('log_level = "warning"\n[registry]\nstore_url = "/from/file"\nlock_timeout_s = 5\n')
    env = {"MOORAGE_HOME": str(tmp_path), "MOORAGE_REGISTRY__STORE_URL": "/from/env"}

    file_only = load_settings(cfg, environ={"MOORAGE_HOME": str(tmp_path)})
    assert file_only.store_url == "/from/file"
    assert file_only.log_level == "WARNING"
    assert file_only.registry.lock_timeout_s == 5

    with_env = load_settings(cfg, environ=env)
    assert with_env.store_url == "/from/env"
    assert with_env.registry.lock_timeout_s == 5  # untouched keys keep the file's value

    with_flags = load_settings(cfg, environ=env, overrides={"registry": {"store_url": "/from/flag"}})
    assert with_flags.store_url == "/from/flag"


def test_config_file_in_home_is_picked_up(tmp_path):
    (tmp_path / "config.yaml").write_text("runtime:\n  max_loaded_bytes: 1234\n")
    assert load_settings(environ={"MOORAGE_HOME": str(tmp_path)}).runtime.max_loaded_bytes == 1234


def test_env_names_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("user: from-file\n")
    assert load_settings(environ={"MOORAGE_CONFIG": str(cfg), "MOORAGE_HOME": str(tmp_path)}).user == "from-file"


@pytest.mark.parametrize(
    ("content", "env", "needle"),
    [
        (
            "registry:\n  lock_timeout_s: -1\n",
            {},
            "setting 'registry.lock_timeout_s' (MOORAGE_REGISTRY__LOCK_TIMEOUT_S)",
        ),
        ("registry:\n  bogus: 1\n", {}, "setting 'registry.bogus'"),
        ("", {"MOORAGE_LOG_LEVEL": "loud"}, "setting 'log_level' (MOORAGE_LOG_LEVEL)"),
        ("- a list\n", {}, "must hold a mapping"),
        ("registry: [\n", {}, "is not valid YAML"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, content, env, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={"MOORAGE_HOME": str(tmp_path), **env})
    assert needle in info.value.message


def test_missing_or_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_env_is_injected_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("MOORAGE_USER", "from-process-env")
    assert load_settings(environ={"MOORAGE_HOME": str(tmp_path)}).user != "from-process-env"
    assert load_settings(environ={"MOORAGE_HOME": str(Path(tmp_path)), "MOORAGE_USER": "u"}).user == "u"


def test_only_load_settings_reads_the_environment(monkeypatch, tmp_path):
    from moorage.config import Settings

    monkeypatch.setenv("MOORAGE_HOME", str(tmp_path))
    monkeypatch.setenv("MOORAGE_SERVE__PORT", "1234")
    assert Settings().serve.port == 8000  # built directly: defaults and arguments only
    assert load_settings().serve.port == 1234  # the one entry point that reads os.environ


def test_engine_configs_take_the_settings_of_the_same_name(tmp_path):
    from moorage.batching.settings import serving_pool_config, stream_pool_config
    from moorage.streams.runner import worker_config

    env = {
        "MOORAGE_HOME": str(tmp_path),
        "MOORAGE_SERVE__MAX_BATCH_SIZE": "7",
        "MOORAGE_SERVE__MAX_WAITING_SEQS": "9",
        "MOORAGE_SERVE__REQUEST_TIMEOUT_S": "3",
        "MOORAGE_SERVE__POLL_INTERVAL_S": "0",
        "MOORAGE_STREAM__BATCH_SIZE": "10",
        "MOORAGE_STREAM__MAX_IN_FLIGHT": "1",
        "MOORAGE_STREAM__MAX_WAIT_MS": "4",
        "MOORAGE_STREAM__SINK_RETRIES": "2",
        "MOORAGE_SECURITY__AUDIT_INPUTS": "true",
    }
    settings = load_settings(environ=env)
    serving = serving_pool_config(settings)
    assert (serving.batch.max_batch_size, serving.batch.timeout_s, serving.poll_interval_s) == (7, 3, 0)
    assert (serving.generation.max_waiting, serving.generation.timeout_s) == (9, 3)
    streams = stream_pool_config(settings)
    assert (streams.batch.max_batch_size, streams.batch.max_wait_ms, streams.batch.max_queue) == (10, 4, 30)
    assert streams.generation.max_waiting == 30 and streams.batch.timeout_s == settings.stream.item_timeout_s
    worker = worker_config(settings)
    assert (worker.batch_size, worker.sink_retries, worker.audit_inputs) == (10, 2, True)


def test_the_readme_configuration_example_is_valid(tmp_path):
    """The YAML example in the README's Configuration section loads as it is (the docs stay true)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    path = tmp_path / "config.yaml"
    path.write_text(example)
    settings = load_settings(path, environ={})
    assert settings.jobs.callback_allow and settings.stream.jobs_url and settings.serve.models


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("MOORAGE_SERVR__PORT", "did you mean MOORAGE_SERVE__PORT?"),
        ("MOORAGE_SERVE_PORT", "did you mean MOORAGE_SERVE__PORT?"),  # one underscore where nesting takes two
        ("moorage_securty__auth", "did you mean MOORAGE_SECURITY__AUTH?"),
        ("MOORAGE_NOTHING_LIKE_IT", ""),
    ],
)
def test_an_unknown_section_in_the_environment_is_refused_not_ignored(tmp_path, name, hint):
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MOORAGE_HOME": str(tmp_path), name: "9999"})
    message = info.value.message
    assert message.startswith(f"environment variable {name} names no setting") and hint in message
    assert "known: home, user, log_level, registry, runtime, serve, stream, security, jobs" in message


def test_variables_that_are_not_settings_are_left_alone(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve:\n  port: 1234\n")
    env = {
        "MOORAGE_HOME": str(tmp_path),
        "MOORAGE_CONFIG": str(cfg),
        "MOORAGE_SETTINGS_FILE": "/somewhere/settings.json",  # a server worker's, read by read_settings_file
        "MOORAGE_TORCH_SPEC": "torch==2.13.0",  # scripts/install.sh's
        "OTHER_SERVR__PORT": "1",
        # what Kubernetes gives every pod of a namespace with a Service named moorage, and moorage-api
        "MOORAGE_SERVICE_HOST": "10.0.0.7",
        "MOORAGE_SERVICE_PORT": "8000",
        "MOORAGE_SERVICE_PORT_HTTP": "8000",
        "MOORAGE_PORT": "tcp://10.0.0.7:8000",
        "MOORAGE_PORT_8000_TCP": "tcp://10.0.0.7:8000",
        "MOORAGE_PORT_8000_TCP_PROTO": "tcp",
        "MOORAGE_PORT_8000_TCP_PORT": "8000",
        "MOORAGE_PORT_8000_TCP_ADDR": "10.0.0.7",
        "MOORAGE_API_SERVICE_HOST": "10.0.0.8",
        "MOORAGE_API_PORT": "tcp://10.0.0.8:80",
    }
    assert load_settings(environ=env).serve.port == 1234


def test_an_unknown_section_in_the_config_file_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("servr:\n  port: 1\n")
    with pytest.raises(ConfigError, match="setting 'servr'.*Extra inputs are not permitted"):
        load_settings(cfg, environ={"MOORAGE_HOME": str(tmp_path)})
