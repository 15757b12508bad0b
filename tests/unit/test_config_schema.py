"""The config center's schema without a store: which keys are hot, pointers, diffs, merging, applying a
release to a process's settings, and the sticky buckets of gray releases."""

from __future__ import annotations

import pytest

from moorage.config import ServeSettings, Settings, StreamSettings
from moorage.configcenter.releases import bucket, check_gray
from moorage.configcenter.schema import (
    HOT_KEYS,
    RESTART_KEYS,
    InvalidConfig,
    apply_values,
    diff,
    is_restart,
    merge,
    pointer,
    validate_values,
)


def test_every_serve_and_stream_key_is_hot_or_restart_flagged_never_both():
    for section, model in (("serve", ServeSettings), ("stream", StreamSettings)):
        keys = {f"/{section}/{name}" for name in model.model_fields}
        assert keys <= HOT_KEYS | RESTART_KEYS
    assert not HOT_KEYS & RESTART_KEYS
    assert is_restart("/serve/port") and not is_restart("/serve/max_batch_size")
    assert not is_restart("/security/filters/chat-*/input_deny") and not is_restart("/routing/emb/split")


def test_pointers_escape_slashes_and_tildes():
    assert pointer(("security", "filters", "a/b~c", "input_deny", 0)) == "/security/filters/a~1b~0c/input_deny/0"
    with pytest.raises(InvalidConfig) as caught:
        validate_values({"security": {"filters": {"a/b": {"input_deny": ["re:("]}}}})
    assert caught.value.errors[0]["pointer"] == "/security/filters/a~1b/input_deny/0"


def test_diff_is_key_level_and_flags_restart_keys():
    old = {"serve": {"max_batch_size": 8, "port": 8000}, "log_level": "INFO"}
    new = {"serve": {"max_batch_size": 16, "port": 9000}, "security": {"limits": {"requests_per_minute": 5}}}
    assert [(c.pointer, c.old, c.new, c.restart) for c in diff(old, new)] == [
        ("/log_level", "INFO", None, False),
        ("/security/limits/requests_per_minute", None, 5, False),
        ("/serve/max_batch_size", 8, 16, False),
        ("/serve/port", 8000, 9000, True),
    ]
    assert diff(new, new) == []


def test_merge_is_deep_for_objects_and_replaces_everything_else():
    base = {"serve": {"max_batch_size": 8, "max_wait_ms": 5}, "security": {"filters": {"a": {"input_deny": ["x"]}}}}
    top = {"serve": {"max_batch_size": 4}, "security": {"filters": {"a": {"input_deny": ["y"]}}}}
    assert merge(base, top) == {
        "serve": {"max_batch_size": 4, "max_wait_ms": 5},
        "security": {"filters": {"a": {"input_deny": ["y"]}}},
    }
    assert base["serve"]["max_batch_size"] == 8  # the inputs are left alone


def test_apply_values_gives_new_validated_settings_and_leaves_the_old_ones(tmp_path):
    settings = Settings(home=tmp_path)
    applied = apply_values(settings, {"serve": {"max_batch_size": 4}, "log_level": "debug"})
    assert (applied.serve.max_batch_size, applied.log_level, applied.serve.port) == (4, "DEBUG", settings.serve.port)
    assert settings.serve.max_batch_size == 32
    with pytest.raises(InvalidConfig) as caught:
        apply_values(settings, {"stream": {"max_backoff_s": 0}})
    assert caught.value.errors[0]["pointer"] == "/stream/max_backoff_s"


def test_gray_buckets_are_sticky_as_the_share_grows():
    keys = [f"key-{i}" for i in range(2000)]
    at_10 = {k for k in keys if bucket("global", k) < 1000}
    at_30 = {k for k in keys if bucket("global", k) < 3000}
    assert at_10 < at_30 and 150 < len(at_10) < 250 and 500 < len(at_30) < 700  # about 10 % and 30 % of 2000
    assert check_gray({"percent": 30}) == {"percent": 30, "by": "instance"}
    assert check_gray({"percent": 5, "by": "request"}) == {"percent": 5, "by": "request", "key": "api_key"}
    for bad in ({}, {"labels": {"a": "b"}, "percent": 5}, {"percent": 5, "key": "cookie"}, {"percent": 100}):
        with pytest.raises(InvalidConfig):
            check_gray(bad)
