"""Every fused product-fusion backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, detached64, make_grad, make_xs

import fusionops
from fusionops import reference

# (M, d): M = 1 to 5 modalities; odd widths beside round ones.
CASES = [(1, 5), (2, 7), (3, 16), (4, 1), (5, 33)]


def check_against_reference(backend, xs, dtype, grad_layout="contiguous"):
    with fusionops.backend(backend):
        p = fusionops.product_fusion(xs)
    xr = detached64(xs)
    pr = reference.product_fusion(xr)
    assert p.dtype == dtype
    assert_close_to(p, pr, dtype, "forward")
    if p.numel() == 0:
        return p
    g = make_grad(tuple(p.shape), dtype, p.device, grad_layout)
    p.backward(g)
    pr.backward(g.to(torch.float64))
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, dtype, f"grad of xs[{m}]")
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(kernel_backend, device, case, dtype):
    m, d = case
    check_against_reference(kernel_backend, make_xs((7,), (d,) * m, dtype, device), dtype)


def test_many_rows(kernel_backend, device):
    """More rows than one block / one thread's chunk."""
    n = 131 if kernel_backend == "triton" else 4099
    check_against_reference(kernel_backend, make_xs((n,), (37,) * 3, torch.float32, device), torch.float32)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead):
    p = check_against_reference(
        kernel_backend, make_xs(lead, (4, 4, 4), torch.float64, device), torch.float64
    )
    assert p.shape == (*lead, 4)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    xs = make_xs(lead, (3, 3), torch.float32, device)
    with fusionops.backend(kernel_backend):
        p = fusionops.product_fusion(xs)
    assert p.shape == (*lead, 3)
    p.sum().backward()
    for x in xs:
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides(kernel_backend, device, layout, grad_layout):
    xs = make_xs((6,), (5, 5, 5), torch.float32, device, layout=layout)
    check_against_reference(kernel_backend, xs, torch.float32, grad_layout)


def test_mixed_layouts(kernel_backend, device):
    """Each modality with its own strides in one call."""
    gens = [
        make_xs((6,), (5,), torch.float64, device, layout=lay, seed=i)[0] for i, lay in enumerate(LAYOUTS)
    ]
    check_against_reference(kernel_backend, gens, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(kernel_backend, device, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    check_against_reference(kernel_backend, make_xs((11,), (9, 9, 9), dtype, device), dtype)


def test_zeros_in_inputs(kernel_backend, device):
    """Exact zeros (and two zeros at one position) give the right gradients: no division."""
    xs = make_xs((4,), (3, 3, 3), torch.float64, device)
    with torch.no_grad():
        xs[0][0, 0] = 0.0
        xs[1][1, 1] = 0.0
        xs[2][1, 1] = 0.0
    check_against_reference(kernel_backend, xs, torch.float64)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_gradcheck(kernel_backend, device, m):
    xs = [x.detach().requires_grad_(True) for x in make_xs((3,), (4,) * m, torch.float64, device)]

    def f(*args):
        with fusionops.backend(kernel_backend):
            return fusionops.product_fusion(list(args))

    assert torch.autograd.gradcheck(f, tuple(xs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(kernel_backend, device, dtype):
    ops = torch.ops.fusionops
    for m in (1, 3):
        xs = [x.detach().requires_grad_(True) for x in make_xs((5,), (6,) * m, dtype, device)]
        torch.library.opcheck(ops.product_fusion, (xs, kernel_backend))
        g = make_grad((5, 6), dtype, device)
        torch.library.opcheck(ops.product_fusion_backward, (g, [x.detach() for x in xs], kernel_backend))


def test_output_is_not_an_input(kernel_backend, device):
    """With one modality the fused op returns a new tensor, not a view of the input."""
    x = make_xs((4,), (3,), torch.float32, device)[0]
    with fusionops.backend(kernel_backend):
        p = fusionops.product_fusion([x])
    assert p.data_ptr() != x.data_ptr()
    assert torch.equal(p, x)
