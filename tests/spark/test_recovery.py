"""The crash proof: Redis Streams -> model -> Parquet and SQL, the driver killed with SIGKILL in the
middle of a micro-batch and restarted from its checkpoint; every message id then appears exactly
once in each sink and every poison message once in the dead-letter stream.

The driver is bench/spark_recovery.py's (a separate process per run: a JVM start each), held at the
kill point by the event it writes, then killed with its whole process group. Each run costs a JVM
start (the whole suite runs on 2 cores), so this test kills once, where the Parquet sink holds the
batch and the SQL sink does not, so the replay must skip one sink and complete the other;
``python bench/spark_recovery.py --kills 10`` does ten kills over all four kill points.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest

from moorage.config import load_settings
from moorage.registry import Registry

BENCH = Path(__file__).resolve().parents[2] / "bench" / "spark_recovery.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("spark_recovery", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_home(tmp_path, fake_model):
    """A catalog with a fake embedder as emb@production, and the environment a driver finds it by."""
    home = tmp_path / "home"
    environ = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester"}
    registry = Registry.from_settings(load_settings(environ=environ))
    registry.register(fake_model("embed"), "emb", "embed", alias="production")
    registry.close()
    return {**os.environ, **environ}


@pytest.mark.timeout(900)  # two driver runs, each a JVM start and its Python workers' imports
def test_sigkill_mid_batch_and_restart_from_the_checkpoint_loses_and_duplicates_nothing(
    redis_base, tmp_path, model_home
):
    bench = load_bench()
    source = f"{redis_base}?topic=news-{uuid.uuid4().hex[:8]}&group=spark"
    counts, recovery = bench.run_recovery(
        source,
        tmp_path / "work",
        kills=1,
        messages=27,
        batch=10,
        model="emb@production",
        env=model_home,
        points=("parquet_committed",),
        hold_after=1,  # each run is killed in its first batch: the one the previous run left half-written
        timeout_s=600,  # a guard against a hang only: each run is a JVM start
        report=lambda line: None,
    )
    assert counts["parquet_lost"] == counts["parquet_duplicated"] == 0
    assert counts["sql_lost"] == counts["sql_duplicated"] == 0
    assert counts["parquet_rows"] == counts["sql_rows"] == counts["expected"] == 30  # 27 and 3 poison
    assert counts["dead_letters"] == counts["dead_letter_ids_distinct"] == 3

    # the kills landed where they were aimed, and each restart replayed the batch it interrupted
    events = recovery.all_events()
    held = [e for e in events if e["event"] == "held"]
    assert len(held) == 1
    later = events[events.index(held[0]) + 1 :]
    after = [e for e in later if e["pid"] == later[0]["pid"] and e["batch"] == held[0]["batch"]]  # the restart
    skipped = {e["detail"]["sink"].split(":")[0] for e in after if e["event"] == "sink_skipped"}
    committed = {e["event"] for e in after if e["event"].endswith("_committed")}
    # the restart found the Parquet batch and wrote only what SQL lacked
    assert skipped == {"parquet"} and committed == {"sql_committed"}
    done = {e["batch"]: e["detail"]["rows"] for e in events if e["event"] == "batch_done"}
    assert sum(done.values()) == 30 and max(done.values()) == 10  # micro-batches of max_batch_size
