"""Every fused low-rank-fusion backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable
from inputs import FACTOR_LAYOUTS, LAYOUTS, detached64, make_factors, make_grad, make_mask, make_xs

import fusionops
from fusionops import reference

# M = 1 to 5 modalities; odd widths beside round ones.
DIMS = [(5,), (3, 4), (2, 5, 3), (3, 2, 1, 2), (16, 15), (2, 1, 3, 1, 2)]
# (R, O): odd beside round.
SIZES = [(3, 5), (4, 16), (1, 1)]


def check_against_reference(backend, xs, factors, w, b, mask, dtype, grad_layout="contiguous"):
    """Forward and every gradient of ``backend`` against the float64 reference."""
    with fusionops.backend(backend):
        y = fusionops.low_rank_fusion(xs, factors, w, b, mask=mask)
    xr, fr = detached64(xs), detached64(factors)
    wr, br = detached64([w, b])
    yr = reference.low_rank_fusion(xr, fr, wr, br, mask)
    assert y.dtype == dtype
    assert_close_to(y, yr, dtype, "forward")
    if y.numel() == 0:
        return y
    g = make_grad(tuple(y.shape), dtype, y.device, grad_layout)
    y.backward(g)
    yr.backward(g.to(torch.float64))
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, dtype, f"grad of xs[{m}]")
    for m, (f, f64) in enumerate(zip(factors, fr, strict=True)):
        assert_close_to(f.grad, f64.grad, dtype, f"grad of factors[{m}]")
    assert_close_to(w.grad, wr.grad, dtype, "grad of rank_weight")
    if b is not None:
        assert_close_to(b.grad, br.grad, dtype, "grad of bias")
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_matches_reference(kernel_backend, device, dims, size, dtype):
    rank, o = size
    xs = make_xs((7,), dims, dtype, device)
    factors, w, b = make_factors(dims, rank, o, dtype, device)
    check_against_reference(kernel_backend, xs, factors, w, b, None, dtype)


def test_without_bias_and_larger_rows(kernel_backend, device):
    """No bias; more rows than one block of the kernels (odd count)."""
    dims = (7, 9)
    n = 97 if kernel_backend == "triton" else 1025
    xs = make_xs((n,), dims, torch.float32, device)
    factors, w, _ = make_factors(dims, 5, 33, torch.float32, device)
    check_against_reference(kernel_backend, xs, factors, w, None, None, torch.float32)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead):
    dims = (3, 2, 4)
    xs = make_xs(lead, dims, torch.float64, device)
    factors, w, b = make_factors(dims, 3, 5, torch.float64, device)
    y = check_against_reference(kernel_backend, xs, factors, w, b, None, torch.float64)
    assert y.shape == (*lead, 5)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    dims = (3, 4)
    xs = make_xs(lead, dims, torch.float32, device)
    factors, w, b = make_factors(dims, 2, 5, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.low_rank_fusion(xs, factors, w, b)
    assert y.shape == (*lead, 5)
    y.sum().backward()
    for x in xs:
        assert x.grad.shape == x.shape
    for p in (*factors, w, b):  # no rows: the parameter gradients are exactly zero
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("factor_layout", FACTOR_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides(kernel_backend, device, layout, factor_layout, grad_layout):
    """Strided, transposed and stride-0 inputs; permuted and stride-0 factors and rank
    weights; non-contiguous and stride-0 upstream gradients."""
    dims = (3, 2, 4)
    xs = make_xs((6,), dims, torch.float32, device, layout=layout)
    factors, w, b = make_factors(dims, 3, 5, torch.float32, device, layout=factor_layout)
    check_against_reference(kernel_backend, xs, factors, w, b, None, torch.float32, grad_layout)


@pytest.mark.parametrize("dims", [(4,), (3, 4), (2, 3, 2, 1)], ids=str)
def test_mask(kernel_backend, device, dims):
    """A missing modality contributes [1, 0…0] even when its values are NaN, and gets zero
    gradient."""
    lead = (9,)
    mask = make_mask(lead, len(dims), device)
    mask[0] = False  # a row with every modality missing
    mask[1] = True
    xs = make_xs(lead, dims, torch.float64, device)
    with torch.no_grad():
        for m, x in enumerate(xs):
            x[~mask[:, m]] = float("nan")
    factors, w, b = make_factors(dims, 3, 4, torch.float64, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.low_rank_fusion(xs, factors, w, b, mask=mask)
    assert not torch.isnan(y).any()
    zeroed = [torch.where(mask[:, m, None], x.detach(), 0.0) for m, x in enumerate(xs)]
    expected = reference.low_rank_fusion(zeroed, factors, w, b)
    assert_close_to(y, expected, torch.float64, "masked forward")
    y.backward(make_grad(tuple(y.shape), torch.float64, device))
    for m, x in enumerate(xs):
        assert not torch.isnan(x.grad).any()
        assert torch.equal(x.grad[~mask[:, m]], torch.zeros_like(x.grad[~mask[:, m]]))
    for f in factors:
        assert not torch.isnan(f.grad).any()
    fresh = make_xs(lead, dims, torch.float64, device, seed=5)
    check_against_reference(
        kernel_backend, fresh, *make_factors(dims, 3, 4, torch.float64, device), mask, torch.float64
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(3, 4, 2), (16, 15)], ids=str)
def test_half_precisions(kernel_backend, device, dims, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    xs = make_xs((11,), dims, dtype, device)
    factors, w, b = make_factors(dims, 4, 6, dtype, device)
    check_against_reference(kernel_backend, xs, factors, w, b, None, dtype)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(kernel_backend, device, masked, with_bias):
    dims = (2, 3, 1)
    m = len(dims)
    xs = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, torch.float64, device)]
    factors, w, b = make_factors(dims, 2, 3, torch.float64, device)
    params = [p.detach().requires_grad_(True) for p in (*factors, w, b)]
    mask = make_mask((4,), m, device) if masked else None

    def f(*args):
        xs_, fs_, w_, b_ = list(args[:m]), list(args[m : 2 * m]), args[2 * m], args[2 * m + 1]
        with fusionops.backend(kernel_backend):
            return fusionops.low_rank_fusion(xs_, fs_, w_, b_ if with_bias else None, mask=mask)

    assert torch.autograd.gradcheck(f, (*xs, *params))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(kernel_backend, device, dtype, masked):
    dims = (2, 3, 4)
    lead = (5,)
    xs = [x.detach().requires_grad_(True) for x in make_xs(lead, dims, dtype, device)]
    fs, w, b = make_factors(dims, 3, 4, dtype, device)
    factors = [f.detach().requires_grad_(True) for f in fs]
    w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    mask = make_mask(lead, len(dims), device) if masked else None
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.low_rank_fusion, (xs, factors, w, b, mask, kernel_backend))
    torch.library.opcheck(ops.low_rank_fusion, (xs, factors, w, None, mask, kernel_backend))
    plain = [x.detach() for x in xs]
    fplain = [f.detach() for f in factors]
    gy = make_grad((5, 4), dtype, device)
    for needs in [(True, True, True, True), (True, False, False, False), (False, True, True, False)]:
        torch.library.opcheck(
            ops.low_rank_fusion_backward, (gy, plain, fplain, w.detach(), mask, *needs, kernel_backend)
        )


def test_saves_no_projection_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs and parameters, never the (N, R, O) projections."""
    dims, n, rank, o = (6, 5, 4), 64, 4, 8
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    xs = make_xs((n,), dims, torch.float32, device)
    factors, w, b = make_factors(dims, rank, o, torch.float32, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusionops.backend(kernel_backend):
        y = fusionops.low_rank_fusion(xs, factors, w, b)
    y.sum().backward()
    allowed = {tuple(x.shape) for x in xs} | {tuple(f.shape) for f in factors} | {(rank,)}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


def test_repeated_calls_are_identical(kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    dims = (3, 5, 2)
    xs = make_xs((9,), dims, torch.float32, device)
    factors, w, b = make_factors(dims, 3, 6, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = fusionops.low_rank_fusion(xs, factors, w, b)
        y2 = fusionops.low_rank_fusion(xs, factors, w, b)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize(
    "needs", ["inputs_only", "factors_only", "rank_weight_only", "bias_only", "one_modality"]
)
def test_partial_gradients(kernel_backend, device, needs):
    """Only what requires grad gets one, and it still matches the reference."""
    dims = (3, 2, 4)
    xs = [x.detach() for x in make_xs((5,), dims, torch.float64, device)]
    factors, w, b = make_factors(dims, 3, 4, torch.float64, device)
    factors, w, b = [f.detach() for f in factors], w.detach(), b.detach()
    wants = {
        "inputs_only": [*xs],
        "factors_only": [*factors],
        "rank_weight_only": [w],
        "bias_only": [b],
        "one_modality": [xs[1], factors[2]],
    }[needs]
    for t in wants:
        t.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.low_rank_fusion(xs, factors, w, b)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, wants, g)
    expected = torch.autograd.grad(reference.low_rank_fusion(xs, factors, w, b), wants, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, needs)


def test_zeros_in_projections(kernel_backend, device):
    """A projection that is exactly zero (all-zero factor slice) must not break the gradient
    of the other modalities (no division by the product)."""
    dims = (3, 4, 2)
    xs = make_xs((5,), dims, torch.float64, device)
    factors, w, b = make_factors(dims, 3, 4, torch.float64, device)
    with torch.no_grad():
        factors[1][1].zero_()  # rank 1 of modality 1 projects to 0
    check_against_reference(kernel_backend, xs, factors, w, b, None, torch.float64)
