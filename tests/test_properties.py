"""Property-based: hypothesis draws the problem (modalities, widths, rows including 0, dtype,
memory layout of every input and of the upstream gradient, masks, optional arguments) and
each fused backend must give the float64 reference's output and gradients, through each op's
own ``check_against_reference``. Runs are derandomized (the same examples on every machine);
the interpreter backend gets fewer examples (it is slow)."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_usable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inputs import (
    FACTOR_LAYOUTS,
    LAYOUTS,
    STACK_LAYOUTS,
    WEIGHT_LAYOUTS,
    make_factors,
    make_mask,
    make_skew_pair_inputs,
    make_weight,
    make_xs,
)
from test_low_rank_fusion_kernels import check_against_reference as check_lmf
from test_multiple_kernel_kernels import check_against_reference as check_mkl
from test_multiple_kernel_kernels import make_beta, make_kernels
from test_product_fusion_kernels import check_against_reference as check_product
from test_skew_pair_kernels import check_against_reference as check_skew
from test_tensor_fusion_kernels import check_against_reference as check_tf

from fusionops.registry import OPS

BACKENDS = ["cpu", "triton"]
EXAMPLES = {"cpu": 30, "triton": 8}
dtypes = st.sampled_from([torch.float32, torch.float64])
rows = st.sampled_from([0, 1, 2, 3, 7, 16])
grad_layouts = st.sampled_from(["contiguous", "transposed", "broadcast"])
seeds = st.integers(0, 2**16)


def property_settings(max_examples: int):
    """hypothesis settings of the property suites: derandomized (every run checks the same
    examples), no deadline, no example database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _settings(backend: str):
    return property_settings(EXAMPLES[backend])


def _run(backend: str, op: str, check, data) -> None:
    skip_unless_usable(backend, "cpu", op=OPS[op])

    @_settings(backend)
    @given(st.data())
    def run(data):
        check(backend, data)

    run()


def _tf(backend, data):
    m = data.draw(st.integers(1, 4), "modalities")
    dims = data.draw(st.lists(st.integers(1, 4), min_size=m, max_size=m), "dims")
    n, dtype, seed = data.draw(rows, "rows"), data.draw(dtypes, "dtype"), data.draw(seeds, "seed")
    xs = make_xs((n,), dims, dtype, "cpu", data.draw(st.sampled_from(LAYOUTS), "layout"), seed)
    w = b = None
    if data.draw(st.booleans(), "projected"):
        o = data.draw(st.integers(1, 5), "O")
        w, b = make_weight(dims, o, dtype, transposed=data.draw(st.booleans(), "transposed"), seed=seed + 1)
        b = b if data.draw(st.booleans(), "bias") else None
    mask = make_mask((n,), m, seed=seed + 2) if data.draw(st.booleans(), "masked") else None
    check_tf(backend, xs, w, b, mask, dtype, data.draw(grad_layouts, "grad layout"))


def _lmf(backend, data):
    m = data.draw(st.integers(1, 4), "modalities")
    dims = data.draw(st.lists(st.integers(1, 5), min_size=m, max_size=m), "dims")
    n, dtype, seed = data.draw(rows, "rows"), data.draw(dtypes, "dtype"), data.draw(seeds, "seed")
    xs = make_xs((n,), dims, dtype, "cpu", data.draw(st.sampled_from(LAYOUTS), "layout"), seed)
    rank, o = data.draw(st.integers(1, 3), "rank"), data.draw(st.integers(1, 5), "O")
    layout = data.draw(st.sampled_from(FACTOR_LAYOUTS), "factor layout")
    factors, rank_weight, bias = make_factors(dims, rank, o, dtype, "cpu", layout, seed + 1)
    bias = bias if data.draw(st.booleans(), "bias") else None
    mask = make_mask((n,), m, seed=seed + 2) if data.draw(st.booleans(), "masked") else None
    check_lmf(backend, xs, factors, rank_weight, bias, mask, dtype, data.draw(grad_layouts, "grad layout"))


def _product(backend, data):
    m, d = data.draw(st.integers(1, 5), "modalities"), data.draw(st.integers(1, 9), "width")
    n, dtype, seed = data.draw(rows, "rows"), data.draw(dtypes, "dtype"), data.draw(seeds, "seed")
    xs = make_xs((n,), (d,) * m, dtype, "cpu", data.draw(st.sampled_from(LAYOUTS), "layout"), seed)
    check_product(backend, xs, dtype, data.draw(grad_layouts, "grad layout"))


def _skew(backend, data):
    n, dtype, seed = data.draw(rows, "rows"), data.draw(dtypes, "dtype"), data.draw(seeds, "seed")
    la, lb = data.draw(st.integers(1, 4), "La"), data.draw(st.integers(1, 4), "Lb")
    heads = data.draw(st.integers(1, 3), "heads")
    d = heads * data.draw(st.integers(1, 3), "head width")
    pair = st.tuples(st.integers(0, la - 1), st.integers(0, lb - 1))
    pairs = data.draw(st.lists(pair, min_size=1, max_size=4), "pairs")
    ha, hb, ws, bs = make_skew_pair_inputs(
        n,
        la,
        lb,
        d,
        dtype,
        "cpu",
        data.draw(st.sampled_from(STACK_LAYOUTS), "layout"),
        data.draw(st.sampled_from(WEIGHT_LAYOUTS), "weight layout"),
        seed,
    )
    bs = [b if data.draw(st.booleans(), f"bias {i}") else None for i, b in enumerate(bs)]
    window = data.draw(st.integers(0, 2), "window")
    check_skew(backend, ha, hb, pairs, ws, bs, heads, window, dtype, data.draw(grad_layouts, "grad layout"))


def _mkl(backend, data):
    m = data.draw(st.integers(1, 4), "modalities")
    dims = data.draw(st.lists(st.integers(1, 5), min_size=m, max_size=m), "dims")
    dtype, seed = data.draw(dtypes, "dtype"), data.draw(seeds, "seed")
    na, nb = data.draw(rows, "rows of a"), data.draw(rows, "rows of b")
    layout = data.draw(st.sampled_from(LAYOUTS), "layout")
    xs_a = make_xs((na,), dims, dtype, "cpu", layout, seed)
    # Two sides, never the Gram matrix (xs_b = xs_a): there each row's gradient holds a point's
    # distance to itself, S_ii (a_i - a_i), exactly 0 but rounded as S_ii a_i - S_ii a_i in the
    # GEMM form every fast kernel (and autograd through the reference) uses; with far-apart
    # points the true gradient is far smaller than those terms and a tolerance relative to it
    # cannot hold in any dtype. test_multiple_kernel_kernels tests the Gram case on
    # well-conditioned inputs.
    xs_b = make_xs((nb,), dims, dtype, "cpu", layout, seed + 1)
    kernels = make_kernels(m, dtype, "cpu", seed + 2)
    check_mkl(backend, xs_a, xs_b, make_beta(m, dtype, "cpu", seed + 3), kernels, dtype, "contiguous")


CASES = {
    "tensor_fusion": _tf,
    "low_rank_fusion": _lmf,
    "product_fusion": _product,
    "skew_pair_attention": _skew,
    "multiple_kernel": _mkl,
}


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, op):
    _run(backend, op, CASES[op], None)
