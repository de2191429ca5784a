"""Every fused BLOCK/MUTAN backend against fusionops.reference (float64)."""

from __future__ import annotations

import pytest
import torch
from bilinear_inputs import PARAM_LAYOUTS, check_against_reference, make_block_params
from conftest import assert_close_to, skip_unless_usable
from inputs import LAYOUTS, make_grad, make_xs

import fusionops
from fusionops import reference

# (C, R, s, O): C = 1 is MUTAN; odd beside round.
SIZES = [(3, 2, 4, 5), (1, 3, 5, 2), (4, 1, 3, 7), (2, 5, 8, 1)]
NORMALIZE = ["before_cat", "after_cat", "none"]


def run(backend, n, size, dtype=torch.float32, normalize="before_cat", layout="contiguous",
        param_layout="contiguous", grad_layout="contiguous", bias=True, device="cpu"):  # fmt: skip
    chunks, rank, s, out = size
    x, t = make_xs((n,), (chunks * s, chunks * s), dtype, device, layout)
    params = make_block_params(chunks, rank, s, out, dtype, device, param_layout)
    if not bias:
        params[1] = params[3] = params[5] = None
    kwargs = {"rank": rank, "normalize": normalize}
    conditioned = normalize != "none"
    return check_against_reference(
        "block_fusion", backend, x, t, params, kwargs, dtype, grad_layout, conditioned
    )


@pytest.mark.interpreter_subset(keep=lambda size, dtype, **_: size in SIZES[:2] and dtype == torch.float32)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_reference(kernel_backend, device, size, dtype, normalize):
    run(kernel_backend, 7, size, dtype, normalize, device=device)


def test_many_tiles_without_bias(kernel_backend, device, monkeypatch):
    """More rows than one tile (an odd count); no biases."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n, size = 97, (3, 2, 4, 5)
    else:
        n, size = 1025, (4, 16, 16, 5)  # 1 MB / (256 · 4 B) = 1024, at most 256 rows a tile: five
    run(kernel_backend, n, size, bias=False, device=device)


@pytest.fixture
def threads():
    """Sets torch's thread count for a test (the cpu kernels choose their tiles and their
    backward's split from it) and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (C, R, s, normalize): the cpu backward goes by chunks when C >= threads and the chunks are
# normalised apart (or not at all), by rows otherwise (after_cat; fewer chunks than threads).
# R·s = 512 in float64: 256 rows a tile (1 MB / (512 · 8 B)), so 1100 rows are five, several per
# thread at 1 to 3 threads.
CPU_SPLITS = [(4, 16, 32, "before_cat"), (4, 16, 32, "none"), (4, 16, 32, "after_cat"), (2, 32, 16, "none")]


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("split", CPU_SPLITS, ids=str)
def test_cpu_thread_counts(threads, nthreads, split):
    """Both cpu backward paths (by chunks, by rows in rounds) at 1 to 3 threads, several tiles."""
    skip_unless_usable("cpu", "cpu")
    chunks, rank, s, normalize = split
    threads(nthreads)
    run("cpu", 1100, (chunks, rank, s, 3), torch.float64, normalize, bias=nthreads != 2)


def test_cpu_by_chunk_same_bits_at_any_thread_count(threads):
    """By chunks, each chunk's weight gradients are summed by one thread over tiles that do not
    depend on the thread count: the same bits at 1, 2 and 3 threads (forward too)."""
    skip_unless_usable("cpu", "cpu")
    chunks, rank, s, out = 4, 16, 32, 3
    results = []
    for nthreads in (1, 2, 3):
        threads(nthreads)
        x, t = make_xs((1100,), (chunks * s,) * 2, torch.float32, "cpu")
        params = make_block_params(chunks, rank, s, out, torch.float32, "cpu")
        with fusionops.backend("cpu"):
            y = fusionops.block_fusion(x, t, *params, rank=rank)
        y.backward(make_grad(tuple(y.shape), torch.float32, "cpu"))
        results.append([y.detach(), x.grad, t.grad, *(p.grad for p in params)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("lead", [(2, 3), (), (1,)], ids=str)
def test_leading_shapes(kernel_backend, device, lead):
    chunks, rank, s, out = SIZES[0]
    x, t = make_xs(lead, (chunks * s, chunks * s), torch.float64, device)
    params = make_block_params(chunks, rank, s, out, torch.float64, device)
    kwargs = {"rank": rank, "normalize": "none"}
    y = check_against_reference("block_fusion", kernel_backend, x, t, params, kwargs, torch.float64)
    assert y.shape == (*lead, out)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_empty_batch(kernel_backend, device, lead):
    chunks, rank, s, out = SIZES[0]
    x, t = make_xs(lead, (chunks * s, chunks * s), torch.float32, device)
    params = make_block_params(chunks, rank, s, out, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y = fusionops.block_fusion(x, t, *params, rank=rank)
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
        device=device)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precisions(kernel_backend, device, dtype):
    skip_unless_usable(kernel_backend, device, dtype)
    run(kernel_backend, 11, SIZES[0], dtype, "none", device=device)
    run(kernel_backend, 11, SIZES[1], dtype, "after_cat", device=device)


@pytest.mark.interpreter_subset(keep=lambda bias, **_: bias)
@pytest.mark.parametrize(("normalize", "bias"), [("before_cat", True), ("after_cat", False)])
def test_gradcheck(kernel_backend, device, normalize, bias):
    chunks, rank, s, out = 2, 2, 2, 2
    n = 2 if kernel_backend == "triton" else 3
    x, t = (v.detach().requires_grad_(True) for v in make_xs((n,), (chunks * s,) * 2, torch.float64, device))
    params = [
        p.detach().requires_grad_(True)
        for p in make_block_params(chunks, rank, s, out, torch.float64, device)
    ]
    if not bias:
        params[1] = params[3] = params[5] = None
    live = [p for p in params if p is not None]

    def f(x, t, *ps):
        it = iter(ps)
        full = [next(it) if p is not None else None for p in params]
        with fusionops.backend(kernel_backend):
            return fusionops.block_fusion(x, t, *full, rank=rank, normalize=normalize)

    assert torch.autograd.gradcheck(f, (x, t, *live))


def test_opcheck(kernel_backend, device):
    chunks, rank, s, out = SIZES[0]
    dtype = torch.float32
    x, t = (v.detach().requires_grad_(True) for v in make_xs((5,), (chunks * s,) * 2, dtype, device))
    params = [p.detach().requires_grad_(True) for p in make_block_params(chunks, rank, s, out, dtype, device)]
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.block_fusion, (x, t, *params, rank, "before_cat", kernel_backend))
    no_bias = [params[0], None, params[2], None, params[4], None]
    torch.library.opcheck(ops.block_fusion, (x, t, *no_bias, rank, "after_cat", kernel_backend))
    plain = [p.detach() for p in params[:5]]
    gy = make_grad((5, out), dtype, device)
    for needs in ([True] * 8, [False, True, True, False, False, True, True, False]):
        torch.library.opcheck(
            ops.block_fusion_backward,
            (gy, x.detach(), t.detach(), *plain, rank, "none", needs, kernel_backend),
        )


def test_saves_no_projection_sized_tensor(kernel_backend, device):
    """Autograd keeps the inputs and parameters, never the chunks' (N, R·s) projections."""
    n, (chunks, rank, s, out) = 64, SIZES[0]
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, t = make_xs((n,), (chunks * s,) * 2, torch.float32, device)
    params = make_block_params(chunks, rank, s, out, torch.float32, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fusionops.backend(kernel_backend):
        y = fusionops.block_fusion(x, t, *params, rank=rank)
    y.sum().backward()
    allowed = {tuple(v.shape) for v in (x, t, *params[:5])}
    assert saved, "nothing was saved: the hook did not see the op"
    assert set(saved) <= allowed, saved


def test_repeated_calls_are_identical(kernel_backend, device):
    chunks, rank, s, out = SIZES[0]
    x, t = make_xs((9,), (chunks * s,) * 2, torch.float32, device)
    params = make_block_params(chunks, rank, s, out, torch.float32, device)
    with fusionops.backend(kernel_backend):
        y1 = fusionops.block_fusion(x, t, *params, rank=rank)
        y2 = fusionops.block_fusion(x, t, *params, rank=rank)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("wants", ["inputs", "weights", "biases", "out"])
def test_partial_gradients(kernel_backend, device, wants):
    """Only what requires grad gets one, and it still matches the reference."""
    chunks, rank, s, out = SIZES[0]
    x, t = (v.detach() for v in make_xs((5,), (chunks * s,) * 2, torch.float64, device))
    params = [p.detach() for p in make_block_params(chunks, rank, s, out, torch.float64, device)]
    chosen = {"inputs": [x, t], "weights": [params[0], params[2]], "biases": [params[1], params[3]],
              "out": [params[4], params[5]]}[wants]  # fmt: skip
    for v in chosen:
        v.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.block_fusion(x, t, *params, rank=rank, normalize="none")
    g = make_grad(tuple(y.shape), torch.float64, device)
    got = torch.autograd.grad(y, chosen, g)
    expected = torch.autograd.grad(reference.block_fusion(x, t, *params, rank, "none"), chosen, g)
    for a, e in zip(got, expected, strict=True):
        assert_close_to(a, e, torch.float64, wants)


def test_zero_chunk_normalises_to_zero(kernel_backend, device):
    """A chunk whose pooled vector is exactly 0 (zero merge weights and biases) stays 0 after
    n (F.normalize's eps, no division by zero) and gets a finite gradient, as the reference."""
    chunks, rank, s, out = SIZES[0]
    x, t = (v.detach() for v in make_xs((4,), (chunks * s,) * 2, torch.float64, device))
    params = [p.detach() for p in make_block_params(chunks, rank, s, out, torch.float64, device)]
    params[0][1].zero_()
    params[1][1].zero_()
    x.requires_grad_(True)
    with fusionops.backend(kernel_backend):
        y = fusionops.block_fusion(x, t, *params, rank=rank)
    expected = reference.block_fusion(x, t, *params, rank, "before_cat")
    assert_close_to(y, expected, torch.float64, "forward")
    g = make_grad(tuple(y.shape), torch.float64, device)
    (got,) = torch.autograd.grad(y, [x], g)
    (ref,) = torch.autograd.grad(expected, [x], g)
    assert torch.isfinite(got).all()
    assert_close_to(got, ref, torch.float64, "dx")


@pytest.mark.interpreter_subset(
    keep=lambda size, normalize, **_: size == SIZES[0] and normalize == "before_cat"
)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("size", SIZES[:2], ids=str)
def test_dropout_matches_reference(kernel_backend, device, size, normalize):
    """dropout_pre_lin on z inside the kernels: the reference's hashed mask for the same seed,
    forward and every gradient (3 chunks: the cpu backward by chunks; 1 chunk: by rows)."""
    chunks, rank, s, out = size
    x, t = make_xs((13,), (chunks * s, chunks * s), torch.float64, device)
    params = make_block_params(chunks, rank, s, out, torch.float64, device)
    kwargs = {"rank": rank, "normalize": normalize, "dropout_pre_lin": 0.4, "seed": 77}
    check_against_reference(
        "block_fusion", kernel_backend, x, t, params, kwargs, torch.float64, ref_kwargs={"training": True}
    )


def test_dropout_over_tiles(kernel_backend, device, monkeypatch):
    """The mask follows the global row across tiles."""
    if kernel_backend == "triton":
        monkeypatch.setattr("fusionops.triton.bilinear._TILE_BYTES", 1)  # tiles of 16 rows
        n = 37
    else:
        n = 1100
    chunks, rank, s, out = 2, 3, 64, 5
    x, t = make_xs((n,), (chunks * s, chunks * s), torch.float64, device)
    params = make_block_params(chunks, rank, s, out, torch.float64, device)
    kwargs = {"rank": rank, "normalize": "none", "dropout_pre_lin": 0.3, "seed": 5}
    check_against_reference(
        "block_fusion", kernel_backend, x, t, params, kwargs, torch.float64, ref_kwargs={"training": True}
    )
