"""`moorage serve --workers 2` with secrets planted in its config file: they reach the workers through
an owner-only file, never through the environment, and neither the logs nor /admin/settings show them."""

from __future__ import annotations

import base64
import signal
import stat
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from moorage.runtime import make_fake_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MASTER_KEY = base64.b64encode(b"planted-master-key-32-bytes-long").decode()
SECRETS = ["S3-KEY-ID", "S3-SECRET", "S3-TOKEN", "REDIS-PW", MASTER_KEY]


def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        if ppid == pid:
            found.append(int(stat_file.parent.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_workers_get_settings_from_an_owner_only_file_and_nothing_shows_secrets(cli, server, cli_env, tmp_path):
    folder = make_fake_model(tmp_path / "emb", "embed")
    cli("models", "register", str(folder), "--name", "emb", "--task", "embed", check=True)
    planted = {
        "registry": {"storage_options": {"key": "S3-KEY-ID", "secret": "S3-SECRET", "token": "S3-TOKEN"}},
        "security": {"master_key": MASTER_KEY, "limits": {"redis_url": "redis://:REDIS-PW@127.0.0.1:1/0"}},
    }
    config = Path(cli_env["MOORAGE_HOME"]) / "config.yaml"  # picked up from the home folder
    config.write_text(yaml.safe_dump(planted))
    config.chmod(0o600)

    proc, url = server("-m", "emb", "--workers", "2")
    workers = [pid for pid in _children(proc.pid) if "MOORAGE_SETTINGS_FILE" in _environ(pid)]
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    settings_file = Path(_environ(workers[0])["MOORAGE_SETTINGS_FILE"])
    for pid in [proc.pid, *workers]:
        environ = "\n".join(f"{k}={v}" for k, v in _environ(pid).items())
        assert not [s for s in SECRETS if s in environ], f"secrets in the environment of {pid}"
    assert stat.S_IMODE(settings_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings_file.parent.stat().st_mode) == 0o700
    assert MASTER_KEY in settings_file.read_text()  # the workers need the real key

    shown = httpx.get(url + "/admin/settings").text  # security.auth is false in these tests
    assert "S3-KEY-ID" not in shown and MASTER_KEY not in shown and "REDIS-PW" not in shown
    r = httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": "a b"})
    assert r.status_code == 200, r.text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert not settings_file.parent.exists()  # removed at exit
    log = (tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
    assert "Started server process" in log  # stdout and stderr of the parent and both workers
    assert not [s for s in SECRETS if s in log], log
