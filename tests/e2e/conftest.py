from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def cli(tmp_path: Path):
    """Run `python -m moorage ...` in a subprocess with its own home; returns CompletedProcess."""
    env = {**os.environ, "MOORAGE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("MOORAGE_CONFIG", None)

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "moorage", *args], capture_output=True, text=True, env=env, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"moorage {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
