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

Compute precision: float32 (float64 for float64 inputs); ``tl.dot`` takes operands of the
input dtype (tensor cores for 16-bit); float32 dots follow torch's float32 matmul setting
(``_common._input_precision``: tf32 on CUDA when allowed, else ``"ieee"``). The GEMMs of dx and dF
follow torch's matmul settings (float32 stays ieee unless TF32 is allowed globally). No
atomics: partial sums go to small buffers summed by torch, so results are reproducible.
"""

from __future__ import annotations

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


def _pack_operands(
    xs: list[Tensor], factors: list[Tensor], mask: Tensor | None, block_n: int, block_o: int, block_k: int
) -> _Operands:
    """Any strides of xs, factors and mask are read as they are; masked rows are selected
    away (never multiplied), so their NaN cannot leak. Padding is zero."""
    x0 = xs[0]
    n, dtype, device = x0.shape[0], x0.dtype, x0.device
    r, _, o = factors[0].shape
    dims = tuple(int(x.shape[1]) for x in xs)
    widths = tuple(triton.cdiv(d, block_k) * block_k for d in dims)
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
    return _Operands(xcat, fcat, f0, dims, offsets, *_layout(widths, device))


def _fwd_blocks(n: int, o: int, dtype: torch.dtype, programs: int) -> tuple[int, int, int, int]:
    """BLOCK_N, BLOCK_O, BLOCK_K and num_warps of the forward: three (BLOCK_N, BLOCK_O)
    float32 tiles live (accumulator, product, projection), so up to 128 x 64 in 16-bit."""
    bo = _block(o, 16, 64)
    bn = _row_block(n, triton.cdiv(o, bo), 128 if dtype in _HALF else 64, programs)
    return bn, bo, _reduce_hi(dtype), 8 if bn * bo >= 64 * 64 else 4


def _bwd_blocks(n: int, o: int, dtype: torch.dtype, programs: int) -> tuple[int, int, int, int]:
    """BLOCK_N, BLOCK_O, BLOCK_K and num_warps of the backward, whose programs keep 2M - 1
    float32 tiles (projections and prefixes) on chip: up to 64 x 64 (compiled for sm90 with
    M = 3, 16-bit: 126 registers a thread, no spills)."""
    bo = _block(o, 16, 64)
    bn = _row_block(n, triton.cdiv(o, bo), 64, programs)
    return bn, bo, _reduce_hi(dtype), 8 if bn * bo >= 64 * 64 else 4


def _kernel_args(p: _Operands) -> tuple:
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
    bn, bo, bk, warps = _fwd_blocks(n, o, dtype, _target_programs(device))
    packed = _pack_operands(xs, factors, mask, bn, bo, bk)
    with _on(device):
        _lmf_fwd_kernel[(triton.cdiv(n, bn) * triton.cdiv(o, bo),)](
            *_kernel_args(packed),
            rank_weight,
            rank_weight.stride(0),
            rank_weight if bias is None else bias,
            0 if bias is None else bias.stride(0),
            out,
            n,
            o,
            r,
            NMOD=len(xs),
            HAS_BIAS=bias is not None,
            ACC=_TL[_acc(dtype)],
            DOT=_dot_dtype(dtype, device),
            PRECISION=_input_precision(dtype, device),
            BLOCK_N=bn,
            BLOCK_O=bo,
            BLOCK_K=bk,
            num_warps=warps,
        )
    return out


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
    bn, bo, bk, warps = _bwd_blocks(n, o, dtype, _target_programs(device))
    packed = _pack_operands(xs, factors, mask, bn, bo, bk)
    # Row chunks, each a multiple of BLOCK_N, so that dA (M, rows, R, O) stays under the cap.
    chunks = triton.cdiv(nmod * n * r * o, _SCRATCH_ELEMENTS) if store_da else 1
    chunk_rows = triton.cdiv(triton.cdiv(n, min(chunks, triton.cdiv(n, bn))), bn) * bn
    chunks = triton.cdiv(n, chunk_rows)
    n_ob = triton.cdiv(o, bo)
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
        with _on(device):
            _lmf_bwd_kernel[(triton.cdiv(rows, bn) * n_ob,)](
                grad[row0:],
                grad.stride(0),
                grad.stride(1),
                packed.xcat[row0:],
                *_kernel_args(packed)[1:],
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
                BLOCK_N=bn,
                BLOCK_O=bo,
                BLOCK_K=bk,
                num_warps=warps,
            )
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
