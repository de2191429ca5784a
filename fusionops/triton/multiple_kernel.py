"""Triton kernels of multiple kernel fusion (DESIGN.md section 5), behind ``fusionops.ops._kernels``.

``K = Σ_m β_m k_m(A_m, B_m)`` of shape ``(N_a, N_b)``, with ``G = A_m B_mᵀ`` and ``k`` linear
(``G``), RBF (``exp(-γ max(‖a‖² + ‖b‖² - 2G, 0))``) or polynomial (``(G + c)^p``); the kind,
parameter, degree and weight of each modality are read from small device tables, so one
compiled kernel serves any mix of kinds and any M.

Operands are packed once per call (``_pack``), a copy the size of the inputs that also makes
any strides (stride 0, transposed) contiguous: ``acat (N_a', Σ P_m)`` and ``bcat (N_b', Σ P_m)``,
each ``x_m`` padded with zero columns to ``P_m``, a multiple of BLOCK_K, and the rows to a
multiple of the row blocks, so tiles load without masks (zero rows and columns add nothing to
a dot). With them the float32 (float64 for float64) squared row norms ``sq (M, N')`` of the
packed, already rounded values (used by RBF). When ``xs_b`` holds the very tensors of ``xs_a``
(the symmetric case) A's packing serves both sides.

Forward (``_mkl_fwd_kernel``), one launch: a program owns one ``(BLOCK_M, BLOCK_N)`` tile of K
and loops over the modalities (runtime loop); per modality it forms the G tile with ``tl.dot``
over chunks of ``P_m``, applies the base kernel (a runtime branch on the kind; the polynomial
by ``p - 1`` multiplications) and adds ``β_m k`` into its accumulator; K is written once. No
Gram matrix is written to memory; beyond K only the packed operands and norms are allocated.
In the symmetric case (square tiles) only the tiles on or above the diagonal are launched and
each is also written transposed, the diagonal tiles from their upper triangle: K is exactly
symmetric whatever the rounding of ``tl.dot`` (as in the C++ kernel, which mirrors its tiles).

Backward, with ``g = dL/dK`` and (contract) ``S_m = β_m g ⊙ dk/dG``: ``_mkl_bwd_kernel``
recomputes each G tile as the forward does and writes ``S_m`` for the tile into a scratch
``S (M, N_c, N_b)`` (input dtype: 16-bit GEMM operands on tensor cores), plus per-program
partial sums of ``dβ_m = Σ g k_m`` and ``dparams_m`` (``-Σ β g k max(D, 0)`` for RBF, ``Σ S``
for polynomial), and for RBF the partial row sums ``(M, tiles_b, N_c)`` and column sums
``(M, tiles_a, N_b)`` of ``E = β g k`` where ``D >= 0`` (0 elsewhere, NaN D included: the
reference's autograd). Non-finite values follow the reference: NaN distances give NaN, far-apart
points exactly 0. Then ``dA_m[chunk] = S_m B_m - 2γ rowsum(E) ⊙ A_m[chunk]`` and
``dB_m += S_mᵀ A_m[chunk]`` are torch GEMMs (cuBLAS on the GPU), ``- 2γ colsum(E) ⊙ B_m``
added at the end. ``N_c`` is N_a cut into row chunks (multiples of BLOCK_M) so that S stays
under ``_SCRATCH_ELEMENTS``; each chunk is one launch and its GEMMs (N_a = N_b = 32768, M = 3:
640-row chunks, S 120 MiB in bfloat16, where the M Gram matrices would take 6 GiB). When
neither dA nor dB is needed, S is neither allocated nor written and there is one chunk (only
the reductions).

What is kept, and why: dA needs a reduction of ``S_m`` over columns and dB one over rows that
no program owns both of, so ``S`` goes through memory once, bounded by the chunking. Besides:
``dB`` summed over chunks in float32 (the size of B; only with more than one chunk or RBF),
the partial sums (``(programs, M)`` and the row/column sums, 1/BLOCK_N and 1/BLOCK_M of S).
The forward holds nothing beyond K and the packing. Never ``(N_a, N_b)`` per modality.

Compute precision: float32 (float64 for float64 inputs, whose dots run in float64 as in the
other modules); ``tl.dot`` takes operands of the input dtype (tensor cores for 16-bit; bfloat16
as float32 under the interpreter, see ``_dot_dtype``) with ``input_precision="ieee"``. The GEMMs
of dA and dB follow torch's matmul settings. No atomics: partial sums go to small buffers
summed by torch in a fixed order, so results are reproducible.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    _layout,
    _on,
    _zeros_like_inputs,
)

# The most elements the backward's S scratch (M, N_c, N_b) may hold: rows of A are processed
# in chunks below this (2^26: 128 MiB in 16-bit, 256 MiB in float32).
_SCRATCH_ELEMENTS = 1 << 26

_LINEAR, _RBF, _POLY = 0, 1, 2  # fusionops.base_kernels kind codes


# --- on-chip tiles ---------------------------------------------------------------------------


@triton.jit
def _gram(
    a_ptr,
    b_ptr,
    stride_a,
    stride_b,
    rows64,
    cols64,
    start,
    width,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acat[rows, start:start+width] @ bcat[cols, start:start+width]ᵀ`` (BLOCK_M, BLOCK_N) in
    ACC. Rows, columns and k run into the zero padding of the packed buffers: no masks."""
    start = tl.multiple_of(start, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + rows64[:, None] * stride_a + start
    b_base = b_ptr + cols64[None, :] * stride_b + start
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, width, BLOCK_K):
        a = tl.load(a_base + (k0 + ks)[None, :])
        b = tl.load(b_base + (k0 + ks)[:, None])
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _power(base, p):
    """``base^p`` for a runtime int ``p >= 0`` by repeated multiplication (degrees are small)."""
    out = tl.full(base.shape, 1.0, base.dtype)
    for _ in range(p):
        out *= base
    return out


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _mkl_fwd_kernel(
    a_ptr,
    stride_a,
    b_ptr,
    stride_b,
    sqa_ptr,
    stride_sqa,
    sqb_ptr,
    stride_sqb,
    widths_ptr,
    offsets_ptr,
    kinds_ptr,
    degrees_ptr,
    beta_ptr,
    stride_beta,
    params_ptr,
    stride_params,
    out_ptr,
    NA,
    NB,
    M,
    SYMMETRIC: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of K, all modalities. SYMMETRIC (b is a, NA == NB,
    BLOCK_M == BLOCK_N): the program owns tile (i, j) with i <= j and also writes it
    transposed to (j, i), so that K is exactly symmetric (see the end)."""
    pid = tl.program_id(0)
    if SYMMETRIC:
        # The grid holds only the T(T+1)/2 tiles on or above the diagonal (none launched just
        # to return), numbered column by column: pid = j(j+1)/2 + i, 0 <= i <= j. j from the
        # float square root, then made exact by integer checks (the root is off by at most one
        # far beyond any grid). Programs running together share column block j of acat.
        tj = ((tl.sqrt(pid.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
        tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
        ti = pid - tj * (tj + 1) // 2
    else:
        # Column blocks fastest: programs running together share a row block of acat.
        n_tb = tl.cdiv(NB, BLOCK_N)
        ti = pid // n_tb
        tj = pid % n_tb
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    out = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for m in range(M):
        kind = tl.load(kinds_ptr + m)
        beta = tl.load(beta_ptr + m * stride_beta).to(ACC)
        param = tl.load(params_ptr + m * stride_params).to(ACC)
        g = _gram(
            a_ptr, b_ptr, stride_a, stride_b, rows64, cols64, tl.load(offsets_ptr + m),
            tl.load(widths_ptr + m), ACC, DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if kind == 1:  # RBF
            sqa = tl.load(sqa_ptr + m * stride_sqa + rows64)
            sqb = tl.load(sqb_ptr + m * stride_sqb + cols64)
            dist = sqa[:, None] + sqb[None, :] - 2.0 * g
            # clamp_min(dist, 0) that keeps NaN, as the reference's (tl.maximum drops it)
            k = tl.exp(-param * tl.where(dist < 0.0, 0.0, dist))
        elif kind == 2:  # polynomial
            k = _power(g + param, tl.load(degrees_ptr + m))
        else:
            k = g
        out += beta * k
    ok = (rows < NA)[:, None] & (cols < NB)[None, :]
    if SYMMETRIC:
        # tl.dot of tile (j, i) is not bitwise the transpose of tile (i, j), nor is a diagonal
        # tile's dot bitwise symmetric (summation order depends on the GPU's MMA or the
        # interpreter's BLAS/SIMD). So only elements with row <= col are taken from this
        # program's values, and each is also written to (col, row); in a diagonal tile that
        # leaves the values computed below the diagonal unused. Off the diagonal every row is
        # below every column, so both masks are just `ok` there. K is then exactly symmetric.
        upper = rows[:, None] <= cols[None, :]
        tl.store(out_ptr + rows64[:, None] * NB + cols64[None, :], out, mask=ok & upper)
        strict = rows[None, :] < cols[:, None]  # (col, row) layout; the diagonal is written once
        ok_t = (cols < NB)[:, None] & (rows < NA)[None, :]
        tl.store(out_ptr + cols64[:, None] * NB + rows64[None, :], tl.trans(out), mask=ok_t & strict)
    else:
        tl.store(out_ptr + rows64[:, None] * NB + cols64[None, :], out, mask=ok)


@triton.jit
def _mkl_bwd_kernel(
    g_ptr,
    stride_gn,
    stride_gm,
    a_ptr,
    stride_a,
    b_ptr,
    stride_b,
    sqa_ptr,
    stride_sqa,
    sqb_ptr,
    stride_sqb,
    widths_ptr,
    offsets_ptr,
    kinds_ptr,
    degrees_ptr,
    beta_ptr,
    stride_beta,
    params_ptr,
    stride_params,
    s_ptr,
    stride_sm,
    rowp_ptr,
    stride_rowp_m,
    colp_ptr,
    stride_colp_m,
    dbp_ptr,
    dpp_ptr,
    NA,
    NB,
    M,
    CHUNK,
    STORE_S: tl.constexpr,
    NEED_ROW: tl.constexpr,
    NEED_COL: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For one tile of a row chunk (``NA`` rows; a, sqa and g start at the chunk), per
    modality: ``s[m, rows, cols] = S_m`` (STORE_S), ``dbp[pid, m] = Σ g k_m``, ``dpp[pid, m]``
    the tile's part of dparams (left alone for linear), and for RBF the row sums of E into
    ``rowp[m, tile_b, rows]`` (NEED_ROW) and column sums into ``colp[m, tile_a, cols]`` (NEED_COL)."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(NB, BLOCK_N)
    ta = pid // n_tb
    tb = pid % n_tb
    rows = ta * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ok = (rows < NA)[:, None] & (cols < NB)[None, :]
    # 0 outside the valid part; S, E and the partial sums take only the `ok` elements (the
    # padding's G may be 0 · inf or 0 · NaN).
    g_tile = g_ptr + rows64[:, None] * stride_gn + cols64[None, :] * stride_gm
    gt = tl.load(g_tile, mask=ok, other=0.0).to(ACC)
    s_tile = s_ptr + rows64[:, None] * NB + cols64[None, :]
    for m in range(M):
        kind = tl.load(kinds_ptr + m)
        beta = tl.load(beta_ptr + m * stride_beta).to(ACC)
        param = tl.load(params_ptr + m * stride_params).to(ACC)
        g = _gram(
            a_ptr, b_ptr, stride_a, stride_b, rows64, cols64, tl.load(offsets_ptr + m),
            tl.load(widths_ptr + m), ACC, DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if kind == 1:  # RBF: E = β g k where D >= 0, S = 2γE, dγ = -Σ β g k clamp_min(D, 0)
            sqa = tl.load(sqa_ptr + m * stride_sqa + rows64)
            sqb = tl.load(sqb_ptr + m * stride_sqb + cols64)
            dist = sqa[:, None] + sqb[None, :] - 2.0 * g
            dist_c = tl.where(dist < 0.0, 0.0, dist)  # keeps NaN (tl.maximum drops it)
            k = tl.exp(-param * dist_c)
            bgk = beta * gt * k
            # As autograd of the reference: clamp_min passes gradient only where D >= 0 (not
            # where D is NaN), while dγ takes every β g k D (NaN, or 0 · inf where D = +inf).
            e = tl.where(ok & (dist >= 0.0), bgk, 0.0)
            s = 2.0 * param * e
            ed = tl.where(ok, bgk * dist_c, 0.0)
            tl.store(dpp_ptr + pid * M + m, -tl.sum(tl.sum(ed, axis=1), axis=0))
            if NEED_ROW:
                tl.store(rowp_ptr + m * stride_rowp_m + tb * CHUNK + rows64, tl.sum(e, axis=1))
            if NEED_COL:
                tl.store(colp_ptr + m * stride_colp_m + ta * NB + cols64, tl.sum(e, axis=0), mask=cols < NB)
        elif kind == 2:  # polynomial: S = β g p (G + c)^(p-1), dc = Σ S
            p = tl.load(degrees_ptr + m)
            base = g + param
            pm1 = _power(base, p - 1)
            k = pm1 * base
            s = (beta * p.to(ACC)) * gt * pm1
            tl.store(dpp_ptr + pid * M + m, tl.sum(tl.sum(tl.where(ok, s, 0.0), axis=1), axis=0))
        else:
            k = g
            s = beta * gt
        # (Padding: gt = 0 there, but k may be NaN where a row of the other side holds a NaN or inf.)
        tl.store(dbp_ptr + pid * M + m, tl.sum(tl.sum(tl.where(ok, gt * k, 0.0), axis=1), axis=0))
        if STORE_S:
            tl.store(s_tile + m * stride_sm, s, mask=ok)


# --- host side -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _ints(values: tuple[int, ...], device: torch.device) -> Tensor:
    """An int32 device array (cached: no host-to-device copy per call)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class _Side:
    """One side packed (module docstring): ``cat (N', Σ P_m)`` and ``sq (M, N')``."""

    cat: Tensor
    sq: Tensor


def _pack(xs: list[Tensor], widths: tuple[int, ...], rows: int, acc: torch.dtype, rbf: bool) -> _Side:
    """Any strides of xs are read as they are; padding is zero. Norms only when some kind is RBF."""
    x0 = xs[0]
    cat = torch.zeros(rows, sum(widths), dtype=x0.dtype, device=x0.device)
    sq = torch.zeros(len(xs), rows if rbf else 1, dtype=acc, device=x0.device)
    start = 0
    for m, x in enumerate(xs):
        seg = cat[: x.shape[0], start : start + x.shape[1]]
        seg.copy_(x)
        if rbf:
            sq[m, : x.shape[0]] = seg.to(acc).square().sum(1)
        start += widths[m]
    return _Side(cat, sq)


# (BLOCK_M cap, BLOCK_N cap, BLOCK_K cap, num_warps) per kernel and dtype class on the GPU.
# The forward keeps two accumulator tiles (K and G) on chip, the backward four or five (g, G,
# k, S, E); 16-bit dots take tensor cores (wgmma on sm_90), ieee float32 and float64 ones FMA
# units (float64: mma). Chosen from offline sm_90 builds (Triton 3.9, not timed): each compiles
# to at most 250 registers a thread with no spills (fwd 16-bit 128 x 128 spilled, 4-warp
# float32 backward too). Re-checked on Triton 3.6 (the GPU image's) and 3.9: the 16-bit backward
# at 64 x 128 spilled on 3.6 (11 STL at 255 registers), so it takes 64 x 64; and left alone
# ptxas held the 8-warp float32 forward at 128 registers and spilled on 3.9 (5 STL), so the
# forward gets a cap of 255 (_MAXNREG; one block of 8 warps per SM, as before). The backward
# keeps ptxas's own choice: with the cap, 3.6's float32 backward spilled one register.
_CONFIGS = {
    ("fwd", "half"): (128, 64, 32, 8),
    ("fwd", "fp32"): (64, 64, 16, 8),
    ("fwd", "fp64"): (64, 64, 16, 8),
    ("bwd", "half"): (64, 64, 32, 8),
    ("bwd", "fp32"): (64, 64, 16, 8),
    ("bwd", "fp64"): (64, 64, 16, 8),
}
_MAXNREG = 255  # the interpreter ignores it


def _config(
    kind: str, na: int, nb: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K and num_warps. Under the interpreter 16 (tl.dot's least), so
    that small test shapes take several tiles and the padding paths."""
    if device.type != "cuda":
        return 16, 16, 16, 4
    cls = "half" if dtype in _HALF else "fp64" if dtype == torch.float64 else "fp32"
    bm, bn, bk, warps = _CONFIGS[kind, cls]
    return _block(na, 16, bm), _block(nb, 16, bn), bk, warps


def _same(xs_a: list[Tensor], xs_b: list[Tensor]) -> bool:
    """xs_b holds the very tensors of xs_a (the symmetric case; the C++ kernel's is_same)."""
    return all(a is b for a, b in zip(xs_a, xs_b, strict=True))


def _operands(
    xs_a: list[Tensor], xs_b: list[Tensor], kinds: list[int], bm: int, bn: int, bk: int
) -> tuple[_Side, _Side, tuple[int, ...]]:
    acc = _acc(xs_a[0].dtype)
    rbf = _RBF in kinds
    widths = tuple(triton.cdiv(int(x.shape[1]), bk) * bk for x in xs_a)
    na, nb = xs_a[0].shape[0], xs_b[0].shape[0]
    if _same(xs_a, xs_b):
        side = _pack(xs_a, widths, triton.cdiv(na, max(bm, bn)) * max(bm, bn), acc, rbf)
        return side, side, widths
    return (
        _pack(xs_a, widths, triton.cdiv(na, bm) * bm, acc, rbf),
        _pack(xs_b, widths, triton.cdiv(nb, bn) * bn, acc, rbf),
        widths,
    )


def _table_args(
    widths: tuple[int, ...],
    kinds: list[int],
    degrees: list[int],
    beta: Tensor,
    params: Tensor,
    device: torch.device,
) -> list:
    widths_dev, offsets_dev = _layout(widths, device)
    kinds_dev = _ints(tuple(int(k) for k in kinds), device)
    # Degrees other than the polynomials' are ignored (contract): 1, a no-op if ever read.
    degs = tuple(int(p) if k == _POLY else 1 for k, p in zip(kinds, degrees, strict=True))
    degrees_dev = _ints(degs, device)
    return [widths_dev, offsets_dev, kinds_dev, degrees_dev, beta, beta.stride(0), params, params.stride(0)]


def _side_args(a: _Side, b: _Side) -> list:
    return [a.cat, a.cat.stride(0), b.cat, b.cat.stride(0), a.sq, a.sq.stride(0), b.sq, b.sq.stride(0)]


# --- the kernel contract (fusionops.ops._kernels) ------------------------------------------


@torch.no_grad()
def forward(
    xs_a: list[Tensor], xs_b: list[Tensor], beta: Tensor, kinds: list[int], params: Tensor, degrees: list[int]
) -> Tensor:
    """``K`` of shape (N_a, N_b), contiguous, never holding the M Gram matrices."""
    a0 = xs_a[0]
    na, nb, dtype, device = a0.shape[0], xs_b[0].shape[0], a0.dtype, a0.device
    out = torch.empty(na, nb, dtype=dtype, device=device)
    if na == 0 or nb == 0:
        return out
    bm, bn, bk, warps = _config("fwd", na, nb, dtype, device)
    symmetric = _same(xs_a, xs_b)
    if symmetric:
        # Square tiles, so that tile (i, j) transposed is tile (j, i); the smaller block keeps
        # the configuration's register budget (a 16-bit 128 x 128 forward spilled).
        bm = bn = min(bm, bn)
        tiles = triton.cdiv(na, bm)
        grid = tiles * (tiles + 1) // 2  # the tiles on or above the diagonal only
    else:
        grid = triton.cdiv(na, bm) * triton.cdiv(nb, bn)
    pa, pb, widths = _operands(xs_a, xs_b, kinds, bm, bn, bk)
    with _on(device):
        _mkl_fwd_kernel[(grid,)](
            *_side_args(pa, pb),
            *_table_args(widths, kinds, degrees, beta, params, device),
            out,
            na,
            nb,
            len(xs_a),
            SYMMETRIC=symmetric,
            ACC=_TL[_acc(dtype)],
            DOT=_dot_dtype(dtype, device),
            PRECISION=_input_precision(dtype, device),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=warps,
            maxnreg=_MAXNREG,
        )
    return out


@torch.no_grad()  # the kernels are not differentiable; out= needs no autograd
def backward(
    grad: Tensor,
    xs_a: list[Tensor],
    xs_b: list[Tensor],
    beta: Tensor,
    kinds: list[int],
    params: Tensor,
    degrees: list[int],
    needs: list[bool],
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """``(dxs_a, dxs_b, dbeta (M,), dparams (M,))`` given ``grad = dL/dK`` (N_a, N_b); parts
    whose flag in ``needs`` is False are empty lists or empty tensors."""
    need_da, need_db, need_beta, need_param = (bool(f) for f in needs)
    a0 = xs_a[0]
    nmod = len(xs_a)
    na, nb, dtype, device = a0.shape[0], xs_b[0].shape[0], a0.dtype, a0.device
    acc = _acc(dtype)
    if na == 0 or nb == 0 or not (need_da or need_db or need_beta or need_param):
        return (
            _zeros_like_inputs(xs_a) if need_da else [],
            _zeros_like_inputs(xs_b) if need_db else [],
            torch.zeros(nmod if need_beta else 0, dtype=dtype, device=device),
            torch.zeros(nmod if need_param else 0, dtype=params.dtype, device=device),
        )

    bm, bn, bk, warps = _config("bwd", na, nb, dtype, device)
    pa, pb, widths = _operands(xs_a, xs_b, kinds, bm, bn, bk)
    dims = [int(x.shape[1]) for x in xs_a]
    offsets = [sum(widths[:m]) for m in range(nmod)]
    rbf = [k == _RBF for k in kinds]
    store_s = need_da or need_db
    need_row, need_col = need_da and any(rbf), need_db and any(rbf)

    # Row chunks, each a multiple of BLOCK_M, so that S (M, rows, N_b) stays under the cap.
    padded = triton.cdiv(na, bm) * bm
    chunk_rows = min(max(bm, _SCRATCH_ELEMENTS // (nmod * nb) // bm * bm), padded) if store_s else padded
    chunks = triton.cdiv(na, chunk_rows)
    n_ta, n_tb = chunk_rows // bm, triton.cdiv(nb, bn)
    programs = n_ta * n_tb
    s = torch.empty(nmod, chunk_rows if store_s else 0, nb, dtype=dtype, device=device)
    rowp = torch.empty(nmod, n_tb if need_row else 0, chunk_rows, dtype=acc, device=device)
    colp = torch.empty(nmod, n_ta if need_col else 0, nb, dtype=acc, device=device)
    dbp = torch.empty(programs, nmod, dtype=acc, device=device)
    dpp = torch.zeros(programs, nmod, dtype=acc, device=device)  # linear modalities stay 0

    dbeta = torch.zeros(nmod, dtype=acc, device=device)
    dparam = torch.zeros(nmod, dtype=acc, device=device)
    two_gamma = 2 * params.to(acc)
    dxs_a = [torch.empty(x.shape, dtype=dtype, device=device) for x in xs_a] if need_da else []
    # dB summed over chunks in float32 (float64), or taken as it is with one chunk and no RBF.
    db_sum: list[Tensor | None] = [None] * nmod
    colsum = torch.zeros(nmod, nb, dtype=acc, device=device) if need_col else None
    tables = _table_args(widths, kinds, degrees, beta, params, device)

    for c in range(chunks):
        row0 = c * chunk_rows
        rows = min(chunk_rows, na - row0)
        progs = triton.cdiv(rows, bm) * n_tb
        with _on(device):
            _mkl_bwd_kernel[(progs,)](
                grad[row0:],
                grad.stride(0),
                grad.stride(1),
                pa.cat[row0:],
                pa.cat.stride(0),
                pb.cat,
                pb.cat.stride(0),
                pa.sq[:, row0:] if any(rbf) else pa.sq,  # norms exist only with RBF
                pa.sq.stride(0),
                pb.sq,
                pb.sq.stride(0),
                *tables,
                s,
                s.stride(0),
                rowp,
                rowp.stride(0),
                colp,
                colp.stride(0),
                dbp,
                dpp,
                rows,
                nb,
                nmod,
                chunk_rows,
                STORE_S=store_s,
                NEED_ROW=need_row,
                NEED_COL=need_col,
                ACC=_TL[acc],
                DOT=_dot_dtype(dtype, device),
                PRECISION=_input_precision(dtype, device),
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_K=bk,
                num_warps=warps,
            )
        if need_beta:
            dbeta += dbp[:progs].sum(0)
        if need_param:
            dparam += dpp[:progs].sum(0)
        if need_col:
            assert colsum is not None
            colsum += colp[:, : triton.cdiv(rows, bm)].sum(1)
        for m in range(nmod if store_s else 0):
            s_m = s[m, :rows]
            cols = slice(offsets[m], offsets[m] + dims[m])
            a_m = pa.cat[row0 : row0 + rows, cols]
            if need_da:
                da = s_m @ pb.cat[:nb, cols]
                if rbf[m]:
                    rowsum = rowp[m, :, :rows].sum(0)
                    da = da.to(acc) - (two_gamma[m] * rowsum)[:, None] * a_m.to(acc)
                dxs_a[m][row0 : row0 + rows] = da
            if need_db:
                prev = db_sum[m]
                if prev is None:
                    part = s_m.t() @ a_m
                    db_sum[m] = part if chunks == 1 and not rbf[m] else part.to(acc)
                elif dtype == acc:  # accumulate in place, no temporary
                    prev.addmm_(s_m.t(), a_m)
                else:
                    prev += s_m.t() @ a_m

    dxs_b = []
    for m in range(nmod if need_db else 0):
        db = db_sum[m]
        assert db is not None
        if rbf[m]:
            assert colsum is not None
            b_m = pb.cat[:nb, offsets[m] : offsets[m] + dims[m]]
            db = db - (two_gamma[m] * colsum[m])[:, None] * b_m.to(acc)
        dxs_b.append(db.to(dtype).contiguous())
    return (
        dxs_a,
        dxs_b,
        dbeta.to(dtype) if need_beta else torch.zeros(0, dtype=dtype, device=device),
        dparam.to(params.dtype) if need_param else torch.zeros(0, dtype=params.dtype, device=device),
    )
