"""Triton kernels of sparse skew-pair attention (DESIGN.md section 4), behind ``fusionops.ops._kernels``.

Per row n and pair p = (i, j), with the band ``J = [j - w, j + w] ∩ [0, Lb)`` (w the window
clipped to ``Lb - 1``, which leaves every band as it is) and per head h (columns
``h·dh … (h+1)·dh - 1``): ``q = ha[n,i] Wqᵀ + bq``, ``k_j' = hb[n,j'] Wkᵀ + bk``,
``v_j' = hb[n,j'] Wvᵀ + bv``, ``α = softmax_j'(q_h · k_j'h / sqrt(dh))``, ``c_h = Σ α_j' v_j'h``
and ``out[n,p] = ha[n,i] + c Woᵀ + bo``. ``bk`` adds ``q_h · bk_h`` to every score of a band,
which softmax cancels while it is finite; it is read all the same, so that a NaN or inf in it
gives the reference's NaN (and its gradient, ``Σ dk``, the reference's).

Head columns are taken in chunks of ``BLOCK_C`` (the head dim padded to a power of two, at
most 64: dh = 96 is a full chunk and a half-masked one), so no tile is wider than that whatever
dh is. Every tile is held transposed, columns by rows: a projection is the dot
``W[cols, :] @ x[rows, :]ᵀ``, (BLOCK_C, BLOCK_N), and the output tile ``Wo[outs, cols] @ ctxᵀ``,
(BLOCK_O, BLOCK_N), so that a dot's M dimension is 64 columns and its N the BLOCK_N rows (16 at
the GPU headline, to fill the SMs): Triton takes wgmma (sm_90) only from 64-row M tiles, and
would fall back to mma.sync with the rows in M. A band's scores live on chip as one
``(BLOCK_W, BLOCK_N)`` tile, ``BLOCK_W`` the band width ``min(2w + 1, Lb)`` padded to a power
of two: the score pass walks the head's chunks once (``q`` chunk, then the ``k`` chunk of
every band layer), accumulating ``q·k`` per band position; the softmax is then explicit over
that tile, and the value pass walks the chunks again (``v`` chunk of every band layer, weighted
by its row of α). Every projection is a ``tl.dot`` over D in tiles of ``BLOCK_K``, reading
``ha``/``hb``/weights with their strides (any, stride 0 included), so only the layers the
pairs and their bands touch are read, and no projection is written to memory.

One key (``w = 0``): ``α`` is 1 where the band's one score is finite and NaN where it is not
(the reference's softmax), and ``ds = α (dα - α dα)`` is 0 where dα is finite too. A guard
kernel (``_skew_guard_kernel``, one launch reading ha, hb, wq, wk, bq, bk once) writes
per-program maxima of |x| (+inf for a NaN or inf); each program of the main kernels reduces
them and, when the bound ``|q_e| <= max|ha| · D · max|wq| + max|bq|`` (k alike) proves every
score finite (``_scores_proven``), skips the score pass: ``c = v_j``. Otherwise it runs the
score pass over the one key (a runtime branch, no host synchronisation). Backward computes
``dα = dc · v`` exactly (both are at hand) and, where ds is NaN, stores NaN into small
buffers for the rows of dha and dhb and the heads' rows of dWq, dWk, dbq, dbk that the
reference's NaN dq and dk reach (see ``_skew_bwd_kernel``); there are no dQ or dK buffers.

Forward (``_skew_fwd_kernel``), one launch, grid ``(row tiles, pairs)``: a program computes,
head by head and chunk by chunk, ``c`` and adds ``c_chunk Wo[:, chunk]ᵀ`` into its output tile
(in column tiles of ``BLOCK_O``): the first chunk writes ``ha[rows, i] + bo + …``, later ones
read-modify-write the tile that only this program owns (no atomics). For float16/bfloat16
with more than one chunk in all (heads > 1 or dh > 64), the kernel writes a float32 (N, P, D)
output that is cast to the input dtype at the end, so that the sum over heads is rounded once,
not once per head; otherwise it writes the output itself.

Backward (``_skew_bwd_kernel``), one launch per row chunk (below), grid ``(row tiles, heads)``:
a program owns its rows and its head's columns of every buffer below and walks all pairs in
turn, recomputing what the forward computed: the score pass gives α; the value pass gives
``c``, ``dc = G Wo[:, chunk]`` and ``dα_j' = dc · v_j'`` and adds ``α_j' dc`` to ``dV``; then
``ds = α (dα - Σ α dα) / sqrt(dh)`` and a third pass (``q`` and ``k`` chunks recomputed) adds
``Σ ds_j' k_j'`` to ``dQ`` and ``ds_j' q`` to ``dK``. The weight and input gradients are then
torch GEMMs over these buffers (cuBLAS on the GPU).

What is kept, and why: ``dha`` needs ``dQ Wq`` and ``dWq`` needs ``dQᵀ ha``, reductions over
all heads and over all rows respectively that no program owns, and likewise for ``dK``, ``dV``
and ``c`` (for ``dWo = Gᵀ C``); so they go through memory once. Since ``ha[n, i]`` does not
depend on the pair, ``dQ`` is summed over the pairs sharing a layer of A (and ``dK``, ``dV``
over the pairs and band positions sharing a layer of B) by the program that owns those
elements (read-modify-write, no atomics), into one slot per touched layer:

* float32 (float64 for float64) ``dQ`` and ``R`` (the residual's gradient ``Σ_p G``) of shape
  ``(N_c, S_a, D)``, ``S_a = min(La, P)`` slots for the layers of A that pairs touch;
* float32 ``dK`` and ``dV`` of shape ``(N_c, S_b, D)``, ``S_b = min(Lb, P (2w + 1))`` slots for
  the layers of B that bands touch;
* ``C (N_c, P, D)`` in the input dtype (16-bit: the operand of a tensor-core GEMM, rounded as
  the forward rounds it for ``Wo``).

In all ``N_c · D · (2 S_a + 2 S_b)`` float32 and ``N_c · P · D`` input-dtype elements: of order
``N · P · D`` (times the band width for dK and dV when the bands do not overlap).

Only the buffers some requested gradient needs are allocated (none of dQ, dK with w = 0). The
slot of each layer is computed on the device (no host synchronisation); slots beyond those
touched stay zero and map to untouched layers, whose gradient is zero anyway (selected so,
since 0 · inf is not 0). ``N_c`` is N cut
into row chunks so that the buffers hold at most ``_SCRATCH_ELEMENTS`` elements; each chunk is
one launch and its GEMMs, weight gradients summed over chunks in float32. They live only
during backward; the forward holds nothing but its output (float32 for 16-bit, above).

Compute precision: float32 (float64 for float64 inputs, whose dots run in float64 as in the
other modules); ``tl.dot`` takes operands of the input dtype (tensor cores for 16-bit; bfloat16
as float32 under the interpreter, see ``_dot_dtype``); float32 dots follow torch's float32
matmul setting (``_common._input_precision``: tf32 on CUDA when allowed, else ``"ieee"``); the
softmax is taken in the accumulation dtype. The 16-bit GEMMs of backward take the float32 buffers rounded
to the input dtype. No atomics anywhere: results are reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusionops.triton._common import (
    _HALF,
    _TL,
    _acc,
    _block,
    _dot_dtype,
    _input_precision,
    _on,
    _row_block,
    _target_programs,
)

# The most elements the backward's buffers (dQ, R, dK, dV, C) may hold together: rows are
# processed in chunks below this (2^26: 256 MiB in float32).
_SCRATCH_ELEMENTS = 1 << 26


# --- on-chip tiles ---------------------------------------------------------------------------


@triton.jit
def _proj(
    x_ptr,
    stride_xn,
    stride_xd,
    rows64,
    row_ok,
    w_ptr,
    stride_wc,
    stride_wk,
    cols,
    col_ok,
    D,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(x[rows, :D] @ W[cols, :D]ᵀ)ᵀ`` as a (BLOCK_C, BLOCK_N) tile in ACC, ``W[c, k]`` at
    ``w_ptr + c·stride_wc + k·stride_wk``: transposed, so that the dot's M dimension is the
    BLOCK_C (64) head columns, not the few rows (Triton takes wgmma only from 64-row tiles).
    Rows and columns outside the masks give 0 (selected: their dots of zeros with a NaN or inf
    row of x or column of W are not 0)."""
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows64[None, :] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_wc
    acc = tl.zeros((BLOCK_C, BLOCK_N), ACC)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < D
        kk64 = kk.to(tl.int64)
        w = tl.load(w_cols + kk64[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + kk64[:, None] * stride_xd, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        acc = tl.dot(w.to(DOT), x.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    return tl.where(col_ok[:, None] & row_ok[None, :], acc, 0.0)


@triton.jit
def _bias(acc, b_ptr, stride_b, cols, col_ok, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(ACC)[:, None]
    return acc


@triton.jit
def _column(tile, band, t):
    """Band position ``t`` of a (BLOCK_W, BLOCK_N) tile, as (BLOCK_N,)."""
    return tl.sum(tl.where(band[:, None] == t, tile, 0.0), axis=0)


@triton.jit
def _band_alpha(
    a_ptr,
    stride_an,
    stride_ad,
    b_ptr,
    stride_bn,
    stride_bl,
    stride_bd,
    wq_ptr,
    stride_wq0,
    stride_wq1,
    wk_ptr,
    stride_wk0,
    stride_wk1,
    bq_ptr,
    stride_bq,
    bk_ptr,
    stride_bk,
    rows64,
    row_ok,
    head0,
    lo,
    hi,
    D,
    DH: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """The score pass: ``α`` (BLOCK_W, BLOCK_N) of the head whose first column is ``head0``,
    row ``t`` for band layer ``lo + t`` (0 beyond ``hi - lo``). ``a_ptr`` points at layer i.
    Over one key it is 1 where the score is finite and NaN where not, as the reference's softmax."""
    band = tl.arange(0, BLOCK_W)
    scores = tl.zeros((BLOCK_W, BLOCK_N), ACC)
    for c0 in range(0, DH, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)
        c_ok = cl < DH
        cols = head0 + cl
        q = _proj(
            a_ptr, stride_an, stride_ad, rows64, row_ok, wq_ptr, stride_wq0, stride_wq1, cols, c_ok, D,
            ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        q = _bias(q, bq_ptr, stride_bq, cols, c_ok, HAS_BQ, ACC)
        for jj in range(lo, hi):
            k = _proj(
                b_ptr + jj * stride_bl, stride_bn, stride_bd, rows64, row_ok, wk_ptr, stride_wk0, stride_wk1,
                cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
            )  # fmt: skip
            k = _bias(k, bk_ptr, stride_bk, cols, c_ok, HAS_BK, ACC)  # the shift q·bk: NaN if not finite
            s = tl.sum(q * k, axis=0)
            scores += tl.where(band[:, None] == jj - lo, s[None, :], 0.0)
    scale = 1.0 / tl.sqrt(tl.full((), DH, ACC))
    scores = tl.where(band[:, None] < hi - lo, scores * scale, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _add_to(ptrs, value, ok):
    """Read-modify-write of a tile only the calling program touches."""
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + value, mask=ok)


# --- one-key bands: the bound that proves every score finite -------------------------------------


@triton.jit
def _max_abs_share(
    x_ptr, s0, s1, s2, n1, n2, total, g, G: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """max |x| over program g's share of the ``total`` elements of x (flat index f at
    ``(f // (n1·n2))·s0 + (f // n2 % n1)·s1 + (f % n2)·s2``); +inf where one is NaN or inf."""
    top = tl.zeros((BLOCK,), ACC)
    for f0 in range(g * BLOCK, total, G * BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        ok = f < total
        x = tl.load(x_ptr + (f // (n1 * n2)) * s0 + (f // n2 % n1) * s1 + (f % n2) * s2, mask=ok, other=0.0)
        a = tl.abs(x.to(ACC))
        top = tl.maximum(top, tl.where(a < float("inf"), a, float("inf")))  # NaN: +inf
    return tl.max(top, axis=0)


@triton.jit
def _skew_guard_kernel(
    ha_ptr,
    stride_an,
    stride_al,
    stride_ad,
    hb_ptr,
    stride_bn,
    stride_bl,
    stride_bd,
    wq_ptr,
    stride_wq0,
    stride_wq1,
    wk_ptr,
    stride_wk0,
    stride_wk1,
    bq_ptr,
    stride_bq,
    bk_ptr,
    stride_bk,
    part_ptr,
    N,
    La,
    Lb,
    D,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    G: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``part[t, g]``: program g's share of max |ha|, |hb|, |wq|, |wk|, |bq|, |bk| (t = 0 … 5)."""
    g = tl.program_id(0)
    ma = _max_abs_share(ha_ptr, stride_an, stride_al, stride_ad, La, D, N * La * D, g, G, ACC, BLOCK)
    tl.store(part_ptr + g, ma)
    mb = _max_abs_share(hb_ptr, stride_bn, stride_bl, stride_bd, Lb, D, N * Lb * D, g, G, ACC, BLOCK)
    tl.store(part_ptr + G + g, mb)
    mq = _max_abs_share(wq_ptr, 0, stride_wq0, stride_wq1, D, D, D * D, g, G, ACC, BLOCK)
    tl.store(part_ptr + 2 * G + g, mq)
    mk = _max_abs_share(wk_ptr, 0, stride_wk0, stride_wk1, D, D, D * D, g, G, ACC, BLOCK)
    tl.store(part_ptr + 3 * G + g, mk)
    mbq = tl.zeros((), ACC)
    if HAS_BQ:
        mbq = _max_abs_share(bq_ptr, 0, 0, stride_bq, 1, D, D, g, G, ACC, BLOCK)
    tl.store(part_ptr + 4 * G + g, mbq)
    mbk = tl.zeros((), ACC)
    if HAS_BK:
        mbk = _max_abs_share(bk_ptr, 0, 0, stride_bk, 1, D, D, g, G, ACC, BLOCK)
    tl.store(part_ptr + 5 * G + g, mbk)


@triton.jit
def _scores_proven(part_ptr, D, DH: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr, HALF_MAX: tl.constexpr):
    """Whether every one-key score is finite, from the guard's maxima: |q_e| <= max|ha| · D ·
    max|wq| + max|bq| (k alike), and a dot of DH products of such factors, each factor and the
    dot below half the largest finite value (the half covers rounding, whatever the order of the
    sums). False where a maximum is +inf (a NaN or inf somewhere) or the bound overflows."""
    gs = tl.arange(0, G)
    ma = tl.max(tl.load(part_ptr + gs), axis=0)
    mb = tl.max(tl.load(part_ptr + G + gs), axis=0)
    mq = tl.max(tl.load(part_ptr + 2 * G + gs), axis=0)
    mk = tl.max(tl.load(part_ptr + 3 * G + gs), axis=0)
    mbq = tl.max(tl.load(part_ptr + 4 * G + gs), axis=0)
    mbk = tl.max(tl.load(part_ptr + 5 * G + gs), axis=0)
    width = tl.full((), 1.0, ACC) * D
    fq = ma * width * mq + mbq
    fk = mb * width * mk + mbk
    half = tl.full((), HALF_MAX, ACC)
    return (fq <= half) & (fk <= half) & (DH * fq * fk <= half)


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _skew_fwd_kernel(
    ha_ptr,
    stride_an,
    stride_al,
    stride_ad,
    hb_ptr,
    stride_bn,
    stride_bl,
    stride_bd,
    pairs_ptr,
    wq_ptr,
    stride_wq0,
    stride_wq1,
    wk_ptr,
    stride_wk0,
    stride_wk1,
    wv_ptr,
    stride_wv0,
    stride_wv1,
    wo_ptr,
    stride_wo0,
    stride_wo1,
    bq_ptr,
    stride_bq,
    bk_ptr,
    stride_bk,
    bv_ptr,
    stride_bv,
    bo_ptr,
    stride_bo,
    part_ptr,
    out_ptr,
    N,
    P,
    D,
    Lb,
    H,
    window,
    DH: tl.constexpr,
    ATTEND: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_BV: tl.constexpr,
    HAS_BO: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_W: tl.constexpr,
    G: tl.constexpr,
    HALF_MAX: tl.constexpr,
):
    """``out[rows, p]`` for one row tile and one pair, all heads. Without ATTEND (one key), the
    scores are computed only where the guard's bound (``part``) cannot prove them finite."""
    p = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    i = tl.load(pairs_ptr + 2 * p)
    j = tl.load(pairs_ptr + 2 * p + 1)
    lo = tl.maximum(j - window, 0)
    hi = tl.minimum(j + window + 1, Lb)
    a_ptr = ha_ptr + i * stride_al
    band = tl.arange(0, BLOCK_W)
    out_rows = out_ptr + rows64[None, :] * P * D + p * D
    if not ATTEND:
        proven = _scores_proven(part_ptr, D, DH, G, ACC, HALF_MAX)
    for h in range(H):
        head0 = h * DH
        if ATTEND:
            alpha = _band_alpha(
                a_ptr, stride_an, stride_ad, hb_ptr, stride_bn, stride_bl, stride_bd, wq_ptr, stride_wq0,
                stride_wq1, wk_ptr, stride_wk0, stride_wk1, bq_ptr, stride_bq, bk_ptr, stride_bk, rows64,
                row_ok, head0, lo, hi, D, DH, HAS_BQ, HAS_BK, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                BLOCK_W,
            )  # fmt: skip
        else:  # one key: α = 1 where its score is finite (proven, or computed), NaN where not
            alpha = tl.full((BLOCK_W, BLOCK_N), 1.0, ACC)
            if proven == 0:
                alpha = _band_alpha(
                    a_ptr, stride_an, stride_ad, hb_ptr, stride_bn, stride_bl, stride_bd, wq_ptr, stride_wq0,
                    stride_wq1, wk_ptr, stride_wk0, stride_wk1, bq_ptr, stride_bq, bk_ptr, stride_bk,
                    rows64, row_ok, head0, lo, hi, D, DH, HAS_BQ, HAS_BK, ACC, DOT, PRECISION, BLOCK_N,
                    BLOCK_C, BLOCK_K, BLOCK_W,
                )  # fmt: skip
            alpha_j = _column(alpha, band, 0)
        for c0 in range(0, DH, BLOCK_C):
            cl = c0 + tl.arange(0, BLOCK_C)
            c_ok = cl < DH
            cols = head0 + cl
            if ATTEND:
                ctx = tl.zeros((BLOCK_C, BLOCK_N), ACC)
                for jj in range(lo, hi):
                    v = _proj(
                        hb_ptr + jj * stride_bl, stride_bn, stride_bd, rows64, row_ok, wv_ptr, stride_wv0,
                        stride_wv1, cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                    )  # fmt: skip
                    ctx += _column(alpha, band, jj - lo)[None, :] * v
                ctx = _bias(ctx, bv_ptr, stride_bv, cols, c_ok, HAS_BV, ACC)  # Σ α = 1
            else:
                ctx = _proj(
                    hb_ptr + j * stride_bl, stride_bn, stride_bd, rows64, row_ok, wv_ptr, stride_wv0,
                    stride_wv1, cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                )  # fmt: skip
                ctx = alpha_j[None, :] * _bias(ctx, bv_ptr, stride_bv, cols, c_ok, HAS_BV, ACC)
            ctx_op = ctx.to(DOT)
            first = (h == 0) & (c0 == 0)
            # out[rows, p, :] += ctx Wo[:, cols]ᵀ, one column tile of the output at a time, as
            # (Wo[outs, cols] ctxᵀ)ᵀ: the BLOCK_O (64) output columns are the dot's M dimension.
            for o0 in range(0, D, BLOCK_O):
                outs = o0 + tl.arange(0, BLOCK_O)
                o_ok = outs < D
                outs64 = outs.to(tl.int64)
                wo = tl.load(
                    wo_ptr + outs64[:, None] * stride_wo0 + cols.to(tl.int64)[None, :] * stride_wo1,
                    mask=o_ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                y = tl.dot(wo.to(DOT), ctx_op, input_precision=PRECISION, out_dtype=ACC)
                ok = o_ok[:, None] & row_ok[None, :]
                ptrs = out_rows + outs64[:, None]
                # The first write starts from the residual and bo, later ones from the tile.
                # Predicated loads, not a branch: Triton 3.6 fails to pipeline this loop
                # with an scf.if after a wgmma (16-bit).
                res = a_ptr + rows64[None, :] * stride_an + outs64[:, None] * stride_ad
                y += tl.load(res, mask=ok & first, other=0.0).to(ACC)
                y += tl.load(ptrs, mask=ok & (not first), other=0.0).to(ACC)
                if HAS_BO:
                    bias = tl.load(bo_ptr + outs * stride_bo, mask=o_ok & first, other=0.0)
                    y += bias.to(ACC)[:, None]
                tl.store(ptrs, y, mask=ok)


@triton.jit
def _skew_bwd_kernel(
    g_ptr,
    stride_gn,
    stride_gp,
    stride_gd,
    ha_ptr,
    stride_an,
    stride_al,
    stride_ad,
    hb_ptr,
    stride_bn,
    stride_bl,
    stride_bd,
    pairs_ptr,
    a_slot_ptr,
    b_slot_ptr,
    wq_ptr,
    stride_wq0,
    stride_wq1,
    wk_ptr,
    stride_wk0,
    stride_wk1,
    wv_ptr,
    stride_wv0,
    stride_wv1,
    wo_ptr,
    stride_wo0,
    stride_wo1,
    bq_ptr,
    stride_bq,
    bk_ptr,
    stride_bk,
    bv_ptr,
    stride_bv,
    part_ptr,
    dq_ptr,
    r_ptr,
    dk_ptr,
    dv_ptr,
    c_ptr,
    pa_ptr,
    pb_ptr,
    ph_ptr,
    N,
    P,
    D,
    Lb,
    SA,
    SB,
    window,
    DH: tl.constexpr,
    ATTEND: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_BV: tl.constexpr,
    NEED_DQ: tl.constexpr,
    NEED_R: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    NEED_C: tl.constexpr,
    NEED_PA: tl.constexpr,
    NEED_PB: tl.constexpr,
    NEED_PH: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    G: tl.constexpr,
    HALF_MAX: tl.constexpr,
):
    """For one row tile and one head, over all pairs: adds to ``dq``/``r`` (N, SA, D) and
    ``dk``/``dv`` (N, SB, D) at the slots of the layers, and writes ``c`` (N, P, D).

    Without ATTEND (one key) there is no dQ or dK: ds = α (dα - α dα) is 0 where α and dα are
    finite, and NaN where not, which makes the reference's dq and dk NaN over the head, so its
    dha row, dhb row and the head's rows of dWq, dWk, dbq, dbk NaN. The kernel stores NaN at
    those places of ``pa`` (N, SA), ``pb`` (N, SB) and ``ph`` (H,) (zero-filled; every program
    that stores there stores NaN, so the result does not depend on their order)."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    head0 = h * DH
    band = tl.arange(0, BLOCK_W)
    a_rows = rows64[None, :] * SA * D
    b_rows = rows64[None, :] * SB * D
    if not ATTEND:
        proven = _scores_proven(part_ptr, D, DH, G, ACC, HALF_MAX)
    for p in range(P):
        i = tl.load(pairs_ptr + 2 * p)
        j = tl.load(pairs_ptr + 2 * p + 1)
        lo = tl.maximum(j - window, 0)
        hi = tl.minimum(j + window + 1, Lb)
        a_ptr = ha_ptr + i * stride_al
        a_slot = tl.load(a_slot_ptr + i).to(tl.int64) * D
        gp_ptr = g_ptr + p * stride_gp
        if ATTEND:
            alpha = _band_alpha(
                a_ptr, stride_an, stride_ad, hb_ptr, stride_bn, stride_bl, stride_bd, wq_ptr, stride_wq0,
                stride_wq1, wk_ptr, stride_wk0, stride_wk1, bq_ptr, stride_bq, bk_ptr, stride_bk, rows64,
                row_ok, head0, lo, hi, D, DH, HAS_BQ, HAS_BK, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                BLOCK_W,
            )  # fmt: skip
            d_alpha = tl.zeros((BLOCK_W, BLOCK_N), ACC)
        else:  # one key: α = 1 where its score is finite (proven, or computed), NaN where not
            alpha = tl.full((BLOCK_W, BLOCK_N), 1.0, ACC)
            if proven == 0:
                alpha = _band_alpha(
                    a_ptr, stride_an, stride_ad, hb_ptr, stride_bn, stride_bl, stride_bd, wq_ptr, stride_wq0,
                    stride_wq1, wk_ptr, stride_wk0, stride_wk1, bq_ptr, stride_bq, bk_ptr, stride_bk,
                    rows64, row_ok, head0, lo, hi, D, DH, HAS_BQ, HAS_BK, ACC, DOT, PRECISION, BLOCK_N,
                    BLOCK_C, BLOCK_K, BLOCK_W,
                )  # fmt: skip
            alpha_j = _column(alpha, band, 0)
            d_alpha_j = tl.zeros((BLOCK_N,), ACC)
        # The value pass: c, dc = G Wo[:, cols], dα and dV.
        for c0 in range(0, DH, BLOCK_C):
            cl = c0 + tl.arange(0, BLOCK_C)
            c_ok = cl < DH
            cols = head0 + cl
            cols64 = cols.to(tl.int64)
            ok = c_ok[:, None] & row_ok[None, :]
            dc = _proj(
                gp_ptr, stride_gn, stride_gd, rows64, row_ok, wo_ptr, stride_wo1, stride_wo0, cols, c_ok, D,
                ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
            )  # fmt: skip
            if ATTEND:
                ctx = tl.zeros((BLOCK_C, BLOCK_N), ACC)
                for jj in range(lo, hi):
                    v = _proj(
                        hb_ptr + jj * stride_bl, stride_bn, stride_bd, rows64, row_ok, wv_ptr, stride_wv0,
                        stride_wv1, cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                    )  # fmt: skip
                    v = _bias(v, bv_ptr, stride_bv, cols, c_ok, HAS_BV, ACC)
                    a_j = _column(alpha, band, jj - lo)
                    ctx += a_j[None, :] * v
                    if NEED_DQ or NEED_DK:
                        dv_dot = tl.sum(dc * v, axis=0)
                        d_alpha += tl.where(band[:, None] == jj - lo, dv_dot[None, :], 0.0)
                    if NEED_DV:
                        b_slot = tl.load(b_slot_ptr + jj).to(tl.int64) * D
                        _add_to(dv_ptr + b_rows + b_slot + cols64[:, None], a_j[None, :] * dc, ok)
            else:
                v = _proj(
                    hb_ptr + j * stride_bl, stride_bn, stride_bd, rows64, row_ok, wv_ptr, stride_wv0,
                    stride_wv1, cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                )  # fmt: skip
                v = _bias(v, bv_ptr, stride_bv, cols, c_ok, HAS_BV, ACC)
                ctx = alpha_j[None, :] * v
                if NEED_PA or NEED_PB or NEED_PH:
                    d_alpha_j += tl.sum(dc * v, axis=0)
                if NEED_DV:
                    b_slot = tl.load(b_slot_ptr + j).to(tl.int64) * D
                    _add_to(dv_ptr + b_rows + b_slot + cols64[:, None], alpha_j[None, :] * dc, ok)
            if NEED_C:
                tl.store(c_ptr + rows64[None, :] * P * D + p * D + cols64[:, None], ctx, mask=ok)
            if NEED_R:
                g_ptrs = gp_ptr + rows64[None, :] * stride_gn + cols64[:, None] * stride_gd
                g = tl.load(g_ptrs, mask=ok, other=0.0)
                _add_to(r_ptr + a_rows + a_slot + cols64[:, None], g.to(ACC), ok)
        if not ATTEND and (NEED_PA or NEED_PB or NEED_PH):
            d_score = alpha_j * (d_alpha_j - alpha_j * d_alpha_j)  # the reference's ds, up to the scale
            bad = row_ok & (d_score != 0.0)  # NaN: its dq and dk are NaN
            nan = tl.full((BLOCK_N,), float("nan"), ACC)
            if NEED_PA:
                tl.store(pa_ptr + rows64 * SA + tl.load(a_slot_ptr + i), nan, mask=bad)
            if NEED_PB:
                tl.store(pb_ptr + rows64 * SB + tl.load(b_slot_ptr + j), nan, mask=bad)
            if NEED_PH:
                any_bad = tl.max(bad.to(tl.int32), axis=0) > 0
                tl.store(ph_ptr + h, tl.full((), float("nan"), ACC), mask=any_bad)
        if ATTEND and (NEED_DQ or NEED_DK):
            # ds = α (dα - Σ α dα) / sqrt(dh); the third pass: dQ += Σ ds k, dK += ds q.
            scale = 1.0 / tl.sqrt(tl.full((), DH, ACC))
            d_score = alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=0)[None, :]) * scale
            for c0 in range(0, DH, BLOCK_C):
                cl = c0 + tl.arange(0, BLOCK_C)
                c_ok = cl < DH
                cols = head0 + cl
                cols64 = cols.to(tl.int64)
                ok = c_ok[:, None] & row_ok[None, :]
                if NEED_DK:
                    q = _proj(
                        a_ptr, stride_an, stride_ad, rows64, row_ok, wq_ptr, stride_wq0, stride_wq1, cols,
                        c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                    )  # fmt: skip
                    q = _bias(q, bq_ptr, stride_bq, cols, c_ok, HAS_BQ, ACC)
                dq = tl.zeros((BLOCK_C, BLOCK_N), ACC)
                for jj in range(lo, hi):
                    ds_j = _column(d_score, band, jj - lo)[None, :]
                    if NEED_DQ:
                        k = _proj(
                            hb_ptr + jj * stride_bl, stride_bn, stride_bd, rows64, row_ok, wk_ptr, stride_wk0,
                            stride_wk1, cols, c_ok, D, ACC, DOT, PRECISION, BLOCK_N, BLOCK_C, BLOCK_K,
                        )  # fmt: skip
                        dq += ds_j * _bias(k, bk_ptr, stride_bk, cols, c_ok, HAS_BK, ACC)
                    if NEED_DK:
                        b_slot = tl.load(b_slot_ptr + jj).to(tl.int64) * D
                        _add_to(dk_ptr + b_rows + b_slot + cols64[:, None], ds_j * q, ok)
                if NEED_DQ:
                    _add_to(dq_ptr + a_rows + a_slot + cols64[:, None], dq, ok)


# --- host side -------------------------------------------------------------------------------


def _band(window: int, lb: int) -> tuple[int, int]:
    """The window clipped to the stack (same bands) and BLOCK_W."""
    w = min(window, lb - 1)
    return w, triton.next_power_of_2(min(2 * w + 1, lb))


def _head_block(dh: int) -> int:
    return _block(dh, 16, 64)


# (BLOCK_N cap, BLOCK_K cap, num_warps) per kernel and dtype class, from sm_90 and sm_80 builds
# of the GPU headline (tools/triton_static.py, triton 3.9 and 3.6: D = 768, dh = 96, BLOCK_N = 16,
# windows 0 and 2): no spills anywhere; 16-bit dots on wgmma (HGMMA, no HMMA left) on sm_90,
# mma.sync on sm_80, whatever BLOCK_N is (the tiles are transposed, module docstring); ieee
# float32 and float64 ones on FMA units, so smaller tiles there. bf16 on sm_90: forward 117 / 118
# registers (3.6: 120 / 123) at window 0 / 2, 2 blocks per SM; backward 126 / 148 (3.6: 139 /
# 151), 1 or 2 blocks per SM. The 16-bit forward's BLOCK_K is 32: with 64, Triton 3.9 spilled at
# window 2 (before the tiles were transposed: 128 registers, 3 STL on sm_90), and the float32
# backward's is 16: with 32, Triton 3.6 spilled at window 2 on sm_90 even with 255 registers
# (3 STL; 193 registers and none with 16).
# The register cap handed to ptxas. Left to itself, ptxas kept these 8-warp kernels at 128
# registers (two blocks of 256 threads per SM) and spilled (triton 3.6, sm_90, the GPU headline:
# fp32 backward 6 STL at window 0; sm_80: bf16 and fp32 both ways); with the cap at 255 they use
# up to 244 registers (fp32 forward, sm_80) without spilling, one block per SM, which costs
# nothing here: the headline launches 80 (forward) and 128 (backward) programs for 132 SMs.
# The interpreter ignores it.
_MAXNREG = 255

_CONFIGS = {
    ("fwd", "half"): (64, 32, 8),
    ("fwd", "fp32"): (32, 32, 8),
    ("fwd", "fp64"): (32, 16, 8),
    ("bwd", "half"): (64, 32, 8),
    ("bwd", "fp32"): (32, 16, 8),
    ("bwd", "fp64"): (32, 32, 8),
}


def _config(
    kind: str, n: int, d: int, other_blocks: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int]:
    """BLOCK_N, BLOCK_K and num_warps; BLOCK_N shrinks (to 16) while there are fewer programs
    than fill the device."""
    cls = "half" if dtype in _HALF else "fp64" if dtype == torch.float64 else "fp32"
    bn_hi, bk_hi, warps = _CONFIGS[kind, cls]
    return _row_block(n, other_blocks, bn_hi, _target_programs(device)), _block(d, 16, bk_hi), warps


def _tiles(
    kind: str,
    n: int,
    d: int,
    heads: int,
    p: int,
    lb: int,
    window: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, int]:
    """The block sizes and num_warps of a forward (``kind="fwd"``) or backward launch (what
    tools/triton_static.py compiles; tests/test_triton_skew_tiles.py runs them under the
    interpreter). Every dot is ``(M, K) @ (K, BLOCK_N)`` with M = BLOCK_C head columns or
    BLOCK_O output columns: 64 at D >= 64 (wgmma's 64-row tile) whatever BLOCK_N is."""
    bn, block_k, warps = _config(kind, n, d, p if kind == "fwd" else heads, dtype, device)
    tiles = {
        "BLOCK_N": bn,
        "BLOCK_C": _head_block(d // heads),
        "BLOCK_K": block_k,
        "BLOCK_W": _band(window, lb)[1],
        "num_warps": warps,
    }
    if kind == "fwd":
        tiles["BLOCK_O"] = _block(d, 16, 64)
    return tiles


def _weight_args(*ws: Tensor) -> list:
    return [x for w in ws for x in (w, w.stride(0), w.stride(1))]


def _bias_args(b: Tensor | None, dummy: Tensor) -> list:
    return [dummy, 0] if b is None else [b, b.stride(0)]


# The guard: elements a step, and at most this many programs (their maxima, 6 per program, are
# what every program of the main kernels reduces), each taking a few steps of the largest input,
# so that its ~2 N L D + 2 D² reads are spread over the device rather than looped. The maxima
# reach the kernels through memory: no host synchronisation.
_GUARD_BLOCK = 2048
_GUARD_PROGRAMS = 512


def _guard(
    ha: Tensor, hb: Tensor, wq: Tensor, wk: Tensor, bq: Tensor | None, bk: Tensor | None
) -> tuple[Tensor, int]:
    """One-key bands: the per-program maxima (6, G) that ``_scores_proven`` reduces, and G."""
    n, la, d = ha.shape
    largest = max(n * max(la, hb.shape[1]) * d, d * d)
    g = min(_GUARD_PROGRAMS, triton.next_power_of_2(triton.cdiv(largest, 4 * _GUARD_BLOCK)))
    part = torch.empty(6, g, dtype=_acc(ha.dtype), device=ha.device)
    with _on(ha.device):
        _skew_guard_kernel[(g,)](
            ha, *ha.stride(), hb, *hb.stride(), *_weight_args(wq, wk), *_bias_args(bq, wq),
            *_bias_args(bk, wq), part, n, la, hb.shape[1], d, HAS_BQ=bq is not None,
            HAS_BK=bk is not None, G=g, ACC=_TL[_acc(ha.dtype)], BLOCK=_GUARD_BLOCK, num_warps=8,
        )  # fmt: skip
    return part, g


def _half_max(dtype: torch.dtype) -> float:
    """Half the largest finite value of the compute dtype (``_scores_proven``)."""
    return torch.finfo(_acc(dtype)).max / 2


def _slots(mark: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(slot of every layer (int32; meaningful where marked), the layers of slots
    0..count-1)``: the marked layers in order, then unmarked ones as padding. No host sync."""
    slot = (torch.cumsum(mark, 0, dtype=torch.int32) - 1).to(torch.int32)
    layers = torch.argsort((~mark).to(torch.uint8), stable=True)[:count]
    return slot, layers


# --- the kernel contract (fusionops.ops._kernels) ------------------------------------------

_GRADS = ("ha", "hb", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")


def forward(
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None,
    bk: Tensor | None,
    bv: Tensor | None,
    bo: Tensor | None,
    heads: int,
    window: int,
) -> Tensor:
    """``out`` of shape (N, P, D), contiguous."""
    n, _, d = ha.shape
    lb, p = hb.shape[1], pairs.shape[0]
    dtype, device = ha.dtype, ha.device
    dh = d // heads
    w = _band(window, lb)[0]
    bc = _head_block(dh)
    # 16-bit outputs written more than once are summed in a float32 tile buffer.
    staged = dtype in _HALF and heads * triton.cdiv(dh, bc) > 1
    out = torch.empty(n, p, d, dtype=_acc(dtype) if staged else dtype, device=device)
    if n == 0:
        return out.to(dtype)
    tiles = _tiles("fwd", n, d, heads, p, lb, window, dtype, device)
    part, g = (wq, 1) if w > 0 else _guard(ha, hb, wq, wk, bq, bk)
    with _on(device):
        _skew_fwd_kernel[(triton.cdiv(n, tiles["BLOCK_N"]), p)](
            ha,
            *ha.stride(),
            hb,
            *hb.stride(),
            pairs,
            *_weight_args(wq, wk, wv, wo),
            *_bias_args(bq, wq),
            *_bias_args(bk, wq),
            *_bias_args(bv, wq),
            *_bias_args(bo, wq),
            part,
            out,
            n,
            p,
            d,
            lb,
            heads,
            w,
            DH=dh,
            ATTEND=w > 0,
            HAS_BQ=bq is not None,
            HAS_BK=bk is not None,
            HAS_BV=bv is not None,
            HAS_BO=bo is not None,
            ACC=_TL[_acc(dtype)],
            DOT=_dot_dtype(dtype, device),
            PRECISION=_input_precision(dtype, device),
            G=g,
            HALF_MAX=_half_max(dtype),
            **tiles,
            maxnreg=_MAXNREG,
        )
    return out.to(dtype) if staged else out


@torch.no_grad()
def backward(
    grad: Tensor,
    ha: Tensor,
    hb: Tensor,
    pairs: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bq: Tensor | None,
    bk: Tensor | None,
    bv: Tensor | None,
    heads: int,
    window: int,
    needs: list[bool],
) -> list[Tensor]:
    """Ten gradients ``ha, hb, wq, wk, wv, wo, bq, bk, bv, bo`` given ``grad = dL/dout``
    (N, P, D); those whose flag in ``needs`` is False are empty tensors."""
    n, la, d = ha.shape
    lb, p = hb.shape[1], pairs.shape[0]
    dtype, device = ha.dtype, ha.device
    acc = _acc(dtype)
    w = _band(window, lb)[0]
    attend = w > 0
    need = dict(zip(_GRADS, needs, strict=True))
    shapes = dict(zip(_GRADS, (ha.shape, hb.shape, *[(d, d)] * 4, *[(d,)] * 4), strict=True))
    grads: dict[str, Tensor] = {}
    # One key: wq, wk, bq and bk get 0, or NaN over a head whose ds is NaN somewhere (ph).
    heads_poisoned = [] if attend else [name for name in ("wq", "wk", "bq", "bk") if need[name]]
    if need["bo"]:
        grads["bo"] = grad.sum((0, 1), dtype=acc).to(dtype)
    # What the kernel writes: dQ, R, dK, dV, C (module docstring).
    need_dq = attend and (need["ha"] or need["wq"] or need["bq"])
    need_r = need["ha"]
    need_dk = attend and (need["hb"] or need["wk"] or need["bk"])
    need_dv = need["hb"] or need["wv"] or need["bv"]
    need_c = need["wo"]
    # One key: the places where ds is NaN, for dha (pa), dhb (pb) and the heads' rows (ph).
    need_pa, need_pb, need_ph = not attend and need["ha"], not attend and need["hb"], bool(heads_poisoned)
    if n == 0 or not (need_dq or need_r or need_dk or need_dv or need_c or need_ph):
        for name in _GRADS:
            if need[name] and name not in grads:
                grads[name] = torch.zeros(shapes[name], dtype=dtype, device=device)
        return [grads.get(name, ha.new_empty(0)) for name in _GRADS]

    # Slots of the layers of A that pairs touch, and of B that bands touch.
    sa, sb = min(la, p), min(lb, p * (2 * w + 1))
    touched_a = torch.zeros(la, dtype=torch.bool, device=device).index_fill_(0, pairs[:, 0], True)
    touched_b = ((torch.arange(lb, device=device)[None, :] - pairs[:, 1:]).abs() <= w).any(0)
    (a_slot, a_layers), (b_slot, b_layers) = _slots(touched_a, sa), _slots(touched_b, sb)
    # The slots past the touched layers pad with untouched ones: their rows of dQ, dK and dV
    # are 0, but 0 · inf and 0 · NaN are not (a non-finite weight, or a non-finite value in an
    # untouched layer, which the reference never reads), so they are selected away before they
    # meet a weight or a stack.
    used_a = (torch.arange(sa, device=device) < touched_a.sum())[None, :, None]
    used_b = (torch.arange(sb, device=device) < touched_b.sum())[None, :, None]

    # Row chunks, each a multiple of BLOCK_N, so that the buffers stay under the cap.
    tiles = _tiles("bwd", n, d, heads, p, lb, window, dtype, device)
    bn = tiles["BLOCK_N"]
    per_row = d * (sa * (need_dq + need_r) + sb * (need_dk + need_dv) + p * need_c)
    chunk_rows = min(max(bn, _SCRATCH_ELEMENTS // per_row // bn * bn), triton.cdiv(n, bn) * bn)

    def buffer(flag: bool, slots: int) -> Tensor:
        return torch.zeros(chunk_rows if flag else 0, slots, d, dtype=acc, device=device)

    dq_s, r_s, dk_s, dv_s = buffer(need_dq, sa), buffer(need_r, sa), buffer(need_dk, sb), buffer(need_dv, sb)
    c_s = torch.empty(chunk_rows if need_c else 0, p, d, dtype=dtype, device=device)
    pa_s = torch.zeros(chunk_rows if need_pa else 0, sa, dtype=acc, device=device)
    pb_s = torch.zeros(chunk_rows if need_pb else 0, sb, dtype=acc, device=device)
    ph = torch.zeros(heads if need_ph else 0, dtype=acc, device=device)
    part, g_programs = (wq, 1) if attend else _guard(ha, hb, wq, wk, bq, bk)

    def mm(a: Tensor, b: Tensor) -> Tensor:
        """A float32 buffer times an input (16-bit: both in the input dtype, on tensor cores)."""
        return ((a.to(dtype) if dtype in _HALF else a) @ b).to(acc)

    if need["ha"]:
        grads["ha"] = torch.zeros(ha.shape, dtype=dtype, device=device)
    if need["hb"]:
        grads["hb"] = torch.zeros(hb.shape, dtype=dtype, device=device)
    # Weight and bias gradients summed over the chunks in float32.
    sums = {
        name: torch.zeros(shapes[name], dtype=acc, device=device)
        for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv")
        if need[name] and name not in grads and name not in heads_poisoned
    }

    for row0 in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - row0)
        if row0 > 0:
            for t in (dq_s, r_s, dk_s, dv_s, pa_s, pb_s):
                t.zero_()
        g = grad[row0 : row0 + rows]
        with _on(device):
            _skew_bwd_kernel[(triton.cdiv(rows, bn), heads)](
                g,
                *g.stride(),
                ha[row0:],
                *ha.stride(),
                hb[row0:],
                *hb.stride(),
                pairs,
                a_slot,
                b_slot,
                *_weight_args(wq, wk, wv, wo),
                *_bias_args(bq, wq),
                *_bias_args(bk, wq),
                *_bias_args(bv, wq),
                part,
                dq_s,
                r_s,
                dk_s,
                dv_s,
                c_s,
                pa_s,
                pb_s,
                ph,
                rows,
                p,
                d,
                lb,
                sa,
                sb,
                w,
                DH=d // heads,
                ATTEND=attend,
                HAS_BQ=bq is not None,
                HAS_BK=bk is not None,
                HAS_BV=bv is not None,
                NEED_DQ=need_dq,
                NEED_R=need_r,
                NEED_DK=need_dk,
                NEED_DV=need_dv,
                NEED_C=need_c,
                NEED_PA=need_pa,
                NEED_PB=need_pb,
                NEED_PH=need_ph,
                ACC=_TL[acc],
                DOT=_dot_dtype(dtype, device),
                PRECISION=_input_precision(dtype, device),
                G=g_programs,
                HALF_MAX=_half_max(dtype),
                **tiles,
                maxnreg=_MAXNREG,
            )
        dq, dk, dv = (t[:rows].view(-1, d) for t in (dq_s, dk_s, dv_s))
        if need["ha"]:
            da = r_s[:rows] + mm(dq, wq).view(rows, sa, d) if need_dq else r_s[:rows]
            if need_pa:
                da = da + pa_s[:rows, :, None]  # NaN over the rows whose ds is NaN
            da = torch.where(used_a, da, 0.0)
            grads["ha"][row0 : row0 + rows].index_copy_(1, a_layers, da.to(dtype))
        if need["hb"]:
            db = mm(dv, wv) + mm(dk, wk) if need_dk else mm(dv, wv)
            if need_pb:
                db = db + pb_s[:rows].view(-1, 1)
            db = torch.where(used_b, db.view(rows, sb, d), 0.0)
            grads["hb"][row0 : row0 + rows].index_copy_(1, b_layers, db.to(dtype))
        if "wq" in sums:
            ha_t = torch.where(used_a, ha[row0 : row0 + rows].index_select(1, a_layers), 0.0)
            sums["wq"] += mm(dq.t(), ha_t.view(-1, d))
        if "wk" in sums or "wv" in sums:
            hb_t = torch.where(used_b, hb[row0 : row0 + rows].index_select(1, b_layers), 0.0).view(-1, d)
            if "wk" in sums:
                sums["wk"] += mm(dk.t(), hb_t)
            if "wv" in sums:
                sums["wv"] += mm(dv.t(), hb_t)
        if "wo" in sums:
            sums["wo"] += (g.reshape(-1, d).t() @ c_s[:rows].view(-1, d)).to(acc)
        if "bq" in sums:
            sums["bq"] += dq.sum(0)
        if "bk" in sums:
            sums["bk"] += dk.sum(0)
        if "bv" in sums:
            sums["bv"] += dv.sum(0)
    for name, t in sums.items():
        grads[name] = t.to(dtype)
    if heads_poisoned:
        cols = ph.repeat_interleave(d // heads)  # 0, or NaN over the poisoned heads' columns
        for name in heads_poisoned:
            grads[name] = (cols[:, None].expand(d, d) if name[0] == "w" else cols).to(dtype, copy=True)
    return [grads.get(name, ha.new_empty(0)) for name in _GRADS]
