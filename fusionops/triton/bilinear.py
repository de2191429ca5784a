"""Triton kernels of the bilinear pooling family (DESIGN.md section 6), behind
``fusionops.ops._bilinear.BilinearKernels``: MFB/MLB, MUTAN, BLOCK.

What is Triton and what is not: rows go in tiles; per tile the projections ``A = x Wxᵀ + bx``,
``B = t Wtᵀ + bt`` (chunked: batched) and the output projection are torch matmuls (cuBLAS on a
GPU), the middle part (activation, product, sum-pool over the rank) is one Triton kernel
forward and one backward, and the optional normalisation ``n`` runs in torch on the tile's
pooled ``(rows, C·S)``. Only one tile's ``(C, rows, R·S)`` projections exist at a time, never
all rows'; the backward recomputes them and the kernel overwrites them with their gradients.

How rows are tiled and in which dtype the GEMMs run depends on the device (``_config``):
- under the interpreter (CPU tensors), as the C++ kernels: tiles of 256 KB of float32 (at least
  16 rows), everything computed in float32 (float64 for float64) and rounded once at the end;
- on a GPU: tiles of up to 32 MB per projection, all of equal size (a multiple of 128 rows),
  so that a call takes a few launches and each pooling launch fills the SMs (its row block is
  halved until it gives 2 CTAs per SM); float16/bfloat16 GEMMs run in the input's dtype
  (tensor cores, float32 accumulation, one rounding: what the reference's ``F.linear`` returns
  in that dtype), the pooling kernel reads those 16-bit projections and accumulates in float32,
  and the gradients of the weights are summed over the tiles in float32.
Meta tensors choose as a GPU (an H100's 132 SMs): tools/triton_static.py compiles, on meta
tensors, what an H100 launches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusionops.ops._bilinear import NORM_NONE, NORM_PER_CHUNK
from fusionops.triton._common import _HALF, _acc, _block, _on

# Bytes of one tile's A (or B): as the C++ kernels (csrc/cpu/bilinear.cpp), at least 16 rows.
_TILE_BYTES = 1 << 18
_MIN_TILE_ROWS = 16
_NORM_EPS = 1e-12  # F.normalize's
# On a GPU: one tile's A (or B) at most 32 MB, whatever N (the (N, C·P) projections of all
# rows are never held once they pass that), in tiles of a multiple of 128 rows (a GEMM's M
# tile). Large, since each tile costs ~14 launches (GEMMs, pooling, normalisation in torch).
_GPU_TILE_BYTES = 32 << 20
_GPU_ROW_ALIGN = 128
_META_SMS = 132  # meta tensors: an H100/H200, as tools/triton_static.py assumes


@dataclass(frozen=True)
class _Config:
    """How a device tiles rows and runs the GEMMs.

    ``tile_bytes``: budget of one tile's A (or B), in the GEMMs' dtype; ``min_rows``: the
    least rows of a tile; ``row_align``: 0 takes the budget's rows greedily (as the C++
    kernels), else tiles of equal size rounded up to a multiple of it; ``programs``: CTAs a
    pooling launch should reach (its row block is halved down to ``min_block`` elements until
    it does; 0: no halving); ``half_gemms``: 16-bit inputs keep their dtype in the GEMMs."""

    tile_bytes: int
    min_rows: int
    row_align: int = 0
    programs: int = 0
    min_block: int = 512
    half_gemms: bool = False


@functools.cache
def _gpu_config(device: torch.device) -> _Config:
    """What a GPU with ``device``'s SM count runs: 2 CTAs per SM per pooling launch."""
    if device.type == "meta":
        sms = _META_SMS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _Config(_GPU_TILE_BYTES, _GPU_ROW_ALIGN, _GPU_ROW_ALIGN, 2 * sms, half_gemms=True)


def _config(device: torch.device) -> _Config:
    """The GPU's configuration on cuda (and meta) tensors; the C++ kernels' under the interpreter.
    Tests force the GPU's here to run it under the interpreter."""
    if device.type in ("cuda", "meta"):
        return _gpu_config(device)
    return _Config(_TILE_BYTES, _MIN_TILE_ROWS)  # read at each call: tests shrink _TILE_BYTES


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)  # NaN stays NaN, as F.relu
    elif ACT == 2:
        v = 2.0 * tl.sigmoid(2.0 * v) - 1.0  # tanh
    return v


@triton.jit
def _act_backward(g, v, a, ACT: tl.constexpr):
    """dL/dv from g = dL/d act, the pre-activation v and the activated a. relu selects (as its
    backward: 0 where v <= 0, g elsewhere, NaN included) rather than multiplying by 0 or 1, so
    an inf or NaN g at a clipped element gives 0 as in the reference."""
    if ACT == 1:
        g = tl.where(v <= 0, 0.0, g)
    elif ACT == 2:
        g = g * (1.0 - a * a)  # tanh_backward's grouping
    return g


@triton.jit
def _pool_fwd_kernel(
    a_ptr, b_ptr, p_ptr, T, S, R, C,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """p[n, c·S + j] = Σ_r act(A[c, n, i]) act(B[c, n, i]), i = r·S + j or j·R + r."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (rows < T)[:, None] & (cols < S)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    P = R * S
    base = (c * T + rows64[:, None]) * P
    ty = p_ptr.dtype.element_ty  # the accumulation dtype; A and B may be 16-bit (GPU)
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=ty)
    for r in range(R):
        if RANK_MAJOR:
            i = r * S + cols64[None, :]
        else:
            i = cols64[None, :] * R + r
        va = tl.load(a_ptr + base + i, mask=ok, other=0.0).to(ty)
        vb = tl.load(b_ptr + base + i, mask=ok, other=0.0).to(ty)
        acc += _act(va, ACT) * _act(vb, ACT)
    tl.store(p_ptr + rows64[:, None] * (C * S) + c * S + cols64[None, :], acc, mask=ok)


@triton.jit
def _pool_bwd_kernel(
    a_ptr, b_ptr, dp_ptr, T, S, R, C,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """A, B (pre-activation) overwritten with dL/dA = dp act(B) act'(A), dL/dB likewise;
    computed in dp's dtype, stored in A's (16-bit on a GPU)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (rows < T)[:, None] & (cols < S)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    P = R * S
    base = (c * T + rows64[:, None]) * P
    dp = tl.load(dp_ptr + rows64[:, None] * (C * S) + c * S + cols64[None, :], mask=ok, other=0.0)
    for r in range(R):
        if RANK_MAJOR:
            i = r * S + cols64[None, :]
        else:
            i = cols64[None, :] * R + r
        va = tl.load(a_ptr + base + i, mask=ok, other=0.0).to(dp.dtype)
        vb = tl.load(b_ptr + base + i, mask=ok, other=0.0).to(dp.dtype)
        fa = _act(va, ACT)
        fb = _act(vb, ACT)
        # (dp · other) first: mul's backward, then the activation's, as autograd groups them.
        tl.store(a_ptr + base + i, _act_backward(dp * fb, va, fa, ACT), mask=ok)
        tl.store(b_ptr + base + i, _act_backward(dp * fa, vb, fb, ACT), mask=ok)


def _tile_rows(n: int, c: int, p: int, dtype: torch.dtype, cfg: _Config) -> int:
    """Rows of a tile whose A (C, rows, P) of ``dtype`` fits ``cfg.tile_bytes``. The
    interpreter's: as many as fit (at least ``min_rows``); a GPU's: the fewest tiles that fit,
    of equal size rounded up to ``row_align`` (never over the budget's rows unless that is
    under ``min_rows``)."""
    fit = cfg.tile_bytes // (dtype.itemsize * c * p)
    if not cfg.row_align:
        return max(1, min(n, max(cfg.min_rows, fit)))
    cap = max(cfg.min_rows, fit // cfg.row_align * cfg.row_align)
    tiles = triton.cdiv(max(n, 1), cap)
    rows = triton.cdiv(triton.cdiv(n, tiles), cfg.row_align) * cfg.row_align
    return max(1, min(n, rows))


def _gemm_dtype(dtype: torch.dtype, cfg: _Config) -> torch.dtype:
    """The projections' dtype: the input's 16-bit one on a GPU, else the accumulation dtype."""
    return dtype if cfg.half_gemms and dtype in _HALF else _acc(dtype)


def _chunks(x: Tensor, r0: int, rows: int, c: int, dtype: torch.dtype) -> Tensor:
    """Rows [r0, r0 + rows) of a (N, C·d) input as (C, rows, d) in ``dtype``."""
    return x[r0 : r0 + rows].to(dtype).reshape(rows, c, -1).transpose(0, 1)


def _project(X: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """(C, rows, P) = X Wᵀ + b per chunk, contiguous. 16-bit: one GEMM with the bias as its C
    (rounded once, as F.linear); else the GEMM, then the bias added (the interpreter's bits)."""
    if b is not None and X.dtype in _HALF:
        return torch.baddbmm(b.unsqueeze(1).expand(-1, X.shape[1], -1), X, W.transpose(1, 2))
    out = torch.bmm(X, W.transpose(1, 2))
    return out if b is None else out.add_(b.unsqueeze(1))


def _grid(rows: int, c: int, s: int, cfg: _Config) -> tuple[tuple[int, int, int], int, int, int]:
    """Grid, BLOCK_T, BLOCK_S and num_warps: at most 8 elements per thread, since the backward
    holds 15-18 registers per element (64-bit addresses, dp, A, B and their activations) and
    spilled at 16 per thread (MFB's 16 x 128 tiles at 4 warps: 255 registers and spill stores
    on sm_90 and sm_80 with triton 3.9; 142 registers, no spill, at 8 warps). On a GPU the row
    block is halved (down to ``cfg.min_block`` elements) until the launch has
    ``cfg.programs`` CTAs."""
    bs = _block(s, 16, 128)
    bt = _block(rows, 1, max(1, 2048 // bs))
    per_row_block = c * triton.cdiv(s, bs)
    while bt > 1 and bt * bs > cfg.min_block and triton.cdiv(rows, bt) * per_row_block < cfg.programs:
        bt //= 2
    warps = 8 if bt * bs > 1024 else 4
    return (triton.cdiv(rows, bt), c, triton.cdiv(s, bs)), bt, bs, warps


def _pool(
    A: Tensor, B: Tensor, rank: int, rank_major: bool, act: int, acc: torch.dtype, cfg: _Config
) -> Tensor:
    """The pooled (rows, C·S) in ``acc`` from the (C, rows, R·S) A and B (any float dtype)."""
    c, rows, p = A.shape
    s = p // rank
    pooled = torch.empty(rows, c * s, dtype=acc, device=A.device)
    grid, bt, bs, warps = _grid(rows, c, s, cfg)
    _pool_fwd_kernel[grid](
        A, B, pooled, rows, s, rank, c, RANK_MAJOR=rank_major, ACT=act, BLOCK_T=bt, BLOCK_S=bs,
        num_warps=warps,
    )  # fmt: skip
    return pooled


def _pool_backward(
    A: Tensor, B: Tensor, dp: Tensor, rank: int, rank_major: bool, act: int, cfg: _Config
) -> None:
    c, rows, p = A.shape
    grid, bt, bs, warps = _grid(rows, c, p // rank, cfg)
    _pool_bwd_kernel[grid](
        A, B, dp.contiguous(), rows, p // rank, rank, c, RANK_MAJOR=rank_major, ACT=act, BLOCK_T=bt,
        BLOCK_S=bs, num_warps=warps,
    )  # fmt: skip


def _groups(pooled: Tensor, c: int, normalize: int) -> Tensor:
    """The pooled tile as (rows, groups, width): the vectors n normalises."""
    return pooled.view(pooled.shape[0], c if normalize == NORM_PER_CHUNK else 1, -1)


def _normalize(pooled: Tensor, c: int, normalize: int) -> Tensor:
    """n(p): signed square root, then L2 over each group (as F.normalize: / max(‖q‖, eps))."""
    if normalize == NORM_NONE:
        return pooled
    p = _groups(pooled, c, normalize)
    q = p.sign() * p.abs().sqrt()
    return (q / q.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)).view_as(pooled)


def _normalize_backward(gz: Tensor, pooled: Tensor, z: Tensor, c: int, normalize: int) -> Tensor:
    """dL/dp from dL/dz: through the L2 normalisation (no gradient through a clamped norm),
    then the signed square root (gradient 0 at p = 0, as sqrt(relu(·)) gives there)."""
    if normalize == NORM_NONE:
        return gz
    p, g, zz = (_groups(v, c, normalize) for v in (pooled, gz, z))
    norm = p.abs().sum(-1, keepdim=True).sqrt()  # ‖q‖ with q² = |p|
    clamped = norm < _NORM_EPS
    dq = torch.where(clamped, g, g - zz * (g * zz).sum(-1, keepdim=True)) / norm.clamp_min(_NORM_EPS)
    root = p.abs().sqrt()
    dp = torch.where(p != 0, dq / (2 * root).masked_fill(p == 0, 1.0), torch.zeros_like(dq))
    return dp.view_as(pooled)


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b (2-D or batched): in one GEMM where the dtypes agree (the interpreter's
    bits), else the 16-bit GEMM's result added in ``acc``'s dtype."""
    if a.dtype == acc.dtype:
        (acc.addmm_ if acc.dim() == 2 else acc.baddbmm_)(a, b)
    else:
        acc += a @ b


def forward(x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation, normalize) -> Tensor:
    """``y`` (N, O), contiguous, one tile of rows at a time."""
    n, c, p = x.shape[0], wx.shape[0], wx.shape[1]
    cfg = _config(x.device)
    acc, gd = _acc(x.dtype), _gemm_dtype(x.dtype, cfg)
    Wx, Wt, Wo = wx.to(gd), wt.to(gd), wo.to(gd)
    Bx, Bt, Bo = (None if b is None else b.to(gd) for b in (bx, bt, bo))
    y = torch.empty(n, wo.shape[0], dtype=gd, device=x.device)
    tile = _tile_rows(n, c, p, gd, cfg)
    with _on(x.device):
        for r0 in range(0, n, tile):
            rows = min(tile, n - r0)
            A = _project(_chunks(x, r0, rows, c, gd), Wx, Bx)
            B = _project(_chunks(t, r0, rows, c, gd), Wt, Bt)
            # 16-bit: z rounded to it, as the reference's z, for the output GEMM.
            z = _normalize(_pool(A, B, rank, rank_major, activation, acc, cfg), c, normalize).to(gd)
            out = y[r0 : r0 + rows]
            if Bo is None:
                torch.mm(z, Wo.t(), out=out)
            else:
                torch.addmm(Bo, z, Wo.t(), out=out)
    return y.to(x.dtype)


def backward(grad, x, t, wx, bx, wt, bt, wo, rank, rank_major, activation, normalize, needs) -> list[Tensor]:
    """Eight gradients (x, t, wx, bx, wt, bt, wo, bo); empty where not needed. The weights' and
    biases' gradients are summed over the tiles in the accumulation dtype (a 16-bit GEMM's
    tile partial rounded once); dx, dt are written in the GEMMs' dtype."""
    n, c, p = x.shape[0], wx.shape[0], wx.shape[1]
    cfg = _config(x.device)
    acc, gd = _acc(x.dtype), _gemm_dtype(x.dtype, cfg)
    Wx, Wt, Wo = wx.to(gd), wt.to(gd), wo.to(gd)
    Bx, Bt = (None if b is None else b.to(gd) for b in (bx, bt))
    dev = x.device

    def zeros(shape, need):
        return torch.zeros(shape, dtype=acc, device=dev) if need else None

    dx = torch.empty(n, x.shape[1], dtype=gd, device=dev) if needs[0] else None
    dt = torch.empty(n, t.shape[1], dtype=gd, device=dev) if needs[1] else None
    dwx, dwt, dwo = zeros(wx.shape, needs[2]), zeros(wt.shape, needs[4]), zeros(wo.shape, needs[6])
    dbx = zeros((c, p), needs[3] and bx is not None)
    dbt = zeros((c, p), needs[5] and bt is not None)
    tile = _tile_rows(n, c, p, gd, cfg)
    with _on(dev):
        for r0 in range(0, n, tile):
            rows = min(tile, n - r0)
            X, Tt = _chunks(x, r0, rows, c, gd), _chunks(t, r0, rows, c, gd)
            A, B = _project(X, Wx, Bx), _project(Tt, Wt, Bt)
            pooled = _pool(A, B, rank, rank_major, activation, acc, cfg)
            z = _normalize(pooled, c, normalize)
            G = grad[r0 : r0 + rows].to(gd)
            if dwo is not None:
                _add_product(dwo, G.t(), z.to(gd))
            dp = _normalize_backward((G @ Wo).to(acc), pooled, z, c, normalize)
            _pool_backward(A, B, dp, rank, rank_major, activation, cfg)  # A, B now hold dL/dA, dL/dB
            if dwx is not None:
                _add_product(dwx, A.transpose(1, 2), X)
            if dbx is not None:
                dbx += A.sum(1, dtype=acc)
            if dwt is not None:
                _add_product(dwt, B.transpose(1, 2), Tt)
            if dbt is not None:
                dbt += B.sum(1, dtype=acc)
            if dx is not None:
                dx[r0 : r0 + rows].view(rows, c, -1).copy_(torch.bmm(A, Wx).transpose(0, 1))
            if dt is not None:
                dt[r0 : r0 + rows].view(rows, c, -1).copy_(torch.bmm(B, Wt).transpose(0, 1))
    dbo = grad.to(acc).sum(0) if needs[7] else None
    empty = x.new_empty(0)
    return [empty if g is None else g.to(x.dtype) for g in (dx, dt, dwx, dbx, dwt, dbt, dwo, dbo)]
