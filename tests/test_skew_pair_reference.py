"""skew_pairs (DESIGN.md section 4) and the skew-pair attention reference, checked against an
independent per-sample loop and the closed form at window 0."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to

import fusionops
from fusionops import reference


@pytest.mark.parametrize(
    "la, lb, skew, density, expected",
    [
        (12, 12, 7, 5 / 12, [(7, 0), (8, 1), (9, 2), (10, 3), (11, 4)]),  # the paper's example
        (12, 12, 0, 1 / 12, [(0, 0)]),
        (12, 12, -2, 3 / 12, [(0, 2), (1, 3), (2, 4)]),
        (12, 12, 10, 5 / 12, [(10, 0), (11, 1)]),  # the stacks end first
        (6, 12, 0, 1.0, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]),
        (12, 6, 3, 0.25, [(3, 0), (4, 1)]),  # round(1.5) = 2: halves round up
        (12, 6, 3, 5 / 12, [(3, 0), (4, 1), (5, 2)]),  # round(2.5) = 3
    ],
)
def test_skew_pairs(la, lb, skew, density, expected):
    pairs = fusionops.skew_pairs(la, lb, skew, density)
    assert pairs.dtype == torch.int64
    assert pairs.tolist() == [list(p) for p in expected]


@pytest.mark.parametrize(
    "args, exc, pattern",
    [
        ((12, 12, 12, 5 / 12), ValueError, r"skew 12 pairs no layers .* possible skews are -11 to 11"),
        ((12, 8, -8, 1 / 12), ValueError, r"possible skews are -7 to 11"),
        ((12, 12, 0, 0.0), ValueError, r"density must be in \(0, 1\], got 0.0"),
        ((12, 12, 0, 1.5), ValueError, r"density must be in \(0, 1\], got 1.5"),
        ((12, 12, 0, 0.01), ValueError, r"rounds to 0 pairs; the smallest density giving a pair is 0.04167"),
        ((0, 12, 0, 0.5), ValueError, r"la must be a layer count >= 1, got 0"),
        ((12, 12, 1.5, 0.5), TypeError, r"skew must be an int, got float"),
    ],
)
def test_skew_pairs_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fusionops.skew_pairs(*args)


def make_problem(n=5, la=4, lb=6, d=12, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    ha, hb = rand(n, la, d), rand(n, lb, d)
    ws = [rand(d, d, scale=1 / math.sqrt(d)) for _ in range(4)]
    bs = [rand(d) for _ in range(4)]
    return ha, hb, ws, bs


def naive(ha, hb, pairs, ws, bs, heads, window):
    """One sample, one pair, one head at a time with plain matrix-vector products."""
    wq, wk, wv, wo = ws
    bq, bk, bv, bo = bs
    n, _, d = ha.shape
    dh = d // heads
    out = torch.empty(n, len(pairs), d, dtype=ha.dtype)
    for s in range(n):
        for p, (i, j) in enumerate(pairs):
            q = wq @ ha[s, i] + bq
            band = [jj for jj in range(j - window, j + window + 1) if 0 <= jj < hb.shape[1]]
            ks = [wk @ hb[s, jj] + bk for jj in band]
            vs = [wv @ hb[s, jj] + bv for jj in band]
            ctx = torch.empty(d, dtype=ha.dtype)
            for h in range(heads):
                c = slice(h * dh, (h + 1) * dh)
                e = torch.stack([torch.dot(q[c], k[c]) / math.sqrt(dh) for k in ks])
                a = torch.exp(e - e.max())
                a = a / a.sum()
                ctx[c] = sum(a[t] * vs[t][c] for t in range(len(band)))
            out[s, p] = ha[s, i] + wo @ ctx + bo
    return out


@pytest.mark.parametrize("heads, window", [(1, 0), (2, 1), (3, 2), (4, 7)])
def test_reference_matches_a_per_sample_loop(heads, window):
    ha, hb, ws, bs = make_problem()
    pairs = [(0, 0), (3, 5), (1, 1), (3, 5), (2, 4)]  # stack edges and a duplicate pair
    got = reference.skew_pair_attention(ha, hb, torch.tensor(pairs), *ws, *bs, heads=heads, window=window)
    assert got.shape == (5, 5, 12)
    assert_close_to(got, naive(ha, hb, pairs, ws, bs, heads, window), torch.float64, "reference vs loop")


def test_window_zero_is_the_closed_form():
    """With one key per pair the softmax is 1: out = ha[i] + (hb[j] Wvᵀ + bv) Woᵀ + bo."""
    ha, hb, (wq, wk, wv, wo), (bq, bk, bv, bo) = make_problem()
    pairs = fusionops.skew_pairs(4, 6, -1, 0.75)
    got = reference.skew_pair_attention(ha, hb, pairs, wq, wk, wv, wo, bq, bk, bv, bo, heads=3)
    i, j = pairs[:, 0], pairs[:, 1]
    expected = ha[:, i] + (hb[:, j] @ wv.t() + bv) @ wo.t() + bo
    assert_close_to(got, expected, torch.float64, "window 0")


def test_samples_do_not_see_each_other():
    """Permuting the batch permutes the output (the SSFN code mixes samples; we do not)."""
    ha, hb, ws, bs = make_problem(n=7)
    pairs = torch.tensor([[0, 1], [2, 3]])
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    out = reference.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=2, window=1)
    out_perm = reference.skew_pair_attention(ha[perm], hb[perm], pairs, *ws, *bs, heads=2, window=1)
    assert_close_to(out_perm, out[perm], torch.float64, "permuted batch")


def test_reference_gradients():
    ha, hb, ws, bs = make_problem(n=2, la=3, lb=3, d=4)
    pairs = torch.tensor([[0, 0], [2, 1]])
    leaves = [t.requires_grad_(True) for t in (ha, hb, *ws, *bs)]

    def f(*args):
        ha_, hb_, rest = args[0], args[1], args[2:]
        return reference.skew_pair_attention(ha_, hb_, pairs, *rest, heads=2, window=1)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("window", [0, 2])
def test_benchmark_peer_way_computes_the_same(window):
    """The benchmarks' per-pair nn.MultiheadAttention baseline computes the op (so its times
    compare like with like)."""
    from benchmarks.ops.skew_pair import per_pair_mha

    ha, hb, ws, bs = make_problem(n=6, la=5, lb=4, d=12)
    pairs = ((4, 0), (1, 3), (2, 2))
    expected = reference.skew_pair_attention(ha, hb, pairs, *ws, *bs, heads=3, window=window)
    assert_close_to(per_pair_mha(ha, hb, pairs, *ws, *bs, 3, window), expected, torch.float64, "per-pair mha")
