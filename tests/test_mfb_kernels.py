"""Every fused MFB/MLB and MFH backend against fusionops.reference (float64).

MFH is MFB's blocks chained (the bilinear kernels' chain mode); every test here runs for both
ops (``variant``), MFH with the block count ``p`` of each size."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from bilinear_inputs import PARAM_LAYOUTS, check_against_reference, make_mfb_params, make_mfh_params
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, make_grad, make_xs

import fusionops
from fusionops import reference

# (d_x, d_t, k, o, O, p): odd beside round; k = 1 is MLB; p (MFH's blocks) 1 to 4.
SIZES = [(5, 3, 2, 4, 3, 2), (16, 7, 1, 5, 8, 3), (3, 9, 5, 3, 1, 1), (4, 6, 2, 3, 5, 4)]


@dataclass(frozen=True)
class Variant:
    """MFB (``blocks`` False: 2-d weights) or MFH (stacked ``(p, k·o, d)`` weights)."""

    op: str
    blocks: bool

    def params(self, size, dtype=torch.float32, device="cpu", layout="contiguous"):
        dx, dt, k, o, out, p = size
        if self.blocks:
            return make_mfh_params(dx, dt, k, o, out, p, dtype, device, layout)
        return make_mfb_params(dx, dt, k, o, out, dtype, device, layout)

    def __call__(self, *args, **kwargs):
        return getattr(fusionops, self.op)(*args, **kwargs)

    def reference(self, *args, **kwargs):
        return getattr(reference, self.op)(*args, **kwargs)


MFB, MFH = Variant("mfb", False), Variant("mfh", True)


@pytest.fixture(params=[MFB, MFH], ids=lambda v: v.op)
def variant(request) -> Variant:
    return request.param


def run(variant, backend, n, size, dtype=torch.float32, activation="relu", normalize=False,
        layout="contiguous", param_layout="contiguous", grad_layout="contiguous", bias=True,
        device="cpu"):  # fmt: skip
    x, t = make_xs((n,), size[:2], dtype, device, layout)
    params = variant.params(size, dtype, device, param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"factor": size[2], "activation": activation, "normalize": normalize}
    return check_against_reference(
        variant.op, backend, x, t, params, kwargs, dtype, grad_layout, conditioned=normalize
    )


@pytest.mark.interpreter_subset(keep=lambda size, dtype, **_: size == SIZES[0] and dtype == torch.float32)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_reference(variant, kernel_backend, device, size, dtype, activation, normalize):
    run(variant, kernel_backend, 7, size, dtype, activation, normalize, device=device)


def test_one_block_mfh_is_mfb(kernel_backend, device):
    """p = 1: MFH is MFB (the chain has nothing to multiply)."""
    size = (5, 3, 2, 4, 3, 1)
    x, t = make_xs((6,), size[:2], torch.float64, device)
    params = MFH.params(size, torch.float64, device)
    flat = [params[0][0], params[1][0], params[2][0], params[3][0], params[4], params[5]]
    with fusionops.backend(kernel_backend):
        y = fusionops.mfh(x, t, *params, factor=2, normalize=True)
        y1 = fusionops.mfb(x, t, *flat, factor=2, normalize=True)
    assert_close_to(y, y1, torch.float64, "mfh with one block against mfb")


def test_many_tiles_without_bias(variant, kernel_backend, device, monkeypatch):
    """More rows than one tile (an odd count); no biases."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n, size = 37 if variant.blocks else 97, (6, 5, 3, 4, 5, 2)
    else:
        # 1 MB / (p · 1024 · 8 B): tiles of <= 128 / 64 rows, several rounds.
        n, size = 1025, (6, 5, 4, 256, 5, 2)
    # float64: in float32 the normalised call's allowance (the signed square root's conditioning
    # near a pooled 0, summed over 1025 rows) let a weight gradient of one round alone pass.
    run(variant, kernel_backend, n, size, torch.float64, normalize=True, bias=False, device=device)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cpu_thread_counts(variant, nthreads, activation):
    """The cpu backward's rounds of one tile per thread at 1 to 3 threads, over several rounds
    (k·o = 1024 in float64: at most 128 rows a tile, 64 for MFH's two blocks), normalised."""
    skip_unless_usable("cpu", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        run(variant, "cpu", 1100, (6, 5, 4, 256, 5, 2), torch.float64, activation, normalize=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(variant, kernel_backend, device, lead):
    x, t = make_xs(lead, SIZES[0][:2], torch.float64, device)
    params = variant.params(SIZES[0], torch.float64, device)
    kwargs = {"factor": SIZES[0][2]}
    y = check_against_reference(variant.op, kernel_backend, x, t, params, kwargs, torch.float64)
    assert y.shape == (*lead, SIZES[0][4])


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(variant, kernel_backend, device, lead):
    x, t = make_xs(lead, SIZES[0][:2], torch.float32, device)
    params = variant.params(SIZES[0], torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = variant(x, t, *params, factor=SIZES[0][2], normalize=True)
    assert y.shape == (*lead, SIZES[0][4])
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
def test_strides(variant, kernel_backend, device, layout, param_layout, grad_layout):
    """Strided, transposed and stride-0 inputs, weights and biases; non-contiguous and stride-0
    upstream gradients."""
    run(variant, kernel_backend, 6, SIZES[0], layout=layout, param_layout=param_layout,
        grad_layout=grad_layout, normalize=True, device=device)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(variant, kernel_backend, device, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    run(variant, kernel_backend, 11, SIZES[1], dtype, device=device)
    run(variant, kernel_backend, 11, SIZES[0], dtype, "tanh", normalize=True, device=device)


@pytest.mark.interpreter_subset(keep=lambda bias, **_: bias)
@pytest.mark.parametrize(("activation", "normalize", "bias"), [("relu", True, True), ("tanh", False, False)])
def test_gradcheck(variant, kernel_backend, device, activation, normalize, bias):
    size = (3, 2, 2, 3, 2, 3)
    x, t = (v.detach().requires_grad_(True) for v in make_xs((4,), size[:2], torch.float64, device))
    params = [p.detach().requires_grad_(True) for p in variant.params(size, torch.float64, device)]
    if not bias:
        params[1] = params[3] = params[5] = None
    live = [p for p in params if p is not None]

    def f(x, t, *ps):
        it = iter(ps)
        full = [next(it) if p is not None else None for p in params]
        with fusionops.backend(kernel_backend):
            return variant(x, t, *full, factor=size[2], activation=activation, normalize=normalize)

    assert torch.autograd.gradcheck(f, (x, t, *live))


def test_opcheck(variant, kernel_backend, device):
    dtype = torch.float32
    k, out = SIZES[0][2], SIZES[0][4]
    x, t = (v.detach().requires_grad_(True) for v in make_xs((5,), SIZES[0][:2], dtype, device))
    params = [p.detach().requires_grad_(True) for p in variant.params(SIZES[0], dtype, device)]
    fwd = getattr(torch.ops.fusionops, variant.op)
    bwd = getattr(torch.ops.fusionops, f"{variant.op}_backward")
    torch.library.opcheck(fwd, (x, t, *params, k, "relu", True, kernel_backend))
    no_bias = [params[0], None, params[2], None, params[4], None]
    torch.library.opcheck(fwd, (x, t, *no_bias, k, "tanh", False, kernel_backend))
    plain = [p.detach() for p in params[:5]]
    gy = make_grad((5, out), dtype, device)
    for needs in ([True] * 8, [False, True, True, False, False, True, True, False]):
        torch.library.opcheck(
            bwd, (gy, x.detach(), t.detach(), *plain, k, "none", True, needs, kernel_backend)
        )


def test_saves_no_projection_sized_tensor(variant, kernel_backend, device):
    """Autograd keeps the inputs and parameters, never the (N, k·o) projections or products."""
    n, size = 64, (6, 5, 3, 4, 5, 2)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, t = make_xs((n,), size[:2], torch.float32, device)
    params = variant.params(size, torch.float32, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusionops.backend(kernel_backend):
        y = variant(x, t, *params, factor=size[2], normalize=True)
    y.sum().backward()
    allowed = {tuple(v.shape) for v in (x, t, *params[:5])}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


def test_repeated_calls_are_identical(variant, kernel_backend, device):
    """Same inputs, same bits: no read of memory the kernel did not write, no race."""
    x, t = make_xs((9,), SIZES[0][:2], torch.float32, device)
    params = variant.params(SIZES[0], torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = variant(x, t, *params, factor=SIZES[0][2], normalize=True)
        y2 = variant(x, t, *params, factor=SIZES[0][2], normalize=True)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("wants", ["inputs", "weights", "biases", "out"])
def test_partial_gradients(variant, kernel_backend, device, wants):
    """Only what requires grad gets one, and it still matches the reference."""
    k = SIZES[0][2]
    x, t = (v.detach() for v in make_xs((5,), SIZES[0][:2], torch.float64, device))
    params = [p.detach() for p in variant.params(SIZES[0], torch.float64, device)]
    chosen = {"inputs": [x, t], "weights": [params[0], params[2]], "biases": [params[1], params[3]],
              "out": [params[4], params[5]]}[wants]  # fmt: skip
    for v in chosen:
        v.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = variant(x, t, *params, factor=k)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, chosen, g)
    expected = torch.autograd.grad(variant.reference(x, t, *params, k), chosen, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, wants)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_stays_in_its_row(variant, kernel_backend, device, value):
    """A NaN or inf in one row of x gives that row's output and input gradient what the
    reference gives (MFH: the chain carries it from block to block) and leaves every other row
    exact: rows never mix."""
    k = SIZES[0][2]
    x, t = (v.detach() for v in make_xs((6,), SIZES[0][:2], torch.float64, device))
    x[2, 1] = value
    x.requires_grad_(True)
    params = [p.detach() for p in variant.params(SIZES[0], torch.float64, device)]
    with fusionops.backend(kernel_backend):
        y = variant(x, t, *params, factor=k)
    expected = variant.reference(x, t, *params, k, "relu", False)
    assert not torch.isfinite(expected[2]).all(), "the test lost its non-finite row"
    keep = [0, 1, 3, 4, 5]
    assert_close_to(y[keep], expected[keep], torch.float64, "rows without a non-finite input")
    torch.testing.assert_close(y[2], expected[2], equal_nan=True, rtol=1e-12, atol=1e-12)
    g = make_grad(tuple(y.shape), torch.float64, device)
    (dx_got,) = torch.autograd.grad(y, [x], g)
    (dx_ref,) = torch.autograd.grad(expected, [x], g)
    assert_close_to(dx_got[keep], dx_ref[keep], torch.float64, "dx of rows without a non-finite input")
    torch.testing.assert_close(dx_got[2], dx_ref[2], equal_nan=True, rtol=1e-12, atol=1e-12)


def test_mfh_bad_arguments():
    """MFH's own argument errors (MFB's are in tests/test_bilinear_layers.py)."""
    x, t = make_xs((4,), SIZES[0][:2], torch.float32, "cpu")
    uw, ub, vw, vb, ow, ob = MFH.params(SIZES[0])
    k = SIZES[0][2]
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


# The op's dropouts: each alone, then all at once (MFB: input, product (pre_norm), z (MLB's
# pre_lin); MFH: input, product (its pre_lin)).
DROPOUTS = {
    "mfb": [{"dropout_input": 0.3}, {"dropout_pre_norm": 0.4}, {"dropout_pre_lin": 0.25},
            {"dropout_input": 0.2, "dropout_pre_norm": 0.3, "dropout_pre_lin": 0.5}],
    "mfh": [{"dropout_input": 0.3}, {"dropout_pre_lin": 0.4}, {"dropout_input": 0.2, "dropout_pre_lin": 0.5}],
}  # fmt: skip


DROPOUT_CASES = [(v, i) for v in (MFB, MFH) for i in range(len(DROPOUTS[v.op]))]


# The interpreter runs every op's all-dropouts case.
@pytest.mark.interpreter_subset(
    keep=lambda case, activation, **_: case[1] == len(DROPOUTS[case[0].op]) - 1 and activation == "relu"
)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"{c[0].op}-{c[1]}")
def test_dropout_matches_reference(kernel_backend, device, case, activation):
    """Inverted, hashed dropout inside the kernels: the reference's masks for the same seed,
    forward and every gradient (a dropped element passes no gradient)."""
    variant, which = case
    drops = DROPOUTS[variant.op][which]
    size = SIZES[0]
    x, t = make_xs((13,), size[:2], torch.float64, device)
    params = variant.params(size, torch.float64, device)
    # Not normalised: a degenerate draw (a block whose pooled z has one non-zero) makes the
    # normalisation's gradient 0 analytically, rounding noise in the reference (test_matches_
    # reference covers the normalisation).
    kwargs = {"factor": size[2], "activation": activation, "seed": 1234 + which, **drops}
    check_against_reference(
        variant.op, kernel_backend, x, t, params, kwargs, torch.float64, ref_kwargs={"training": True}
    )


def test_dropout_over_tiles_and_threads(variant, kernel_backend, device, monkeypatch):
    """Masks follow the global row across tiles (and the cpu backward's rounds of threads)."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n, size = 37, (6, 5, 3, 4, 5, 2)
    else:
        n, size = 700, (6, 5, 4, 256, 5, 2)
    drops = DROPOUTS[variant.op][-1]
    x, t = make_xs((n,), size[:2], torch.float64, device)
    params = variant.params(size, torch.float64, device)
    kwargs = {"factor": size[2], "seed": 99, **drops}
    check_against_reference(
        variant.op, kernel_backend, x, t, params, kwargs, torch.float64, ref_kwargs={"training": True}
    )


def test_dropout_seed(variant, kernel_backend, device):
    """The same seed gives the same bits, another seed other masks; no seed draws one from
    torch's generator (torch.manual_seed reproduces it)."""
    x, t = make_xs((9,), SIZES[0][:2], torch.float32, device)
    params = variant.params(SIZES[0], torch.float32, device)
    kw = {"factor": SIZES[0][2], **DROPOUTS[variant.op][-1]}
    with fusionops.backend(kernel_backend):
        y1, y2 = (variant(x, t, *params, seed=5, **kw) for _ in range(2))
        y3 = variant(x, t, *params, seed=6, **kw)
        torch.manual_seed(0)
        y4 = variant(x, t, *params, **kw)
        torch.manual_seed(0)
        y5 = variant(x, t, *params, **kw)
    assert torch.equal(y1, y2) and torch.equal(y4, y5)
    assert not torch.allclose(y1, y3)


def test_dropout_drops_nonfinite(variant, kernel_backend, device):
    """A dropped element is 0 whatever it held (selected, never multiplied by 0): with an inf in
    x, the output and gradients are the reference's, NaN and inf where it has them."""
    x, t = (v.detach() for v in make_xs((8,), SIZES[0][:2], torch.float64, device))
    x[3, 0] = float("inf")
    x.requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in variant.params(SIZES[0], torch.float64, device)]
    kw = {"factor": SIZES[0][2], "seed": 7, **DROPOUTS[variant.op][-1]}
    with fusionops.backend(kernel_backend):
        y = variant(x, t, *params, **kw)
    expected = variant.reference(x, t, *params, training=True, **kw)
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-12, atol=1e-12)
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, [x, params[0]], g)
    want = torch.autograd.grad(expected, [x, params[0]], g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_dropout_opcheck(variant, kernel_backend, device):
    k = SIZES[0][2]
    x, t = (v.detach().requires_grad_(True) for v in make_xs((5,), SIZES[0][:2], torch.float32, device))
    params = [p.detach().requires_grad_(True) for p in variant.params(SIZES[0], torch.float32, device)]
    probs = list(DROPOUTS[variant.op][-1].values())
    fwd = getattr(torch.ops.fusionops, variant.op)
    torch.library.opcheck(fwd, (x, t, *params, k, "relu", True, kernel_backend, *probs, 21))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dropout_input": 1.0}, ValueError, r"dropout_input must be in \[0, 1\), got 1.0"),
        ({"dropout_pre_lin": -0.1}, ValueError, r"dropout_pre_lin must be in \[0, 1\)"),
        ({"dropout_input": True}, TypeError, "dropout_input must be a float"),
        ({"dropout_input": 0.1, "seed": 2**31}, ValueError, r"seed must be in \[0, 2\*\*31\)"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_dropout_bad_arguments(variant, kwargs, error, match):
    x, t = make_xs((4,), SIZES[0][:2], torch.float32, "cpu")
    with pytest.raises(error, match=match):
        variant(x, t, *variant.params(SIZES[0]), factor=SIZES[0][2], **kwargs)
