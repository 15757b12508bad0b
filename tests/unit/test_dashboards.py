"""The dashboard generator: committed dashboards are what it generates, and it reads metric names right."""

from __future__ import annotations

from moorage.observability import dashboards


def test_the_committed_dashboards_are_current_and_name_only_known_metrics():
    assert dashboards.check(dashboards.build()) == []


def test_metric_names_skips_functions_keywords_labels_and_durations():
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{model=~"$model", le!="x"}[5m]))) > 1e3 '
        "and on (model) b_total offset 15m or 0 * sum without (instance) (c) unless d:rec:ratio_rate5m"
    )
    assert dashboards.metric_names(expr) == {"a_bucket", "b_total", "c", "d:rec:ratio_rate5m"}


def test_declared_metrics_spell_counters_and_histograms_as_exposed():
    declared = dashboards.declared_metrics()
    assert {"moorage_requests_total", "moorage_request_latency_seconds_bucket", "moorage_in_flight"} <= declared
    assert "moorage_requests" not in declared
