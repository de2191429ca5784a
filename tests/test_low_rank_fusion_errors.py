"""Bad input to low_rank_fusion and product_fusion gets an error naming the argument, the
expected and the given value; nothing is broadcast silently."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_usable

import fusionops


def xs2(n=4):
    return [torch.randn(n, 3), torch.randn(n, 2)]


def params(rank=2, o=5, dims=(3, 2)):
    return [torch.randn(rank, d + 1, o) for d in dims], torch.randn(rank), torch.randn(o)


def _replace(i, value):
    fs, w, b = params()
    fs[i] = value
    return fs, w, b


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (
            lambda: (xs2(), params()[0][:1], *params()[1:], None),
            ValueError,
            r"factors has 1 tensors but xs has 2",
        ),
        (
            lambda: (xs2(), params(dims=(3, 2, 2))[0], *params()[1:], None),
            ValueError,
            r"factors has 3 tensors but xs has 2 modalities",
        ),
        (
            lambda: (xs2(), torch.randn(2, 4, 5), *params()[1:], None),
            TypeError,
            r"factors must be a list or tuple",
        ),
        (
            lambda: (xs2(), *_replace(1, torch.randn(2, 4, 5)), None),
            ValueError,
            r"factors\[1\] must have shape \(R, d_1 \+ 1, O\) = \(R, 3, O\) for xs\[1\] of width 2, "
            r"got \(2, 4, 5\)",
        ),
        (
            lambda: (xs2(), *_replace(1, torch.randn(3, 5)), None),
            ValueError,
            r"factors\[1\] must have shape \(R, d_1 \+ 1, O\)",
        ),
        (
            lambda: (xs2(), *_replace(1, torch.randn(3, 3, 5)), None),
            ValueError,
            r"factors\[1\] has shape \(3, 3, 5\), so rank 3 .* but factors\[0\] has rank 2",
        ),
        (
            lambda: (xs2(), *_replace(1, torch.randn(2, 3, 6)), None),
            ValueError,
            r"output 6, but factors\[0\] has rank 2 and output 5",
        ),
        (
            lambda: (xs2(), *_replace(0, torch.randn(2, 4, 5, dtype=torch.float64)), None),
            TypeError,
            r"factors\[0\] has dtype torch.float64, expected torch.float32",
        ),
        (
            lambda: (xs2(), params()[0], torch.randn(3), params()[2], None),
            ValueError,
            r"rank_weight must have shape \(2,\) \(R, the rank of the factors\), got \(3,\)",
        ),
        (
            lambda: (xs2(), params()[0], torch.randn(1), params()[2], None),
            ValueError,
            r"rank_weight must have shape \(2,\)",
        ),
        (
            lambda: (xs2(), params()[0], torch.randn(1, 2), params()[2], None),
            ValueError,
            r"rank_weight must have shape \(2,\).*got \(1, 2\)",
        ),
        (
            lambda: (xs2(), *params()[:2], torch.randn(1, 5), None),
            ValueError,
            r"bias must have shape \(5,\) \(O, the last dim of the factors\), got \(1, 5\)",
        ),
        (
            lambda: (xs2(), *params()[:2], torch.randn(5, dtype=torch.float64), None),
            TypeError,
            r"bias has dtype torch.float64, expected torch.float32",
        ),
        (
            lambda: (xs2(), *params(rank=0), None),
            ValueError,
            r"factors\[0\] must have rank R >= 1 and output O >= 1",
        ),
        (
            lambda: ([torch.randn(4, 3), torch.randn(5, 2)], *params(), None),
            ValueError,
            r"xs\[1\] has leading shape \(5,\) but xs\[0\] has \(4,\)",
        ),
        (
            lambda: (xs2(), *params(), torch.ones(4, 3, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(4, 2\).*got \(4, 3\)",
        ),
        (
            lambda: (xs2(), *params(), torch.ones(4, 2)),
            TypeError,
            r"mask must have dtype torch.bool",
        ),
    ],
)
def test_low_rank_bad_input(backend, make, exc, pattern):
    xs, factors, w, b, mask = make()
    with fusionops.backend(backend), pytest.raises(exc, match=pattern):
        fusionops.low_rank_fusion(xs, factors, w, b, mask=mask)


def test_low_rank_device_mismatch_is_named():
    fs, w, b = params()
    with pytest.raises(ValueError, match=r"factors\[1\] is on meta, expected cpu"):
        fusionops.low_rank_fusion(xs2(), [fs[0], fs[1].to("meta")], w, b)
    with pytest.raises(ValueError, match=r"rank_weight is on meta, expected cpu"):
        fusionops.low_rank_fusion(xs2(), fs, w.to("meta"), b)


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize(
    "xs, exc, pattern",
    [
        ([torch.randn(4, 3), torch.randn(4, 5)], ValueError, r"xs\[1\] has width 5 but xs\[0\] has 3"),
        (
            [torch.randn(4, 3), torch.randn(1, 3)],
            ValueError,
            r"xs\[1\] has leading shape \(1,\) but xs\[0\] has \(4,\)",
        ),
        ([torch.randn(4, 3), torch.randn(3)], ValueError, r"leading shape \(\) but xs\[0\] has \(4,\)"),
        ([], ValueError, r"xs is empty"),
        (torch.randn(2, 4, 3), TypeError, r"xs must be a list or tuple"),
        (
            [torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)],
            TypeError,
            r"xs\[1\] has dtype torch.float64",
        ),
        (
            [torch.randn(4, 3), torch.randn(4, 3, device="meta")],
            ValueError,
            r"xs\[1\] is on meta but xs\[0\] is on cpu",
        ),
    ],
)
def test_product_bad_input(backend, xs, exc, pattern):
    with fusionops.backend(backend), pytest.raises(exc, match=pattern):
        fusionops.product_fusion(xs)


def test_triton_refuses_factors_past_its_int32_offsets():
    """A clear error before any allocation (it was a bare assert after allocating the packed
    copy, and gone under python -O). Stride-0 factors make the size free to build."""
    skip_unless_usable("triton", "cpu")
    big = torch.randn(1, 1, 1).expand(1 << 16, 3, 1 << 16)
    xs = [torch.randn(4, 2), torch.randn(4, 2)]
    with fusionops.backend("triton"), pytest.raises(ValueError, match=r"over its int32 offset limit"):
        fusionops.low_rank_fusion(xs, [big, big], torch.randn(1 << 16))
