"""Tensor fusion's Triton launches with the GPU's tile shapes, run by the interpreter (issue 17).

On a GPU the launchers keep 16-bit row tiles of 64 rows (wgmma) and split K (forward) or h (dx)
across programs to fill the SMs, and split a dot level's j range so that widths like 129 are
not padded (``fusionops.triton.tensor_fusion``). None of that runs on CPU tensors by default;
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
