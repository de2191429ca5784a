"""Hostile calls of the registered ops (``torch.ops.fusionops.*``, which take the backend as
their last argument): each must raise an error naming the argument before any kernel runs.

``CASES`` maps a case id to ``(build, exception type, regex)``; ``build(backend)`` returns the
call to make. Run as a script (``python tests/bad_inputs.py <backend> <id>…``) it makes each
call in turn and prints one JSON line per case, so a crash (a segfault from an out-of-bounds
access) loses only the case that caused it: tests/test_bad_inputs.py drives it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import torch

Call = Callable[[], object]
F32 = torch.float32
ops = torch.ops.fusionops


def _r(*shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def _tf(backend: str, *, xs=None, weight=None, bias=None, mask=None, grad=None) -> Call:
    xs = xs if xs is not None else [_r(4, 3), _r(4, 5)]
    weight = weight if weight is not None else _r(2, 24)
    if grad is not None:
        return lambda: ops.tensor_fusion_projected_backward(grad, xs, weight, mask, True, True, True, backend)
    return lambda: ops.tensor_fusion_projected(xs, weight, bias, mask, backend)


def _lmf(backend: str, *, xs=None, factors=None, rank_weight=None, bias=None, mask=None, grad=None) -> Call:
    xs = xs if xs is not None else [_r(4, 3), _r(4, 5)]
    factors = factors if factors is not None else [_r(2, 4, 6), _r(2, 6, 6)]
    rank_weight = rank_weight if rank_weight is not None else _r(2)
    if grad is not None:
        return lambda: ops.low_rank_fusion_backward(
            grad, xs, factors, rank_weight, mask, True, True, True, False, backend
        )
    return lambda: ops.low_rank_fusion(xs, factors, rank_weight, bias, mask, backend)


def _skew(backend: str, *, pairs=None, ws=None, heads=2, window=0, ha=None, grad=None) -> Call:
    ha = ha if ha is not None else _r(2, 3, 4)
    hb = _r(2, 2, 4)
    pairs = pairs if pairs is not None else torch.tensor([[0, 1], [2, 0]])
    ws = ws if ws is not None else [_r(4, 4) for _ in range(4)]
    if grad is not None:
        return lambda: ops.skew_pair_attention_backward(
            grad, ha, hb, pairs, *ws, None, None, None, heads, window, [True] * 6 + [False] * 4, backend
        )
    return lambda: ops.skew_pair_attention(ha, hb, pairs, *ws, None, None, None, None, heads, window, backend)


def _mkl(backend: str, *, xs_b=None, beta=None, kinds=(1, 0), params=None, degrees=(0, 0), grad=None) -> Call:
    xs_a = [_r(5, 2), _r(5, 3)]
    xs_b = xs_b if xs_b is not None else [_r(3, 2), _r(3, 3)]
    beta = beta if beta is not None else torch.tensor([0.5, 0.25])
    params = params if params is not None else torch.tensor([0.5, 0.0])
    if grad is not None:
        return lambda: ops.multiple_kernel_backward(
            grad, xs_a, xs_b, beta, list(kinds), params, list(degrees), [True] * 4, backend
        )
    return lambda: ops.multiple_kernel(xs_a, xs_b, beta, list(kinds), params, list(degrees), backend)


CASES: dict[str, tuple[Callable[[str], Call], type[Exception], str]] = {
    # tensor fusion
    "tf_weight_width": (lambda b: _tf(b, weight=_r(2, 23)), ValueError, r"weight must have shape \(O, K\)"),
    "tf_bias_shape": (lambda b: _tf(b, bias=_r(3)), ValueError, r"bias must have shape \(2,\)"),
    "tf_mask_shape": (
        lambda b: _tf(b, mask=torch.ones(4, 3, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(4, 2\)",
    ),
    "tf_mask_dtype": (lambda b: _tf(b, mask=torch.ones(4, 2)), TypeError, r"mask must have dtype torch.bool"),
    "tf_rows_mismatch": (
        lambda b: _tf(b, xs=[_r(4, 3), _r(6, 5)]),
        ValueError,
        r"xs\[1\] has leading shape \(6,\)",
    ),
    "tf_not_rows": (lambda b: _tf(b, xs=[_r(2, 4, 3), _r(2, 4, 5)]), ValueError, r"takes rows"),
    "tf_weight_dtype": (
        lambda b: _tf(b, weight=_r(2, 24, dtype=torch.float64)),
        TypeError,
        r"weight has dtype",
    ),
    "tf_grad_shape": (lambda b: _tf(b, grad=_r(4, 3)), ValueError, r"grad must have shape \(4, 2\)"),
    "tf_features_grad_shape": (
        lambda b: lambda: ops.tensor_fusion_features_backward(_r(4, 23), [_r(4, 3), _r(4, 5)], None, b),
        ValueError,
        r"grad must have shape \(4, 24\)",
    ),
    # low-rank fusion
    "lmf_short_rank_weight": (
        lambda b: _lmf(b, rank_weight=_r(1)),
        ValueError,
        r"rank_weight must have shape \(2,\)",
    ),
    "lmf_factor_width": (
        lambda b: _lmf(b, factors=[_r(2, 4, 6), _r(2, 5, 6)]),
        ValueError,
        r"factors\[1\] must have shape",
    ),
    "lmf_factor_rank": (
        lambda b: _lmf(b, factors=[_r(2, 4, 6), _r(3, 6, 6)]),
        ValueError,
        r"factors\[1\] has shape .* every factor must share R and O",
    ),
    "lmf_factor_count": (lambda b: _lmf(b, factors=[_r(2, 4, 6)]), ValueError, r"factors has 1 tensors"),
    "lmf_mask_shape": (
        lambda b: _lmf(b, mask=torch.ones(3, 2, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(4, 2\)",
    ),
    "lmf_grad_shape": (lambda b: _lmf(b, grad=_r(4, 5)), ValueError, r"grad must have shape \(4, 6\)"),
    # product fusion
    "product_widths": (
        lambda b: lambda: ops.product_fusion([_r(4, 3), _r(4, 5)], b),
        ValueError,
        r"xs\[1\] has width 5 but xs\[0\] has 3",
    ),
    "product_rows": (
        lambda b: lambda: ops.product_fusion([_r(4, 3), _r(5, 3)], b),
        ValueError,
        r"xs\[1\] has leading shape \(5,\)",
    ),
    "product_grad_shape": (
        lambda b: lambda: ops.product_fusion_backward(_r(4, 2), [_r(4, 3), _r(4, 3)], b),
        ValueError,
        r"grad must have shape \(4, 3\)",
    ),
    # skew-pair attention
    "skew_pair_out_of_range": (
        lambda b: _skew(b, pairs=torch.tensor([[100, 0]])),
        ValueError,
        r"pairs\[0\] = \(100, 0\): i = 100 is out of range",
    ),
    "skew_pair_negative": (
        lambda b: _skew(b, pairs=torch.tensor([[0, -1]])),
        ValueError,
        r"pairs\[0\].*negative|pairs.*>= 0",
    ),
    "skew_pair_dtype": (
        lambda b: _skew(b, pairs=torch.tensor([[0, 1]], dtype=torch.int32)),
        ValueError,
        r"pairs as a contiguous int64 tensor",
    ),
    "skew_heads": (lambda b: _skew(b, heads=3), ValueError, r"heads = 3 does not divide the width D = 4"),
    "skew_window": (lambda b: _skew(b, window=-1), ValueError, r"window must be >= 0, got -1"),
    "skew_weight_shape": (
        lambda b: _skew(b, ws=[_r(4, 4), _r(4, 3), _r(4, 4), _r(4, 4)]),
        ValueError,
        r"wk must have shape \(4, 4\)",
    ),
    "skew_grad_shape": (
        lambda b: _skew(b, grad=_r(2, 3, 4)),
        ValueError,
        r"grad must have shape \(2, 2, 4\)",
    ),
    # multiple kernel fusion
    "mkl_unknown_kind": (
        lambda b: _mkl(b, kinds=(7, 0)),
        ValueError,
        r"kinds must hold one code per modality",
    ),
    "mkl_short_kinds": (lambda b: _mkl(b, kinds=(1,)), ValueError, r"kinds must hold one code per modality"),
    "mkl_params_shape": (
        lambda b: _mkl(b, params=torch.tensor([0.5])),
        ValueError,
        r"params must have shape \(2,\)",
    ),
    "mkl_params_nan": (
        lambda b: _mkl(b, params=torch.tensor([float("nan"), 0.0])),
        ValueError,
        r"params\[0\] must be finite",
    ),
    "mkl_gamma_negative": (
        lambda b: _mkl(b, params=torch.tensor([-1.0, 0.0])),
        ValueError,
        r"params\[0\] \(γ of an RBF kernel\) must be > 0",
    ),
    "mkl_degree": (lambda b: _mkl(b, kinds=(2, 0)), ValueError, r"degrees\[0\] .* must be >= 1, got 0"),
    "mkl_widths": (
        lambda b: _mkl(b, xs_b=[_r(3, 2), _r(3, 4)]),
        ValueError,
        r"xs_b\[1\] has width 4 but xs_a\[1\] has 3",
    ),
    "mkl_beta_shape": (
        lambda b: _mkl(b, beta=torch.tensor([0.5])),
        ValueError,
        r"beta must have shape \(2,\)",
    ),
    "mkl_beta_nan": (
        lambda b: _mkl(b, beta=torch.tensor([0.5, float("nan")])),
        ValueError,
        r"beta must be finite",
    ),
    "mkl_grad_shape": (lambda b: _mkl(b, grad=_r(3, 5)), ValueError, r"grad must have shape \(5, 3\)"),
    # the backend argument
    "unknown_backend": (
        lambda b: _tf("bogus"),
        ValueError,
        r"backend must be one of 'cpu', 'triton', 'cuda'",
    ),
    "cuda_backend_on_cpu_tensors": (lambda b: _mkl("cuda"), RuntimeError, r"backend 'cuda' cannot serve"),
}


def main(backend: str, ids: list[str]) -> None:
    for case in ids:
        print(json.dumps({"start": case}), flush=True)
        build, _, _ = CASES[case]
        try:
            build(backend)()
            outcome = {"case": case, "raised": None, "message": "returned without an error"}
        except Exception as e:  # noqa: BLE001 - every outcome is reported to the parent test
            outcome = {"case": case, "raised": [c.__name__ for c in type(e).__mro__], "message": str(e)}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fusionops  # noqa: F401  (registers the ops)

    main(sys.argv[1], sys.argv[2:])
