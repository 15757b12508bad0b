"""`moorage stream produce | run --workers 2 | dead-letters` as a user runs them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time


def test_produce_run_with_two_workers_and_list_dead_letters(cli, cli_env, fake_model, tmp_path):
    cli("models", "register", str(fake_model("embed")), "--name", "emb", "--task", "embed", check=True)
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps({"text": f"story {i}"}) + "\n" for i in range(300)) + "{broken\n")
    queue = f"sqlite:///{tmp_path}/queue.db?topic=news"
    out = cli("stream", "produce", str(data), "--to", queue, check=True)
    assert "published 301 messages" in out.stdout and "dead-letter" in out.stderr
    db = tmp_path / "results.db"
    cmd = [sys.executable, "-m", "moorage", "stream", "run", "--source", queue, "--model", "emb",
           "--sink", f"sql+sqlite:///{db}?table=news", "--workers", "2", "--batch-size", "16"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    count = 0
    while count < 300 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            count = sqlite3.connect(db).execute("SELECT count(*) FROM news").fetchone()[0]
        except sqlite3.OperationalError:
            count = 0
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert count == 300, output
    assert proc.returncode == 0, output
    assert "2 worker(s)" in output
    listed = cli("stream", "dead-letters", "--source", queue, "--json", check=True).stdout.splitlines()
    assert [json.loads(line)["reason"].split(":")[0] for line in listed] == ["invalid_json"]
    bad = cli("stream", "run", "--source", "sqlite:///q.db", "--model", "emb", "--sink", "csv://out")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown sink" in bad.stderr
