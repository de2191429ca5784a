"""Every fused tensor-fusion backend against fusionops.reference (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOL, assert_close_to, skip_unless_usable
from inputs import LAYOUTS, detached64, make_grad, make_mask, make_weight, make_xs, saved_shapes
from torch.profiler import ProfilerActivity, profile

import fusionops
from fusionops import reference

# M = 1 to 5 modalities; odd widths beside round ones.
DIMS = [(5,), (3, 4), (2, 5, 3), (3, 2, 1, 2), (16, 15), (2, 1, 3, 1, 2)]
MODES = ["features", "projected", "projected_nobias"]


def _params(mode, dims, dtype, device, o=5, transposed=False):
    if mode == "features":
        return None, None
    w, b = make_weight(dims, o, dtype, device, transposed=transposed)
    return w, (None if mode == "projected_nobias" else b)


def check_against_reference(backend, xs, w, b, mask, dtype, grad_layout="contiguous"):
    """Forward and every gradient of ``backend`` against the float64 reference."""
    with fusionops.backend(backend):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask)
    xr = detached64(xs)
    wr, br = detached64([w, b])
    yr = reference.tensor_fusion(xr, wr, br, mask)
    assert y.dtype == dtype
    assert_close_to(y, yr, dtype, "forward")
    if y.numel() == 0:
        return y
    g = make_grad(tuple(y.shape), dtype, y.device, grad_layout)
    y.backward(g)
    yr.backward(g.to(torch.float64))
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, dtype, f"grad of xs[{m}]")
    if w is not None:
        assert_close_to(w.grad, wr.grad, dtype, "grad of weight")
    if b is not None:
        assert_close_to(b.grad, br.grad, dtype, "grad of bias")
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_matches_reference(kernel_backend, device, dims, mode, dtype):
    xs = make_xs((7,), dims, dtype, device)
    w, b = _params(mode, dims, dtype, device)
    check_against_reference(kernel_backend, xs, w, b, None, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead, mode):
    dims = (3, 2, 4)
    xs = make_xs(lead, dims, torch.float64, device)
    w, b = _params(mode, dims, torch.float64, device)
    y = check_against_reference(kernel_backend, xs, w, b, None, torch.float64)
    k = math.prod(d + 1 for d in dims)
    assert y.shape == (*lead, k if mode == "features" else 5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead, mode):
    dims = (3, 4)
    xs = make_xs(lead, dims, torch.float32, device)
    w, b = _params(mode, dims, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b)
    assert y.shape == (*lead, 20 if mode == "features" else 5)
    y.sum().backward()
    for x in xs:
        assert x.grad.shape == x.shape
    if w is not None:  # no rows: the parameter gradients are exactly zero
        assert torch.equal(w.grad, torch.zeros_like(w))
    if b is not None:
        assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES[:2])
def test_strides(kernel_backend, device, mode, layout, grad_layout):
    """Strided, transposed and stride-0 inputs, a transposed weight, and upstream gradients
    that are non-contiguous or stride-0 (the gradient of ``y.sum()``)."""
    dims = (3, 2, 4)
    xs = make_xs((6,), dims, torch.float32, device, layout=layout)
    w, b = (
        (None, None) if mode == "features" else make_weight(dims, 6, torch.float32, device, transposed=True)
    )
    check_against_reference(kernel_backend, xs, w, b, None, torch.float32, grad_layout)


@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("dims", [(4,), (3, 4), (2, 3, 2, 1)], ids=str)
def test_mask(kernel_backend, device, dims, mode):
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
    w, b = _params(mode, dims, torch.float64, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask)
    assert not torch.isnan(y).any()
    zeroed = [torch.where(mask[:, m, None], x.detach(), 0.0) for m, x in enumerate(xs)]
    expected = reference.tensor_fusion(zeroed, w, b)
    assert_close_to(y, expected, torch.float64, "masked forward")
    g = make_grad(tuple(y.shape), torch.float64, device)
    y.backward(g)
    for m, x in enumerate(xs):
        assert not torch.isnan(x.grad).any()
        assert torch.equal(x.grad[~mask[:, m]], torch.zeros_like(x.grad[~mask[:, m]]))
    check_against_reference(
        kernel_backend,
        make_xs(lead, dims, torch.float64, device, seed=5),
        *_params(mode, dims, torch.float64, device),
        mask,
        torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("dims", [(3, 4, 2), (16, 15)], ids=str)
def test_half_precisions(kernel_backend, device, dims, mode, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    xs = make_xs((11,), dims, dtype, device)
    w, b = _params(mode, dims, dtype, device)
    check_against_reference(kernel_backend, xs, w, b, None, dtype)


def test_tolerances_are_from_the_dtype():
    """The tolerances above are tied to the dtype's epsilon, not tuned to pass."""
    assert TOL[torch.bfloat16] == 4 * torch.finfo(torch.bfloat16).eps
    assert TOL[torch.float16] == 4 * torch.finfo(torch.float16).eps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(kernel_backend, device, mode, masked):
    dims = (2, 3, 1)
    xs = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, torch.float64, device)]
    w, b = _params(mode, dims, torch.float64, device, o=3)
    mask = make_mask((4,), len(dims), device) if masked else None
    params = [p.detach().requires_grad_(True) for p in (w, b) if p is not None]

    def f(*args):
        xs_, rest = list(args[: len(dims)]), list(args[len(dims) :])
        w_ = rest[0] if w is not None else None
        b_ = rest[1] if b is not None else None
        with fusionops.backend(kernel_backend):
            return fusionops.tensor_fusion(xs_, w_, b_, mask=mask)

    assert torch.autograd.gradcheck(f, (*xs, *params))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(kernel_backend, device, dtype, masked):
    dims = (2, 3, 4)
    lead = (5,)
    xs = [x.detach().requires_grad_(True) for x in make_xs(lead, dims, dtype, device)]
    w, b = make_weight(dims, 4, dtype, device)
    mask = make_mask(lead, len(dims), device) if masked else None
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.tensor_fusion_features, (xs, mask, kernel_backend))
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, b, mask, kernel_backend))
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, None, mask, kernel_backend))
    plain = [x.detach() for x in xs]
    k = math.prod(d + 1 for d in dims)
    gz = make_grad((5, k), dtype, device)
    gy = make_grad((5, 4), dtype, device)
    torch.library.opcheck(ops.tensor_fusion_features_backward, (gz, plain, mask, kernel_backend))
    for needs in [(True, True, True), (True, False, False), (False, True, False)]:
        torch.library.opcheck(
            ops.tensor_fusion_projected_backward, (gy, plain, w.detach(), mask, *needs, kernel_backend)
        )


def test_projected_saves_no_feature_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs, never Z or any (N, K) tensor."""
    dims, n = (6, 5, 4), 32
    k = math.prod(d + 1 for d in dims)
    xs = make_xs((n,), dims, torch.float32, device)
    w, b = make_weight(dims, 3, torch.float32, device)
    with saved_shapes() as saved, fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b)
    y.sum().backward()
    assert saved, "nothing was saved: the hook did not see the op"
    assert all(math.prod(s) < n * k for s in saved if s != tuple(w.shape)), saved


def test_cpu_tiles_and_row_blocks(device):
    """Shapes larger than one tile of K and one block of rows (the C++ kernel's tiling)."""
    skip_unless_usable("cpu", device)
    dims = (40, 40, 3)
    xs = make_xs((300,), dims, torch.float32, device)
    w, b = make_weight(dims, 7, torch.float32, device)
    check_against_reference("cpu", xs, w, b, make_mask((300,), 3, device), torch.float32)
    check_against_reference(
        "cpu", make_xs((300,), (70, 3), torch.float32, device), None, None, None, torch.float32
    )


@pytest.mark.parametrize("transposed", [False, True], ids=["stacked", "per_group"])
def test_cpu_direct_path(device, transposed):
    """The C++ direct path (tail of >= 256 columns multiplied straight from T): 260 rows (a
    block of 256 and one of 4), head of H = 33 groups, O = 64, so a row-major W is multiplied
    31 outputs at a time (31, 31, 2: the stacked GEMMs' chunks and remainder), a transposed one
    group by group."""
    skip_unless_usable("cpu", device)
    dims = (32, 300)
    xs = make_xs((260,), dims, torch.float32, device)
    w, b = make_weight(dims, 64, torch.float32, device, transposed=transposed)
    check_against_reference("cpu", xs, w, b, None, torch.float32, grad_layout="transposed")


def test_repeated_calls_are_identical(kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    dims = (3, 5, 2)
    xs = make_xs((9,), dims, torch.float32, device)
    w, b = make_weight(dims, 6, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = fusionops.tensor_fusion(xs, w, b)
        y2 = fusionops.tensor_fusion(xs, w, b)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("needs", ["inputs_only", "weight_only", "bias_only", "one_modality"])
def test_partial_gradients(kernel_backend, device, needs):
    """Only what requires grad gets one, and it still matches the reference."""
    dims = (3, 2, 4)
    xs = [x.detach() for x in make_xs((5,), dims, torch.float64, device)]
    w, b = (p.detach() for p in make_weight(dims, 4, torch.float64, device))
    wants = {
        "inputs_only": [*xs],
        "weight_only": [w],
        "bias_only": [b],
        "one_modality": [xs[1]],
    }[needs]
    for t in wants:
        t.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, wants, g)
    yr = reference.tensor_fusion(xs, w, b)
    expected = torch.autograd.grad(yr, wants, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, needs)


def test_poisoning_is_active():
    """The autouse fixture really NaN-fills fresh allocations (else the NaN checks above
    could not catch an unwritten element)."""
    assert torch.isnan(torch.empty(64)).all()
    assert torch.isnan(torch.empty(3, 5).new_empty(7)).all()


def test_expanded_weight_is_not_copied(kernel_backend, device):
    """A weight expanded along O (a (1, K) tensor viewed as (O, K), stride 0) gives the
    reference's output and gradients, and the forward allocates nothing of O·K elements."""
    xs = make_xs((5,), (3, 4), torch.float32, device)
    o, k = 2048, 4 * 5
    base = torch.randn(1, k, generator=torch.Generator().manual_seed(9)).to(device).requires_grad_(True)
    bias = torch.randn(o, generator=torch.Generator().manual_seed(10)).to(device).requires_grad_(True)
    with (
        fusionops.backend(kernel_backend),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        y = fusionops.tensor_fusion(xs, base.expand(o, k), bias)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < o * k * 4, f"the forward allocated {largest} bytes: the expanded weight was copied"
    g = make_grad(tuple(y.shape), torch.float32, device)
    with fusionops.backend(kernel_backend):
        y.backward(g)
    xr, (base64, bias64) = detached64(xs), detached64([base, bias])
    yr = reference.tensor_fusion(xr, base64.expand(o, k), bias64)
    yr.backward(g.double())
    assert_close_to(y, yr, torch.float32, "forward")
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, torch.float32, f"grad of xs[{m}]")
    assert_close_to(base.grad, base64.grad, torch.float32, "grad of the expanded weight")
    assert_close_to(bias.grad, bias64.grad, torch.float32, "grad of bias")
