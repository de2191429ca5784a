"""Triton kernels of the bilinear pooling family (DESIGN.md section 6), behind
``fusionops.ops._bilinear.BilinearKernels``: MFB/MLB, MUTAN, BLOCK, and MFH (``chain``).

What is Triton and what is not: rows go in tiles; per tile the projections ``A = x Wxᵀ + bx``,
``B = t Wtᵀ + bt`` (chunked: batched) and the output projection are torch matmuls (cuBLAS on a
GPU), the middle part (activation, product, sum-pool over the rank) is one Triton kernel
forward and one backward, and the optional normalisation ``n`` runs in torch on the tile's
pooled ``(rows, C·S)``. Only one tile's ``(C, rows, R·S)`` projections exist at a time, never
all rows'; the backward recomputes them and the kernel overwrites them with their gradients.

``chain`` (MFH): every chunk projects the whole ``x`` and ``t``, so the projections are one GEMM
of ``C·R·S`` columns per tile (``(rows, C·P)``), and chunk c's products are chained,
``e_c = (act(A_c) act(B_c)) e_{c−1}``, which ties the chunks of an index together: one program
walks all chunks of its block of rows and pooled columns (``_chain_fwd_kernel``), and the
backward's recomputation also keeps the tile's ``e_0 … e_{C−2}`` for ``_chain_bwd_kernel``, which
walks the chunks backwards carrying the chain's part of the gradient.

Dropout (issue 20; ``drop_in``, ``drop_prod``, ``drop_out``, ``seed``): inverted and hashed, the
masks of ``fusionops.reference.bilinear.hashed_dropout`` (tensor_fusion's hash: its ``_fmix32``
and ``_dropped``), regenerated in backward, never stored. Sites act(A_c), act(B_c) and e_c
(columns c·P + i of the (N, C·P) projections) are masked by the pooling kernels as they read the
unmasked projections (the activation's backward needs act(A) itself), their DROP_IN/DROP_PROD
variants compiled only when on, with smaller tiles (the hashes' registers); z (columns of the
(N, C·S) z) by ``_drop_kernel`` on the tile, forward and backward. Rows are global: each tile
passes its first row. With every p = 0 the kernels and bits are those without dropout.

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
from fusionops.reference.bilinear import SITE_A, SITE_B, SITE_E, SITE_Z, site_seed
from fusionops.reference.tensor_fusion import dropout_threshold
from fusionops.triton._common import _HALF, _acc, _block, _on
from fusionops.triton.tensor_fusion import _COL_MUL, _ROW_MUL, _SEED_SALT, _dropped, _fmix32

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


# ---- dropout: the masks of fusionops.reference.bilinear.hashed_dropout, regenerated ----------
# Each site's seed is site_seed(seed, site); the hash is tensor_fusion's (its _fmix32 and
# constants), with the row key computed once per program and site, the column's part per element.


@triton.jit
def _row_key(seed, rows):
    """The hash's row key of global ``rows`` (any shape) for one site's ``seed`` in [0, 2^31):
    dropout_keep's fmix32(fmix32(seed ^ salt) ^ row · ROW_MUL)."""
    seed_key = _fmix32(seed.to(tl.uint32) ^ _SEED_SALT)
    return _fmix32(seed_key ^ (rows.to(tl.uint32) * _ROW_MUL))


@triton.jit
def _kept(row_key, cols, threshold):
    """Whether element (row, col) is kept: row_key and cols broadcast against each other."""
    h = _fmix32(row_key + cols.to(tl.uint32) * _COL_MUL)
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def _drop(v, keep, scale):
    """Inverted dropout of v: kept times scale, dropped exactly 0 (selected: a dropped inf or
    NaN is 0, as the reference's torch.where)."""
    return tl.where(keep, v * scale, 0.0)


@triton.jit(do_not_specialize=["row0", "seed"])  # a new seed per call: no recompilation
def _drop_kernel(src_ptr, dst_ptr, T, W, row0, seed, threshold, scale_ptr, BLOCK_T: tl.constexpr,
                 BLOCK_W: tl.constexpr):  # fmt: skip
    """dst = the z site's dropout of a contiguous (T, W) tile of z (or of dL/dz) holding rows
    row0 + [0, T) of the (N, C·S) z; dst may be src."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (rows < T)[:, None] & (cols < W)[None, :]
    off = rows.to(tl.int64)[:, None] * W + cols[None, :]
    v = tl.load(src_ptr + off, mask=ok, other=0.0)
    v = _dropped(v, seed, threshold, scale_ptr, row0 + rows.to(tl.int64), cols)
    tl.store(dst_ptr + off, v.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _in_keys(rows, seed_a, seed_b, seed_e, DROP_IN: tl.constexpr, DROP_PROD: tl.constexpr):
    """The row keys of the sites A, B and E (0 for a site that is off: never read)."""
    key_a = rows.to(tl.uint32) * 0
    key_b = key_a
    key_e = key_a
    if DROP_IN:
        key_a = _row_key(seed_a, rows)
        key_b = _row_key(seed_b, rows)
    if DROP_PROD:
        key_e = _row_key(seed_e, rows)
    return key_a, key_b, key_e


@triton.jit
def _activated_product(va, vb, key_a, key_b, idx, thr_in, scale_ptr, ACT: tl.constexpr,
                       DROP_IN: tl.constexpr):  # fmt: skip
    """drop_a(act(va)) ⊙ drop_b(act(vb)) at product index ``idx`` (the forward kernels' e before
    the E site's dropout)."""
    fa = _act(va, ACT)
    fb = _act(vb, ACT)
    if DROP_IN:
        s_in = tl.load(scale_ptr)
        fa = _drop(fa, _kept(key_a, idx, thr_in), s_in)
        fb = _drop(fb, _kept(key_b, idx, thr_in), s_in)
    return fa * fb


@triton.jit(do_not_specialize=["row0", "seed_a", "seed_b", "seed_e", "thr_in", "thr_prod"])
def _pool_fwd_kernel(
    a_ptr, b_ptr, p_ptr, T, S, R, C, row0, seed_a, seed_b, seed_e, thr_in, thr_prod, scale_ptr,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, DROP_IN: tl.constexpr, DROP_PROD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """p[n, c·S + j] = Σ_r e[n, c·P + i], e = drop_e(drop_a(act(A[c, n, i])) drop_b(act(B[c, n, i]))),
    i = r·S + j or j·R + r. The dropouts (DROP_IN: sites A and B; DROP_PROD: site E) mask
    element (row0 + n, c·P + i) with the scales scale_ptr[0] (in), scale_ptr[1] (prod)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (rows < T)[:, None] & (cols < S)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    P = R * S
    base = (c * T + rows64[:, None]) * P
    ty = p_ptr.dtype.element_ty  # the accumulation dtype; A and B may be 16-bit (GPU)
    key_a, key_b, key_e = _in_keys((row0 + rows64)[:, None], seed_a, seed_b, seed_e, DROP_IN, DROP_PROD)
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=ty)
    for r in range(R):
        if RANK_MAJOR:
            i = r * S + cols64[None, :]
        else:
            i = cols64[None, :] * R + r
        va = tl.load(a_ptr + base + i, mask=ok, other=0.0).to(ty)
        vb = tl.load(b_ptr + base + i, mask=ok, other=0.0).to(ty)
        e = _activated_product(va, vb, key_a, key_b, c * P + i, thr_in, scale_ptr, ACT, DROP_IN)
        if DROP_PROD:
            e = _drop(e, _kept(key_e, c * P + i, thr_prod), tl.load(scale_ptr + 1))
        acc += e
    tl.store(p_ptr + rows64[:, None] * (C * S) + c * S + cols64[None, :], acc, mask=ok)


@triton.jit(do_not_specialize=["row0", "seed_a", "seed_b", "seed_e", "thr_in", "thr_prod"])
def _pool_bwd_kernel(
    a_ptr, b_ptr, dp_ptr, T, S, R, C, row0, seed_a, seed_b, seed_e, thr_in, thr_prod, scale_ptr,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, DROP_IN: tl.constexpr, DROP_PROD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """A, B (pre-activation) overwritten with dL/dA = drop_a(drop_e(dp) drop_b(act(B))) act'(A),
    dL/dB likewise (each mask as the forward's, so a dropped element's gradient is 0 whatever
    dp holds); computed in dp's dtype, stored in A's (16-bit on a GPU). The activation's
    backward reads the unmasked act(A) (tanh: 1 − a²)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (rows < T)[:, None] & (cols < S)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    P = R * S
    base = (c * T + rows64[:, None]) * P
    dp = tl.load(dp_ptr + rows64[:, None] * (C * S) + c * S + cols64[None, :], mask=ok, other=0.0)
    key_a, key_b, key_e = _in_keys((row0 + rows64)[:, None], seed_a, seed_b, seed_e, DROP_IN, DROP_PROD)
    for r in range(R):
        if RANK_MAJOR:
            i = r * S + cols64[None, :]
        else:
            i = cols64[None, :] * R + r
        va = tl.load(a_ptr + base + i, mask=ok, other=0.0).to(dp.dtype)
        vb = tl.load(b_ptr + base + i, mask=ok, other=0.0).to(dp.dtype)
        fa = _act(va, ACT)
        fb = _act(vb, ACT)
        g = dp
        if DROP_PROD:
            g = _drop(dp, _kept(key_e, c * P + i, thr_prod), tl.load(scale_ptr + 1))
        if DROP_IN:
            s_in = tl.load(scale_ptr)
            ka = _kept(key_a, c * P + i, thr_in)
            kb = _kept(key_b, c * P + i, thr_in)
            # (g · other) first: mul's backward, then the dropout's, then the activation's.
            ga = _drop(g * _drop(fb, kb, s_in), ka, s_in)
            gb = _drop(g * _drop(fa, ka, s_in), kb, s_in)
        else:
            ga = g * fb  # (dp · other) first: mul's backward, then the activation's
            gb = g * fa
        tl.store(a_ptr + base + i, _act_backward(ga, va, fa, ACT), mask=ok)
        tl.store(b_ptr + base + i, _act_backward(gb, vb, fb, ACT), mask=ok)


# ---- chain mode (MFH): e_c = (act(A_c) ⊙ act(B_c)) ⊙ e_{c−1} ---------------------------------
# Chunk c's product depends on every earlier chunk's at the same index i, so one program walks
# all C chunks of its (rows, columns) block in sequence, holding e for the R products of each of
# its pooled columns: a 3-D tile (rows, pooled columns, ranks), summed over the ranks. R is
# covered in blocks of at most _CHAIN_R_BLOCK (the products of different r never meet).


@triton.jit
def _chain_tile(T, S, R, r0, RANK_MAJOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_R: tl.constexpr):  # fmt: skip
    """The program's rows (T, 1) and pooled columns (1, S) as int64, the product index i of
    ranks [r0, r0 + BLOCK_R) (rows, S, R) and its mask, the 2-D (rows, S) mask of p."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    rs = r0 + tl.arange(0, BLOCK_R)
    ok2 = (rows < T)[:, None] & (cols < S)[None, :]
    ok = ok2[:, :, None] & (rs < R)[None, None, :]
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]
    rs64 = rs.to(tl.int64)[None, None, :]
    if RANK_MAJOR:
        i = rs64 * S + cols64[:, :, None]
    else:
        i = cols64[:, :, None] * R + rs64
    return rows64, cols64, i, ok, ok2


@triton.jit(do_not_specialize=["row0", "seed_a", "seed_b", "seed_e", "thr_in", "thr_prod"])
def _chain_fwd_kernel(
    a_ptr, b_ptr, p_ptr, T, S, R, C, e_ptr, row0, seed_a, seed_b, seed_e, thr_in, thr_prod, scale_ptr,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, STORE_E: tl.constexpr, DROP_IN: tl.constexpr,
    DROP_PROD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """p[n, c·S + j] = Σ_r e_c[n, i]; A, B (T, C·P) pre-activation, p (T, C·S) in the
    accumulation dtype. STORE_E (the backward's recomputation): e_0 … e_{C−2} also written to
    E (T, (C−1)·P) in p's dtype, for the backward kernel's walk down the chunks. Dropout as
    _pool_fwd_kernel's at element (row0 + n, c·P + i): e_c = drop_e((drop_a(act(A_c))
    drop_b(act(B_c))) e_{c−1}), so e_c is masked before it is pooled, stored and chained on."""
    P = R * S
    ty = p_ptr.dtype.element_ty  # the accumulation dtype; A and B may be 16-bit (GPU)
    for r0 in range(0, R, BLOCK_R):
        rows64, cols64, i, ok, ok2 = _chain_tile(T, S, R, r0, RANK_MAJOR, BLOCK_T, BLOCK_S, BLOCK_R)
        a_row = a_ptr + rows64[:, :, None] * (C * P) + i
        b_row = b_ptr + rows64[:, :, None] * (C * P) + i
        e_row = e_ptr + rows64[:, :, None] * ((C - 1) * P) + i
        p_row = p_ptr + rows64 * (C * S) + cols64
        grow = (row0 + rows64)[:, :, None]  # the call's rows, for the masks
        key_a, key_b, key_e = _in_keys(grow, seed_a, seed_b, seed_e, DROP_IN, DROP_PROD)
        e = tl.full((BLOCK_T, BLOCK_S, BLOCK_R), 1.0, dtype=ty)  # e_{−1}: ab ⊙ 1 is ab exactly
        for c in range(C):
            va = tl.load(a_row + c * P, mask=ok, other=0.0).to(ty)
            vb = tl.load(b_row + c * P, mask=ok, other=0.0).to(ty)
            ab = _activated_product(va, vb, key_a, key_b, c * P + i, thr_in, scale_ptr, ACT, DROP_IN)
            e = ab * e  # (act(A) ⊙ act(B)) ⊙ e_{c−1}: the reference's a * b * skip grouping
            if DROP_PROD:
                e = _drop(e, _kept(key_e, c * P + i, thr_prod), tl.load(scale_ptr + 1))
            if STORE_E:
                kept = tl.full((1, 1, 1), c, tl.int32) < C - 1  # e_{C−1} is not read
                tl.store(e_row + c * P, e.to(e_ptr.dtype.element_ty), mask=ok & kept)
            part = tl.sum(e, axis=2)
            if r0 > 0:  # ranks past the first block: add to what the earlier blocks stored
                part += tl.load(p_row + c * S, mask=ok2, other=0.0)
            tl.store(p_row + c * S, part, mask=ok2)


@triton.jit(do_not_specialize=["row0", "seed_a", "seed_b", "seed_e", "thr_in", "thr_prod"])
def _chain_bwd_kernel(
    a_ptr, b_ptr, dp_ptr, T, S, R, C, e_ptr, row0, seed_a, seed_b, seed_e, thr_in, thr_prod, scale_ptr,
    RANK_MAJOR: tl.constexpr, ACT: tl.constexpr, DROP_IN: tl.constexpr, DROP_PROD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """A, B (T, C·P) overwritten with dL/dA_c, dL/dB_c, walking c from C−1 down to 0 and
    carrying the chain's part of dL/de_c: dL/de_c = dp_c (spread over its R products) +
    dL/de_{c+1} ⊙ ab_{c+1}; dL/d(ab)_c = dL/de_c ⊙ e_{c−1} (c ≥ 1, e_{c−1} read from E, the
    forward kernel's STORE_E); then (g · other) and the activation's backward, as autograd.
    Dropout: dL/de_c (of the masked e_c) goes through drop_e before it reaches ab_c and the
    carry, ab_c is the masked drop_a(act(A_c)) drop_b(act(B_c)), and (g · other) through drop_a
    (drop_b) before the activation's backward, which reads the unmasked act(A_c)."""
    P = R * S
    ty = dp_ptr.dtype.element_ty
    for r0 in range(0, R, BLOCK_R):
        rows64, cols64, i, ok, ok2 = _chain_tile(T, S, R, r0, RANK_MAJOR, BLOCK_T, BLOCK_S, BLOCK_R)
        a_row = a_ptr + rows64[:, :, None] * (C * P) + i
        b_row = b_ptr + rows64[:, :, None] * (C * P) + i
        e_row = e_ptr + rows64[:, :, None] * ((C - 1) * P) + i
        dp_row = dp_ptr + rows64 * (C * S) + cols64
        grow = (row0 + rows64)[:, :, None]  # the call's rows, for the masks
        key_a, key_b, key_e = _in_keys(grow, seed_a, seed_b, seed_e, DROP_IN, DROP_PROD)
        carry = tl.zeros((BLOCK_T, BLOCK_S, BLOCK_R), dtype=ty)  # dL/de_{c+1} ⊙ ab_{c+1}
        for k in range(C):
            c = C - 1 - k
            dp = tl.load(dp_row + c * S, mask=ok2, other=0.0)
            g = dp[:, :, None] + carry  # dL/de_c
            if DROP_PROD:
                g = _drop(g, _kept(key_e, c * P + i, thr_prod), tl.load(scale_ptr + 1))
            va = tl.load(a_row + c * P, mask=ok, other=0.0).to(ty)
            vb = tl.load(b_row + c * P, mask=ok, other=0.0).to(ty)
            fa = _act(va, ACT)
            fb = _act(vb, ACT)
            ma = fa
            mb = fb
            if DROP_IN:
                s_in = tl.load(scale_ptr)
                ka = _kept(key_a, c * P + i, thr_in)
                kb = _kept(key_b, c * P + i, thr_in)
                ma = _drop(fa, ka, s_in)
                mb = _drop(fb, kb, s_in)
            # c = 0 has no e_{−1}: 1, and g ⊙ 1 is g exactly (NaN and inf included).
            has_prev = tl.full((1, 1, 1), c, tl.int32) > 0  # a tensor: the interpreter takes no bool mask
            prev = tl.load(e_row + (c - 1) * P, mask=ok & has_prev, other=1.0).to(ty)
            carry = g * (ma * mb)
            g = g * prev
            ga = g * mb
            gb = g * ma
            if DROP_IN:
                ga = _drop(ga, ka, s_in)
                gb = _drop(gb, kb, s_in)
            tl.store(a_row + c * P, _act_backward(ga, va, fa, ACT), mask=ok)
            tl.store(b_row + c * P, _act_backward(gb, vb, fb, ACT), mask=ok)


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


def _grid(
    rows: int, c: int, s: int, cfg: _Config, masked: bool = False
) -> tuple[tuple[int, int, int], int, int, int]:
    """Grid, BLOCK_T, BLOCK_S and num_warps: at most 8 elements per thread, since the backward
    holds 15-18 registers per element (64-bit addresses, dp, A, B and their activations) and
    spilled at 16 per thread (MFB's 16 x 128 tiles at 4 warps: 255 registers and spill stores
    on sm_90 and sm_80 with triton 3.9; 142 registers, no spill, at 8 warps). ``masked`` (a
    dropout on act(A), act(B) or e: the masks' hashes): at most 4, since at 8 the backward
    held 141 (sm_90) and 163 (sm_80) registers at MFB's headline, one CTA per SM (at 4: 74-80,
    three; tools/triton_static.py's headline-gpu-dropout, triton 3.9). On a GPU the
    row block is halved (down to ``cfg.min_block`` elements) until the launch has
    ``cfg.programs`` CTAs."""
    most = 1024 if masked else 2048  # elements of a program: 8 warps of 4 or 8 per thread
    bs = _block(s, 16, 128)
    bt = _block(rows, 1, max(1, most // bs))
    per_row_block = c * triton.cdiv(s, bs)
    while bt > 1 and bt * bs > cfg.min_block and triton.cdiv(rows, bt) * per_row_block < cfg.programs:
        bt //= 2
    warps = 8 if bt * bs > most // 2 else 4
    return (triton.cdiv(rows, bt), c, triton.cdiv(s, bs)), bt, bs, warps


class _Drops:
    """A call's dropouts as the kernels take them: the middle kernels' ``args(row0)`` (row0,
    the seeds of sites A, B, E, the thresholds floor(p · 2^24) of drop_in and drop_prod, and a
    tensor of the scales 1/(1 − p) of in, prod and out in the accumulation dtype: a Python float
    would reach a kernel as float32) and their constexprs ``flags``; the z site's ``z_seed``,
    ``z_threshold``, ``z_scale`` (for _drop_kernel). All off: no allocation, the kernels as
    without dropout."""

    def __init__(self, drop_in: float, drop_prod: float, drop_out: float, seed: int, acc: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        self.drop_in, self.drop_prod, self.drop_out = drop_in > 0, drop_prod > 0, drop_out > 0
        self.seeds = tuple(site_seed(seed, site) for site in (SITE_A, SITE_B, SITE_E))
        self.thresholds = (dropout_threshold(drop_in), dropout_threshold(drop_prod))
        self.z_seed, self.z_threshold = site_seed(seed, SITE_Z), dropout_threshold(drop_out)
        self.scales = None
        if self.drop_in or self.drop_prod or self.drop_out:
            ps = (drop_in, drop_prod, drop_out)
            self.scales = torch.tensor([1.0 / (1.0 - q) for q in ps], dtype=acc, device=device)

    @property
    def middle(self) -> bool:
        """Whether any of act(A), act(B), e is masked."""
        return self.drop_in or self.drop_prod

    def args(self, row0: int, placeholder: Tensor) -> tuple:
        """The middle kernels' dropout arguments for a tile of first (global) row ``row0``."""
        scales = placeholder if self.scales is None else self.scales  # never read when off
        return (row0, *self.seeds, *self.thresholds, scales)

    @property
    def flags(self) -> dict[str, bool]:
        return {"DROP_IN": self.drop_in, "DROP_PROD": self.drop_prod}

    def drop_z(self, src: Tensor, row0: int, out: Tensor | None = None) -> Tensor:
        """The z site's dropout of a contiguous (rows, C·S) tile of z or dL/dz (rows row0 + ...),
        into ``out`` (``src`` itself for in place; default a new tensor)."""
        assert src.is_contiguous() and (out is None or out.is_contiguous())  # the kernel's (T, W) rows
        out = torch.empty_like(src) if out is None else out
        rows, w = src.shape
        if rows and w:
            bw = _block(w, 16, 128)
            bt = _block(rows, 1, max(1, 1024 // bw))
            grid = (triton.cdiv(rows, bt), triton.cdiv(w, bw))
            _drop_kernel[grid](
                src, out, rows, w, row0, self.z_seed, self.z_threshold, self.scales[2:], BLOCK_T=bt,
                BLOCK_W=bw, num_warps=4,
            )  # fmt: skip
        return out


def _pool(
    A: Tensor, B: Tensor, rank: int, rank_major: bool, act: int, acc: torch.dtype, cfg: _Config,
    drops: _Drops, row0: int,
) -> Tensor:  # fmt: skip
    """The pooled (rows, C·S) in ``acc`` from the (C, rows, R·S) A and B (any float dtype);
    the tile's rows are rows row0 + [0, rows) of the call (the dropout masks' rows)."""
    c, rows, p = A.shape
    s = p // rank
    pooled = torch.empty(rows, c * s, dtype=acc, device=A.device)
    grid, bt, bs, warps = _grid(rows, c, s, cfg, drops.middle)
    _pool_fwd_kernel[grid](
        A, B, pooled, rows, s, rank, c, *drops.args(row0, pooled), RANK_MAJOR=rank_major, ACT=act,
        **drops.flags, BLOCK_T=bt, BLOCK_S=bs, num_warps=warps,
    )  # fmt: skip
    return pooled


def _pool_backward(
    A: Tensor, B: Tensor, dp: Tensor, rank: int, rank_major: bool, act: int, cfg: _Config, drops: _Drops,
    row0: int,
) -> None:  # fmt: skip
    c, rows, p = A.shape
    grid, bt, bs, warps = _grid(rows, c, p // rank, cfg, drops.middle)
    dp = dp.contiguous()
    _pool_bwd_kernel[grid](
        A, B, dp, rows, p // rank, rank, c, *drops.args(row0, dp), RANK_MAJOR=rank_major, ACT=act,
        **drops.flags, BLOCK_T=bt, BLOCK_S=bs, num_warps=warps,
    )  # fmt: skip


# The largest rank block of the chain kernels' 3-D tiles (a larger R takes several in turn).
_CHAIN_R_BLOCK = 16
# Elements (rows x pooled columns x ranks) of one chain program's tile. At MFH's headline on
# sm_90 (triton 3.9, tools/triton_static.py) 2048 (8 per thread) held 200 registers in the
# backward kernel, one CTA per SM; 1024 holds 110 (the forward 64), two CTAs, no spill.
_CHAIN_TILE = 1024


def _chain_grid(
    rows: int, s: int, rank: int, cfg: _Config, masked: bool = False
) -> tuple[tuple[int, int], int, int, int, int]:
    """Grid, BLOCK_T, BLOCK_S, BLOCK_R and num_warps of the chain kernels: each program covers
    every chunk (the grid has no chunk axis) of at most _CHAIN_TILE elements, 4 per thread at 8
    warps (``masked``, a dropout on act(A), act(B) or e: half, 2 per thread, since at 4 the
    backward held 154 registers on sm_80 at MFH's headline, one CTA per SM; at 2: 71-78,
    three); row blocks halved as in _grid."""
    most = _CHAIN_TILE // 2 if masked else _CHAIN_TILE
    br = _block(rank, 1, _CHAIN_R_BLOCK)
    bs = _block(s, 1, max(1, 128 // br))
    bt = _block(rows, 1, max(1, most // (bs * br)))
    per_row_block = triton.cdiv(s, bs)
    while bt > 1 and bt * bs * br > cfg.min_block and triton.cdiv(rows, bt) * per_row_block < cfg.programs:
        bt //= 2
    warps = 8 if bt * bs * br > most // 2 else 4
    return (triton.cdiv(rows, bt), triton.cdiv(s, bs)), bt, bs, br, warps


def _chain_pool(
    A: Tensor, B: Tensor, c: int, rank: int, rank_major: bool, act: int, acc: torch.dtype, cfg: _Config,
    drops: _Drops, row0: int, E: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The pooled (rows, C·S) in ``acc`` from the chained products of the (rows, C·P) A and B
    (rows row0 + [0, rows) of the call); ``E`` (rows, (C−1)·P) in ``acc``, when given, receives
    e_0 … e_{C−2} (masked, as chained on)."""
    rows, cp = A.shape
    s = cp // (c * rank)
    pooled = torch.empty(rows, c * s, dtype=acc, device=A.device)
    grid, bt, bs, br, warps = _chain_grid(rows, s, rank, cfg, drops.middle)
    _chain_fwd_kernel[grid](
        A, B, pooled, rows, s, rank, c, pooled if E is None else E, *drops.args(row0, pooled),
        RANK_MAJOR=rank_major, ACT=act, STORE_E=E is not None, **drops.flags, BLOCK_T=bt, BLOCK_S=bs,
        BLOCK_R=br, num_warps=warps,
    )  # fmt: skip
    return pooled


def _chain_pool_backward(
    A: Tensor, B: Tensor, E: Tensor | None, dp: Tensor, c: int, rank: int, rank_major: bool, act: int,
    cfg: _Config, drops: _Drops, row0: int,
) -> None:  # fmt: skip
    """A, B (rows, C·P) overwritten with dL/dA, dL/dB; ``E`` as _chain_pool wrote it (None
    for C = 1: nothing is read from it)."""
    rows, cp = A.shape
    s = cp // (c * rank)
    dp = dp.contiguous()
    grid, bt, bs, br, warps = _chain_grid(rows, s, rank, cfg, drops.middle)
    _chain_bwd_kernel[grid](
        A, B, dp, rows, s, rank, c, dp if E is None else E, *drops.args(row0, dp), RANK_MAJOR=rank_major,
        ACT=act, **drops.flags, BLOCK_T=bt, BLOCK_S=bs, BLOCK_R=br, num_warps=warps,
    )  # fmt: skip


def _as_gemm(w: Tensor | None, chain: bool) -> Tensor | None:
    """A weight (C, P, d) or bias (C, P) as the GEMMs take it. Chain mode's C chunks all project
    the whole x (t): one GEMM of C·P columns, the weight seen as (1, C·P, d), the bias (1, C·P),
    so A is (1, rows, C·P) and its gradient's GEMMs sum the chunks' parts of dx."""
    if w is None or not chain:
        return w
    return w.reshape(1, -1, *w.shape[2:])


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


def forward(
    x, t, wx, bx, wt, bt, wo, bo, rank, rank_major, activation, normalize, chain: bool = False,
    drop_in: float = 0.0, drop_prod: float = 0.0, drop_out: float = 0.0, seed: int = 0,
) -> Tensor:  # fmt: skip
    """``y`` (N, O), contiguous, one tile of rows at a time. ``chain`` (MFH): x (N, dx) and t
    (N, dt) feed every chunk and chunk c's products are multiplied by chunk c−1's before pooling
    (``_chain_fwd_kernel``); the rest (tiles, GEMMs, normalisation) as without it.

    Dropout (inverted, hashed from ``seed``: fusionops.reference.bilinear.hashed_dropout's
    masks, site s seeded by site_seed(seed, s)): ``drop_in`` on act(A_c) and act(B_c),
    ``drop_prod`` on e_c (chain: before it is pooled and carried to chunk c+1), element (row,
    c·P + i) of the (N, C·P) projections, applied by the pooling kernels as they read A and B
    (which stay unmasked); ``drop_out`` on z (after n, before the output projection), element
    (row, j) of the (N, C·S) z, by _drop_kernel on the tile. Rows are the call's (global) rows.
    All 0: the same kernels and bits as without dropout."""
    n, c, p = x.shape[0], wx.shape[0], wx.shape[1]
    gc = 1 if chain else c  # chunks of the projection GEMMs
    cfg = _config(x.device)
    acc, gd = _acc(x.dtype), _gemm_dtype(x.dtype, cfg)
    Wx, Wt, Wo = _as_gemm(wx.to(gd), chain), _as_gemm(wt.to(gd), chain), wo.to(gd)
    Bx, Bt = (_as_gemm(None if b is None else b.to(gd), chain) for b in (bx, bt))
    Bo = None if bo is None else bo.to(gd)
    y = torch.empty(n, wo.shape[0], dtype=gd, device=x.device)
    tile = _tile_rows(n, c, p, gd, cfg)
    drops = _Drops(drop_in, drop_prod, drop_out, seed, acc, x.device)
    with _on(x.device):
        for r0 in range(0, n, tile):
            rows = min(tile, n - r0)
            A = _project(_chunks(x, r0, rows, gc, gd), Wx, Bx)
            B = _project(_chunks(t, r0, rows, gc, gd), Wt, Bt)
            if chain:
                pooled = _chain_pool(A[0], B[0], c, rank, rank_major, activation, acc, cfg, drops, r0)
            else:
                pooled = _pool(A, B, rank, rank_major, activation, acc, cfg, drops, r0)
            # 16-bit: z rounded to it, as the reference's z, for the output GEMM (and its
            # dropout, as the reference's, in that dtype).
            z = _normalize(pooled, c, normalize).to(gd)
            if drops.drop_out:
                drops.drop_z(z, r0, out=z)
            out = y[r0 : r0 + rows]
            if Bo is None:
                torch.mm(z, Wo.t(), out=out)
            else:
                torch.addmm(Bo, z, Wo.t(), out=out)
    return y.to(x.dtype)


def backward(
    grad, x, t, wx, bx, wt, bt, wo, rank, rank_major, activation, normalize, needs, chain: bool = False,
    drop_in: float = 0.0, drop_prod: float = 0.0, drop_out: float = 0.0, seed: int = 0,
) -> list[Tensor]:  # fmt: skip
    """Eight gradients (x, t, wx, bx, wt, bt, wo, bo); empty where not needed. The weights' and
    biases' gradients are summed over the tiles in the accumulation dtype (a 16-bit GEMM's
    tile partial rounded once); dx, dt are written in the GEMMs' dtype. ``chain``: the
    recomputation also keeps the tile's e_0 … e_{C−2} (one (rows, (C−1)·P) scratch in the
    accumulation dtype, reused by every tile), which ``_chain_bwd_kernel`` reads walking the
    chunks backwards; dx, dt sum the chunks' parts (one GEMM over the C·P columns).

    Dropout as ``forward``'s, every mask regenerated: the recomputation pools (and keeps in E)
    the masked products; dL/dz is masked (z site) before the normalisation's backward, which
    reads the unmasked z, and dW_o takes the masked z; the pooling kernels' backward masks as
    their forward."""
    n, c, p = x.shape[0], wx.shape[0], wx.shape[1]
    gc = 1 if chain else c  # chunks of the projection GEMMs
    cfg = _config(x.device)
    acc, gd = _acc(x.dtype), _gemm_dtype(x.dtype, cfg)
    Wx, Wt, Wo = _as_gemm(wx.to(gd), chain), _as_gemm(wt.to(gd), chain), wo.to(gd)
    Bx, Bt = (_as_gemm(None if b is None else b.to(gd), chain) for b in (bx, bt))
    dev = x.device

    def zeros(shape, need):
        return torch.zeros(shape, dtype=acc, device=dev) if need else None

    dx = torch.empty(n, x.shape[1], dtype=gd, device=dev) if needs[0] else None
    dt = torch.empty(n, t.shape[1], dtype=gd, device=dev) if needs[1] else None
    dwx, dwt, dwo = zeros(wx.shape, needs[2]), zeros(wt.shape, needs[4]), zeros(wo.shape, needs[6])
    dbx = zeros((c, p), needs[3] and bx is not None)
    dbt = zeros((c, p), needs[5] and bt is not None)
    # The GEMMs' views of the weight and bias gradients (chain: (1, C·P, d), (1, C·P)).
    gwx, gbx, gwt, gbt = (_as_gemm(g, chain) for g in (dwx, dbx, dwt, dbt))
    tile = _tile_rows(n, c, p, gd, cfg)
    E = torch.empty(tile, (c - 1) * p, dtype=acc, device=dev) if chain and c > 1 and n else None
    drops = _Drops(drop_in, drop_prod, drop_out, seed, acc, dev)
    with _on(dev):
        for r0 in range(0, n, tile):
            rows = min(tile, n - r0)
            X, Tt = _chunks(x, r0, rows, gc, gd), _chunks(t, r0, rows, gc, gd)
            A, B = _project(X, Wx, Bx), _project(Tt, Wt, Bt)
            Et = None if E is None else E[:rows]
            if chain:
                pooled = _chain_pool(A[0], B[0], c, rank, rank_major, activation, acc, cfg, drops, r0, Et)
            else:
                pooled = _pool(A, B, rank, rank_major, activation, acc, cfg, drops, r0)
            z = _normalize(pooled, c, normalize)
            G = grad[r0 : r0 + rows].to(gd)
            if dwo is not None:
                # The output GEMM's input: the masked z (a new tensor: n's backward reads z).
                _add_product(dwo, G.t(), drops.drop_z(z.to(gd), r0) if drops.drop_out else z.to(gd))
            gz = (G @ Wo).to(acc)
            if drops.drop_out:
                drops.drop_z(gz, r0, out=gz)  # dL/dz of the unmasked z
            dp = _normalize_backward(gz, pooled, z, c, normalize)
            # A, B now hold dL/dA, dL/dB.
            if chain:
                _chain_pool_backward(A[0], B[0], Et, dp, c, rank, rank_major, activation, cfg, drops, r0)
            else:
                _pool_backward(A, B, dp, rank, rank_major, activation, cfg, drops, r0)
            if gwx is not None:
                _add_product(gwx, A.transpose(1, 2), X)
            if gbx is not None:
                gbx += A.sum(1, dtype=acc)
            if gwt is not None:
                _add_product(gwt, B.transpose(1, 2), Tt)
            if gbt is not None:
                gbt += B.sum(1, dtype=acc)
            if dx is not None:
                dx[r0 : r0 + rows].view(rows, gc, -1).copy_(torch.bmm(A, Wx).transpose(0, 1))
            if dt is not None:
                dt[r0 : r0 + rows].view(rows, gc, -1).copy_(torch.bmm(B, Wt).transpose(0, 1))
    dbo = grad.to(acc).sum(0) if needs[7] else None
    empty = x.new_empty(0)
    return [empty if g is None else g.to(x.dtype) for g in (dx, dt, dwx, dbx, dwt, dbt, dwo, dbo)]
