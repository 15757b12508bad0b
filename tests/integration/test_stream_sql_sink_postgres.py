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
