"""MFB op (Yu et al. 2017; MLB, Kim et al. 2017, is its k = 1 case; DESIGN.md section 6):
checks, backend choice, autograd, fake kernels.

``fusionops::mfb(x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor,
activation, normalize, backend) -> y`` and its backward op carry the fused implementations
(shared with BLOCK: ``fusionops/ops/_bilinear.py``); the ``reference`` backend is served by
``fusionops.reference`` directly, with PyTorch's own autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusionops import reference
from fusionops.ops import _autocast, _bilinear
from fusionops.ops._bilinear_op import BilinearOp, check_dropouts, seed_for
from fusionops.registry import OpDef, register

OP = "mfb"

# Automatic choice on CPU, on N·k·o: the fused kernels everywhere, for their memory (2.1-2.3x less
# extra peak than the reference at the headline, benchmarks/results/mfb_cpu_2026-12-04_headline*.csv,
# quiet); their speed there is 0.74-0.83x the reference's (the backward recomputes the projections).
# Two crossover sweeps on a quiet machine (benchmarks/results/crossover_mfb_cpu_2026-12-04_run{1,2}.csv)
# found no size from which the fused kernels never lose: fwd+bwd 0.51-1.14x (the backward
# recomputes the projections), forward 0.86-2.1x. They stay the automatic choice on CPU for
# their memory; the reference is as fast or faster (fusionops.backend('reference')).
# The recomputation bounds it (issue 20): fused fwd+bwd does 4/3 of the reference's GEMM FLOPs
# (5.57 against 4.23 GFLOP at the headline), 0.76x the reference's speed were both all GEMMs at
# one rate; the reference's elementwise passes over its (N, k·o) tensors leave a little more:
# 0.79-0.85x at d = 512 with one thread after issue 20's kernel changes (CPU time, interleaved);
# the headline CSVs, re-run quiet after them: 0.83x (2 threads), 0.74x (1 thread).
# Re-swept 2026-12-05 (quiet, *_2026-12-05_run{1,2}.csv, after issue 20's kernel changes): fwd+bwd
# wins at 64-wide inputs (1.04-1.43x) and at N = 64 of the 512-wide ones (1.06-1.08x), loses at
# N = 16, 256 and 1024 of those (0.81-0.95x, once 1.12x); forward 0.82-4.3x. Fused wins at small
# sizes and loses at large ones, where the memory matters: no threshold of the rule's form (fused
# from a size on) keeps the wins, and the fused kernels stay the choice.
CPU_FUSED_MIN_ELEMENTS = 0
CPU_FUSED_MIN_ELEMENTS_FORWARD = 0

OPDEF = register(
    OpDef(
        name=OP,
        reference=reference.mfb,
        compiled=_bilinear.CompiledKernels(),
        kernels=("_bilinear_fwd", "_bilinear_bwd"),
        triton_module="bilinear",
        size_metric="N*k*o",
        cpu_min_size=CPU_FUSED_MIN_ELEMENTS,
        cpu_min_size_forward=CPU_FUSED_MIN_ELEMENTS_FORWARD,
        autocast="lower",
        rule_basis="fused for its memory, not faster than the reference: "
        "crossover_mfb_cpu_2026-12-04_run{1,2}.csv",
    )
)


def _call_args(
    factor: int, activation: str | None, normalize: bool, *_dropouts
) -> tuple[int, bool, int, int]:
    """(rank, rank_major, activation code, normalize code) of the shared kernels."""
    norm = _bilinear.NORM_WHOLE_ROW if normalize else _bilinear.NORM_NONE
    return factor, False, _bilinear.ACTIVATION_CODES[activation], norm


def _activation(activation: str | None) -> str | None:
    return None if activation == "none" else activation


def activation_to_op(config: tuple) -> tuple:
    """(factor, activation, …) as the custom ops take it: no activation is "none"."""
    factor, activation, *rest = config
    return factor, activation or "none", *rest


def activation_from_op(config: tuple) -> tuple:
    factor, activation, *rest = config
    return factor, _activation(activation), *rest


def _drops(factor, activation, normalize, dropout_input, dropout_pre_norm, dropout_pre_lin, seed):
    """The kernels' (drop_in, drop_prod, drop_out, seed): MFB's dropout_pre_norm acts on the
    product e, MLB's dropout_pre_lin on z."""
    return dropout_input, dropout_pre_norm, dropout_pre_lin, seed


def _reference(
    x, t, uw, ub, vw, vb, ow, ob, factor, activation, normalize, d_in, d_pre_norm, d_pre_lin, seed
):
    """The reference with the fused kernels' dropout masks (the backend ``reference`` and the
    second-order gradients)."""
    return reference.mfb(
        x, t, uw, ub, vw, vb, ow, ob, factor, activation, normalize, dropout_input=d_in,
        dropout_pre_norm=d_pre_norm, dropout_pre_lin=d_pre_lin, training=True, seed=seed,
    )  # fmt: skip


def check_factorized(
    op: str, x: Tensor, t: Tensor, u_weight: Tensor, u_bias: Tensor | None, v_weight: Tensor,
    v_bias: Tensor | None, out_weight: Tensor, out_bias: Tensor | None, factor: int, activation: str | None,
    normalize: bool, blocks: bool,
) -> tuple[torch.Size, int, int]:  # fmt: skip
    """MFB's (``blocks`` False: ``u_weight (k·o, d_x)``) or MFH's (``u_weight (p, k·o, d_x)``,
    p blocks) arguments but the dropouts; returns the leading shape, the size metric
    ``N·p·k·o`` (p = 1 for MFB) and O."""
    lead = _bilinear.check_pair(op, x, t)
    _bilinear.check_positive_int(op, "factor", factor, "k, the number of factors pooled per output")
    _bilinear.check_activation(op, activation)
    if not isinstance(normalize, bool):
        raise TypeError(f"{op}: normalize must be a bool, got {type(normalize).__name__}")
    dims = 3 if blocks else 2
    if not isinstance(u_weight, Tensor) or u_weight.dim() != dims:
        given = tuple(u_weight.shape) if isinstance(u_weight, Tensor) else type(u_weight).__name__
        layout = "(p, k·o, d_x): the p blocks' nn.Linear(d_x, k·o) weights stacked" if blocks else (
            "(k·o, d_x) as nn.Linear stores it")  # fmt: skip
        raise ValueError(f"{op}: u_weight must be a {dims}-d tensor {layout}, got {given}")
    p = int(u_weight.shape[0]) if blocks else 1
    if p < 1:
        raise ValueError(f"{op}: u_weight holds no block (p = u_weight.shape[0] = 0); expected p >= 1")
    lead_dims = (p,) if blocks else ()
    ko = int(u_weight.shape[-2])
    if ko % factor != 0:
        raise ValueError(
            f"{op}: factor {factor} must divide u_weight.shape[{dims - 2}] = {ko} (k·o, k = factor); "
            f"got a remainder of {ko % factor}"
        )
    o = ko // factor
    why = f" ({'p, ' if blocks else ''}k·o, d) with {f'p = {p} blocks, ' if blocks else ''}k·o = {ko}"
    _bilinear.check_param(op, "u_weight", u_weight, (*lead_dims, ko, x.shape[-1]), x, why + ", d = d_x")
    _bilinear.check_param(op, "v_weight", v_weight, (*lead_dims, ko, t.shape[-1]), x, why + ", d = d_t")
    for name, b in (("u_bias", u_bias), ("v_bias", v_bias)):
        if b is not None:
            _bilinear.check_param(op, name, b, (*lead_dims, ko), x, f" ({'p, ' if blocks else ''}k·o)")
    if not isinstance(out_weight, Tensor) or out_weight.dim() != 2:
        raise ValueError(
            f"{op}: out_weight must be a 2-d tensor (O, p·o) as nn.Linear stores it (p = 1: MFB)"
        )
    out = int(out_weight.shape[0])
    _bilinear.check_param(
        op, "out_weight", out_weight, (out, p * o), x, f" (O, p·o with p = {p}, o = k·o / factor = {o})"
    )
    if out_bias is not None:
        _bilinear.check_param(op, "out_bias", out_bias, (out,), x, " (O, the rows of out_weight)")
    return lead, math.prod(lead) * p * ko, out


def _check_args(
    x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize,
    dropout_input=0.0, dropout_pre_norm=0.0, dropout_pre_lin=0.0, seed=None,
) -> tuple[torch.Size, int, int]:  # fmt: skip
    """Every argument of a call; returns the leading shape, the size metric N·k·o and O."""
    probs = {
        "dropout_input": dropout_input,
        "dropout_pre_norm": dropout_pre_norm,
        "dropout_pre_lin": dropout_pre_lin,
    }
    check_dropouts(OP, probs, seed)
    return check_factorized(
        OP,
        x,
        t,
        u_weight,
        u_bias,
        v_weight,
        v_bias,
        out_weight,
        out_bias,
        factor,
        activation,
        normalize,
        False,
    )


BILINEAR_OP = BilinearOp(
    OPDEF,
    ("u_weight", "u_bias", "v_weight", "v_bias", "out_weight", "out_bias"),
    (("factor", "int"), ("activation", "str"), ("normalize", "bool")),
    ("dropout_input", "dropout_pre_norm", "dropout_pre_lin"),
    _check_args,
    _call_args,
    _drops,
    _reference,
    chunked=False,
    to_op=activation_to_op,
    from_op=activation_from_op,
)
BILINEAR_OP.define()


def mfb(
    x: Tensor,
    t: Tensor,
    u_weight: Tensor,
    u_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None = None,
    *,
    factor: int,
    activation: str | None = "relu",
    normalize: bool = False,
    dropout_input: float = 0.0,
    dropout_pre_norm: float = 0.0,
    dropout_pre_lin: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """Multimodal factorized bilinear pooling (Yu et al. 2017; DESIGN.md section 6).

    ``e = act(x Uᵀ + b_u) ⊙ act(t Vᵀ + b_v)``, ``z_j = Σ_{i<k} e_{j·k+i}``, optional
    ``n(z)`` (signed square root, then L2 over the row), ``y = z W_oᵀ + b_o``. MLB is
    ``factor=1`` (Kim et al. use ``activation="tanh"``).

    Args:
        x, t: ``(*, d_x)`` and ``(*, d_t)``, one leading shape, dtype and device.
        u_weight, v_weight: ``(k·o, d_x)``, ``(k·o, d_t)`` (block.bootstrap's ``linear0``,
            ``linear1``); u_bias, v_bias: ``(k·o,)`` or None.
        out_weight: ``(O, o)``; out_bias: ``(O,)`` or None (``linear_out``).
        factor: k >= 1, dividing ``k·o``.
        activation: ``"relu"`` (block.bootstrap's default), ``"tanh"`` or None.
        normalize: apply ``n`` to the pooled ``z``.
        dropout_input, dropout_pre_norm, dropout_pre_lin: block.bootstrap's dropouts, inverted,
            always applied (a layer passes them in training only): on both activated
            projections, on the product ``e`` (MFB's) and on ``z`` before the output projection
            (MLB's). Their masks are hashed from ``seed`` (None: drawn from torch's generator
            when a probability is > 0), regenerated in backward, never stored.

    Returns:
        ``(*, O)``. The fused kernels never hold the ``(*, k·o)`` projections or their product
        for all rows: they work on tiles of rows and recompute them in backward.
    """
    lead, size, out = _check_args(
        x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias, factor, activation, normalize,
        dropout_input, dropout_pre_norm, dropout_pre_lin, seed,
    )  # fmt: skip
    activation = _activation(activation)  # type: ignore[arg-type]
    probs = (float(dropout_input), float(dropout_pre_norm), float(dropout_pre_lin))
    seed = seed_for(probs, seed)
    if _autocast.enabled(x.device):
        return _autocast.call_without_autocast(
            OPDEF.autocast, x.device, mfb, x, t, u_weight, u_bias, v_weight, v_bias, out_weight, out_bias,
            factor=factor, activation=activation, normalize=normalize, dropout_input=probs[0],
            dropout_pre_norm=probs[1], dropout_pre_lin=probs[2], seed=seed,
        )  # fmt: skip
    params = (u_weight, u_bias, v_weight, v_bias, out_weight, out_bias)
    return BILINEAR_OP.call(x, t, params, (factor, activation, normalize, *probs, seed), lead, size, out)
