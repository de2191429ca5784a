"""Every fused multiple-kernel-fusion backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to
from inputs import LAYOUTS, detached64, make_grad, make_xs

import fusionops
from fusionops import BaseKernel, reference

# The cpu kernels' forward has two paths: plain loops up to a small-problem limit (every problem
# here but the many-tile ones) and tiles of BLAS GEMMs. Every test runs on both ("loops": the
# default limit; "tiles": the limit at 0); the other backends run once (deselected, see conftest).
pytestmark = pytest.mark.interpreter_subset(keep=lambda cpu_forward, **_: cpu_forward == "loops")


@pytest.fixture(autouse=True, params=["loops", "tiles"])
def cpu_forward(request, kernel_backend):
    if request.param == "loops":
        yield request.param
        return
    previous = torch.ops.fusionops._mkl_small_work(0)
    try:
        yield request.param
    finally:
        torch.ops.fusionops._mkl_small_work(previous)


# M = 1 to 5 modalities; odd widths beside round ones.
DIMS = [(5,), (3, 4), (2, 5, 3), (3, 2, 1, 2), (16, 15), (2, 1, 3, 1, 2)]
HALF = (torch.float16, torch.bfloat16)


def make_kernels(m: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[BaseKernel]:
    """Kinds cycling rbf, polynomial, linear; γ and c as tensors that require grad (so their
    gradients are checked too), degrees 1 to 3, negative offsets among them."""
    gen = torch.Generator().manual_seed(seed)
    kernels = []
    for i in range(m):
        value = float(torch.rand((), generator=gen)) + 0.2
        param = torch.tensor(value if i % 3 == 0 else value - 0.7, dtype=torch.float64)
        param = param.to(device).requires_grad_(True)
        if i % 3 == 0:
            kernels.append(BaseKernel("rbf", gamma=param))
        elif i % 3 == 1:
            kernels.append(BaseKernel("polynomial", degree=1 + i % 3 + i // 3, offset=param))
        else:
            kernels.append(BaseKernel("linear"))
    return kernels


def make_beta(m: int, dtype: torch.dtype, device: str, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(m, generator=gen, dtype=torch.float64) + 0.1).to(dtype).to(device).requires_grad_(True)


def _params(kernels: list[BaseKernel]) -> list[torch.Tensor]:
    return [k.gamma if k.kind == "rbf" else k.offset for k in kernels if k.kind != "linear"]


def _as64(kernels: list[BaseKernel]) -> list[BaseKernel]:
    """The same kernels with float64 leaf copies of their tensor parameters."""
    out = []
    for k in kernels:
        if k.kind == "rbf":
            out.append(BaseKernel("rbf", gamma=k.gamma.detach().double().requires_grad_(True)))
        elif k.kind == "polynomial":
            offset = k.offset.detach().double().requires_grad_(True)
            out.append(BaseKernel("polynomial", degree=k.degree, offset=offset))
        else:
            out.append(k)
    return out


def check_against_reference(backend, xs_a, xs_b, beta, kernels, dtype, grad_layout="contiguous"):
    """Forward and every gradient (xs_a, xs_b, beta, γ/c) of ``backend`` against float64."""
    symmetric = xs_b is None or xs_b is xs_a
    with fusionops.backend(backend):
        out = fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)
    ar = detached64(xs_a)
    br = ar if symmetric else detached64(xs_b)
    (betar,) = detached64([beta])
    kr = _as64(kernels)
    expected = reference.multiple_kernel(ar, br, betar, kr)
    assert out.dtype == dtype
    assert out.is_contiguous()
    assert_close_to(out, expected, dtype, "forward")
    if out.numel() == 0:
        return out
    g = make_grad(tuple(out.shape), dtype, out.device, grad_layout)
    out.backward(g)
    expected.backward(g.to(torch.float64))
    sides = [("xs_a", xs_a, ar)] + ([] if symmetric else [("xs_b", xs_b, br)])
    for side, xs, x64s in sides:
        for m, (x, x64) in enumerate(zip(xs, x64s, strict=True)):
            if x.requires_grad:
                assert_close_to(x.grad, x64.grad, dtype, f"grad of {side}[{m}]")
    assert_close_to(beta.grad, betar.grad, dtype, "grad of beta")
    for i, (p, p64) in enumerate(zip(_params(kernels), _params(kr), strict=True)):
        # params run in float32 for half inputs: their gradients carry the inputs' rounding.
        assert_close_to(p.grad, p64.grad, dtype, f"grad of kernel parameter {i}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_matches_reference(kernel_backend, device, dims, dtype):
    xs_a = make_xs((7,), dims, dtype, device, seed=0)
    xs_b = make_xs((9,), dims, dtype, device, seed=1)
    kernels = make_kernels(len(dims), dtype, device)
    check_against_reference(kernel_backend, xs_a, xs_b, make_beta(len(dims), dtype, device), kernels, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precisions(kernel_backend, device, dtype):
    dims = (3, 5, 2)
    xs_a = make_xs((11,), dims, dtype, device, seed=0)
    xs_b = make_xs((6,), dims, dtype, device, seed=1)
    check_against_reference(
        kernel_backend, xs_a, xs_b, make_beta(3, dtype, device), make_kernels(3, dtype, device), dtype
    )


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(kernel_backend, device, layout, grad_layout):
    """Strided, transposed and stride-0 inputs; non-contiguous and stride-0 gradients."""
    dims = (4, 3, 2)
    xs_a = make_xs((5,), dims, torch.float64, device, layout, seed=0)
    xs_b = make_xs((8,), dims, torch.float64, device, layout, seed=1)
    beta = make_beta(6, torch.float64, device)[::2]  # strided beta
    beta.retain_grad()
    kernels = make_kernels(3, torch.float64, device)
    check_against_reference(kernel_backend, xs_a, xs_b, beta, kernels, torch.float64, grad_layout)


@pytest.mark.parametrize("same", ["none", "same-list"])
def test_symmetric(kernel_backend, device, same):
    """xs_b None or the very tensors of xs_a: gradients of both uses add up."""
    dims = (3, 4, 2)
    xs = make_xs((9,), dims, torch.float64, device)
    kernels = make_kernels(3, torch.float64, device)
    beta = make_beta(3, torch.float64, device)
    out = check_against_reference(
        kernel_backend, xs, None if same == "none" else xs, beta, kernels, torch.float64
    )
    assert torch.allclose(out, out.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "rbf", "polynomial"])
def test_one_hot_beta_is_the_single_kernel(kernel_backend, device, kind):
    dims = (4, 6, 3)
    xs_a = make_xs((7,), dims, torch.float32, device, seed=0)
    xs_b = make_xs((5,), dims, torch.float32, device, seed=1)
    kernels = ["rbf", BaseKernel("polynomial", degree=2, offset=0.5), "linear"]
    m = ["rbf", "polynomial", "linear"].index(kind)
    beta = torch.zeros(3, device=device)
    beta[m] = 1.0
    with fusionops.backend(kernel_backend):
        out = fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)
    single = reference.base_kernel(xs_a[m].detach().double(), xs_b[m].detach().double(), kernels[m])
    assert_close_to(out, single, torch.float32, f"one-hot {kind}")


@pytest.mark.parametrize("sizes", [(0, 5), (4, 0), (0, 0)], ids=str)
def test_empty(kernel_backend, device, sizes):
    dims = (3, 2)
    xs_a = make_xs((sizes[0],), dims, torch.float32, device, seed=0)
    xs_b = make_xs((sizes[1],), dims, torch.float32, device, seed=1)
    beta = make_beta(2, torch.float32, device)
    kernels = make_kernels(2, torch.float32, device)
    with fusionops.backend(kernel_backend):
        out = fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)
        assert out.shape == sizes
        out.sum().backward()
    for x in xs_a + xs_b:
        assert x.grad.shape == x.shape and not x.grad.any()
    assert torch.equal(beta.grad, torch.zeros_like(beta))
    for p in _params(kernels):
        assert p.grad == 0


def test_more_rows_than_one_block(kernel_backend, device):
    """Odd row counts over several tiles of both sides, widths over one chunk."""
    small = kernel_backend == "triton" and device == "cpu"  # the interpreter is slow
    na, nb, dims = (37, 53, (5, 1, 33)) if small else (301, 517, (67, 1, 130))
    xs_a = make_xs((na,), dims, torch.float32, device, seed=0)
    xs_b = make_xs((nb,), dims, torch.float32, device, seed=1)
    kernels = [BaseKernel("rbf"), BaseKernel("polynomial", degree=2, offset=1.0), "linear"]
    beta = make_beta(3, torch.float32, device)
    with fusionops.backend(kernel_backend):
        out = fusionops.multiple_kernel(xs_a, xs_b, beta, kernels)
    ar, br = detached64(xs_a), detached64(xs_b)
    (betar,) = detached64([beta])
    expected = reference.multiple_kernel(ar, br, betar, kernels)
    assert_close_to(out, expected, torch.float32, "forward")
    g = make_grad(tuple(out.shape), torch.float32, out.device)
    out.backward(g)
    expected.backward(g.double())
    for m in range(3):
        assert_close_to(xs_a[m].grad, ar[m].grad, torch.float32, f"grad of xs_a[{m}]")
        assert_close_to(xs_b[m].grad, br[m].grad, torch.float32, f"grad of xs_b[{m}]")
    assert_close_to(beta.grad, betar.grad, torch.float32, "grad of beta")


def test_only_beta_gradient(kernel_backend, device):
    """What the MKL estimator asks for: dβ alone (the inputs do not require grad)."""
    dims = (3, 4)
    xs_a = [x.detach() for x in make_xs((6,), dims, torch.float64, device, seed=0)]
    xs_b = [x.detach() for x in make_xs((5,), dims, torch.float64, device, seed=1)]
    beta = make_beta(2, torch.float64, device)
    with fusionops.backend(kernel_backend):
        fusionops.multiple_kernel(xs_a, xs_b, beta, ["rbf", "linear"]).pow(2).sum().backward()
    (betar,) = detached64([beta])
    reference.multiple_kernel(xs_a, xs_b, betar, ["rbf", "linear"]).pow(2).sum().backward()
    assert_close_to(beta.grad, betar.grad, torch.float64, "grad of beta")


def test_gradcheck(kernel_backend, device):
    dims = (2, 3, 1)
    xs_a = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, torch.float64, device, seed=0)]
    xs_b = [x.detach().requires_grad_(True) for x in make_xs((3,), dims, torch.float64, device, seed=1)]
    beta = make_beta(3, torch.float64, device).detach().requires_grad_(True)
    gamma = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    offset = torch.tensor(-0.3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(a0, a1, a2, b0, b1, b2, beta, gamma, offset):
        kernels = [
            BaseKernel("rbf", gamma=gamma),
            BaseKernel("polynomial", degree=3, offset=offset),
            "linear",
        ]
        with fusionops.backend(kernel_backend):
            return fusionops.multiple_kernel([a0, a1, a2], [b0, b1, b2], beta, kernels)

    assert torch.autograd.gradcheck(fn, (*xs_a, *xs_b, beta, gamma, offset))


def test_opcheck(kernel_backend, device):
    dims = (3, 2)
    xs_a = [x.detach().requires_grad_(True) for x in make_xs((5,), dims, torch.float32, device, seed=0)]
    xs_b = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, torch.float32, device, seed=1)]
    beta = make_beta(2, torch.float32, device).detach().requires_grad_(True)
    params = torch.tensor([0.5, 1.5], device=device, requires_grad=True)
    args = (xs_a, xs_b, beta, [1, 2], params, [0, 2], kernel_backend)
    torch.library.opcheck(torch.ops.fusionops.multiple_kernel.default, args)
    grad = make_grad((5, 4), torch.float32, device)
    plain_a, plain_b = [x.detach() for x in xs_a], [x.detach() for x in xs_b]
    for needs in ([True] * 4, [False, True, False, False], [False, False, True, True]):
        bwd = (grad, plain_a, plain_b, beta.detach(), [1, 2], params.detach(), [0, 2], needs, kernel_backend)
        torch.library.opcheck(torch.ops.fusionops.multiple_kernel_backward.default, bwd)


def test_backward_is_deterministic(kernel_backend, device):
    dims = (6, 5)
    grads = []
    for _ in range(2):
        xs_a = make_xs((23,), dims, torch.float32, device, seed=0)
        xs_b = make_xs((19,), dims, torch.float32, device, seed=1)
        beta = make_beta(2, torch.float32, device)
        with fusionops.backend(kernel_backend):
            out = fusionops.multiple_kernel(xs_a, xs_b, beta, ["rbf", "polynomial"])
        out.backward(make_grad(tuple(out.shape), torch.float32, device))
        grads.append([x.grad.clone() for x in xs_a + xs_b] + [beta.grad.clone()])
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


def test_compiled_layer(kernel_backend, device):
    """torch.compile(fullgraph=True) of the layer, forward and backward, matches eager."""
    layer = fusionops.MultipleKernelFusion(["rbf", BaseKernel("polynomial", degree=2), "linear"]).to(device)
    xs = [x.detach() for x in make_xs((6,), (3, 4, 2), torch.float32, device)]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with fusionops.backend(kernel_backend):
        out = compiled(xs)
        out.sum().backward()
    grad = layer.logits.grad.clone()
    layer.zero_grad()
    with fusionops.backend("reference"):
        expected = layer(xs)
        expected.sum().backward()
    assert_close_to(out, expected.double(), torch.float32, "compiled forward")
    assert_close_to(grad, layer.logits.grad.double(), torch.float32, "compiled grad of logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ["many", 1, 17], ids=str)
def test_gram_matrix_over_many_tiles(kernel_backend, device, rows, dtype):
    """xs_b = xs_a (kernels may build only half of K and mirror it) over many tiles: exactly
    symmetric, and equal to the reference and to the same call on copies of xs_a. Also one
    row (a lone diagonal tile) and 17 (a full diagonal tile and a one-row one)."""
    if rows != "many":
        n = rows
    else:
        n = 70 if kernel_backend == "triton" and device == "cpu" else 1100
    dims = (5, 33, 2)
    xs = [x.detach() for x in make_xs((n,), dims, dtype, device)]
    kernels = ["rbf", BaseKernel("polynomial", degree=2, offset=0.5), "linear"]
    beta = make_beta(3, dtype, device).detach()
    with fusionops.backend(kernel_backend):
        gram = fusionops.multiple_kernel(xs, None, beta, kernels)
        copies = fusionops.multiple_kernel(xs, [x.clone() for x in xs], beta, kernels)
    assert torch.equal(gram, gram.T)
    expected = reference.multiple_kernel(detached64(xs), detached64(xs), beta.double(), kernels)
    assert_close_to(gram, expected, dtype, "Gram matrix")
    assert_close_to(copies, expected, dtype, "same call on copies")
