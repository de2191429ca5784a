"""Triton kernels of product fusion (DESIGN.md section 3), behind ``fusionops.ops._kernels``.

``p = x_1 ⊙ … ⊙ x_M`` over ``(N, d)``, and its gradient ``dx_m = G ⊙ Π_{k≠m} x_k``. One kernel
launch per direction for any M: the modalities go to the kernel as a tuple of tensors with a
tuple of their strides (each read as it is laid out, stride 0 included), and the kernel walks
them with ``tl.static_range`` over the constexpr M (one compiled kernel per M).

Backward without division (zeros in the inputs are fine): a program keeps the exclusive
prefix products ``G Π_{k<m} x_k`` of its tile for every m on chip, then walks the modalities
in reverse with the suffix product ``Π_{k>m} x_k``, reloading each ``x_m`` tile (from cache).

Nothing is held in memory beyond the outputs. Products are taken in float32 (float64 for
float64 inputs) and rounded once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusionops.triton._common import _TL, _acc, _block, _on

# Elements of one program's tile: forward and backward (the backward keeps M tiles on chip).
_FWD_TILE = 2048
_BWD_TILE = 1024


@triton.jit
def _tile(ptr, stride_n, stride_d, rows64, cols64, ok, ACC: tl.constexpr):
    return tl.load(ptr + rows64[:, None] * stride_n + cols64[None, :] * stride_d, mask=ok, other=0.0).to(ACC)


@triton.jit
def _product_fwd_kernel(
    xs,
    strides_n,
    strides_d,
    out_ptr,
    N,
    D,
    M: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_db = tl.cdiv(D, BLOCK_D)
    rows = (pid // n_db) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % n_db) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    p = _tile(xs[0], strides_n[0], strides_d[0], rows64, cols64, ok, ACC)
    for m in tl.static_range(1, M):
        p *= _tile(xs[m], strides_n[m], strides_d[m], rows64, cols64, ok, ACC)
    tl.store(out_ptr + rows64[:, None] * D + cols64[None, :], p, mask=ok)


@triton.jit
def _product_bwd_kernel(
    g_ptr,
    stride_gn,
    stride_gd,
    xs,
    strides_n,
    strides_d,
    dxs,
    N,
    D,
    M: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dxs[m] = G Π_{k<m} x_k Π_{k>m} x_k``: prefixes (G folded in) forward, kept as a
    tuple of tiles; then the suffix product in reverse."""
    pid = tl.program_id(0)
    n_db = tl.cdiv(D, BLOCK_D)
    rows = (pid // n_db) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % n_db) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    prefix = _tile(g_ptr, stride_gn, stride_gd, rows64, cols64, ok, ACC)
    prefixes = (prefix,)
    for m in tl.static_range(M - 1):
        prefix = prefix * _tile(xs[m], strides_n[m], strides_d[m], rows64, cols64, ok, ACC)
        prefixes = prefixes + (prefix,)
    out = rows64[:, None] * D + cols64[None, :]
    # The last modality's gradient is its prefix; then suffix = x_{M-1} x_{M-2} … .
    tl.store(dxs[M - 1] + out, prefixes[M - 1], mask=ok)
    if M > 1:
        suffix = _tile(xs[M - 1], strides_n[M - 1], strides_d[M - 1], rows64, cols64, ok, ACC)
        for m in tl.static_range(M - 2, -1, -1):
            tl.store(dxs[m] + out, prefixes[m] * suffix, mask=ok)
            if m > 0:
                suffix = suffix * _tile(xs[m], strides_n[m], strides_d[m], rows64, cols64, ok, ACC)


def _blocks(n: int, d: int, tile: int) -> tuple[int, int]:
    """BLOCK_N, BLOCK_D: up to ``tile`` elements, columns (contiguous in the output) first."""
    bd = _block(d, 1, min(tile, 256))
    return _block(n, 1, tile // bd), bd


def forward(xs: list[Tensor]) -> Tensor:
    """``p`` of shape (N, d), contiguous."""
    x0 = xs[0]
    n, d = x0.shape
    out = torch.empty(n, d, dtype=x0.dtype, device=x0.device)
    if n == 0:
        return out
    bn, bd = _blocks(n, d, _FWD_TILE)
    with _on(x0.device):
        _product_fwd_kernel[(triton.cdiv(n, bn) * triton.cdiv(d, bd),)](
            tuple(xs),
            tuple(x.stride(0) for x in xs),
            tuple(x.stride(1) for x in xs),
            out,
            n,
            d,
            M=len(xs),
            ACC=_TL[_acc(x0.dtype)],
            BLOCK_N=bn,
            BLOCK_D=bd,
        )
    return out


def backward(grad: Tensor, xs: list[Tensor]) -> list[Tensor]:
    """``dx_m = grad ⊙ Π_{k≠m} x_k`` (N, d) for every m, without division."""
    x0 = xs[0]
    n, d = x0.shape
    dxs = [torch.empty(n, d, dtype=x0.dtype, device=x0.device) for _ in xs]
    if n == 0:
        return dxs
    bn, bd = _blocks(n, d, _BWD_TILE)
    with _on(x0.device):
        _product_bwd_kernel[(triton.cdiv(n, bn) * triton.cdiv(d, bd),)](
            grad,
            grad.stride(0),
            grad.stride(1),
            tuple(xs),
            tuple(x.stride(0) for x in xs),
            tuple(x.stride(1) for x in xs),
            tuple(dxs),
            n,
            d,
            M=len(xs),
            ACC=_TL[_acc(x0.dtype)],
            BLOCK_N=bn,
            BLOCK_D=bd,
        )
    return dxs
