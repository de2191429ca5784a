"""Dropout on Z in tensor fusion (issue 18, item 5): every fused backend against the reference
"materialise Z, apply the same mask, Linear" (float64), the mask's statistics, eval mode and
p = 0 exact, seeds, bad arguments, and the TensorFusion layer's ``dropout``."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import TOL, assert_close_to, skip_unless_usable
from inputs import LAYOUTS, detached64, make_grad, make_mask, make_weight, make_xs, saved_shapes

import fusionops
from fusionops import BackendUnavailableError, reference
from fusionops.reference.tensor_fusion import dropout_keep, dropout_mask, dropout_threshold, fmix32

# the op's module (fusionops.ops re-exports its function under the same name)
tf_op = importlib.import_module("fusionops.ops.tensor_fusion")

P = 0.4
SEED = 12345
# Small shapes for every backend (the Triton interpreter is slow); odd widths beside round ones.
DIMS = [(5,), (3, 4), (2, 5, 3), (16, 15), (2, 1, 3, 1, 2)]


def check_against_reference(
    backend, xs, w, b, mask, dtype, p=P, seed=SEED, grad_layout="contiguous", what=""
) -> torch.Tensor:
    """Forward and every gradient of ``backend`` with dropout against the float64 reference
    with the same mask."""
    with fusionops.backend(backend):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask, dropout=p, seed=seed)
    xr = detached64(xs)
    wr, br = detached64([w, b])
    yr = reference.tensor_fusion(xr, wr, br, mask, p, seed)
    assert y.dtype == dtype
    assert_close_to(y, yr, dtype, f"{what} forward")
    if y.numel() == 0:
        return y
    g = make_grad(tuple(y.shape), dtype, y.device, grad_layout)
    y.backward(g)
    yr.backward(g.to(torch.float64))
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, dtype, f"{what} grad of xs[{m}]")
    assert_close_to(w.grad, wr.grad, dtype, f"{what} grad of weight")
    if b is not None:
        assert_close_to(b.grad, br.grad, dtype, f"{what} grad of bias")
    return y


# --- against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_matches_reference(kernel_backend, device, dims, masked, dtype):
    n = 7
    xs = make_xs((n,), dims, dtype, device)
    w, b = make_weight(dims, 5, dtype, device)
    mask = make_mask((n,), len(dims), device) if masked else None
    check_against_reference(kernel_backend, xs, w, b, mask, dtype)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_probabilities(kernel_backend, device, p):
    dims = (3, 4)
    xs = make_xs((6,), dims, torch.float64, device)
    w, _ = make_weight(dims, 3, torch.float64, device)
    check_against_reference(kernel_backend, xs, w, None, None, torch.float64, p=p)


@pytest.mark.parametrize(
    ("dims", "n", "o"),
    [((20, 20, 20), 37, 3), ((70, 70), 300, 4), ((30, 30, 30), 260, 5), ((9,), 30000, 3), ((5000,), 120, 2)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_tiles_and_blocks(device, dims, n, o, dtype):
    """The C++ kernel's other paths, which every dropout call must mask alike: head/tail tiles
    of whole groups (20^3, 70^2) or of part of one (30^3 with 256-row blocks; K > 4096: without
    dropout the first would take the direct path, which has no Z tile to mask), several row
    blocks of the split (70^2: 2 forward, 5 dx) and of the whole-row path (9: 30000 rows; a
    lone wide modality, 5000: 3 blocks)."""
    skip_unless_usable("cpu", device)
    xs = make_xs((n,), dims, dtype, device)
    w, b = make_weight(dims, o, dtype, device)
    mask = make_mask((n,), len(dims), device)
    check_against_reference("cpu", xs, w, b, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(kernel_backend, device, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    dims = (3, 4, 2)
    xs = make_xs((11,), dims, dtype, device)
    w, b = make_weight(dims, 5, dtype, device)
    check_against_reference(kernel_backend, xs, w, b, None, dtype)


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides(kernel_backend, device, layout, grad_layout):
    """Strided, transposed and stride-0 inputs (the mask still differs per row), a transposed
    weight, non-contiguous and stride-0 upstream gradients."""
    dims = (3, 2, 4)
    xs = make_xs((6,), dims, torch.float32, device, layout=layout)
    w, b = make_weight(dims, 6, torch.float32, device, transposed=True)
    check_against_reference(kernel_backend, xs, w, b, None, torch.float32, grad_layout=grad_layout)


def test_leading_shape_rows_are_flattened(kernel_backend, device):
    """The mask's row is the flattened row index: a (2, 3) call is the (6,) call."""
    dims = (3, 2)
    xs = make_xs((2, 3), dims, torch.float64, device)
    w, b = make_weight(dims, 4, torch.float64, device)
    y = check_against_reference(kernel_backend, xs, w, b, None, torch.float64)
    flat = [x.detach().reshape(6, x.shape[-1]) for x in xs]
    with fusionops.backend(kernel_backend):
        y_flat = fusionops.tensor_fusion(flat, w.detach(), b.detach(), dropout=P, seed=SEED)
    assert torch.equal(y.detach().reshape(6, 4), y_flat)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    dims = (3, 4)
    xs = make_xs(lead, dims, torch.float32, device)
    w, b = make_weight(dims, 5, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b, dropout=P, seed=SEED)
    assert y.shape == (*lead, 5)
    y.sum().backward()
    for x in xs:
        assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_masked_modality_values_are_ignored(kernel_backend, device):
    """NaN in a missing modality stays out under dropout too, and its gradient is 0."""
    dims, n = (3, 2, 4), 9
    mask = make_mask((n,), len(dims), device)
    xs = make_xs((n,), dims, torch.float64, device)
    with torch.no_grad():
        for m, x in enumerate(xs):
            x[~mask[:, m]] = float("nan")
    w, b = make_weight(dims, 3, torch.float64, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask, dropout=P, seed=SEED)
    zeroed = [torch.where(mask[:, m, None], x.detach(), 0.0) for m, x in enumerate(xs)]
    assert_close_to(y, reference.tensor_fusion(zeroed, w, b, None, P, SEED), torch.float64, "forward")
    y.backward(make_grad(tuple(y.shape), torch.float64, device))
    for m, x in enumerate(xs):
        assert not torch.isnan(x.grad).any()
        assert torch.equal(x.grad[~mask[:, m]], torch.zeros_like(x.grad[~mask[:, m]]))


def test_kernel_mask_is_the_reference_mask_bit_for_bit(kernel_backend, device):
    """With W = I the projected op returns Z under its mask, so the kernel's own mask shows:
    exactly the reference's (zero where dropped, Z / (1 - p) where kept)."""
    dims, n = (3, 4), 13
    k = 20
    xs = [x.detach() for x in make_xs((n,), dims, torch.float64, device)]
    eye = torch.eye(k, dtype=torch.float64, device=device)
    with fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, eye, dropout=P, seed=SEED)
    z = reference.tensor_fusion_features(xs)
    keep = dropout_mask(SEED, n, k, P, device)
    assert torch.equal(y != 0, keep & (z != 0))
    assert_close_to(y, torch.where(keep, z / (1 - P), 0.0), torch.float64, "Z under the mask")


# --- the mask ----------------------------------------------------------------------------------


def test_mask_constants_and_fmix32():
    """fmix32 on int64 tensors is murmur3's finaliser (known values), with no overflow at the
    top of the uint32 range."""
    values = [0, 1, 2**31 - 1, 2**31, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF]
    h = torch.tensor(values, dtype=torch.int64)
    assert fmix32(h).tolist() == [_fmix32_python(v) for v in values]
    assert _fmix32_python(1) == 0x514E28B7  # murmur3's published fmix32(1)
    assert dropout_threshold(0.5) == 2**23 and dropout_threshold(0.0) == 0


def _fmix32_python(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_statistics(p):
    """Keep rate within 5 binomial standard deviations of 1 - p over 2^20 draws; per-row and
    per-feature rates likewise; neighbouring features and rows, and two seeds, uncorrelated
    (|r| < 5 / sqrt(n))."""
    n, k = 256, 4096
    keep = dropout_mask(SEED, n, k, p).to(torch.float64)
    total = n * k
    sd = math.sqrt(p * (1 - p) / total)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    row_sd, col_sd = math.sqrt(p * (1 - p) / k), math.sqrt(p * (1 - p) / n)
    assert (keep.mean(1) - (1 - p)).abs().max().item() < 6 * row_sd
    assert (keep.mean(0) - (1 - p)).abs().max().item() < 6 * col_sd

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    bound = 5 / math.sqrt(total)
    assert abs(corr(keep[:, 1:], keep[:, :-1])) < bound, "neighbouring features"
    assert abs(corr(keep[1:], keep[:-1])) < bound, "neighbouring rows"
    other = dropout_mask(SEED + 1, n, k, p).to(torch.float64)
    assert abs(corr(keep, other)) < bound, "seeds SEED and SEED + 1"
    assert abs(corr(keep[:, 0], keep[:, 1])) < 5 / math.sqrt(n), "features 0 and 1 across rows"


def test_mask_rows_and_features_are_not_shifted_copies():
    """A row's mask is not another row's, nor a shift of it (a linear key would give that)."""
    keep = dropout_mask(7, 64, 512, 0.5)
    for shift in range(1, 4):
        assert (keep[:, shift:] != keep[:, :-shift]).any()
        assert (keep[shift:] != keep[:-shift]).any()
    assert len({tuple(r.tolist()) for r in keep}) == 64


def test_mask_is_elementwise():
    """dropout_keep at scattered (row, feature) pairs equals the full mask there: the mask of
    a tile depends only on its global indices."""
    full = dropout_mask(SEED, 50, 70, P)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(50, (200,), generator=gen)
    cols = torch.randint(70, (200,), generator=gen)
    assert torch.equal(dropout_keep(SEED, rows, cols, P), full[rows, cols])


# --- exactness, seeds ----------------------------------------------------------------------------


def test_p_zero_is_exactly_no_dropout(kernel_backend, device):
    dims = (3, 2, 4)
    xs = make_xs((7,), dims, torch.float32, device)
    w, b = make_weight(dims, 5, torch.float32, device)
    g = make_grad((7, 5), torch.float32, device)
    outs = []
    for kwargs in ({}, {"dropout": 0.0, "seed": 99}, {"dropout": 0}):
        with fusionops.backend(kernel_backend):
            y = fusionops.tensor_fusion(xs, w, b, **kwargs)
        outs.append((y.detach(), *torch.autograd.grad(y, [*xs, w, b], g)))
    for other in outs[1:]:
        for a, e in zip(other, outs[0], strict=True):
            assert torch.equal(a, e)


def test_seeds(kernel_backend, device):
    """The same seed gives the same bits; another seed another mask."""
    dims = (3, 4)
    xs = [x.detach() for x in make_xs((8,), dims, torch.float32, device)]
    w, b = (t.detach() for t in make_weight(dims, 5, torch.float32, device))
    with fusionops.backend(kernel_backend):
        y1 = fusionops.tensor_fusion(xs, w, b, dropout=P, seed=3)
        y2 = fusionops.tensor_fusion(xs, w, b, dropout=P, seed=3)
        y3 = fusionops.tensor_fusion(xs, w, b, dropout=P, seed=4)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)


def test_seed_none_draws_from_the_cpu_generator():
    dims = (3, 4)
    xs = [x.detach() for x in make_xs((8,), dims, torch.float64)]
    w, b = (t.detach() for t in make_weight(dims, 5, torch.float64))
    torch.manual_seed(0)
    y1 = fusionops.tensor_fusion(xs, w, b, dropout=P)
    y2 = fusionops.tensor_fusion(xs, w, b, dropout=P)
    torch.manual_seed(0)
    assert torch.equal(fusionops.tensor_fusion(xs, w, b, dropout=P), y1)
    assert not torch.equal(y1, y2)
    torch.manual_seed(0)
    seed = int(torch.randint(2**31, (), dtype=torch.int64))
    assert_close_to(y1, reference.tensor_fusion(xs, w, b, None, P, seed), torch.float64, "drawn seed")


def test_features_form_is_a_dropout_of_z(kernel_backend, device):
    """Without weight the op returns Z (materialised by definition), under the same mask."""
    dims = (3, 4)
    xs = make_xs((5,), dims, torch.float64, device)
    with fusionops.backend(kernel_backend):
        z = fusionops.tensor_fusion(xs, dropout=P, seed=SEED)
    xr = detached64(xs)
    zr = reference.tensor_fusion(xr, None, None, None, P, SEED)
    assert_close_to(z, zr, torch.float64, "features")
    g = make_grad(tuple(z.shape), torch.float64, device)
    z.backward(g)
    zr.backward(g)
    for x, x64 in zip(xs, xr, strict=True):
        assert_close_to(x.grad, x64.grad, torch.float64, "features grad")


# --- autograd machinery ----------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(kernel_backend, device, masked):
    dims = (2, 3, 1)
    xs = [x.detach().requires_grad_(True) for x in make_xs((4,), dims, torch.float64, device)]
    w, b = (t.detach().requires_grad_(True) for t in make_weight(dims, 3, torch.float64, device))
    mask = make_mask((4,), len(dims), device) if masked else None

    def f(*args):
        with fusionops.backend(kernel_backend):
            return fusionops.tensor_fusion(
                list(args[:3]), args[3], args[4], mask=mask, dropout=0.5, seed=SEED
            )

    assert torch.autograd.gradcheck(f, (*xs, w, b))
    assert torch.autograd.gradgradcheck(f, (*xs, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(kernel_backend, device, dtype):
    dims = (2, 3, 4)
    xs = [x.detach().requires_grad_(True) for x in make_xs((5,), dims, dtype, device)]
    w, b = make_weight(dims, 4, dtype, device)
    mask = make_mask((5,), len(dims), device)
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, b, mask, kernel_backend, P, SEED))
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, None, None, kernel_backend, 0.7, 1))
    # seed 0 is the schema's default, which the dispatcher drops from the recorded call
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, b, None, kernel_backend, P, 0))
    plain = [x.detach() for x in xs]
    gy = make_grad((5, 4), dtype, device)
    for needs in [(True, True, True), (True, False, False), (False, True, False)]:
        torch.library.opcheck(
            ops.tensor_fusion_projected_backward,
            (gy, plain, w.detach(), mask, *needs, kernel_backend, P, SEED),
        )


def test_registered_op_matches_reference(kernel_backend, device):
    """``torch.ops.fusionops.tensor_fusion_projected`` (what compiled graphs hold) with dropout,
    and its gradient through the custom op's autograd."""
    dims = (3, 2)
    xs = make_xs((6,), dims, torch.float64, device)
    w, b = make_weight(dims, 3, torch.float64, device)
    y = torch.ops.fusionops.tensor_fusion_projected(xs, w, b, None, kernel_backend, P, SEED)
    xr, (wr, br) = detached64(xs), detached64([w, b])
    yr = reference.tensor_fusion(xr, wr, br, None, P, SEED)
    assert_close_to(y, yr, torch.float64, "forward")
    g = make_grad(tuple(y.shape), torch.float64, device)
    y.backward(g)
    yr.backward(g)
    for t, r in zip([*xs, w, b], [*xr, wr, br], strict=True):
        assert_close_to(t.grad, r.grad, torch.float64, "grad")


def test_saves_no_feature_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs, never Z, the mask or any (N, K) tensor."""
    dims, n = (6, 5, 4), 32
    k = math.prod(d + 1 for d in dims)
    xs = make_xs((n,), dims, torch.float32, device)
    w, b = make_weight(dims, 3, torch.float32, device)
    with saved_shapes() as saved, fusionops.backend(kernel_backend):
        y = fusionops.tensor_fusion(xs, w, b, dropout=P, seed=SEED)
    y.sum().backward()
    assert saved, "nothing was saved: the hook did not see the op"
    assert all(math.prod(s) < n * k for s in saved if s != tuple(w.shape)), saved


def test_compile(kernel_backend, device):
    """torch.compile of a call with dropout gives the eager result."""
    if kernel_backend == "triton":
        pytest.skip("compiling the Triton interpreter's call is slow; opcheck covers the op")
    dims = (3, 4)
    xs = [x.detach() for x in make_xs((5,), dims, torch.float32, device)]
    w, b = (t.detach() for t in make_weight(dims, 3, torch.float32, device))

    def f(xs, w, b):
        return fusionops.tensor_fusion(xs, w, b, dropout=P, seed=SEED)

    with fusionops.backend(kernel_backend):
        expected = f(xs, w, b)
        got = torch.compile(f, fullgraph=True)(xs, w, b)
    assert torch.equal(got, expected)


# --- bad arguments -----------------------------------------------------------------------------------


BAD_DROPOUT = [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True, torch.tensor(0.5), None]


@pytest.mark.parametrize("bad", BAD_DROPOUT, ids=repr)
def test_bad_dropout_is_refused(bad):
    xs = make_xs((4,), (2, 3), torch.float32)
    w, b = make_weight((2, 3), 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match="dropout"):
        fusionops.tensor_fusion(xs, w, b, dropout=bad, seed=1)
    with pytest.raises((ValueError, TypeError), match="dropout"):
        fusionops.TensorFusion([2, 3], 3, dropout=bad)


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, "3", True], ids=repr)
def test_bad_seed_is_refused(bad):
    xs = make_xs((4,), (2, 3), torch.float32)
    w, b = make_weight((2, 3), 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match="seed"):
        fusionops.tensor_fusion(xs, w, b, dropout=P, seed=bad)


def test_registered_ops_refuse_bad_dropout(kernel_backend, device):
    xs = [x.detach() for x in make_xs((4,), (2, 3), torch.float32, device)]
    w, b = (t.detach() for t in make_weight((2, 3), 3, torch.float32, device))
    ops = torch.ops.fusionops
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        ops.tensor_fusion_projected(xs, w, b, None, kernel_backend, 1.0, 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*31\), got -3"):
        ops.tensor_fusion_projected(xs, w, b, None, kernel_backend, P, -3)
    g = make_grad((4, 3), torch.float32, device)
    with pytest.raises(ValueError, match="dropout"):
        ops.tensor_fusion_projected_backward(g, xs, w, None, True, True, True, kernel_backend, -0.5, 0)


def test_cpu_kernel_refuses_bad_dropout():
    """The C++ kernels check what they take (the op layer checks first)."""
    skip_unless_usable("cpu", "cpu")
    xs = [x.detach() for x in make_xs((4,), (2, 3), torch.float32)]
    w, b = (t.detach() for t in make_weight((2, 3), 3, torch.float32))
    with pytest.raises(RuntimeError, match=r"dropout must be in \[0, 1\), got 1"):
        torch.ops.fusionops._tf_projected_fwd(xs, w, b, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="seed must be in"):
        torch.ops.fusionops._tf_projected_bwd(
            make_grad((4, 3), torch.float32, "cpu"), xs, w, None, True, True, True, 0.5, -1
        )


def test_cuda_backend_never_serves_dropout(monkeypatch):
    """The CUDA C++ kernels have no dropout: chosen automatically, the call goes to triton (or
    the reference); forced, it is refused with the reason."""
    x0 = torch.empty(2, 3)
    monkeypatch.setattr(tf_op._backend, "choose", lambda *args: "cuda")
    monkeypatch.setattr(tf_op._backend, "reasons", lambda *args: [])
    assert tf_op._choose(x0, 2, 24, True, 0.0) == "cuda"
    assert tf_op._choose(x0, 2, 24, True, P) == "triton"
    monkeypatch.setattr(tf_op._backend, "reasons", lambda *args: ["no triton here"])
    assert tf_op._choose(x0, 2, 24, True, P) == "reference"
    monkeypatch.setattr(tf_op._backend, "forced_backend", lambda: "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA C.. kernels have no dropout"):
        tf_op._choose(x0, 2, 24, True, P)


# --- the layer -------------------------------------------------------------------------------------


def _layer_pair(p: float, device="cpu"):
    torch.manual_seed(0)
    with_drop = fusionops.TensorFusion([3, 4, 2], 6, dropout=p, device=device, dtype=torch.float64)
    plain = fusionops.TensorFusion([3, 4, 2], 6, device=device, dtype=torch.float64)
    plain.load_state_dict(with_drop.state_dict())
    return with_drop, plain


def test_layer_eval_is_exact():
    """eval(): bitwise the layer without dropout, forward and gradients."""
    layer, plain = _layer_pair(0.5)
    layer.eval()
    xs = make_xs((9,), (3, 4, 2), torch.float64)
    g = make_grad((9, 6), torch.float64, "cpu")
    y, y0 = layer(xs), plain(xs)
    assert torch.equal(y, y0)
    grads = torch.autograd.grad(y, [*xs, *layer.parameters()], g)
    grads0 = torch.autograd.grad(y0, [*xs, *plain.parameters()], g)
    for a, e in zip(grads, grads0, strict=True):
        assert torch.equal(a, e)


def test_layer_train_matches_reference_and_is_reproducible():
    """train(): the reference with the seed the layer drew (torch's CPU generator), so a fixed
    torch.manual_seed reproduces it; each call draws a new mask."""
    layer, _ = _layer_pair(0.5)
    layer.train()
    xs = [x.detach() for x in make_xs((9,), (3, 4, 2), torch.float64)]
    torch.manual_seed(1)
    y1, y2 = layer(xs), layer(xs)
    torch.manual_seed(1)
    assert torch.equal(layer(xs), y1)
    assert not torch.equal(y1, y2)
    torch.manual_seed(1)
    seed = int(torch.randint(2**31, (), dtype=torch.int64))
    expected = reference.tensor_fusion(xs, layer.weight, layer.bias, None, 0.5, seed)
    assert_close_to(y1, expected, torch.float64, "layer in training")


def test_layer_compiled_draws_the_eager_seeds():
    """torch.compile of the layer in training: the seed is drawn eagerly (outside the graph),
    so the compiled layer gives the eager outputs after the same torch.manual_seed."""
    layer, _ = _layer_pair(0.5)
    xs = [x.detach() for x in make_xs((5,), (3, 4, 2), torch.float64)]
    compiled = torch.compile(layer)
    torch.manual_seed(3)
    got = [compiled(xs) for _ in range(3)]
    torch.manual_seed(3)
    expected = [layer(xs) for _ in range(3)]
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)
    assert not torch.equal(got[0], got[1])


def test_layer_matches_features_dropout_linear_in_distribution():
    """Dropout then Linear has the mean of the plain layer: over many seeds, the mean output
    with dropout converges to the output without (inverted dropout's 1/(1-p) scaling)."""
    layer, plain = _layer_pair(0.5)
    xs = [x.detach() for x in make_xs((4,), (3, 4, 2), torch.float64)]
    torch.manual_seed(2)
    with torch.no_grad():
        runs = torch.stack([layer(xs) for _ in range(400)])
        y0 = plain(xs)
    mean, sd = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
    assert ((mean - y0).abs() < 5 * sd + 1e-12).all()


def test_layer_arguments():
    assert fusionops.TensorFusion([2, 3], 4).dropout == 0.0
    assert "dropout=0.3" in repr(fusionops.TensorFusion([2, 3], 4, dropout=0.3))
    with pytest.raises(ValueError, match="dropout"):
        fusionops.TensorFusion(dropout=0.5)  # the features layer returns Z: nn.Dropout it
    linear = torch.nn.Linear(12, 4)
    assert fusionops.TensorFusion.from_linear([2, 3], linear, dropout=0.2).dropout == 0.2


def test_tolerances_are_from_the_dtype():
    assert TOL[torch.bfloat16] == 4 * torch.finfo(torch.bfloat16).eps


def test_drawn_seed_under_fake_tensors():
    """A call whose seed is left to draw traces on fake tensors (FakeTensorMode: shape
    propagation, fake CUDA tensors): the seed is drawn for real, from the CPU generator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dims = (3, 4)
    with FakeTensorMode():
        xs = [torch.randn(5, d) for d in dims]
        w, b = torch.randn(2, math.prod(d + 1 for d in dims)), torch.randn(2)
        y = fusionops.tensor_fusion(xs, w, b, dropout=0.3)
    assert y.shape == (5, 2)
