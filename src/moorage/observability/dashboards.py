"""Grafana dashboards for moorage, generated from this file: overview, models, streams, swaps.

``python -m moorage.observability.dashboards`` writes them to deploy/grafana/*.json; ``--check``
regenerates them in memory and fails when a committed file differs, or when a panel names a metric
that neither `metrics` declares nor a shipped recording rule (deploy/prometheus/rules) records: a
renamed metric then fails here instead of showing "No data" on a dashboard months later.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from . import metrics

REPO = Path(__file__).resolve().parents[3]
GRAFANA_DIR = REPO / "deploy" / "grafana"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
BUILTIN = {"up"}  # series Prometheus writes for every scrape target

SEL = 'model=~"$model", version=~"$version", instance=~"$instance"'
MODEL = 'model=~"$model"'
SRC = 'source=~"$source", instance=~"$instance"'
INST = 'instance=~"$instance"'
WIDTH, HEIGHT = 12, 8  # two panels a row


def query(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}}


def panel(title: str, targets: list[dict[str, Any]], unit: str = "short", kind: str = "timeseries") -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
    }


def text(title: str, content: str) -> dict[str, Any]:
    return {"type": "text", "title": title, "options": {"mode": "markdown", "content": content}}


def quantiles(metric: str, selector: str, by: str = "model, version") -> list[dict[str, Any]]:
    return [
        query(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{{by.replace(', ', '}}:{{')}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def variable(name: str, source: str, label: str, include_all: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": source, "refId": name},
        "definition": source,
        "refresh": 2,  # on time range change: new versions appear after a swap
        "multi": include_all,
        "includeAll": include_all,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]], marks: bool = True
) -> dict[str, Any]:
    """`marks`: a vertical line on every graph where a model swapped versions."""
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"x": (i % 2) * WIDTH, "y": (i // 2) * HEIGHT, "w": WIDTH, "h": HEIGHT}
    datasource = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}
    return {
        "uid": uid,
        "title": title,
        "tags": ["moorage"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": [SWAP_MARKS] if marks else []},
        "panels": panels,
    }


def rated(by: str, metric: str, selector: str) -> str:
    """``sum by (BY) (rate(METRIC{SELECTOR}[$__rate_interval]))``"""
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval]))"


SWAP_MARKS = {
    "name": "Model swaps",
    "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "enable": True,
    "iconColor": "purple",
    "expr": 'sum by (model) (changes(moorage_model_swaps_total{model=~"$model"}[1m])) > 0',
    "titleFormat": "{{model}} swapped version",
    "step": "1m",
}
INSTANCE_VAR = variable(
    "instance", 'label_values(moorage_process_resident_memory_bytes{job=~"moorage.*"}, instance)', "Instance"
)
MODEL_VARS = [
    variable("model", "label_values(moorage_model_load_seconds_count, model)", "Model"),
    variable("version", 'label_values(moorage_model_load_seconds_count{model=~"$model"}, version)', "Version"),
    INSTANCE_VAR,
]
MV = "{{model}}:{{version}}"


def overview() -> dict[str, Any]:
    """Rate, errors, duration, saturation: the four golden signals of every served model."""
    by_model = f"{{{MODEL}}}"
    panels = [
        panel("Requests by status", [query(rated("status", "moorage_requests_total", SEL), "{{status}}")], "reqps"),
        panel(
            "Error ratio (5xx, 5 min) vs the 0.1 % budget",
            [query(f"model:moorage_request_errors:ratio_rate5m{by_model}", "{{model}}")],
            "percentunit",
        ),
        panel(
            "Request latency p95 (5 min)",
            [query(f'model_version:moorage_request_latency_seconds:p95_5m{{{MODEL}, version=~"$version"}}', MV)],
            "s",
        ),
        panel(
            "Requests slower than 2.5 s (latency SLO: 1 %)",
            [query(f"model:moorage_request_slow:ratio_rate5m{by_model}", "{{model}}")],
            "percentunit",
        ),
        panel(
            "In flight and queued",
            [
                query(f"sum by (model) (moorage_in_flight{{{SEL}}})", "in flight {{model}}"),
                query(f"sum by (model) (moorage_queue_depth{{{SEL}}})", "queued {{model}}"),
            ],
        ),
        panel(
            "Refused with 429 (queue full)",
            [query(f"model:moorage_requests_overloaded:ratio_rate5m{by_model}", "{{model}}")],
            "percentunit",
        ),
        panel(
            "Ready (0: loading or an engine died)",
            [query(f"min by (instance) (moorage_ready{{{INST}}})", "{{instance}}")],
            kind="stat",
        ),
        panel(
            "Availability over 1 day (SLO 99.9 %)",
            [query(f"1 - model:moorage_request_errors:ratio_rate1d{by_model}", "{{model}}")],
            "percentunit",
            "stat",
        ),
        panel(
            "Refused before routing (auth, rate limit)",
            [query(rated("code", "moorage_security_rejections_total", INST), "{{code}}")],
            "reqps",
        ),
        panel(
            "Process memory (RSS)",
            [query(f"moorage_process_resident_memory_bytes{{{INST}}}", "{{instance}} {{pid}}")],
            "bytes",
        ),
    ]
    return dashboard("moorage-overview", "moorage / overview", panels, MODEL_VARS)


def models() -> dict[str, Any]:
    """One model and version: latency, TTFT, inter-token latency, tokens, batch size, queue."""
    mean_batch = f"{rated('model, version', 'moorage_batch_size_sum', SEL)} / {rated('model, version', 'moorage_batch_size_count', SEL)}"  # noqa: E501
    panels = [
        panel("Requests by version", [query(rated("model, version", "moorage_requests_total", SEL), MV)], "reqps"),
        panel("Request latency", quantiles("moorage_request_latency_seconds", SEL), "s"),
        panel("Time to first token", quantiles("moorage_time_to_first_token_seconds", SEL), "s"),
        panel("Inter-token latency", quantiles("moorage_inter_token_latency_seconds", SEL), "s"),
        panel(
            "Tokens per second",
            [
                query(rated("model, version", "moorage_generated_tokens_total", SEL), f"generated {MV}"),
                query(rated("model, version", "moorage_prompt_tokens_total", SEL), f"prompt {MV}"),
            ],
        ),
        panel(
            "Batch size (inputs per model call)",
            [*quantiles("moorage_batch_size", SEL)[:2], query(mean_batch, f"mean {MV}")],
        ),
        panel(
            "Queue depth and running sequences",
            [
                query(f"sum by (model, version) (moorage_queue_depth{{{SEL}}})", f"queued {MV}"),
                query(f"sum by (model, version) (moorage_running_sequences{{{SEL}}})", f"running {MV}"),
            ],
        ),
        panel("Queue wait", quantiles("moorage_queue_wait_seconds", SEL), "s"),
        panel("In flight", [query(f"sum by (model, version) (moorage_in_flight{{{SEL}}})", MV)]),
        panel(
            "Refused by content filters",
            [
                query(
                    rated("model, direction", "moorage_content_filtered_total", f"{MODEL}, {INST}"),
                    "{{model}} {{direction}}",
                )
            ],  # noqa: E501
            "reqps",
        ),
    ]
    return dashboard("moorage-models", "moorage / models", panels, MODEL_VARS)


def streams() -> dict[str, Any]:
    """Stream workers: throughput, lag, dead letters, sink latency, health."""
    source_var = variable("source", "label_values(moorage_stream_messages_total, source)", "Source")
    panels = [
        panel(
            "Messages by outcome",
            [query(rated("source, outcome", "moorage_stream_messages_total", SRC), "{{source}} {{outcome}}")],
            "ops",
        ),
        panel(
            "Lag (messages not yet acknowledged)",
            [query(f"max by (source) (moorage_stream_lag{{{SRC}}})", "{{source}}")],
        ),  # noqa: E501
        panel(
            "Dead-lettered share (10 min) vs the 1 % alert",
            [query('source:moorage_stream_dead_letters:ratio_rate10m{source=~"$source"}', "{{source}}")],
            "percentunit",
        ),
        panel("Sink write latency", quantiles("moorage_stream_sink_write_seconds", INST, by="sink"), "s"),
        panel("Publish to durable result", quantiles("moorage_stream_latency_seconds", SRC, by="source"), "s"),
        panel("Messages per received batch", quantiles("moorage_stream_batch_size", SRC, by="source")),
        panel(
            "Healthy (0: a broker or sink keeps failing)",
            [query(f"min by (instance, source) (moorage_stream_healthy{{{SRC}}})", "{{instance}} {{source}}")],
            kind="stat",
        ),
        panel(
            "Retried (delivered again later)",
            [query(rated("source", "moorage_stream_messages_total", f'{SRC}, outcome="retried"'), "{{source}}")],
            "ops",
        ),
    ]
    return dashboard("moorage-streams", "moorage / streams", panels, [source_var, INSTANCE_VAR], marks=False)


def swaps() -> dict[str, Any]:
    """Alias moves as the servers see them: swaps, failed loads, load time, the versions loaded."""
    increase = "sum by ({by}) (increase({metric}{{{sel}}}[$__rate_interval]))"
    panels = [
        panel(
            "Model swaps (an alias moved, the new version serves)",
            [
                query(
                    increase.format(by="model", metric="moorage_model_swaps_total", sel=f"{MODEL}, {INST}"), "{{model}}"
                )
            ],  # noqa: E501
        ),
        panel(
            "Versions that failed to load (the old one keeps serving)",
            [query(increase.format(by="model, version", metric="moorage_model_load_failures_total", sel=SEL), MV)],
        ),
        panel("Model load time", quantiles("moorage_model_load_seconds", SEL), "s"),
        panel("Loads by version", [query(f"sum by (model, version) (moorage_model_load_seconds_count{{{SEL}}})", MV)]),
        panel(
            "Requests by version (who serves after a swap)",
            [query(rated("model, version", "moorage_requests_total", SEL), MV)],
            "reqps",
        ),
        text(
            "Config-center releases",
            "A *release applied* panel comes with the config center's metrics (not exported yet).",
        ),
    ]
    return dashboard("moorage-swaps", "moorage / swaps", panels, MODEL_VARS)


def build() -> dict[str, dict[str, Any]]:
    """Every dashboard, by file name."""
    return {f"{d['uid']}.json": d for d in (overview(), models(), streams(), swaps())}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


# -- checks ------------------------------------------------------------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
_KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names or durations (strings, label matchers, ranges and grouping lists removed first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def declared_metrics() -> set[str]:
    """Every series name the metrics module can expose (counters with _total, histograms' parts)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name, kind = value._name, str(value._type)
            names |= {name + s for s in suffixes.get(kind, ("",))}
    return names


def rule_groups(rules_dir: Path = RULES_DIR) -> list[dict[str, Any]]:
    return [g for f in sorted(rules_dir.glob("*.yml")) for g in (yaml.safe_load(f.read_text()) or {})["groups"]]


def recorded_metrics(rules_dir: Path = RULES_DIR) -> set[str]:
    return {r["record"] for g in rule_groups(rules_dir) for r in g["rules"] if "record" in r}


def expressions(board: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable of a dashboard."""
    for p in board["panels"]:
        for t in p.get("targets", []):
            yield f"{board['uid']}: panel {p['title']!r}", t["expr"]
    for a in board["annotations"]["list"]:
        yield f"{board['uid']}: annotation {a['name']!r}", a["expr"]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            source = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["query"]["query"])
            yield f"{board['uid']}: variable {v['name']}", source.group(1) if source else v["query"]["query"]


def check(boards: dict[str, dict[str, Any]], grafana_dir: Path = GRAFANA_DIR, rules_dir: Path = RULES_DIR) -> list[str]:
    """Problems: committed files that differ from `boards`, and metrics nobody declares or records."""
    problems = []
    for name, board in boards.items():
        path = grafana_dir / name
        if not path.exists() or path.read_text() != render(board):
            problems.append(f"{path} differs from what dashboards.py generates: run python -m {__spec__.name}")
    for extra in sorted({p.name for p in grafana_dir.glob("*.json")} - set(boards)):
        problems.append(f"{grafana_dir / extra} is not generated by dashboards.py: remove it or add it there")
    known = declared_metrics() | recorded_metrics(rules_dir) | BUILTIN
    for board in boards.values():
        for where, expr in expressions(board):
            for name in sorted(metric_names(expr) - known):
                problems.append(f"{where}: {name} is not declared in metrics.py nor recorded by a rule")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed dashboards are stale or wrong")
    parser.add_argument("--out", type=Path, default=GRAFANA_DIR, help="the dashboards' folder (deploy/grafana)")
    parser.add_argument("--rules", type=Path, default=RULES_DIR, help="the recording rules' folder")
    args = parser.parse_args(argv)
    boards = build()
    if args.check:
        problems = check(boards, args.out, args.rules)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(boards)} dashboards: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, board in boards.items():
        (args.out / name).write_text(render(board))
    print(f"wrote {len(boards)} dashboards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
