"""Triton kernels of low-rank fusion (DESIGN.md section 2), behind ``fusionops.ops._kernels``.

``y = Σ_r w_r Π_m A_m[:, r] + b`` with ``A_m[n, r, o] = F_m[r, 0, o] + Σ_k x_m[n, k] F_m[r, 1+k, o]``
(that is ``z_m F_m[r]`` with ``z_m = [1, x_m]``: the constant 1 is not multiplied but added as
the row ``F_m[r, 0]``, so the dots run over exactly ``d_m`` columns).

Operands are packed once per call (``_pack_operands``), small next to the work:

* ``xcat (N', Σ P_m)``: the ``x_m`` (masked rows selected to 0), each padded with zero columns
  to ``P_m``, a multiple of BLOCK_K, and the rows to a multiple of BLOCK_N; so tiles load
  without masks, from 16-element-aligned columns;
* ``fcat (R, Σ P_m, O')``: the ``F_m[:, 1:, :]`` stacked along k the same way, O padded to a
  multiple of BLOCK_O; ``f0 (M, R, O')``: the rows ``F_m[:, 0, :]``.

Forward (``_lmf_fwd_kernel``), one launch: a program owns a tile of rows × outputs; for each
rank r (runtime loop) and modality m (``tl.static_range`` over the constexpr M) it forms the
``A_m`` tile with ``tl.dot`` over chunks of ``P_m``, multiplies it into the running product,
and adds ``w_r ·`` product into the accumulator; then the bias. No projection is written to
memory; beyond y, only the packed operands are allocated.

Backward: ``dA_m = w_r G Π_{m'≠m} A_{m'}``, then ``dx_m = (dA_m (N, R·O) @ F_m[:, 1:]ᵀ)``
(masked rows 0), ``dF_m[:, 0] = Σ_n dA_m``, ``dF_m[:, 1:] = x_mᵀ dA_m``, ``dw_r = Σ G P_r``,
``db = Σ_n G``. ``_lmf_bwd_kernel`` recomputes the ``A_m`` tiles exactly as the forward does
(each once per rank: no second pass over m) and keeps them on chip, with the exclusive prefix
products ``G Π_{m'<m} A_{m'}``; walking m in reverse with the suffix product gives every
``dA_m`` without division (zeros are fine). It writes the ``dA_m`` to a scratch buffer and
the per-tile sums ``Σ G P_r`` to a ``(tiles, R)`` buffer; ``dx`` and ``dF`` are then GEMMs
over the scratch (torch.matmul: cuBLAS on the GPU).

What is kept, and why: dx needs a reduction over (r, o) and dF one over n of the same
``dA_m``, and no program owns both, so ``dA`` goes through memory once, in the input dtype
(16-bit: the GEMMs run on tensor cores; its rounding is that of the GEMM operands). It holds
``M · N_c · R · O`` elements, only during backward, where ``N_c`` is N cut into row chunks so
that this stays under ``_SCRATCH_ELEMENTS`` (each chunk is one kernel launch and its GEMMs;
dF sums the chunks in float32). Besides: ``(tiles, R)`` float32 partials of dw, the packed
operands, and float32 dF partials when there is more than one chunk. Never ``(N, R, O)`` in
forward.

Resident kernels (``_lmf_fwd_resident_kernel``, ``_lmf_bwd_resident_kernel``; what ``_tiles``
picks for 16-bit inputs on a GPU whose block shared memory holds them, e.g. the GPU headline
on sm_90): the same math, but a program loads its rows' z_m tiles (128 rows × P, P = the
widest modality's width as a power of two, every modality padded to it) once, where they stay
in shared memory as wgmma operands for the whole rank loop; each projection is one full-width
dot of 128 × 64 outputs, and only the F tiles stream from L2 (BLOCK_N = 128 FLOP per byte
of F instead of BLOCK_N · BLOCK_O / (BLOCK_N + BLOCK_O)). The F tiles are packed as
``(R, M, O' / 64, P, 64)``, each one contiguous block, and walked in rank-major order, each
loaded into registers one step ahead so that its L2 latency runs under the previous dot (the
z tiles leave no room for a pipelined ring: 3 × 128 × 256 + 256 × 64 16-bit = 224 KiB at
the headline). The resident backward forms each ``dA_m`` from G and the M projections
(M + 1 tiles live instead of 2M - 1). tests/test_triton_lmf_tiles.py runs them under the
interpreter at exactly these blocks; tools/triton_static.py compiles them.

Compute precision: float32 (float64 for float64 inputs); ``tl.dot`` takes operands of the
input dtype (tensor cores for 16-bit); float32 dots follow torch's float32 matmul setting
(``_common._input_precision``: tf32 on CUDA when allowed, else ``"ieee"``). The GEMMs of dx and dF
follow torch's matmul settings (float32 stays ieee unless TF32 is allowed globally). No
atomics: partial sums go to small buffers summed by torch, so results are reproducible.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from fusionops.triton._common import (
    _HALF,
    _TL,
    _acc,
    _block,
    _dot_dtype,
    _input_precision,
    _layout,
    _on,
    _reduce_hi,
    _row_block,
    _target_programs,
    _zeros_like_inputs,
)

# The most elements the backward's dA scratch (M, N_c, R, O) may hold: rows are processed in
# chunks below this (2^26: 128 MiB in 16-bit, 256 MiB in float32).
_SCRATCH_ELEMENTS = 1 << 26


# --- on-chip tiles ---------------------------------------------------------------------------


@triton.jit
def _projection(
    x_ptr,
    stride_xn,
    widths_ptr,
    offsets_ptr,
    f_ptr,
    stride_fr,
    stride_fk,
    f0_ptr,
    stride_f0m,
    stride_f0r,
    rows64,
    outs,
    r,
    MOD: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``A_MOD[rows, r, outs] = F[r, 0, outs] + x[rows] F[r, 1:, outs]``, (BLOCK_N, BLOCK_O) in
    ACC. Rows and outputs may run into the padding of xcat and fcat: no masks needed."""
    f0 = tl.load(f0_ptr + MOD * stride_f0m + r * stride_f0r + outs).to(ACC)
    a = tl.zeros((BLOCK_N, BLOCK_O), ACC) + f0[None, :]
    start = tl.multiple_of(tl.load(offsets_ptr + MOD), BLOCK_K)
    width = tl.load(widths_ptr + MOD)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + rows64[:, None] * stride_xn + start
    f_base = f_ptr + r * stride_fr + start * stride_fk + outs[None, :]  # fcat: < 2^31 elements
    for k0 in range(0, width, BLOCK_K):
        z = tl.load(x_base + (k0 + ks)[None, :])
        f = tl.load(f_base + (k0 + ks)[:, None] * stride_fk)
        a = tl.dot(z.to(DOT), f.to(DOT), a, input_precision=PRECISION, out_dtype=ACC)
    return a


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _lmf_fwd_kernel(
    x_ptr,
    stride_xn,
    widths_ptr,
    offsets_ptr,
    f_ptr,
    stride_fr,
    stride_fk,
    f0_ptr,
    stride_f0m,
    stride_f0r,
    w_ptr,
    stride_w,
    b_ptr,
    stride_b,
    out_ptr,
    N,
    O,
    R,
    NMOD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Output blocks fastest: programs running together share a row block of xcat.
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    rows = (pid // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = (pid % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_O), ACC)
    for r in range(R):
        prod = _projection(
            x_ptr, stride_xn, widths_ptr, offsets_ptr, f_ptr, stride_fr, stride_fk, f0_ptr, stride_f0m,
            stride_f0r, rows64, outs, r, 0, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O, BLOCK_K,
        )  # fmt: skip
        for m in tl.static_range(1, NMOD):
            prod *= _projection(
                x_ptr, stride_xn, widths_ptr, offsets_ptr, f_ptr, stride_fr, stride_fk, f0_ptr, stride_f0m,
                stride_f0r, rows64, outs, r, m, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O, BLOCK_K,
            )  # fmt: skip
        acc += tl.load(w_ptr + r * stride_w).to(ACC) * prod
    out_ok = outs < O
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs * stride_b, mask=out_ok, other=0.0).to(ACC)[None, :]
    ptrs = out_ptr + rows64[:, None] * O + outs[None, :]
    tl.store(ptrs, acc, mask=(rows < N)[:, None] & out_ok[None, :])


@triton.jit
def _lmf_bwd_kernel(
    g_ptr,
    stride_gn,
    stride_go,
    x_ptr,
    stride_xn,
    widths_ptr,
    offsets_ptr,
    f_ptr,
    stride_fr,
    stride_fk,
    f0_ptr,
    stride_f0m,
    stride_f0r,
    w_ptr,
    stride_w,
    da_ptr,
    stride_dam,
    stride_dan,
    dwp_ptr,
    N,
    O,
    R,
    NMOD: tl.constexpr,
    STORE_DA: tl.constexpr,
    NEED_DW: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For a tile of rows × outputs and every r: ``da[m, rows, r, outs] = w_r G Π_{m'≠m} A_m'``
    (when STORE_DA) and ``dwp[tile, r] = Σ_tile G Π_m A_m`` (when NEED_DW)."""
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    rows = (pid // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = (pid % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows64 = rows.to(tl.int64)
    ok = (rows < N)[:, None] & (outs < O)[None, :]
    # 0 outside the tile's valid part, which makes dA and the dw sums 0 there.
    g = tl.load(
        g_ptr + rows64[:, None] * stride_gn + outs.to(tl.int64)[None, :] * stride_go, mask=ok, other=0.0
    ).to(ACC)
    da_tile = da_ptr + rows64[:, None] * stride_dan + outs[None, :]
    for r in range(R):
        # Forward over m: the projections and the exclusive prefix products G Π_{m'<m} A_m'.
        a = _projection(
            x_ptr, stride_xn, widths_ptr, offsets_ptr, f_ptr, stride_fr, stride_fk, f0_ptr, stride_f0m,
            stride_f0r, rows64, outs, r, 0, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O, BLOCK_K,
        )  # fmt: skip
        projections = (a,)
        prefix = g
        prefixes = (prefix,)
        for m in tl.static_range(1, NMOD):
            prefix = prefix * projections[m - 1]
            prefixes = prefixes + (prefix,)
            a = _projection(
                x_ptr, stride_xn, widths_ptr, offsets_ptr, f_ptr, stride_fr, stride_fk, f0_ptr, stride_f0m,
                stride_f0r, rows64, outs, r, m, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O, BLOCK_K,
            )  # fmt: skip
            projections = projections + (a,)
        if NEED_DW:
            # Padding rows and columns are selected away (G is 0 there, but a projection of a row
            # holding an inf is not, and 0 · inf is NaN).
            gp = tl.where(ok, prefixes[NMOD - 1] * projections[NMOD - 1], 0.0)
            tl.store(dwp_ptr + pid.to(tl.int64) * R + r, tl.sum(tl.sum(gp, axis=1), axis=0))
        if STORE_DA:
            # Reverse over m: dA_m = w_r · prefix_m · suffix_m, suffix_m = Π_{m'>m} A_m'.
            w = tl.load(w_ptr + r * stride_w).to(ACC)
            da_r = da_tile + r * O
            tl.store(da_r + (NMOD - 1) * stride_dam, w * prefixes[NMOD - 1], mask=ok)
            if NMOD > 1:
                suffix = w * projections[NMOD - 1]
                for m in tl.static_range(NMOD - 2, -1, -1):
                    tl.store(da_r + m * stride_dam, prefixes[m] * suffix, mask=ok)
                    if m > 0:
                        suffix = suffix * projections[m]


# --- resident z: the GPU headline's kernels ---------------------------------------------------
#
# A program holds its rows' z_m tiles (BLOCK_N, P) of every modality in shared memory for the
# whole rank loop, so only the F_m[r] tiles (P, BLOCK_O) stream from L2: BLOCK_N FLOP per byte
# instead of BLOCK_N · BLOCK_O / (BLOCK_N + BLOCK_O). Each projection is one full-width dot
# (P = every modality's padded width, a power of two), no K loop.


@triton.jit
def _resident_z(x_ptr, stride_xn, rows64, MOD: tl.constexpr, P: tl.constexpr):
    """z_MOD's (BLOCK_N, P) tile; loaded once, before the rank loop (a wgmma operand: it stays
    in shared memory)."""
    cols = MOD * P + tl.arange(0, P)
    return tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :])


@triton.jit
def _factor_tile(
    f_ptr, r, ob, n_ob, MOD: tl.constexpr, NMOD: tl.constexpr, P: tl.constexpr, BLOCK_O: tl.constexpr
):
    """F_MOD[r, 1:, ob-th output block] as a (P, BLOCK_O) tile: one contiguous block of the
    tiled factors, so every address is a constant offset from one pointer."""
    tile = f_ptr + ((r * NMOD + MOD) * n_ob + ob) * (P * BLOCK_O)
    return tl.load(tile + tl.arange(0, P)[:, None] * BLOCK_O + tl.arange(0, BLOCK_O)[None, :])


@triton.jit
def _next_factor_tile(
    f_ptr, r, R, ob, n_ob, MOD: tl.constexpr, NMOD: tl.constexpr, P: tl.constexpr, BLOCK_O: tl.constexpr
):
    """The F tile after (r, MOD) in rank-major order: (r, MOD + 1), or (r + 1, 0) (the last
    rank reloads its own first tile: in bounds, 1/(R·M) extra traffic, no masks)."""
    if MOD + 1 < NMOD:
        return _factor_tile(f_ptr, r, ob, n_ob, MOD + 1, NMOD, P, BLOCK_O)
    else:
        return _factor_tile(f_ptr, tl.minimum(r + 1, R - 1), ob, n_ob, 0, NMOD, P, BLOCK_O)


@triton.jit
def _resident_projection(
    z, f, f0_ptr, stride_f0m, stride_f0r, r, R, outs,
    MOD: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """``A_MOD[rows, r, outs] = F[r, 0, outs] + z F[r, 1:, outs]``, (BLOCK_N, BLOCK_O) in ACC.

    ``f`` was loaded into registers one step earlier. The select (a no-op: R > 0 here) makes
    the dot's operand a value defined just before the dot: Triton puts an operand into shared
    memory right after its definition, which for the raw load would wait on it there and
    keep every step's F buffer alive at once, instead of one. It must not fold away: the
    kernels do not specialize R (at R = 1 it would: 256 KiB of shared memory at the headline
    widths, over sm_90's 227)."""
    f = tl.where(R > 0, f, 0.0)
    f0 = tl.load(f0_ptr + MOD * stride_f0m + r * stride_f0r + outs).to(ACC)
    a = tl.zeros((BLOCK_N, BLOCK_O), ACC) + f0[None, :]
    return tl.dot(z.to(DOT), f.to(DOT), a, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(do_not_specialize=["R"])  # R > 0 must stay a runtime select (_resident_projection)
def _lmf_fwd_resident_kernel(
    x_ptr, stride_xn, f_ptr, f0_ptr, stride_f0m, stride_f0r,
    w_ptr, stride_w, b_ptr, stride_b, out_ptr, N, O, R,
    NMOD: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    """``_lmf_fwd_kernel`` with the z_m tiles resident. The F tiles are walked in rank-major
    order, each loaded into registers one step ahead, while the previous one's dot runs (the
    L2 latency hidden without a shared-memory ring, which the z tiles leave no room for)."""
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    ob = pid % n_ob
    rows = (pid // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    rows64 = rows.to(tl.int64)
    zs = ()
    for m in tl.static_range(NMOD):
        zs = zs + (_resident_z(x_ptr, stride_xn, rows64, m, P),)
    f = _factor_tile(f_ptr, 0, ob, n_ob, 0, NMOD, P, BLOCK_O)
    acc = tl.zeros((BLOCK_N, BLOCK_O), ACC)
    for r in range(R):
        nxt = _next_factor_tile(f_ptr, r, R, ob, n_ob, 0, NMOD, P, BLOCK_O)
        prod = _resident_projection(
            zs[0], f, f0_ptr, stride_f0m, stride_f0r, r, R, outs, 0, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O
        )
        f = nxt
        for m in tl.static_range(1, NMOD):
            nxt = _next_factor_tile(f_ptr, r, R, ob, n_ob, m, NMOD, P, BLOCK_O)
            prod *= _resident_projection(
                zs[m], f, f0_ptr, stride_f0m, stride_f0r, r, R, outs, m, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O
            )
            f = nxt
        acc += tl.load(w_ptr + r * stride_w).to(ACC) * prod
    out_ok = outs < O
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs * stride_b, mask=out_ok, other=0.0).to(ACC)[None, :]
    ptrs = out_ptr + rows64[:, None] * O + outs[None, :]
    tl.store(ptrs, acc, mask=(rows < N)[:, None] & out_ok[None, :])


@triton.jit(do_not_specialize=["R"])  # R > 0 must stay a runtime select (_resident_projection)
def _lmf_bwd_resident_kernel(
    g_ptr, stride_gn, stride_go, x_ptr, stride_xn, f_ptr, f0_ptr, stride_f0m, stride_f0r,
    w_ptr, stride_w, da_ptr, stride_dam, stride_dan, dwp_ptr, N, O, R,
    NMOD: tl.constexpr, STORE_DA: tl.constexpr, NEED_DW: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    """``_lmf_bwd_kernel`` with the z_m tiles resident and the F tiles loaded one step ahead,
    as in ``_lmf_fwd_resident_kernel``."""
    pid = tl.program_id(0)
    n_ob = tl.cdiv(O, BLOCK_O)
    ob = pid % n_ob
    rows = (pid // n_ob) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    rows64 = rows.to(tl.int64)
    ok = (rows < N)[:, None] & (outs < O)[None, :]
    zs = ()
    for m in tl.static_range(NMOD):
        zs = zs + (_resident_z(x_ptr, stride_xn, rows64, m, P),)
    g = tl.load(
        g_ptr + rows64[:, None] * stride_gn + outs.to(tl.int64)[None, :] * stride_go, mask=ok, other=0.0
    ).to(ACC)
    da_tile = da_ptr + rows64[:, None] * stride_dan + outs[None, :]
    f = _factor_tile(f_ptr, 0, ob, n_ob, 0, NMOD, P, BLOCK_O)
    for r in range(R):
        projections = ()
        for m in tl.static_range(NMOD):
            nxt = _next_factor_tile(f_ptr, r, R, ob, n_ob, m, NMOD, P, BLOCK_O)
            a = _resident_projection(
                zs[m], f, f0_ptr, stride_f0m, stride_f0r, r, R, outs, m, ACC, DOT, PRECISION, BLOCK_N, BLOCK_O
            )
            projections = projections + (a,)
            f = nxt
        # The products are formed again for each m from G and the projections (M(M-1)
        # multiplies) instead of keeping M - 1 prefixes on chip: M + 1 tiles live, not 2M - 1,
        # which is what fits 128 x 64 beside the F tiles. Order as the reference's autograd:
        # G times the later projections, then the earlier ones.
        if NEED_DW:
            # Padding rows and columns are selected away (G is 0 there, but a projection of a row
            # holding an inf is not, and 0 · inf is NaN).
            gp = g
            for m in tl.static_range(NMOD):
                gp = gp * projections[m]
            gp = tl.where(ok, gp, 0.0)
            tl.store(dwp_ptr + pid.to(tl.int64) * R + r, tl.sum(tl.sum(gp, axis=1), axis=0))
        if STORE_DA:
            w = tl.load(w_ptr + r * stride_w).to(ACC)
            for m in tl.static_range(NMOD):
                d = w * g
                for later in tl.static_range(NMOD - 1, m, -1):
                    d = d * projections[later]
                for earlier in tl.static_range(m):
                    d = d * projections[earlier]
                tl.store(da_tile + (m * stride_dam + r * O), d, mask=ok)


# --- host side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Operands:
    """The packed operands (see the module docstring) and their layout."""

    xcat: Tensor
    fcat: Tensor
    f0: Tensor
    dims: tuple[int, ...]
    offsets: tuple[int, ...]
    widths_dev: Tensor
    offsets_dev: Tensor


def _pack_operands(xs: list[Tensor], factors: list[Tensor], mask: Tensor | None, tiles: _Tiles) -> _Operands:
    """Any strides of xs, factors and mask are read as they are; masked rows are selected
    away (never multiplied), so their NaN cannot leak. Padding is zero. Every modality's width
    is padded to a multiple of BLOCK_K, or to exactly BLOCK_K (= P) for the resident kernels."""
    block_n, block_o, block_k = tiles.block_n, tiles.block_o, tiles.block_k
    x0 = xs[0]
    n, dtype, device = x0.shape[0], x0.dtype, x0.device
    r, _, o = factors[0].shape
    dims = tuple(int(x.shape[1]) for x in xs)
    widths = tuple(block_k if tiles.resident else triton.cdiv(d, block_k) * block_k for d in dims)
    offsets = tuple(sum(widths[:m]) for m in range(len(widths)))
    packed = r * sum(widths) * triton.cdiv(o, block_o) * block_o
    if packed >= 2**31:  # the kernels index the packed factors with int32 offsets
        raise ValueError(
            f"low_rank_fusion: the triton backend packs the factors into R x sum(padded d_m) x "
            f"padded O = {packed} elements, over its int32 offset limit of 2^31 - 1 (factors[0] "
            f"has shape {tuple(factors[0].shape)}); use the cpu or cuda backend for factors this large"
        )
    xcat = torch.zeros(triton.cdiv(n, block_n) * block_n, sum(widths), dtype=dtype, device=device)
    fcat = torch.zeros(r, sum(widths), triton.cdiv(o, block_o) * block_o, dtype=dtype, device=device)
    f0 = torch.zeros(len(xs), r, fcat.shape[2], dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    for m, (x, f) in enumerate(zip(xs, factors, strict=True)):
        cols = slice(offsets[m], offsets[m] + dims[m])
        xcat[:n, cols] = x if mask is None else torch.where(mask[:, m, None], x, zero)
        fcat[:, cols, :o] = f[:, 1:, :]
        f0[m, :, :o] = f[:, 0, :]
    if tiles.resident:  # (R, M, O' / BLOCK_O, P, BLOCK_O): every F tile one contiguous block
        n_ob = fcat.shape[2] // block_o
        fcat = fcat.view(r, len(xs), block_k, n_ob, block_o).permute(0, 1, 3, 2, 4).contiguous()
    return _Operands(xcat, fcat, f0, dims, offsets, *_layout(widths, device))


@dataclass(frozen=True)
class _Tiles:
    """A launch's blocks. ``resident``: the z_m tiles stay in shared memory over the ranks
    (``_lmf_*_resident_kernel``) and ``block_k`` is every modality's padded width P; else the
    dots stream both operands in ``block_k`` chunks."""

    resident: bool
    block_n: int
    block_o: int
    block_k: int
    num_warps: int
    num_stages: int | None = None

    def launch(self) -> dict[str, int]:
        """The kernels' block constexprs and launch options."""
        blocks = {"BLOCK_N": self.block_n, "BLOCK_O": self.block_o}
        blocks["P" if self.resident else "BLOCK_K"] = self.block_k
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return {**blocks, **options}


# Shared memory a block may take, by compute capability (the opt-in maximum), for meta tensors
# (tools/triton_static.py compiles for a stand-in target; no device to ask).
_SMEM_BY_ARCH = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# Resident tiles: 128 rows (two wgmma warpgroups of 64), 64 outputs.
_RESIDENT_N, _RESIDENT_O = 128, 64
# The resident backward keeps M + 1 float32 tiles (G and the projections) beside the F tile in
# flight: 255 registers at M = 3 without spills (sm_90, triton 3.9); M = 4 spills.
_RESIDENT_BWD_MODALITIES = 3
# The F tile in flight takes P / 8 registers a thread (P x 64 16-bit over 256 threads): P <= 256
# (the backward at P = 512 spills on triton 3.6).
_RESIDENT_WIDTH = 256


# Set when a resident launch was refused for lack of shared memory or registers (the one-F-buffer
# layout depends on where Triton places the operand copy: another Triton version may place it
# differently); from then on this process launches the streamed kernels, which always fit.
_resident_refused = False


def _refuse_resident(exc: OutOfResources, tiles: _Tiles) -> None:
    """A launch ran out of resources: re-raise unless it was a resident one, else fall back."""
    global _resident_refused
    if not tiles.resident:
        raise exc
    _resident_refused = True
    warnings.warn(
        f"fusionops low_rank_fusion (triton): the resident-z kernels do not fit on this GPU with "
        f"this Triton ({exc}); using the streamed kernels from now on",
        RuntimeWarning,
        stacklevel=3,
    )


@functools.cache
def _cuda_smem(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _smem_per_block(device: torch.device) -> int:
    """What a block may allocate; 0 under the interpreter (CPU), where nothing is resident."""
    try:
        if device.type == "cuda":
            return _cuda_smem(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "meta":
            return _SMEM_BY_ARCH.get(triton.runtime.driver.active.get_current_target().arch, 0)
    except (RuntimeError, AttributeError, KeyError):  # no GPU driver: nothing resident
        return 0
    return 0


def _resident_smem(nmod: int, p: int, dtype: torch.dtype) -> int:
    """Bytes of the resident kernels' shared memory: the z tiles and one F tile (the F tiles of
    a rank go through it one after another)."""
    return (nmod * _RESIDENT_N * p + p * _RESIDENT_O) * dtype.itemsize


def _tiles(
    kind: str, n: int, o: int, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> _Tiles:
    """The blocks of a forward (``kind="fwd"``) or backward launch: what tools/triton_static.py
    compiles and tests/test_triton_lmf_tiles.py runs under the interpreter.

    16-bit, where every z_m tile of 128 rows (padded to one width P <= 256) and an F tile fit in
    a block's shared memory (the GPU headline: 3 x 128 x 256 + 256 x 64 bf16 = 224 KiB on sm_90;
    not sm_80's 163 KiB), and for the backward M <= 3: the resident kernels, 128 x 64 tiles,
    8 warps (two wgmma warpgroups). Otherwise the streamed ones, whose fp32
    tiles are what registers hold: the forward keeps three (accumulator, product, projection),
    up to 128 x 64 in 16-bit; the backward 2M - 1 (projections and prefixes), up to 64 x 64."""
    programs = _target_programs(device)
    p = triton.next_power_of_2(max(max(dims), 16))
    fits_registers = p <= _RESIDENT_WIDTH and (kind == "fwd" or len(dims) <= _RESIDENT_BWD_MODALITIES)
    fits_smem = _resident_smem(len(dims), p, dtype) <= _smem_per_block(device)
    if dtype in _HALF and fits_registers and fits_smem and not _resident_refused:
        # num_stages=1: no pipeliner ring (no room); the F tiles are prefetched by hand.
        return _Tiles(True, _RESIDENT_N, _RESIDENT_O, p, 8, num_stages=1)
    bo = _block(o, 16, 64)
    hi = 128 if kind == "fwd" and dtype in _HALF else 64
    bn = _row_block(n, triton.cdiv(o, bo), hi, programs)
    return _Tiles(False, bn, bo, _reduce_hi(dtype), 8 if bn * bo >= 64 * 64 else 4)


def _kernel_args(p: _Operands, resident: bool = False) -> tuple:
    """The packed operands as the kernels take them (the resident ones need no layout arrays
    nor factor strides: every modality sits at ``m · P``, every F tile is one block)."""
    if resident:
        return (p.xcat, p.xcat.stride(0), p.fcat, p.f0, p.f0.stride(0), p.f0.stride(1))
    return (
        p.xcat,
        p.xcat.stride(0),
        p.widths_dev,
        p.offsets_dev,
        p.fcat,
        p.fcat.stride(0),
        p.fcat.stride(1),
        p.f0,
        p.f0.stride(0),
        p.f0.stride(1),
    )


# --- the kernel contract (fusionops.ops._kernels) ------------------------------------------


def forward(
    xs: list[Tensor], factors: list[Tensor], rank_weight: Tensor, bias: Tensor | None, mask: Tensor | None
) -> Tensor:
    """``y`` of shape (N, O), contiguous, never holding the (N, R, O) projections."""
    x0 = xs[0]
    n, (r, _, o), dtype, device = x0.shape[0], factors[0].shape, x0.dtype, x0.device
    out = torch.empty(n, o, dtype=dtype, device=device)
    if n == 0:
        return out
    tiles = _tiles("fwd", n, o, tuple(int(x.shape[1]) for x in xs), dtype, device)
    packed = _pack_operands(xs, factors, mask, tiles)
    kernel = _lmf_fwd_resident_kernel if tiles.resident else _lmf_fwd_kernel
    try:
        _launch_forward(kernel, tiles, packed, rank_weight, bias, out, n, o, r, len(xs), dtype, device)
    except OutOfResources as exc:
        _refuse_resident(exc, tiles)
        return forward(xs, factors, rank_weight, bias, mask)
    return out


def _launch_forward(
    kernel, tiles: _Tiles, packed: _Operands, rank_weight: Tensor, bias: Tensor | None, out: Tensor,
    n: int, o: int, r: int, nmod: int, dtype: torch.dtype, device: torch.device,
) -> None:  # fmt: skip
    with _on(device):
        kernel[(triton.cdiv(n, tiles.block_n) * triton.cdiv(o, tiles.block_o),)](
            *_kernel_args(packed, tiles.resident),
            rank_weight,
            rank_weight.stride(0),
            rank_weight if bias is None else bias,
            0 if bias is None else bias.stride(0),
            out,
            n,
            o,
            r,
            NMOD=nmod,
            HAS_BIAS=bias is not None,
            ACC=_TL[_acc(dtype)],
            DOT=_dot_dtype(dtype, device),
            PRECISION=_input_precision(dtype, device),
            **tiles.launch(),
        )


@torch.no_grad()  # the kernels are not differentiable; out= needs no autograd
def backward(
    grad: Tensor,
    xs: list[Tensor],
    factors: list[Tensor],
    rank_weight: Tensor,
    mask: Tensor | None,
    need_dx: bool,
    need_dfactors: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
    """``(dxs (N, d_m), dfactors (R, d_m + 1, O), d rank_weight (R,), db (O,))`` given
    ``grad = dL/dy`` (N, O); lists not needed are empty, tensors not needed None."""
    x0 = xs[0]
    n, (r, _, o), dtype, device = x0.shape[0], factors[0].shape, x0.dtype, x0.device
    acc = _acc(dtype)
    db = grad.sum(0, dtype=acc).to(dtype) if need_db else None
    if n == 0:
        dxs = _zeros_like_inputs(xs) if need_dx else []
        dfs = [torch.zeros(f.shape, dtype=dtype, device=device) for f in factors] if need_dfactors else []
        dw = torch.zeros(r, dtype=dtype, device=device) if need_dw else None
        return dxs, dfs, dw, db
    store_da = need_dx or need_dfactors
    if not (store_da or need_dw):
        return [], [], None, db

    nmod = len(xs)
    tiles = _tiles("bwd", n, o, tuple(int(x.shape[1]) for x in xs), dtype, device)
    bn = tiles.block_n
    packed = _pack_operands(xs, factors, mask, tiles)
    kernel = _lmf_bwd_resident_kernel if tiles.resident else _lmf_bwd_kernel
    # Row chunks, each a multiple of BLOCK_N, so that dA (M, rows, R, O) stays under the cap.
    chunks = triton.cdiv(nmod * n * r * o, _SCRATCH_ELEMENTS) if store_da else 1
    chunk_rows = triton.cdiv(triton.cdiv(n, min(chunks, triton.cdiv(n, bn))), bn) * bn
    chunks = triton.cdiv(n, chunk_rows)
    n_ob = triton.cdiv(o, tiles.block_o)
    da = torch.empty(nmod, chunk_rows if store_da else 0, r, o, dtype=dtype, device=device)
    dwp = torch.empty(triton.cdiv(chunk_rows, bn) * n_ob if need_dw else 0, r, dtype=acc, device=device)

    dxs = [torch.empty(x.shape, dtype=dtype, device=device) for x in xs] if need_dx else []
    # F_m[:, 1:, :] as (R·O, d_m): dx_m = dA_m (N, R·O) @ this.
    f_t = [f[:, 1:, :].transpose(1, 2).reshape(r * o, -1).to(dtype) for f in factors] if need_dx else []
    # dF partials as (d_m + 1, R·O): row 0 Σ_n dA_m, rows 1.. x_mᵀ dA_m (summed over chunks).
    dfp: list[Tensor | None] = [None] * nmod
    dw = torch.zeros(r, dtype=acc, device=device) if need_dw else None

    for c in range(chunks):
        row0 = c * chunk_rows
        rows = min(chunk_rows, n - row0)
        try:
            _launch_backward(
                kernel, tiles, packed, grad, rank_weight, da, dwp, row0, rows, o, r, nmod, store_da, need_dw,
                acc, dtype, device,
            )  # fmt: skip
        except OutOfResources as exc:  # at the first launch of a resident configuration
            _refuse_resident(exc, tiles)
            return backward(grad, xs, factors, rank_weight, mask, need_dx, need_dfactors, need_dw, need_db)
        if dw is not None:
            dw += dwp[: triton.cdiv(rows, bn) * n_ob].sum(0)
        for m in range(nmod if store_da else 0):
            da_m = da[m, :rows].view(rows, r * o)
            if need_dx:
                dx = dxs[m][row0 : row0 + rows]
                torch.matmul(da_m, f_t[m], out=dx)
                if mask is not None:
                    dx.masked_fill_(~mask[row0 : row0 + rows, m, None], 0)
            if need_dfactors:
                x_m = packed.xcat[row0 : row0 + rows, packed.offsets[m] : packed.offsets[m] + packed.dims[m]]
                ones, xt = da_m.sum(0, dtype=acc)[None], x_m.t() @ da_m
                if chunks == 1:
                    dfp[m] = torch.cat([ones.to(dtype), xt])
                else:  # summed over chunks in float32
                    part = torch.cat([ones, xt.to(acc)])
                    dfp[m] = part if c == 0 else dfp[m] + part

    dfs = []
    if need_dfactors:
        for part in dfp:
            assert part is not None
            dfs.append(part.view(-1, r, o).transpose(0, 1).to(dtype).contiguous())
    return dxs, dfs, (None if dw is None else dw.to(dtype)), db


def _launch_backward(
    kernel, tiles: _Tiles, packed: _Operands, grad: Tensor, rank_weight: Tensor, da: Tensor, dwp: Tensor,
    row0: int, rows: int, o: int, r: int, nmod: int, store_da: bool, need_dw: bool, acc: torch.dtype,
    dtype: torch.dtype, device: torch.device,
) -> None:  # fmt: skip
    """One row chunk of the backward kernel: dA of the chunk into ``da``, rank-weight partials
    into ``dwp``."""
    with _on(device):
        kernel[(triton.cdiv(rows, tiles.block_n) * triton.cdiv(o, tiles.block_o),)](
            grad[row0:],
            grad.stride(0),
            grad.stride(1),
            packed.xcat[row0:],
            *_kernel_args(packed, tiles.resident)[1:],
            rank_weight,
            rank_weight.stride(0),
            da,
            da.stride(0),
            da.stride(1),
            dwp,
            rows,
            o,
            r,
            NMOD=nmod,
            STORE_DA=store_da,
            NEED_DW=need_dw,
            ACC=_TL[acc],
            DOT=_dot_dtype(dtype, device),
            PRECISION=_input_precision(dtype, device),
            **tiles.launch(),
        )
