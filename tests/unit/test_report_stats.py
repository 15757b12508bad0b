"""The report's statistics: PSI by hand, KS against a brute-force distance and published values of
Kolmogorov's distribution (and scipy, where it is installed), and the flag rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moorage.errors import BadRequest
from moorage.observability import report as rpt


def brute_ks_distance(a, b) -> float:
    """sup |F_a(x) - F_b(x)| over every sample point, the definition written out."""
    points = sorted(set(a) | set(b))
    return max(abs(sum(v <= x for v in a) / len(a) - sum(v <= x for v in b) / len(b)) for x in points)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_distance_is_the_definition(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 20, 40).tolist(), rng.integers(3, 25, 55).tolist()  # ties included
    d, _ = rpt.ks_2samp(np.array(a), np.array(b))
    assert d == pytest.approx(brute_ks_distance(a, b))


@pytest.mark.parametrize(
    ("z", "p"),
    # P(K > z): the tabulated critical values of Kolmogorov's distribution
    [(1.0, 0.26999967), (1.22385, 0.10), (1.35810, 0.05), (1.62762, 0.01), (1.94947, 0.001)],
)
def test_kolmogorov_survival_matches_the_published_values(z, p):
    assert rpt.kolmogorov_sf(z) == pytest.approx(p, rel=2e-4)


def test_kolmogorov_survival_at_the_ends():
    assert rpt.kolmogorov_sf(0.0) == 1.0 and rpt.kolmogorov_sf(0.3) == pytest.approx(1.0, abs=1e-5)
    assert rpt.kolmogorov_sf(5.0) < 1e-20


def test_ks_sees_a_shift_and_not_the_same_distribution():
    rng = np.random.default_rng(3)
    same_d, same_p = rpt.ks_2samp(rng.normal(0, 1, 5000), rng.normal(0, 1, 5000))
    shift_d, shift_p = rpt.ks_2samp(rng.normal(0, 1, 5000), rng.normal(0.5, 1, 5000))
    assert same_d < 0.05 and same_p > 0.01
    # D of N(0,1) vs N(0.5,1) is 2*Phi(0.25) - 1 = 0.1974
    assert shift_d == pytest.approx(0.1974, abs=0.03) and shift_p < 1e-30
    assert rpt.ks_2samp(np.arange(10.0), np.arange(10.0)) == (0.0, 1.0)


def test_ks_p_value_agrees_with_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    for n, m, shift in [(200, 300, 0.0), (500, 400, 0.2), (2000, 3000, 0.05), (80, 120, 0.4)]:
        a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        d, p = rpt.ks_2samp(a, b)
        ref = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=0.1, abs=5e-3)


def test_psi_by_hand():
    reference, current = ["a"] * 50 + ["b"] * 50, ["a"] * 90 + ["b"] * 10
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert rpt.psi_categorical(reference, current) == pytest.approx(expected)
    assert rpt.psi_categorical(reference, reference) == 0.0
    # a category only one window has counts with a floor (eps), not an infinite PSI
    assert math.isfinite(rpt.psi_categorical(["a"] * 10, ["a"] * 5 + ["c"] * 5))


def test_psi_numeric_uses_reference_deciles():
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 1, 20000)
    assert rpt.psi(ref, rng.normal(0, 1, 20000)) < 0.01
    assert rpt.psi(ref, rng.normal(1, 1, 20000)) > 0.2  # a one-sigma shift is a large PSI
    # current all in the reference's top decile: 0.9 of the mass moved there from the other nine
    expected = 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + (1 - 0.1) * math.log(1 / 0.1)
    assert rpt.psi(np.arange(1000.0), np.full(500, 995.0)) == pytest.approx(expected, rel=1e-3)


def test_a_feature_needs_a_small_p_and_a_real_distance_to_be_flagged():
    base = {"name": "x", "psi": 0.01, "ks_p": 1e-6}
    assert not rpt._flag(base | {"ks_d": 0.02}, 0.2, 0.01, 0.1)["flagged"]  # significant, but tiny
    flagged = rpt._flag(base | {"ks_d": 0.3}, 0.2, 0.01, 0.1)
    assert flagged["flagged"] and flagged["reasons"][0].startswith("KS p")
    assert rpt._flag({"name": "y", "psi": 0.5, "ks_p": None, "ks_d": None}, 0.2, 0.01, 0.1)["reasons"] == [
        "PSI 0.500 > 0.2"
    ]


@pytest.mark.parametrize("spec", ["first:0%", "first:100%", "first:abc", "12..", "yesterday..today", "sometime"])
def test_bad_windows_say_how_to_write_one(spec):
    with pytest.raises(BadRequest):
        if spec.startswith("first:"):
            rpt._percent(spec, "first:")
        else:
            rpt._range(spec)


def test_without_duckdb_the_message_names_the_extra(monkeypatch):
    import sys

    from moorage.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'moorage\[report\]'"):
        rpt.build(rpt.Source("anywhere"))
