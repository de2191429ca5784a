"""Bad input to skew_pair_attention gets an error naming the argument, the expected and the
given value, before any backend runs."""

from __future__ import annotations

import pytest
import torch

import fusionops

N, LA, LB, D = 4, 5, 3, 6


def good(**change):
    gen = torch.Generator().manual_seed(0)
    args = {
        "ha": torch.randn(N, LA, D, generator=gen),
        "hb": torch.randn(N, LB, D, generator=gen),
        "pairs": torch.tensor([[4, 0], [1, 2]]),
        "wq": torch.randn(D, D, generator=gen),
        "wk": torch.randn(D, D, generator=gen),
        "wv": torch.randn(D, D, generator=gen),
        "wo": torch.randn(D, D, generator=gen),
        "bq": torch.randn(D, generator=gen),
        "bo": torch.randn(D, generator=gen),
        "heads": 2,
        "window": 1,
    }
    args.update(change)
    return args


def call(args):
    args = dict(args)
    return fusionops.skew_pair_attention(
        args.pop("ha"), args.pop("hb"), args.pop("pairs"), args.pop("wq"), args.pop("wk"),
        args.pop("wv"), args.pop("wo"), **args,
    )  # fmt: skip


CASES = [
    ({"pairs": torch.tensor([[5, 0]])}, ValueError, r"pairs\[0\] = \(5, 0\): i = 5 is out of range for ha "
     r"with 5 layers \(expected 0 <= i < 5; pairs are zero-based\)"),
    ({"pairs": torch.tensor([[0, 0], [1, 3]])}, ValueError, r"pairs\[1\] = \(1, 3\): j = 3 is out of range "
     r"for hb with 3 layers"),
    ({"pairs": [(0, -1)]}, ValueError, r"pairs\[0\] = \(0, -1\) has a negative layer index"),
    ({"pairs": torch.zeros(0, 2, dtype=torch.int64)}, ValueError, r"pairs is empty"),
    ({"pairs": torch.tensor([1, 2])}, ValueError, r"pairs must have shape \(P, 2\) .* got \(2,\)"),
    ({"pairs": torch.tensor([[1.0, 2.0]])}, TypeError, r"pairs must be an integer tensor .* torch.float32"),
    ({"pairs": [(0.5, 1)]}, TypeError, r"pairs\[0\] = \(0.5, 1\) must hold two ints"),
    ({"pairs": [(0, 1), (2,)]}, ValueError, r"pairs\[1\] must be an \(i, j\) pair, got \(2,\)"),
    ({"pairs": "0,1"}, TypeError, r"pairs must be a \(P, 2\) tensor or a list of \(i, j\), got str"),
    ({"heads": 4}, ValueError, r"heads = 4 does not divide the width D = 6"),
    ({"heads": 0}, ValueError, r"heads must be >= 1, got 0"),
    ({"heads": 2.0}, TypeError, r"heads must be an int, got float"),
    ({"window": -1}, ValueError, r"window must be >= 0, got -1"),
    ({"wk": torch.randn(D, D + 1)}, ValueError, r"wk must have shape \(6, 6\) \(D, D\) with D = 6, as "
     r"nn.Linear\(D, D\) stores it, got \(6, 7\)"),
    ({"wo": torch.randn(D)}, ValueError, r"wo must have shape \(6, 6\)"),
    ({"bq": torch.randn(D + 1)}, ValueError, r"bq must have shape \(6,\) \(D,\) with D = 6, got \(7,\)"),
    ({"wv": torch.randn(D, D, dtype=torch.float64)}, TypeError, r"wv has dtype torch.float64, expected "
     r"torch.float32"),
    ({"hb": torch.randn(N + 1, LB, D)}, ValueError, r"hb has shape \(5, 3, 6\) but ha has \(4, 5, 6\); the "
     r"stacks must share N \(rows\) and D \(width\)"),
    ({"hb": torch.randn(N, LB, D + 2)}, ValueError, r"the stacks must share N \(rows\) and D \(width\)"),
    ({"hb": torch.randn(N, LB, D, dtype=torch.float64)}, TypeError, r"hb has dtype torch.float64 but ha has "
     r"torch.float32"),
    ({"ha": torch.randn(N, D)}, ValueError, r"ha must have shape \(N, L, D\) .* got \(4, 6\)"),
    ({"ha": torch.randint(0, 3, (N, LA, D))}, TypeError, r"ha must have a floating dtype"),
    ({"hb": torch.randn(N, 0, D)}, ValueError, r"hb must have at least one layer"),
    ({"ha": [torch.randn(N, LA, D)]}, TypeError, r"ha must be a tensor of shape \(N, L, D\), got list"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("change, exc, pattern", CASES)
def test_bad_input(backend, change, exc, pattern):
    with fusionops.backend(backend), pytest.raises(exc, match=pattern):
        call(good(**change))


def test_good_input_runs():
    """The baseline the cases above change one thing of is itself valid."""
    out = call(good())
    assert out.shape == (N, 2, D)


def test_pairs_as_list_and_any_integer_dtype():
    ref = call(good())
    assert torch.equal(call(good(pairs=[(4, 0), (1, 2)])), ref)
    assert torch.equal(call(good(pairs=torch.tensor([[4, 0], [1, 2]], dtype=torch.int32))), ref)
