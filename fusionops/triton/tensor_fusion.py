"""Triton kernels of tensor fusion (DESIGN.md section 1), behind ``fusionops.ops._kernels``.

Every kernel forms tiles of ``Z = flatten(z_1 ⊗ … ⊗ z_M)`` on chip from ``zcat (N, Σ D_m)``,
the row-wise concatenation of the ``z_m = [1, x_m]`` (masked rows already ``[1, 0…0]``), so
the projected op is an implicit GEMM that never writes ``Z``:

* ``features_forward``: ``Z`` tile by tile.
* ``projected_forward``: ``y = Z Wᵀ + b``, one ``tl.dot`` per K tile.
* ``projected_backward``: ``dW = Gᵀ Z`` (row blocks split across programs when few tiles),
  ``db = Σ_n G``, and ``dx`` by the split below.
* ``features_backward``: ``dx`` by the same split, reading ``dZ`` from memory.

The split: ``Z = P ⊗ z_s`` with ``P`` the features of modalities ``1..s-1`` (``H`` columns)
and ``s`` the last modality, so ``dZ`` viewed as ``(N, H, D_s)`` gives
``dz_s = Σ_h dZ[:, h, :] P[:, h]`` and ``dP = Σ_j dZ[:, :, j] z_s[:, j]``. ``dP`` is again a
features gradient, over one modality fewer; the recursion ends at modality 1 (``P = 1``).
In the projected op the first level computes ``dZ`` tiles as ``G W[:, cols]`` on chip, so
the largest buffer is ``dP`` of ``(N, K / D_M)`` in float32: a factor ``D_M`` below ``Z``.

Compute precision: float32 (float64 for float64 inputs); ``tl.dot`` takes operands of the
input dtype (tensor cores for float16/bfloat16) with ``input_precision="ieee"``, so float32
is not rounded to tf32. No atomics: partial sums go to small buffers summed by torch, so
results are bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import itertools
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Exact float32 products in tl.dot (tf32 would miss the float32 tolerance).
_PRECISION = "ieee"


# --- on-chip tiles ---------------------------------------------------------------------------


@triton.jit
def _z_tile(
    zcat_ptr,
    stride_zn,
    rows,
    row_ok,
    cols,
    col_ok,
    widths_ptr,
    offsets_ptr,
    NMOD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Features of modalities ``0..NMOD-1`` at ``[rows, cols]`` (the last modality varies
    fastest); ones when ``NMOD == 0``. Only the ``cols`` vector is split into digits."""
    base = zcat_ptr + rows.to(tl.int64)[:, None] * stride_zn
    ok = row_ok[:, None] & col_ok[None, :]
    tile = tl.full((BLOCK_R, BLOCK_C), 1.0, ACC)
    rest = cols
    for i in tl.static_range(NMOD):
        width = tl.load(widths_ptr + (NMOD - 1 - i))
        digit = rest % width
        rest = rest // width
        col = tl.load(offsets_ptr + (NMOD - 1 - i)) + digit
        tile *= tl.load(base + col[None, :], mask=ok, other=0.0).to(ACC)
    return tile


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _features_fwd_kernel(
    zcat_ptr,
    stride_zn,
    widths_ptr,
    offsets_ptr,
    out_ptr,
    N,
    K,
    NMOD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid, K blocks fastest: consecutive programs write consecutive memory.
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    rows = (pid // n_kb) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    k_ok = ks < K
    tile = _z_tile(zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr,
                   NMOD, ACC, BLOCK_N, BLOCK_K)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    tl.store(ptrs, tile, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _projected_fwd_kernel(
    zcat_ptr,
    stride_zn,
    widths_ptr,
    offsets_ptr,
    w_ptr,
    stride_wo,
    stride_wk,
    b_ptr,
    stride_b,
    out_ptr,
    N,
    O,
    K,
    NMOD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Output blocks fastest: programs running together share a row block of zcat (in L1/L2)
    # and stream W, which is read once per row block.
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    rows = (pid // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = (pid % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < N
    out_ok = outs < O
    w_rows = w_ptr + outs.to(tl.int64)[None, :] * stride_wo
    acc = tl.zeros((BLOCK_N, BLOCK_O), ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_rows + ks[:, None] * stride_wk, mask=k_ok[:, None] & out_ok[None, :],
                    other=0.0)
        z = _z_tile(zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr,
                    NMOD, ACC, BLOCK_N, BLOCK_K)
        acc = tl.dot(z.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs * stride_b, mask=out_ok, other=0.0).to(ACC)[None, :]
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * O + outs[None, :]
    tl.store(ptrs, acc, mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    g_ptr,
    stride_gn,
    stride_go,
    zcat_ptr,
    stride_zn,
    widths_ptr,
    offsets_ptr,
    out_ptr,
    N,
    O,
    K,
    BLOCKS_PER_SPLIT,
    NMOD: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[split] = G[rows]ᵀ Z[rows]`` over the row blocks of one split (a reduction over
    N split across programs when (O, K) has too few tiles to fill the GPU)."""
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    n_ob = tl.cdiv(O, BLOCK_O)
    split = pid // (n_kb * n_ob)
    tile = pid % (n_kb * n_ob)
    outs = (tile // n_kb) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = (tile % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_ok = outs < O
    k_ok = ks < K
    acc = tl.zeros((BLOCK_O, BLOCK_K), ACC)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_N))
    for rb in range(first, last):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g_t = tl.load(g_ptr + rows.to(tl.int64)[None, :] * stride_gn + outs[:, None] * stride_go,
                      mask=out_ok[:, None] & row_ok[None, :], other=0.0)
        z = _z_tile(zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr,
                    NMOD, ACC, BLOCK_N, BLOCK_K)
        acc = tl.dot(g_t, z.to(g_t.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
    ptrs = (out_ptr + split.to(tl.int64) * O * K + outs.to(tl.int64)[:, None] * K
            + ks[None, :])
    tl.store(ptrs, acc, mask=out_ok[:, None] & k_ok[None, :])


@triton.jit
def _split_grad_kernel(
    src_ptr,
    stride_sn,
    stride_sc,
    w_ptr,
    stride_wo,
    stride_wk,
    zcat_ptr,
    stride_zn,
    widths_ptr,
    offsets_ptr,
    dz_ptr,
    dp_ptr,
    N,
    O,
    H,
    D,
    TILES_PER_CHUNK,
    SPLIT: tl.constexpr,
    FROM_MEMORY: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """One level of the split ``Z = P ⊗ z_s`` (s = SPLIT, P over modalities 0..s-1).

    ``dZ (N, H·D)`` is ``src`` itself when FROM_MEMORY, else ``G W`` with ``src = G (N, O)``,
    formed tile by tile. A program owns a row block, a chunk of h tiles and a block of j:
    ``dz[chunk, rows, js] = Σ_h dZ[rows, h, js] P[rows, h]`` (held in registers over the
    chunk) and ``dp[jblock, rows, h] = Σ_j dZ[rows, h, j] z_s[rows, j]`` (written per h tile).
    A tile's columns are (h, j) pairs with j padded to BLOCK_J so that it reshapes to 3-D.
    """
    pid = tl.program_id(0)
    n_jb = tl.cdiv(D, BLOCK_J)
    n_chunks = tl.cdiv(tl.cdiv(H, BLOCK_H), TILES_PER_CHUNK)
    jb = pid % n_jb
    chunk = (pid // n_jb) % n_chunks
    rows = (pid // (n_jb * n_chunks)) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    js = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < D
    z_s = tl.load(zcat_ptr + rows64[:, None] * stride_zn + tl.load(offsets_ptr + SPLIT)
                  + js[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
    c = tl.arange(0, BLOCK_H * BLOCK_J)
    dz_acc = tl.zeros((BLOCK_N, BLOCK_J), ACC)
    first = chunk * TILES_PER_CHUNK
    last = tl.minimum(first + TILES_PER_CHUNK, tl.cdiv(H, BLOCK_H))
    for t in range(first, last):
        hs = t * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        c_h = t * BLOCK_H + c // BLOCK_J
        c_j = jb * BLOCK_J + c % BLOCK_J
        c_ok = (c_h < H) & (c_j < D)
        ks = c_h * D + c_j
        if FROM_MEMORY:
            dz = tl.load(src_ptr + rows64[:, None] * stride_sn + ks[None, :] * stride_sc,
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        else:
            dz = tl.zeros((BLOCK_N, BLOCK_H * BLOCK_J), ACC)
            for o0 in range(0, O, BLOCK_O):
                outs = o0 + tl.arange(0, BLOCK_O)
                out_ok = outs < O
                g = tl.load(src_ptr + rows64[:, None] * stride_sn + outs[None, :] * stride_sc,
                            mask=row_ok[:, None] & out_ok[None, :], other=0.0)
                w = tl.load(w_ptr + outs.to(tl.int64)[:, None] * stride_wo
                            + ks[None, :] * stride_wk,
                            mask=out_ok[:, None] & c_ok[None, :], other=0.0)
                dz = tl.dot(g, w, dz, input_precision=PRECISION, out_dtype=ACC)
        dz3 = tl.reshape(dz, (BLOCK_N, BLOCK_H, BLOCK_J))
        p = _z_tile(zcat_ptr, stride_zn, rows, row_ok, hs, h_ok, widths_ptr, offsets_ptr,
                    SPLIT, ACC, BLOCK_N, BLOCK_H)
        dz_acc += tl.sum(dz3 * p[:, :, None], axis=1)
        if SPLIT > 0:
            dp = tl.sum(dz3 * z_s[:, None, :], axis=2)
            tl.store(dp_ptr + jb.to(tl.int64) * N * H + rows64[:, None] * H + hs[None, :], dp,
                     mask=row_ok[:, None] & h_ok[None, :])
    tl.store(dz_ptr + chunk.to(tl.int64) * N * D + rows64[:, None] * D + js[None, :], dz_acc,
             mask=row_ok[:, None] & j_ok[None, :])


