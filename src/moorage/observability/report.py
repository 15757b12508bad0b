"""An analysis report over the results a stream worker wrote: one HTML file to open or mail, or JSON.

What it reads (DuckDB does the queries):

- a folder of a file sink's ``*.parquet`` / ``*.jsonl`` files (or one such file): one flat row per
  message, as `MessageCodec.row` writes it: ``id, model, version, task, tokens, latency_ms,
  published_at, received_at, completed_at, attempts`` and the task's fields from `encode_result`
  (``label, score, scores`` | ``embedding`` | ``text, finish_reason, prompt_tokens,
  completion_tokens, filtered``). Hidden ``.*.tmp`` files (a write in progress) are skipped.
- a SQL sink's table (any SQLAlchemy URL): the common columns, the task's fields in ``output``.
- the catalog's ``jobs`` table (what the jobs wrote): one row per output of a finished job, the
  job's timings (started to finished; created to started as the queue wait) on its first output
  only, so each job counts once in latency; a failed job is one row with its error code.
- optionally the dead letters, which live on the broker, not in the sink: an export of
  ``moorage stream dead-letters --source URL --json`` (JSONL, or Parquet with the same fields).

Rows carry no input text. A stream worker's rows carry ``input_sha256`` (the sha256 of the input)
and, for generation, ``ttft_ms`` (arrival in the engine to the first token); rows of an older
moorage or of jobs have neither, and the report says so rather than inventing them. The slowest
rows and the most frequent inputs are named by a shortened ``input_sha256`` where rows have one
(message ids, and the most frequent outputs: an md5 of the text, or the label, in any case), and
the time to first token is plotted where rows have one. Queue wait is publish to receive (the
broker's); the rows' ``queue_ms`` (the wait inside the engine) is not plotted.

Drift compares a current window against a reference window (the first N % of rows by completion
time, a time range, or another source) per feature: PSI over reference deciles (categories for
labels and finish reasons) and the two-sample Kolmogorov-Smirnov test. A feature is flagged when
PSI > ``psi_threshold`` (0.2), or when KS p < ``ks_p_threshold`` (0.01) *and* the KS distance D
>= ``ks_min_d`` (0.1): on 100,000 rows a p-value alone flags differences too small to matter.

The HTML has inline SVG drawn here, no script at all: it opens with no network, in a mail client
that strips scripts, and stays small.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadRequest, MissingDependency, NotFound

PSI_THRESHOLD = 0.2
KS_P_THRESHOLD = 0.01
KS_MIN_D = 0.1
NUMERIC_FEATURES = ("latency_ms", "queue_ms", "tokens", "prompt_tokens", "completion_tokens", "out_chars",
                    "score", "emb_norm", "ttft_ms")  # fmt: skip
CATEGORICAL_FEATURES = ("label", "finish_reason")
MIN_DRIFT_ROWS = 20
SHORT_HASH = 12  # hex digits of input_sha256 shown (48 bits: no collision among a report's inputs)
Step = Callable[[str], None]


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise MissingDependency("moorage report needs DuckDB: pip install 'moorage[report]'") from None
    return duckdb


# -- statistics ----------------------------------------------------------------------------------
def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `reference`, over the reference's quantile bins."""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    if not len(reference) or not len(current):
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    return _psi_of_counts(ref, cur, eps)


def psi_categorical(reference: Sequence[Any], current: Sequence[Any], eps: float = 1e-4) -> float:
    """PSI over the categories seen in either window."""
    categories = sorted(set(reference) | set(current), key=str)
    index = {c: i for i, c in enumerate(categories)}
    ref = np.bincount([index[c] for c in reference], minlength=len(categories))
    cur = np.bincount([index[c] for c in current], minlength=len(categories))
    return _psi_of_counts(ref, cur, eps) if len(reference) and len(current) else float("nan")


def _psi_of_counts(ref: np.ndarray, cur: np.ndarray, eps: float) -> float:
    p = np.maximum(ref / ref.sum(), eps)
    q = np.maximum(cur / cur.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: the distance D and its asymptotic two-sided p-value
    (Kolmogorov's distribution with Stephens' small-sample correction, Numerical Recipes' `kstwo`)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    n, m = len(a), len(b)
    if not n or not m:
        return float("nan"), float("nan")
    values = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, values, "right") / n - np.searchsorted(b, values, "right") / m)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def kolmogorov_sf(z: float) -> float:
    """P(K > z) for Kolmogorov's distribution: 2 * sum_k (-1)^(k-1) exp(-2 k^2 z^2)."""
    if z < 0.27:  # the series converges slowly there; the value is 1 to 1e-6
        return 1.0
    k = np.arange(1, 101)
    return float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * z * z)))))


# -- sources ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A file sink's folder (or one file), or a SQL table (``url`` is a SQLAlchemy URL)."""

    location: str
    table: str | None = None

    def __str__(self) -> str:
        return f"{self.location} (table {self.table})" if self.table else self.location


def _files(location: str) -> tuple[list[str], list[str]]:
    path = Path(location)
    if not path.exists():
        raise NotFound(f"no such file or folder: {location}", code="report_source_not_found")
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = [p for p in found if not p.name.startswith(".")]
    parquet = [str(p) for p in found if p.suffix == ".parquet"]
    jsonl = [str(p) for p in found if p.suffix in (".jsonl", ".json", ".ndjson")]
    if not parquet and not jsonl:
        raise BadRequest(f"{location} holds no .parquet or .jsonl result files", code="report_empty_source")
    return parquet, jsonl


def _columns(con: Any, relation: str) -> set[str]:
    return {r[0] for r in con.sql(f"DESCRIBE {relation}").fetchall()}


def _file_view(con: Any, name: str, location: str) -> None:
    parquet, jsonl = _files(location)
    parts = []
    if parquet:
        parts.append(f"SELECT * FROM read_parquet({parquet!r}, union_by_name = true)")
    if jsonl:
        parts.append(f"SELECT * FROM read_json({jsonl!r}, format = 'newline_delimited', union_by_name = true)")
    con.sql(f"CREATE VIEW raw_{name} AS " + " UNION ALL BY NAME ".join(parts))
    _flat_view(con, name, f"raw_{name}")


def _flat_view(con: Any, name: str, relation: str) -> None:
    """Rows with the worker's flat columns (a file sink's, or job outputs made flat)."""
    columns = _columns(con, relation)

    def col(key: str, kind: str) -> str:
        return f'CAST("{key}" AS {kind})' if key in columns else f"CAST(NULL AS {kind})"

    emb = "sqrt(list_inner_product(embedding::DOUBLE[], embedding::DOUBLE[]))" if "embedding" in columns else "NULL"
    text = col("text", "VARCHAR")
    error = "CAST(error.code AS VARCHAR)" if "error" in columns else "CAST(NULL AS VARCHAR)"
    _normal_view(con, name, relation, col, emb, text, error)


def _sql_view(con: Any, name: str, url: str, table: str) -> None:
    import pyarrow as pa
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url)
    except Exception as exc:  # noqa: BLE001 - any bad URL is the user's to fix, in one line
        raise BadRequest(f"cannot open {url!r}: {exc}", code="report_bad_url") from None
    database = engine.url.database
    if (
        engine.url.get_backend_name() == "sqlite"
        and database
        and database != ":memory:"
        and not Path(database).exists()
    ):
        raise NotFound(f"no such SQLite file: {database}", code="report_source_not_found")  # not create an empty one
    try:
        tables = sa.inspect(engine).get_table_names()
        if table not in tables:
            raise NotFound(f"no table {table!r} in {engine.url.render_as_string(hide_password=True)} "
                           f"(tables: {', '.join(tables) or 'none'})", code="report_table_not_found")  # fmt: skip
        with engine.connect() as conn:
            result = conn.execute(sa.text(f'SELECT * FROM "{table}"'))
            keys, rows = list(result.keys()), result.fetchall()
    except sa.exc.SQLAlchemyError as exc:
        raise BadRequest(f"cannot read {table!r}: {str(exc).splitlines()[0]}", code="report_bad_table") from None
    finally:
        engine.dispose()
    if not rows:
        raise BadRequest(f"table {table!r} has no rows", code="report_empty_source")
    if {"status", "request", "result"} <= set(keys):  # the catalog's jobs table
        flat = _job_rows(keys, rows)
        names = dict.fromkeys(k for r in flat for k in r)  # every row's keys (from_pylist takes the first's)
        con.register(f"arrow_{name}", pa.table({k: [r.get(k) for r in flat] for k in names}))
        _flat_view(con, name, f"arrow_{name}")
        return
    data = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    for key in ("output", "result", "error", "request"):  # JSON columns: text for DuckDB's json functions
        if key in data:
            data[key] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in data[key]]
    con.register(f"arrow_{name}", pa.table(data))
    if "output" not in data:
        raise BadRequest(f"table {table!r} is not a SQL sink's table (no 'output' column)", code="report_bad_table")
    columns = set(keys)

    def col(key: str, kind: str) -> str:
        if key in columns:
            return f'CAST("{key}" AS {kind})'
        return f"CAST(json_extract_string(output, '$.{key}') AS {kind})"

    emb = "sqrt(list_inner_product(e, e))"
    con.sql(f"CREATE VIEW raw_{name} AS SELECT *, CAST(json_extract(output, '$.embedding') AS DOUBLE[]) AS e "
            f"FROM arrow_{name}")  # fmt: skip
    text = col("text", "VARCHAR")
    error = "CAST(json_extract_string(output, '$.error.code') AS VARCHAR)"
    _normal_view(con, name, f"raw_{name}", col, emb, text, error)


def _job_rows(keys: list[str], rows: Sequence[Any]) -> list[dict]:
    """Job rows as flat rows: one per output (the job's timings on its first output only, so each
    job counts once in latency), or one with the error of a failed job. Unfinished jobs are left out."""
    out: list[dict] = []
    for values in rows:
        job = dict(zip(keys, values))
        if job["status"] not in ("succeeded", "failed"):
            continue
        result, error = _json(job["result"]) or {}, _json(job["error"])
        created, started, finished = (_epoch(job.get(k)) for k in ("created_at", "started_at", "finished_at"))
        timing = {
            "latency_ms": (finished - started) * 1000 if finished and started else None,
            "published_at": created,
            "received_at": started,
            "completed_at": finished,
            "attempts": job.get("attempts"),
        }
        base = {"model": result.get("model", job["model"]), "version": result.get("version"),
                "task": result.get("task")}  # fmt: skip
        outputs = result.get("outputs") or [{}]
        for i, output in enumerate(outputs):
            row = {"id": job["id"] if i == 0 else f"{job['id']}/{i}", **base, **output}
            row.update(timing if i == 0 else {"completed_at": finished})
            if "scores" in row:
                row["scores"] = json.dumps(row["scores"])
            if error:
                row["error"] = {"code": error.get("code")}
            out.append(row)
    if not out:
        raise BadRequest("the jobs table has no finished jobs", code="report_empty_source")
    return out


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _normal_view(con: Any, name: str, raw: str, col: Callable[[str, str], str], emb: str, text: str,
                 error: str) -> None:  # fmt: skip
    """One shape for every source: the columns the report reads, NULL where a task has none."""
    con.sql(f"""
        CREATE TABLE {name} AS SELECT
            CAST(id AS VARCHAR) AS id, {col("model", "VARCHAR")} AS model, {col("version", "INTEGER")} AS version,
            {col("task", "VARCHAR")} AS task, {col("completed_at", "DOUBLE")} AS ts,
            {col("latency_ms", "DOUBLE")} AS latency_ms,
            ({col("received_at", "DOUBLE")} - {col("published_at", "DOUBLE")}) * 1000 AS queue_ms,
            {col("ttft_ms", "DOUBLE")} AS ttft_ms, {col("attempts", "INTEGER")} AS attempts,
            {col("input_sha256", "VARCHAR")} AS input_sha256,
            {col("tokens", "BIGINT")} AS tokens, {col("prompt_tokens", "BIGINT")} AS prompt_tokens,
            {col("completion_tokens", "BIGINT")} AS completion_tokens,
            {col("finish_reason", "VARCHAR")} AS finish_reason, {col("filtered", "BOOLEAN")} AS filtered,
            {col("label", "VARCHAR")} AS label, {col("score", "DOUBLE")} AS score, {emb} AS emb_norm,
            length({text}) AS out_chars, coalesce(md5({text}), {col("label", "VARCHAR")}) AS out_key,
            {error} AS error_code
        FROM {raw}
    """)
    if not con.sql(f"SELECT count(*) FROM {name}").fetchall()[0][0]:
        raise BadRequest("the source has no result rows", code="report_empty_source")


def _dead_letter_view(con: Any, location: str) -> None:
    parquet, jsonl = _files(location)
    reader = (f"read_parquet({parquet!r}, union_by_name = true)" if parquet
              else f"read_json({jsonl!r}, format = 'newline_delimited', union_by_name = true)")  # fmt: skip
    con.sql(f"CREATE TABLE dead AS SELECT split_part(CAST(reason AS VARCHAR), ':', 1) AS code, "
            f"CAST(reason AS VARCHAR) AS reason FROM {reader}")  # fmt: skip


# -- windows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Which rows are the reference and which the current window, as SQL conditions on ``ts``."""

    reference: str  # a description
    current: str
    reference_sql: str  # a query for the reference rows
    current_sql: str
    reference_range: tuple[float, float] | None = None  # to shade in the throughput plot


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{text!r} is not a time: use epoch seconds or ISO 8601 (2026-12-01T20:00)",
                         code="report_bad_window") from None  # fmt: skip
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _percent(spec: str, prefix: str) -> float:
    try:
        value = float(spec.removeprefix(prefix).rstrip("%"))
    except ValueError:
        value = -1
    if not 0 < value < 100:
        raise BadRequest(f"{spec!r}: use {prefix}N% with 0 < N < 100", code="report_bad_window")
    return value / 100


def windows(con: Any, reference: str, current: str | None, has_other: bool) -> Window:
    """`reference`: ``first:N%``, ``START..END`` or ``source`` (another source, loaded as ``ref``);
    `current`: None (the rows after the reference), ``last:N%`` or ``START..END``."""
    lo = con.sql("SELECT min(ts) FROM rows").fetchall()[0][0]
    cur_sql, cur_text = None, None
    if current and current.startswith("last:"):
        share = _percent(current, "last:")
        cut = con.sql(f"SELECT quantile_disc(ts, {1 - share}) FROM rows").fetchall()[0][0]
        cur_sql, cur_text = f"SELECT * FROM rows WHERE ts > {cut}", f"last {share:.0%} of rows"
    elif current:
        start, end = _range(current)
        cur_sql, cur_text = f"SELECT * FROM rows WHERE ts BETWEEN {start} AND {end}", f"rows in {current}"
    if has_other:
        return Window(
            "the reference source", cur_text or "all rows", "SELECT * FROM ref", cur_sql or "SELECT * FROM rows"
        )
    if reference.startswith("first:"):
        share = _percent(reference, "first:")
        cut = con.sql(f"SELECT quantile_disc(ts, {share}) FROM rows").fetchall()[0][0]
        ref_sql = f"SELECT * FROM rows WHERE ts <= {cut}"
        return Window(f"first {share:.0%} of rows", cur_text or "the rows after it", ref_sql,
                      cur_sql or f"SELECT * FROM rows WHERE ts > {cut}", (lo, cut))  # fmt: skip
    start, end = _range(reference)
    return Window(f"rows in {reference}", cur_text or "the rows after it", f"SELECT * FROM rows WHERE ts BETWEEN "
                  f"{start} AND {end}", cur_sql or f"SELECT * FROM rows WHERE ts > {end}", (start, end))  # fmt: skip


def _range(spec: str) -> tuple[float, float]:
    start, sep, end = spec.partition("..")
    if not sep:
        raise BadRequest(f"{spec!r}: a window is first:N%, last:N% or START..END", code="report_bad_window")
    return _parse_time(start), _parse_time(end)


def drift(con: Any, window: Window, psi_threshold: float, ks_p_threshold: float, ks_min_d: float) -> dict:
    ref = con.sql(window.reference_sql).fetchnumpy()
    cur = con.sql(window.current_sql).fetchnumpy()
    features = []
    for name in NUMERIC_FEATURES:
        a, b = _values(ref[name]), _values(cur[name])
        if len(a) < MIN_DRIFT_ROWS or len(b) < MIN_DRIFT_ROWS:
            continue
        d, p = ks_2samp(a, b)
        features.append(_flag({"name": name, "kind": "numeric", "psi": psi(a, b), "ks_d": d, "ks_p": p,
                               "reference_mean": float(a.mean()), "current_mean": float(b.mean()),
                               "reference_rows": len(a), "current_rows": len(b)},
                              psi_threshold, ks_p_threshold, ks_min_d))  # fmt: skip
    for name in CATEGORICAL_FEATURES:
        ra, rb = _labels(ref[name]), _labels(cur[name])
        if len(ra) < MIN_DRIFT_ROWS or len(rb) < MIN_DRIFT_ROWS:
            continue
        features.append(_flag({"name": name, "kind": "categorical", "psi": psi_categorical(ra, rb),
                               "ks_d": None, "ks_p": None, "reference_rows": len(ra), "current_rows": len(rb)},
                              psi_threshold, ks_p_threshold, ks_min_d))  # fmt: skip
    return {
        "reference": window.reference,
        "current": window.current,
        "reference_rows": len(ref["id"]),
        "current_rows": len(cur["id"]),
        "thresholds": {"psi": psi_threshold, "ks_p": ks_p_threshold, "ks_min_d": ks_min_d},
        "features": features,
        "flagged": [f["name"] for f in features if f["flagged"]],
    }


def _labels(column: Any) -> list[str]:
    present: list[Any] = list(np.ma.compressed(np.ma.asarray(column, dtype=object)))
    return [str(v) for v in present if v is not None]


def _values(column: Any) -> np.ndarray:
    values: np.ndarray = np.ma.filled(np.ma.asarray(column, dtype=float), np.nan)
    return values[~np.isnan(values)]


def _flag(feature: dict, psi_threshold: float, ks_p_threshold: float, ks_min_d: float) -> dict:
    reasons = []
    if feature["psi"] > psi_threshold:
        reasons.append(f"PSI {feature['psi']:.3f} > {psi_threshold}")
    if feature["ks_p"] is not None and feature["ks_p"] < ks_p_threshold and feature["ks_d"] >= ks_min_d:
        reasons.append(f"KS p {feature['ks_p']:.2g} < {ks_p_threshold} (D {feature['ks_d']:.3f})")
    return feature | {"flagged": bool(reasons), "reasons": reasons}


# -- the report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportOptions:
    reference: str = "first:50%"  # first:N%, START..END; or see `reference_source`
    current: str | None = None  # last:N%, START..END; None: the rows after the reference
    reference_source: Source | None = None
    dead_letters: str | None = None
    psi_threshold: float = PSI_THRESHOLD
    ks_p_threshold: float = KS_P_THRESHOLD
    ks_min_d: float = KS_MIN_D
    bins: int = 30
    top: int = 10


@dataclass
class Report:
    data: dict[str, Any] = field(default_factory=dict)

    def json(self) -> str:
        return json.dumps(_finite(self.data), indent=2, default=_jsonable, allow_nan=False)

    def html(self) -> str:
        return render_html(json.loads(self.json()))


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: null, as a reader of the JSON expects for "no value"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _load(con: Any, name: str, source: Source) -> None:
    if source.table:
        _sql_view(con, name, source.location, source.table)
    elif "://" in source.location and not source.location.startswith("file://"):
        raise BadRequest(f"{source.location!r}: a SQL URL needs --table NAME", code="report_bad_source")
    else:
        _file_view(con, name, source.location.removeprefix("file://"))


def build(source: Source, options: ReportOptions = ReportOptions(), step: Step = lambda _: None) -> Report:
    """Read `source` and compute every number of the report."""
    duckdb = _duckdb()
    started = time.perf_counter()
    con = duckdb.connect()
    con.sql(f"SET threads = {max(1, min(8, os.cpu_count() or 1))}")
    step("reading rows")
    try:
        _load(con, "rows", source)
        if options.reference_source is not None:
            _load(con, "ref", options.reference_source)
        if options.dead_letters:
            _dead_letter_view(con, options.dead_letters)
    except duckdb.Error as exc:  # a corrupt file, a column of the wrong type: the user's to see, in one line
        message = str(exc).strip().splitlines()[0]
        raise BadRequest(f"cannot read the rows: {message}", code="report_unreadable") from None
    step("summarising")
    data: dict[str, Any] = {"source": str(source), "generated_at": time.time(), "summary": _summary(con)}
    data["throughput"] = _throughput(con, data["summary"])
    step("distributions")
    arrays = con.sql("SELECT " + ", ".join(NUMERIC_FEATURES) + " FROM rows").fetchnumpy()
    data["distributions"] = {n: h for n in NUMERIC_FEATURES if (h := _histogram(arrays[n], options.bins))}
    data["categories"] = _categories(con, options.dead_letters is not None)
    hashed = con.sql("SELECT count(input_sha256) FROM rows").fetchall()[0][0] > 0
    short = f"left(input_sha256, {SHORT_HASH})"
    slowest = (f"SELECT id, {short + ' AS input, ' if hashed else ''}model, version, latency_ms, attempts, ts "
               f"FROM rows WHERE latency_ms IS NOT NULL")  # fmt: skip
    data["slowest"] = _rows_of(con, f"{slowest} ORDER BY latency_ms DESC LIMIT {options.top}")
    data["frequent_inputs"] = _rows_of(con, f"SELECT {short} AS input, count(*) AS rows, avg(latency_ms) AS "
                                            f"mean_latency_ms, max(latency_ms) AS max_latency_ms FROM rows WHERE "
                                            f"input_sha256 IS NOT NULL GROUP BY input_sha256 HAVING count(*) > 1 "
                                            f"ORDER BY 2 DESC, 1 LIMIT {options.top}") if hashed else None  # fmt: skip
    data["frequent_outputs"] = _rows_of(con, f"SELECT out_key AS output, count(*) AS rows, avg(latency_ms) AS "
                                             f"mean_latency_ms FROM rows WHERE out_key IS NOT NULL GROUP BY 1 "
                                             f"HAVING count(*) > 1 ORDER BY 2 DESC, 1 LIMIT {options.top}")  # fmt: skip
    data["duplicate_ids"] = _rows_of(con, f"SELECT id, count(*) AS rows FROM rows GROUP BY id HAVING count(*) > 1 "
                                          f"ORDER BY 2 DESC, 1 LIMIT {options.top}")  # fmt: skip
    step("drift")
    window = windows(con, options.reference, options.current, options.reference_source is not None)
    data["drift"] = drift(con, window, options.psi_threshold, options.ks_p_threshold, options.ks_min_d)
    data["drift"]["reference_range"] = window.reference_range
    data["notes"] = _notes(data)
    data["seconds"] = round(time.perf_counter() - started, 3)
    con.close()
    return Report(data)


def _rows_of(con: Any, query: str) -> list[dict]:
    rel = con.sql(query)
    return [dict(zip(rel.columns, r)) for r in rel.fetchall()]


def _summary(con: Any) -> dict:
    summary = _rows_of(con, """
        SELECT count(*) AS rows, count(DISTINCT id) AS distinct_ids, min(ts) AS first_at, max(ts) AS last_at,
            quantile_cont(latency_ms, 0.5) AS latency_p50_ms, quantile_cont(latency_ms, 0.9) AS latency_p90_ms,
            quantile_cont(latency_ms, 0.99) AS latency_p99_ms, max(latency_ms) AS latency_max_ms,
            quantile_cont(queue_ms, 0.5) AS queue_p50_ms, quantile_cont(queue_ms, 0.99) AS queue_p99_ms,
            sum(coalesce(prompt_tokens, tokens)) AS tokens_in, sum(completion_tokens) AS tokens_out,
            count(*) FILTER (WHERE attempts > 1) AS retried_rows, count(*) FILTER (WHERE filtered) AS filtered_rows,
            count(error_code) AS error_rows, string_agg(DISTINCT task, ', ') AS tasks,
            string_agg(DISTINCT model || ':' || version, ', ') AS versions
        FROM rows""")[0]  # fmt: skip
    span = (summary["last_at"] or 0) - (summary["first_at"] or 0)
    summary["span_s"] = span
    summary["rows_per_s"] = summary["rows"] / span if span > 0 else None
    return summary


def _throughput(con: Any, summary: dict) -> dict:
    lo, span = summary["first_at"], summary["span_s"]
    if lo is None:
        return {}
    width = _nice(max(span, 1e-3) / 60)
    rows = con.sql(f"SELECT floor((ts - {lo}) / {width})::BIGINT AS b, count(*) FROM rows WHERE ts IS NOT NULL "
                   f"GROUP BY 1 ORDER BY 1").fetchall()  # fmt: skip
    counts = [0] * (int(rows[-1][0]) + 1 if rows else 0)
    for b, n in rows:
        counts[int(b)] = n
    return {"start": lo, "bucket_s": width, "rows_per_s": [n / width for n in counts],
            "peak_rows_per_s": max(counts, default=0) / width}  # fmt: skip


def _nice(x: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at least `x`."""
    power = 10 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= x)


def _histogram(column: Any, bins: int) -> dict | None:
    values = _values(column)
    if not len(values):
        return None
    lo, hi = float(values.min()), float(np.quantile(values, 0.995))
    hi = hi if hi > lo else lo + 1
    if np.all(values == np.round(values)) and hi - lo < 2 * bins:  # counts (tokens, attempts): a bar per value
        lo, hi = math.floor(lo) - 0.5, math.ceil(hi) + 0.5
        bins = int(hi - lo)
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "rows": len(values),
            "mean": float(values.mean()), "p50": float(np.quantile(values, 0.5)),
            "p99": float(np.quantile(values, 0.99)), "max": float(values.max()), "clipped_at": hi}  # fmt: skip


def _categories(con: Any, has_dead: bool) -> dict:
    out = {}
    queries = {
        "label": "SELECT label, count(*) FROM rows WHERE label IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 30",
        "finish_reason": "SELECT finish_reason, count(*) FROM rows WHERE finish_reason IS NOT NULL "
        "GROUP BY 1 ORDER BY 2 DESC",
        "version": "SELECT model || ':' || version, count(*) FROM rows GROUP BY 1 ORDER BY 2 DESC LIMIT 30",
        "attempts": "SELECT attempts::VARCHAR, count(*) FROM rows WHERE attempts IS NOT NULL GROUP BY attempts "
        "ORDER BY attempts",
        "error": "SELECT error_code, count(*) FROM rows WHERE error_code IS NOT NULL GROUP BY 1 ORDER BY 2 DESC",
    }
    if has_dead:
        queries["dead_letter"] = "SELECT code, count(*) FROM dead GROUP BY 1 ORDER BY 2 DESC LIMIT 30"
    for name, query in queries.items():
        if pairs := con.sql(query).fetchall():
            out[name] = {str(k): n for k, n in pairs}
    return out


def _notes(data: dict) -> list[str]:
    notes = []
    if "ttft_ms" not in data["distributions"]:
        notes.append("No time to first token: the rows record none (only generation rows of a stream worker do; "
                     "latency_ms is receive to write).")  # fmt: skip
    if data["frequent_inputs"] is None:
        notes.append("Rows keep no input text and these have no input_sha256 (written by an older moorage, or "
                     "jobs): the slowest inputs are named by message id, the most frequent outputs by an md5 of "
                     "the text (or the label).")  # fmt: skip
    else:
        notes.append(f"Rows keep no input text: inputs are named by the first {SHORT_HASH} hex digits of their "
                     "sha256 (input_sha256); rows without one (an older moorage's) are left out of the most "
                     "frequent inputs.")  # fmt: skip
    if "dead_letter" not in data["categories"]:
        notes.append("Dead letters live on the broker, not in the sink: pass --dead-letters with an export of "
                     "`moorage stream dead-letters --source URL --json` to include them.")  # fmt: skip
    return notes


# -- HTML ------------------------------------------------------------------------------------------
W, H, PAD = 640, 220, 44
LABELS = {
    "latency_ms": "Latency (ms, receive to durable write)",
    "queue_ms": "Queue wait (ms, publish to receive)",
    "ttft_ms": "Time to first token (ms)",
    "tokens": "Tokens per row",
    "prompt_tokens": "Tokens in (prompt)",
    "completion_tokens": "Tokens out (completion)",
    "out_chars": "Output length (characters)",
    "score": "Top label score",
    "emb_norm": "Embedding L2 norm",
    "label": "Labels",
    "finish_reason": "Finish reasons",
    "version": "Rows by model version",
    "attempts": "Deliveries per row (attempts)",
    "error": "Error codes in rows",
    "dead_letter": "Dead-letter reasons",
}
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1360px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:16px}figure.plot{margin:0;border:1px solid #e4e4e4;padding:8px}
figcaption{font-weight:600;margin-bottom:4px}svg text{font-size:11px;fill:#555}
rect.bar{fill:#4a7bb7}rect.bar.flagged{fill:#c8402f}rect.window{fill:#f2c14e;opacity:.35}
line.threshold{stroke:#c8402f;stroke-dasharray:4 3}line.axis{stroke:#999}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.flagged td{background:#fbe3df}
.badge{background:#c8402f;color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}
.ok{color:#2b7a3d}.notes{color:#666}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _figure(name: str, title: str, svg: str, bars: int, extra: str = "") -> str:
    return (f'<figure class="plot" data-plot="{name}" data-bars="{bars}"><figcaption>{html.escape(title)}'
            f'</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f"{svg}</svg>{extra}</figure>")  # fmt: skip


def _columns_svg(values: Sequence[float], ticks: Sequence[tuple[float, str]], shade: tuple[float, float] | None = None,
                 ) -> str:  # fmt: skip
    """Vertical bars over [0, 1] of the plot's width; `ticks` at fractions of it; `shade` a range of it."""
    top = max(values, default=0) or 1
    inner_w, inner_h = W - 2 * PAD, H - 2 * PAD + 10
    step = inner_w / max(1, len(values))
    parts = [f'<line class="axis" x1="{PAD}" y1="{PAD + inner_h}" x2="{W - PAD}" y2="{PAD + inner_h}"/>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{_fmt(float(top))}</text>',
             f'<text x="{PAD - 4}" y="{PAD + inner_h}" text-anchor="end">0</text>']  # fmt: skip
    for i, v in enumerate(values):
        h = inner_h * v / top
        x, y, w = PAD + i * step + 0.5, PAD + inner_h - h, max(1.0, step - 1)
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
                     f"<title>{_fmt(float(v))}</title></rect>")  # fmt: skip
    if shade:  # over the bars, translucent
        x0, x1 = PAD + shade[0] * inner_w, PAD + shade[1] * inner_w
        parts.append(f'<rect class="window" x="{x0:.1f}" y="{PAD}" width="{max(1.0, x1 - x0):.1f}" height="{inner_h}">'
                     "<title>reference window</title></rect>")  # fmt: skip
    for frac, text in ticks:
        parts.append(
            f'<text x="{PAD + frac * inner_w:.1f}" y="{H - 8}" text-anchor="middle">{html.escape(text)}</text>'
        )
    return "".join(parts)


def _hbars_svg(items: Sequence[tuple[str, float, bool]], threshold: float | None = None) -> tuple[str, int]:
    items = items[:12]
    top = max([v for _, v, _ in items] + [threshold or 0]) or 1
    left, inner_w = 170, W - 170 - 70
    row_h = min(28.0, (H - 20) / max(1, len(items)))
    parts = []
    for i, (label, v, flagged) in enumerate(items):
        y, w = 10 + i * row_h, inner_w * v / top
        cls = "bar flagged" if flagged else "bar"
        parts.append(f'<text x="{left - 6}" y="{y + row_h * 0.65:.1f}" text-anchor="end">'
                     f"{html.escape(label[:28])}</text>"
                     f'<rect class="{cls}" x="{left}" y="{y + 2:.1f}" width="{max(1.0, w):.1f}" '
                     f'height="{max(2.0, row_h - 4):.1f}"><title>{_fmt(v)}</title></rect>'
                     f'<text x="{left + max(1.0, w) + 4:.1f}" y="{y + row_h * 0.65:.1f}">{_fmt(v)}</text>')  # fmt: skip
    if threshold is not None:
        x = left + inner_w * threshold / top
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{H - 4}"/>')
    return "".join(parts), len(items)


def _histogram_figure(name: str, hist: dict) -> str:
    edges = hist["edges"]
    ticks = [(0.0, _fmt(edges[0])), (0.5, _fmt(edges[len(edges) // 2])), (1.0, _fmt(edges[-1]))]
    caption = (f'<div class="notes">{hist["rows"]:,} rows · mean {_fmt(hist["mean"])} · p50 {_fmt(hist["p50"])} · '
               f'p99 {_fmt(hist["p99"])} · max {_fmt(hist["max"])}</div>')  # fmt: skip
    svg = _columns_svg(hist["counts"], ticks)
    return _figure(name, LABELS.get(name, name), svg, len(hist["counts"]), caption)


def _throughput_figure(data: dict) -> str:
    tp = data["throughput"]
    values = tp.get("rows_per_s") or []
    if not values:
        return ""
    span = tp["bucket_s"] * len(values)
    start = tp["start"]
    ticks = [(f, datetime.fromtimestamp(start + f * span, UTC).strftime("%H:%M:%S")) for f in (0.0, 0.5, 1.0)]
    shade = None
    if rng := data["drift"].get("reference_range"):
        shade = (max(0.0, (rng[0] - start) / span), min(1.0, (rng[1] - start) / span))
    title = f"Throughput (rows/s per {_fmt(tp['bucket_s'])} s; shaded: the reference window)"
    return _figure("throughput", title, _columns_svg(values, ticks, shade), len(values))


def _drift_section(d: dict) -> str:
    items = [(f["name"], f["psi"], f["flagged"]) for f in d["features"]]
    parts = [f"<p>Reference: {html.escape(d['reference'])} ({d['reference_rows']:,} rows). Current: "
             f"{html.escape(d['current'])} ({d['current_rows']:,} rows). Flagged when PSI &gt; "
             f"{d['thresholds']['psi']}, or KS p &lt; {d['thresholds']['ks_p']} with D &ge; "
             f"{d['thresholds']['ks_min_d']}.</p>"]  # fmt: skip
    if d["flagged"]:
        parts.append(
            f'<p class="drift-flags"><span class="badge">drift</span> {html.escape(", ".join(d["flagged"]))}</p>'
        )
    else:
        parts.append('<p class="drift-none ok">No drift past the thresholds.</p>')
    if items:
        svg, n = _hbars_svg(items, d["thresholds"]["psi"])
        parts.append(_figure("drift", "PSI per feature (dashed: the threshold)", svg, n))
    parts.append("<table><tr><th>feature</th><th>PSI</th><th>KS D</th><th>KS p</th><th>reference mean</th>"
                 "<th>current mean</th><th>flag</th></tr>")  # fmt: skip
    for f in d["features"]:
        flag = f'<span class="badge">{html.escape("; ".join(f["reasons"]))}</span>' if f["flagged"] else ""
        parts.append(f'<tr class="{"drift-row flagged" if f["flagged"] else "drift-row"}" data-feature="{f["name"]}">'
                     f'<td>{f["name"]}</td><td class="n">{_fmt(f["psi"])}</td><td class="n">{_fmt(f["ks_d"])}</td>'
                     f'<td class="n">{_fmt(f["ks_p"])}</td><td class="n">{_fmt(f.get("reference_mean"))}</td>'
                     f'<td class="n">{_fmt(f.get("current_mean"))}</td><td>{flag}</td></tr>')  # fmt: skip
    return "".join(parts) + "</table>"


def _when(ts: float | None) -> str:
    return "–" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _table(rows: list[dict], css: str) -> str:
    if not rows:
        return '<p class="notes">None.</p>'
    rows = [{k: _when(v) if k == "ts" else v for k, v in r.items()} for r in rows]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f'<td class="{"n" if isinstance(v, int | float) else ""}">{html.escape(_fmt(v))}'
                                    "</td>" for v in r.values()) + "</tr>" for r in rows)  # fmt: skip
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def render_html(data: dict) -> str:
    s = data["summary"]
    summary_rows = [("rows", s["rows"]), ("distinct ids", s["distinct_ids"]), ("tasks", s["tasks"]),
                    ("model versions", s["versions"]), ("span (s)", s["span_s"]), ("mean rows/s", s["rows_per_s"]),
                    ("latency p50 / p90 / p99 / max (ms)", " / ".join(_fmt(s[f"latency_{k}_ms"])
                                                                       for k in ("p50", "p90", "p99", "max"))),
                    ("queue wait p50 / p99 (ms)", f"{_fmt(s['queue_p50_ms'])} / {_fmt(s['queue_p99_ms'])}"),
                    ("tokens in / out", f"{_fmt(s['tokens_in'])} / {_fmt(s['tokens_out'])}"),
                    ("rows delivered more than once", s["retried_rows"]), ("filtered rows", s["filtered_rows"]),
                    ("error rows", s["error_rows"])]  # fmt: skip
    if "dead_letter" in data["categories"]:
        summary_rows.append(("dead letters", sum(data["categories"]["dead_letter"].values())))
    summary = "".join(f'<tr><th>{k}</th><td class="n">{html.escape(_fmt(v))}</td></tr>' for k, v in summary_rows)
    plots = [_throughput_figure(data)]
    plots += [_histogram_figure(n, h) for n, h in data["distributions"].items()]
    for name, counts in data["categories"].items():
        svg, n = _hbars_svg([(k, float(v), False) for k, v in counts.items()])
        plots.append(_figure(name, LABELS.get(name, name), svg, n))
    frequent_inputs = ""
    if data["frequent_inputs"] is not None:
        frequent_inputs = f"<h2>Most frequent inputs</h2>{_table(data['frequent_inputs'], 'frequent-inputs')}"
    stamp = datetime.fromtimestamp(data["generated_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moorage report: {html.escape(data["source"])}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<style>{CSS}</style></head><body>
<h1>moorage report</h1><p>{html.escape(data["source"])} · generated {stamp} in {data["seconds"]} s</p>
<h2>Summary</h2><table class="summary">{summary}</table>
<h2>Drift</h2>{_drift_section(data["drift"])}
<h2>Plots</h2><div class="grid">{"".join(plots)}</div>
<h2>Slowest rows</h2>{_table(data["slowest"], "slowest")}
{frequent_inputs}<h2>Most frequent outputs</h2>{_table(data["frequent_outputs"], "frequent")}
<h2>Ids written more than once</h2>{_table(data["duplicate_ids"], "duplicates")}
<h2>Notes</h2><ul class="notes">{notes}</ul>
</body></html>
"""
