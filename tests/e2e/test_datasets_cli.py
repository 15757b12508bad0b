"""`moorage datasets` in a subprocess: a refused add is one line on stderr and exit status 2 (the
commands themselves are tested in-process in tests/unit/test_datasets.py: each call here is an
interpreter start)."""

from __future__ import annotations

import json


def test_a_refused_add_is_one_line(cli, tmp_path):
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps({"body": f"story {i}", "topic": "sport"}) + "\n" for i in range(5)))
    bad = cli("datasets", "add", "news", str(path))  # the default columns text and label are not there
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no text column 'text'" in lines[0], bad.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in bad.stdout + bad.stderr
