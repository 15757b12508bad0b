"""`moorage report` over what real stream runs wrote: a Parquet folder (a classifier's rows, from a
real worker, plus synthetic rows in exactly that schema for volume) and a SQLite table of the SQL
sink (a generator's rows). The HTML is opened in headless Chromium: every plot has a size and its
bars, and the page fetches nothing but itself."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moorage.config import load_settings
from moorage.registry import Registry
from moorage.runtime import make_fake_model
from moorage.streams import open_broker
from moorage.streams.runner import StreamJob, run_stream

POISON = [b"this is not json", b'{"id": "no-text"}', b'{"id": "empty", "text": "  "}']
NUM_REAL = 200
NUM_SYNTHETIC = 6000


def moorage(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOORAGE_HOME": str(cwd / "home"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moorage", *args], cwd=cwd, env=env, capture_output=True, text=True)


def parquet_rows(folder: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet")) if folder.exists() else 0


def sql_rows(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT count(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            return 0


async def eventually(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def stream(settings, registry, broker: str, sink: str, model: str, bodies: list[bytes], done) -> None:
    """Publish `bodies`, run a real worker until `done()`, stop it."""
    async with open_broker(broker) as b:
        await b.publish(bodies)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_stream(settings, StreamJob(broker, sink, model), stop, registry=registry))
    try:
        await eventually(done, "the worker's rows")
    finally:
        stop.set()
        await worker


def synthetic(like: pa.Table, n: int, start: float, seed: int, shifted_from: int | None = None) -> pa.Table:
    """`n` classifier rows in exactly `like`'s schema (an older moorage's: without `NEW_COLUMNS`); from
    row `shifted_from` on, more positives with higher scores and three times the latency (what a
    drifting input mix looks like)."""
    rng = np.random.default_rng(seed)
    shifted = np.zeros(n, bool) if shifted_from is None else np.arange(n) >= shifted_from
    positive = rng.random(n) < np.where(shifted, 0.85, 0.5)
    p_top = np.where(shifted, rng.beta(9, 2, n), rng.beta(4, 3, n)) * 0.5 + 0.5
    latency = rng.gamma(2.0, 6.0, n) * np.where(shifted, 3.0, 1.0)
    completed = start + np.arange(n) / 400.0
    received = completed - latency / 1000
    labels = np.where(positive, "positive", "negative")
    scores = [json.dumps({str(lab): float(p), ("negative" if lab == "positive" else "positive"): float(1 - p)})
              for lab, p in zip(labels, p_top)]  # fmt: skip
    columns = {
        "id": [f"syn-{seed}-{i}" for i in range(n)],
        "model": ["clf"] * n,
        "version": [1] * n,
        "task": ["classify"] * n,
        "label": labels.tolist(),
        "score": p_top.tolist(),
        "scores": scores,
        "tokens": rng.integers(3, 30, n).tolist(),
        "latency_ms": latency.tolist(),
        "published_at": (received - rng.gamma(2.0, 2.0, n) / 1000).tolist(),
        "received_at": received.tolist(),
        "completed_at": completed.tolist(),
        "attempts": np.where(rng.random(n) < 0.02, 2, 1).tolist(),
    }
    assert set(columns) == set(like.column_names), "synthetic rows have the old worker's columns, no more, no fewer"
    return pa.table({k: columns[k] for k in like.column_names}).cast(like.schema)


NEW_COLUMNS = ("queue_ms", "ttft_ms", "input_sha256")  # what an older moorage's rows lack


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    settings = load_settings(environ={"MOORAGE_HOME": str(root / "home"), "MOORAGE_USER": "tester",
                                      "MOORAGE_SECURITY__AUTH": "false"})  # fmt: skip
    stream_settings = {"batch_size": 16, "max_wait_ms": 5, "max_text_chars": 1000, "log_interval_s": 1.0}
    settings = settings.model_copy(update={"stream": settings.stream.model_copy(update=stream_settings)})
    registry = Registry.from_settings(settings)
    registry.register(make_fake_model(root / "clf-model", "classify"), "clf", task="classify")
    registry.register(make_fake_model(root / "gen-model", "generate"), "gen", task="generate")
    folder, db = root / "results", root / "results.db"
    broker = f"sqlite:///{root}/queue.db?topic=clf&visibility_timeout=2"
    texts = [f"review {j}: {'great' if j % 3 else 'awful'} product " * (1 + j % 4) for j in
             (i % 150 for i in range(NUM_REAL))]  # fmt: skip
    bodies = [json.dumps({"id": f"real-{i}", "text": t}).encode() for i, t in enumerate(texts)]

    async def real_runs() -> list:
        async def clf_done() -> bool:
            async with open_broker(broker) as b:
                return parquet_rows(folder) >= NUM_REAL and len(await b.dead_letters()) >= len(POISON)

        await stream(settings, registry, broker, f"parquet://{folder}?rows=64&seconds=0.2", "clf",
                     bodies[:100] + POISON + bodies[100:], clf_done)  # fmt: skip
        prompts = [json.dumps({"id": f"g-{i}", "text": f"tell me about {i}",
                               "parameters": {"max_new_tokens": 4 + i % 12}}).encode() for i in range(60)]  # fmt: skip

        async def gen_done() -> bool:
            return sql_rows(db) >= 60

        gen_broker = f"sqlite:///{root}/queue.db?topic=gen&visibility_timeout=2"
        await stream(settings, registry, gen_broker, f"sql+sqlite:///{db}?table=results", "gen", prompts, gen_done)
        async with open_broker(broker) as b:
            return await b.dead_letters()

    dead = asyncio.run(real_runs())
    registry.close()
    real = pq.read_table(folder)  # the worker's own schema
    assert set(NEW_COLUMNS) <= set(real.column_names)
    start = float(pc_max(real["completed_at"])) + 1.0
    old = real.drop_columns(list(NEW_COLUMNS))  # a folder mixing files of an older moorage and of this one
    pq.write_table(synthetic(old, NUM_SYNTHETIC, start, seed=1), folder / "part-synthetic-000.parquet")
    # the dead letters as `moorage stream dead-letters --json` exports them
    listed = moorage("stream", "dead-letters", "--source", broker, "--json", cwd=root)
    assert listed.returncode == 0, listed.stderr
    (root / "dead.jsonl").write_text(listed.stdout)
    assert len(listed.stdout.splitlines()) == len(dead) == len(POISON)
    return root


def pc_max(column) -> float:
    import pyarrow.compute as pc

    return pc.max(column).as_py()


def report_json(root: Path, *args: str) -> dict:
    done = moorage("report", *args, "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chromium():
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is not installed: run scripts/test.sh (it installs chromium)")
    manager = sync_playwright().start()
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return manager, manager.chromium.launch(executable_path="/usr/bin/chromium", args=args)


def test_the_html_report_renders_every_plot_and_fetches_nothing(results):
    out = results / "report.html"
    done = moorage("report", "results", "--dead-letters", "dead.jsonl", "-o", str(out), cwd=results)
    assert done.returncode == 0, done.stderr
    data = report_json(results, "results", "--dead-letters", "dead.jsonl")
    assert data["summary"]["rows"] == NUM_REAL + NUM_SYNTHETIC
    assert data["categories"]["dead_letter"] == {"invalid_json": 1, "missing_text": 2}
    assert set(data["categories"]["label"]) == {"negative", "positive"}
    expected = {"throughput", "latency_ms", "queue_ms", "tokens", "score", "label", "version", "attempts",
                "dead_letter", "drift"}  # fmt: skip
    # texts i and i + 150 are equal: the most frequent inputs are the real rows' (the synthetic have no hash)
    assert [r["rows"] for r in data["frequent_inputs"]] == [2] * 10
    assert all(len(r["input"]) == 12 for r in data["frequent_inputs"])
    assert "ttft_ms" not in data["distributions"], "classifier rows have no time to first token"
    manager, browser = chromium()
    try:
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        figures = page.locator("figure.plot")
        names = []
        for i in range(figures.count()):
            figure = figures.nth(i)
            name = figure.get_attribute("data-plot")
            names.append(name)
            box = figure.locator("svg").bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, name
            bars = figure.locator("rect.bar")
            assert bars.count() == int(figure.get_attribute("data-bars")) > 0, name
            assert any((bars.nth(j).bounding_box() or {}).get("height", 0) > 0 for j in range(bars.count())), name
        assert expected <= set(names), set(names)
        for name, hist in data["distributions"].items():  # the HTML draws the JSON's numbers
            assert page.locator(f'figure[data-plot="{name}"] rect.bar').count() == len(hist["counts"])
        assert page.locator('figure[data-plot="throughput"] rect.window').count() == 1
        assert page.locator("table.slowest tr").count() == 11
        assert page.locator("table.frequent-inputs tr").count() == 11
        assert requests == [out.as_uri()], "the page fetched nothing but itself"
    finally:
        browser.close()
        manager.stop()


@pytest.fixture(scope="module")
def drifting(results):
    """A folder whose second half drifts, and one that does not."""
    like = pq.read_table(next((results / "results").glob("part-synthetic-*.parquet")))
    for name, shifted_from in (("steady", None), ("drifting", 2000)):
        (results / name).mkdir()
        pq.write_table(synthetic(like, 4000, 1.8e9, seed=7, shifted_from=shifted_from),
                       results / name / "part-000.parquet")  # fmt: skip
    return results


def test_drift_is_flagged_for_a_shifted_window_and_not_for_a_steady_one(drifting):
    steady = report_json(drifting, "steady")["drift"]
    assert steady["flagged"] == [] and steady["reference_rows"] == steady["current_rows"] == 2000
    shifted = report_json(drifting, "drifting")["drift"]
    assert {"latency_ms", "score", "label"} <= set(shifted["flagged"])
    by_name = {f["name"]: f for f in shifted["features"]}
    assert by_name["latency_ms"]["psi"] > 0.2 and by_name["latency_ms"]["ks_p"] < 0.01
    assert "tokens" not in shifted["flagged"]  # what did not change is not flagged
    for name, flagged in (("steady", False), ("drifting", True)):
        out = drifting / f"{name}.html"
        assert moorage("report", name, "-o", str(out), cwd=drifting).returncode == 0
        page = out.read_text()
        assert ('class="drift-flags"' in page) is flagged and ('class="drift-none' in page) is not flagged
        assert ('data-feature="label"' in page) and (
            'class="drift-row flagged" data-feature="label"' in page
        ) is flagged


def test_the_reference_can_be_a_time_range_or_another_source(drifting):
    by_time = report_json(drifting, "drifting", "--reference", f"{1.8e9}..{1.8e9 + 4.999}")["drift"]
    assert by_time["reference_rows"] == 2000 and "score" in by_time["flagged"]
    other = report_json(drifting, "drifting", "--reference", "steady", "--window", "last:50%")["drift"]
    assert other["reference_rows"] == 4000 and other["current_rows"] == 2000 and "label" in other["flagged"]
    strict = report_json(drifting, "drifting", "--psi-threshold", "100", "--ks-p", "0")["drift"]
    assert strict["flagged"] == [], "the thresholds are the options'"


def test_a_sql_sink_table_is_a_source(results):
    data = report_json(results, "sqlite:///results.db", "--table", "results")
    assert data["summary"]["rows"] == 60 and data["summary"]["tasks"] == "generate"
    assert sum(data["categories"]["finish_reason"].values()) == 60
    assert data["summary"]["tokens_out"] > 0 and "completion_tokens" in data["distributions"]
    assert data["distributions"]["ttft_ms"]["rows"] == 60 and data["distributions"]["ttft_ms"]["p50"] > 0
    assert len(data["frequent_inputs"]) == 0 and all(len(r["input"]) == 12 for r in data["slowest"])  # unique
    out = results / "sql.html"
    assert moorage("report", "sqlite:///results.db", "--table", "results", "-o", str(out), cwd=results).returncode == 0
    assert 'data-plot="ttft_ms"' in out.read_text(), "the time to first token is plotted"
    same = report_json(results, "sql+sqlite:///results.db?table=results")  # the sink's own URL
    assert same["summary"] == data["summary"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["missing"], "no such file or folder"),
        (["empty"], "holds no .parquet or .jsonl"),
        (["sqlite:///results.db", "--table", "nope"], "no table 'nope'"),
        (["sqlite:///absent.db", "--table", "results"], "no such SQLite file"),
        (["results", "--reference", "first:150%"], "0 < N < 100"),
        (["results", "--format", "pdf"], "use html or json"),
        (["corrupt"], "cannot read the rows"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(results, args, says):
    (results / "empty").mkdir(exist_ok=True)
    (results / "corrupt").mkdir(exist_ok=True)
    (results / "corrupt" / "part-0.parquet").write_bytes(b"PAR1 not really parquet")
    done = moorage("report", *args, cwd=results)
    assert done.returncode != 0
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.anyio
async def test_the_catalogs_jobs_table_is_a_source(settings, registry, fake_model, serving, home, tmp_path):
    """What the jobs wrote: one row per output (a job's timings once), a failed job's error code."""
    registry.register(fake_model("classify"), "cls", "classify")
    registry.register(fake_model("generate"), "gen", "generate")
    limits = settings.security.limits.model_copy(update={"max_tokens": 10**7})  # reaches the model, which refuses
    settings = settings.model_copy(update={"security": settings.security.model_copy(update={"limits": limits})})
    async with serving(settings, registry, refs=("cls", "gen")) as (_, c):
        ids = [(await c.post("/v1/jobs", json={"model": "cls", "inputs": [f"a {i}", f"b {i}", f"c {i}"]})).json()["id"]
               for i in range(10)]  # fmt: skip
        bad = await c.post("/v1/jobs", json={"model": "gen", "inputs": ["hi"], "parameters": {"max_new_tokens": 10**6}})
        ids.append(bad.json()["id"])

        async def finished() -> bool:
            jobs = [(await c.get(f"/v1/jobs/{i}")).json() for i in ids]
            return all(j["status"] in ("succeeded", "failed") for j in jobs)

        await eventually(finished, "the jobs")
    data = report_json(tmp_path, f"sqlite:///{home / 'catalog.db'}", "--table", "jobs")
    seen = {k: data["summary"][k] for k in ("rows", "distinct_ids", "error_rows")} | data["categories"]
    assert data["summary"]["rows"] == 10 * 3 + 1 and data["summary"]["distinct_ids"] == 31, seen
    assert data["categories"].get("error") == {"context_length_exceeded": 1}, seen
    assert sum(data["categories"]["label"].values()) == 30
    assert data["distributions"]["latency_ms"]["rows"] == 11, "a job's latency counts once"
    assert data["frequent_inputs"] is None and "input" not in data["slowest"][0], "job rows have no input hash"
