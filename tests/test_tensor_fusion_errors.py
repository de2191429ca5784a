"""Bad input gets an error naming the argument, the expected and the given value."""

from __future__ import annotations

import pytest
import torch

import fusionops
from fusionops import TensorFusion


def xs2(n=4):
    return [torch.randn(n, 3), torch.randn(n, 2)]  # K = 4 * 3 = 12


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: ([], None, None, None), ValueError, r"xs is empty"),
        (lambda: (torch.randn(3, 2), None, None, None), TypeError, r"xs must be a list or tuple"),
        (lambda: ([torch.randn(4, 3), "a"], None, None, None), TypeError, r"xs\[1\] must be a tensor"),
        (
            lambda: ([torch.randn(4, 3), torch.randn(5, 2)], None, None, None),
            ValueError,
            r"xs\[1\] has leading shape \(5,\) but xs\[0\] has \(4,\)",
        ),
        (
            lambda: ([torch.randn(4, 3), torch.randn(1, 2)], None, None, None),
            ValueError,
            r"leading shape \(1,\).*exactly",
        ),
        (
            lambda: ([torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64)], None, None, None),
            TypeError,
            r"xs\[1\] has dtype torch.float64 but xs\[0\] has torch.float32",
        ),
        (
            lambda: ([torch.randn(4, 3), torch.randint(0, 3, (4, 2))], None, None, None),
            TypeError,
            r"xs\[1\] must be a floating-point tensor, got torch.int64",
        ),
        (
            lambda: ([torch.randn(4, 3), torch.randn(4, 0)], None, None, None),
            ValueError,
            r"xs\[1\] has feature width 0",
        ),
        (lambda: ([torch.tensor(1.0)], None, None, None), ValueError, r"xs\[0\] must have shape \(\*, d\)"),
        (
            lambda: (xs2(), torch.randn(5, 11), None, None),
            ValueError,
            r"weight must have shape \(O, K\) with K = \(3 \+ 1\) \* \(2 \+ 1\) = 12 .*got \(5, 11\)",
        ),
        (lambda: (xs2(), torch.randn(12), None, None), ValueError, r"weight must have shape \(O, K\)"),
        (
            lambda: (xs2(), torch.randn(5, 12, dtype=torch.float64), None, None),
            TypeError,
            r"weight has dtype torch.float64, expected torch.float32",
        ),
        (
            lambda: (xs2(), torch.randn(5, 12), torch.randn(4), None),
            ValueError,
            r"bias must have shape \(5,\).*got \(4,\)",
        ),
        (
            lambda: (xs2(), torch.randn(5, 12), torch.randn(1, 5), None),
            ValueError,
            r"bias must have shape \(5,\)",
        ),
        (lambda: (xs2(), None, torch.randn(5), None), ValueError, r"bias was given without weight"),
        (
            lambda: (xs2(), None, None, torch.ones(4, 2)),
            TypeError,
            r"mask must have dtype torch.bool, got torch.float32",
        ),
        (
            lambda: (xs2(), None, None, torch.ones(4, 3, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(4, 2\).*got \(4, 3\)",
        ),
        (
            lambda: (xs2(), None, None, torch.ones(2, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(4, 2\)",
        ),
        (
            lambda: (xs2(), None, None, torch.ones(1, 2, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(4, 2\).*got \(1, 2\)",
        ),
    ],
)
def test_bad_input(backend, make, exc, pattern):
    xs, w, b, mask = make()
    with fusionops.backend(backend), pytest.raises(exc, match=pattern):
        fusionops.tensor_fusion(xs, w, b, mask=mask)


def test_device_mismatch_is_named():
    xs = [torch.randn(4, 3), torch.randn(4, 2, device="meta")]
    with pytest.raises(ValueError, match=r"xs\[1\] is on meta but xs\[0\] is on cpu"):
        fusionops.tensor_fusion(xs)
    with pytest.raises(ValueError, match=r"weight is on meta, expected cpu"):
        fusionops.tensor_fusion(xs2(), torch.randn(5, 12, device="meta"))
    with pytest.raises(ValueError, match=r"mask is on meta, expected cpu"):
        fusionops.tensor_fusion(xs2(), mask=torch.ones(4, 2, dtype=torch.bool, device="meta"))


def test_layer_errors():
    with pytest.raises(ValueError, match="give both input_dims and output_dim"):
        TensorFusion([3, 2])
    with pytest.raises(ValueError, match="input_dims must be one or more widths >= 1"):
        TensorFusion([3, 0], 4)
    with pytest.raises(ValueError, match="output_dim must be >= 1"):
        TensorFusion([3, 2], 0)
    layer = TensorFusion([3, 2], 4)
    with pytest.raises(ValueError, match=r"built for input_dims \(3, 2\), got modalities of widths \(3, 3\)"):
        layer([torch.randn(4, 3), torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"in_features must be K = prod\(d_m \+ 1\) = 12 .* got 11"):
        TensorFusion.from_linear([3, 2], torch.nn.Linear(11, 4))
    with pytest.raises(TypeError, match="linear must be nn.Linear"):
        TensorFusion.from_linear([3, 2], torch.nn.Conv1d(1, 1, 1))
