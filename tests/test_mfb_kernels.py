"""Every fused MFB/MLB backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from bilinear_inputs import PARAM_LAYOUTS, check_against_reference, make_mfb_params
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, make_grad, make_xs

import fusionops
from fusionops import reference

# (d_x, d_t, k, o, O): odd beside round; k = 1 is MLB.
SIZES = [(5, 3, 2, 4, 3), (16, 7, 1, 5, 8), (3, 9, 5, 3, 1)]


def run(backend, n, size, dtype=torch.float32, activation="relu", normalize=False, layout="contiguous",
        param_layout="contiguous", grad_layout="contiguous", bias=True, device="cpu"):  # fmt: skip
    dx, dt, k, o, out = size
    x, t = make_xs((n,), (dx, dt), dtype, device, layout)
    params = make_mfb_params(dx, dt, k, o, out, dtype, device, param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"factor": k, "activation": activation, "normalize": normalize}
    return check_against_reference(
        "mfb", backend, x, t, params, kwargs, dtype, grad_layout, conditioned=normalize
    )


@pytest.mark.interpreter_subset(keep=lambda size, dtype, **_: size == SIZES[0] and dtype == torch.float32)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_reference(kernel_backend, device, size, dtype, activation, normalize):
    run(kernel_backend, 7, size, dtype, activation, normalize, device=device)


def test_many_tiles_without_bias(kernel_backend, device, monkeypatch):
    """More rows than one tile (an odd count); no biases."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n, size = 97, (6, 5, 3, 4, 5)
    else:
        n, size = 1025, (6, 5, 4, 256, 5)  # 1 MB / (1024 · 8 B): tiles of <= 128 rows, several rounds
    # float64: in float32 the normalised call's allowance (the signed square root's conditioning
    # near a pooled 0, summed over 1025 rows) let a weight gradient of one round alone pass.
    run(kernel_backend, n, size, torch.float64, normalize=True, bias=False, device=device)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cpu_thread_counts(nthreads, activation):
    """The cpu backward's rounds of one tile per thread at 1 to 3 threads, over several rounds
    (k·o = 1024 in float64: at most 128 rows a tile), normalised."""
    skip_unless_usable("cpu", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        run("cpu", 1100, (6, 5, 4, 256, 5), torch.float64, activation, normalize=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead):
    dx, dt, k, o, out = SIZES[0]
    x, t = make_xs(lead, (dx, dt), torch.float64, device)
    params = make_mfb_params(dx, dt, k, o, out, torch.float64, device)
    y = check_against_reference("mfb", kernel_backend, x, t, params, {"factor": k}, torch.float64)
    assert y.shape == (*lead, out)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    dx, dt, k, o, out = SIZES[0]
    x, t = make_xs(lead, (dx, dt), torch.float32, device)
    params = make_mfb_params(dx, dt, k, o, out, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.mfb(x, t, *params, factor=k, normalize=True)
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
    dx, dt, k, o, out = 3, 2, 2, 3, 2
    x, t = (v.detach().requires_grad_(True) for v in make_xs((4,), (dx, dt), torch.float64, device))
    params = [
        p.detach().requires_grad_(True) for p in make_mfb_params(dx, dt, k, o, out, torch.float64, device)
    ]
    if not bias:
        params[1] = params[3] = params[5] = None
    live = [p for p in params if p is not None]

    def f(x, t, *ps):
        it = iter(ps)
        full = [next(it) if p is not None else None for p in params]
        with fusionops.backend(kernel_backend):
            return fusionops.mfb(x, t, *full, factor=k, activation=activation, normalize=normalize)

    assert torch.autograd.gradcheck(f, (x, t, *live))


def test_opcheck(kernel_backend, device):
    dtype = torch.float32
    dx, dt, k, o, out = SIZES[0]
    x, t = (v.detach().requires_grad_(True) for v in make_xs((5,), (dx, dt), dtype, device))
    params = [p.detach().requires_grad_(True) for p in make_mfb_params(dx, dt, k, o, out, dtype, device)]
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.mfb, (x, t, *params, k, "relu", True, kernel_backend))
    no_bias = [params[0], None, params[2], None, params[4], None]
    torch.library.opcheck(ops.mfb, (x, t, *no_bias, k, "tanh", False, kernel_backend))
    plain = [p.detach() for p in params[:5]]
    gy = make_grad((5, out), dtype, device)
    for needs in ([True] * 8, [False, True, True, False, False, True, True, False]):
        torch.library.opcheck(
            ops.mfb_backward, (gy, x.detach(), t.detach(), *plain, k, "none", True, needs, kernel_backend)
        )


def test_saves_no_projection_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs and parameters, never the (N, k·o) projections."""
    n, size = 64, (6, 5, 3, 4, 5)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, t = make_xs((n,), size[:2], torch.float32, device)
    params = make_mfb_params(*size, torch.float32, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusionops.backend(kernel_backend):
        y = fusionops.mfb(x, t, *params, factor=size[2], normalize=True)
    y.sum().backward()
    allowed = {tuple(v.shape) for v in (x, t, *params[:5])}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


def test_repeated_calls_are_identical(kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    x, t = make_xs((9,), SIZES[0][:2], torch.float32, device)
    params = make_mfb_params(*SIZES[0], torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = fusionops.mfb(x, t, *params, factor=SIZES[0][2], normalize=True)
        y2 = fusionops.mfb(x, t, *params, factor=SIZES[0][2], normalize=True)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("wants", ["inputs", "weights", "biases", "out"])
def test_partial_gradients(kernel_backend, device, wants):
    """Only what requires grad gets one, and it still matches the reference."""
    dx, dt, k, o, out = SIZES[0]
    x, t = (v.detach() for v in make_xs((5,), (dx, dt), torch.float64, device))
    params = [p.detach() for p in make_mfb_params(dx, dt, k, o, out, torch.float64, device)]
    chosen = {"inputs": [x, t], "weights": [params[0], params[2]], "biases": [params[1], params[3]],
              "out": [params[4], params[5]]}[wants]  # fmt: skip
    for v in chosen:
        v.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.mfb(x, t, *params, factor=k)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, chosen, g)
    expected = torch.autograd.grad(reference.mfb(x, t, *params, k), chosen, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, wants)


def test_nan_stays_in_its_row(kernel_backend, device):
    """A NaN in one row of x makes that row's output NaN (as the reference: relu keeps NaN)
    and leaves every other row's output and input gradient exact: rows never mix."""
    dx, dt, k, o, out = SIZES[0]
    x, t = (v.detach() for v in make_xs((6,), (dx, dt), torch.float64, device))
    x[2, 1] = float("nan")
    x.requires_grad_(True)
    params = [p.detach() for p in make_mfb_params(dx, dt, k, o, out, torch.float64, device)]
    with fusionops.backend(kernel_backend):
        y = fusionops.mfb(x, t, *params, factor=k, normalize=True)
    expected = reference.mfb(x, t, *params, k, "relu", True)
    assert torch.isnan(y[2]).all() and torch.isnan(expected[2]).all()
    keep = [0, 1, 3, 4, 5]
    assert_close_to(y[keep], expected[keep], torch.float64, "rows without NaN")
    g = make_grad(tuple(y.shape), torch.float64, device)
    (dx_got,) = torch.autograd.grad(y, [x], g)
    (dx_ref,) = torch.autograd.grad(expected, [x], g)
    assert_close_to(dx_got[keep], dx_ref[keep], torch.float64, "dx of rows without NaN")
