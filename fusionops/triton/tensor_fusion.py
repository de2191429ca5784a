"""Triton kernels of tensor fusion (DESIGN.md section 1), behind ``fusionops.ops._kernels``.

Every kernel forms tiles of ``Z = flatten(z_1 ⊗ … ⊗ z_M)`` on chip from ``zcat (N, Σ D_m)``,
the row-wise concatenation of the ``z_m = [1, x_m]`` (masked rows already ``[1, 0…0]``), so
the projected op is an implicit GEMM that never writes ``Z``:

* ``features_forward``: ``Z`` tile by tile.
* ``projected_forward``: ``y = Z Wᵀ + b``, one ``tl.dot`` per K tile (on GPUs, 16-bit row
  tiles of 64-128 rows for wgmma, K split across programs when rows are few).
* ``projected_backward``: ``dW = Gᵀ Z`` (row blocks split across programs when few tiles;
  on GPUs, 16-bit: tiles of all O by 256 (sm_90) or 128 columns, each Z tile formed once per
  row step, from the transposed zcat with one load per element where the last width allows),
  ``db = Σ_n G``, and ``dx`` by the split below.
* ``features_backward``: ``dx`` by the same split, reading ``dZ`` from memory.

The split: ``Z = P ⊗ z_s`` with ``P`` the features of modalities ``1..s-1`` (``H`` columns)
and ``s`` the last modality, so ``dZ`` viewed as ``(N, H, D_s)`` gives
``dz_s = Σ_h dZ[:, h, :] P[:, h]`` and ``dP = Σ_j dZ[:, :, j] z_s[:, j]``. ``dP`` is again a
features gradient, over one modality fewer; the recursion ends at modality 1 (``P = 1``).
In the projected op the first level computes ``dZ`` tiles as ``G W[:, cols]`` on chip, so
the largest buffer is ``dP`` of ``(N, K / D_M)`` in float32: a factor ``D_M`` below ``Z``.

Memory beyond inputs and outputs: ``zcat`` (and its transpose for the GPU's one-load dW);
for dW with few (O, K) tiles, float32 partials of ``(splits, O, K)``; for a forward with K
split, float32 partials of ``(splits, N, O)``; per split level, float32 ``dz`` partials
``(chunks, N, D_s)`` and ``dP`` of ``(N, H)`` (times ``ceil(D_s / 64)`` when ``D_s > 64``).
Never ``(N, K)``.

Dropout on Z (``dropout`` > 0 in the projected functions): every Z tile (forward, dW) and every
``dZ = G W`` tile (first split level) is masked where it is formed, by the counter-based mask
of ``fusionops.reference.tensor_fusion.dropout_keep`` computed in uint32 (``_keep``), so the
backward regenerates it and nothing of size (N, K) is stored.

Compute precision: float32 (float64 for float64 inputs); ``tl.dot`` takes operands of the
input dtype (tensor cores for float16/bfloat16); float32 dots follow torch's float32 matmul
setting (``_common._input_precision``: tf32 on CUDA when ``torch.backends.cuda.matmul.allow_tf32``
or the float32 matmul precision allows it, else ``"ieee"``, exact products on FMA units). No
atomics: partial sums go to small buffers summed by torch, so results are bitwise reproducible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusionops.reference.tensor_fusion import COL_MUL, ROW_MUL, SEED_SALT, dropout_threshold
from fusionops.triton._common import (
    _HALF,
    _TL,
    _acc,
    _block,
    _dot_dtype,
    _input_precision,
    _on,
    _pack,
    _Packed,
    _reduce_hi,
    _row_block,
    _target_programs,
    _zeros_like_inputs,
)

# --- dropout mask: the reference's dropout_keep, in uint32 ------------------------------------

# Triton reads an int literal as uint32 from 2^31 up, so these multiply modulo 2^32 as in C++.
_SEED_SALT: tl.constexpr = tl.constexpr(SEED_SALT)
_ROW_MUL: tl.constexpr = tl.constexpr(ROW_MUL)
_COL_MUL: tl.constexpr = tl.constexpr(COL_MUL)


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _keep(seed, threshold, rows, cols):
    """The keep mask at ``[rows, cols]`` of Z (rows: flattened row indices, cols: flat
    feature indices), for ``seed`` in [0, 2^31) and ``threshold = floor(p · 2^24)``."""
    seed_key = _fmix32(seed.to(tl.uint32) ^ _SEED_SALT)
    row_key = _fmix32(seed_key ^ (rows.to(tl.uint32) * _ROW_MUL))
    h = _fmix32(row_key[:, None] + cols.to(tl.uint32)[None, :] * _COL_MUL)
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def _dropped(tile, seed, threshold, scale_ptr, rows, cols):
    """Inverted dropout of a tile of Z (or of dZ) at ``[rows, cols]``: kept elements times
    ``1 / (1 - p)`` (read from ``scale_ptr``, in the tile's dtype), dropped ones 0."""
    scale = tl.load(scale_ptr)
    return tl.where(_keep(seed, threshold, rows, cols), tile * scale, 0.0)


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


@triton.jit
def _rounded(z, zcat_ptr, DOT: tl.constexpr):
    """A Z tile as a tl.dot operand: rounded to the input dtype first, so that a float32 DOT
    standing in for bfloat16 (see _dot_dtype) rounds like the GPU does."""
    return z.to(zcat_ptr.dtype.element_ty).to(DOT)


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
    tile = _z_tile(
        zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr, NMOD, ACC, BLOCK_N, BLOCK_K
    )
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    tl.store(ptrs, tile, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["seed"])  # a new seed per call: no recompilation
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
    KBLOCKS_PER_SPLIT,
    seed,
    threshold,
    scale_ptr,
    NMOD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[split] = Z[rows, ks] W[outs, ks]ᵀ (+ b in split 0)`` over the K blocks of one
    split (split-K: a reduction over K split across programs when (N, O) has too few tiles
    for row tiles big enough for wgmma; one split stores y itself)."""
    # Output blocks fastest, splits slowest: programs running together share a row block of
    # zcat (in L1/L2) and the same K range of W (in L2), so W is read about once per split.
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    tiles = tl.cdiv(N, BLOCK_N) * n_ob
    split = pid // tiles
    tile = pid % tiles
    rows = (tile // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = (tile % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < N
    out_ok = outs < O
    w_rows = w_ptr + outs.to(tl.int64)[None, :] * stride_wo
    acc = tl.zeros((BLOCK_N, BLOCK_O), ACC)
    k_first = split * KBLOCKS_PER_SPLIT * BLOCK_K
    k_last = tl.minimum(k_first + KBLOCKS_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_first, k_last, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(
            w_rows + ks.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None] & out_ok[None, :], other=0.0
        )
        z = _z_tile(
            zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr, NMOD, ACC, BLOCK_N, BLOCK_K
        )
        if DROPOUT:
            z = _dropped(z, seed, threshold, scale_ptr, rows, ks)
        acc = tl.dot(_rounded(z, zcat_ptr, DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + outs * stride_b, mask=out_ok, other=0.0).to(ACC)[None, :]
    ptrs = out_ptr + split.to(tl.int64) * N * O + rows.to(tl.int64)[:, None] * O + outs[None, :]
    tl.store(ptrs, acc, mask=row_ok[:, None] & out_ok[None, :])


@triton.jit(do_not_specialize=["seed"])  # a new seed per call: no recompilation
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
    seed,
    threshold,
    scale_ptr,
    NMOD: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
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
        g_t = tl.load(
            g_ptr + rows.to(tl.int64)[None, :] * stride_gn + outs.to(tl.int64)[:, None] * stride_go,
            mask=out_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        z = _z_tile(
            zcat_ptr, stride_zn, rows, row_ok, ks, k_ok, widths_ptr, offsets_ptr, NMOD, ACC, BLOCK_N, BLOCK_K
        )
        if DROPOUT:
            z = _dropped(z, seed, threshold, scale_ptr, rows, ks)
        acc = tl.dot(g_t.to(DOT), _rounded(z, zcat_ptr, DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    ptrs = out_ptr + split.to(tl.int64) * O * K + outs.to(tl.int64)[:, None] * K + ks[None, :]
    tl.store(ptrs, acc, mask=out_ok[:, None] & k_ok[None, :])


@triton.jit
def _prefix(block, rows, row_ok, col0, col1, MASK_ROWS: tl.constexpr):
    """``zcat[rows, col0] · zcat[rows, col1]`` in float32 (``block``: the row block's corner
    in the transposed zcat, ``colX``: column offsets in it): the feature of one prefix index
    (up to two prefix modalities) per row; 0 on rows out of range."""
    if MASK_ROWS:
        p = tl.load(block + col0 + rows, mask=row_ok, other=0.0).to(tl.float32)
        return p * tl.load(block + col1 + rows, mask=row_ok, other=0.0).to(tl.float32)
    return tl.load(block + col0 + rows).to(tl.float32) * tl.load(block + col1 + rows).to(tl.float32)


@triton.jit
def _z_t_tile(
    zcat_t_ptr,
    stride_zc,
    rb,
    N,
    z_offs,
    lanes,
    slot,
    a0,
    a1,
    b0,
    b1,
    c0,
    c1,
    ks,
    seed,
    threshold,
    scale_ptr,
    PREFIXES: tl.constexpr,
    NMOD: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The Z tile of row block ``rb``, transposed (K columns x BLOCK_N rows), as the dot
    operand of ``_weight_grad_tc_kernel`` (its arguments, computed once per program there)."""
    rows = rb * BLOCK_N + lanes
    row_ok = rows < N
    block = zcat_t_ptr + rb * BLOCK_N
    if MASK_ROWS:
        z_t = tl.load(block + z_offs, mask=row_ok[None, :], other=0.0).to(tl.float32)
    else:
        z_t = tl.load(block + z_offs).to(tl.float32)
    if NMOD > 1:
        p = _prefix(block, lanes, row_ok, a0 * stride_zc, a1 * stride_zc, MASK_ROWS)[None, :]
        if PREFIXES >= 2:
            p_b = _prefix(block, lanes, row_ok, b0 * stride_zc, b1 * stride_zc, MASK_ROWS)
            p = tl.where(slot == 1, p_b[None, :], p)
        if PREFIXES >= 3:
            p_c = _prefix(block, lanes, row_ok, c0 * stride_zc, c1 * stride_zc, MASK_ROWS)
            p = tl.where(slot == 2, p_c[None, :], p)
        z_t = p * z_t
    if DROPOUT:
        z_t = tl.where(tl.trans(_keep(seed, threshold, rows, ks)), z_t * tl.load(scale_ptr), 0.0)
    return _rounded(z_t, zcat_t_ptr, DOT)


@triton.jit(do_not_specialize=["seed"])  # a new seed per call: no recompilation
def _weight_grad_tc_kernel(
    g_ptr,
    stride_gn,
    stride_go,
    zcat_t_ptr,
    stride_zc,
    widths_ptr,
    offsets_ptr,
    out_ptr,
    N,
    O,
    K,
    BLOCKS_PER_SPLIT,
    seed,
    threshold,
    scale_ptr,
    NMOD: tl.constexpr,
    PREFIXES: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[split] = G[rows]ᵀ Z[rows]`` on 16-bit tensor cores (float32 accumulation) for
    NMOD <= 3 and K tiles that span at most PREFIXES <= 3 prefix indices ``k // W`` (W the
    last width, the prefix being modalities ``0..NMOD-2``), reading the transposed
    ``zcat_t (Σ D_m, N)`` (rows contiguous); MASK_ROWS when N is not a multiple of BLOCK_N.

    ``Z[r, k] = P[r, k // W] · z_M[r, k % W]``: per row step, ``P`` at those few prefix indices
    (vectors over rows) and one load of ``z_M`` per element, the columns' digits computed
    once per program (``_z_tile``'s per-element gathers and digits cost several times the
    tile's MMA on a GPU). The tile covers all of O (up to 128), so each Z tile is formed once.
    Rows contiguous in zcat_t: a thread's elements run along 8 rows, loaded 16 bytes at a
    time (z_M and the P values alike), stored to shared memory the same way (rows are the
    dot's reduction). For 16-bit inputs the product is the exact one rounded once to float32,
    as ``_z_tile`` gives."""
    # K tiles fastest: programs running together read the same rows of G and zcat (in L2).
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    n_ob = tl.cdiv(O, BLOCK_O)
    split = pid // (n_kb * n_ob)
    tile = pid % (n_kb * n_ob)
    outs = (tile // n_kb) * BLOCK_O + tl.arange(0, BLOCK_O)
    k0 = (tile % n_kb) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    out_ok = outs < O
    # Loop-invariant: each column's prefix slot (k // W - p0), the offsets of its z_M elements
    # in a row block of zcat_t (k % W stays inside z_M even past K: no column mask), and the
    # zcat_t columns of the prefix features of each slot (column 0, modality 0's constant 1,
    # for a missing factor; past the last prefix they stay inside zcat_t and only feed
    # columns k >= K, never stored). The launcher keeps zcat_t's size below 2^31 (int32).
    width = tl.load(widths_ptr + (NMOD - 1))
    p0 = k0 // width
    slot = (ks // width - p0)[:, None]
    lanes = tl.arange(0, BLOCK_N)
    z_offs = ((tl.load(offsets_ptr + (NMOD - 1)) + ks % width) * stride_zc)[:, None] + lanes[None, :]
    if NMOD == 2:
        a0, a1, b0, b1, c0, c1 = p0, 0, p0 + 1, 0, p0 + 2, 0
    if NMOD == 1:
        a0, a1, b0, b1, c0, c1 = 0, 0, 0, 0, 0, 0
    if NMOD == 3:  # the prefix index is d0 · w1 + d1
        w1 = tl.load(widths_ptr + 1)
        off1 = tl.load(offsets_ptr + 1)
        a0, a1, b0, b1 = p0 // w1, off1 + p0 % w1, (p0 + 1) // w1, off1 + (p0 + 1) % w1
        c0, c1 = (p0 + 2) // w1, off1 + (p0 + 2) % w1
    acc = tl.zeros((BLOCK_O, BLOCK_K), tl.float32)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_N))
    # Rotated: the next row block's Z tile is formed after this block's dot is issued, so that
    # part of it overlaps the MMA (triton 3.6 issues about 50 of its ~250 instructions before
    # waiting for the wgmma, 3.9 about 15); the last step forms a spare tile, never used.
    z_t = _z_t_tile(
        zcat_t_ptr,
        stride_zc,
        first,
        N,
        z_offs,
        lanes,
        slot,
        a0,
        a1,
        b0,
        b1,
        c0,
        c1,
        ks,
        seed,
        threshold,
        scale_ptr,
        PREFIXES,
        NMOD,
        MASK_ROWS,
        DROPOUT,
        DOT,
        BLOCK_N,
    )
    for rb in range(first, last):
        rows = rb * BLOCK_N + lanes
        g = tl.load(
            g_ptr + rows.to(tl.int64)[:, None] * stride_gn + outs.to(tl.int64)[None, :] * stride_go,
            mask=(rows < N)[:, None] & out_ok[None, :],
            other=0.0,
        )
        # dW tile (O x K) = Gᵀ Z: both operands through shared memory, transposed views.
        acc = tl.dot(tl.trans(g.to(DOT)), tl.trans(z_t), acc, input_precision=PRECISION)
        z_t = _z_t_tile(
            zcat_t_ptr,
            stride_zc,
            tl.minimum(rb + 1, last - 1),
            N,
            z_offs,
            lanes,
            slot,
            a0,
            a1,
            b0,
            b1,
            c0,
            c1,
            ks,
            seed,
            threshold,
            scale_ptr,
            PREFIXES,
            NMOD,
            MASK_ROWS,
            DROPOUT,
            DOT,
            BLOCK_N,
        )
    # int32 offsets from the tile's corner (the launcher keeps BLOCK_O · K below 2^31): 64-bit
    # pointers for all 128 x 256 elements spill registers (triton 3.6).
    corner = out_ptr + (split.to(tl.int64) * O + (tile // n_kb) * BLOCK_O) * K + k0
    offs = tl.arange(0, BLOCK_O)[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(corner + offs, acc, mask=out_ok[:, None] & (ks < K)[None, :])


@triton.jit(do_not_specialize=["seed"])  # a new seed per call: no recompilation
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
    J0,
    JN,
    JB0,
    TILES_PER_CHUNK,
    seed,
    threshold,
    scale_ptr,
    SPLIT: tl.constexpr,
    FROM_MEMORY: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """One level of the split ``Z = P ⊗ z_s`` (s = SPLIT, P over modalities 0..s-1).

    ``dZ (N, H·D)`` is ``src`` itself when FROM_MEMORY, else ``G W`` with ``src = G (N, O)``,
    formed tile by tile (and masked under DROPOUT: the gradient of Z's dropped features is 0,
    of its kept ones scaled). A program owns a row block, a chunk of h tiles and a block of j:
    ``dz[chunk, rows, js] = Σ_h dZ[rows, h, js] P[rows, h]`` (held in registers over the
    chunk) and ``dp[JB0 + jblock, rows, h] = Σ_j dZ[rows, h, j] z_s[rows, j]`` (written per h
    tile). A launch covers the j range ``[J0, J0 + JN)`` (dz's columns ``j - J0``), so that a
    width like 129 runs as 128 in blocks of 64 plus 1 in blocks of 1, not as 3 blocks of 64.
    A tile's columns are (h, j) pairs with j padded to BLOCK_J so that it reshapes to 3-D.
    """
    pid = tl.program_id(0)
    n_jb = tl.cdiv(JN, BLOCK_J)
    n_chunks = tl.cdiv(tl.cdiv(H, BLOCK_H), TILES_PER_CHUNK)
    jb = pid % n_jb
    chunk = (pid // n_jb) % n_chunks
    rows = (pid // (n_jb * n_chunks)) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    j_end = J0 + JN
    js = J0 + jb * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < j_end
    z_s = tl.load(
        zcat_ptr + rows64[:, None] * stride_zn + tl.load(offsets_ptr + SPLIT) + js[None, :],
        mask=row_ok[:, None] & j_ok[None, :],
        other=0.0,
    ).to(ACC)
    c = tl.arange(0, BLOCK_H * BLOCK_J)
    dz_acc = tl.zeros((BLOCK_N, BLOCK_J), ACC)
    first = chunk * TILES_PER_CHUNK
    last = tl.minimum(first + TILES_PER_CHUNK, tl.cdiv(H, BLOCK_H))
    for t in range(first, last):
        hs = t * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        c_h = t * BLOCK_H + c // BLOCK_J
        c_j = J0 + jb * BLOCK_J + c % BLOCK_J
        c_ok = (c_h < H) & (c_j < j_end)
        ks = c_h * D + c_j
        if FROM_MEMORY:
            dz = tl.load(
                src_ptr + rows64[:, None] * stride_sn + ks.to(tl.int64)[None, :] * stride_sc,
                mask=row_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(ACC)
        else:
            dz = tl.zeros((BLOCK_N, BLOCK_H * BLOCK_J), ACC)
            for o0 in range(0, O, BLOCK_O):
                outs = o0 + tl.arange(0, BLOCK_O)
                out_ok = outs < O
                g = tl.load(
                    src_ptr + rows64[:, None] * stride_sn + outs.to(tl.int64)[None, :] * stride_sc,
                    mask=row_ok[:, None] & out_ok[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_ptr + outs.to(tl.int64)[:, None] * stride_wo + ks.to(tl.int64)[None, :] * stride_wk,
                    mask=out_ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                dz = tl.dot(g.to(DOT), w.to(DOT), dz, input_precision=PRECISION, out_dtype=ACC)
            if DROPOUT:
                dz = _dropped(dz, seed, threshold, scale_ptr, rows, ks)
        dz3 = tl.reshape(dz, (BLOCK_N, BLOCK_H, BLOCK_J))
        p = _z_tile(
            zcat_ptr, stride_zn, rows, row_ok, hs, h_ok, widths_ptr, offsets_ptr, SPLIT, ACC, BLOCK_N, BLOCK_H
        )
        dz_acc += tl.sum(dz3 * p[:, :, None], axis=1)
        if SPLIT > 0:
            dp = tl.sum(dz3 * z_s[:, None, :], axis=2)
            tl.store(
                dp_ptr + (JB0 + jb).to(tl.int64) * N * H + rows64[:, None] * H + hs[None, :],
                dp,
                mask=row_ok[:, None] & h_ok[None, :],
            )
    tl.store(
        dz_ptr + chunk.to(tl.int64) * N * JN + rows64[:, None] * JN + (js - J0)[None, :],
        dz_acc,
        mask=row_ok[:, None] & j_ok[None, :],
    )


# --- host side -------------------------------------------------------------------------------


# Rows of a 16-bit dot tile on GPUs: Hopper's wgmma takes tiles of 64 rows and up per warp
# group (Triton falls back to mma.sync below), so rows are not shrunk below this to fill the
# SMs; the reduction is split across programs instead.
_WGMMA_ROWS = 64


def _tensor_core_tiles(device: torch.device) -> bool:
    """Whether launches take the GPU's tile shapes (16-bit row tiles of _WGMMA_ROWS, split
    reductions to fill the SMs): everywhere but the interpreter (CPU tensors), whose small
    tiles keep the tests fast. The tests set it to True to run the GPU's shapes there."""
    return device.type != "cpu"


def _splits(blocks: int, tiles: int, programs: int, at_most: bool = False) -> tuple[int, int]:
    """``(blocks per split, splits)`` of a reduction over ``blocks`` blocks done by ``tiles``
    programs each, split so that at least ``programs`` programs run, or with ``at_most`` no
    more (whole waves on a GPU: a few programs over would run as a near-empty wave). Every
    split is non-empty."""
    want = max(1, programs // tiles) if at_most else triton.cdiv(programs, tiles)
    per = triton.cdiv(blocks, min(blocks, want))
    return per, triton.cdiv(blocks, per)


def _projected_blocks(
    n: int, o: int, k: int, dtype: torch.dtype, programs: int, tensor_cores: bool
) -> tuple[int, int, int, int, int]:
    """BLOCK_N, BLOCK_O, BLOCK_K, num_warps and K blocks per split of the projected forward
    (16-bit: up to 128 x 128 tiles, as in a tensor-core GEMM). On GPUs a 16-bit tile keeps
    at least _WGMMA_ROWS rows and K is split when that leaves fewer than ``programs`` tiles;
    elsewhere rows shrink to fill the programs and K is not split."""
    hi = 128 if dtype in _HALF else 64
    bo, bk = _block(o, 16, hi), _block(k, 16, _reduce_hi(dtype))
    if tensor_cores and dtype in _HALF:
        # 128 rows: each W tile feeds 128 FLOP per byte (64 rows: 64, below what L2 can feed
        # the tensor cores); K tiles of 16 keep a 128 x 128 tile in about 180 registers (32
        # take all 255); 8 warps (with 4, 64 x 128 spills on sm_80).
        bn, bk = (2 * _WGMMA_ROWS if n > _WGMMA_ROWS else _WGMMA_ROWS), 16
        tiles = triton.cdiv(n, bn) * triton.cdiv(o, bo)
        per_split, _ = _splits(triton.cdiv(k, bk), tiles, programs, at_most=True)
        return bn, bo, bk, 8, per_split
    bn = _row_block(n, triton.cdiv(o, bo), hi, programs)
    return bn, bo, bk, 8 if bn * bo >= 64 * 128 else 4, triton.cdiv(k, bk)


# dW's 16-bit tiles on GPUs (BLOCK_K, BLOCK_N) for the one-load Z tile (_weight_grad_tc_kernel),
# widest first: 256 columns by 16 rows halve the L2 bytes per FLOP of 128 x 32 (G is re-read
# per K tile). Its 128 x 256 float32 accumulator (128 registers a thread of 8 warps) takes 233
# registers with wgmma (sm_90, triton 3.9 and 3.6) but 254 with mma.sync (sm_80: no margin
# left), which keeps 128 x 32 (about 170).
_DW_TC_TILES = ((256, 16), (128, 32))
_DW_TC_TILES_MMA = ((128, 32),)


def _wgmma(device: torch.device) -> bool:
    """Whether the device has wgmma (sm_90 and up); True under the interpreter (the tests run
    the sm_90 plan there) and for meta tensors asks the compile target (tools/triton_static.py)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_capability(device)[0] >= 9
        if device.type == "meta":
            return triton.runtime.driver.active.get_current_target().arch >= 90
    except (RuntimeError, AttributeError, TypeError):  # no GPU driver: the sm_90 plan
        return True
    return True


class _WeightGradPlan(NamedTuple):
    one_load: bool  # _weight_grad_tc_kernel (else _weight_grad_kernel)
    prefixes: int  # prefix indices a K tile may span (one_load only)
    block_o: int
    block_n: int  # the reduction (rows)
    block_k: int
    num_warps: int


def _weight_grad_plan(
    n: int, o: int, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> _WeightGradPlan:
    """How dW runs. On GPUs, 16-bit: tiles of all O up to 128 (wgmma's M: 64 per warp group)
    by 128-256 columns of K, 8 warps, each Z tile formed once per row step for all of them, by
    the one-load Z tile where it applies (NMOD <= 3, a K tile spanning at most 3 prefix
    indices: a last width from 64 up; BLOCK_O · K and zcat's size below 2^31: int32 offsets);
    else digit gathers in 128 x 128 with wgmma and NMOD <= 3 (166-230 registers, triton 3.9
    and 3.6). Elsewhere (mma.sync's gathers in 128 x 128 spill on triton 3.6; the
    interpreter; float32/float64) up to 64 x 64 (8 warps for a full tile, whose Z-tile gathers
    and accumulator spill registers with 4)."""
    k = math.prod(dims)
    if _tensor_core_tiles(device) and dtype in _HALF:
        bo = _block(o, _WGMMA_ROWS, 128)
        if len(dims) <= 3 and max(bo * k, n * sum(dims)) < 2**31:
            for bk, bn in _DW_TC_TILES if _wgmma(device) else _DW_TC_TILES_MMA:
                bk = _block(k, 16, bk)
                if (prefixes := _prefixes(dims, bk)) <= 3:
                    return _WeightGradPlan(True, prefixes, bo, bn, bk, 8)
        if len(dims) <= 3 and _wgmma(device):
            return _WeightGradPlan(False, 0, bo, 32, _block(k, 16, 128), 8)
    bo, bk = _block(o, 16, 64), _block(k, 16, 64)
    return _WeightGradPlan(False, 0, bo, _block(n, 16, _reduce_hi(dtype)), bk, 8 if bo * bk >= 64 * 64 else 4)


def _prefixes(dims: tuple[int, ...], block_k: int) -> int:
    """How many prefix indices ``k // W`` (W = dims[-1]) a K tile of ``block_k`` columns
    starting at a multiple of ``block_k`` may span (at most all ``K / W`` of them)."""
    w = dims[-1]
    return min((w + block_k - 2) // w + 1, math.prod(dims[:-1]))


def _j_pieces(d: int, exact: bool) -> list[tuple[int, int]]:
    """The j ranges ``(J0, JN)`` the launches of a split level cover: all of ``d`` in one
    (each j block padded to a power of two), or, when ``exact``, the widest part that blocks
    of one power of two (up to 64) tile exactly, then the rest in blocks of its own: a
    ``d = 2^k + 1`` (``z = [1, x]`` of a power-of-two ``x``) then pads nothing, where one
    launch would pad 129 to 3 blocks of 64 (a third more dot work than needed)."""
    if not exact:
        return [(0, d)]
    bj = min(64, 1 << (d.bit_length() - 1))
    main = d - d % bj
    return [(0, main)] + ([(main, d - main)] if main < d else [])


def _split_blocks(
    n: int, o: int, h: int, d: int, dtype: torch.dtype, programs: int, tensor_cores: bool
) -> tuple[int, int, int, int, int]:
    """BLOCK_N, BLOCK_H, BLOCK_J, BLOCK_O and num_warps of one split level: (h, j) tiles of
    16 to 64 columns (16: tl.dot's minimum), j padded to a power of two; 8 warps for full
    tiles, whose 3-D epilogue spills registers with 4. On GPUs 16-bit row tiles keep
    at least _WGMMA_ROWS rows (the h reduction is split across programs to fill the GPU)."""
    bj = _block(d, 1, 64)
    bh = max(min(64 // bj, _block(h, 1, 64)), triton.cdiv(16, bj))
    if tensor_cores and dtype in _HALF:
        # 128 rows where P is one column (d >= 64): half the W traffic per FLOP of 64 rows;
        # wider P tiles (h, j) with 128 rows spill.
        bn = 2 * _WGMMA_ROWS if bh == 1 else _WGMMA_ROWS
    else:
        bn = _row_block(n, 1, 64 if dtype in _HALF else 32, programs)
    return bn, bh, bj, _block(o, 16, _reduce_hi(dtype)), 8 if bn * bh * bj >= 2048 else 4


class _Drop:
    """The dropout arguments of a launch: ``seed``, ``threshold`` and ``scale`` (a one-element
    tensor of the compute dtype: a Python float would reach the kernel as float32, and float64
    calls need 1/(1-p) in float64). ``on`` is False for p = 0."""

    def __init__(self, dropout: float, seed: int, placeholder: Tensor) -> None:
        self.on = dropout > 0
        self.seed = int(seed) if self.on else 0
        self.threshold = dropout_threshold(dropout)
        # p = 0 costs no allocation: the kernels then never read scale (any pointer will do)
        self.scale = (
            torch.full((1,), 1.0 / (1.0 - dropout), dtype=_acc(placeholder.dtype), device=placeholder.device)
            if self.on
            else placeholder
        )

    def args(self) -> tuple[int, int, Tensor]:
        return self.seed, self.threshold, self.scale


def _weight_grad(grad: Tensor, packed: _Packed, o: int, drop: _Drop) -> Tensor:
    """``dW = Gᵀ Z`` (O, K); row blocks are split over programs when (O, K) has few tiles."""
    zcat, dims, device = packed.zcat, packed.dims, packed.zcat.device
    n, k, dtype = zcat.shape[0], math.prod(dims), zcat.dtype
    plan = _weight_grad_plan(n, o, dims, dtype, device)
    tiles = triton.cdiv(o, plan.block_o) * triton.cdiv(k, plan.block_k)
    # On GPUs (16-bit tiles) whole waves only, as the forward: a few programs over would run
    # alone; at the headline (549 tiles) there is no split at all.
    at_most = _tensor_core_tiles(device) and dtype in _HALF
    per_split, splits = _splits(triton.cdiv(n, plan.block_n), tiles, _target_programs(device), at_most)
    # One split stores dW directly; several store float32 partials summed below in a fixed
    # order (no atomics: reproducible bits).
    out = torch.empty(splits, o, k, dtype=dtype if splits == 1 else _acc(dtype), device=device)
    # The one-load kernel reads zcat transposed (rows contiguous: vector loads along rows).
    z = zcat.t().contiguous() if plan.one_load else zcat
    args = (grad, grad.stride(0), grad.stride(1), z, z.stride(0))
    args += (packed.widths, packed.offsets, out, n, o, k, per_split, *drop.args())
    blocks = dict(NMOD=len(dims), DROPOUT=drop.on, DOT=_dot_dtype(dtype, device))
    blocks.update(PRECISION=_input_precision(dtype, device), num_warps=plan.num_warps)
    blocks.update(BLOCK_O=plan.block_o, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k)
    with _on(device):
        if plan.one_load:
            mask_rows = n % plan.block_n != 0
            _weight_grad_tc_kernel[(splits * tiles,)](
                *args, PREFIXES=plan.prefixes, MASK_ROWS=mask_rows, **blocks
            )
        else:
            _weight_grad_kernel[(splits * tiles,)](*args, ACC=_TL[_acc(dtype)], **blocks)
    return out[0] if splits == 1 else out.sum(0).to(dtype)


def _split_grads(
    src: Tensor, weight: Tensor | None, packed: _Packed, drop: _Drop | None = None
) -> list[Tensor]:
    """``dz_m`` (N, D_m) for every modality, in compute precision, by the split recursion.

    ``src`` is ``dZ (N, K)`` when ``weight`` is None, else ``G (N, O)`` (dZ = G W, formed on
    chip, masked by ``drop``). Each level peels off the last remaining modality and hands ``dP``
    to the next.
    """
    zcat, dims = packed.zcat, packed.dims
    n, device = zcat.shape[0], zcat.device
    acc, programs, tensor_cores = _acc(zcat.dtype), _target_programs(device), _tensor_core_tiles(device)
    dzs: list[Tensor] = []
    for s in reversed(range(len(dims))):
        d, h = dims[s], math.prod(dims[:s])
        o = 0 if weight is None else weight.shape[0]
        # GPU tile shapes only where there is a dot (dZ = G W formed on chip).
        gpu_dot = tensor_cores and weight is not None
        plans = []
        for j0, jn in _j_pieces(d, gpu_dot):
            bn, bh, bj, bo, warps = _split_blocks(n, o, h, jn, zcat.dtype, programs, gpu_dot)
            n_jb, n_ht, row_blocks = triton.cdiv(jn, bj), triton.cdiv(h, bh), triton.cdiv(n, bn)
            per_chunk, chunks = _splits(n_ht, row_blocks * n_jb, programs, at_most=gpu_dot)
            plans.append((j0, jn, bn, bh, bj, bo, warps, n_jb, row_blocks, per_chunk, chunks))
        jbs = sum(plan[7] for plan in plans)
        dp = torch.empty(jbs, n, h, dtype=acc, device=device) if s > 0 else None
        w = src if weight is None else weight
        parts, jb0 = [], 0
        for j0, jn, bn, bh, bj, bo, warps, n_jb, row_blocks, per_chunk, chunks in plans:
            dz = torch.empty(chunks, n, jn, dtype=acc, device=device)
            with _on(device):
                _split_grad_kernel[(row_blocks * chunks * n_jb,)](
                    src,
                    src.stride(0),
                    src.stride(1),
                    w,
                    w.stride(0),
                    w.stride(1),
                    zcat,
                    zcat.stride(0),
                    packed.widths,
                    packed.offsets,
                    dz,
                    dz if dp is None else dp,
                    n,
                    o,
                    h,
                    d,
                    j0,
                    jn,
                    jb0,
                    per_chunk,
                    *(drop.args() if drop is not None else (0, 0, zcat)),
                    SPLIT=s,
                    FROM_MEMORY=weight is None,
                    DROPOUT=drop is not None and drop.on and weight is not None,
                    ACC=_TL[acc],
                    DOT=_dot_dtype(zcat.dtype, device),
                    PRECISION=_input_precision(zcat.dtype, device),
                    BLOCK_N=bn,
                    BLOCK_H=bh,
                    BLOCK_J=bj,
                    BLOCK_O=bo,
                    num_warps=warps,
                )
            parts.append(dz[0] if chunks == 1 else dz.sum(0))
            jb0 += n_jb
        dzs.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
        if dp is not None:
            src, weight = (dp[0] if jbs == 1 else dp.sum(0)), None
    return dzs[::-1]


def _input_grads(dzs: list[Tensor], xs: list[Tensor], mask: Tensor | None) -> list[Tensor]:
    """``dx_m = dz_m[:, 1:]`` with masked rows zeroed, in the input dtype."""
    out = []
    for m, (dz, x) in enumerate(zip(dzs, xs, strict=True)):
        g = dz[:, 1:]
        if mask is not None:
            g = torch.where(mask[:, m, None], g, 0.0)
        out.append(g.to(x.dtype).contiguous())
    return out


# --- the kernel contract (fusionops.ops._kernels) ------------------------------------------


def features_forward(xs: list[Tensor], mask: Tensor | None) -> Tensor:
    """``Z`` of shape (N, K), contiguous."""
    packed = _pack(xs, mask)
    zcat, dims = packed.zcat, packed.dims
    n, k = zcat.shape[0], math.prod(dims)
    out = torch.empty(n, k, dtype=zcat.dtype, device=zcat.device)
    if n == 0:
        return out
    bn, bk = _block(n, 1, 32), _block(k, 16, 128)
    with _on(zcat.device):
        _features_fwd_kernel[(triton.cdiv(n, bn) * triton.cdiv(k, bk),)](
            zcat,
            zcat.stride(0),
            packed.widths,
            packed.offsets,
            out,
            n,
            k,
            NMOD=len(dims),
            ACC=_TL[_acc(zcat.dtype)],
            BLOCK_N=bn,
            BLOCK_K=bk,
        )
    return out


def features_backward(grad: Tensor, xs: list[Tensor], mask: Tensor | None) -> list[Tensor]:
    """``dL/dx_m`` (N, d_m) for every m, given ``grad = dL/dZ`` (N, K)."""
    if xs[0].shape[0] == 0:
        return _zeros_like_inputs(xs)
    return _input_grads(_split_grads(grad, None, _pack(xs, mask)), xs, mask)


def projected_forward(
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """``y = Z Wᵀ + b`` of shape (N, O), without holding Z (masked by dropout when > 0)."""
    n, (o, k) = xs[0].shape[0], weight.shape
    out = torch.empty(n, o, dtype=weight.dtype, device=weight.device)
    if n == 0 or o == 0:
        return out
    packed = _pack(xs, mask)
    zcat = packed.zcat
    drop = _Drop(dropout, seed, zcat)
    device = zcat.device
    bn, bo, bk, warps, per_split = _projected_blocks(
        n, o, k, zcat.dtype, _target_programs(device), _tensor_core_tiles(device)
    )
    splits = triton.cdiv(triton.cdiv(k, bk), per_split)
    # One split stores y directly; several store float32 partials summed below (no atomics:
    # the sum's order is fixed, so results are reproducible).
    part = out if splits == 1 else torch.empty(splits, n, o, dtype=_acc(zcat.dtype), device=device)
    with _on(device):
        _projected_fwd_kernel[(splits * triton.cdiv(n, bn) * triton.cdiv(o, bo),)](
            zcat,
            zcat.stride(0),
            packed.widths,
            packed.offsets,
            weight,
            weight.stride(0),
            weight.stride(1),
            weight if bias is None else bias,
            0 if bias is None else bias.stride(0),
            part,
            n,
            o,
            k,
            per_split,
            *drop.args(),
            NMOD=len(packed.dims),
            HAS_BIAS=bias is not None,
            DROPOUT=drop.on,
            ACC=_TL[_acc(zcat.dtype)],
            DOT=_dot_dtype(zcat.dtype, zcat.device),
            PRECISION=_input_precision(zcat.dtype, zcat.device),
            BLOCK_N=bn,
            BLOCK_O=bo,
            BLOCK_K=bk,
            num_warps=warps,
        )
    if splits > 1:
        out.copy_(part.sum(0))
    return out


def projected_backward(
    grad: Tensor,
    xs: list[Tensor],
    weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """``(dxs, dW (O, K), db (O,))`` given ``grad = dL/dy`` (N, O); parts not needed are
    None (dxs: an empty list). Under dropout the mask of the forward is regenerated."""
    n, (o, k), dtype = xs[0].shape[0], weight.shape, weight.dtype
    db = grad.sum(0, dtype=_acc(dtype)).to(dtype) if need_db else None
    if n == 0 or o == 0:
        dw = torch.zeros(o, k, dtype=dtype, device=weight.device) if need_dw else None
        return (_zeros_like_inputs(xs) if need_dx else []), dw, db
    if not (need_dx or need_dw):
        return [], None, db
    packed = _pack(xs, mask)
    drop = _Drop(dropout, seed, packed.zcat)
    dw = _weight_grad(grad, packed, o, drop) if need_dw else None
    dxs = _input_grads(_split_grads(grad, weight, packed, drop), xs, mask) if need_dx else []
    return dxs, dw, db
