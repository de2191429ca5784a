"""Bootstrapping sparsity (select_skew_pairs): the rule on synthetic scores with a known answer,
the bootstrap itself, determinism, skipped and duplicate configurations, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusionops
from fusionops import SkewPairSelection, select_skew_pairs


def outcomes(rate: float, n: int = 400, seed: int = 0) -> np.ndarray:
    """0/1 correctness with exactly ``round(rate * n)`` ones, in a seeded random order."""
    hits = np.zeros(n)
    hits[: round(rate * n)] = 1.0
    return np.random.default_rng(seed).permutation(hits)


def rate_table(rates: dict[tuple[int, int], float], default: float, n: int = 400):
    """A score(pairs) whose accuracy depends on (first pair's skew, number of pairs)."""
    calls: list[torch.Tensor] = []

    def score(pairs: torch.Tensor) -> np.ndarray:
        calls.append(pairs)
        skew = int(pairs[0, 0] - pairs[0, 1])
        rate = rates.get((skew, pairs.shape[0]), default)
        return outcomes(rate, n, seed=len(calls))

    return score, calls


SKEWS = [0, 3, -3]
DENSITIES = [1 / 12, 3 / 12, 5 / 12]


def test_sparser_tied_configuration_is_chosen_and_clearly_worse_is_not():
    # 1 pair: clearly worse everywhere; (3, 3 pairs) ties with the best (0, 5 pairs).
    score, calls = rate_table({(0, 5): 0.90, (3, 3): 0.89, (0, 1): 0.60, (3, 1): 0.60, (-3, 1): 0.60}, 0.70)
    sel = select_skew_pairs(score, 12, 12, SKEWS, DENSITIES, n_boot=500, seed=0)
    assert isinstance(sel, SkewPairSelection)
    assert (sel.skew, sel.density) == (3, 3 / 12)
    assert sel.pairs.tolist() == [[3, 0], [4, 1], [5, 2]]
    assert torch.equal(sel.pairs, fusionops.skew_pairs(12, 12, 3, 3 / 12))
    assert (sel.best["skew"], sel.best["density"], sel.best["n_pairs"]) == (0, 5 / 12, 5)
    assert sel.best["mean"] == pytest.approx(0.90) and sel.mean == pytest.approx(0.89)
    assert len(calls) == 9 and len(sel.table) == 9 and sel.n_examples == 400
    rows = {(r["skew"], r["n_pairs"]): r for r in sel.table}
    assert rows[(3, 3)]["chosen"] and rows[(3, 3)]["tied"] and not rows[(3, 3)]["best"]
    assert rows[(0, 5)]["best"] and not rows[(0, 5)]["chosen"]
    assert not any(rows[(s, 1)]["tied"] for s in SKEWS)  # sparser, but clearly worse
    assert sum(r["chosen"] for r in sel.table) == 1 and sum(r["best"] for r in sel.table) == 1
    for call, (skew, density) in zip(calls, [(s, d) for s in SKEWS for d in DENSITIES], strict=True):
        assert call.dtype == torch.int64 and torch.equal(call, fusionops.skew_pairs(12, 12, skew, density))
    text = sel.to_markdown()
    assert "| 3 | 0.25 | 3 | 0.8900 |" in text and "chosen" in text and "best" in text


def test_best_is_chosen_when_nothing_sparser_ties():
    score, _ = rate_table({(0, 5): 0.95}, 0.60)
    sel = select_skew_pairs(score, 12, 12, SKEWS, DENSITIES, n_boot=300)
    assert (sel.skew, sel.density) == (0, 5 / 12)
    assert sel.best["chosen"] and [r["tied"] for r in sel.table].count(True) == 1


def test_ties_go_to_the_higher_mean_then_the_smaller_skew():
    # Every configuration statistically tied (tiny differences); three have 1 pair.
    score, _ = rate_table({(0, 1): 0.800, (3, 1): 0.810, (-3, 1): 0.810}, 0.82)
    sel = select_skew_pairs(score, 12, 12, [3, 0, -3], DENSITIES, n_boot=300)
    assert sel.n_examples == 400 and sel.table[0]["n_pairs"] == 1
    assert (sel.skew, sel.density) == (3, 1 / 12)  # higher mean than skew 0; listed before -3
    score, _ = rate_table({}, 0.8)  # all equal: the smallest |skew| among the sparsest
    sel = select_skew_pairs(score, 12, 12, [3, -1, 2], DENSITIES, n_boot=300)
    assert (sel.skew, sel.density) == (-1, 1 / 12)


def test_bootstrap_interval_is_the_seeded_percentile_interval():
    data = outcomes(0.7, n=50, seed=5)
    sel = select_skew_pairs(lambda p: data, 6, 6, [0], [0.5], n_boot=200, seed=7, level=0.9)
    rng = np.random.default_rng(7)
    means = data[rng.integers(0, 50, size=(200, 50))].mean(1)
    low, high = np.percentile(means, [5, 95])
    assert sel.low == pytest.approx(low, abs=1e-12) and sel.high == pytest.approx(high, abs=1e-12)
    assert sel.mean == pytest.approx(0.7) and sel.level == 0.9 and sel.n_boot == 200
    assert "90% low" in sel.to_markdown()


def test_deterministic_under_a_fixed_seed():
    def run(seed):
        score, _ = rate_table({(0, 5): 0.86, (3, 3): 0.84, (0, 1): 0.70}, 0.75, n=120)
        return select_skew_pairs(score, 12, 12, SKEWS, DENSITIES, n_boot=400, seed=seed)

    a, b, c = run(3), run(3), run(4)
    assert a.table == b.table and (a.skew, a.density) == (b.skew, b.density)
    assert [r["low"] for r in a.table] != [r["low"] for r in c.table]  # another seed, other resamples
    assert [r["mean"] for r in a.table] == [r["mean"] for r in c.table]


def test_skipped_and_duplicate_configurations():
    calls = []

    def score(pairs):
        calls.append(pairs.tolist())
        return torch.tensor(outcomes(0.5 + 0.1 * pairs.shape[0], n=60, seed=len(calls)))  # a tensor

    # 4 x 4 layers: skew 9 pairs nothing; density 0.1 rounds to 0 pairs; skew 3 has a single pair
    # (3, 0) at densities 0.5 and 1.0 (the stacks end first): scored once.
    sel = select_skew_pairs(score, 4, 4, [3, 9, 0], [0.1, 0.5, 1.0], n_boot=100)
    rows = {(r["skew"], r["density"]): r for r in sel.table}
    assert rows[(9, 0.5)]["skipped"] and "skew outside -3..3" in rows[(9, 0.5)]["note"]
    assert rows[(0, 0.1)]["skipped"] and "density rounds to 0" in rows[(0, 0.1)]["note"]
    assert rows[(0, 0.1)]["mean"] is None and rows[(0, 0.1)]["n_pairs"] == 0
    assert not rows[(0, 0.1)]["chosen"] and not rows[(0, 0.1)]["tied"]
    assert rows[(3, 1.0)]["note"] == "same pairs as skew=3, density=0.5"
    assert rows[(3, 1.0)]["low"] == rows[(3, 0.5)]["low"] and rows[(3, 1.0)]["n_pairs"] == 1
    assert calls == [[[3, 0]], [[0, 0], [1, 1]], [[0, 0], [1, 1], [2, 2], [3, 3]]]
    assert sum(r["skipped"] for r in sel.table) == 5
    assert "skipped: skew outside" in sel.to_markdown()
    with pytest.raises(ValueError, match=r"no configuration gives pairs for la=4, lb=4 .* -3 to 3"):
        select_skew_pairs(score, 4, 4, [9, -7], [0.5], n_boot=10)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"skews": []}, ValueError, "skews is empty"),
        ({"densities": []}, ValueError, "densities is empty"),
        ({"densities": [0.5, 1.5]}, ValueError, r"every density must be in \(0, 1\], got 1.5"),
        ({"skews": [0.5]}, TypeError, "every skew must be an int, got 0.5"),
        ({"n_boot": 0}, ValueError, "n_boot must be an int >= 1, got 0"),
        ({"level": 1.0}, ValueError, r"level must be in \(0, 1\), got 1.0"),
        ({"la": 0}, ValueError, "la must be a layer count >= 1, got 0"),
        ({"score": "accuracy"}, TypeError, "score must be callable"),
    ],
)
def test_argument_errors(kwargs, exc, pattern):
    args = {"score": lambda p: outcomes(0.5, 20), "la": 6, "lb": 6, "skews": [0], "densities": [0.5]}
    args |= {"n_boot": 10} | kwargs
    with pytest.raises(exc, match=pattern):
        select_skew_pairs(**args)


@pytest.mark.parametrize(
    "bad, exc, pattern",
    [
        (0.8, ValueError, r"for skew=1, density=0.5 returned shape \(\); expected a 1-d .* not a single"),
        (np.ones((4, 5)) * 0.5, ValueError, r"for skew=1, density=0.5 returned shape \(4, 5\)"),
        ([], ValueError, "for skew=1, density=0.5 returned no outcomes"),
        (
            [0.2, float("nan"), 0.7],
            ValueError,
            r"skew=1, density=0.5 returned a non-finite outcome \(nan at index 1\)",
        ),
        (torch.tensor([0.3, float("inf")]), ValueError, r"non-finite outcome \(inf at index 1\)"),
        (["right", "wrong"], TypeError, "skew=1, density=0.5 returned list, not a 1-d sequence"),
        (
            outcomes(0.5, 19),
            ValueError,
            r"skew=1, density=0.5 returned 19 outcomes but for skew=0, density=0.5 it returned 20",
        ),
    ],
)
def test_score_errors_name_the_configuration(bad, exc, pattern):
    def score(pairs):
        return outcomes(0.6, 20) if int(pairs[0, 0] - pairs[0, 1]) == 0 else bad

    with pytest.raises(exc, match=pattern):
        select_skew_pairs(score, 6, 6, [0, 1], [0.5], n_boot=10)
