"""BLOCK op (Ben-younes et al. 2019; MUTAN, Ben-younes et al. 2017, is its one-chunk case;
DESIGN.md section 6): checks, backend choice, autograd, fake kernels.

``fusionops::block_fusion(x, t, merge_weight0, merge_bias0, merge_weight1, merge_bias1,
out_weight, out_bias, rank, normalize, backend) -> y`` and its backward op carry the fused
implementations (shared with MFB: ``fusionops/ops/_bilinear.py``); the ``reference`` backend is
served by ``fusionops.reference`` directly, with PyTorch's own autograd. ``x``, ``t`` are the
projected ``x̃``, ``t̃`` (block.bootstrap's ``linear0``/``linear1`` outputs, after their dropout).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusionops import reference
from fusionops.ops import _autocast, _bilinear
from fusionops.ops._bilinear_op import BilinearOp, check_dropouts, seed_for
from fusionops.registry import OpDef, register

OP = "block_fusion"

# Automatic choice on CPU, on N·R·m: the fused kernels everywhere (5.6-8.5x less extra peak than
# the reference at the headline and 1.71x / 1.20x its speed with 2 / 1 threads, benchmarks/results/
# block_fusion_cpu_2026-12-04_headline*.csv, quiet, after issue 20's kernel changes).
# Two crossover sweeps on a quiet machine (benchmarks/results/crossover_block_fusion_cpu_2026-12-04_
# run{1,2}.csv): forward 1.2-9.3x everywhere, fwd+bwd 1.1-6.7x up to N*R*m = 1.8M and 0.83-0.93x at
# 7.4M (the largest measured), where the fused kernels keep the 6-8x smaller peak: fused everywhere.
# After issue 20's kernel changes (backward by chunks, larger tiles), one thread, CPU time,
# interleaved: fwd+bwd 1.13-3.4x on those sizes, 1.13x at 7.4M (the crossover CSVs predate it).
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.block_fusion,
        compiled=_bilinear.CompiledKernels(),
        kernels=("_bilinear_fwd", "_bilinear_bwd"),
        triton_module="bilinear",
        size_metric="N*R*m",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        autocast="lower",
        rule_basis="measured faster up to N*R*m = 1.8M; fwd+bwd 0.83-0.93x at 7.4M, "
        "kept for its 6-8x smaller peak",
    )
)


_NORM_CODES = {"none": _bilinear.NORM_NONE, "before_cat": _bilinear.NORM_PER_CHUNK,
               "after_cat": _bilinear.NORM_WHOLE_ROW}  # fmt: skip


def _call_args(rank: int, normalize: str, *_dropouts) -> tuple[int, bool, int, int]:
    """(rank, rank_major, activation code, normalize code) of the shared kernels."""
    return rank, True, _bilinear.ACTIVATION_CODES[None], _NORM_CODES[normalize]


def _drops(rank, normalize, dropout_pre_lin, seed):
    """The kernels' (drop_in, drop_prod, drop_out, seed): BLOCK's dropout_pre_lin acts on z
    (its dropout_input acts on x̃, t̃, the op's inputs)."""
    return 0.0, 0.0, dropout_pre_lin, seed


def _reference(x, t, w0, b0, w1, b1, ow, ob, rank, normalize, d_pre_lin, seed):
    """The reference with the fused kernels' dropout mask."""
    return reference.block_fusion(
        x, t, w0, b0, w1, b1, ow, ob, rank, normalize, dropout_pre_lin=d_pre_lin, training=True, seed=seed
    )


def _check_args(
    x: Tensor,
    t: Tensor,
    merge_weight0: Tensor,
    merge_bias0: Tensor | None,
    merge_weight1: Tensor,
    merge_bias1: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    rank: int,
    normalize: str,
    dropout_pre_lin: float = 0.0,
    seed: int | None = None,
) -> tuple[torch.Size, int, int]:
    """Every argument of a call; returns the leading shape, the size metric N·R·m and O."""
    lead = _bilinear.check_pair(OP, x, t)
    check_dropouts(OP, {"dropout_pre_lin": dropout_pre_lin}, seed)
    m = int(x.shape[-1])
    if t.shape[-1] != m:
        raise ValueError(
            f"{OP}: t has width {t.shape[-1]}, expected {m} (the width m of x: BLOCK pairs chunks of x̃ "
            "and t̃ of equal widths)"
        )
    _bilinear.check_positive_int(OP, "rank", rank, "R, the rank of every chunk's bilinear form")
    if normalize not in _NORM_CODES:
        raise ValueError(f"{OP}: normalize must be one of {list(_NORM_CODES)}, got {normalize!r}")
    if not isinstance(merge_weight0, Tensor) or merge_weight0.dim() != 3:
        given = tuple(merge_weight0.shape) if isinstance(merge_weight0, Tensor) else type(merge_weight0)
        raise ValueError(
            f"{OP}: merge_weight0 must be a 3-d tensor (C, R·s, s): the chunks' nn.Linear(s, s·R) "
            f"weights stacked, got {given}"
        )
    chunks = int(merge_weight0.shape[0])
    if chunks < 1 or m % chunks != 0:
        raise ValueError(
            f"{OP}: the chunk count C = merge_weight0.shape[0] = {chunks} must be >= 1 and divide the "
            f"width m = {m} of x (chunks of equal width s = m / C)"
        )
    s = m // chunks
    shape = (chunks, rank * s, s)
    why = f" (C, R·s, s) with C = {chunks}, R = rank = {rank}, s = m / C = {s}"
    _bilinear.check_param(OP, "merge_weight0", merge_weight0, shape, x, why)
    _bilinear.check_param(OP, "merge_weight1", merge_weight1, shape, x, why)
    if merge_bias0 is not None:
        _bilinear.check_param(OP, "merge_bias0", merge_bias0, (chunks, rank * s), x, " (C, R·s)")
    if merge_bias1 is not None:
        _bilinear.check_param(OP, "merge_bias1", merge_bias1, (chunks, rank * s), x, " (C, R·s)")
    if not isinstance(out_weight, Tensor) or out_weight.dim() != 2:
        raise ValueError(f"{OP}: out_weight must be a 2-d tensor (O, m) as nn.Linear stores it")
    out = int(out_weight.shape[0])
    _bilinear.check_param(OP, "out_weight", out_weight, (out, m), x, f" (O, m = {m}, the width of x)")
    if out_bias is not None:
        _bilinear.check_param(OP, "out_bias", out_bias, (out,), x, " (O, the rows of out_weight)")
    return lead, math.prod(lead) * rank * m, out


BILINEAR_OP = BilinearOp(
    OPDEF,
    ("merge_weight0", "merge_bias0", "merge_weight1", "merge_bias1", "out_weight", "out_bias"),
    (("rank", "int"), ("normalize", "str")),
    ("dropout_pre_lin",),
    _check_args,
    _call_args,
    _drops,
    _reference,
    chunked=True,
)
BILINEAR_OP.define()


def block_fusion(
    x: Tensor,
    t: Tensor,
    merge_weight0: Tensor,
    merge_bias0: Tensor | None,
    merge_weight1: Tensor,
    merge_bias1: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None = None,
    *,
    rank: int,
    normalize: str = "before_cat",
    dropout_pre_lin: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """Block-term bilinear fusion (BLOCK, Ben-younes et al. 2019; MUTAN with one chunk;
    DESIGN.md section 6) of the projected ``x̃``, ``t̃``.

    Per chunk c of width ``s = m / C``: ``z_c = Σ_{r<R} (x̃_c A_{c,r}ᵀ + a_{c,r}) ⊙
    (t̃_c B_{c,r}ᵀ + b_{c,r})``; ``n`` (signed square root, then L2) on each ``z_c``
    (``"before_cat"``, block.bootstrap's default), on ``cat_c z_c`` (``"after_cat"``; MUTAN's
    ``normalize=True``) or not at all (``"none"``); ``y = cat_c(z_c) W_oᵀ + b_o``.

    Args:
        x, t: ``(*, m)``, one leading shape, dtype and device.
        merge_weight0, merge_weight1: ``(C, R·s, s)``, chunk c's ``nn.Linear(s, s·R)`` weight at
            index c (row ``r·s + j``: rank major, as block.bootstrap's ``view(bsize, rank, -1)``);
            MUTAN's ``merge_linear0.weight (R·m, m)`` is ``merge_weight0[None]``.
        merge_bias0, merge_bias1: ``(C, R·s)`` or None.
        out_weight: ``(O, m)``; out_bias: ``(O,)`` or None.
        rank: R >= 1. normalize: ``"before_cat"``, ``"after_cat"`` or ``"none"``.
        dropout_pre_lin: block.bootstrap's, inverted, always applied (a layer passes it in
            training only), on ``cat_c z_c`` before the output projection; its mask is hashed
            from ``seed`` (None: drawn from torch's generator when it is > 0), regenerated in
            backward, never stored.

    Returns:
        ``(*, O)``. The fused kernels never hold the chunks' ``(*, R·s)`` projections for all
        rows: they work on tiles of rows and recompute them in backward.
    """
    lead, size, out = _check_args(
        x, t, merge_weight0, merge_bias0, merge_weight1, merge_bias1, out_weight, out_bias, rank, normalize,
        dropout_pre_lin, seed,
    )  # fmt: skip
    p = float(dropout_pre_lin)
    seed = seed_for((p,), seed)
    if _autocast.enabled(x.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, x.device, block_fusion, x, t, merge_weight0, merge_bias0, merge_weight1,
            merge_bias1, out_weight, out_bias, rank=rank, normalize=normalize, dropout_pre_lin=p, seed=seed,
        )  # fmt: skip
    params = (merge_weight0, merge_bias0, merge_weight1, merge_bias1, out_weight, out_bias)
    return BILINEAR_OP.call(x, t, params, (rank, normalize, p, seed), lead, size, out)
