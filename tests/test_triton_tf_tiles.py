"""Tensor fusion's Triton launches with the GPU's tile shapes, run by the interpreter (issue 17).

On a GPU the launchers keep 16-bit row tiles of 64 rows (wgmma) and split K (forward) or h (dx)
across programs to fill the SMs, split a dot level's j range so that widths like 129 are not
padded, and run dW in tiles of all O by 256 or 128 columns with a one-load Z tile read from the
transposed zcat (``fusionops.triton.tensor_fusion``). None of that runs on CPU tensors by default;
here ``_tensor_core_tiles`` is forced on and ``_target_programs`` raised so that tiny shapes
take those paths (several K splits, j tails), and every result is checked against the float64
reference. Each test also asserts, from the recorded launches, that the path it means to cover
was really taken.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOL, assert_close_to, skip_unless_usable
from inputs import detached64, make_grad, make_mask, make_weight, make_xs

import fusionops
from fusionops import reference
from fusionops.registry import OPS

t_tf = pytest.importorskip("fusionops.triton.tensor_fusion")

# Programs to fill: with 64- or 128-row tiles, small N and K of a few blocks give up to 12 splits.
PROGRAMS = 12


class _Recorder:
    """Stands in for a Triton kernel: records the grid and the block sizes of each launch."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}))
            return self.kernel[grid](*args, **kwargs)

        return launch


class _PoisonedRecorder(_Recorder):
    """A dW kernel's recorder that NaN-fills the output buffer (argument 7) before each launch,
    so an element the kernel leaves unwritten fails the comparison."""

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def poisoned(*args, **kwargs):
            args[7].fill_(float("nan"))
            return launch(*args, **kwargs)

        return poisoned


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers choose as on a GPU (CPU tensors, the interpreter); the recorders of the
    forward and split-level launches."""
    skip_unless_usable("triton", "cpu", op=OPS["tensor_fusion"])
    monkeypatch.setattr(t_tf, "_tensor_core_tiles", lambda device: True)
    monkeypatch.setattr(t_tf, "_target_programs", lambda device: PROGRAMS)
    fwd = _Recorder(t_tf._projected_fwd_kernel)
    split = _Recorder(t_tf._split_grad_kernel)
    monkeypatch.setattr(t_tf, "_projected_fwd_kernel", fwd)
    monkeypatch.setattr(t_tf, "_split_grad_kernel", split)
    return fwd, split


@pytest.fixture
def dw_tiles(gpu_tiles, monkeypatch):
    """As ``gpu_tiles``; the recorders (poisoning their outputs) of the two dW kernels: the
    one-load 16-bit kernel and the digit-gather one."""
    one_load = _PoisonedRecorder(t_tf._weight_grad_tc_kernel)
    gather = _PoisonedRecorder(t_tf._weight_grad_kernel)
    monkeypatch.setattr(t_tf, "_weight_grad_tc_kernel", one_load)
    monkeypatch.setattr(t_tf, "_weight_grad_kernel", gather)
    return one_load, gather


def _k_splits(fwd: _Recorder, n: int, o: int) -> int:
    (grid, blocks), *_ = fwd.launches
    return grid[0] // (math.ceil(n / blocks["BLOCK_N"]) * math.ceil(o / blocks["BLOCK_O"]))


def _check(xs, w, b, mask, dtype, grad_layout="contiguous", dropout=0.0):
    """Forward and every gradient of the triton backend against the float64 reference."""
    with fusionops.backend("triton"):
        y = fusionops.tensor_fusion(xs, w, b, mask=mask, dropout=dropout, seed=7)
    xr = detached64(xs)
    wr, br = detached64([w, b])
    yr = reference.tensor_fusion(xr, wr, br, mask, dropout, 7)
    assert y.dtype == dtype
    assert_close_to(y, yr, dtype, "forward")
    if y.numel() == 0:
        return
    g = make_grad(tuple(y.shape), dtype, y.device, grad_layout)
    y.backward(g)
    yr.backward(g.to(torch.float64))
    for m, (x, x64) in enumerate(zip(xs, xr, strict=True)):
        assert_close_to(x.grad, x64.grad, dtype, f"grad of xs[{m}]")
    assert_close_to(w.grad, wr.grad, dtype, "grad of weight")
    if b is not None:
        assert_close_to(b.grad, br.grad, dtype, "grad of bias")


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    ("n", "dims", "o", "k_splits"),
    [
        (70, (3, 4, 8), 5, 12),  # K = 180: 12 K blocks of 16, one per split; last width 9 = 8 + 1
        (67, (4, 5, 8), 3, 9),  # K = 270: 17 K blocks, 2 per split (the last split: 1)
        (64, (1, 7), 130, 1),  # K = 16: 1 K block, no split; O in 2 blocks of 128; width 8: no tail
        (5, (3, 10), 17, 3),  # N below one row tile; width 11 = 8 + 3 (a j tail padded to 4)
        (130, (2, 64), 7, 5),  # width 65 = 64 + 1: dx in 128-row tiles (P one column) + a tail
    ],
    ids=str,
)
def test_wgmma_tiles_match_reference(gpu_tiles, n, dims, o, k_splits, dtype):
    """64-row forward tiles with K split across programs (float32 partials summed after),
    and the dx dot level's 64-row tiles with its j range cut into an exact part and a tail."""
    fwd, split = gpu_tiles
    xs = make_xs((n,), dims, dtype)
    w, b = make_weight(dims, o, dtype)
    _check(xs, w, b, None, dtype)
    assert fwd.launches[0][1]["BLOCK_N"] >= t_tf._WGMMA_ROWS
    assert _k_splits(fwd, n, o) == k_splits
    dot_level = [blocks for _, blocks in split.launches if not blocks["FROM_MEMORY"]]
    last = dims[-1] + 1
    assert len(dot_level) == (1 if last & (last - 1) == 0 else 2), split.launches
    assert all(blocks["BLOCK_N"] >= t_tf._WGMMA_ROWS for blocks in dot_level)
    if last > 64:  # the exact part's P tile is one column: 128 rows
        assert (dot_level[0]["BLOCK_H"], dot_level[0]["BLOCK_N"]) == (1, 2 * t_tf._WGMMA_ROWS)
    widths = [blocks["BLOCK_J"] for blocks in dot_level]
    assert widths == [min(64, 1 << (last.bit_length() - 1))] + ([] if len(widths) == 1 else [widths[1]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("grad_layout", ["transposed", "broadcast"])
@pytest.mark.parametrize("layout", ["strided", "broadcast"])
def test_strides_and_mask(gpu_tiles, layout, grad_layout, dtype):
    """Strided and stride-0 inputs, a transposed weight, a mask, non-contiguous and stride-0
    upstream gradients; float32 takes the j pieces (no 64-row tiles: no tensor cores)."""
    dims, n = (2, 3, 4), 67
    xs = make_xs((n,), dims, dtype, layout=layout)
    w, b = make_weight(dims, 6, dtype, transposed=True)
    _check(xs, w, b, make_mask((n,), len(dims), "cpu"), dtype, grad_layout)


def test_dropout(gpu_tiles):
    """The dropout mask is the same whichever split forms a Z (or dZ) tile."""
    dims, n = (3, 4, 8), 66
    xs = make_xs((n,), dims, torch.bfloat16)
    w, b = make_weight(dims, 9, torch.bfloat16)
    _check(xs, w, b, None, torch.bfloat16, dropout=0.3)
    assert _k_splits(gpu_tiles[0], n, 9) > 1


def test_no_bias_empty_batch_and_repeatability(gpu_tiles):
    dims = (3, 4, 8)
    xs = make_xs((0,), dims, torch.bfloat16)
    w, _ = make_weight(dims, 5, torch.bfloat16)
    _check(xs, w, None, None, torch.bfloat16)
    xs = make_xs((65,), dims, torch.bfloat16)
    w, _ = make_weight(dims, 5, torch.bfloat16)
    _check(xs, w, None, None, torch.bfloat16)
    with fusionops.backend("triton"), torch.no_grad():  # fixed-order sums: the same bits
        assert torch.equal(fusionops.tensor_fusion(xs, w), fusionops.tensor_fusion(xs, w))


def test_non_finite_rows_stay_in_their_row(gpu_tiles):
    """An inf in one row makes that row's output non-finite, as in the reference; the split
    partials of other rows stay finite and match."""
    dims, n = (3, 4, 8), 70
    xs = [x.detach() for x in make_xs((n,), dims, torch.bfloat16)]
    xs[1][3, 2] = float("inf")
    xs[2][40, 0] = float("nan")
    w, b = (p.detach() for p in make_weight(dims, 5, torch.bfloat16))
    with fusionops.backend("triton"):
        y = fusionops.tensor_fusion(xs, w, b)
    yr = reference.tensor_fusion(detached64(xs), *detached64([w, b]))
    assert torch.equal(torch.isfinite(y), torch.isfinite(yr))
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    ok = torch.isfinite(yr).all(1)
    assert ok.sum() == n - 2
    assert_close_to(y[ok], yr[ok], torch.bfloat16, "finite rows")


def test_gradcheck_float64_j_pieces(gpu_tiles):
    dims = (2, 4)  # width 5 = 4 + 1
    xs = [x.detach().requires_grad_(True) for x in make_xs((3,), dims, torch.float64)]
    w, b = (p.detach().requires_grad_(True) for p in make_weight(dims, 3, torch.float64))

    def f(*args):
        with fusionops.backend("triton"):
            return fusionops.tensor_fusion(list(args[:2]), args[2], args[3])

    assert torch.autograd.gradcheck(f, (*xs, w, b))
    assert any(blocks["BLOCK_J"] == 1 for _, blocks in gpu_tiles[1].launches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(gpu_tiles, dtype):
    dims, n = (2, 3, 4), 66
    xs = [x.detach() for x in make_xs((n,), dims, dtype)]
    w, b = (p.detach() for p in make_weight(dims, 4, dtype))
    ops = torch.ops.fusionops
    torch.library.opcheck(ops.tensor_fusion_projected, (xs, w, b, None, "triton"))
    gy = make_grad((n, 4), dtype, "cpu")
    torch.library.opcheck(ops.tensor_fusion_projected_backward, (gy, xs, w, None, True, True, True, "triton"))


def test_tolerances_are_the_dtypes():
    assert TOL[torch.bfloat16] == 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize(
    ("d", "exact", "pieces"),
    [
        (129, True, [(0, 128), (128, 1)]),
        (33, True, [(0, 32), (32, 1)]),
        (64, True, [(0, 64)]),
        (11, True, [(0, 8), (8, 3)]),
        (1, True, [(0, 1)]),
        (200, True, [(0, 192), (192, 8)]),
        (129, False, [(0, 129)]),
    ],
)
def test_j_pieces(d, exact, pieces):
    assert t_tf._j_pieces(d, exact) == pieces


# --- dW on the GPU's tiles (issue 17): 128 (all of O) x 256 (or 128) tiles, Z formed once ---------


def _dw_splits(rec: _Recorder, o: int, k: int) -> int:
    (grid, blocks), *_ = rec.launches
    return grid[0] // (math.ceil(o / blocks["BLOCK_O"]) * math.ceil(k / blocks["BLOCK_K"]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    ("n", "dims", "o", "tile", "prefixes", "splits"),
    [
        # last width 131 >= 128: 256-column tiles spanning 3 prefix indices; 37 rows: a masked
        # last row block of 16; K = 1179 in 5 tiles, 2 row splits (12 programs, whole waves)
        (37, (2, 2, 130), 5, (64, 16, 256), 3, 2),
        # 48 rows: no row mask; O = 70 in one 128-row tile; K = 1572: 7 tiles (the last partial)
        (48, (2, 3, 130), 70, (128, 16, 256), 3, 1),
        # two modalities (the prefix is modality 0 alone), O = 130: two O tiles
        (33, (5, 140), 130, (128, 16, 256), 3, 1),
        # one modality: no prefix (K = 151, one tile)
        (20, (150,), 3, (64, 16, 256), 1, 2),
        # last width 71: 256 columns would span 5 prefix indices, 128 span 3: 128 x 32 tiles
        (40, (2, 3, 70), 7, (64, 32, 128), 3, 1),
    ],
    ids=str,
)
def test_dw_one_load_tiles_match_reference(dw_tiles, n, dims, o, tile, prefixes, splits, dtype):
    """dW (and every other output) with the one-load Z tile against the float64 reference;
    outputs poisoned, launches checked for the path: block sizes, prefix slots, row mask,
    row splits summed in float32."""
    one_load, gather = dw_tiles
    xs = make_xs((n,), dims, dtype)
    w, b = make_weight(dims, o, dtype)
    _check(xs, w, b, None, dtype)
    assert not gather.launches
    (grid, blocks), *_ = one_load.launches
    assert (blocks["BLOCK_O"], blocks["BLOCK_N"], blocks["BLOCK_K"], blocks["num_warps"]) == (*tile, 8)
    assert blocks["PREFIXES"] == prefixes
    assert blocks["MASK_ROWS"] == (n % tile[1] != 0)
    assert _dw_splits(one_load, o, math.prod(d + 1 for d in dims)) == splits


@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
@pytest.mark.parametrize("grad_layout", ["transposed", "broadcast"])
@pytest.mark.parametrize("layout", ["strided", "broadcast"])
def test_dw_strides_mask(dw_tiles, layout, grad_layout, dtype):
    """Strided and stride-0 inputs, a transposed weight, a mask, non-contiguous and stride-0
    upstream gradients through the one-load dW (16-bit); float32 keeps the gather kernel."""
    dims, n = (2, 130), 35
    xs = make_xs((n,), dims, dtype, layout=layout)
    w, b = make_weight(dims, 6, dtype, transposed=True)
    _check(xs, w, b, make_mask((n,), len(dims), "cpu"), dtype, grad_layout)
    one_load, gather = dw_tiles
    assert len(one_load.launches if dtype in HALF else gather.launches) == 1


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dw_dropout(dw_tiles, dtype):
    """The one-load dW regenerates the forward's dropout mask (transposed tile, same bits)."""
    dims, n = (2, 2, 130), 37
    xs = make_xs((n,), dims, dtype)
    w, b = make_weight(dims, 9, dtype)
    _check(xs, w, b, None, dtype, dropout=0.3)
    assert dw_tiles[0].launches[0][1]["DROPOUT"]


def test_dw_empty_batch(dw_tiles):
    dims = (2, 130)
    xs = make_xs((0,), dims, torch.bfloat16)
    w, b = make_weight(dims, 5, torch.bfloat16)
    with fusionops.backend("triton"):
        y = fusionops.tensor_fusion(xs, w, b)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert not any(rec.launches for rec in dw_tiles)


def test_dw_non_finite_stays_in_its_columns(dw_tiles):
    """An inf in z_M of one row reaches exactly the dW columns it reaches in the reference
    (k % W its column; the other prefix slots of a tile stay finite), a NaN in a prefix
    modality the columns of its prefix index."""
    dims, n, o = (2, 2, 130), 37, 5
    xs = [x.detach() for x in make_xs((n,), dims, torch.bfloat16)]
    xs[2][3, 7] = float("inf")
    xs[1][30, 0] = float("nan")
    w, _ = (p.detach() for p in make_weight(dims, o, torch.bfloat16))
    g = make_grad((n, o), torch.bfloat16, "cpu")
    _, dw, _ = t_tf.projected_backward(g, xs, w, None, False, True, False)
    z = reference.tensor_fusion_features(detached64(xs)).detach()
    dw_ref = g.to(torch.float64).t() @ z
    assert torch.equal(torch.isnan(dw), torch.isnan(dw_ref))
    assert torch.equal(torch.isinf(dw), torch.isinf(dw_ref))
    ok = torch.isfinite(dw_ref)
    assert 0 < (~ok).sum() < ok.sum()
    assert_close_to(dw[ok], dw_ref[ok], torch.bfloat16, "finite columns of dW")
    assert len(dw_tiles[0].launches) == 1


def test_dw_opcheck(dw_tiles):
    dims, n = (2, 130), 19
    xs = [x.detach() for x in make_xs((n,), dims, torch.bfloat16)]
    w, _ = (p.detach() for p in make_weight(dims, 4, torch.bfloat16))
    gy = make_grad((n, 4), torch.bfloat16, "cpu")
    ops = torch.ops.fusionops
    torch.library.opcheck(
        ops.tensor_fusion_projected_backward, (gy, xs, w, None, False, True, True, "triton")
    )
    assert dw_tiles[0].launches


@pytest.mark.parametrize(
    ("dims", "wgmma", "plan"),
    [
        ((33, 33, 129), True, (True, 3, 128, 16, 256)),  # the headline on sm_90
        ((33, 33, 129), False, (True, 2, 128, 32, 128)),  # on sm_80 (mma.sync): 128 columns
        ((33, 33, 33), True, (False, 0, 128, 32, 128)),  # last width 34: gathers, 128 x 128
        ((33, 33, 33), False, (False, 0, 64, 32, 64)),  # sm_80: gathers in 64 x 64
        ((9, 9, 9, 9), True, (False, 0, 64, 32, 64)),  # 4 modalities: gathers in 64 x 64
    ],
    ids=str,
)
def test_dw_plan(monkeypatch, dims, wgmma, plan):
    """The GPU plans of dW at the headline and beside it (widths d_m as given, O = 128)."""
    monkeypatch.setattr(t_tf, "_tensor_core_tiles", lambda device: True)
    monkeypatch.setattr(t_tf, "_wgmma", lambda device: wgmma)
    widths = tuple(d + 1 for d in dims)
    got = t_tf._weight_grad_plan(4096, 128, widths, torch.bfloat16, torch.device("cpu"))
    assert got == (*plan, 8)
    assert t_tf._weight_grad_plan(4096, 128, widths, torch.float32, torch.device("cpu")).block_o == 64
