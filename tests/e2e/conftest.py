from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


@pytest.fixture
def cli_env(tmp_path: Path) -> dict:
    env = {**os.environ, "MOORAGE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env["MOORAGE_SECURITY__AUTH"] = "false"  # test_security_cli.py covers keys, TLS and the audit end to end
    env.pop("MOORAGE_CONFIG", None)
    return env


@pytest.fixture
def cli(cli_env: dict):
    """Run `python -m moorage ...` in a subprocess with its own home; returns CompletedProcess."""
    env = cli_env

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "moorage", *args], capture_output=True, text=True, env=env, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"moorage {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(cli_env: dict, tmp_path: Path):
    """Start `moorage serve ARGS` on a free 127.0.0.1 port, wait until /readyz; stopped at teardown."""
    started = []

    def start(*args: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "moorage", "serve", "--port", str(port), *args],
            env=cli_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {(tmp_path / f'serve-{port}.log').read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready in 120 s")

    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
