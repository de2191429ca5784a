"""Every fused MFH backend against fusionops.reference (float64): the bilinear kernels' chain
mode, p blocks each reading the whole of x and t, products chained from block to block."""

from __future__ import annotations

import pytest
import torch
from bilinear_inputs import PARAM_LAYOUTS, check_against_reference, make_mfh_params
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, make_grad, make_xs

import fusionops
from fusionops import reference

# (d_x, d_t, k, o, O, p): odd beside round; k = 1; one block (MFB), two (block.bootstrap's), four.
SIZES = [(5, 3, 2, 4, 3, 2), (16, 7, 1, 5, 8, 3), (3, 9, 5, 3, 1, 1), (4, 6, 2, 3, 5, 4)]


def run(backend, n, size, dtype=torch.float32, activation="relu", normalize=False, layout="contiguous",
        param_layout="contiguous", grad_layout="contiguous", bias=True, device="cpu"):  # fmt: skip
    dx, dt, k, o, out, blocks = size
    x, t = make_xs((n,), (dx, dt), dtype, device, layout)
    params = make_mfh_params(dx, dt, k, o, out, blocks, dtype, device, param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"factor": k, "activation": activation, "normalize": normalize}
    return check_against_reference(
        "mfh", backend, x, t, params, kwargs, dtype, grad_layout, conditioned=normalize
    )


@pytest.mark.interpreter_subset(keep=lambda size, dtype, **_: size == SIZES[0] and dtype == torch.float32)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_reference(kernel_backend, device, size, dtype, activation, normalize):
    run(kernel_backend, 7, size, dtype, activation, normalize, device=device)


def test_one_block_is_mfb(kernel_backend, device):
    """p = 1: MFH is MFB (the chain has nothing to multiply)."""
    dx, dt, k, o, out = 5, 3, 2, 4, 3
    x, t = make_xs((6,), (dx, dt), torch.float64, device)
    params = make_mfh_params(dx, dt, k, o, out, 1, torch.float64, device)
    flat = [params[0][0], params[1][0], params[2][0], params[3][0], params[4], params[5]]
    with fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=k, normalize=True)
        y1 = fusionops.mfb(x, t, *flat, factor=k, normalize=True)
    assert_close_to(y, y1, torch.float64, "mfh with one block against mfb")


def test_many_tiles_without_bias(kernel_backend, device, monkeypatch):
    """More rows than one tile (an odd count); no biases."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n, size = 37, (6, 5, 3, 4, 5, 2)
    else:
        n, size = 1025, (6, 5, 4, 256, 5, 2)  # 1 MB / (2 · 1024 · 8 B): tiles of <= 64 rows, several rounds
    run(kernel_backend, n, size, torch.float64, normalize=True, bias=False, device=device)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_cpu_thread_counts(nthreads):
    """The cpu backward's rounds of one tile per thread at 1 to 3 threads, over several rounds."""
    skip_unless_usable("cpu", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        run("cpu", 700, (6, 5, 4, 256, 5, 3), torch.float64, "tanh", normalize=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead):
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = make_xs(lead, (dx, dt), torch.float64, device)
    params = make_mfh_params(dx, dt, k, o, out, blocks, torch.float64, device)
    y = check_against_reference("mfh", kernel_backend, x, t, params, {"factor": k}, torch.float64)
    assert y.shape == (*lead, out)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = make_xs(lead, (dx, dt), torch.float32, device)
    params = make_mfh_params(dx, dt, k, o, out, blocks, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=k, normalize=True)
    assert y.shape == (*lead, out)
    y.sum().backward()
    assert x.grad.shape == x.shape and t.grad.shape == t.shape
    for p in params:  # no rows: the parameter gradients are exactly zero
        assert torch.equal(p.grad, torch.zeros_like(p))


def _layouts_not_crossed(grad_layout: str, param_layout: str, **_) -> bool:
    """The interpreter's share of test_strides: the layouts are crossed on cpu."""
    return grad_layout != "transposed" or param_layout == "contiguous"


@pytest.mark.interpreter_subset(keep=_layouts_not_crossed)
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("param_layout", PARAM_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides(kernel_backend, device, layout, param_layout, grad_layout):
    """Strided, transposed and stride-0 inputs, weights and biases; non-contiguous and stride-0
    upstream gradients."""
    run(kernel_backend, 6, SIZES[0], layout=layout, param_layout=param_layout, grad_layout=grad_layout,
        normalize=True, device=device)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(kernel_backend, device, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    run(kernel_backend, 11, SIZES[1], dtype, device=device)
    run(kernel_backend, 11, SIZES[0], dtype, "tanh", normalize=True, device=device)


@pytest.mark.interpreter_subset(keep=lambda bias, **_: bias)
@pytest.mark.parametrize(("activation", "normalize", "bias"), [("relu", True, True), ("tanh", False, False)])
def test_gradcheck(kernel_backend, device, activation, normalize, bias):
    dx, dt, k, o, out, blocks = 3, 2, 2, 3, 2, 3
    x, t = (v.detach().requires_grad_(True) for v in make_xs((4,), (dx, dt), torch.float64, device))
    params = [
        p.detach().requires_grad_(True)
        for p in make_mfh_params(dx, dt, k, o, out, blocks, torch.float64, device)
    ]
    if not bias:
        params[1] = params[3] = params[5] = None
    live = [p for p in params if p is not None]

    def f(x, t, *ps):
        it = iter(ps)
        full = [next(it) if p is not None else None for p in params]
        with fusionops.backend(kernel_backend):
            return fusionops.mfh(x, t, *full, factor=k, activation=activation, normalize=normalize)

    assert torch.autograd.gradcheck(f, (x, t, *live))


def test_opcheck(kernel_backend, device):
    dtype = torch.float32
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = (v.detach().requires_grad_(True) for v in make_xs((5,), (dx, dt), dtype, device))
    params = [
        p.detach().requires_grad_(True) for p in make_mfh_params(dx, dt, k, o, out, blocks, dtype, device)
    ]
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.mfh, (x, t, *params, k, "relu", True, kernel_backend))
    no_bias = [params[0], None, params[2], None, params[4], None]
    torch.library.opcheck(ops.mfh, (x, t, *no_bias, k, "tanh", False, kernel_backend))
    plain = [p.detach() for p in params[:5]]
    gy = make_grad((5, out), dtype, device)
    for needs in ([True] * 8, [False, True, True, False, False, True, True, False]):
        torch.library.opcheck(
            ops.mfh_backward, (gy, x.detach(), t.detach(), *plain, k, "none", True, needs, kernel_backend)
        )


def test_saves_no_projection_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs and parameters, never the (N, k·o) projections or products."""
    n, size = 64, (6, 5, 3, 4, 5, 2)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, t = make_xs((n,), size[:2], torch.float32, device)
    params = make_mfh_params(*size, torch.float32, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=size[2], normalize=True)
    y.sum().backward()
    allowed = {tuple(v.shape) for v in (x, t, *params[:5])}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


def test_repeated_calls_are_identical(kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    x, t = make_xs((9,), SIZES[0][:2], torch.float32, device)
    params = make_mfh_params(*SIZES[0], torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = fusionops.mfh(x, t, *params, factor=SIZES[0][2], normalize=True)
        y2 = fusionops.mfh(x, t, *params, factor=SIZES[0][2], normalize=True)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("wants", ["inputs", "weights", "biases", "out"])
def test_partial_gradients(kernel_backend, device, wants):
    """Only what requires grad gets one, and it still matches the reference."""
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = (v.detach() for v in make_xs((5,), (dx, dt), torch.float64, device))
    params = [p.detach() for p in make_mfh_params(dx, dt, k, o, out, blocks, torch.float64, device)]
    chosen = {"inputs": [x, t], "weights": [params[0], params[2]], "biases": [params[1], params[3]],
              "out": [params[4], params[5]]}[wants]  # fmt: skip
    for v in chosen:
        v.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=k)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, chosen, g)
    expected = torch.autograd.grad(reference.mfh(x, t, *params, k), chosen, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, wants)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_stays_in_its_row(kernel_backend, device, value):
    """A NaN or inf in one row of x gives that row's output and gradients what the reference
    gives (the chain carries it from block to block) and leaves every other row exact."""
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = (v.detach() for v in make_xs((6,), (dx, dt), torch.float64, device))
    x[2, 1] = value
    x.requires_grad_(True)
    params = [p.detach() for p in make_mfh_params(dx, dt, k, o, out, blocks, torch.float64, device)]
    with fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=k)
    expected = reference.mfh(x, t, *params, k, "relu", False)
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(expected[2]).all(), "the test lost its non-finite row"
    g = make_grad(tuple(y.shape), torch.float64, device)
    (dx_got,) = torch.autograd.grad(y, [x], g)
    (dx_ref,) = torch.autograd.grad(expected, [x], g)
    torch.testing.assert_close(dx_got, dx_ref, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    dx, dt, k, o, out, blocks = SIZES[0]
    x, t = make_xs((4,), (dx, dt), torch.float32, "cpu")
    uw, ub, vw, vb, ow, ob = make_mfh_params(dx, dt, k, o, out, blocks, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"u_weight must be a 3-d tensor \(p, k·o, d_x\).*got \(8, 5\)"):
        fusionops.mfh(x, t, uw[0], ub, vw, vb, ow, ob, factor=k)
    with pytest.raises(ValueError, match="factor 3 must divide u_weight.shape\\[1\\] = 8"):
        fusionops.mfh(x, t, uw, ub, vw, vb, ow, ob, factor=3)
    with pytest.raises(ValueError, match=r"v_weight.*\(2, 8, 3\)"):
        fusionops.mfh(x, t, uw, ub, vw[:1], vb, ow, ob, factor=k)
    with pytest.raises(ValueError, match=r"out_weight.*\(3, 8\)"):
        fusionops.mfh(x, t, uw, ub, vw, vb, ow[:, :4], ob, factor=k)
    with pytest.raises(ValueError, match=r"u_bias.*\(2, 8\)"):
        fusionops.mfh(x, t, uw, ub[0], vw, vb, ow, ob, factor=k)
    with pytest.raises(ValueError, match="leading \\(batch\\) shape"):
        fusionops.mfh(x, t[:3], uw, ub, vw, vb, ow, ob, factor=k)
    with pytest.raises(TypeError, match="dtype"):
        fusionops.mfh(x, t.double(), uw, ub, vw, vb, ow, ob, factor=k)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        fusionops.mfh(x, t, uw, ub, vw, vb, ow, ob, factor=0)
