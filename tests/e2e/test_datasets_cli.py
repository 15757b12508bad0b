"""`moorage datasets` in a subprocess: add, show as JSON, a one-line error (the rest is in
tests/unit/test_datasets.py; each command here is an interpreter start)."""

from __future__ import annotations

import json


def test_add_show_and_a_bad_column(cli, tmp_path):
    rows = [{"body": f"{label} story {i}", "topic": label} for label in ("sport", "tech") for i in range(10)]
    rows.append(dict(rows[0]))  # one exact duplicate
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    added = cli("datasets", "add", "news", str(path), "--text", "body", "--label", "topic", "--test", "0.3", check=True)
    assert "registered news:1 classify: 20 rows of 21 read (1 exact" in added.stdout, added.stdout
    shown = json.loads(cli("datasets", "show", "news", "--json", check=True).stdout)
    assert shown["ref"] == "news:1" and shown["label_map"] == {"sport": 0, "tech": 1}
    assert {name: s["rows"] for name, s in shown["splits"].items()} == {"train": 12, "validation": 2, "test": 6}

    bad = cli("datasets", "add", "other", str(path))  # the default columns text and label are not there
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no text column 'text'" in lines[0], bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
