"""The verdict rule shared by the studies (experiments/stats.py) and the provenance they record
(experiments/provenance.py)."""

from __future__ import annotations

import math

import pytest

from experiments import provenance, stats

# Student t 0.975 quantiles (two-sided 95%), from tables
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 7: 2.3646243, 9: 2.2621572, 30: 2.0422725}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_tables(df):
    assert stats.t_quantile(df) == pytest.approx(T975[df], abs=1e-6)


def test_t_coverage_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 13, 40):
        for t in (0.1, 0.9, 2.0, 5.0):
            assert stats.t_two_sided_coverage(t, df) == pytest.approx(
                1 - 2 * scipy_stats.t.sf(t, df), abs=1e-12
            )
        assert stats.t_quantile(df, 0.9) == pytest.approx(scipy_stats.t.ppf(0.95, df), abs=1e-9)


def test_interval_and_verdicts():
    iv = stats.paired([0.9, 0.8, 0.85], [0.7, 0.7, 0.7])
    assert iv["diffs"] == pytest.approx([0.2, 0.1, 0.15]) and iv["mean"] == pytest.approx(0.15)
    half = T975[2] * 0.05 / math.sqrt(3)
    assert iv["low"] == pytest.approx(0.15 - half) and iv["high"] == pytest.approx(0.15 + half)
    assert iv["verdict"] == "YES"
    assert stats.interval([-0.2, -0.1, -0.15])["verdict"] == "NO"
    assert stats.interval([0.2, -0.1, 0.05])["verdict"] == "INCONCLUSIVE"
    one = stats.interval([0.3])
    assert one["verdict"] == "INCONCLUSIVE" and one["low"] is None and "one seed" in stats.fmt(one)
    assert stats.interval([0.0, 0.0])["verdict"] == "INCONCLUSIVE"  # a zero-width interval at 0
    with pytest.raises(ValueError, match="pair them"):
        stats.paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        stats.interval([float("nan"), 1.0])


def test_combine():
    Y, N, I = stats.YES, stats.NO, stats.INCONCLUSIVE
    assert stats.combine([Y, Y]) == Y
    assert stats.combine([Y, I]) == I
    assert stats.combine([Y, N, I]) == N
    assert stats.combine([]) == I
    assert "YES if the interval lies above 0" in stats.RULE


def test_provenance_records_versions_commit_device():
    env = provenance.environment(("matplotlib",))
    assert env["versions"]["torch"] and env["versions"]["fusionops"] and "matplotlib" in env["versions"]
    assert env["device"]["type"] == "cpu" and env["device"]["cpu_count"] >= 1
    assert "sha" in env["commit"]
    line = provenance.summary_line(env)
    assert "torch" in line and "device cpu" in line


def test_dispatch_count_arithmetic():
    before = {"tensor_fusion": {"cpu": 2}}
    after = {"tensor_fusion": {"cpu": 5, "reference": 1}, "product_fusion": {"cpu": 3}}
    delta = provenance.count_delta(before, after)
    assert delta == {"tensor_fusion": {"cpu": 3, "reference": 1}, "product_fusion": {"cpu": 3}}
    total: dict = {}
    provenance.add_counts(total, delta)
    provenance.add_counts(total, {"tensor_fusion": {"cpu": 1}})
    assert total == {"tensor_fusion": {"cpu": 4, "reference": 1}, "product_fusion": {"cpu": 3}}
    assert provenance.backends_line(total) == "product_fusion: cpu 3; tensor_fusion: cpu 4, reference 1"
    assert provenance.backends_line({}) == "none recorded"
