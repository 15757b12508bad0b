"""20 alias moves from 20 separate processes at once: none lost, history and alias agree."""

import os
import subprocess
import sys

import pytest

from moorage.registry import Registry

MOVES = 20


def _move(catalog_url: str, store: str, version: int, tag: str) -> subprocess.Popen:
    code = (
        "import sys; from moorage.registry import Registry; "
        "r = Registry(sys.argv[1], sys.argv[2], user=sys.argv[4]); "
        "r.set_alias('x', 'production', int(sys.argv[3]), reason=sys.argv[4])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, catalog_url, store, str(version), tag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    return request.getfixturevalue("pg_url")


def test_concurrent_alias_moves_are_serialised(catalog_url, tmp_path, fake_model):
    store = str(tmp_path / "store")
    reg = Registry(catalog_url, store)
    for seed in range(3):
        reg.register(fake_model(seed=seed), "x", "embed")
    procs = [_move(catalog_url, store, 1 + i % 3, f"p{i}") for i in range(MOVES)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]

    history = reg.history("x", "production")
    assert len(history) == MOVES
    assert sorted(h.reason for h in history) == sorted(f"p{i}" for i in range(MOVES))
    # every move saw the one before it: no move was applied on a stale read
    assert history[0].from_version is None
    assert all(b.from_version == a.to_version for a, b in zip(history, history[1:]))
    assert reg.resolve("x@production").version == history[-1].to_version
    reg.close()
