"""The README's command blocks are run, so the documentation stays true."""

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "MOORAGE_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    }


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    (block,) = _blocks("Quickstart")
    run_cmd, test_cmd = _commands(block)
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == test_cmd
    for cmd in (run_cmd, test_cmd):
        assert (ROOT / cmd.split()[-1]).is_file(), cmd


@pytest.mark.slow
def test_quickstart_first_command_installs_runs_the_demo_and_serves_it(tmp_path):
    (block,) = _blocks("Quickstart")
    run_cmd = _commands(block)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(tmp_path), "MOORAGE_SERVE__PORT": str(port)}
    pidfile = tmp_path / "home" / "serve.pid"
    try:
        proc = subprocess.run(["bash", "-c", run_cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "minilm@production embeds a sentence into 384 dimensions" in proc.stdout
        assert "smollm2@production answers" in proc.stdout
        assert (tmp_path / "home" / "datasets" / "bbc-news.jsonl").is_file()
        assert f"server ready on http://127.0.0.1:{port}" in proc.stdout
        assert "POST /v1/embeddings -> 384 dimensions" in proc.stdout
        assert "Paris" in proc.stdout.split("POST /v1/chat/completions", 1)[1]
        # the server is still answering after the command ended
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ready"
    finally:
        if pidfile.is_file():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.mark.parametrize("index", range(len(_blocks("Using the registry"))))
def test_usage_blocks_run(tmp_path, index):
    block = _blocks("Using the registry")[index]
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
