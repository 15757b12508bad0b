"""`moorage spark run`: a JSONL file through a registry model into Parquet end to end (one subprocess,
one JVM), and the one-line errors for an unknown reference, a missing extra and a JVM that cannot
start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moorage.cli.main import main
from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import Runtime


@pytest.fixture
def home(tmp_path, fake_model) -> Path:
    home = tmp_path / "home"
    registry = Registry.from_settings(load_settings(environ={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester"}))
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.close()
    return home


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "news.jsonl"
    rows = [{"id": f"n{i}", "text": f"the model serves batch {i}"} for i in range(20)] + [{"id": "empty", "text": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`moorage ARGS` in this process: its exit status and stderr (the root logger as it was after)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(sys, "argv", ["moorage", *args])
    monkeypatch.setattr("faulthandler.enable", lambda: None)  # captured stderr has no file descriptor
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        root.handlers[:], root.level = handlers, level
    return int(exit_.value.code or 0), capsys.readouterr().err


def test_a_jsonl_file_through_the_model_into_parquet(home, source, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MOORAGE_HOME": str(home), "COLUMNS": "200"}
    args = ["spark", "run", "--source", str(source), "--model", "emb@production", "--sink", f"parquet://{out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "moorage", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "emb@production -> emb:1 (embed)" in proc.stdout and "wrote 21 rows" in proc.stdout

    files = [p for p in out.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in p.parts)]
    rows = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    assert len(rows) == 21
    assert {"id", "text", "model", "version", "embedding", "tokens", "error"} <= set(rows["n0"])
    assert rows["empty"]["error"] == "invalid_input: a non-empty string is needed for this model"
    settings = load_settings(environ={"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester"})
    registry = Registry.from_settings(settings)
    expected = Runtime(registry, settings.runtime).predict("emb:1", [rows[f"n{i}"]["text"] for i in range(20)])
    registry.close()
    for i, vector in enumerate(expected):
        row = rows[f"n{i}"]
        assert (row["model"], row["version"], row["error"]) == ("emb", 1, None)
        assert row["embedding"] == pytest.approx(vector.tolist(), rel=1e-5, abs=1e-6)


def test_an_unknown_reference_is_one_line(home, source, tmp_path, capsys, monkeypatch):
    args = ["--home", str(home), "spark", "run", "--source", str(source), "--model", "nope", "--sink", "parquet:///x"]
    code, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "nope" in err


def test_a_missing_extra_is_one_line_naming_it(home, source, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # `import pyspark` now fails, as without the extra
    args = ["--home", str(home), "spark", "run", "--source", str(source), "--model", "emb", "--sink", "parquet:///x"]
    code, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and err.count("\n") == 1 and "pip install 'moorage[spark]'" in err


def test_java_home_pointing_nowhere_is_one_line(home, source, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    args = ["--home", str(home), "spark", "run", "--source", str(source), "--model", "emb", "--sink", "parquet:///x"]
    code, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and err.count("\n") == 1 and "JAVA_HOME" in err and "holds no bin/java" in err


def test_a_jvm_that_cannot_start_is_one_line(home, source, tmp_path):
    java_home = tmp_path / "broken-java"
    (java_home / "bin").mkdir(parents=True)
    java = java_home / "bin" / "java"
    java.write_text("#!/bin/sh\nexit 1\n")  # a Java that starts no JVM
    java.chmod(0o755)
    env = {**os.environ, "MOORAGE_HOME": str(home), "JAVA_HOME": str(java_home), "COLUMNS": "200"}
    args = ["spark", "run", "--source", str(source), "--model", "emb", "--sink", f"parquet://{tmp_path / 'o'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "moorage", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start Spark (local[2]):") and "Traceback" not in proc.stderr
