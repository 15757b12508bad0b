"""The SQL sink on a real PostgreSQL: upsert by message id, replays counted, not duplicated."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from moorage.streams import open_sink

pytestmark = pytest.mark.anyio


async def test_sql_sink_upserts_on_postgres(pg_url):
    url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    rows = [{"id": f"m{i}", "model": "emb", "version": 1, "task": "embed", "embedding": [0.1, i]} for i in range(50)]
    async with open_sink(f"sql+{url}?table=embeddings") as sink:
        await sink.write(rows)
        await sink.write(rows[:10] + rows[:10])  # a replay, holding the same ids twice in one batch
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT id, writes, output FROM embeddings ORDER BY id")).all()
    engine.dispose()
    assert len(got) == 50 and len({r[0] for r in got}) == 50
    assert sorted(r[1] for r in got) == [1] * 40 + [2] * 10
    assert got[0][2] == {"embedding": [0.1, 0]}


async def test_an_older_table_gains_the_new_nullable_columns_on_open(pg_url):
    """A table created with an older moorage's columns keeps working: the sink adds what it lacks,
    and a second sink opening it (a racing worker) finds them there."""
    url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE results (id VARCHAR(512) PRIMARY KEY, model VARCHAR(200) NOT NULL, "
                             "version INTEGER NOT NULL, task VARCHAR(20) NOT NULL, output JSON NOT NULL, "
                             "tokens INTEGER, latency_ms FLOAT, published_at FLOAT, received_at FLOAT, "
                             "completed_at FLOAT, attempts INTEGER, writes INTEGER NOT NULL DEFAULT 1)"))  # fmt: skip
    row = {"id": "m1", "model": "gen", "version": 1, "task": "generate", "text": "hi", "ttft_ms": 1.5,
           "queue_ms": 0.25, "input_sha256": "ab" * 32}  # fmt: skip
    async with open_sink(f"sql+{url}?table=results") as sink, open_sink(f"sql+{url}?table=results") as again:
        await sink.write([row])
        await again.write([row])
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT ttft_ms, queue_ms, input_sha256, writes, output FROM results")).all()
    engine.dispose()
    assert got == [(1.5, 0.25, "ab" * 32, 2, {"text": "hi"})]
